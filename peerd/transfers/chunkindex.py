"""Deltas, the shell's half (protocol/SPEC.md 7.11; the wire half is protocol/transfer/delta.py).

- The sender cuts the file it is sending into content-defined chunks (a mapped pass in a worker
  thread, a part at a time while the transfer runs) and streams each receiver the list of
  (length, id), with ids keyed for that pair.
- The receiver keeps an index of the chunks of the files it received, per sender (tables
  `chunk_files` and `chunk_index`, peerd/store/schema.py). On an offer with a recipe it copies
  every chunk it holds *from that same sender* into the temporary file, checking each copy's id
  against the bytes it actually read, and the transfer skips the fixed-size chunks entirely
  covered by such copies. The final file is verified exactly as any other (whole-file hash and
  signature).

Bounded: at most MAX_FILES_PER_SENDER indexed files per sender (the oldest go first) and
MAX_ROWS chunk rows in all. An indexed file that is gone, or whose size, mtime or inode changed,
is dropped from the index when a lookup meets it; a revoked or blocked sender's rows are erased.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.waiting import wait_set
from protocol.safetensors import SafetensorsError, is_safetensors_name, parse_header
from protocol.transfer import delta
from protocol.transfer.messages import Recipe as RecipeMessage

if TYPE_CHECKING:
    from peerd.store import Store

log = logging.getLogger("peerd.transfers")

RELEASE_EVERY = 128  # chunks (~8 MB) cut between two releases of the pages behind the cutter
MIN_DELTA_SIZE = 1 << 20  # smaller files are sent whole: a recipe would not pay for itself
MAX_FILES_PER_SENDER = 64
MAX_ROWS = 1 << 21  # ~128 GiB of received files at 64 KiB a chunk
HEADER_READ = 16 << 20  # the safetensors header bound (protocol/safetensors.py)
LOOKUP_BATCH = 500  # chunk ids per index query (SQLite's bound on parameters is 32766)
_LOOKUP = (
    "SELECT i.chunk, f.id, f.path, f.size, f.mtime_ns, f.inode, i.offset, i.length"
    " FROM chunk_index i JOIN chunk_files f ON f.id = i.file"
)


@dataclass
class Recipe:
    """A file's chunk list, (length, keyed id) packed as on the wire (20 bytes a chunk, not
    ~140 as tuples: a 16 GiB file's recipe stays a few MB): offsets are implied by the
    lengths, in order."""

    key: bytes
    raw: bytes

    @classmethod
    def of(cls, key: bytes, entries: list[tuple[int, bytes]]) -> Recipe:
        return cls(key, delta.encode_entries(entries))

    @property
    def entries(self) -> list[tuple[int, bytes]]:
        return list(delta.iter_entries(self.raw))

    def located(self) -> Iterator[tuple[int, int, bytes]]:
        pos = 0
        for length, cid in delta.iter_entries(self.raw):
            yield pos, length, cid
            pos += length


@dataclass
class Prefill:
    """What a receiver found in its own files for one offer."""

    covered: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) copied
    held_bytes: int = 0
    stale: set[int] = field(default_factory=set)  # indexed files gone or changed
    corrupt: int = 0  # local chunks whose bytes no longer match their id


# -- the sender: the file's chunks ------------------------------------------------------------


class FileChunker:
    """The content-defined chunks of an open file, (length, unkeyed BLAKE3 digest) in file
    order, a part at a time (`take`), so the recipe streams while the transfer runs (SPEC
    7.11). Blocking (CPU and I/O): call it from a worker thread, never from two at once.

    The file is mapped, not read, and each part releases the pages behind it from this
    process (madvise DONTNEED; the page cache keeps them), so the sender's memory does not
    grow with the file: a mapping left whole made a 2 GiB send peak at 2.2 GB resident."""

    def __init__(self, fd: int, size: int, name: str) -> None:
        if size <= 0:
            raise ValueError("an empty file has no chunks")
        self._mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self._view = memoryview(self._mm)
        spans = file_spans(self._view, size, name)
        self.bound = delta.max_entries(spans)  # at most this many chunks
        self._walk = self._chunks(spans)
        self._next = next(self._walk, None)
        self._released = 0

    def _chunks(self, spans: list[tuple[int, int]]) -> Generator[tuple[int, int, bytes]]:
        view = self._view
        for off, length in delta.iter_cut(view, spans):
            yield off, length, delta.content_hash(view[off : off + length])

    @property
    def done(self) -> bool:
        return self._next is None

    def take(self, n: int) -> list[tuple[int, bytes]]:
        """Up to `n` more chunks (none once `done`)."""
        out: list[tuple[int, bytes]] = []
        while self._next is not None and len(out) < n:
            off, length, digest = self._next
            out.append((length, digest))
            if len(out) % RELEASE_EVERY == 0:
                self._release(off + length)
            self._next = next(self._walk, None)
        if self._next is None:
            self.close()
        elif out:
            self._release(self._next[0])
        return out

    def _release(self, end: int) -> None:
        """Drop this process's pages of the file below `end` (already cut and hashed)."""
        end = end // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._released:
            self._mm.madvise(mmap.MADV_DONTNEED, self._released, end - self._released)
            self._released = end

    def close(self) -> None:
        """Unmap (also when not `done`: a cancelled send)."""
        self._next = None
        self._walk.close()
        self._view.release()
        self._mm.close()


