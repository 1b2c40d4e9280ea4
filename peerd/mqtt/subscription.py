"""Subscriptions the link keeps across reconnects, the routing of incoming messages to them,
and the link's counters."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from peerd.mqtt.errors import BrokerError, LinkClosed
from peerd.mqtt.topics import topic_matches
from protocol.mqtt import Publish

__all__ = ["LinkStats", "Message", "Routes", "Subscription"]

# A message received from the broker: the codec's event, handed on as it is (no second object).
Message = Publish


@dataclass(slots=True)
class LinkStats:
    """Counters for `peerd status`; every drop has its reason."""

    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    published: int = 0
    published_bytes: int = 0
    retransmitted: int = 0
    received: int = 0
    received_bytes: int = 0
    dropped_queue_full: int = 0
    dropped_oversize: int = 0
    dropped_unsolicited: int = 0
    dropped_bad_topic: int = 0
    handler_errors: int = 0
    publish_refused: int = 0
    retain_refused: int = 0
    protocol_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Owner(Protocol):
    """What a subscription needs of the link that made it."""

    stats: LinkStats

    def _handler_failed(self, sub: Subscription) -> None: ...

    async def _unsubscribe(self, sub: Subscription) -> None: ...


class Subscription:
    """A subscription the link keeps across reconnects, with a bounded queue or a handler.

    Iterate it (`async for msg in sub`) or call `get()`; one consumer at a time. Iteration ends
    when the subscription or the link is closed; it raises `SubscribeRefused` if the broker
    refused the subscription after a reconnect. With a `handler`, messages are passed to it
    synchronously from the connection's read path instead: it must not block (no I/O, no await;
    hand work to a queue or task of your own) and its exceptions are counted, not propagated.
    """

    def __init__(
        self,
        link: _Owner,
        topic_filter: str,
        *,
        qos: int,
        handler: Callable[[Message], None] | None,
        max_messages: int,
        max_bytes: int,
    ) -> None:
        self.filter = topic_filter
        self.qos = qos
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.received = 0
        self.dropped = 0
        self._link = link
        self._handler = handler
        self._queue: deque[Message] = deque()
        self._queued_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._error: BrokerError | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._queue)

    def _deliver(self, msg: Message) -> None:
        self.received += 1
        handler = self._handler
        if handler is not None:
            try:
                handler(msg)
            except Exception:  # noqa: BLE001 - a handler's bug must not break the connection
                self._link._handler_failed(self)
            return
        size = len(msg.payload)
        if len(self._queue) >= self.max_messages or self._queued_bytes + size > self.max_bytes:
            self.dropped += 1
            self._link.stats.dropped_queue_full += 1
            return
        self._queue.append(msg)
        self._queued_bytes += size
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _confirm(self, error: BrokerError | None) -> None:
        if not self._confirmed.done():
            if error is None:
                self._confirmed.set_result(None)
            else:
                self._confirmed.set_exception(error)
                self._confirmed.exception()  # retrieved here; the subscriber may be gone
        if error is not None:
            self._end(error)

    def _end(self, error: BrokerError | None) -> None:
        self._closed = True
        if error is not None and self._error is None:
            self._error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def get_nowait(self) -> Message | None:
        """The next queued message, or None."""
        if not self._queue:
            return None
        msg = self._queue.popleft()
        self._queued_bytes -= len(msg.payload)
        return msg

    async def get(self) -> Message:
        """The next message; raises `LinkClosed` (or the refusal) once closed and drained."""
        while not self._queue:
            if self._closed:
                raise self._error or LinkClosed(f"subscription {self.filter!r} is closed")
            if self._waiter is not None:
                raise RuntimeError("a Subscription has one consumer at a time")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._queue.popleft()
        self._queued_bytes -= len(msg.payload)
        return msg

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except LinkClosed:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        """Unsubscribe (at the broker too, once no other subscription uses the filter)."""
        await self._link._unsubscribe(self)


class Routes:
    """The link's subscriptions by filter, and which of them a topic reaches (cached).

    A topic reaches the subscriptions whose filter is that topic (a dict lookup) and those of
    the wildcard filters that match it. Scanning every filter for every new topic cost a node
    ~13% of its read path under a flood of distinct topics (each a cache miss) once it
    subscribed to the exact index topic of each of its peers (peerd/revocation_index.py)."""

    def __init__(self) -> None:
        self.subs: list[Subscription] = []
        self.by_filter: dict[str, list[Subscription]] = {}
        self.stale: set[str] = set()  # unsubscribed locally, not yet at the broker
        self._cache: dict[str, tuple[Subscription, ...]] = {}
        # Those with a + or # in their filter, each with its prefix where the filter is one
        # followed by `/#` (no +): then a topic matches if it starts with the prefix and `/`,
        # or is the prefix itself, a string test instead of splitting both.
        self._wild: list[tuple[Subscription, str | None]] = []

    def add(self, sub: Subscription) -> int:
        """Register `sub`; the QoS its filter must now be subscribed at."""
        self.subs.append(sub)
        f = sub.filter
        if "+" in f or "#" in f:
            plain = f.endswith("/#") and "+" not in f and "#" not in f[:-2]
            self._wild.append((sub, f[:-2] if plain else None))
        subs = self.by_filter.setdefault(sub.filter, [])
        subs.append(sub)
        self.stale.discard(sub.filter)
        self._cache.clear()
        return max(s.qos for s in subs)

    def drop(self, sub: Subscription) -> bool:
        """Forget a subscription locally; True when its filter is now unused."""
        with contextlib.suppress(ValueError):
            self.subs.remove(sub)
        self._wild = [w for w in self._wild if w[0] is not sub]
        sub._end(None)
        subs = self.by_filter.get(sub.filter)
        if subs is None:
            return False
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        self._cache.clear()
        if subs:
            return False
        del self.by_filter[sub.filter]
        self.stale.add(sub.filter)
        return True

    def clear(self) -> None:
        self.subs.clear()
        self.by_filter.clear()
        self._cache.clear()
        self._wild.clear()

    def deliver(self, msg: Message, stats: LinkStats) -> None:
        stats.received += 1
        stats.received_bytes += len(msg.payload)
        topic = msg.topic
        subs = self._cache.get(topic)
        if subs is None:
            # A published topic holds no wildcard, so a filter equal to it is an exact one.
            exact = self.by_filter.get(topic, ())
            wild = [
                s
                for s, prefix in self._wild
                if (
                    topic_matches(s.filter, topic)
                    if prefix is None
                    else topic.startswith(prefix) and topic[len(prefix) : len(prefix) + 1] in "/"
                )
            ]
            if exact and wild:  # both: in subscription order
                hit = {id(s) for s in (*exact, *wild)}
                subs = tuple(s for s in self.subs if id(s) in hit)
            else:
                subs = tuple(exact or wild)
            if len(self._cache) >= 4096:  # topics come from outside: bound the cache
                self._cache.clear()
            self._cache[topic] = subs
        if not subs:
            stats.dropped_unsolicited += 1
            return
        for sub in subs:
            sub._deliver(msg)
