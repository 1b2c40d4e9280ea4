"""What both implementations of the transport port share: state, waiting for the connection,
reporting failures and state changes, and making subscriptions. `MqttLink` and `AiomqttLink`
derive from `LinkCommon`; each keeps its own connection handling."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from peerd.mqtt.errors import BrokerError, BrokerLimitError, BrokerTimeout, LinkClosed
from peerd.mqtt.limits import LinkLimits
from peerd.mqtt.probe import Probed, ProbePlan, probe_packet_limit
from peerd.mqtt.settings import Backoff, BrokerSettings
from peerd.mqtt.subscription import LinkStats, Message, Routes, Subscription
from peerd.mqtt.topics import check_filter
from peerd.mqtt.urls import BrokerSet

__all__ = ["LinkCommon"]

log = logging.getLogger("peerd.mqtt")
T = TypeVar("T")

# Connections lost with the same publish in flight before it is failed as too large (_blame).
DROPS_TO_BLAME = 3
# Nor is a publish this small ever blamed: peerd needs the broker to carry its 16 KiB chunks
# anyway, and a revocation or a session frame lost to a run of outages would cost far more.
NEVER_BLAMED = 16 << 10


class LinkCommon:
    """The shared half of a broker link; subclasses provide `run()` and `close()`.

    `settings` is the broker in use; given a `BrokerSet` (several URLs), the link moves to the
    next one after every failed attempt and every lost connection (`_pause_before_reconnect`).
    """

    def __init__(
        self,
        settings: BrokerSettings | BrokerSet,
        *,
        on_state: Callable[[bool], None] | None,
        backoff: Backoff | None,
    ) -> None:
        self.brokers = settings if isinstance(settings, BrokerSet) else BrokerSet([settings])
        self.settings = self.brokers.current
        self.stats = LinkStats()
        self.backoff = backoff or Backoff()
        self.last_error: BrokerError | None = None
        self._limits = LinkLimits(max_packet_size=self.settings.max_packet_size)
        self._unprobed = self._limits  # the limits the last connect gave, before a probe's
        # Set by the owner before run(): probe each broker URL's packet limit (probe.py).
        self.probe_plan: ProbePlan | None = None
        self._found: dict[str, int | None] = {}  # per broker URL: what its probe found
        self._probing: asyncio.Task[None] | None = None
        self._on_state = on_state
        self._routes = Routes()
        self._up = False  # connected, subscriptions restored: publishes may be sent
        self._closing = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Future[None] | None = None  # set by close(): ends every wait in run()
        self._state_waiters: list[asyncio.Future[None]] = []
        self._handler_errors_logged = 0
        # The largest payload the broker in use acknowledged at QoS 1: a publish no larger
        # cannot be what makes it close the connection (_blame).
        self._acked_max = 0

    async def run(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def closing(self) -> bool:
        """True once `close()` was called or `run()` was cancelled."""
        return self._closing

    def _stopping(self) -> bool:  # a call, so mypy does not narrow it across awaits
        return self._closing

    async def _until_stopped(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro`, unless close() comes first: then cancel it and raise LinkClosed."""
        assert self._stop is not None
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait((task, self._stop), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task
            raise LinkClosed("the broker link was closed")
        return task.result()

    async def _pause_before_reconnect(self) -> None:
        """Wait the backoff's next delay, or until `close()`. Each successful connect resets
        the backoff, so the delay grows only over attempts that failed in a row."""
        stop = self._stop
        assert stop is not None  # run() made it before its first attempt
        left = self.settings.url
        why = str(self.last_error) if self.last_error is not None else "the connection was lost"
        self.settings = self.brokers.leave(why)
        if self.settings.url != left:
            self._acked_max = 0  # another broker, perhaps another limit
        delay = self.backoff.next_delay()
        if self.settings.url != left:
            log.info("broker %s left (%s); trying %s in %.2fs", left, why, self.settings.url, delay)
        else:
            log.info("broker %s: reconnecting in %.2fs", left, delay)
        await asyncio.wait((stop,), timeout=delay)

    def _connected(self) -> None:
        """A connection is up: the backoff and the broker's reason to be left start over."""
        self.brokers.connected()
        # The next outage starts the sequence over, however short this connection lives
        # (issue 12: restarts in a row stalled transfers 9-28 s).
        self.backoff.reset()

    @property
    def limits(self) -> LinkLimits:
        """The limits in force on the current (or last) connection."""
        return self._limits

    # -- a publish the broker closes the connection for --

    def _blame(self, size: int, drops: int) -> BrokerLimitError | None:
        """The error for a QoS 1 publish of `size` bytes that was in flight when the connection
        dropped `drops` times, if it is to blame: a broker that cannot tell its packet limit
        (Mosquitto's `max_packet_size` to a 3.1.1 client) closes the connection on a larger
        packet, and resending it after every reconnect would loop for ever while the publisher
        waits. A size the broker acknowledged before is never blamed, nor one of at most 16 KiB,
        so an outage (which drops every publish in flight) does not fail the small ones; the
        probe looks for the limit again, so that what comes next fits."""
        if drops < DROPS_TO_BLAME or size <= max(self._acked_max, NEVER_BLAMED):
            return None
        self.stats.publish_refused += 1
        log.warning(
            "broker %s: dropped the connection %d times with a %d-byte publish in flight;"
            " failing it",
            self.settings.url,
            drops,
            size,
        )
        self.reprobe()
        return BrokerLimitError(
            f"the broker at {self.settings.url} closed the connection {drops} times with a"
            f" {size}-byte publish in flight and acknowledged none larger than"
            f" {self._acked_max} bytes: it likely refuses packets this large"
        )

    # -- the packet limit probe (peerd/mqtt/probe.py) --

    def _with_found(self, limits: LinkLimits) -> LinkLimits:
        """`limits` of a new connection, lowered to what a probe found on this broker URL."""
        self._unprobed = limits
        found = self._found.get(self.settings.url)
        if found is not None and found < limits.max_packet_size:
            return dataclasses.replace(limits, max_packet_size=found, source="probe")
        return limits

    def _start_probe(self) -> None:
        """Probe the broker in use, once per URL (called when a connection comes up)."""
        plan, url = self.probe_plan, self.settings.url
        if plan is None or url in self._found or self._probing is not None or self._closing:
            return
        self._probing = asyncio.create_task(self._probe(url, plan), name=f"mqtt-probe {url}")

    async def _probe(self, url: str, plan: ProbePlan) -> None:
        try:
            # Both clients have what the probe uses; LinkCommon only declares their shared half.
            found = await probe_packet_limit(cast(Probed, self), plan)
        except BrokerError as exc:
            log.info("broker %s: packet limit not probed (%s); next connect", url, exc)
            return
        finally:
            self._probing = None
        self._found[url] = found
        if found is None:
            log.info("broker %s: carries every chunk size (probe)", url)
            return
        log.warning(
            "broker %s: passes no PUBLISH above %d bytes (found by a probe; it said nothing):"
            " transfers use chunks that fit",
            url,
            found,
        )
        if url == self.settings.url:
            self._limits = self._with_found(self._unprobed)

    async def settled(self, timeout: float) -> LinkLimits:  # noqa: ASYNC109 - a bound, not a failure
        """The limits in force, once a probe under way has finished (at most `timeout` s)."""
        task = self._probing
        if task is not None:
            await asyncio.wait((task,), timeout=timeout)
        return self._limits

    def reprobe(self) -> None:
        """Forget what the probe found on the broker in use and probe it again: chunks that
        fitted went nowhere, so its limit may have changed since."""
        self._found.pop(self.settings.url, None)
        self._limits = self._unprobed
        if self._up:
            self._start_probe()

    @property
    def subscriptions(self) -> list[str]:
        return list(self._routes.by_filter)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=f"mqtt-link {self.settings.url}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
        """Return once connected; raise at once if the last attempt failed for good."""
        if self._up:
            return
        if self._closed:
            raise LinkClosed("the broker link is closed")
        if self.last_error is not None and self.last_error.permanent:
            raise self.last_error
        waiter = asyncio.get_running_loop().create_future()
        self._state_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            why = f": {self.last_error}" if self.last_error else ""
            raise BrokerTimeout(
                f"not connected to the broker at {self.settings.url} after {timeout}s{why}"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._state_waiters.remove(waiter)

    def _failed(self, exc: BrokerError) -> None:
        self.last_error = exc
        self.stats.connect_failures += 1
        if exc.permanent:
            log.warning("broker %s: %s", self.settings.url, exc.one_line())
            for w in self._state_waiters:
                if not w.done():
                    w.set_exception(exc)
        else:
            log.info("broker %s: %s", self.settings.url, exc)

    def _notify(self, up: bool) -> None:
        if self._on_state is not None:
            try:
                self._on_state(up)
            except Exception:
                log.exception("the broker state callback failed")

    def _new_subscription(
        self,
        topic_filter: str,
        qos: int,
        handler: Callable[[Message], None] | None,
        max_messages: int,
        max_bytes: int,
    ) -> tuple[Subscription, int]:
        """A checked, registered subscription, and the QoS its filter must now have."""
        if qos not in (0, 1):
            raise ValueError("peerd subscribes at QoS 0 or 1")
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("a subscription queue needs room for at least one message")
        check_filter(topic_filter)
        if self._closing:
            raise LinkClosed("the broker link is closed")
        sub = Subscription(
            self,
            topic_filter,
            qos=qos,
            handler=handler,
            max_messages=max_messages,
            max_bytes=max_bytes,
        )
        return sub, self._routes.add(sub)

    async def _unsubscribe(self, sub: Subscription) -> None:
        raise NotImplementedError

    def _handler_failed(self, sub: Subscription) -> None:
        self.stats.handler_errors += 1
        # A flood must not become a log flood: the first few, then every 1000th.
        n = self._handler_errors_logged = self._handler_errors_logged + 1
        if n <= 5 or n % 1000 == 0:
            log.exception("the handler of subscription %r failed (%d so far)", sub.filter, n)

    def _check_publish(self, topic: str, payload_len: int, qos: int, header: int = 8) -> None:
        """A publish fits the packet limit in force, has a valid topic name and QoS."""
        if qos not in (0, 1):
            raise ValueError("peerd publishes at QoS 0 or 1")
        limit = self._limits.max_packet_size  # configured, the broker's, or probed if smaller
        raw = topic.encode()
        if payload_len + len(raw) + header > limit:
            raise ValueError(
                f"a {payload_len}-byte payload exceeds the broker packet limit of {limit} bytes"
            )
        if not raw or len(raw) > 65535 or "+" in topic or "#" in topic or "\0" in topic:
            raise ValueError(f"invalid MQTT topic name {topic!r}")
