"""peerd on the MQTT of other brokers: NATS and RabbitMQ, each a private instance on free ports.

The daemon keeps to MQTT 3.1.1, QoS 0 and 1 and retained messages so that it works with the
brokers organisations already run, not only Mosquitto. Each case pairs two real daemons by
invite, moves a file of several chunks (hash-equal, verified), sends a message on a channel, and
has a revocation reach a node that was offline when it was published, with the revoking node
gone: from the retained copy on NATS, and on RabbitMQ (which sends no retained messages to
wildcard subscriptions) from the revoking node's retained index (protocol/SPEC.md 2.1). The
cases run where the broker is installed (both are on this project's machines) and say so
otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import free_port, wait_for_port
from tests.support.cluster import make_nodes, pair, wait_until
from tests.support.rabbitmq import available as rabbitmq_available
from tests.support.rabbitmq import rabbitmq

pytestmark = pytest.mark.slow


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    port = free_port()
    conf = tmp_path / "nats.conf"
    # NATS serves MQTT on top of JetStream, which keeps sessions and retained messages.
    conf.write_text(
        "listen: 127.0.0.1:-1\n"
        "server_name: peerd-test\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f"mqtt {{ listen: 127.0.0.1:{port} }}\n"
    )
    log = (tmp_path / "nats.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_port(port, 20)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        _stop_group(proc)
        log.close()


@pytest.fixture
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not rabbitmq_available():
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    # A short directory: Erlang's node and socket paths have length limits of their own.
    with rabbitmq(Path(os.path.realpath(tmp_path_factory.mktemp("rmq")))) as urls:
        yield urls["mqtt"]


def _exercise(root: Path, url: str, *, retained_for_wildcards: bool) -> None:
    a, b, c = make_nodes(root, url, ["alice", "bob", "carol"])
    a.start()
    b.start()
    c.start()
    try:
        pair(a, b)
        pair(b, c)
        source = root / "model.bin"
        source.write_bytes(os.urandom(3 * 1024 * 1024 + 1))  # several chunks and a short one
        out = a.cli("send", str(source), "--to", b.peer_id, "--wait", "--no-progress", timeout=120)
        assert "verified" in out
        (received,) = (b.dir / "inbox").rglob("model.bin")
        assert (
            hashlib.sha256(received.read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )

        a.cli("msg", "send", b.peer_id, "news", "first")
        a.cli("msg", "send", b.peer_id, "news", "second")
        listened = b.cli("msg", "listen", "news", "--count", "2", "--timeout", "30", timeout=60)
        assert listened.splitlines() == ["first", "second"]

        # Carol is offline when bob revokes his key, and bob is gone when she comes back: she
        # can only learn it from the broker's retained copy of his statement.
        c.stop()
        said = b.cli("revoke", "--reason", "laptop stolen")
        # It answers once a fresh subscription read the retained statement back.
        assert "the broker keeps the revocation for peers offline now" in said, said
        wait_until(lambda: "event=revocation.applied" in a.log(), 30, what="alice learning it")
        b.stop()
        c.start()
        # On RabbitMQ, which sends no retained message to a wildcard subscription (peerd's to
        # `rev/#`), she learns it from bob's index, `rev/<bob>/index`, to which she holds an
        # exact subscription (peerd/revocation_index.py); elsewhere from either.
        wait_until(
            lambda: "event=revocation.applied via=broker" in c.log(),
            30,
            what="carol learning bob's revocation from the retained copy",
        )
        assert c.status()["revocation_index"]["watched"] >= 1
        if not retained_for_wildcards:
            assert c.status()["revocation_index"]["statements_read"] >= 1
    finally:
        for n in (a, b, c):
            n.kill()


def test_nats_mqtt(tmp_path: Path, nats_url: str) -> None:
    _exercise(tmp_path, nats_url, retained_for_wildcards=True)


def test_rabbitmq_mqtt(tmp_path: Path, rabbitmq_url: str) -> None:
    _exercise(tmp_path, rabbitmq_url, retained_for_wildcards=False)
