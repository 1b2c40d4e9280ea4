"""Deltas, the sans-IO half (protocol/transfer/delta.py, SPEC 7.11): chunk boundaries that
survive edits, pair-keyed ids, the recipe's wire form, and which frames held bytes cover."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.transfer import Have, Recipe, decode_message, delta


def model(sizes: list[int], versions: dict[int, int]) -> tuple[bytes, list[tuple[int, int]]]:
    data, spans, pos = bytearray(), [], 0
    for i, n in enumerate(sizes):
        data += random.Random(f"{i}/{versions.get(i, 0)}").randbytes(n)
        spans.append((pos, pos + n))
        pos += n
    return bytes(data), spans


def per_tensor(data: bytes, spans: list[tuple[int, int]]) -> list[list[tuple[int, bytes]]]:
    """Each tensor's chunks, as (offset within the tensor, bytes)."""
    chunks = delta.cut(data, delta.regions(len(data), spans))
    return [[(o - a, data[o : o + n]) for o, n in chunks if a <= o < b] for a, b in spans]


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300_000), min_size=2, max_size=8),
    changed=st.integers(0, 7),
    edit=st.sampled_from(["rewrite", "grow", "shrink"]),
)
def test_changing_one_tensor_leaves_the_others_chunks_identical(
    sizes: list[int], changed: int, edit: str
) -> None:
    changed %= len(sizes)
    before, spans = model(sizes, {})
    new_sizes = list(sizes)
    if edit == "grow":
        new_sizes[changed] += 4096
    elif edit == "shrink":
        new_sizes[changed] = max(1, new_sizes[changed] // 2)
    after, new_spans = model(new_sizes, {changed: 1})
    old = per_tensor(before, spans)
    new = per_tensor(after, new_spans)
    # Every other tensor is cut exactly as before: same chunks at the same places.
    for i in range(len(sizes)):
        if i != changed:
            assert old[i] == new[i]
    assert sum(len(c) for _, c in new[changed]) == new_sizes[changed]


def test_chunks_are_bounded_and_cover_the_file() -> None:
    data = random.Random(1).randbytes(3 << 20)
    chunks = delta.cut(data, delta.regions(len(data), None))
    assert sum(n for _, n in chunks) == len(data)
    assert all(n <= delta.CDC_MAX for _, n in chunks)
    assert all(n >= delta.CDC_MIN for _, n in chunks[:-1])
    assert 32 * 1024 <= len(data) / len(chunks) <= 128 * 1024  # ~64 KiB on average


def test_an_insertion_shifts_only_the_chunks_around_it() -> None:
    data = random.Random(2).randbytes(2 << 20)
    edited = data[:700_000] + b"inserted" + data[700_000:]
    old = {data[o : o + n] for o, n in delta.cut(data, [(0, len(data))])}
    new = [edited[o : o + n] for o, n in delta.cut(edited, [(0, len(edited))])]
    reused = sum(len(c) for c in new if c in old)
    assert reused >= len(data) - 3 * delta.CDC_MAX


def test_ids_are_keyed_per_pair() -> None:
    secret_a, secret_c = bytes(range(32)), bytes(32)
    chunk = b"the same weights" * 1000
    for_bob = delta.chunk_id(delta.pair_key(secret_a, "bob"), chunk)
    assert for_bob == delta.chunk_id(delta.pair_key(secret_a, "bob"), chunk)  # stable
    assert for_bob != delta.chunk_id(delta.pair_key(secret_a, "dave"), chunk)
    assert for_bob != delta.chunk_id(delta.pair_key(secret_c, "bob"), chunk)
    assert len(for_bob) == delta.ID_BYTES


def test_recipe_messages_round_trip_and_are_bounded() -> None:
    tid = bytes(16)
    entries = [(65536, bytes([i % 256]) * 16) for i in range(delta.RECIPE_PART_ENTRIES + 5)]
    parts = delta.parts_of(entries)
    # The streamed ramp: 64, 128, 256, 512, 1024 entries, then full messages.
    assert [len(p) // delta.ENTRY_BYTES for p in parts] == [64, 128, 256, 512, 645]
    msgs = [Recipe(tid, k, k == len(parts) - 1, bytes(32), p) for k, p in enumerate(parts)]
    for m in msgs:
        assert decode_message(m.encode()) == m
    decoded = [e for m in msgs for e in delta.decode_entries(m.entries)]
    assert decoded == entries
    assert decode_message(Have(tid, 12345).encode()) == Have(tid, 12345)
    bad = (
        Recipe(tid, 0, False, bytes(32), parts[1])
        .encode()
        .replace((65536).to_bytes(4, "big"), (delta.CDC_MAX + 1).to_bytes(4, "big"), 1)
    )
    with pytest.raises(RemoteProtocolError):
        decode_message(bad)
    with pytest.raises(LocalProtocolError):
        Recipe(tid, delta.MAX_RECIPE_PARTS, True, bytes(32), parts[0])
    with pytest.raises(LocalProtocolError):
        Recipe(tid, 0, 1, bytes(32), parts[0])  # type: ignore[arg-type]  # final is a bool


def test_the_part_ramp_covers_the_largest_recipe() -> None:
    sizes = [delta.part_entries(k) for k in range(delta.MAX_RECIPE_PARTS)]
    assert sizes[:6] == [64, 128, 256, 512, 1024, delta.RECIPE_PART_ENTRIES]
    assert sum(sizes) >= delta.MAX_RECIPE_ENTRIES > sum(sizes[:-1])


def test_max_entries_bounds_what_cut_makes() -> None:
    rng = random.Random(7)
    data = rng.randbytes(3 << 20)
    spans = delta.regions(len(data), [(0, 10), (10, 40_000), (40_000, 2_000_000)], data_start=8)
    assert len(delta.cut(data, spans)) <= delta.max_entries(spans)


@pytest.mark.parametrize(
    ("covered", "size", "expected"),
    [
        ([(0, 100)], 100, [(0, 1)]),  # the whole (short) last frame
        ([(0, 1024), (1024, 1024)], 4096, [(0, 2)]),
        ([(10, 3000)], 4096, [(1, 1)]),  # partial frames at both ends are not held
        ([(0, 1500), (1500, 2596)], 4096, [(0, 4)]),
        ([(1024, 2000)], 3024, [(1, 2)]),  # reaches the end: the short last frame counts
        ([], 4096, []),
    ],
)
def test_held_frames(covered: list[tuple[int, int]], size: int, expected: list) -> None:
    assert delta.held_frames(covered, size, 1024) == expected


def test_cutting_a_window_at_a_time_is_cutting_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    data = rng.randbytes(5 << 20)
    spans = delta.regions(len(data), [(0, 20_000), (20_000, 3_000_000)], data_start=100)
    want = delta.cut(data, spans)
    for window in (2 * delta.CDC_MAX, 700_000, 1 << 20):
        monkeypatch.setattr(delta, "CUT_WINDOW", window)
        assert list(delta.iter_cut(data, spans)) == want


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 400_000), min_size=1, max_size=24),
    count=st.integers(1, 10),
    window=st.integers(1, 300_000),
)
def test_a_window_at_a_region_start_samples_chunks_of_the_whole_cut(
    sizes: list[int], count: int, window: int
) -> None:
    data, spans = model(sizes, {})
    regions = delta.regions(len(data), spans)
    windows = delta.sample_windows(regions, count, window)
    assert 1 <= len(windows) <= max(count, len(regions))
    whole = set(delta.cut(data, regions))
    for start, end, skip, keep_last in windows:
        region = next((a, b) for a, b in regions if a <= start < b)
        assert start < end <= region[1]
        assert end - start <= window
        assert keep_last == (end == region[1])
        if skip == 0:  # at a region's start: exact
            assert start == region[0]
            assert set(delta.sample_chunks(data, [(start, end, skip, keep_last)])) <= whole


def test_windows_inside_one_region_fall_in_step_with_the_whole_cut() -> None:
    data = random.Random(7).randbytes(32 << 20)
    whole = set(delta.cut(data, [(0, len(data))]))
    windows = delta.sample_windows([(0, len(data))])
    assert len(windows) == delta.SAMPLE_WINDOWS
    assert [w[2] for w in windows] == [0] + [delta.SAMPLE_SKIP] * (delta.SAMPLE_WINDOWS - 1)
    sampled = delta.sample_chunks(data, windows)
    assert len(sampled) >= delta.SAMPLE_WINDOWS * 4  # ~8 chunks a window, less the skipped
    # The skipped chunks are where the cut points differ most; after them most agree (once one
    # cut point agrees, every later one does).
    assert sum(c in whole for c in sampled) >= 0.7 * len(sampled)
    # Spread over the file: no two windows overlap, the last reaches the last eighth.
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(windows))
    assert windows[-1][0] >= len(data) * 7 // 8
