"""Forward secrecy: someone who recorded a session and later steals *both* nodes' long-term
keys (static and identity) still cannot read it, and a session's keys are dropped once it is
superseded. Real session managers over real credentials; the recording is every frame they
exchanged."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack
import pytest

from protocol import frames
from protocol.errors import RemoteProtocolError
from protocol.identity import InviteToken
from protocol.noise import HandshakeState
from protocol.session import NOISE_XX, SessionLimits, SessionManager, prologue
from protocol.transfer.messages import Offer
from tests.fuzz.corpus import NETWORK, NOW, make_world, route
from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes, wait_until
from tests.support.files import random_file, received_files, sha256


def test_stolen_static_keys_do_not_open_recorded_sessions() -> None:
    world = make_world()
    world.exchange([b"the weights of round 7", b"secret hyperparameters"])
    recorded = list(world.frames)
    hello, reply, finish = recorded[:3]
    data = [frames.decode(f) for f in recorded[3:]]
    assert all(isinstance(d, frames.Data) for d in data)

    # The thief holds bob's static private key and replays the responder's part with it:
    # message 1 reads, but bob's ephemeral is gone, so the recorded message 3 (and every
    # transport key after it) stays sealed.
    thief = HandshakeState(NOISE_XX, False, prologue(NETWORK, NOISE_XX), s=world.bob.static)
    thief.read_message(frames.decode(hello).noise)  # type: ignore[union-attr]
    thief.write_message(b"")
    with pytest.raises(RemoteProtocolError) as info:
        thief.read_message(frames.decode(finish).noise)  # type: ignore[union-attr]
    assert info.value.reason == "decrypt"

    # Likewise as the initiator with alice's static key: the recorded REPLY does not open.
    thief = HandshakeState(NOISE_XX, True, prologue(NETWORK, NOISE_XX), s=world.alice.static)
    thief.write_message(b"")
    with pytest.raises(RemoteProtocolError) as info:
        thief.read_message(frames.decode(reply).noise)  # type: ignore[union-attr]
    assert info.value.reason == "decrypt"


def test_superseded_sessions_drop_their_keys() -> None:
    limits = SessionLimits(previous_grace=60.0)
    world = make_world()
    a: SessionManager = world.a
    b = world.b  # the same responder: a holds its resumption ticket, so both rekeys use it
    b.limits = limits
    a.limits = limits
    world.frames.clear()
    world.handshake()
    first = a.session(world.bob.peer_id)
    assert first is not None
    old = route(a.send(world.bob.peer_id, b"before the rekey", NOW), b, [])
    assert old
    recorded = [o.frame for o in a.send(world.bob.peer_id, b"in flight", NOW)]  # type: ignore[union-attr]
    world.handshake()  # a rekey: a new session supersedes the first
    second = a.session(world.bob.peer_id)
    assert second is not None
    assert second is not first
    # Within the grace period the old session still receives what was in flight.
    assert [o for f in recorded for o in b.receive(f, NOW + 1)]
    a.on_timer(NOW + 61)
    b.on_timer(NOW + 61)
    assert first.sender.k is None
    assert first.receiver.k is None
    assert first not in a.sessions_for(world.bob.peer_id)
    before = b.rejections["unknown-session"] + b.rejections["replay"]
    for f in recorded:
        b.receive(f, NOW + 62)
    assert b.rejections["unknown-session"] + b.rejections["replay"] == before + len(recorded)


# -- erased secrets leave no trace in the state directory ---------------------------------------
#
# A thief who copies a node's state directory after a transfer (a backup, a stolen disk image)
# must not find the content key that opens the chunk frames he recorded from the broker, nor the
# PSK of an invite already used. The store sets those columns to NULL when they are done with;
# these tests look for the secrets' bytes in every file of the state directory instead (db,
# -wal, -shm, any journal, the keys, the inbox, the log): a NULL column proves nothing when
# an earlier page image survives in the WAL.


def _files_holding(directory: Path, *secrets: bytes) -> dict[str, list[str]]:
    """For each file under `directory` that holds any of `secrets` (raw or as hex): which."""
    needles = {s: (s, s.hex().encode()) for s in secrets}
    found: dict[str, list[str]] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        hits = [s.hex()[:8] for s, forms in needles.items() if any(f in data for f in forms)]
        if hits:
            found[str(path.relative_to(directory))] = hits
    return found


def _snapshot_key(node: Node, tid: bytes) -> bytes | None:
    """The content key in a transfer's stored snapshot (read-only, closed at once)."""
    db = sqlite3.connect(f"file:{node.dir / 'peerd.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT snapshot FROM transfers WHERE transfer_id = ?", (tid,)).fetchone()
    finally:
        db.close()
    if row is None or row[0] is None:
        return None
    offer = msgpack.unpackb(row[0])[1]
    return bytes(Offer.decode(offer).content_key)


def test_erased_content_keys_and_invite_psks_are_in_no_file_of_the_state_directory(
    tmp_path: Path, broker: Broker
) -> None:
    alice, bob = make_nodes(tmp_path, broker.url, ["alice", "bob"])
    alice.start()
    bob.start()
    try:
        token = alice.cli("invite").strip()
        psk = InviteToken.from_text(token).psk
        bob.cli("join", token)
        wait_until(lambda: alice.connected_to(bob), 30, what="alice paired with bob")
        # bob offline while the offer waits: alice has stored the content key in its snapshot
        bob.stop()
        src = random_file(tmp_path / "weights.bin", 3 * 256 * 1024 + 5, seed=7)
        tid = bytes.fromhex(alice.json("send", str(src), "--to", bob.peer_id)["id"])
        key = wait_until(lambda: _snapshot_key(alice, tid), 30, what="alice's snapshot")
        assert isinstance(key, bytes)
        bob.start()
        wait_until(
            lambda: any(
                t["id"] == tid.hex() and t["state"] == "verified" for t in alice.json("transfers")
            ),
            60,
            what="the transfer verified",
        )
        (got,) = received_files(bob, alice)
        assert sha256(got) == sha256(src)
        # Erased in the rows, and in every file, while both daemons run ...
        assert _snapshot_key(alice, tid) is None
        assert _snapshot_key(bob, tid) is None
        for node in (alice, bob):
            assert _files_holding(node.dir, key, psk) == {}, node.name
    finally:
        alice.kill()
        bob.kill()
    # ... and after both were killed, which leaves the WAL as it was.
    for node in (alice, bob):
        assert _files_holding(node.dir, key, psk) == {}, node.name
