"""The file side of transfers: opening a source and watching it, the sender's inbox directory
(opened once, every name in it resolved from its fd), reserving space, the header check of a
`.safetensors` file, the durable, no-clobber final step of a received file (fsync, link into
place, fsync the directory), and the sweep of orphaned `.part` files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path

from peerd.errors import PeerdError
from protocol.safetensors import SafetensorsError, header_length, parse_header
from protocol.transfer import numbered_name

StatKey = tuple[int, int, int, int]  # size, mtime_ns, inode, device
PART_SUFFIX = ".part"
# `.<transfer id in hex>.part`: the temporary files this shell creates, and the only ones the
# start-up sweep removes.
PART_NAME = re.compile(r"\.[0-9a-f]{32}\.part")


class TransferError(PeerdError):
    """A transfer could not be started or failed."""


class UnsafeInbox(TransferError):
    """The sender's inbox directory, or a name in it, is not this daemon's to write: a symlink,
    someone else's directory, or a name planted before the file arrived."""


def stat_of(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def stat_key(values: list[int]) -> StatKey:
    """A StatKey read back from the store (a JSON list)."""
    size, mtime, ino, dev = values
    return (size, mtime, ino, dev)


def open_source(path: Path) -> tuple[int, os.stat_result]:
    """Open a file to send. O_NONBLOCK: opening a FIFO would otherwise block (on the event
    loop) until a writer comes; with it the open returns and the fstat refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(
                f"{path} is not a regular file",
                hint="send a regular file (not a FIFO, device, socket or directory)",
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def source_problem(fd: int, path: Path, expected: StatKey, sent: int) -> str | None:
    """Why the file being sent is no longer the one offered, if it is not: its size or mtime
    changed (every call), or its name now points at another file (every 64th)."""
    st = stat_of(os.fstat(fd))
    if st[:2] != expected[:2]:
        return "the file changed while it was being sent (size or modification time)"
    if sent % 64 == 0:
        try:
            on_disk = stat_of(os.stat(path))
        except OSError:
            return "the file was removed while it was being sent"
        if on_disk[2:] != expected[2:]:
            return "the file was replaced while it was being sent"
    return None


def reserve(fd: int, size: int) -> None:
    """Reserve `size` bytes for a file being received (OSError when there is no room), so a
    full disk is found before the transfer starts, not in its middle. PEERD_NO_FALLOC skips it
    (file systems without fallocate)."""
    if size and os.environ.get("PEERD_NO_FALLOC") is None:
        os.posix_fallocate(fd, 0, size)


def open_inbox(root: Path, peer: str) -> int:
    """A directory fd for the inbox of files from `peer`, under `root` (the configured inbox,
    which the operator chose). The per-sender directory is created if missing and must be a
    real directory (not a symlink a local user planted) owned by this user and not writable by
    others; every name in it is then resolved from the fd."""
    root.mkdir(parents=True, exist_ok=True, mode=0o750)
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(peer, 0o750, dir_fd=rootfd)
        try:
            fd = os.open(
                peer, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rootfd
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeInbox(f"{root / peer} is not a directory (a symlink?)") from exc
            raise
    finally:
        os.close(rootfd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWOTH:
        os.close(fd)
        raise UnsafeInbox(f"{root / peer} belongs to uid {st.st_uid} or is writable by others")
    return fd


def create_part(directory: Path, dirfd: int, name: str) -> int:
    """A new temporary file `name` in the inbox `directory` (open at `dirfd`). O_EXCL |
    O_NOFOLLOW: a name planted in the inbox (a symlink, a file) is refused, never written
    through; the transfer id in the name is fresh, so a clean inbox has no such name."""
    try:
        return os.open(
            name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o640,
            dir_fd=dirfd,
        )
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ELOOP):
            raise UnsafeInbox(f"{directory / name} exists already (planted?)") from exc
        raise


def safetensors_problem(fd: int, size: int) -> str | None:
    """Why the safetensors file open at `fd` is malformed, or None. Runs in a worker thread
    and closes `fd` (its own duplicate)."""
    try:
        n = header_length(os.pread(fd, 8, 0), size)
        parse_header(os.pread(fd, 8 + n, 0), size)
    except SafetensorsError as exc:
        return f"malformed safetensors header ({exc.reason}): {exc}"
    except OSError as exc:
        return f"reading the header failed: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def link_unique(dirfd: int, temp: str, name: str) -> str:
    """Give the verified temporary file (`temp`, in the directory `dirfd`) its name without
    ever replacing an existing file: `model.safetensors`, else `model-2.safetensors`,
    `model-3...`, shortened to fit the file system's name limit (see `numbered_name`). link(2)
    fails if the name is taken, so there is no check-then-rename race, and it does not follow
    a symlink planted at either name."""
    try:
        name_max = os.fpathconf(dirfd, "PC_NAME_MAX")
    except OSError:
        name_max = 255
    for n in range(1, 10_000):
        candidate = numbered_name(name, n, name_max=name_max)
        try:
            os.link(temp, candidate, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(temp, dir_fd=dirfd)
        return candidate
    raise OSError(errno.EEXIST, "no free name for the received file")


def commit_file(fd: int, dirfd: int, temp: str, name: str) -> str:
    """The final step of a verified file: fsync it, link it into place under a free name,
    fsync the directory. Returns the final name (in the directory `dirfd`)."""
    os.fsync(fd)
    final = link_unique(dirfd, temp, name)
    os.fsync(dirfd)
    return final


def find_parts(root: Path, most: int = 100_000) -> list[tuple[str, str, int]]:
    """(sender directory, name, size) of the `.<id>.part` regular files under `root/<sender>/`
    (at most `most`); symlinks and other files are not listed."""
    found: list[tuple[str, str, int]] = []
    try:
        rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return found
    try:
        for sender in os.scandir(rootfd):
            if not sender.is_dir(follow_symlinks=False):
                continue
            try:
                dirfd = os.open(
                    sender.name,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=rootfd,
                )
            except OSError:
                continue
            try:
                for entry in os.scandir(dirfd):
                    if PART_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            size = entry.stat(follow_symlinks=False).st_size
                            found.append((sender.name, entry.name, size))
                            if len(found) >= most:
                                return found
            finally:
                os.close(dirfd)
    finally:
        os.close(rootfd)
    return found


def remove_part(root: Path, sender: str, name: str) -> bool:
    """Unlink `root/sender/name` without following a symlink at any step; False if it could
    not (gone already, the directory replaced meanwhile)."""
    try:
        dirfd = open_inbox(root, sender)
    except (UnsafeInbox, OSError):
        return False
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        return False
    finally:
        os.close(dirfd)
    return True
