"""Deltas, the sender's memory of what it sent (protocol/SPEC.md 7.11).

A recipe beside the transfer costs the sender a pass over the whole file (CDC and BLAKE3:
~0.2 s of CPU per 256 MiB here, on the cores the transfer needs) and holds the receiver's
credit to what the parts reach. It pays only where a receiver may hold some of the file, and
a receiver only ever reuses chunks *this* sender sent it. So the sender keeps the keyed ids of
the chunks of the files it sent each receiver with their whole recipe (tables sent_files and
sent_chunks), and before chunking a new file it samples ~4 MiB of it (delta.sample_windows):

- some sampled chunk was sent to some receiver: the recipe streams beside the transfer;
- none was: the file goes at full speed with no recipe, and the recipe follows it ("late"),
  cut in a low-priority worker thread once receivers verified the file, so that the next
  version finds it indexed there. A new send to the same receivers waits (up to LATE_WAIT) for
  such a recipe to be sent first.

Bounded: MAX_FILES_PER_RECEIVER files per receiver and MAX_ROWS rows in all (the oldest go
first), MAX_LATE late recipes waiting (the oldest dropped, with a log line), one cut at a time.
A revoked or blocked receiver's rows are erased.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from peerd.errors import PeerdError
from peerd.transfers.chunkindex import (
    LOOKUP_BATCH,
    FileChunker,
    keyed_entries,
    pack_digests,
    sample_digests,
)
from peerd.transfers.files import StatKey, stat_of
from peerd.waiting import wait_set
from protocol.transfer import delta
from protocol.transfer.messages import Recipe

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from peerd.keystore import Keystore
    from peerd.store import Store

log = logging.getLogger("peerd.transfers")

MAX_FILES_PER_RECEIVER = 64
MAX_ROWS = 1 << 21  # ~128 GiB of sent files at 64 KiB a chunk
MAX_LATE = 8
LATE_WAIT = 30.0  # seconds a send waits for the late recipes of its receivers to go first
LATE_NICE = 10  # the late cut's thread yields to the transfers under way


def _lower_priority() -> None:
    # Per thread on Linux (setpriority on the thread's own id); a nicer thread never asks back.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LATE_NICE)


class SentHost(Protocol):
    """What this part asks of the daemon (peerd.host.Host has it all)."""

    @property
    def store(self) -> Store: ...

    @property
    def keys(self) -> Keystore: ...

    def transmit(self, peer: str, payload: bytes) -> bool: ...

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


@dataclass(eq=False)
class Late:
    """A file sent without a recipe; its recipe is to follow to `receivers`."""

    tid: bytes
    fd: int  # a duplicate of the transfer's descriptor, closed once the recipe is cut
    stat: StatKey
    name: str
    size: int
    receivers: list[str]
    done: asyncio.Event = field(default_factory=asyncio.Event)


class SentChunks:
    """The sender's half of deltas outside a transfer: the gate before a file is chunked, the
    record of what each receiver was sent, and the late recipes."""

    def __init__(self, host: SentHost, cache: Callable[[StatKey, list[bytes]], None]) -> None:
        self.host = host
        self._cache = cache  # the chunk lists of files sent lately (Sending._cache_chunks)
        self._late: deque[Late] = deque()  # waiting and (the first) being cut
        self._worker: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.late_sent = 0  # late recipes sent whole to a receiver
        self.late_dropped = 0

    @property
    def waiting(self) -> int:
        """Late recipes queued or being cut."""
        return len(self._late)

    def _key(self, receiver: str) -> bytes:
        return delta.pair_key(bytes(self.host.keys.signing_key()), receiver)

    # -- the gate -----------------------------------------------------------------------------

    async def worth_a_recipe(self, fd: int, size: int, name: str, receivers: list[str]) -> bool:
        """Whether some receiver may hold chunks of the open file: one of its sampled chunks
        was sent to it before (after the late recipes to these receivers went)."""
        await self.settled(receivers)
        digests = await asyncio.to_thread(sample_digests, fd, size, name)
        for peer in dict.fromkeys(receivers):
            key = self._key(peer)
            ids = [delta.keyed_id(key, d) for d in digests]
            if await self.any_sent(peer, ids):
                return True
        return False

    async def any_sent(self, receiver: str, ids: Sequence[bytes]) -> bool:
        store = self.host.store
        for k in range(0, len(ids), LOOKUP_BATCH):
            batch = list(ids[k : k + LOOKUP_BATCH])
            marks = ",".join("?" * len(batch))
            row = await store.fetchone(
                f"SELECT 1 FROM sent_chunks WHERE receiver = ? AND chunk IN ({marks}) LIMIT 1",  # noqa: S608 - only "?" placeholders
                (receiver, *batch),
            )
            if row is not None:
                return True
        return False

    async def settled(self, receivers: list[str]) -> None:
        """Wait (up to LATE_WAIT) until no late recipe to any of `receivers` is waiting."""
        wanted = set(receivers)
        until = time.monotonic() + LATE_WAIT
        for job in list(self._late):
            if wanted & set(job.receivers):
                left = until - time.monotonic()
                if left <= 0 or not await wait_set(job.done, left):
                    log.warning("sending without waiting for the recipe of %s to go", job.name)
                    return

    # -- the record ---------------------------------------------------------------------------

    async def record(self, receiver: str, parts: list[bytes]) -> None:
        """`receiver` was sent the whole recipe of a file whose chunks are `parts` (packed)."""
        key = self._key(receiver)
        rows = [(receiver, cid) for part in parts for _, cid in keyed_entries(key, part)]
        async with self.host.store.transaction(time.time()) as tx:
            cur = await tx.execute(
                "INSERT INTO sent_files (receiver, created_at) VALUES (?, ?)",
                (receiver, time.time()),
            )
            file_id = cur.lastrowid
            await tx.executemany(
                "INSERT INTO sent_chunks (receiver, chunk, file) VALUES (?, ?, ?)"
                " ON CONFLICT (receiver, chunk) DO UPDATE SET file = excluded.file",
                ((r, cid, file_id) for r, cid in rows),
            )
            await tx.execute(
                "DELETE FROM sent_files WHERE receiver = ? AND id NOT IN"
                " (SELECT id FROM sent_files WHERE receiver = ? ORDER BY id DESC LIMIT ?)",
                (receiver, receiver, MAX_FILES_PER_RECEIVER),
            )
            while True:
                row = await tx.fetchone("SELECT count(*) FROM sent_chunks")
                if row[0] <= MAX_ROWS:
                    break
                await tx.execute(
                    "DELETE FROM sent_files WHERE id = (SELECT min(id) FROM sent_files)"
                )
            await tx.execute(
                "DELETE FROM sent_files WHERE NOT EXISTS"
                " (SELECT 1 FROM sent_chunks WHERE file = sent_files.id)"
            )

    async def forget(self, receivers: list[str]) -> None:
        """Erase what was recorded as sent to these receivers (revoked or blocked)."""
        if not receivers:
            return
        async with self.host.store.transaction(time.time()) as tx:
            rows = [(r,) for r in receivers]
            await tx.executemany("DELETE FROM sent_chunks WHERE receiver = ?", rows)
            await tx.executemany("DELETE FROM sent_files WHERE receiver = ?", rows)

    async def count(self, receiver: str) -> int:
        row = await self.host.store.fetchone(
            "SELECT count(*) FROM sent_chunks WHERE receiver = ?", (receiver,)
        )
        return int(row[0])

    # -- late recipes -------------------------------------------------------------------------

    def send_late(self, job: Late) -> None:
        """Queue the recipe of a file sent without one (this takes `job.fd`)."""
        while len(self._late) >= MAX_LATE + 1:  # the first is being cut
            dropped = self._late[1]
            del self._late[1]
            self._drop(dropped, "too many waiting")
        self._late.append(job)
        if self._worker is None or self._worker.done():
            self._worker = self.host.spawn(self._work(), name="late recipes")

    def _drop(self, job: Late, why: str) -> None:
        self.late_dropped += 1
        with contextlib.suppress(OSError):
            os.close(job.fd)
        job.done.set()
        log.warning(
            "the recipe of %s does not follow it (%s): its next version goes whole", job.name, why
        )

    async def _work(self) -> None:
        while self._late:
            job = self._late[0]
            try:
                await self._cut_and_send(job)
            except (OSError, ValueError, PeerdError) as exc:
                # The queue goes on: a send waiting for this one must not wait for nothing.
                log.warning("the recipe of %s does not follow it: %s", job.name, exc)
            finally:
                if self._late and self._late[0] is job:
                    self._late.popleft()
                job.done.set()

    async def _cut_and_send(self, job: Late) -> None:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix="peerd-late-recipe", initializer=_lower_priority
            )
        pool = self._pool
        try:
            if stat_of(os.fstat(job.fd)) != job.stat:
                log.info("the recipe of %s does not follow it: the file changed", job.name)
                return
            chunker = await loop.run_in_executor(pool, FileChunker, job.fd, job.size, job.name)
            try:
                if chunker.bound > delta.MAX_RECIPE_ENTRIES:
                    return
                parts: list[bytes] = []
                while not chunker.done:
                    cut = await loop.run_in_executor(
                        pool, chunker.take, delta.part_entries(len(parts))
                    )
                    parts.append(pack_digests(cut))
            finally:
                with contextlib.suppress(BufferError, ValueError):
                    chunker.close()  # cancelled: a take still running keeps it (then GC)
        finally:
            with contextlib.suppress(OSError):
                os.close(job.fd)
        self._cache(job.stat, parts)
        for peer in job.receivers:
            key = self._key(peer)
            for k, packed in enumerate(parts):
                entries = delta.encode_entries(keyed_entries(key, packed))
                msg = Recipe(job.tid, k, k == len(parts) - 1, key, entries)
                if not self.host.transmit(peer, msg.encode()):
                    log.info("the recipe of %s did not reach %s (no session)", job.name, peer)
                    break
            else:
                await self.record(peer, parts)
                self.late_sent += 1

    def close(self) -> None:
        """At stop: what waits is dropped (its descriptor closed), the thread let go."""
        while len(self._late) > 1:
            self._drop(self._late.pop(), "the daemon stops")
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
