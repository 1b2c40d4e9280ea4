"""One-round-trip sessions between real daemons (SPEC.md 4.7): a known peer resumes with the
ticket its last session left, also after both daemons restarted; a peer without one (a first
contact, or a responder that lost its tickets) gets XX, and nothing hangs."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.client import SyncClient
from protocol.resumption import NOISE_RESUME
from protocol.session import NOISE_XX, NOISE_XXPSK3
from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, pair, wait_until


@pytest.fixture
def paired(tmp_path: Path, broker: Broker) -> Iterator[tuple[Node, Node]]:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    a.start()
    b.start()
    try:
        pair(a, b)
        a.wait_connected(b)
        b.wait_connected(a)
        yield a, b
    finally:
        a.kill()
        b.kill()


def _handshakes(node: Node) -> list[dict[str, Any]]:
    client = SyncClient(socket_path=node.socket, timeout=10)
    try:
        result: list[dict[str, Any]] = client.request("v1.handshakes", {}, timeout=10)
    finally:
        client.close()
    return result


def _tickets(node: Node) -> list[tuple[str, int]]:
    with sqlite3.connect(node.dir / "peerd.db") as db:
        return list(db.execute("SELECT peer_id, initiator FROM tickets ORDER BY initiator"))


def _restart(*nodes: Node) -> None:
    for n in nodes:
        n.stop()
    for n in nodes:
        n.start()


def test_a_known_peer_resumes_after_both_restart_and_a_first_contact_is_xx(
    paired: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = paired
    # First contact: pairing by invite, XX with the invite's PSK.
    assert a.peers()[b.peer_id]["session_protocol"] == NOISE_XXPSK3
    _restart(a, b)
    # Both kept their tickets for each other, one per direction.
    assert _tickets(a) == [(b.peer_id, 0), (b.peer_id, 1)]
    assert _tickets(b) == [(a.peer_id, 0), (a.peer_id, 1)]
    a.cli("msg", "send", b.peer_id, "ops", "first after restart")
    out = b.cli("msg", "listen", "ops", "--count", "1", "--timeout", "30", timeout=60)
    assert out.strip() == "first after restart"
    a.wait_connected(b)
    assert a.peers()[b.peer_id]["session_protocol"] == NOISE_RESUME
    assert b.peers()[a.peer_id]["session_protocol"] == NOISE_RESUME
    assert a.status()["session_protocols"] == {NOISE_RESUME: 1}
    assert _handshakes(a)[-1]["protocol"] == NOISE_RESUME
    # The used ticket was replaced: one per direction still, and never the one used.
    assert len(_tickets(a)) == 2
    # Bob initiates too (its own ticket, the other direction).
    b.cli("connect", a.peer_id)
    wait_until(lambda: _handshakes(b)[-1]["initiator"], 15, what="bob's own handshake with alice")
    assert _handshakes(b)[-1]["protocol"] == NOISE_RESUME
    # A peer met for the first time gets XX (by invite here: XXpsk3), never a resumption.
    (c,) = make_nodes(tmp_path, a.broker_url, ["carol"])
    c.start()
    try:
        pair(a, c)
        a.wait_connected(c)
        assert a.peers()[c.peer_id]["session_protocol"] == NOISE_XXPSK3
    finally:
        c.kill()


def test_a_responder_that_lost_its_tickets_gets_xx_and_the_message_arrives(
    paired: tuple[Node, Node],
) -> None:
    a, b = paired
    a.stop()
    b.stop()
    with sqlite3.connect(b.dir / "peerd.db") as db:
        db.execute("DELETE FROM tickets")
    a.start()
    b.start()
    a.cli("msg", "send", b.peer_id, "ops", "after the fallback")
    out = b.cli("msg", "listen", "ops", "--count", "1", "--timeout", "30", timeout=60)
    assert out.strip() == "after the fallback"
    a.wait_connected(b)
    assert a.peers()[b.peer_id]["session_protocol"] == NOISE_XX
    assert b.status()["rejections"].get("unknown-ticket", 0) >= 1
    # ... and that XX session left new tickets: the next one resumes.
    _restart(a, b)
    a.cli("connect", b.peer_id)
    a.wait_connected(b)
    assert a.peers()[b.peer_id]["session_protocol"] == NOISE_RESUME


def test_a_file_to_a_known_peer_after_restart_goes_through_a_resumption(
    paired: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = paired
    _restart(a, b)
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    result = a.json("send", str(src), "--to", b.peer_id, "--wait")
    assert result["state"] == "verified"
    assert (b.dir / "inbox" / a.peer_id / "model.bin").read_bytes() == src.read_bytes()
    assert a.peers()[b.peer_id]["session_protocol"] == NOISE_RESUME
