"""Several broker URLs against a real 3-node NATS cluster (JetStream and MQTT on every node):
a receiver whose cluster node is killed mid-transfer moves to another node by itself and the
file arrives identical; a revocation published while a node was offline reaches it through a
node other than the revoker's (issue 12 item 4). Run on each MQTT client ([broker] client)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import MQTT_CLIENT_ENV, Node, pair, wait_until
from tests.support.files import partial_files, random_file, received_files, sha256
from tests.support.nats import NatsCluster, nats_binary

pytestmark = pytest.mark.slow

# The size the issue names; PEERD_CLUSTER_MIB makes it smaller for a quick local run.
SIZE = int(os.environ.get("PEERD_CLUSTER_MIB", "256")) << 20


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    if nats_binary() is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    with NatsCluster(tmp_path / "nats") as cluster:
        yield cluster


def _transfer(node: Node, tid: str) -> dict[str, Any]:
    return next(t for t in node.json("transfers") if t["id"] == tid)


@pytest.mark.parametrize("client", ["builtin", "aiomqtt"])
def test_receiver_moves_to_another_cluster_node(
    tmp_path: Path, nats: NatsCluster, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MQTT_CLIENT_ENV, client)  # the nodes' [broker] client
    n1, n2, n3 = nats.urls
    alice = Node(tmp_path, "alice", n1).init()
    # `--broker` repeated: bob and carol know nodes 2 and 3, in that order.
    bob = Node(tmp_path, "bob", n2, broker=n3).init()
    carol = Node(tmp_path, "carol", n2, broker=n3).init()
    nodes = (alice, bob, carol)
    try:
        for n in nodes:
            n.start()
        pair(alice, bob)
        pair(alice, carol)
        assert bob.status()["broker"]["url"] == n2

        src = random_file(tmp_path / "model.bin", SIZE)
        started = alice.json("send", str(src), "--to", bob.peer_id)
        wait_until(lambda: partial_files(bob), 60, what="bob writing the file")
        nats.kill(1)  # bob's (and carol's) node, by its pid
        assert not received_files(bob, alice), "the kill came too late to prove anything"
        wait_until(
            lambda: _transfer(alice, started["id"])["state"] == "verified",
            300,
            interval=0.5,
            what="the transfer verified after bob moved to node 3",
        )
        (got,) = received_files(bob, alice)
        assert sha256(got) == sha256(src)
        broker = wait_until(
            lambda: (b := bob.status()["broker"])["connected"] and b,
            60,
            what="bob connected (through node 3)",
        )
        assert broker["url"] == n3
        left = {u["url"]: u for u in broker["urls"]}
        assert left[n2]["last_error"]  # status says why node 2 was left
        assert not left[n3]["last_error"]

        # Carol is offline while alice revokes her key, and alice is gone when carol returns
        # (through node 3, node 2 being dead): only the cluster's retained copy can tell her.
        carol.stop()
        alice.cli("revoke", "--reason", "laptop stolen")
        wait_until(lambda: "event=revocation.applied" in bob.log(), 30, what="bob learning it")
        alice.stop()
        carol.start()
        assert carol.status()["broker"]["url"] == n3
        wait_until(
            lambda: "event=revocation.applied via=broker" in carol.log(),
            120,
            what="carol learning alice's revocation from another node",
        )
    finally:
        for n in nodes:
            n.kill()
