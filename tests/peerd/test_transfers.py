"""The transfers extension against an in-memory host (tests/support/fakehost.py): real keys,
real sqlite stores and real files, no broker and no daemon. What crosses the network is in
memory, so these tests can drop, forge and reorder it; tests/e2e/test_transfers.py covers the
same paths with real daemons."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from peerd.transfers import Transfers
from peerd.transfers.chunkindex import Recipe
from peerd.transfers.files import TransferError
from protocol.identity import TrustError
from protocol.messaging import TransferPayload, decode_app
from protocol.transfer import Abort, MalformedTransferObject, TransferConfig
from protocol.transfer.chunks import parse_chunk_header
from tests.support.fakehost import FakeBroker, FakeHost, pair

# Small chunks: a few hundred KiB make a transfer of many chunks, and a last partial one.
CONFIG = TransferConfig(chunk_size=16 << 10, window=8, sync_batch=4)


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


async def _node(
    tmp_path: Path, broker: FakeBroker, name: str, *, direct_writes: bool = True
) -> FakeHost:
    host = await FakeHost.create(tmp_path / name, broker, name, direct_writes=direct_writes)
    host.extensions.append(Transfers(host, CONFIG))
    return host


@pytest.fixture
async def nodes(
    request: pytest.FixtureRequest, tmp_path: Path, broker: FakeBroker
) -> AsyncIterator[tuple[FakeHost, ...]]:
    """alice, bob and carol; received chunks are written O_DIRECT from held slots unless the
    test passes False as the fixture's parameter ([receive] direct_writes)."""
    direct = getattr(request, "param", True)
    made = [
        await _node(tmp_path, broker, n, direct_writes=direct) for n in ("alice", "bob", "carol")
    ]
    for host in made:
        host.spawn(host.extensions[0].run(), name="transfers")
    try:
        yield tuple(made)
    finally:
        for host in made:
            await host.close()


def _transfers(host: FakeHost) -> Transfers:
    ext = host.extensions[0]
    assert isinstance(ext, Transfers)
    return ext


def _file(directory: Path, name: str, size: int) -> Path:
    path = directory / name
    path.write_bytes(os.urandom(size))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(host: FakeHost) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{host.config.node.store}?mode=ro", uri=True) as db:
        return db.execute("SELECT role, state, snapshot, temp_path FROM transfers").fetchall()


async def _receiving(host: FakeHost, tid: bytes) -> None:
    """Until `host` has accepted the offer of `tid` (at most 10 s)."""
    for _ in range(1000):
        if tid in _transfers(host).receiving.inc:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{host.config.node.name} never started receiving {tid.hex()}")


async def _send(sender: FakeHost, path: Path, *to: FakeHost) -> dict[str, Any]:
    started = await _transfers(sender).send(path, [h.peer_id for h in to])
    return await _transfers(sender).wait(bytes.fromhex(started["id"]), 30.0)


@pytest.mark.parametrize("nodes", [True, False], ids=["direct", "page-cache"], indirect=True)
async def test_a_file_arrives_verified_and_nothing_is_left_behind(
    nodes: tuple[FakeHost, ...], tmp_path: Path
) -> None:
    alice, bob, carol = nodes
    await pair(alice, bob)
    await pair(alice, carol)
    source = _file(tmp_path, "model.bin", 5 * CONFIG.chunk_size + 123)

    result = await _send(alice, source, bob, carol)

    assert result["state"] == "verified"
    assert {p: r["state"] for p, r in result["receivers"].items()} == {
        bob.peer_id: "verified",
        carol.peer_id: "verified",
    }
    for receiver in (bob, carol):
        got = await _transfers(receiver).received(since=0, peer=None, name=None, within=5)
        assert got is not None
        assert got["state"] == "verified"
        assert _sha(Path(got["path"])) == _sha(source)
        inbox = receiver.config.node.inbox_dir / alice.peer_id
        assert sorted(p.name for p in inbox.iterdir()) == ["model.bin"]  # no .part left
        # The content key lives only in the snapshot: gone once the transfer ended.
        assert _rows(receiver) == [("receive", "verified", None, None)]
    assert _rows(alice) == [("send", "verified", None, None)]
    # The five whole chunks went past the page cache when [receive] direct_writes is on (the
    # short last one through it); none when it is off.
    direct = [_transfers(r).outcomes.stats.chunks_direct for r in (bob, carol)]
    assert direct == ([5, 5] if bob.config.receive.direct_writes else [0, 0])
    # The slots' memory went back to the daemon's budget when each transfer ended.
    assert [_transfers(r).receiving.held.used for r in (bob, carol)] == [0, 0]
    # Encrypt once, publish once: each chunk went to the broker once for both receivers (and
    # again only when a receiver asked for it, which a loaded machine's timers may do), but the
    # early chunks sent with the Offer, one copy to each receiver's early topic (SPEC 7.7):
    # for a fan-out of a file this small, one each.
    assert alice.link.broker.published == 6 + 1 + result["resent_frames"]


