"""Telling systemd how the daemon is doing (sd_notify), without libsystemd.

The protocol is small enough to speak directly: one datagram of newline-separated `KEY=VALUE`
assignments to the Unix socket named by $NOTIFY_SOCKET (a path, or an abstract-namespace name
written with a leading `@`). Without $NOTIFY_SOCKET (not started by systemd, or not
`Type=notify`) every call is a no-op that returns False.

    notifier = Notifier.from_environ()
    ...                                   # open the store, bind the control socket
    notifier.ready("serving 3 sessions")
    interval = watchdog_interval()        # WatchdogSec= of the unit, if any
    if interval is not None:
        tg.create_task(watchdog_loop(notifier, interval), name="watchdog")
    ...
    notifier.stopping()

Notification failures are logged and otherwise ignored: telling systemd about our state must
never be what brings the daemon down (if READY=1 is lost, systemd's start timeout reports it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

log = logging.getLogger("peerd.systemd")

MAX_STATUS: Final = 512  # characters of STATUS= text; systemd shows one short line


class Notifier:
    """A connection to systemd's notification socket, or a no-op when there is none."""

    def __init__(self, address: str | None) -> None:
        """`address`: the value of $NOTIFY_SOCKET (a path, or `@name` for the abstract
        namespace); None disables notification."""
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            # vsock: and relative paths are for VMs and containers peerd does not target.
            log.warning("ignoring NOTIFY_SOCKET=%r: not a Unix socket path", address)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` assignments in one datagram. True if systemd's socket took it."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        if b"\0" in message:
            raise ValueError("a notification cannot contain NUL bytes")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            # Non-blocking: if systemd's queue is full, the notification is lost rather than
            # the event loop stalled.
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("systemd notification %r failed: %s", assignments[:1], exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete: systemd considers the service started (Type=notify)."""
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload (SIGHUP) began; send `ready()` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began."""
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """The daemon is alive: resets systemd's watchdog timer (WatchdogSec=)."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """One line shown by `systemctl status`."""
        return self.notify(*_status(text))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    if text is None:
        return []
    line = " ".join(text.replace("\0", " ").split())[:MAX_STATUS]
    return [f"STATUS={line}"]


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds systemd expects pings within, or None when there is no
    watchdog for this process (unset, malformed, zero, or meant for another pid)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


async def watchdog_loop(
    notifier: Notifier,
    interval: float,
    healthy: Callable[[], bool] | None = None,
) -> None:
    """Ping the watchdog every `interval / 2` seconds (as systemd recommends) until cancelled.

    `healthy` (if given) is asked before each ping; a daemon that reports itself unhealthy
    stops being pinged, and systemd restarts it when the interval runs out.
    """
    period = interval / 2
    while True:
        if healthy is None or healthy():
            notifier.watchdog()
        else:
            log.error("daemon unhealthy: withholding the systemd watchdog ping")
        await asyncio.sleep(period)


__all__ = ["Notifier", "watchdog_interval", "watchdog_loop"]
