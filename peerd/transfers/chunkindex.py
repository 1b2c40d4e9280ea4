"""Deltas, the shell's half (protocol/SPEC.md 7.11; the wire half is protocol/transfer/delta.py).

- The sender cuts the file it is about to send into content-defined chunks (one mmap'd pass in
  a worker thread) and sends each receiver the list of (length, id) with ids keyed for that pair.
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peerd.waiting import wait_set
from protocol.safetensors import SafetensorsError, is_safetensors_name, parse_header
from protocol.transfer import delta
from protocol.transfer.messages import Recipe as RecipeMessage

if TYPE_CHECKING:
    from peerd.store import Store

log = logging.getLogger("peerd.transfers")

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
    """A file's chunk list: offsets are implied by the lengths, in order."""

    key: bytes
    entries: list[tuple[int, bytes]]  # (length, keyed id)

    def located(self) -> list[tuple[int, int, bytes]]:
        out, pos = [], 0
        for length, cid in self.entries:
            out.append((pos, length, cid))
            pos += length
        return out


@dataclass
class Prefill:
    """What a receiver found in its own files for one offer."""

    covered: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) copied
    held_bytes: int = 0
    stale: set[int] = field(default_factory=set)  # indexed files gone or changed
    corrupt: int = 0  # local chunks whose bytes no longer match their id


# -- the sender: the file's chunks ------------------------------------------------------------


def file_chunks(fd: int, size: int, name: str) -> list[tuple[int, bytes]]:
    """(length, unkeyed BLAKE3 digest) of each content-defined chunk of the open file.
    CPU and I/O: run it in a worker thread. Regions are independent and both pyfastcdc and
    blake3 release the GIL, so the two halves of the file are cut on two threads."""
    if size == 0:
        return []
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
        view = memoryview(mm)
        try:
            spans = delta.regions(size, None)
            if is_safetensors_name(name):
                with_tensors = _tensor_spans(view, size)
                if with_tensors is not None:
                    spans = with_tensors
            if len(spans) == 1:
                return _chunk_spans(view, spans)  # one region: one pass (boundaries chain)
            half = size // 2
            first = [s for s in spans if s[0] < half]
            second = [s for s in spans if s[0] >= half]
            with ThreadPoolExecutor(2) as pool:
                later = pool.submit(_chunk_spans, view, second)
                out = _chunk_spans(view, first)
                out += later.result()
        finally:
            view.release()
    return out


def _chunk_spans(view: memoryview, spans: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    return [
        (length, delta.content_hash(view[off : off + length]))
        for off, length in delta.cut(view, spans)
    ]


def _tensor_spans(view: memoryview, size: int) -> list[tuple[int, int]] | None:
    try:
        header = parse_header(view[: min(size, 8 + HEADER_READ)], size)
    except SafetensorsError:
        return None  # not a valid safetensors file: chunked as one region
    return delta.regions(
        size, [(t.begin, t.end) for t in header.tensors], data_start=header.data_start
    )


def recipe_for(chunks: list[tuple[int, bytes]], key: bytes) -> Recipe:
    return Recipe(key, [(length, delta.keyed_id(key, h)) for length, h in chunks])


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
                [(sender, cid, file_id, off, length) for off, length, cid in recipe.located()],
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
                (tid, recipe.key, delta.encode_entries(recipe.entries)),
            )

    async def load_recipe(self, tid: bytes) -> Recipe | None:
        row = await self.store.fetchone(
            "SELECT key, entries FROM chunk_recipes WHERE transfer_id = ?", (tid,)
        )
        if row is None:
            return None
        raw = bytes(row[1])
        n = delta.RECIPE_PART_ENTRIES * delta.ENTRY_BYTES
        entries = [e for i in range(0, len(raw), n) for e in delta.decode_entries(raw[i : i + n])]
        return Recipe(bytes(row[0]), entries)

    async def drop_recipe(self, tid: bytes) -> None:
        async with self.store.transaction(time.time()) as tx:
            await tx.execute("DELETE FROM chunk_recipes WHERE transfer_id = ?", (tid,))