@pytest.mark.parametrize("nodes", [True, False], ids=["direct", "page-cache"], indirect=True)
async def test_lost_chunks_are_asked_for_again(
    nodes: tuple[FakeHost, ...], broker: FakeBroker, tmp_path: Path
) -> None:
    alice, bob, _ = nodes
    await pair(alice, bob)
    source = _file(tmp_path, "lossy.bin", 12 * CONFIG.chunk_size)
    lost: set[int] = set()

    def drop(topic: str, frame: bytes) -> bool:
        index = parse_chunk_header(frame).index
        if index % 3 == 1 and index not in lost:  # every third chunk, the first time
            lost.add(index)
            return True
        return False

    broker.drop = drop
    result = await _send(alice, source, bob)

    assert result["state"] == "verified"
    assert lost
    assert result["resent_frames"] >= len(lost)
    got = await _transfers(bob).received(since=0, peer=alice.peer_id, name=None, within=5)
    assert got is not None
    assert _sha(Path(got["path"])) == _sha(source)


async def test_an_offer_from_a_peer_the_receiver_does_not_trust_is_refused(
    nodes: tuple[FakeHost, ...], tmp_path: Path
) -> None:
    alice, bob, _ = nodes
    await pair(alice, bob)
    await bob.store.block(alice.peer_id, now=time.time())  # bob no longer trusts alice
    source = _file(tmp_path, "unwanted.bin", 1000)

    result = await _send(alice, source, bob)

    assert result["state"] == "failed"
    assert "not-trusted" in result["receivers"][bob.peer_id]["state"]
    assert bob.rejections["transfer-refused-not-trusted"] == 1
    assert not (bob.config.node.inbox_dir / alice.peer_id).exists()


async def test_files_go_only_to_trusted_peers(nodes: tuple[FakeHost, ...], tmp_path: Path) -> None:
    alice, bob, carol = nodes
    await pair(alice, bob)
    with pytest.raises(TrustError):
        await _transfers(alice).send(_file(tmp_path, "f", 10), [bob.peer_id, carol.peer_id])
    with pytest.raises(TransferError):
        await _transfers(alice).send(tmp_path / "missing", [bob.peer_id])
    assert _rows(alice) == []


async def test_a_bad_safetensors_file_is_refused_by_the_receiver(
    nodes: tuple[FakeHost, ...], tmp_path: Path
) -> None:
    alice, bob, _ = nodes
    await pair(alice, bob)
    source = tmp_path / "weights.safetensors"
    source.write_bytes((2**40).to_bytes(8, "little") + b"{}" + os.urandom(3000))

    result = await _send(alice, source, bob)
    mine = await _transfers(bob).wait(bytes.fromhex(result["id"]), 30.0)

    assert result["state"] == "failed"
    assert "bad-safetensors" in result["receivers"][bob.peer_id]["state"]
    assert (mine["state"], mine["reason"]) == ("failed", "bad-safetensors")
    assert bob.rejections["transfer-failed-bad-safetensors"] == 1
    assert list((bob.config.node.inbox_dir / alice.peer_id).iterdir()) == []


async def test_garbage_and_messages_about_others_transfers_are_counted(
    nodes: tuple[FakeHost, ...], tmp_path: Path
) -> None:
    alice, bob, carol = nodes
    await pair(alice, bob)
    await pair(carol, bob)
    # Long enough (1000 chunks, a window of 8) to be under way when bob is first looked at: 40
    # could start and end within one poll on a loaded machine.
    source = _file(tmp_path, "slow.bin", 1000 * CONFIG.chunk_size)
    started = await _transfers(alice).send(source, [bob.peer_id])
    tid = bytes.fromhex(started["id"])
    await _receiving(bob, tid)

    about_it = decode_app(Abort(tid, "cancelled", "").encode())
    assert isinstance(about_it, TransferPayload)
    bob.on_app(carol.peer_id, TransferPayload(about_it.tag, b"\x93not a message"))
    # Carol speaks about alice's transfer to bob: refused, alice's transfer goes on.
    bob.on_app(carol.peer_id, about_it)
    assert bob.rejections["transfer-not-the-sender"] == 1
    assert sum(bob.rejections.values()) == 2
    assert _transfers(bob).status()["transfers"]["control-rejected"] == 2
    assert tid in _transfers(bob).receiving.inc  # carol's Abort did not end it

    result = await _transfers(alice).wait(tid, 30.0)
    assert result["state"] == "verified"