def file_chunks(fd: int, size: int, name: str) -> list[tuple[int, bytes]]:
    """Every chunk of the open file at once (tests, benchmarks; the daemon streams them)."""
    if size == 0:
        return []
    chunker = FileChunker(fd, size, name)
    out: list[tuple[int, bytes]] = []
    while not chunker.done:
        out += chunker.take(delta.RECIPE_PART_ENTRIES)
    return out


def file_spans(view: memoryview, size: int, name: str) -> list[tuple[int, int]]:
    """The regions chunks never cross: each tensor of a valid safetensors file, else the file."""
    if is_safetensors_name(name):
        try:
            header = parse_header(view[: min(size, 8 + HEADER_READ)], size)
        except SafetensorsError:
            pass  # not a valid safetensors file: chunked as one region
        else:
            tensors = [(t.begin, t.end) for t in header.tensors]
            return delta.regions(size, tensors, data_start=header.data_start)
    return delta.regions(size, None)


def sample_digests(fd: int, size: int, name: str) -> list[bytes]:
    """The BLAKE3 digests of the chunks `delta.sample_windows` picks from the open file (about
    4 MiB of it read: the gate before a file is chunked whole, SPEC 7.11). Blocking: call it
    from a worker thread."""
    if size <= 0:
        return []
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
        view = memoryview(mm)
        try:
            spans = file_spans(view, size, name)
            # Not a safetensors header: every model of the same layout has the same one.
            windows = delta.sample_windows(spans[1:] if len(spans) > 1 else spans)
            return [
                delta.content_hash(view[off : off + n])
                for off, n in delta.sample_chunks(view, windows)
            ]
        finally:
            view.release()


DIGESTS = struct.Struct(">I32s")  # a chunk as the sender keeps it: length, BLAKE3


def pack_digests(chunks: list[tuple[int, bytes]]) -> bytes:
    """A part's (length, digest) chunks packed: 36 bytes each instead of ~150 as tuples."""
    return b"".join(DIGESTS.pack(length, digest) for length, digest in chunks)


def keyed_entries(key: bytes, packed: bytes) -> list[tuple[int, bytes]]:
    """A packed part's (length, id) for the pair whose key is `key`."""
    return [(n, delta.keyed_id(key, digest)) for n, digest in DIGESTS.iter_unpack(packed)]


def recipe_for(chunks: list[tuple[int, bytes]], key: bytes) -> Recipe:
    return Recipe.of(key, [(length, delta.keyed_id(key, h)) for length, h in chunks])


# -- the receiver: the index -------------------------------------------------------------------


