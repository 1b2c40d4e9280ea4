"""The daemon's store work, in lanes by value, and its log lines, within a budget.

Work of different value never shares one queue that drops (docs/SECURITY.md 3.5). Under a
flood, one queue for everything drops whatever comes next - a peer's revocation, the record of
a session that is already live, an invite's consumption - as readily as the junk. So:

- **urgent**: session records (a session up is recorded, an invite consumed) and other work
  whose loss would leave state behind that the store does not know. Never dropped: its
  producers are bounded by the session layer's handshake limits; at the hard cap `urgent()`
  says no and the caller must refuse the work at its source (close the session) instead.
- **statements**: revocation statements, one small FIFO lane per publisher (the broker's
  `rev/<publisher>/` level, which the shipped ACL confines to that account; or the peer that
  pushed it in a session), served round-robin, deduplicated by statement id and rate-limited per
  publisher. A flood fills its own publisher's lane and bucket, never another's.
- **bulk**: channel messages, acknowledgements, transfer bookkeeping. Bounded; beyond the bound
  it drops and counts. What it carries is retransmitted by its sender (an unacknowledged
  message stays in the sender's outbox), so a drop costs time, not data.

The event task takes urgent work first, then alternates statements and bulk so neither starves.

`LogBudget` is the log side of the same rule: a flood must not become a log flood.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from peerd.logs import log_event
from protocol.session import TokenBucket

Work = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LaneLimits:
    bulk: int = 10_000  # bulk work waiting; beyond it: drop and count
    urgent: int = 100_000  # hard cap of urgent work (never reached by handshake-limited peers)
    statements_per_lane: int = 64  # pending statements of one publisher
    lanes: int = 4096  # publishers with pending statements at once
    statement_rate: float = 4.0  # statements a publisher gets processed per second, sustained
    statement_burst: float = 64.0  # ... and at once (a reconnect delivers all retained ones)
    remembered: int = 8192  # statement ids already applied, not processed again


def _refilled(bucket: TokenBucket, now: float) -> bool:
    return bucket.tokens + (now - bucket.stamp) * bucket.rate >= bucket.burst


class EventLanes:
    """Three lanes of store work for one consumer (the daemon's event task)."""

    def __init__(
        self, limits: LaneLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.limits = limits or LaneLimits()
        self._clock = clock
        self._urgent: deque[Work] = deque()
        self._bulk: deque[Work] = deque()
        self._lanes: OrderedDict[str, deque[tuple[str, Work]]] = OrderedDict()
        self._pending_ids: set[str] = set()
        self._applied: OrderedDict[str, None] = OrderedDict()
        self._buckets: dict[str, TokenBucket] = {}
        self._ready = asyncio.Event()
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._statement_turn = False

    def __len__(self) -> int:
        return len(self._urgent) + len(self._bulk) + sum(len(q) for q in self._lanes.values())

    def depths(self) -> dict[str, int]:
        """Work waiting in each lane (metrics, `peerd status`)."""
        statements = sum(len(q) for q in self._lanes.values())
        return {"urgent": len(self._urgent), "statements": statements, "bulk": len(self._bulk)}

    def _added(self) -> None:
        self._unfinished += 1
        self._idle.clear()
        self._ready.set()

    def urgent(self, work: Work) -> bool:
        if len(self._urgent) >= self.limits.urgent:
            return False
        self._urgent.append(work)
        self._added()
        return True

    def bulk(self, work: Work) -> bool:
        if len(self._bulk) >= self.limits.bulk:
            return False
        self._bulk.append(work)
        self._added()
        return True

    def statement(self, publisher: str, statement_id: str, work: Work) -> str | None:
        """Queue a statement's work in its publisher's lane; None, or why it was not queued
        ("duplicate", "rate-limited", "lane-full", "lanes-full")."""
        if statement_id in self._pending_ids or statement_id in self._applied:
            return "duplicate"
        lane = self._lanes.get(publisher)
        if lane is None and len(self._lanes) >= self.limits.lanes:
            return "lanes-full"
        if lane is not None and len(lane) >= self.limits.statements_per_lane:
            return "lane-full"
        if not self._take(publisher):
            return "rate-limited"
        if lane is None:
            lane = self._lanes[publisher] = deque()
        lane.append((statement_id, work))
        self._pending_ids.add(statement_id)
        self._added()
        return None

    def applied(self, statement_id: str) -> None:
        """The statement is in the store (or changed nothing there): never process it again."""
        self._applied[statement_id] = None
        self._applied.move_to_end(statement_id)
        while len(self._applied) > self.limits.remembered:
            self._applied.popitem(last=False)

    def _take(self, publisher: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(publisher)
        if bucket is None:
            cap = 2 * self.limits.lanes
            if len(self._buckets) >= cap:
                # Forget the publishers whose buckets refilled: they would start full anyway.
                self._buckets = {k: b for k, b in self._buckets.items() if not _refilled(b, now)}
                if len(self._buckets) >= cap:
                    return False
            bucket = TokenBucket(self.limits.statement_rate, self.limits.statement_burst, now)
            self._buckets[publisher] = bucket
        return bucket.take(now)

    def _next_statement(self) -> Work | None:
        if not self._lanes:
            return None
        publisher, lane = next(iter(self._lanes.items()))
        statement_id, work = lane.popleft()
        self._pending_ids.discard(statement_id)
        if lane:
            self._lanes.move_to_end(publisher)  # round-robin: the next publisher's turn
        else:
            del self._lanes[publisher]
        return work

    def _next(self) -> Work | None:
        if self._urgent:
            return self._urgent.popleft()
        self._statement_turn = not self._statement_turn
        if self._statement_turn or not self._bulk:
            work = self._next_statement()
            if work is not None:
                return work
        return self._bulk.popleft() if self._bulk else None

    async def get(self) -> Work:
        while True:
            work = self._next()
            if work is not None:
                return work
            self._ready.clear()
            await self._ready.wait()

    def task_done(self) -> None:
        self._unfinished -= 1
        if self._unfinished <= 0:
            self._unfinished = 0
            self._idle.set()

    async def join(self) -> None:
        await self._idle.wait()


class LogBudget:
    """Log lines within a budget: per key (a reason label) `burst` lines at once, then
    `per_second`; all keys together five times that. What it holds back is counted and said:
    the next line of the key, or `flush()`, reports how many similar lines it suppressed."""

    MAX_KEYS = 256

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: float = 20.0,
        per_second: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst, self.per_second = burst, per_second
        self._clock = clock
        self._total = TokenBucket(5 * per_second, 5 * burst, clock())
        self._buckets: dict[str, TokenBucket] = {}
        self._held: Counter[str] = Counter()
        self.suppressed = 0  # lines suppressed in all, for `peerd status`

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg % args` at `level` if the budget allows; True if it did."""
        if not self.logger.isEnabledFor(level):
            return False
        held = self._take(key)
        if held is None:
            return False
        if held:
            msg += " (%d similar line(s) suppressed)"
            args = (*args, held)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def event(self, level: int, key: str, event: str, **fields: Any) -> bool:
        """The event `event` (`peerd.logs.log_event`) at `level` if the budget allows; a line
        after suppressed ones says how many with `suppressed=N`. True if it was logged."""
        return self._event(level, key, event, fields, None)

    def event_detail(
        self, level: int, key: str, event: str, detail: str, args: tuple[object, ...], **fields: Any
    ) -> bool:
        """`event` with the field `detail=detail % args`, formatted only if the line is logged
        (under a flood nearly none is, and formatting each cost the read path ~1 us)."""
        return self._event(level, key, event, fields, (detail, args))

    def _event(
        self,
        level: int,
        key: str,
        event: str,
        fields: dict[str, Any],
        detail: tuple[str, tuple[object, ...]] | None,
    ) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        held = self._take(key)
        if held is None:
            return False
        if detail is not None:
            fields["detail"] = detail[0] % detail[1]
        if held:
            fields["suppressed"] = held
        log_event(self.logger, event, level, **fields)
        return True

    def _take(self, key: str) -> int | None:
        """None: over budget (counted); else how many lines of `key` were held back before."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_KEYS:
                key = "other"
            bucket = self._buckets.setdefault(key, TokenBucket(self.per_second, self.burst, now))
        if not (bucket.take(now) and self._total.take(now)):
            self._held[key] += 1
            self.suppressed += 1
            return None
        return self._held.pop(key, 0)

    def flush(self) -> None:
        """Say what is still held back (the flood ended before the key's next line)."""
        held, self._held = self._held, Counter()
        for key, n in sorted(held.items()):
            log_event(self.logger, "log.suppressed", logging.WARNING, about=key, lines=n)
