"""Two organisations, each with its own Mosquitto configured as shipped, joined by the shipped
bridge: systemd/mosquitto-bridge.conf on org A's broker (rewritten only where an installation
differs: the partner's address, the password, no TLS on loopback, the network's name) and the
ACL lines it names on org B's. Nodes on either side pair, exchange messages and files both
ways, and revocations cross the bridge: live, and retained to a node that was offline. Nothing
outside the network's topic tree crosses."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.support.broker import Broker, shipped_acl, shipped_directives
from tests.support.cluster import UNREACHABLE, Node, log_in, make_nodes, pair, wait_until

BRIDGE_CONF = Path(__file__).resolve().parents[2] / "systemd" / "mosquitto-bridge.conf"
NETWORK = "test"  # the network tests.support.cluster's nodes are made in
# Where the shipped file names a network, an address or a secret an operator replaces.
PLACEHOLDER_TREE = "peerd/v1/example/"
TREE = f"peerd/v1/{NETWORK}/"

pytestmark = pytest.mark.slow


def bridge_user() -> str:
    (line,) = [d for d in shipped_directives(BRIDGE_CONF.read_text()) if "remote_username" in d]
    return line.split()[1]


def bridge_conf(remote_port: int, password: str) -> str:
    """The shipped bridge for a broker whose partner listens on loopback `remote_port`."""
    out = []
    for line in shipped_directives(BRIDGE_CONF.read_text()):
        key = line.split()[0]
        if key in ("bridge_cafile", "bridge_insecure"):
            continue  # TLS to the partner: loopback here
        if key == "address":
            line = f"address 127.0.0.1:{remote_port}"
        elif key == "remote_password":
            line = f"remote_password {password}"
        out.append(line.replace(PLACEHOLDER_TREE, TREE))
    assert any(line.startswith("topic ") for line in out), "the bridge bridges no topic"
    return "\n".join(out) + "\n"


def bridge_acl() -> str:
    """The ACL lines the shipped bridge asks the partner's broker to add."""
    return shipped_acl(BRIDGE_CONF.read_text()).replace(PLACEHOLDER_TREE, TREE)


def _client(broker: Broker, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=user, username=user, password=broker.users[user]
    )


async def _across(a: Broker, b: Broker, *, outside: str) -> list[str]:
    """Once the bridge carries a message from A to B: publish on A to `outside` (a topic the
    ACL lets a client write, but outside the network's tree), then to a marker inside it, and
    return the topics B's subscriber saw up to the marker, in order."""
    inbox = f"{TREE}in/probe-b"
    async with _client(b, "probe-b") as sub, _client(a, "probe-a") as pub:
        await sub.subscribe(inbox, qos=1)
        await sub.subscribe(outside, qos=1)
        messages = sub.messages.__aiter__()

        async def first_through() -> None:
            async with asyncio.timeout(60):  # the bridge connects on its own schedule
                while True:
                    await pub.publish(inbox, b"hello?", qos=1)
                    try:
                        async with asyncio.timeout(1):
                            if (await messages.__anext__()).payload == b"hello?":
                                return
                    except TimeoutError:
                        continue

        await first_through()
        await pub.publish(outside, b"must stay in org A", qos=1)
        await pub.publish(inbox, b"marker", qos=1)
        seen = []
        async with asyncio.timeout(30):
            while True:
                msg = await messages.__anext__()
                if msg.payload == b"hello?":
                    continue  # a late copy of the first probes
                seen.append(str(msg.topic))
                if msg.payload == b"marker":
                    return seen


def learns(node: Node, issuer: Node, how: str) -> None:
    wait_until(
        lambda: node.peers()[issuer.peer_id]["state"] == "revoked",
        30,
        what=f"{node.name} learns {issuer.name}'s revocation {how}",
    )


@pytest.fixture
def orgs(tmp_path: Path) -> Iterator[tuple[Broker, Broker, list[Node]]]:
    """Org A's broker (alice, dave) bridged to org B's (bob, carol); the daemons not started."""
    nodes = make_nodes(tmp_path, UNREACHABLE, ["alice", "dave", "bob", "carol"])
    passwords = {n.peer_id: secrets.token_hex(8) for n in nodes}
    in_a, in_b = nodes[:2], nodes[2:]
    bridge_password = secrets.token_hex(8)
    b_users = {n.peer_id: passwords[n.peer_id] for n in in_b}
    b_users |= {bridge_user(): bridge_password, "probe-b": secrets.token_hex(8)}
    org_b = Broker(tmp_path / "org-b", shipped=True, users=b_users, extra_acl=bridge_acl())
    a_users = {n.peer_id: passwords[n.peer_id] for n in in_a}
    a_users["probe-a"] = secrets.token_hex(8)
    org_a = Broker(
        tmp_path / "org-a",
        shipped=True,
        users=a_users,
        extra_conf=bridge_conf(org_b.port, bridge_password),
    )
    try:
        org_b.start()
        org_a.start()
        for broker, side in ((org_a, in_a), (org_b, in_b)):
            for n in side:
                log_in(n, broker.url, passwords[n.peer_id])
        yield org_a, org_b, nodes
    finally:
        for n in nodes:
            n.kill()
        org_a.close()
        org_b.close()


def test_two_organisations_pair_transfer_and_revoke_across_the_bridge(
    orgs: tuple[Broker, Broker, list[Node]], tmp_path: Path
) -> None:
    org_a, org_b, (alice, dave, bob, carol) = orgs
    seen = asyncio.run(_across(org_a, org_b, outside="peerd/v1/other-network/in/probe-b"))
    assert seen == [f"{TREE}in/probe-b"], "only the network's tree crosses the bridge"

    for n in (alice, dave, bob, carol):
        n.start()
    pair(alice, bob)
    pair(alice, carol)
    pair(dave, carol)

    alice.cli("msg", "send", bob.peer_id, "ops", "from org A")
    got = bob.cli("msg", "listen", "ops", "--count", "1", "--timeout", "30", timeout=60)
    assert got.strip() == "from org A"
    bob.cli("msg", "send", alice.peer_id, "ops", "from org B")
    got = alice.cli("msg", "listen", "ops", "--count", "1", "--timeout", "30", timeout=60)
    assert got.strip() == "from org B"

    for sender, receiver, size in ((alice, bob, 5 * 256 * 1024 + 7), (bob, alice, 300_001)):
        src = tmp_path / f"from-{sender.name}.bin"
        src.write_bytes(os.urandom(size))
        done = sender.json("send", str(src), "--to", receiver.peer_id, "--wait", timeout=120)
        assert done["state"] == "verified"
        assert (receiver.dir / "inbox" / sender.peer_id / src.name).read_bytes() == (
            src.read_bytes()
        )

    # A key revoked in org B closes the session in org A at once.
    alice.wait_connected(bob, 30)
    with alice.events("session.closed") as events:
        bob.cli("revoke", "--reason", "laptop stolen")
        closed = events.wait_for(lambda e: e["event"] == "session.closed", 30)
    assert closed["data"]["peer"] == bob.peer_id
    assert closed["data"]["reason"] == "revoked"

    # Identities retired while a node of the other organisation was offline: it learns the
    # revocation from the copy the bridge retained on its own broker, either way across.
    for issuer, offline, online in ((alice, carol, bob), (carol, dave, None)):
        offline.stop()
        issuer.cli("revoke", "--identity", "--yes", "--reason", "decommissioned")
        if online is not None:
            learns(online, issuer, "live")
        offline.start()
        learns(offline, issuer, "from its broker's retained copy")
