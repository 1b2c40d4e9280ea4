"""Who is on the other end of a control connection: SO_PEERCRED and SO_PEERGROUPS, taken by the
kernel at connect time (so they cannot be raced), and the configured group."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Final

from peerd.control.wire import ControlError

_SO_PEERGROUPS: Final = int(getattr(socket, "SO_PEERGROUPS", 59))  # Linux >= 4.13


# --- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED and SO_PEERGROUPS of a connected Unix socket (OSError if unavailable)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid, _peer_groups(sock, uid, gid))


def _peer_groups(sock: socket.socket, uid: int, gid: int) -> tuple[int, ...]:
    size = struct.calcsize("I")
    for count in (64, 65536):  # NGROUPS_MAX is 65536
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, count * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                break
            raise
        return struct.unpack(f"{len(raw) // size}I", raw)
    # Kernels before 4.13: the groups the user database lists now (not those of the process).
    try:
        return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return ()


def resolve_group(group: str | int | None) -> int | None:
    """A group name or number to a gid (ControlError if the name is unknown)."""
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(
            f"control socket group {group!r} does not exist",
            hint="create the group or fix the control socket group in the configuration",
        ) from None


__all__ = ["PeerCredentials", "peer_credentials", "resolve_group"]
