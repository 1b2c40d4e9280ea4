"""The receiver's chunk index and local copies (peerd/transfers/chunkindex.py) on a real sqlite
store and real files: lookups see only the sender's own rows, a changed or damaged file is never
copied, the index is bounded and erased per sender, and the sender's chunk pass is stable."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerd.store import Store
from peerd.transfers import chunkindex
from peerd.transfers.chunkindex import ChunkIndex, file_chunks, prefill, recipe_for
from protocol.transfer import delta
from protocol.transfer.messages import Recipe as RecipeMessage
from tests.support.models import tensor_sizes, write_model

ALICE_SEED, CAROL_SEED = bytes(range(32)), bytes(range(1, 33))
SIZES = tensor_sizes(2 << 20, 8, seed=1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "peerd.db", network="lab", overlap=3600.0, create=True)
    try:
        yield s
    finally:
        await s.close()


def chunks_of(path: Path) -> list[tuple[int, bytes]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_chunks(fd, path.stat().st_size, path.name)
    finally:
        os.close(fd)


async def received(index: ChunkIndex, path: Path, sender: str, seed: bytes) -> None:
    await index.add_file(sender, path, recipe_for(chunks_of(path), delta.pair_key(seed, "bob")))


def copy_into(tmp_path: Path, recipe: chunkindex.Recipe, found: dict) -> chunkindex.Prefill:
    part = tmp_path / "new.part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    return prefill(fd, recipe.key, recipe.located(), found)  # which closes fd


async def test_lookups_only_see_the_senders_own_rows(store: Store, tmp_path: Path) -> None:
    index = ChunkIndex(store)
    model = write_model(tmp_path / "m.safetensors", SIZES)
    await received(index, model, "alice", ALICE_SEED)
    alice_recipe = recipe_for(chunks_of(model), delta.pair_key(ALICE_SEED, "bob"))
    ids = {cid for _, cid in alice_recipe.entries}
    assert len(await index.lookup("alice", ids)) == len(ids)
    # Carol replays alice's exact ids (as if she knew alice's key): bob finds nothing.
    assert await index.lookup("carol", ids) == {}
    # Carol's own ids for the same content are unrelated to alice's.
    carol_recipe = recipe_for(chunks_of(model), delta.pair_key(CAROL_SEED, "bob"))
    assert ids.isdisjoint({cid for _, cid in carol_recipe.entries})


async def test_lookups_span_several_batches_and_skip_unknown_ids(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ids are looked up through the (sender, chunk) key a batch at a time: every held id is
    # found whatever batch it falls in, ids held from nobody (or from another sender) are not.
    monkeypatch.setattr(chunkindex, "LOOKUP_BATCH", 3)
    index = ChunkIndex(store)
    model = write_model(tmp_path / "b.safetensors", SIZES, seed=4)
    await received(index, model, "alice", ALICE_SEED)
    other = write_model(tmp_path / "o.safetensors", SIZES, seed=5)
    await received(index, other, "carol", ALICE_SEED)
    recipe = recipe_for(chunks_of(model), delta.pair_key(ALICE_SEED, "bob"))
    ids = {cid for _, cid in recipe.entries}
    assert len(ids) > 3 * chunkindex.LOOKUP_BATCH
    unknown = {bytes([k]) * delta.ID_BYTES for k in range(7)}
    found = await index.lookup("alice", ids | unknown)
    assert set(found) == ids
    located = {cid: (off, length) for off, length, cid in recipe.located()}
    assert all(found[cid][5:] == located[cid] for cid in ids)


async def test_a_new_version_copies_the_unchanged_tensors(store: Store, tmp_path: Path) -> None:
    index = ChunkIndex(store)
    v1 = write_model(tmp_path / "v1.safetensors", SIZES)
    await received(index, v1, "alice", ALICE_SEED)
    v2 = write_model(tmp_path / "v2.safetensors", SIZES, changed={2: 1})
    recipe = recipe_for(chunks_of(v2), delta.pair_key(ALICE_SEED, "bob"))
    found = await index.lookup("alice", {cid for _, cid in recipe.entries})
    done = copy_into(tmp_path, recipe, found)
    assert done.held_bytes >= v2.stat().st_size - SIZES[2] - 4096  # all but tensor 2
    assert done.held_bytes < v2.stat().st_size
    assert not done.stale
    assert not done.corrupt
    part = (tmp_path / "new.part").read_bytes()
    want = v2.read_bytes()
    for off, length in done.covered:
        assert part[off : off + length] == want[off : off + length]


async def test_a_changed_or_damaged_file_is_not_copied(store: Store, tmp_path: Path) -> None:
    index = ChunkIndex(store)
    v1 = write_model(tmp_path / "v1.safetensors", SIZES)
    await received(index, v1, "alice", ALICE_SEED)
    recipe = recipe_for(chunks_of(v1), delta.pair_key(ALICE_SEED, "bob"))
    ids = {cid for _, cid in recipe.entries}
    # Damaged in place, size and mtime kept: the copies of the damaged chunk are refused.
    st = v1.stat()
    with v1.open("r+b") as f:
        f.seek(st.st_size - 1000)
        f.write(b"x" * 10)
    os.utime(v1, ns=(st.st_atime_ns, st.st_mtime_ns))
    done = copy_into(tmp_path, recipe, await index.lookup("alice", ids))
    assert done.corrupt == 1
    assert done.held_bytes < st.st_size
    # Rewritten (a new mtime): the file is stale, dropped from the index at this use.
    v1.write_bytes(v1.read_bytes())
    done = copy_into(tmp_path, recipe, await index.lookup("alice", ids))
    assert done.held_bytes == 0
    assert len(done.stale) == 1
    await index.forget_files(done.stale)
    assert await index.count("alice") == 0


async def test_the_index_is_bounded_and_erased_per_sender(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunkindex, "MAX_FILES_PER_SENDER", 2)
    index = ChunkIndex(store)
    models = [write_model(tmp_path / f"m{i}.safetensors", SIZES, seed=i) for i in range(3)]
    for m in models:
        await received(index, m, "alice", ALICE_SEED)
    await received(index, models[0], "carol", CAROL_SEED)

    def ids(*paths: Path) -> set[bytes]:
        key = delta.pair_key(ALICE_SEED, "bob")
        return {cid for p in paths for _, cid in recipe_for(chunks_of(p), key).entries}

    # The oldest file went (its chunks shared with newer files stay, pointing at them).
    assert await index.count("alice") == len(ids(models[1], models[2]))
    assert await index.count("carol") == len(ids(models[0]))
    await index.forget_sender("alice")
    assert await index.count("alice") == 0
    assert await index.count("carol") == len(ids(models[0]))


async def test_recipes_survive_in_the_store(store: Store, tmp_path: Path) -> None:
    index = ChunkIndex(store)
    entries = [(65536 + i, os.urandom(16)) for i in range(delta.RECIPE_PART_ENTRIES + 400)]
    recipe = chunkindex.Recipe.of(os.urandom(32), entries)  # more than one message's worth
    await index.save_recipe(b"t" * 16, recipe)
    assert await index.load_recipe(b"t" * 16) == recipe
    await index.drop_recipe(b"t" * 16)
    assert await index.load_recipe(b"t" * 16) is None


# -- the streamed recipe (SPEC 7.11) -----------------------------------------------------------


def test_the_chunker_streams_exactly_the_whole_pass(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.safetensors", tensor_sizes(6 << 20, 12, seed=3))
    whole = chunks_of(model)
    fd = os.open(model, os.O_RDONLY)
    try:
        chunker = chunkindex.FileChunker(fd, model.stat().st_size, model.name)
        assert len(whole) <= chunker.bound
        parts = []
        while not chunker.done:
            parts.append(chunker.take(delta.part_entries(len(parts))))
    finally:
        os.close(fd)
    assert [len(p) for p in parts[:-1]] == [delta.part_entries(k) for k in range(len(parts) - 1)]
    assert [c for p in parts for c in p] == whole


def _message(tid: bytes, k: int, final: bool, entries: list[tuple[int, bytes]]) -> RecipeMessage:
    return RecipeMessage(tid, k, final, b"k" * 32, delta.encode_entries(entries))


def test_recipe_parts_wait_for_their_offer_within_bounds() -> None:
    recipes = chunkindex.Recipes()
    tid = b"t" * 16
    entry = [(100, b"i" * 16)]
    # Out of order, then the final part: kept; a part beyond the final one is refused.
    assert recipes.add("alice", _message(tid, 1, False, entry), 0.0)
    assert recipes.add("alice", _message(tid, 2, True, entry), 0.0)
    assert not recipes.add("alice", _message(tid, 3, False, entry), 0.0)
    assert not recipes.add("alice", _message(tid, 1, True, entry), 0.0)  # a second final
    assert not recipes.add("carol", _message(tid, 0, False, entry), 0.0)  # not the sender
    assert recipes.claim("alice", tid) is None  # no part 0: the file is sent whole
    # Bounds on recipes whose offer has not come: per sender, then in all; a claimed one is
    # the transfer's and leaves them.
    for k in range(chunkindex.MAX_PENDING_PER_SENDER):
        assert recipes.add("alice", _message(bytes([k]) * 16, 0, False, entry), 0.0)
    assert not recipes.add("alice", _message(b"x" * 16, 0, False, entry), 0.0)
    stream = recipes.claim("alice", bytes(16))
    assert stream is not None
    assert recipes.following(bytes(16))
    assert recipes.add("alice", _message(b"x" * 16, 0, False, entry), 0.0)
    assert recipes.add("alice", _message(bytes(16), 1, True, entry), 1.0)  # to the claimed one
    assert sorted(stream.got) == [0, 1]
    assert stream.final == 1
    # Unclaimed recipes expire; a claimed one follows its transfer whatever its age.
    assert recipes.add("carol", _message(b"c" * 16, 0, False, entry), chunkindex.PENDING_TTL + 1)
    assert recipes.claim("alice", b"x" * 16) is None
    assert recipes.following(bytes(16))


async def test_a_streamed_recipe_copies_part_by_part_and_reaches_the_end(
    store: Store, tmp_path: Path
) -> None:
    index = ChunkIndex(store)
    sizes = tensor_sizes(24 << 20, 16, seed=2)
    v1 = write_model(tmp_path / "v1.safetensors", sizes)
    await received(index, v1, "alice", ALICE_SEED)
    v2 = write_model(tmp_path / "v2.safetensors", sizes, changed={3: 1, 11: 1})
    whole = recipe_for(chunks_of(v2), delta.pair_key(ALICE_SEED, "bob"))
    parts = [delta.decode_entries(raw) for raw in delta.parts_of(whole.entries)]
    assert len(parts) >= 3
    recipes = chunkindex.Recipes()
    tid = b"v" * 16

    def add(k: int) -> None:
        msg = RecipeMessage(tid, k, k == len(parts) - 1, whole.key, delta.encode_entries(parts[k]))
        assert recipes.add("alice", msg, 0.0)

    add(0)
    stream = recipes.claim("alice", tid)
    assert stream is not None
    size, chunk = v2.stat().st_size, 64 * 1024
    fd = os.open(tmp_path / "v2.part", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    f = chunkindex.Follower(index, stream, tid=tid, part_fd=fd, size=size, chunk_size=chunk)
    try:
        reaches = []
        held = await f.apply()
        reaches.append(f.reach)
        for k in range(1, len(parts)):
            assert not await f.wait(0.01)  # not there yet
            add(k)
            assert await f.wait(0.01)
            held = await f.apply()
            reaches.append(f.reach)
        assert reaches == sorted(reaches)
        assert reaches[-1] == -(-size // chunk)
        assert all(
            r * chunk <= sum(n for p in parts[: k + 1] for n, _ in p)
            for k, r in enumerate(reaches[:-1])
        )
        assert f.complete
        assert f.recipe() == whole
        # Every held frame is byte-exact; together they are all but the two changed tensors.
        part, want = (tmp_path / "v2.part").read_bytes(), v2.read_bytes()
        held_bytes = 0
        for start, count in held:
            a, b = start * chunk, min((start + count) * chunk, size)
            assert part[a:b] == want[a:b]
            held_bytes += b - a
        assert size - sizes[3] - sizes[11] - 4 * chunk <= held_bytes < size
    finally:
        os.close(fd)


async def test_a_recipe_that_does_not_add_up_copies_nothing_more(
    store: Store, tmp_path: Path
) -> None:
    index = ChunkIndex(store)
    recipes = chunkindex.Recipes()
    tid = b"w" * 16
    assert recipes.add("alice", _message(tid, 0, True, [(1000, b"i" * 16)]), 0.0)
    stream = recipes.claim("alice", tid)
    assert stream is not None
    fd = os.open(tmp_path / "w.part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        f = chunkindex.Follower(index, stream, tid=tid, part_fd=fd, size=5000, chunk_size=1024)
        assert await f.apply() == []
        assert f.broken
        assert not f.complete
        assert f.reach == 5  # the cap is lifted: the file is fetched whole
    finally:
        os.close(fd)
