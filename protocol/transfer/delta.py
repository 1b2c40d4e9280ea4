"""Deltas: a receiver reuses the chunks it already holds *from the same sender* (SPEC 7.11).

Sans-IO pieces shared by both shells:

- `regions` and `cut`: content-defined chunks (FastCDC 2020, ~64 KiB) computed inside each
  safetensors tensor's byte range, restarting at every tensor boundary, so a changed tensor
  never moves the chunk boundaries of the next one (the header is a region of its own; any
  other file is one region).
- `pair_key` and `chunk_id`: chunk ids keyed per (sender, receiver) pair. Only the two of them
  know the key (the sender derives it from its identity seed and sends it inside the Noise
  session), so an id means nothing to anyone else, and the same content has unrelated ids for
  two different pairs.
- `encode_entries` / `decode_entries`: the recipe of a file, a list of (length, id), streamed
  in Recipe messages (protocol/transfer/messages.py) whose sizes follow `part_entries`.
- `held_frames`: which transfer chunks (fixed-size frames, 7.2) are entirely covered by the byte
  ranges a receiver copied from its own files: the delta unit (a CDC chunk) is independent of
  the frame size, which follows the broker's limits.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence

import blake3
from pyfastcdc import FastCDC

from protocol.errors import LocalProtocolError
from protocol.transfer._codec import MalformedTransferObject

# ~64 KiB chunks, the size Xet's deduplication uses. FastCDC never scans the first CDC_MIN
# bytes of a chunk (cut-point skipping), so a 32 KiB minimum halves the scan: ~630 against
# ~380 MiB/s here (loaded), for the same ~62 KiB mean with normalisation level 2.
CDC_MIN = 32 * 1024
CDC_AVG = 48 * 1024
CDC_MAX = 256 * 1024
ID_BYTES = 16
KEY_BYTES = 32
_ENTRY = struct.Struct(">I16s")
ENTRY_BYTES = _ENTRY.size  # 20
RECIPE_PART_ENTRIES = 1600  # 32000 bytes of entries: one Recipe message well below 64 KiB
# The recipe is streamed while the sender still cuts the file, and the receiver grants credit
# only as far as the parts it has looked up (SPEC 7.11): a small first part (64 chunks, ~4 MB)
# lets the transfer start within milliseconds, then each part doubles up to a full message.
FIRST_PART_ENTRIES = 64
MAX_RECIPE_ENTRIES = 1 << 18  # ~16 GiB at 64 KiB a chunk; a larger file is sent whole
_KEY_CONTEXT = "peerd 2026-12 transfer delta pair key"
# Early chunks of a delta candidate (SPEC 7.7, 7.11): the first chunk only, to each receiver.
# It puts the first byte half a round trip after the Offer, as for any transfer, and costs an
# identical resend one chunk (256 KiB: 0.1% of a 256 MiB file) when the receiver held it.
DELTA_EARLY_CHUNKS = 1

_chunker = FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=2)

Buffer = bytes | bytearray | memoryview


def regions(
    size: int, tensors: Iterable[tuple[int, int]] | None, data_start: int = 0
) -> list[tuple[int, int]]:
    """The byte ranges [start, end) that chunks never cross: for a safetensors file
    (`tensors` = each tensor's (begin, end) within the data section that starts at
    `data_start`) the header, then each tensor and any bytes between them; else the file."""
    if size <= 0:
        return []
    if tensors is None:
        return [(0, size)]
    out: list[tuple[int, int]] = []
    pos = 0
    for begin, end in sorted(tensors):
        a, b = data_start + begin, data_start + end
        if a < pos or b > size or a > b:
            raise LocalProtocolError("tensor ranges overlap or run past the file")
        if a > pos:
            out.append((pos, a))
        if b > a:
            out.append((a, b))
        pos = b
    if pos < size:
        out.append((pos, size))
    return out


def cut(data: Buffer, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Content-defined chunks (offset, length) of `data` within each span."""
    view = memoryview(data)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if end - start <= CDC_MIN:
            out.append((start, end - start))
            continue
        for c in _chunker.cut_buf(view[start:end]):
            out.append((start + c.offset, c.length))
    return out


