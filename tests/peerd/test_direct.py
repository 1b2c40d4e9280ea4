"""Received chunks held in page-aligned slots and written O_DIRECT by the sync (peerd/transfers/
direct.py), on real files: what reaches the file and when, what is read from memory meanwhile,
and every fallback to the page cache."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.transfers.direct import (
    ALIGN,
    Batch,
    DirectWrites,
    HeldMemory,
    open_direct,
    write_and_sync,
)

CHUNK = 64 * 1024


@pytest.fixture
def part(tmp_path: Path) -> Iterator[tuple[int, int, str]]:
    """(directory fd, file fd, name) of a fresh temporary file of 8 chunks, as the receiver
    makes one (fallocated)."""
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    name = ".part"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dirfd)
    os.posix_fallocate(fd, 0, 8 * CHUNK)
    try:
        yield dirfd, fd, name
    finally:
        os.close(fd)
        os.close(dirfd)


def writes(
    part: tuple[int, int, str], slots: int = 4, budget: HeldMemory | None = None
) -> DirectWrites:
    dirfd, fd, name = part
    direct = open_direct(dirfd, name, fd)
    if direct is None:
        pytest.skip("this file system has no O_DIRECT")
    return DirectWrites(direct, CHUNK, budget or HeldMemory(lambda: 1 << 30), slots)


def receive(d: DirectWrites, fd: int, index: int, fill: int, length: int = CHUNK) -> bytes:
    """What the receiver does with a chunk: decrypt into the slot (here: fill it), then keep it
    or else write it through the page cache."""
    data = bytes([fill]) * length
    buf = d.buffer()
    if buf is None:
        os.pwrite(fd, data, index * CHUNK)
        return data
    buf[:length] = data
    if not d.keep(index, index * CHUNK, buf[:length]):
        os.pwrite(fd, buf[:length], index * CHUNK)
    return data


def file_bytes(fd: int) -> bytes:
    return os.pread(fd, 8 * CHUNK, 0)


async def test_held_chunks_reach_the_file_only_through_the_sync(
    part: tuple[int, int, str],
) -> None:
    _, fd, _ = part
    d = writes(part)
    one = receive(d, fd, 1, 0x11)
    two = receive(d, fd, 2, 0x22)
    five = receive(d, fd, 5, 0x55)
    assert file_bytes(fd) == bytes(8 * CHUNK)  # held, not written yet
    assert d.read(2) == two  # readable (for the hash) meanwhile
    assert d.read(3) is None
    batch = d.take()
    assert [(off, len(views)) for off, views in batch.runs()] == [(CHUNK, 2), (5 * CHUNK, 1)]
    assert d.read(5) == five  # still readable while the sync writes
    await write_and_sync(fd, d, batch)
    assert d.read(5) is None
    got = file_bytes(fd)
    assert got[CHUNK : 3 * CHUNK] == one + two
    assert got[5 * CHUNK : 6 * CHUNK] == five
    # Holes where nothing was written.
    assert got[:CHUNK] == bytes(CHUNK)
    assert got[3 * CHUNK : 5 * CHUNK] == got[6 * CHUNK :] == bytes(2 * CHUNK)
    assert not d.refused
    d.close()


async def test_a_chunk_not_block_aligned_goes_through_the_page_cache(
    part: tuple[int, int, str],
) -> None:
    _, fd, _ = part
    d = writes(part)
    last = receive(d, fd, 7, 0x77, length=CHUNK - 100)  # a file's last chunk
    assert os.pread(fd, CHUNK - 100, 7 * CHUNK) == last  # written at once
    assert d.read(7) is None
    head = receive(d, fd, 0, 0x01)  # the slot the last chunk used is used again
    assert d.read(0) == head
    await write_and_sync(fd, d, d.take())
    assert os.pread(fd, CHUNK, 0) == head
    d.close()


async def test_with_every_slot_held_chunks_fall_back_and_slots_come_back(
    part: tuple[int, int, str],
) -> None:
    _, fd, _ = part
    d = writes(part, slots=2)
    a = receive(d, fd, 0, 0xA0)
    b = receive(d, fd, 1, 0xB1)
    c = receive(d, fd, 2, 0xC2)  # no slot: written through the page cache at once
    assert d.fallbacks == 1
    assert os.pread(fd, CHUNK, 2 * CHUNK) == c
    assert os.pread(fd, CHUNK, 0) == bytes(CHUNK)
    await write_and_sync(fd, d, d.take())
    e = receive(d, fd, 4, 0xE4)  # slots free again
    assert d.read(4) == e
    assert d.fallbacks == 1
    await write_and_sync(fd, d, d.take())
    assert os.pread(fd, 5 * CHUNK, 0) == a + b + c + bytes(CHUNK) + e
    d.close()


async def test_an_o_direct_refusal_falls_back_and_stops_using_slots(
    part: tuple[int, int, str],
) -> None:
    """EINVAL from the kernel (here: a buffer not aligned in memory, as a file system without
    O_DIRECT support would answer any write): the batch goes through the page cache, complete,
    and later chunks do not use slots."""
    _, fd, _ = part
    d = writes(part)
    raw = bytearray(CHUNK + 1)
    raw[1:] = b"\x5a" * CHUNK
    unaligned = memoryview(raw)[1:]
    await write_and_sync(fd, d, Batch(((3 * CHUNK, 0, unaligned),)))
    assert d.refused
    assert os.pread(fd, CHUNK, 3 * CHUNK) == b"\x5a" * CHUNK
    assert d.buffer() is None
    d.close()


async def test_a_write_error_that_is_no_refusal_is_raised(
    part: tuple[int, int, str], tmp_path: Path
) -> None:
    """A descriptor that cannot write (EBADF) is an error of the sync, not a reason to fall
    back: the transfer aborts on it. The thread closes its duplicates either way."""
    _, fd, _ = part
    d = writes(part)
    receive(d, fd, 0, 0x01)
    readonly = os.open(tmp_path / ".part", os.O_RDONLY)
    os.close(d.direct_fd)
    d.direct_fd = readonly  # the sync duplicates this one
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Bad file descriptor") as caught:
        await write_and_sync(fd, d, d.take())
    assert caught.value.errno == errno.EBADF
    assert len(os.listdir("/proc/self/fd")) == before
    assert not d.refused
    assert d.buffer() is not None  # the slot was freed
    d.close()


async def test_held_chunks_of_all_transfers_stay_within_the_budget(
    part: tuple[int, int, str],
) -> None:
    """Slots are charged to the daemon's budget when first used and given back when their
    transfer ends: past it, chunks go through the page cache, and a reload applies."""
    _, fd, _ = part
    limit = 3 * CHUNK
    budget = HeldMemory(lambda: limit)
    one, two = writes(part, budget=budget), writes(part, budget=budget)
    receive(one, fd, 0, 0x01)
    receive(one, fd, 1, 0x02)
    receive(two, fd, 2, 0x03)
    assert budget.used == 3 * CHUNK
    d = receive(two, fd, 3, 0x04)  # over the budget: written at once
    assert two.fallbacks == 1
    assert os.pread(fd, CHUNK, 3 * CHUNK) == d
    await write_and_sync(fd, one, one.take())
    assert budget.used == 3 * CHUNK  # a used slot stays resident, and charged, until the end
    receive(one, fd, 4, 0x05)  # its own slot again: no new charge
    assert budget.used == 3 * CHUNK
    await write_and_sync(fd, one, one.take())
    one.close()
    one.close()
    assert budget.used == CHUNK
    limit = CHUNK  # a reload lowers it: two keeps what it has, gets no more
    receive(two, fd, 5, 0x06)
    assert two.fallbacks == 2
    await write_and_sync(fd, two, two.take())
    two.close()
    assert budget.used == 0


def test_open_direct_refuses_a_name_that_is_another_file(part: tuple[int, int, str]) -> None:
    dirfd, fd, name = part
    os.rename(name, ".moved", src_dir_fd=dirfd, dst_dir_fd=dirfd)
    other = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dirfd)
    os.close(other)
    assert open_direct(dirfd, name, fd) is None


def test_a_chunk_size_not_block_aligned_gets_no_slots(part: tuple[int, int, str]) -> None:
    dirfd, fd, name = part
    budget = HeldMemory(lambda: 1 << 30)
    assert DirectWrites.open(dirfd, name, fd, ALIGN * 4 + 512, budget) is None
    with pytest.raises(ValueError, match="not a multiple of 4096"):
        DirectWrites(-1, ALIGN + 1, budget)