def _open_under(directory: Path) -> list[str]:
    """What this process holds open under `directory` (a deleted file counts too)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return sorted(out)


async def test_a_receive_that_cannot_be_recorded_is_refused_and_leaves_nothing_open(
    nodes: tuple[FakeHost, ...], tmp_path: Path
) -> None:
    """bob's store refuses the transfer's record (a real sqlite error, as from a full disk)
    after the part was reserved: alice learns at once that bob cannot receive, and bob keeps
    neither a descriptor nor a part. Before, the accept raised with the part, its descriptors
    and the inbox directory left open, and alice waited out her deadline."""
    alice, bob, _ = nodes
    await pair(alice, bob)
    async with bob.store.transaction(time.time()) as tx:
        await tx.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON transfers WHEN NEW.role = 'receive'"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    source = _file(tmp_path, "unrecorded.bin", 5 * CONFIG.chunk_size)

    result = await _send(alice, source, bob)

    assert result["state"] == "failed"
    assert "receiver-error" in str(result["receivers"][bob.peer_id])
    inbox = bob.config.node.inbox_dir
    assert list((inbox / alice.peer_id).iterdir()) == []
    assert _open_under(inbox) == []
    assert _transfers(bob).receiving.held.used == 0
    assert _transfers(bob).receiving.inc == {}


async def test_a_resume_that_fails_closes_what_it_opened(
    nodes: tuple[FakeHost, ...], broker: FakeBroker, tmp_path: Path
) -> None:
    """A receive recorded with a recipe that no longer decodes cannot be resumed: the resume
    raises (the daemon then records it failed) and leaves nothing open. Before, the part, its
    O_DIRECT descriptor and the inbox directory stayed open for the daemon's life."""
    alice, bob, _ = nodes
    await pair(alice, bob)
    broker.drop = lambda topic, frame: parse_chunk_header(frame).index >= 6
    source = _file(tmp_path, "stalled.bin", 12 * CONFIG.chunk_size)
    started = await _transfers(alice).send(source, [bob.peer_id])
    tid = bytes.fromhex(started["id"])
    await _receiving(bob, tid)
    for _ in range(1000):  # the first Sync (after sync_batch chunks) records a snapshot
        if any(role == "receive" and snap for role, _, snap, _ in _rows(bob)):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("bob recorded no snapshot")
    # Through bob's own connection: his transfer writes its snapshots meanwhile.
    await _transfers(bob).receiving.index.save_recipe(tid, Recipe(bytes(32), b"not a recipe"))
    inbox = bob.config.node.inbox_dir
    before = _open_under(inbox)  # the running transfer's own
    assert before
    # A second instance, as a restarted daemon would resume it (the first keeps its own).
    again = Transfers(bob, CONFIG)
    (row,) = await again.records.active()
    assert row.snapshot is not None

    with pytest.raises(MalformedTransferObject):
        await again.receiving.resume(row, row.snapshot, time.time())

    assert _open_under(inbox) == before
    assert again.receiving.inc == {}
    assert again.receiving.held.used == 0


async def test_the_receiver_cancels(nodes: tuple[FakeHost, ...], tmp_path: Path) -> None:
    alice, bob, _ = nodes
    await pair(alice, bob)
    source = _file(tmp_path, "big.bin", 200 * CONFIG.chunk_size)
    started = await _transfers(alice).send(source, [bob.peer_id])
    tid = bytes.fromhex(started["id"])
    await _receiving(bob, tid)

    assert _transfers(bob).cancel(tid) == {"id": tid.hex(), "cancelled": True}

    mine = await _transfers(bob).wait(tid, 30.0)
    theirs = await _transfers(alice).wait(tid, 30.0)
    assert (mine["state"], mine["reason"]) == ("failed", "cancelled")
    assert theirs["state"] == "cancelled"
    assert _rows(bob) == [("receive", "cancelled", None, None)]
    assert list((bob.config.node.inbox_dir / alice.peer_id).iterdir()) == []


async def test_early_chunks_travel_with_the_offer_and_are_kept_until_it_is_accepted(
    nodes: tuple[FakeHost, ...], broker: FakeBroker, tmp_path: Path
) -> None:
    """SPEC 7.7: the first window goes out right after the Offer, on the receiver's early
    topic; the receiver keeps what arrives before it has accepted the Offer and uses it."""
    alice, bob, carol = nodes
    await pair(alice, bob)
    topics: list[str] = []

    def record(topic: str, payload: bytes) -> bool:
        topics.append(topic)
        return False  # nothing lost

    broker.drop = record
    source = _file(tmp_path, "model.bin", 5 * CONFIG.chunk_size + 1)

    result = await _send(alice, source, bob)

    assert result["state"] == "verified"
    early = alice.topics.early(alice.peer_id, bob.peer_id)
    assert topics.count(early) == 6  # the whole file fits the first window of 8
    assert result["resent_frames"] == 0  # none was lost waiting for the Accept
    # Early chunks from a member the receiver does not trust are not kept.
    frame = b"\x01\x01\x00\x00" + bytes(4) + os.urandom(16) + bytes(8) + bytes(32)
    await carol.link.publish(carol.topics.early(carol.peer_id, bob.peer_id), frame)
    assert bob.rejections["chunk-early-dropped"] == 1
    assert _transfers(bob).receiving.early.bytes == 0
