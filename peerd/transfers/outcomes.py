"""Transfers that ended: kept for a day so that `peerd transfers` lists them, `wait` and
`receive` find them, and a late Seal from a sender is answered."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.logs import log_event
from peerd.waiting import wait_set

if TYPE_CHECKING:
    from peerd.host import Host

log = logging.getLogger("peerd.transfers")

KEEP_FINISHED = 24 * 3600.0  # finished transfers are listed (and late Seals answered) this long


@dataclass(slots=True)
class TransferStats:
    """Counters since start, for `peerd status` and the metrics: chunk payload (file) bytes,
    so a transfer moves `bytes_sent` and `bytes_received` by the file's size (plus re-sends)."""

    chunks_sent: int = 0
    bytes_sent: int = 0
    chunks_resent: int = 0
    bytes_resent: int = 0
    chunks_received: int = 0
    bytes_received: int = 0
    chunks_direct: int = 0  # of those, written past the page cache (O_DIRECT)
    bytes_reused: int = 0  # copied from local files by a delta instead of received
    started: Counter[str] = field(default_factory=Counter)  # by direction
    finished: Counter[str] = field(default_factory=Counter)  # "<direction> <state>"

    def sent(self, n: int, *, resent: bool) -> None:
        self.chunks_sent += 1
        self.bytes_sent += n
        if resent:
            self.chunks_resent += 1
            self.bytes_resent += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "chunks_sent": self.chunks_sent,
            "bytes_sent": self.bytes_sent,
            "chunks_resent": self.chunks_resent,
            "bytes_resent": self.bytes_resent,
            "chunks_received": self.chunks_received,
            "bytes_received": self.bytes_received,
            "chunks_direct": self.chunks_direct,
            "bytes_reused": self.bytes_reused,
            "started": dict(self.started),
            "finished": dict(self.finished),
        }


class Outcomes:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.stats = TransferStats()
        self.finished: dict[bytes, dict[str, Any]] = {}
        self._done_event = asyncio.Event()

    def done(self, tid: bytes, result: dict[str, Any]) -> None:
        """Record how a transfer ended, wake whoever waits for one, and say so to subscribers."""
        self.finished[tid] = result
        self.stats.finished[f"{result['direction']} {result['state']}"] += 1
        state = result["state"]
        log_event(
            log,
            "transfer.done" if state == "verified" else f"transfer.{state}",
            logging.INFO if state == "verified" else logging.WARNING,
            id=result["id"],
            direction=result["direction"],
            name=result["name"],
            bytes=result["size"],
            peers=result["peers"],
            seconds=round(result.get("finished_at", time.time()) - result["started_at"], 3),
            reason=result.get("reason"),
            detail=result.get("detail"),
            receivers={p: r["state"] for p, r in result.get("receivers", {}).items()} or None,
        )
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
            await wait_set(self._done_event, remaining)
