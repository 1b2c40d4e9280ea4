"""Outgoing publishes: the record of one publish, and `Pipeline`, a window of QoS 1 publishes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from peerd.mqtt.errors import BrokerTimeout

__all__ = ["Admits", "Outgoing", "Pipeline", "as_bytes_view"]


class Outgoing:
    """One publish from admission to completion (written for QoS 0, acknowledged for QoS 1)."""

    __slots__ = (
        "callback",
        "cancelled",
        "drops",
        "dup",
        "mid",
        "payload",
        "qos",
        "retain",
        "topic",
        "waiter",
        "wired",
    )

    def __init__(  # noqa: PLR0917 - built once per publish: positional arguments are cheaper
        self,
        topic: bytes,
        payload: bytes | bytearray | memoryview,
        qos: int,
        retain: bool,
        waiter: asyncio.Future[None] | None,
        callback: Callable[[BaseException | None], None] | None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.waiter = waiter
        self.callback = callback
        self.mid = 0
        self.dup = False
        self.drops = 0  # connections lost while it awaited its PUBACK (see LinkCommon._blame)
        self.cancelled = False
        self.wired = False  # written on the current connection (QoS 1: awaiting its PUBACK)

    def complete(self, exc: BaseException | None = None) -> None:
        if self.callback is not None:
            cb, self.callback = self.callback, None
            cb(exc)
        w = self.waiter
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)


def as_bytes_view(payload: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    if type(payload) is memoryview and (payload.itemsize != 1 or not payload.c_contiguous):
        return payload.cast("B") if payload.c_contiguous else payload.tobytes()
    return payload


class Admits(Protocol):
    """What a Pipeline needs of the link."""

    def admit(self, rec: Outgoing) -> None: ...

    def topic_for(self, topic: str, payload: bytes | bytearray | memoryview) -> bytes: ...


class Pipeline:
    """Keeps up to `depth` QoS 1 publishes in flight without a task or future per message.

        async with link.pipeline(16) as pipe:
            for chunk in chunks:
                await pipe.publish(topic, chunk)   # waits only while `depth` are unacknowledged
        # leaving the block waits for the last acknowledgements

    Payload buffers may be reused once `acknowledged` has advanced past them: publishes are
    acknowledged in order (MQTT 3.1.1 section 4.6), so with `depth` in flight, buffer i can be
    reused when publish i + depth is admitted.
    """

    def __init__(self, link: Admits, depth: int) -> None:
        self._link = link
        self.depth = depth
        self.sent = 0
        self.acknowledged = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _done(self, exc: BaseException | None) -> None:
        self.acknowledged += 1
        if exc is not None and self._error is None:
            self._error = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, until_outstanding: int) -> None:
        while self.sent - self.acknowledged > until_outstanding and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error

    async def publish(
        self, topic: str, payload: bytes | bytearray | memoryview, *, retain: bool = False
    ) -> None:
        if self.sent - self.acknowledged >= self.depth or self._error is not None:
            await self._wait(self.depth - 1)
        payload = as_bytes_view(payload)
        link = self._link
        link.admit(Outgoing(link.topic_for(topic, payload), payload, 1, retain, None, self._done))
        self.sent += 1

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
        """Wait for every publish of this pipeline to be acknowledged."""
        try:
            async with asyncio.timeout(timeout):
                await self._wait(0)
        except TimeoutError:
            raise BrokerTimeout(
                f"{self.sent - self.acknowledged} pipelined publishes unacknowledged after"
                f" {timeout}s"
            ) from None

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.drain()