def prefill(
    part_fd: int,
    recipe: Recipe,
    found: dict[bytes, tuple[int, str, int, int, int, int, int]],
) -> Prefill:
    """Copy every chunk of `recipe` found in the index into the temporary file, each checked
    against its id as read; then fdatasync. Blocking I/O: run it in a worker thread."""
    out = Prefill()
    sources: dict[int, int | None] = {}
    try:
        for offset, length, cid in recipe.located():
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
            if len(data) != length or delta.chunk_id(recipe.key, data) != cid:
                out.corrupt += 1  # changed in place under the same mtime: fetch it instead
                continue
            os.pwrite(part_fd, data, offset)
            out.covered.append((offset, length))
            out.held_bytes += length
        if out.covered:
            os.fdatasync(part_fd)
    finally:
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


# -- the receiver: recipes that arrive before their offer --------------------------------------

MAX_PENDING = 16  # recipes waiting for their offer, from all senders
MAX_PENDING_PER_SENDER = 4
PENDING_TTL = 120.0  # seconds a recipe waits for its offer
RECIPE_WAIT = 5.0  # seconds an offer waits for the rest of its recipe


@dataclass
class _Pending:
    sender: str
    key: bytes
    parts: int
    at: float
    got: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    complete: asyncio.Event = field(default_factory=asyncio.Event)


class Recipes:
    """Recipe messages held until their Offer arrives (bounded in number, size and time)."""

    def __init__(self) -> None:
        self._pending: dict[bytes, _Pending] = {}

    def add(self, sender: str, msg: RecipeMessage, now: float) -> bool:
        """Keep one part; False if it is refused (over a bound, or contradicts earlier parts)."""
        for tid, old in list(self._pending.items()):
            if now - old.at > PENDING_TTL:
                del self._pending[tid]
        p = self._pending.get(msg.transfer_id)
        if p is None:
            mine = sum(1 for q in self._pending.values() if q.sender == sender)
            if len(self._pending) >= MAX_PENDING or mine >= MAX_PENDING_PER_SENDER:
                return False
            p = self._pending[msg.transfer_id] = _Pending(sender, msg.key, msg.parts, now)
        if (p.sender, p.key, p.parts) != (sender, msg.key, msg.parts):
            return False
        p.got[msg.part] = delta.decode_entries(msg.entries)
        if len(p.got) == p.parts:
            p.complete.set()
        return True

    def discard(self, tid: bytes) -> None:
        self._pending.pop(tid, None)

    async def take(self, sender: str, tid: bytes) -> Recipe | None:
        """The whole recipe of `tid` from `sender`, waiting a little for its last parts; None
        if there is none (the file is then sent whole)."""
        p = self._pending.get(tid)
        if p is None or p.sender != sender:
            return None
        await wait_set(p.complete, RECIPE_WAIT)
        self._pending.pop(tid, None)
        if len(p.got) != p.parts:
            return None
        entries = [e for k in range(p.parts) for e in p.got[k]]
        return Recipe(p.key, entries) if len(entries) <= delta.MAX_RECIPE_ENTRIES else None


async def prepare(
    index: ChunkIndex, recipes: Recipes, *, sender: str, tid: bytes, part_fd: int, size: int
) -> tuple[Recipe | None, Prefill]:
    """Before accepting an offer: its recipe (if the sender sent one whose chunks add up to
    the file) and what was copied from local files into the temporary file. The caller drops
    the indexed files found gone or changed (`Prefill.stale`) once it has answered the offer:
    a transaction that need not stand between the Offer and the Accept."""
    recipe = await recipes.take(sender, tid)
    if recipe is None:
        return None, Prefill()
    if sum(length for length, _ in recipe.entries) != size:
        log.warning("a recipe from %s does not add up to its file; sending whole", sender)
        return None, Prefill()
    found = await index.lookup(sender, {cid for _, cid in recipe.entries})
    done = Prefill()
    if found:
        done = await asyncio.to_thread(prefill, part_fd, recipe, found)
        if done.corrupt:
            log.warning(
                "%d local chunks from %s no longer match; fetching them", done.corrupt, sender
            )
    await index.save_recipe(tid, recipe)
    return recipe, done
