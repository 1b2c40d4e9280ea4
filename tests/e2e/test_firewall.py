"""Two real daemons through a firewall's kind of broker listener: MQTT over WebSocket (ws://) and
mqtts:// with client certificates (require_certificate), for each MQTT client; and a node
without a certificate told so in one line. Private Mosquitto, throwaway CA
(tests/peerd/test_mqtt_firewall.py's `Listeners`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.mqtt import CLIENTS
from tests.peerd.test_mqtt_firewall import Listeners
from tests.support.cluster import Node, make_nodes, pair, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listeners]:
    ls = Listeners(tmp_path_factory.mktemp("firewall-e2e"))
    try:
        yield ls.start()
    finally:
        ls.broker.close()


def configure(node: Node, client: str, tls: dict[str, Path]) -> None:
    conf = node.config.read_text()
    conf = conf.replace('client = "builtin"', f'client = "{client}"', 1)
    lines = "".join(f'{key} = "{path}"\n' for key, path in tls.items())
    node.config.write_text(conf.replace("[broker]\n", "[broker]\n" + lines, 1))


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", ["ws", "mqtts"])
def test_pair_and_transfer(tmp_path: Path, listeners: Listeners, kind: str, client: str) -> None:
    a, b = make_nodes(tmp_path, listeners.urls[kind], ["alice", "bob"])
    ca = listeners.ca
    tls = (
        {"ca_file": ca.ca, "cert_file": ca.client_crt, "key_file": ca.client_key}
        if kind == "mqtts"
        else {}
    )
    for n in (a, b):
        configure(n, client, tls)
        n.start()
    try:
        pair(a, b)
        source = tmp_path / "model.bin"
        # Small: Mosquitto 2.0.11 reads a websockets client at about 40 KB/s (docs/brokers.md).
        source.write_bytes(os.urandom(48 * 1024 + 7))
        out = a.cli("send", str(source), "--to", b.peer_id, "--wait", "--no-progress", timeout=120)
        assert "verified" in out
        (received,) = (b.dir / "inbox").rglob("model.bin")
        assert hashlib.sha256(received.read_bytes()).digest() == (
            hashlib.sha256(source.read_bytes()).digest()
        )
        assert a.status()["broker"]["url"] == listeners.urls[kind]
    finally:
        for n in (a, b):
            n.kill()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_node_without_a_client_certificate_is_told_in_one_line(
    tmp_path: Path, listeners: Listeners, client: str
) -> None:
    (a,) = make_nodes(tmp_path, listeners.urls["mqtts"], ["alice"])
    configure(a, client, {"ca_file": listeners.ca.ca})
    a.start(wait_broker=False)
    try:
        wait_until(
            lambda: "requires a client certificate" in (a.status()["broker"]["last_error"] or ""),
            30,
            what="the status naming the missing certificate",
        )
        assert not a.status()["broker"]["connected"]
        assert "requires a client certificate" in a.log()
    finally:
        a.kill()
