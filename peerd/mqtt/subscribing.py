"""The subscribing half of `MqttLink` (a base class of it, sharing its connection state):
subscribe, unsubscribe, and the broker's answers to both."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from peerd.mqtt.common import LinkCommon
from peerd.mqtt.errors import BrokerTimeout, SubscribeRefused
from peerd.mqtt.subscription import Message, Subscription

if TYPE_CHECKING:
    from peerd.mqtt.conn import Conn
    from peerd.mqtt.outgoing import Outgoing

__all__ = ["Pending", "Subscribing"]

log = logging.getLogger("peerd.mqtt")


class Pending:
    """A SUBSCRIBE (`kind` 9, answered by SUBACK) or UNSUBSCRIBE (11, by UNSUBACK) in flight."""

    __slots__ = ("filters", "kind", "waiter")

    def __init__(self, kind: int, filters: list[str], waiter: asyncio.Future[bytes] | None) -> None:
        self.kind = kind
        self.filters = filters
        self.waiter = waiter


class Subscribing(LinkCommon):
    _conn: Conn | None
    _pending: dict[int, Pending]
    _unacked: dict[int, Outgoing]
    _next_mid: int

    def _alloc_mid(self) -> int:
        """A packet id free among publishes awaiting PUBACK and (un)subscribes in flight."""
        mid = self._next_mid
        while True:
            mid = mid % 65535 + 1
            if mid not in self._unacked and mid not in self._pending:
                self._next_mid = mid
                return mid

    async def subscribe(
        self,
        topic_filter: str,
        *,
        qos: int = 1,
        handler: Callable[[Message], None] | None = None,
        max_messages: int = 1024,
        max_bytes: int = 16 << 20,
        timeout: float | None = None,  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
    ) -> Subscription:
        """Subscribe and return once the broker confirmed it (waiting through an outage).

        The subscription is restored after every reconnect until closed. Messages beyond
        `max_messages` or `max_bytes` queued are dropped and counted.
        """
        sub, qos = self._new_subscription(topic_filter, qos, handler, max_messages, max_bytes)
        conn = self._conn
        if conn is not None:
            self._send_subscribe(conn, topic_filter, qos, None)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(sub._confirmed)
        except TimeoutError:
            self._abandon(sub)
            raise BrokerTimeout(
                f"the broker at {self.settings.url} did not confirm the subscription to"
                f" {topic_filter!r} within {timeout}s"
            ) from None
        except BaseException:
            self._abandon(sub)
            raise
        return sub

    def _abandon(self, sub: Subscription) -> None:
        """A subscribe() given up on: its SUBACK may still come, so unsubscribe too."""
        if self._routes.drop(sub) and self._conn is not None and not self._closing:
            self._send_unsubscribe(self._conn, [sub.filter], None)

    def _send_subscribe(
        self, conn: Conn, topic_filter: str, qos: int, waiter: asyncio.Future[bytes] | None
    ) -> None:
        mid = self._alloc_mid()
        self._pending[mid] = Pending(9, [topic_filter], waiter)
        conn.codec.subscribe(mid, [(topic_filter, qos)])
        conn.flush()

    def _send_unsubscribe(
        self, conn: Conn, filters: list[str], waiter: asyncio.Future[bytes] | None
    ) -> None:
        mid = self._alloc_mid()
        self._pending[mid] = Pending(11, filters, waiter)
        conn.codec.unsubscribe(mid, filters)
        conn.flush()

    def on_suback(self, mid: int, codes: bytes) -> None:
        p = self._pending.get(mid)
        if p is None or p.kind != 9 or len(codes) != len(p.filters):
            return  # not for a SUBSCRIBE of ours: ignored
        del self._pending[mid]
        for topic_filter, code in zip(p.filters, codes, strict=True):
            for sub in list(self._routes.by_filter.get(topic_filter, ())):
                if code >= 0x80 and sub._confirmed.done():
                    # Confirmed before, refused while restored after a reconnect (a NATS
                    # cluster whose JetStream is still electing): kept; `_restore` fails the
                    # connection and the link tries again.
                    continue
                if code >= 0x80:
                    log.warning(
                        "broker %s refused the subscription to %r", self.settings.url, topic_filter
                    )
                    self._routes.drop(sub)
                    sub._confirm(
                        SubscribeRefused(
                            f"the broker at {self.settings.url} refused the subscription to"
                            f" {topic_filter!r}"
                        )
                    )
                else:
                    sub._confirm(None)
        if p.waiter is not None and not p.waiter.done():
            p.waiter.set_result(codes)

    def on_unsuback(self, mid: int) -> None:
        p = self._pending.get(mid)
        if p is None or p.kind != 11:
            return
        del self._pending[mid]
        self._routes.stale.difference_update(p.filters)
        if p.waiter is not None and not p.waiter.done():
            p.waiter.set_result(b"")

    async def _unsubscribe(self, sub: Subscription) -> None:
        if not self._routes.drop(sub):
            return
        conn = self._conn
        if conn is None or self._closing:
            return
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._send_unsubscribe(conn, [sub.filter], waiter)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await waiter
        except TimeoutError:
            raise BrokerTimeout(
                f"the broker at {self.settings.url} did not confirm unsubscribing from"
                f" {sub.filter!r}"
            ) from None
        except ConnectionError:
            pass  # with a clean session the broker forgot it; otherwise _restore finishes it
