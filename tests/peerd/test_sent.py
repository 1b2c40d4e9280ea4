"""The sender's memory of what it sent (peerd/transfers/sent.py) and the receiver's half of a
recipe that follows its file (chunkindex.LateRecipes), on real sqlite stores and real files: the
gate finds a new version and only the receiver it was sent to, a late recipe indexes exactly
the file at its receiver and nowhere else, and every table and queue stays bounded."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peerd.store import Store
from peerd.transfers import sent as sent_module
from peerd.transfers.chunkindex import (
    DIGESTS,
    ChunkIndex,
    LateRecipes,
    Recipes,
    file_chunks,
    pack_digests,
)
from peerd.transfers.files import stat_of
from peerd.transfers.sent import Late, SentChunks
from protocol.transfer import delta
from protocol.transfer.messages import Recipe, decode_message
from tests.support.models import tensor_sizes, write_model

ALICE_SEED = bytes(range(32))
SIZES = tensor_sizes(6 << 20, 24, seed=5)
TID = b"T" * 16


@dataclass
class Host:
    """What SentChunks asks of the daemon: its store, its identity seed, the sessions (here a
    list of what was sent to whom, `up` saying which peers have one), and its tasks."""

    store: Store
    keys: Any = field(default_factory=lambda: SimpleNamespace(signing_key=lambda: ALICE_SEED))
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    up: set[str] = field(default_factory=lambda: {"bob", "carol"})

    def transmit(self, peer: str, payload: bytes) -> bool:
        if peer not in self.up:
            return False
        self.sent.append((peer, payload))
        return True

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        return asyncio.ensure_future(work)


async def _open(path: Path) -> Store:
    return await Store.open(path, network="lab", overlap=3600.0, create=True)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    s = await _open(tmp_path / "alice.db")
    try:
        yield Host(s)
    finally:
        await s.close()


def _chunks(path: Path) -> list[tuple[int, bytes]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_chunks(fd, path.stat().st_size, path.name)
    finally:
        os.close(fd)


def _parts(path: Path) -> list[bytes]:
    chunks = _chunks(path)
    return [pack_digests(chunks[k : k + 200]) for k in range(0, len(chunks), 200)]


async def _worth(sent: SentChunks, path: Path, *receivers: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return await sent.worth_a_recipe(fd, os.fstat(fd).st_size, path.name, list(receivers))
    finally:
        os.close(fd)


async def test_the_gate_finds_a_new_version_only_where_the_old_one_went(
    host: Host, tmp_path: Path
) -> None:
    sent = SentChunks(host, lambda *_: None)
    v1 = write_model(tmp_path / "v1.safetensors", SIZES, seed=1)
    v2 = write_model(tmp_path / "v2.safetensors", SIZES, seed=1, changed={3: 1, 13: 1})
    other = write_model(tmp_path / "other.safetensors", SIZES, seed=2)
    assert not await _worth(sent, v1, "bob")  # nothing sent yet
    await sent.record("bob", _parts(v1))
    assert await _worth(sent, v1, "bob")
    assert await _worth(sent, v2, "bob")
    assert await _worth(sent, v2, "carol", "bob")  # one receiver that may hold it is enough
    assert not await _worth(sent, v2, "carol")  # the same file, another receiver
    assert not await _worth(sent, other, "bob")  # nothing in common
    # A file that is not safetensors is sampled inside its one region, the first chunks of
    # each window dropped until its cut points fall in step with the whole file's.
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(8 << 20))
    await sent.record("carol", _parts(blob))
    shifted = tmp_path / "shifted.bin"
    shifted.write_bytes(os.urandom(1000) + blob.read_bytes())
    assert await _worth(sent, shifted, "carol")
    # A revoked or blocked receiver's record is erased.
    await sent.forget(["bob"])
    assert not await _worth(sent, v1, "bob")
    assert await sent.count("carol") > 0


async def test_the_record_is_bounded_per_receiver_and_in_all(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sent_module, "MAX_FILES_PER_RECEIVER", 2)
    sent = SentChunks(host, lambda *_: None)
    files = [write_model(tmp_path / f"m{k}.safetensors", SIZES, seed=10 + k) for k in range(3)]
    for f in files:
        await sent.record("bob", _parts(f))
    assert not await _worth(sent, files[0], "bob")  # the oldest went first
    assert await _worth(sent, files[1], "bob")
    assert await _worth(sent, files[2], "bob")
    per_file = await sent.count("bob") // 2
    monkeypatch.setattr(sent_module, "MAX_ROWS", per_file + 10)
    await sent.record("carol", _parts(files[0]))
    assert await sent.count("bob") + await sent.count("carol") <= per_file + 10
    assert await _worth(sent, files[0], "carol")  # the newest stays


async def _late(sent: SentChunks, path: Path, receivers: list[str], tid: bytes = TID) -> Late:
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    job = Late(tid, fd, stat_of(st), path.name, st.st_size, receivers)
    sent.send_late(job)
    await asyncio.wait_for(job.done.wait(), 30)
    return job


async def test_a_late_recipe_indexes_exactly_the_file_at_its_receiver(
    host: Host, tmp_path: Path
) -> None:
    cached: list[Any] = []
    sent = SentChunks(host, lambda ident, parts: cached.append((ident, parts)))
    v1 = write_model(tmp_path / "v1.safetensors", SIZES, seed=3)
    host.up = {"bob"}  # carol has no session: hers is not sent, nor recorded
    await _late(sent, v1, ["bob", "carol"])
    assert sent.late_sent == 1
    assert await _worth(sent, v1, "bob")
    assert not await _worth(sent, v1, "carol")
    assert cached  # a resend is not cut again
    assert cached[0][1] == _parts_as_streamed(v1)
    assert {peer for peer, _ in host.sent} == {"bob"}

    # Bob's side: the file he verified, then the parts as they come.
    bob_store = await _open(tmp_path / "bob.db")
    try:
        index, recipes = ChunkIndex(bob_store), Recipes()
        tasks: list[asyncio.Task[None]] = []

        def spawn(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
            tasks.append(asyncio.ensure_future(work))
            return tasks[-1]

        late = LateRecipes(index, recipes, spawn)
        got = tmp_path / "inbox-v1.safetensors"
        got.write_bytes(v1.read_bytes())
        now = time.time()
        messages = [decode_message(payload) for _, payload in host.sent]
        assert all(isinstance(m, Recipe) for m in messages)
        # Not a late recipe of a file bob expects: left to the offer path.
        assert late.part("alice", messages[0], now) is None  # type: ignore[arg-type]
        late.expect(TID, "alice", got, now)
        assert late.part("carol", messages[0], now) is False  # type: ignore[arg-type]
        for m in messages:
            assert late.part("alice", m, now) is True  # type: ignore[arg-type]
        await asyncio.gather(*tasks)
        await late.settled("alice")
        assert late.indexed == 1
        key = delta.pair_key(ALICE_SEED, "bob")
        ids = {delta.keyed_id(key, d) for p in _parts(v1) for _, d in _unpack(p)}
        assert len(await index.lookup("alice", ids)) == len(ids)
        assert await index.lookup("carol", ids) == {}

        # A file changed since its commit, or a recipe that does not add up, is not indexed.
        for tid, damage in ((b"C" * 16, "change"), (b"S" * 16, "short")):
            other = tmp_path / f"other-{damage}.safetensors"
            other.write_bytes(write_model(tmp_path / "o.safetensors", SIZES, seed=4).read_bytes())
            late.expect(tid, "alice", other, now)
            if damage == "change":
                other.write_bytes(other.read_bytes()[:-1] + b"x")
                os.utime(other, ns=(1, 1))
            parts = _parts_as_streamed(other)
            if damage == "short":
                assert len(parts[-1]) > DIGESTS.size
                parts[-1] = parts[-1][: -DIGESTS.size]  # a chunk short of the file
            for k, p in enumerate(parts):
                entries = delta.encode_entries([(n, delta.keyed_id(key, d)) for n, d in _unpack(p)])
                msg = Recipe(tid, k, k == len(parts) - 1, key, entries)
                assert late.part("alice", msg, now) is True
        await asyncio.gather(*tasks)
        assert late.indexed == 1
        # Expected no longer than LATE_TTL.
        late.expect(b"E" * 16, "alice", got, now)
        assert late.part("alice", messages[0], now + 10_000) is None  # type: ignore[arg-type]
    finally:
        await bob_store.close()


def _unpack(packed: bytes) -> list[tuple[int, bytes]]:
    return list(DIGESTS.iter_unpack(packed))


def _parts_as_streamed(path: Path) -> list[bytes]:
    chunks = _chunks(path)
    out: list[bytes] = []
    pos = 0
    while pos < len(chunks):
        n = delta.part_entries(len(out))
        out.append(pack_digests(chunks[pos : pos + n]))
        pos += n
    return out


async def test_late_recipes_wait_in_a_bounded_queue(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sent_module, "MAX_LATE", 2)
    sent = SentChunks(host, lambda *_: None)
    files = [write_model(tmp_path / f"q{k}.safetensors", SIZES, seed=20 + k) for k in range(5)]
    jobs = []
    for k, f in enumerate(files):
        fd = os.open(f, os.O_RDONLY)
        st = os.fstat(fd)
        jobs.append(Late(bytes([k]) * 16, fd, stat_of(st), f.name, st.st_size, ["bob"]))
        sent.send_late(jobs[-1])
    # One being cut and two waiting: the others were dropped (their descriptors closed).
    assert sent.late_dropped == 2
    for job in jobs:
        await asyncio.wait_for(job.done.wait(), 30)
    for job in jobs:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(job.fd)
    # A send to bob waits for what is queued to him; one to dave does not.
    fd = os.open(files[0], os.O_RDONLY)
    st = os.fstat(fd)
    blocker = Late(b"B" * 16, fd, stat_of(st), files[0].name, st.st_size, ["bob"])
    sent.send_late(blocker)
    await sent.settled(["dave"])
    assert not blocker.done.is_set()
    await sent.settled(["bob"])
    assert blocker.done.is_set()
