"""Received chunks written past the page cache (O_DIRECT), from buffers held until the next Sync.

A buffered pwrite copies each chunk into fresh page cache, and on these VMs that copy is the
receiver's largest system cost (docs/benchmarks.md, "Received chunks past the page cache": a
third of its samples in `copy_folio_from_iter_atomic`). Instead each chunk is decrypted straight
into one of a few page-aligned slots of an anonymous mapping and stays there until the machine
asks for the next Sync; the sync's worker thread writes the held chunks with O_DIRECT (one
`pwritev` per run of adjacent chunks) and then fdatasyncs, as before. Nothing is acknowledged
as durable before that fdatasync, so SPEC 7.10's guarantees hold unchanged: a chunk still in a
slot when the daemon stops was never acknowledged and is asked for again.

Everything falls back to the buffered pwrite, chunk by chunk: no slot free (a sync slower than
the chunks arriving), a chunk whose length or offset is not block-aligned (a file's last chunk),
a file system that refuses O_DIRECT at open or at write (EINVAL), a second descriptor that
cannot be had, and the daemon's budget for held chunks spent (`HeldMemory`: trusted senders
could otherwise make each of their transfers keep 32 chunks of up to 512 KiB resident).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("peerd.transfers")

# O_DIRECT wants buffers, offsets and lengths aligned to the device's logical block size: 4096
# covers every block size in use (512 and 4096); a page-aligned mapping gives the buffers.
ALIGN = 4096
# Slots per transfer: a Sync is asked for every 16 chunks (TransferConfig.sync_batch), so 32
# let the next batch arrive while the last one is written. Pages are touched only when used.
SLOTS = 32


def open_direct(dirfd: int, name: str, fd: int) -> int | None:
    """A second, O_DIRECT descriptor of the file open at `fd` (named `name` in `dirfd`), or None
    where there is none to have (a file system without O_DIRECT, no descriptor left). The name
    is checked to still be that file: a descriptor of another file is never returned."""
    try:
        direct = os.open(
            name, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
        )
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: the file system has no O_DIRECT, nothing to say
            log.warning("received chunks go through the page cache: %s", exc.strerror)
        return None
    a, b = os.fstat(fd), os.fstat(direct)
    if (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev):
        os.close(direct)
        return None
    return direct


class HeldMemory:
    """The bytes all transfers' slots may keep resident together (`[limits]
    held_chunks_memory`, read at each request, so a reload applies). A slot is charged the first
    time it is used and stays charged until its transfer ends: its pages stay resident."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self._limit():
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass(frozen=True, slots=True)
class Batch:
    """The chunks one Sync writes: (offset, slot, view of its bytes), in offset order."""

    chunks: tuple[tuple[int, int, memoryview], ...]

    def runs(self) -> list[tuple[int, list[memoryview]]]:
        """(offset, views) of each run of adjacent chunks: one pwritev each."""
        out: list[tuple[int, list[memoryview]]] = []
        end = -1
        for offset, _, view in self.chunks:
            if out and offset == end:
                out[-1][1].append(view)
            else:
                out.append((offset, [view]))
            end = offset + len(view)
        return out


class DirectWrites:
    """One transfer's slots: a chunk decrypted into one is held (readable from it) until a Sync
    takes it; its slot is free again once that sync's thread is done."""

    def __init__(
        self, direct_fd: int, chunk_size: int, budget: HeldMemory, slots: int = SLOTS
    ) -> None:
        if chunk_size % ALIGN:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of {ALIGN}")
        self.direct_fd = direct_fd
        self.chunk_size = chunk_size
        self._budget = budget
        self._slots = slots
        self._used = 0  # slots [0, used) were handed out once: resident, charged to the budget
        self._map = mmap.mmap(-1, slots * chunk_size)  # address space only, until used
        self._view = memoryview(self._map)
        self._free: list[int] = []  # used slots free again
        self._next: int | None = None  # the slot the last buffer() handed out
        self._held: dict[int, tuple[int, int, int]] = {}  # index -> (offset, slot, length)
        self._writing: dict[int, tuple[int, int, int]] = {}  # taken by a running sync
        self.refused = False  # the file system refused an O_DIRECT write: no more slots
        self.fallbacks = 0  # chunks written through the page cache for want of a slot

    @classmethod
    def open(
        cls, dirfd: int, name: str, fd: int, chunk_size: int, budget: HeldMemory
    ) -> DirectWrites | None:
        if chunk_size % ALIGN:
            return None
        direct = open_direct(dirfd, name, fd)
        return None if direct is None else cls(direct, chunk_size, budget)

    def buffer(self) -> memoryview | None:
        """Where to decrypt the next chunk: a free slot, or None (then the caller's own buffer,
        and a buffered write)."""
        if self.refused:
            return None
        if self._next is None:
            if self._free:
                self._next = self._free.pop()
            elif self._used < self._slots and self._budget.take(self.chunk_size):
                self._next = self._used
                self._used += 1
            else:
                self.fallbacks += 1
                return None
        at = self._next * self.chunk_size
        return self._view[at : at + self.chunk_size]

    def keep(self, index: int, offset: int, data: memoryview) -> bool:
        """Hold a chunk the machine decrypted into the slot buffer() gave; False when it is not
        in a slot or cannot be written O_DIRECT (the caller writes it through the page cache)."""
        slot = self._next
        if slot is None or data.obj is not self._map or len(data) % ALIGN or offset % ALIGN:
            return False
        self._next = None
        self._held[index] = (offset, slot, len(data))
        return True

    def read(self, index: int) -> memoryview | None:
        """A held chunk's bytes (not on disk yet), or None."""
        entry = self._held.get(index) or self._writing.get(index)
        if entry is None:
            return None
        _, slot, length = entry
        at = slot * self.chunk_size
        return self._view[at : at + length]

    def take(self) -> Batch:
        """The held chunks, for the Sync about to start; they stay readable until release()."""
        chunks = []
        for index, (offset, slot, length) in sorted(self._held.items(), key=lambda e: e[1][0]):
            at = slot * self.chunk_size
            chunks.append((offset, slot, self._view[at : at + length]))
            self._writing[index] = (offset, slot, length)
        self._held.clear()
        return Batch(tuple(chunks))

    def release(self, batch: Batch) -> None:
        """The sync that took `batch` is over (its thread done): the slots are free again."""
        slots = {slot for _, slot, _ in batch.chunks}
        for index in [i for i, (_, slot, _) in self._writing.items() if slot in slots]:
            del self._writing[index]
        self._free.extend(slots)
        for _, _, view in batch.chunks:
            view.release()

    def write_and_sync(self, batch: Batch, fd: int, direct_fd: int) -> int:
        """In a worker thread: write `batch`, then fdatasync; how many chunks went O_DIRECT.
        `fd` and `direct_fd` are this call's own duplicates (the transfer may end, and close
        its own, meanwhile), closed here. A write O_DIRECT refuses goes through `fd`."""
        direct = 0
        try:
            for offset, views in batch.runs():
                done = 0
                if not self.refused:
                    try:
                        done = os.pwritev(direct_fd, views, offset)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        self.refused = True
                        log.warning("O_DIRECT writes refused here: through the page cache now")
                direct += _whole(views, done)
                _write_rest(fd, views, offset, done)
            os.fdatasync(fd)
        finally:
            os.close(fd)
            os.close(direct_fd)
        return direct

    def close(self) -> None:
        """The transfer is over. A sync thread still writing keeps the mapping alive through
        its views; the mapping is unmapped once the last is gone."""
        self._budget.give(self._used * self.chunk_size)
        self._used = 0
        self._slots = 0  # no slot more (and nothing given back twice)
        self._free.clear()
        self._next = None
        with contextlib.suppress(OSError):
            os.close(self.direct_fd)
        with contextlib.suppress(BufferError):
            self._view.release()
            self._map.close()


async def write_and_sync(fd: int, d: DirectWrites | None, batch: Batch | None) -> int:
    """A Sync: the held chunks of `batch` written O_DIRECT (if any; how many is returned), then
    fdatasync, in a worker
    thread through duplicates of the descriptors, which the thread closes: the transfer may
    end (and close its own) meanwhile. Shielded, as the receiver's header check: a job
    submitted is never abandoned with its descriptors, and its slots are freed only once it
    is done."""
    if d is None or batch is None or not batch.chunks:
        await asyncio.to_thread(os.fdatasync, fd)
        return 0
    own = os.dup(fd)
    try:
        direct_fd = os.dup(d.direct_fd)
    except OSError:
        os.close(own)
        raise
    job = asyncio.get_running_loop().run_in_executor(None, d.write_and_sync, batch, own, direct_fd)
    job.add_done_callback(lambda _: d.release(batch))
    return await asyncio.shield(job)


def _whole(views: list[memoryview], done: int) -> int:
    """How many of `views` the first `done` bytes cover whole."""
    n = 0
    for view in views:
        if done < len(view):
            break
        done -= len(view)
        n += 1
    return n


def _write_rest(fd: int, views: list[memoryview], offset: int, done: int) -> None:
    """Write what pwritev did not (all of it, after a refusal) through the page cache."""
    for view in views:
        if done >= len(view):
            done -= len(view)
            offset += len(view)
            continue
        part = view[done:]
        at = offset + done
        while part:
            n = os.pwrite(fd, part, at)
            part, at = part[n:], at + n
        offset += len(view)
        done = 0
