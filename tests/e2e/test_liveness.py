"""Saying what is happening when a peer goes away (issue 12 item 9): a receiver whose daemon is
gone is shown offline in `peerd transfers` while the transfer waits for it, and its session is
shown stale in `peerd peers` instead of "up"; both clear when it is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, pair, wait_until
from tests.support.files import random_file, received_files, sha256


def _transfer(node: Node, tid: str) -> dict[str, Any]:
    return next(t for t in node.json("transfers") if t["id"] == tid)


def test_a_peer_that_went_away_is_shown_offline_and_stale(tmp_path: Path, broker: Broker) -> None:
    a, b = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    a.start()
    b.start()
    try:
        pair(a, b)
        a.wait_connected(b)
        assert "up" in a.cli("peers")
        b.kill()  # its daemon gone without a word: nothing tells alice but silence

        # Something to say to bob, left unanswered: the session is stale, no longer "up".
        a.cli("msg", "send", b.peer_id, "news", "hello")
        wait_until(lambda: a.peers()[b.peer_id]["silent_since"], 30, what="a stale session")
        table = a.cli("peers")
        assert "stale, silent" in table
        assert " up " not in table

        src = random_file(tmp_path / "model.bin", 3 * 256 * 1024)
        started = a.json("send", str(src), "--to", b.peer_id)
        wait_until(
            lambda: _transfer(a, started["id"])["receivers"][b.peer_id]["offline_since"],
            30,
            what="alice showing bob offline",
        )
        listing = a.cli("transfers")
        assert "offline since" in listing
        assert "waiting" in listing
        assert _transfer(a, started["id"])["state"] == "active"  # it waits; nothing failed

        b.start()
        wait_until(lambda: _transfer(a, started["id"])["state"] == "verified", 60, what="verified")
        assert sha256(received_files(b, a)[0]) == sha256(src)
        wait_until(lambda: not a.peers()[b.peer_id]["silent_since"], 30, what="session up again")
        assert "offline since" not in a.cli("transfers")
    finally:
        a.kill()
        b.kill()
