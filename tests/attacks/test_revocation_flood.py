"""An ordinary broker account floods the revocation topic the shipped ACL lets it write
(`rev/<its name>/+`) while a real peer publishes a genuine revocation and a new node joins by
invite (issue 18, item 2; docs/SECURITY.md 3.5, "security work never waits behind junk").

Before the fix, the daemon's one bounded event queue filled with the junk and dropped whatever
came next: the genuine statement was never recorded, the join left a live session the store did
not know and the invite open, and every refused statement was logged (megabytes a minute). Now
the junk is refused by cheap checks before anything is queued (topic and statement id, decoding,
issuer), what passes them waits in its publisher's lane within its rate, and session records
never wait behind any of it. Every refusal is counted; the log stays within its budget.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from peerd.mqtt import Topics, statement_id
from protocol.identity import issue_revocation, new_identity_seed, peer_id_for
from tests.attacks.helpers import SOON, Api, Wire, counted
from tests.support.broker import Broker
from tests.support.cluster import Node, log_in, make_nodes, pair, wait_until

pytestmark = pytest.mark.slow

# A broker account named like a node (its statements decode), but a node of nobody's.
MALLORY = peer_id_for(SigningKey(new_identity_seed()).verify_key.encode())
# What the victim's log may grow by while the flood lasts (it logged 8.7 MB in 25 s before).
LOG_BUDGET = 256 << 10
# Flood messages before the genuine revocation and the join start: several times the old
# event queue (10 000), so that a daemon that queues junk is full by then.
FLOOD_AHEAD = 60_000


class RevocationJunk:
    """What one account can retain under its own `rev/<name>/`, until `stop` is set: random
    bytes (wrong statement id), junk under its right id, statements of made-up identities
    (wrong issuer) and statements of itself signed by keys nobody knows (they pass every cheap
    check)."""

    def __init__(self, network: str, seed: int) -> None:
        self.prefix = f"{Topics(network).prefix}rev/{MALLORY}/"
        self.rng = random.Random(seed)
        now = time.time()
        self.own = [
            issue_revocation(
                new_identity_seed(), peer_id=MALLORY, kind="identity", now=now
            ).encode()
            for _ in range(400)
        ]
        # Self-signed statements of made-up identities: each verifies, and a node would keep
        # it (up to its limit of revocations of peers never met) if it took them from anyone.
        self.others = []
        for _ in range(50):
            seed = new_identity_seed()
            made_up = peer_id_for(SigningKey(seed).verify_key.encode())
            self.others.append(
                issue_revocation(seed, peer_id=made_up, kind="identity", now=now).encode()
            )
        self.sent = 0
        self.stop = threading.Event()

    def _topic(self, payload: bytes) -> str:
        return self.prefix + statement_id(payload)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        rng = self.rng
        while self.sent < 2_000_000 and not (self.stop.is_set() and self.sent >= FLOOD_AHEAD):
            kind = self.sent % 4
            if kind == 0:
                yield self.prefix + rng.randbytes(16).hex(), rng.randbytes(rng.randrange(1, 200))
            elif kind == 1:
                junk = b"\x98" + rng.randbytes(rng.randrange(1, 200))
                yield self._topic(junk), junk
            elif kind == 2:
                other = self.others[self.sent % len(self.others)]
                yield self._topic(other), other
            else:
                own = self.own[(self.sent // 4) % len(self.own)]
                yield self._topic(own), own
            self.sent += 1


def _store(node: Node) -> Path:
    conf = tomllib.loads(node.config.read_text())
    return Path(conf.get("node", {}).get("store") or node.dir / "peerd.db")


def _rows(node: Node, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{_store(node)}?mode=ro", uri=True, timeout=SOON) as db:
        return db.execute(sql, params).fetchall()


@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[tuple[Broker, list[Node]]]:
    nodes = make_nodes(tmp_path, "mqtt://127.0.0.1:1", ["alice", "bob", "carol"])
    users = {n.peer_id: f"pw-{n.name}" for n in nodes} | {MALLORY: "pw-mallory"}
    with Broker(tmp_path / "broker", shipped=True, users=users) as broker:
        for n in nodes:
            log_in(n, broker.url, users[n.peer_id])
        try:
            yield broker, nodes
        finally:
            for n in nodes:
                n.kill()


def test_security_work_survives_a_revocation_flood(
    shipped: tuple[Broker, list[Node]],
) -> None:
    broker, (alice, bob, carol) = shipped
    for n in (alice, bob, carol):
        n.start()
    pair(alice, bob)
    a = Api(alice)
    wire = Wire(broker.url, client_id=MALLORY, password="pw-mallory")
    flood: threading.Thread | None = None
    junk = RevocationJunk(alice.network, seed=18)
    try:
        before = a.rejections()
        invite = a.call("v1.invite.create", ttl=600)
        log_before = alice.log_path.stat().st_size
        flood = threading.Thread(target=wire.flood, args=(junk,), daemon=True)
        flood.start()
        wait_until(lambda: junk.sent >= FLOOD_AHEAD, SOON * 4, what="the flood under way")

        # A genuine revocation (bob's old static key) and a join, both inside the flood.
        assert bob.json("revoke", "--reason", "laptop stolen")["revoked_through"] == 1
        joined = carol.json("join", invite["token"])
        assert joined["peer"] == alice.peer_id

        # Each is in the store: the statement, the new peer, the invite used by it.
        wait_until(
            lambda: (
                _rows(
                    alice,
                    "SELECT serial FROM revocations WHERE peer_id = ? AND kind = 'static'",
                    bob.peer_id,
                )
                == [(1,)]
            ),
            SOON,
            what="alice records bob's revocation",
        )
        wait_until(
            lambda: (
                _rows(
                    alice,
                    "SELECT state, used_by FROM invites WHERE invite_id = ?",
                    bytes.fromhex(invite["invite_id"]),
                )
                == [("used", carol.peer_id)]
            ),
            SOON,
            what="alice records the join and consumes the invite",
        )
        peers = {p["peer"]: p for p in a.call("v1.peers")}
        assert peers[carol.peer_id]["state"] == "trusted"
        assert peers[carol.peer_id]["connected"]
        assert carol.peers()[alice.peer_id]["state"] == "trusted"

        junk.stop.set()
        flood.join(SOON * 4)
        assert not flood.is_alive()
        # The flood's last messages are handled (or refused) before the log is measured.
        wait_until(
            lambda: a.status()["events_queued"] == 0, SOON, what="alice's event lanes drained"
        )
        grown = alice.log_path.stat().st_size - log_before
        assert grown < LOG_BUDGET, f"alice's log grew by {grown} bytes during the flood"

        # Every kind of junk counted under its reason; the cheap checks refused most of it.
        new = counted(before, a.rejections())
        for label in (
            "revocation-topic-mismatch",  # random bytes under a random statement id
            "revocation-malformed",  # junk under its own statement id
            "revocation-wrong-issuer",  # made-up identities' statements under mallory's name
            "revocation-rate-limited",  # mallory's own (unverifiable) statements beyond her rate
            "revocation-unknown-signer",  # ... those within it, refused at verification
        ):
            assert new.get(label, 0) > 0, (label, new)
        assert "events-dropped" not in new, new
        verified = new["revocation-unknown-signer"]
        assert verified <= len(junk.own), (verified, new)
        assert a.status()["log_lines_suppressed"] > 0
        # The audit log is intact and holds the one revocation of bob.
        assert alice.json("audit", "verify")["ok"] is True
        details = [
            json.loads(str(d))
            for (d,) in _rows(
                alice, "SELECT detail FROM events WHERE kind = 'certificates-revoked'"
            )
        ]
        assert [d["serial"] for d in details] == [1]
    finally:
        junk.stop.set()
        wire.close()
        a.close()