class ChunkIndex:
    """Every SQL statement of deltas (tables chunk_files, chunk_index, chunk_recipes)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def lookup(
        self, sender: str, ids: set[bytes]
    ) -> dict[bytes, tuple[int, str, int, int, int, int, int]]:
        """For each of `ids` held from `sender`: (file id, path, size, mtime_ns, inode, offset,
        length). Only that sender's rows are ever consulted (the confirmation-of-file defence)."""
        # By id through the (sender, chunk) key, LOOKUP_BATCH at a time: the cost follows the
        # recipe, not the index (which may hold MAX_ROWS of this sender's chunks).
        out: dict[bytes, tuple[int, str, int, int, int, int, int]] = {}
        wanted = sorted(ids)
        for k in range(0, len(wanted), LOOKUP_BATCH):
            batch = wanted[k : k + LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            where = f"WHERE i.sender = ? AND i.chunk IN ({marks})"  # only "?" placeholders
            query = f"{_LOOKUP} {where}"
            rows = await self.store.fetchall(query, (sender, *batch))
            out.update((bytes(r[0]), tuple(r[1:])) for r in rows)
        return out

    async def add_file(self, sender: str, path: Path, recipe: Recipe) -> None:
        st = os.stat(path, follow_symlinks=False)
        now = time.time()
        async with self.store.transaction(now) as tx:
            cur = await tx.execute(
                "INSERT INTO chunk_files (sender, path, size, mtime_ns, inode, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (sender, str(path), st.st_size, st.st_mtime_ns, st.st_ino, now),
            )
            file_id = cur.lastrowid
            # The newest copy of a chunk wins: it is the likeliest still to be there.
            await tx.executemany(
                "INSERT INTO chunk_index (sender, chunk, file, offset, length)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sender, chunk) DO UPDATE SET"
                " file = excluded.file, offset = excluded.offset, length = excluded.length",
                ((sender, cid, file_id, off, length) for off, length, cid in recipe.located()),
            )
            # Bounds: the sender's oldest files first, then anyone's oldest.
            await tx.execute(
                "DELETE FROM chunk_files WHERE sender = ? AND id NOT IN"
                " (SELECT id FROM chunk_files WHERE sender = ? ORDER BY id DESC LIMIT ?)",
                (sender, sender, MAX_FILES_PER_SENDER),
            )
            while True:
                row = await tx.fetchone("SELECT count(*) FROM chunk_index")
                if row[0] <= MAX_ROWS:
                    break
                await tx.execute(
                    "DELETE FROM chunk_files WHERE id = (SELECT min(id) FROM chunk_files)"
                )
            await tx.execute(
                "DELETE FROM chunk_files WHERE NOT EXISTS"
                " (SELECT 1 FROM chunk_index WHERE file = chunk_files.id)"
            )

    async def forget_files(self, file_ids: set[int]) -> None:
        if not file_ids:
            return
        async with self.store.transaction(time.time()) as tx:
            await tx.executemany("DELETE FROM chunk_files WHERE id = ?", [(f,) for f in file_ids])

    async def forget_sender(self, sender: str) -> None:
        await self.forget_senders([sender])

    async def forget_senders(self, senders: list[str]) -> None:
        """Erase what was indexed from these senders (revoked or blocked), in one transaction."""
        if not senders:
            return
        async with self.store.transaction(time.time()) as tx:
            rows = [(s,) for s in senders]
            await tx.executemany("DELETE FROM chunk_index WHERE sender = ?", rows)
            await tx.executemany("DELETE FROM chunk_files WHERE sender = ?", rows)

    async def drop_recipes_except(self, keep: set[bytes]) -> None:
        """Recipes of no transfer being received (left by a crash before the transfer's row)."""
        rows = await self.store.fetchall("SELECT transfer_id FROM chunk_recipes")
        gone = [(tid,) for (tid,) in rows if bytes(tid) not in keep]
        if gone:
            async with self.store.transaction(time.time()) as tx:
                await tx.executemany("DELETE FROM chunk_recipes WHERE transfer_id = ?", gone)

    async def count(self, sender: str | None = None) -> int:
        where, args = ("WHERE sender = ?", (sender,)) if sender else ("", ())
        row = await self.store.fetchone(f"SELECT count(*) FROM chunk_index {where}", args)  # noqa: S608 - fixed text
        return int(row[0])

    async def save_recipe(self, tid: bytes, recipe: Recipe) -> None:
        async with self.store.transaction(time.time()) as tx:
            await tx.execute(
                "INSERT OR REPLACE INTO chunk_recipes (transfer_id, key, entries) VALUES (?, ?, ?)",
                (tid, recipe.key, recipe.raw),
            )

    async def load_recipe(self, tid: bytes) -> Recipe | None:
        row = await self.store.fetchone(
            "SELECT key, entries FROM chunk_recipes WHERE transfer_id = ?", (tid,)
        )
        if row is None:
            return None
        raw = bytes(row[1])
        n = delta.RECIPE_PART_ENTRIES * delta.ENTRY_BYTES
        for i in range(0, len(raw), n):
            delta.decode_entries(raw[i : i + n])  # checked as if it had just come
        return Recipe(bytes(row[0]), raw)

    async def drop_recipe(self, tid: bytes) -> None:
        async with self.store.transaction(time.time()) as tx:
            await tx.execute("DELETE FROM chunk_recipes WHERE transfer_id = ?", (tid,))


def prefill(
    part_fd: int,
    key: bytes,
    located: Iterable[tuple[int, int, bytes]],
    found: dict[bytes, tuple[int, str, int, int, int, int, int]],
) -> Prefill:
    """Copy every chunk of `located` (offset, length, id) found in the index into the
    temporary file open at `part_fd`, each checked against its id as read; then fdatasync.
    Blocking I/O: run it in a worker thread. Closes `part_fd` (its own duplicate): whoever
    holds the transfer's descriptor may close it while the copy runs (a cancelled accept), and
    a thread must never write through a number the kernel has given out again."""
    out = Prefill()
    sources: dict[int, int | None] = {}
    try:
        for offset, length, cid in located:
            hit = found.get(cid)
            if hit is None:
                continue
            file_id, path, size, mtime_ns, inode, src_off, src_len = hit
            if src_len != length or file_id in out.stale:
                continue
            if file_id not in sources:
                sources[file_id] = _open_checked(path, size, mtime_ns, inode)
                if sources[file_id] is None:
                    out.stale.add(file_id)
                    continue
            src = sources[file_id]
            assert src is not None
            data = os.pread(src, length, src_off)
            if len(data) != length or delta.chunk_id(key, data) != cid:
                out.corrupt += 1  # changed in place under the same mtime: fetch it instead
                continue
            os.pwrite(part_fd, data, offset)
            out.covered.append((offset, length))
            out.held_bytes += length
        if out.covered:
            os.fdatasync(part_fd)
    finally:
        os.close(part_fd)
        for src in sources.values():
            if src is not None:
                os.close(src)
    return out


def _open_checked(path: str, size: int, mtime_ns: int, inode: int) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (size, mtime_ns, inode):
        os.close(fd)
        return None
    return fd


# -- the receiver: streamed recipes -------------------------------------------------------------

MAX_PENDING = 16  # recipes whose offer has not come yet, from all senders
MAX_PENDING_PER_SENDER = 4
PENDING_TTL = 120.0  # seconds a recipe waits for its offer


@dataclass
class RecipeStream:
    """The parts of one transfer's recipe, kept as they come (in any order)."""

    sender: str
    key: bytes
    at: float
    got: dict[int, bytes] = field(default_factory=dict)  # packed entries, checked on decoding
    final: int | None = None  # the number of the part marked final
    claimed: bool = False  # its offer was accepted: it follows the transfer, not the TTL
    more: asyncio.Event = field(default_factory=asyncio.Event)


class Recipes:
    """Recipe parts by transfer: held until their Offer (bounded in number, size and time),
    then followed by the transfer that claimed them."""

    def __init__(self) -> None:
        self._streams: dict[bytes, RecipeStream] = {}

    def add(self, sender: str, msg: RecipeMessage, now: float) -> bool:
        """Keep one part; False if it is refused (over a bound, or contradicts earlier parts)."""
        for tid, old in list(self._streams.items()):
            if not old.claimed and now - old.at > PENDING_TTL:
                del self._streams[tid]
        r = self._streams.get(msg.transfer_id)
        if r is None:
            waiting = [q for q in self._streams.values() if not q.claimed]
            mine = sum(1 for q in waiting if q.sender == sender)
            if len(waiting) >= MAX_PENDING or mine >= MAX_PENDING_PER_SENDER:
                return False
            r = self._streams[msg.transfer_id] = RecipeStream(sender, msg.key, now)
        if (r.sender, r.key) != (sender, msg.key):
            return False
        if msg.final:
            if r.final not in (None, msg.part) or any(k > msg.part for k in r.got):
                return False
            r.final = msg.part
        elif r.final is not None and msg.part >= r.final:
            return False
        r.got.setdefault(msg.part, msg.entries)
        r.more.set()
        return True

    def claim(self, sender: str, tid: bytes) -> RecipeStream | None:
        """The recipe of an offer being accepted, if its first part came from its sender."""
        r = self._streams.get(tid)
        if r is None or r.sender != sender or 0 not in r.got:
            self._streams.pop(tid, None)
            return None
        r.claimed = True
        return r

    def take_complete(self, tid: bytes) -> RecipeStream | None:
        """The stream of `tid` with every part up to its final one, removed; None if not yet."""
        r = self._streams.get(tid)
        if r is None or r.claimed or r.final is None:
            return None
        if any(k not in r.got for k in range(r.final + 1)):
            return None
        del self._streams[tid]
        return r

    def following(self, tid: bytes) -> bool:
        r = self._streams.get(tid)
        return r is not None and r.claimed

    def discard(self, tid: bytes) -> None:
        self._streams.pop(tid, None)


class Follower:
    """One transfer's recipe as its parts come: each part's chunks looked up in the index
    (this sender's rows only), those found copied into the temporary file and synced; the
    transfer's credit then reaches as far as the parts do (ReceiverTransfer.extend)."""

    def __init__(
        self,
        index: ChunkIndex,
        stream: RecipeStream,
        *,
        tid: bytes,
        part_fd: int,
        size: int,
        chunk_size: int,
    ) -> None:
        self.index, self.stream, self.tid = index, stream, tid
        self.part_fd, self.size, self.chunk_size = part_fd, size, chunk_size
        self.raw = bytearray()  # the parts applied, packed
        self.pos = 0  # bytes the parts so far cover
        self.parts = 0  # parts applied
        self.covered: list[list[int]] = []  # merged [start, end) byte ranges copied
        self.held_bytes = 0
        self.stale: set[int] = set()
        self.broken = False  # the parts do not add up to the file: no more copies

    @property
    def complete(self) -> bool:
        return not self.broken and self.parts - 1 == self.stream.final and self.pos == self.size

    @property
    def reach(self) -> int:
        """Chunks below this are covered by the parts applied (all of them once complete)."""
        if self.complete or self.broken:
            return -(-self.size // self.chunk_size)
        return self.pos // self.chunk_size

    def recipe(self) -> Recipe:
        return Recipe(self.stream.key, bytes(self.raw))

    def ready(self) -> bool:
        return self.parts in self.stream.got

    async def wait(self, within: float) -> bool:
        """Whether the next part is there, waiting up to `within` seconds for it."""
        while not self.ready():
            self.stream.more.clear()
            if not await wait_set(self.stream.more, within):
                return False
        return True

    async def apply_until(self, chunks: int, within: float, name: str) -> list[tuple[int, int]]:
        """Before the Accept: apply the parts there now, and those that come within `within`
        seconds while they reach fewer than `chunks` chunks; the transfer chunks now held. Then
        the cap does not hold the start back, and fan-out receivers start with the same credit
        (a receiver capped below another dropped chunks published for the other and needed
        them again). A failed copy marks the recipe broken: the rest is fetched."""
        held: list[tuple[int, int]] = []
        try:
            held = await self.apply()
            until = time.monotonic() + within
            while not self.broken and self.reach < chunks:
                left = until - time.monotonic()
                if left <= 0 or not await self.wait(left):
                    break
                held = await self.apply()
        except OSError as exc:
            log.warning("copying local chunks for %s failed: %s", name, exc)
            self.broken = True
        return held

    async def apply(self) -> list[tuple[int, int]]:
        """Look up and copy the parts that are there, in order; the transfer chunks now held
        (every one so far: the transfer skips those it knew)."""
        located: list[tuple[int, int, bytes]] = []
        while self.ready() and not self.broken:
            raw = self.stream.got.pop(self.parts)
            self.raw += raw
            for length, cid in delta.iter_entries(raw):
                located.append((self.pos, length, cid))
                self.pos += length
            self.parts += 1
            if self.pos > self.size or (
                self.parts - 1 == self.stream.final and self.pos != self.size
            ):
                log.warning("a recipe from %s does not add up to its file", self.stream.sender)
                self.broken = True
                return []
        found = await self.index.lookup(self.stream.sender, {cid for _, _, cid in located})
        if found:
            # Shielded, as write_and_sync: a job given a descriptor is never abandoned unrun.
            copy = asyncio.to_thread(prefill, os.dup(self.part_fd), self.stream.key, located, found)
            done = await asyncio.shield(copy)
            if done.corrupt:
                log.warning(
                    "%d local chunks from %s no longer match; fetching them",
                    done.corrupt,
                    self.stream.sender,
                )
            self.stale |= done.stale
            self.held_bytes += done.held_bytes
            for off, length in done.covered:  # in file order: merged as they come
                if self.covered and off <= self.covered[-1][1]:
                    self.covered[-1][1] = max(self.covered[-1][1], off + length)
                else:
                    self.covered.append([off, off + length])
        return delta.held_frames(((a, b - a) for a, b in self.covered), self.size, self.chunk_size)


# -- the receiver: recipes that follow their file ---------------------------------------------

MAX_LATE_FILES = 64  # files verified without a recipe whose recipe may still come
LATE_TTL = 600.0  # seconds such a recipe may take to come
LATE_INDEX_WAIT = 5.0  # seconds an offer with a recipe waits for its sender's late recipe


@dataclass
class LateFile:
    sender: str
    path: Path
    stat: tuple[int, int, int]  # size, mtime_ns, inode when it was committed
    at: float


class LateRecipes:
    """Recipes that follow a file already verified (SPEC 7.11): its sender sent it without one
    (no receiver had been sent any chunk sampled from it) and cuts it afterwards, so that the
    next version finds it indexed here. Only the file's sender may send it, only within
    LATE_TTL, and it is indexed only if it adds up to the file, unchanged since its commit."""

    def __init__(
        self,
        index: ChunkIndex,
        recipes: Recipes,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        self.index, self.recipes, self._spawn = index, recipes, spawn
        self._files: dict[bytes, LateFile] = {}
        self._indexing: dict[str, asyncio.Task[None]] = {}  # sender -> its last late recipe
        self.indexed = 0

    def expect(self, tid: bytes, sender: str, path: Path, now: float) -> None:
        """`path` was committed from `sender` without a recipe: its recipe may follow."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return
        for old, f in list(self._files.items()):
            if now - f.at > LATE_TTL:
                del self._files[old]
        while len(self._files) >= MAX_LATE_FILES:
            del self._files[next(iter(self._files))]
        self._files[tid] = LateFile(sender, path, (st.st_size, st.st_mtime_ns, st.st_ino), now)

    def part(self, sender: str, msg: RecipeMessage, now: float) -> bool | None:
        """Take a part of a late recipe: None if `msg` is not one, False if it is refused."""
        f = self._files.get(msg.transfer_id)
        if f is None or now - f.at > LATE_TTL:
            return None
        if sender != f.sender or not self.recipes.add(sender, msg, now):
            return False
        stream = self.recipes.take_complete(msg.transfer_id)
        if stream is not None:
            del self._files[msg.transfer_id]
            task = self._spawn(self._index(f, stream), f"late recipe {msg.transfer_id.hex()[:8]}")
            self._indexing[sender] = task
        return True

    async def _index(self, f: LateFile, stream: RecipeStream) -> None:
        assert stream.final is not None
        raw = b"".join(stream.got[k] for k in range(stream.final + 1))
        if sum(n for n, _ in delta.iter_entries(raw)) != f.stat[0]:
            log.warning("a late recipe from %s does not add up to its file", f.sender)
            return
        try:
            st = os.stat(f.path, follow_symlinks=False)
            if (st.st_size, st.st_mtime_ns, st.st_ino) == f.stat:
                await self.index.add_file(f.sender, f.path, Recipe(stream.key, raw))
                self.indexed += 1
        except OSError as exc:
            log.warning("not indexing %s for deltas: %s", f.path, exc)

    async def settled(self, sender: str) -> None:
        """Wait (up to LATE_INDEX_WAIT) for `sender`'s last late recipe to be indexed: its
        next offer is looked up after it."""
        task = self._indexing.pop(sender, None)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=LATE_INDEX_WAIT)
