"""Transfers that ended: kept for a day so that `peerd transfers` lists them, `wait` and
`receive` find them, and a late Seal from a sender is answered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peerd.host import Host

KEEP_FINISHED = 24 * 3600.0  # finished transfers are listed (and late Seals answered) this long


class Outcomes:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.finished: dict[bytes, dict[str, Any]] = {}
        self._done_event = asyncio.Event()

    def done(self, tid: bytes, result: dict[str, Any]) -> None:
        """Record how a transfer ended, wake whoever waits for one, and say so to subscribers."""
        self.finished[tid] = result
        self._done_event.set()
        self._done_event = asyncio.Event()
        self.host.publish_event("transfer.done", result)

    def expire(self, now: float) -> None:
        cutoff = now - KEEP_FINISHED
        for tid, rec in list(self.finished.items()):
            if rec.get("finished_at", 0) < cutoff:
                del self.finished[tid]

    async def received(
        self, *, since: float, peer: str | None, name: str | None, within: float
    ) -> dict[str, Any] | None:
        """The first file received and verified since `since` (from `peer`, named `name`),
        waiting up to `within` seconds for one."""
        deadline = time.monotonic() + within
        while True:
            for rec in sorted(self.finished.values(), key=lambda r: r["finished_at"]):
                if (
                    rec["direction"] == "receive"
                    and rec["state"] == "verified"
                    and rec["finished_at"] >= since
                    and (peer is None or rec["peers"] == [peer])
                    and (name is None or rec["name"] == name)
                ):
                    return rec
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done_event.wait(), remaining)