CUT_WINDOW = 8 << 20  # bytes cut at a time by iter_cut (at least 2 x CDC_MAX)


def iter_cut(data: Buffer, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """`cut`, yielded in order and CUT_WINDOW bytes at a time, so that a caller reading a
    mapped file touches only the window it is in (pyfastcdc scans the whole buffer it is
    given before yielding). Identical to `cut`: a chunk's end depends only on its own bytes
    (at most CDC_MAX of them), so every chunk but a window's last is final, and that last one
    is cut again from its start with the next window."""
    view = memoryview(data)
    for start, end in spans:
        if end - start <= CDC_MIN:
            yield start, end - start
            continue
        pos = start
        while pos < end:
            stop = min(end, pos + CUT_WINDOW)
            chunks = list(_chunker.cut_buf(view[pos:stop]))
            if stop < end:
                chunks.pop()  # ended by the window, not by its content
            for c in chunks:
                yield pos + c.offset, c.length
            pos += sum(c.length for c in chunks)


# Before a file is chunked whole, the sender samples it (SPEC 7.11): SAMPLE_WINDOWS windows of
# SAMPLE_BYTES (4 MiB in all, ~60 chunks) spread over it. When no sampled chunk was ever sent to
# any of its receivers, the recipe goes after the transfer instead of beside it.
SAMPLE_WINDOWS = 8
SAMPLE_BYTES = 512 * 1024
# Chunks dropped at the start of a window that starts inside a region: cut from an arbitrary
# offset, the first cut points differ from the whole file's until the two fall in step.
SAMPLE_SKIP = 2


def sample_windows(
    spans: Sequence[tuple[int, int]],
    count: int = SAMPLE_WINDOWS,
    window: int = SAMPLE_BYTES,
) -> list[tuple[int, int, int, bool]]:
    """Up to `count` windows (start, end, chunks to skip, keep the last) spread over the regions
    `spans`: at the starts of evenly spaced regions where there are enough (so every chunk but a
    window's last is cut exactly as `cut` cuts the whole file), else at evenly spaced offsets
    inside the regions (a window's first SAMPLE_SKIP chunks are then dropped)."""
    big = [(a, b) for a, b in spans if b - a > 0]
    if not big or count <= 0:
        return []
    if len(big) >= count:
        picks = sorted({round(k * (len(big) - 1) / max(1, count - 1)) for k in range(count)})
        starts = [(big[k][0], big[k][1], True) for k in picks]
    else:
        total = sum(b - a for a, b in big)
        starts = []
        for a, b in big:
            # In proportion to the region, at least one, never overlapping.
            n = max(1, min(round(count * (b - a) / total), (b - a) // max(1, window)))
            starts += [(a + j * (b - a) // n, b, j == 0) for j in range(n)]
        starts = starts[: max(count, len(big))]
    out = []
    for start, region_end, aligned in starts:
        end = min(region_end, start + window)
        out.append((start, end, 0 if aligned else SAMPLE_SKIP, end == region_end))
    return out


def sample_chunks(
    data: Buffer, windows: Sequence[tuple[int, int, int, bool]]
) -> list[tuple[int, int]]:
    """The chunks (offset, length) of `windows` (`sample_windows`) likely to be chunks of the
    whole file too: certainly so for a window at a region's start."""
    out: list[tuple[int, int]] = []
    for start, end, skip, keep_last in windows:
        chunks = cut(data, [(start, end)])
        if not keep_last:
            chunks = chunks[:-1]
        out += chunks[skip:]
    return out


def early_window(receivers: int) -> int:
    """`TransferConfig.early_window` for a delta candidate sent to `receivers` receivers:
    DELTA_EARLY_CHUNKS each (the sender shares early_window among its receivers)."""
    return DELTA_EARLY_CHUNKS * max(1, receivers)


def pair_key(sender_secret: bytes, receiver: str) -> bytes:
    """The chunk-id key of (this sender, `receiver`): a PRF of the sender's secret (its
    identity seed), so both ends get the same key every time without storing it."""
    if len(sender_secret) != 32:
        raise LocalProtocolError("the sender secret is 32 bytes")
    base = blake3.blake3(sender_secret, derive_key_context=_KEY_CONTEXT).digest()
    return blake3.blake3(receiver.encode(), key=base).digest()


def content_hash(data: Buffer) -> bytes:
    return blake3.blake3(data).digest()


def keyed_id(key: bytes, digest: bytes) -> bytes:
    """A chunk's id for one pair, from its unkeyed BLAKE3 digest: the file is hashed once
    however many receivers there are."""
    return blake3.blake3(digest, key=key).digest(ID_BYTES)


def chunk_id(key: bytes, data: Buffer) -> bytes:
    return keyed_id(key, content_hash(data))


def encode_entries(entries: Sequence[tuple[int, bytes]]) -> bytes:
    return b"".join(_ENTRY.pack(length, cid) for length, cid in entries)


def iter_entries(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(length, id) of entries already checked (`decode_entries`), without a list."""
    return _ENTRY.iter_unpack(raw)


def decode_entries(raw: bytes) -> list[tuple[int, bytes]]:
    """(length, id) pairs; raises MalformedTransferObject."""
    if not raw or len(raw) % ENTRY_BYTES or len(raw) > RECIPE_PART_ENTRIES * ENTRY_BYTES:
        raise MalformedTransferObject("recipe entries are 1..1600 records of 20 bytes")
    out = [(length, cid) for length, cid in _ENTRY.iter_unpack(raw)]
    if any(not 1 <= length <= CDC_MAX for length, _ in out):
        raise MalformedTransferObject(f"a recipe chunk is 1..{CDC_MAX} bytes")
    return out


def part_entries(part: int) -> int:
    """How many entries part `part` of a streamed recipe carries (the last may carry fewer)."""
    return min(RECIPE_PART_ENTRIES, FIRST_PART_ENTRIES << min(part, 8))


def _max_parts() -> int:
    parts = covered = 0
    while covered < MAX_RECIPE_ENTRIES:
        covered += part_entries(parts)
        parts += 1
    return parts


MAX_RECIPE_PARTS = _max_parts()  # 168: the ramp's 5 short parts, then full ones


def parts_of(entries: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """A whole recipe cut into Recipe message payloads, as `part_entries` says."""
    if not entries or len(entries) > MAX_RECIPE_ENTRIES:
        raise LocalProtocolError("a recipe has 1..MAX_RECIPE_ENTRIES entries")
    out: list[bytes] = []
    pos = 0
    while pos < len(entries):
        n = part_entries(len(out))
        out.append(encode_entries(entries[pos : pos + n]))
        pos += n
    return out


def max_entries(spans: Sequence[tuple[int, int]]) -> int:
    """An upper bound on the chunks `cut` makes of these regions (every chunk but a region's
    last is at least CDC_MIN), known before the file is read."""
    return sum(-(-(end - start) // CDC_MIN) for start, end in spans)


def held_frames(
    covered: Iterable[tuple[int, int]], size: int, chunk_size: int
) -> list[tuple[int, int]]:
    """Ranges [start, count] of the transfer chunks lying entirely inside `covered` (byte
    ranges (offset, length) already in place at the receiver)."""
    merged: list[list[int]] = []
    for off, length in sorted(covered):
        if length <= 0:
            continue
        if merged and off <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + length)
        else:
            merged.append([off, off + length])
    out: list[tuple[int, int]] = []
    for a, b in merged:
        first = -(-a // chunk_size)
        end = size if b >= size else b
        last = -(-size // chunk_size) if end == size else end // chunk_size
        if last > first:
            if out and out[-1][0] + out[-1][1] == first:
                out[-1] = (out[-1][0], out[-1][1] + last - first)
            else:
                out.append((first, last - first))
    return out
