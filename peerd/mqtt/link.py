"""The link to the MQTT broker: one long-lived, self-healing connection.

`MqttLink` keeps a connection to the broker up for as long as it runs: it reconnects with
exponential backoff and jitter, restores every subscription after each reconnect, retransmits
QoS 1 publishes the broker had not acknowledged, and holds what the owner publishes during an
outage in a bounded outbox. Incoming messages go to per-subscription bounded queues (or to a
synchronous handler), so a flood on one topic can neither grow memory nor starve another.

The wire is `protocol.mqtt.Connection` (sans-IO); `Conn` below only pumps it: asyncio reads
straight into the codec's buffer (`get_buffer`), the codec's events are dispatched here, and what
it has to send is written as it was given (a large payload is never joined to its header).

Why peerd speaks MQTT itself instead of wrapping aiomqtt/paho: both benchmarks of the product go
through here, and on this machine (1 GiB in 256 KiB chunks, 16 QoS 1 publishes in flight, same
broker) paho spent 1.05-1.33 s of CPU in the publisher where a direct asyncio protocol spent
0.42-0.65 s, and a three-message ping-pong took 0.55-0.72 ms (p50, QoS 0) through aiomqtt
against 0.30-0.35 ms directly. paho copies every payload twice on the way out (building the
packet, then slicing it for send()), reads each packet with two or more recv() calls, and aiomqtt
adds a task and an Event per publish and per received message. `scripts/bench_mqtt.py` keeps the
aiomqtt baseline measurable.

Delivery guarantees, precisely:
- QoS 1 publishes are delivered at least once while the link runs: one the broker has not
  acknowledged is sent again (DUP set, same packet id) after every reconnect. `publish()` returns
  when the broker acknowledged it. A PUBACK is not end-to-end delivery: the receiver may still
  drop it (full queue), so acknowledgement and flow control belong to the layer above.
- QoS 0 publishes are best effort: queued during an outage like QoS 1, but one written to a
  connection that then dies is lost.
- Incoming PUBLISH packets are acknowledged as soon as they are parsed. A subscription whose
  queue is full drops the message and counts it (`Subscription.dropped`, `LinkStats`); that is
  the answer to a flood from a rogue client, and legitimate traffic never meets it because the
  layer above grants credit within the queue's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable

from peerd.mqtt.conn import Conn
from peerd.mqtt.errors import (
    CONNACK_REASONS,
    BrokerError,
    BrokerLimitError,
    BrokerProtocolError,
    BrokerQueueFull,
    BrokerRefused,
    BrokerTimeout,
    BrokerTlsError,
    BrokerUnreachable,
    LinkClosed,
    client_certificate_error,
)
from peerd.mqtt.limits import LinkLimits
from peerd.mqtt.outgoing import Outgoing, Pipeline, as_bytes_view
from peerd.mqtt.settings import Backoff, BrokerSettings
from peerd.mqtt.subscribing import Pending, Subscribing
from peerd.mqtt.urls import BrokerSet
from peerd.mqtt.websocket import websocket_pump
from protocol.mqtt import (
    V5,
    V311,
    ConnAck,
    Disconnect,
    Publish,
)

__all__ = ["MqttLink"]

log = logging.getLogger("peerd.mqtt")


class MqttLink(Subscribing):
    """A self-healing connection to the broker. Run it with `run()` or `async with`.

    - `publish()` / `publish_nowait()` / `pipeline()` send; during an outage publishes wait in a
      bounded outbox (`max_queued` messages, `max_queued_bytes`); overflowing it raises
      `BrokerQueueFull`. At most `max_inflight` QoS 1 publishes await their PUBACK at once.
    - `subscribe()` returns a `Subscription` restored after every reconnect.
    - `on_state(up)` is called (synchronously) when the connection comes up (after CONNACK and
      after every subscription was restored) and when it goes down.

    Payloads are not copied: a bytearray or memoryview given to a QoS 1 publish must not be
    changed until the publish completes (it may be sent again after a reconnect).
    """

    def __init__(
        self,
        settings: BrokerSettings | BrokerSet,
        *,
        on_state: Callable[[bool], None] | None = None,
        backoff: Backoff | None = None,
        max_inflight: int = 256,
        max_queued: int = 4096,
        max_queued_bytes: int = 64 << 20,
    ) -> None:
        if not 1 <= max_inflight <= 60000 or max_queued < 1 or max_queued_bytes < 1:
            raise ValueError("invalid link limits")
        super().__init__(settings, on_state=on_state, backoff=backoff)
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._ssl: ssl.SSLContext | None = None
        self._conn: Conn | None = None  # after CONNACK: control packets may be sent
        self._outbox: deque[Outgoing] = deque()
        self._queued_bytes = 0
        self._unacked: dict[int, Outgoing] = {}  # QoS 1 publishes holding a packet id
        self._pending: dict[int, Pending] = {}
        self._next_mid = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._running = False
        self._version = self.settings.mqtt_version or V5
        self._keepalive = self.settings.keepalive  # the broker's Server Keep Alive overrides it

    # -- lifecycle --

    @property
    def queued(self) -> int:
        """Publishes waiting in the outbox."""
        return len(self._outbox)

    @property
    def unacked(self) -> int:
        """QoS 1 publishes sent (or to be re-sent) and not yet acknowledged."""
        return len(self._unacked)

    async def run(self) -> None:
        """Keep the connection up until `close()` or cancellation. Runs once per link."""
        if self._running or self._closed:
            raise RuntimeError("an MqttLink runs once")
        self._running = True
        self._stop = asyncio.get_running_loop().create_future()
        try:
            while not self.closing:
                conn: Conn | None = None
                try:
                    conn = await self._until_stopped(self._open())
                    await self._until_stopped(self._restore(conn))
                    if err := self._dropped(conn):  # between the two steps
                        raise err
                    self._set_up(conn)
                    self._connected()
                    await self._serve(conn)
                except LinkClosed:
                    pass
                except BrokerError as exc:
                    self._failed(exc)
                except asyncio.CancelledError:
                    self._closing = True
                    raise
                finally:
                    if conn is not None:
                        conn.finish(graceful=self._closing)
                        self.on_conn_lost(conn)
                if self._stopping():
                    break
                await self._pause_before_reconnect()
        finally:
            self._shutdown()

    async def close(self) -> None:
        """Stop: say DISCONNECT, fail what still waits with `LinkClosed`, end subscriptions.

        What was already written (QoS 0 publishes included) still goes out: the connection
        closes once its buffer is flushed (within `connect_timeout`).
        """
        self._closing = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        conn = self._conn
        if conn is not None:
            conn.finish(graceful=True)
            await asyncio.wait((conn.closed,), timeout=self.settings.connect_timeout)
            conn.abort()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not self._running:
            self._shutdown()

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
        """Wait until every publish was written and every QoS 1 publish acknowledged."""
        while self._outbox or self._unacked:
            if self._closed:
                raise LinkClosed("the broker link closed with publishes outstanding")
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise BrokerTimeout(
                    f"{len(self._outbox) + len(self._unacked)} publishes still outstanding"
                    f" after {timeout}s"
                ) from None

    # -- connection attempts --

    async def _open(self) -> Conn:
        """Connect at the protocol level that worked last (MQTT 5 first, unless configured):
        a broker that refuses 5 (CONNACK "unacceptable protocol version", or a close before any
        CONNACK) is asked again at once in 3.1.1, which is then kept for this link."""
        s = self.settings
        version = self._version
        try:
            return await self._open_at(version)
        except BrokerError as exc:
            refused = isinstance(exc, BrokerRefused) and exc.code in (0x01, 0x84)
            closed = isinstance(exc, BrokerUnreachable) and "closed the connection" in str(exc)
            if s.mqtt_version or version != V5 or not (refused or closed):
                raise
            log.info("broker %s: no MQTT 5 (%s); trying MQTT 3.1.1", s.url, exc)
        self._version = V311
        try:
            return await self._open_at(V311)
        except BrokerError:
            self._version = V5  # 3.1.1 failed too: the first attempt may have met a restart
            raise

    async def _open_at(self, version: int) -> Conn:
        s = self.settings
        if s.tls and self._ssl is None:
            self._ssl = s.ssl_context()
        tls = self._ssl if s.tls else None  # several URLs may mix mqtt:// and mqtts://
        loop = asyncio.get_running_loop()
        conn = Conn(self, version)
        factory: Callable[[], asyncio.BaseProtocol] = lambda: conn  # noqa: E731
        if s.websocket_path is not None:
            factory = websocket_pump(conn)
        try:
            async with asyncio.timeout(s.connect_timeout):
                await loop.create_connection(
                    factory,
                    s.host,
                    s.port,
                    ssl=tls,
                    server_hostname=s.host if tls else None,
                    ssl_handshake_timeout=s.connect_timeout if tls else None,
                )
                ack = await conn.connack
        except TimeoutError:
            conn.abort()
            raise BrokerTimeout(
                f"the broker at {s.url} did not accept the connection within {s.connect_timeout}s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            conn.abort()
            err = BrokerTlsError(
                f"the TLS certificate of the broker at {s.url} is not trusted:"
                f" {exc.verify_message or exc.reason}"
            )
            err.permanent = True
            raise err from exc
        except ssl.SSLError as exc:
            conn.abort()
            has_cert = s.cert_file is not None
            raise client_certificate_error(s.url, str(exc), has_cert=has_cert) or BrokerTlsError(
                f"TLS with the broker at {s.url} failed: {exc}"
            ) from exc
        except ConnectionResetError as exc:
            conn.abort()
            raise BrokerUnreachable(f"the broker at {s.url} {exc}") from exc
        except OSError as exc:
            conn.abort()
            raise BrokerUnreachable(
                f"cannot connect to the broker at {s.url}: {exc.strerror or exc}"
            ) from exc
        except asyncio.CancelledError:  # close() during the attempt
            conn.abort()
            raise
        if conn.transport is None or conn.transport.is_closing():
            # It broke the protocol in the same read as its CONNACK.
            raise self.last_error or BrokerUnreachable(
                f"the broker at {s.url} dropped the connection after accepting it"
            )
        code = ack.code
        if code != 0:
            conn.abort()
            reason = CONNACK_REASONS.get(code, f"return code {code}")
            raise BrokerRefused(
                f"the broker at {s.url} refused the connection: {reason}", code=code
            )
        self._conn = conn
        self.stats.connects += 1
        self._limits = self._with_found(_limits_of(ack, s.max_packet_size))
        self._keepalive = ack.limits.server_keepalive or s.keepalive
        if version == V5:
            log.info("broker %s: MQTT 5, %s", s.url, self._limits)
        return conn

    def _retry_subscribe(self, conn: Conn, topic_filter: str, delay: float) -> None:
        """Subscribe again to `topic_filter` after `delay` s on this connection, doubling the
        delay (to 30 s) while the broker refuses; the subscription is kept meanwhile."""
        log.warning(
            "broker %s refused to restore the subscription to %r; asking again in %.0fs",
            self.settings.url,
            topic_filter,
            delay,
        )

        def again() -> None:
            subs = self._routes.by_filter.get(topic_filter)
            if conn is not self._conn or not subs or self._closing:
                return  # gone: the next connection restores it anyway
            w: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._send_subscribe(conn, topic_filter, max(x.qos for x in subs), w)

            def check(fut: asyncio.Future[bytes]) -> None:
                if fut.cancelled() or fut.exception() is not None:
                    return
                if any(x >= 0x80 for x in fut.result()):
                    self._retry_subscribe(conn, topic_filter, min(delay * 2, 30.0))

            w.add_done_callback(check)

        asyncio.get_running_loop().call_later(delay, again)

    def _dropped(self, conn: Conn) -> BrokerUnreachable | None:
        if conn is self._conn and not conn.closed.done():
            return None
        return BrokerUnreachable(f"the connection to the broker at {self.settings.url} dropped")

    async def _restore(self, conn: Conn) -> None:
        """Re-subscribe every subscription (and finish unsubscribes) before reporting up."""
        if err := self._dropped(conn):  # it may have dropped since the CONNACK
            raise err
        waits: list[asyncio.Future[bytes]] = []
        names: list[str | None] = []
        loop = asyncio.get_running_loop()
        if self._routes.stale and not self.settings.clean_session:
            stale = sorted(self._routes.stale)
            w: asyncio.Future[bytes] = loop.create_future()
            self._send_unsubscribe(conn, stale, w)
            waits.append(w)
            names.append(None)
        for topic_filter, subs in list(self._routes.by_filter.items()):
            w = loop.create_future()
            self._send_subscribe(conn, topic_filter, max(s.qos for s in subs), w)
            waits.append(w)
            names.append(topic_filter)
        if waits:
            acks = asyncio.gather(*waits, return_exceptions=True)
            done, _ = await asyncio.wait(
                (acks, conn.closed),
                timeout=self.settings.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if acks not in done:
                acks.cancel()
                raise self._dropped(conn) or BrokerTimeout(
                    f"the broker at {self.settings.url} did not confirm subscriptions in time"
                )
            for name, c in zip(names, acks.result(), strict=True):
                if name is not None and isinstance(c, bytes) and any(x >= 0x80 for x in c):
                    # Refused for now (a NATS cluster electing after a node died): the link
                    # comes up for everything else and asks again with backoff.
                    self._retry_subscribe(conn, name, 1.0)
        if err := self._dropped(conn):
            raise err

    async def _serve(self, conn: Conn) -> None:
        keepalive = self._keepalive
        assert self._stop is not None
        while not conn.closed.done():
            await asyncio.wait(
                (conn.closed, self._stop),
                timeout=keepalive / 2,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if conn.closed.done() or self._stop.done():
                break
            if time.monotonic() - conn.last_recv > keepalive * 1.5:
                log.warning(
                    "broker %s: no answer for %ss, reconnecting", self.settings.url, keepalive
                )
                self.last_error = BrokerTimeout(
                    f"the broker at {self.settings.url} stopped answering"
                )
                conn.abort()
                break
            if conn.transport is not None:
                conn.codec.ping()
                conn.flush()

    def _set_up(self, conn: Conn) -> None:
        self._up = True
        self.last_error = None
        log.info("broker %s: connected as %s", self.settings.url, self.settings.client_id)
        self._flush()
        for w in self._state_waiters:
            if not w.done():
                w.set_result(None)
        self._notify(True)
        self._start_probe()

    def on_conn_lost(self, conn: Conn) -> None:
        if conn is not self._conn:
            return
        was_up = self._up
        self._conn = None
        self._up = False
        # QoS 1 publishes not yet acknowledged go first, in their order, when we are back
        # (those still queued from an earlier drop are in the outbox already).
        for rec in reversed(list(self._unacked.values())):
            if rec.wired:
                rec.wired = False
                rec.dup = True
                rec.drops += 1
                if (err := self._blame(len(rec.payload), rec.drops)) is not None:
                    del self._unacked[rec.mid]
                    rec.complete(err)
                    continue
                self._outbox.appendleft(rec)
        for p in self._pending.values():
            if p.waiter is not None and not p.waiter.done():
                p.waiter.set_exception(ConnectionResetError())
                p.waiter.exception()
        self._pending.clear()
        if was_up:
            self.stats.disconnects += 1
            log.info("broker %s: connection lost", self.settings.url)
            self._notify(False)

    def on_protocol_violation(self, conn: Conn, what: str) -> None:
        self.stats.protocol_errors += 1
        self.last_error = BrokerProtocolError(what)
        log.warning("broker %s: %s; reconnecting", self.settings.url, what)
        conn.abort()
        conn.transport = None
        self.on_conn_lost(conn)

    def on_broker_disconnect(self, conn: Conn, ev: Disconnect) -> None:
        why = CONNACK_REASONS.get(ev.reason, f"reason {ev.reason:#x}")
        if ev.reason_string:
            why += f": {ev.reason_string}"
        self.last_error = BrokerUnreachable(
            f"the broker at {self.settings.url} disconnected us ({why})"
        )
        log.warning("broker %s: disconnected us (%s); reconnecting", self.settings.url, why)
        conn.abort()
        conn.transport = None
        self.on_conn_lost(conn)

    def _shutdown(self) -> None:
        self._closing = True
        self._closed = True
        self._running = False
        conn = self._conn
        if conn is not None:
            conn.abort()
        self._conn = None
        self._up = False
        closed = LinkClosed("the broker link was closed")
        pending = list(self._outbox) + [r for r in self._unacked.values() if r.wired]
        self._outbox.clear()
        self._unacked.clear()
        self._queued_bytes = 0
        for rec in pending:
            rec.complete(closed)
            if rec.waiter is not None and rec.waiter.done() and not rec.waiter.cancelled():
                rec.waiter.exception()
        for w in self._state_waiters + self._idle_waiters:
            if not w.done():
                w.set_exception(closed)
                w.exception()
        for sub in self._routes.subs:
            sub._confirm(closed)
            sub._end(None)
        self._routes.clear()

    # -- publishing --

    def _send(  # noqa: PLR0917 - the hot path: positional arguments are cheaper
        self,
        conn: Conn,
        topic: bytes,
        payload: bytes | bytearray | memoryview,
        qos: int,
        retain: bool,
        dup: bool,
        mid: int,
    ) -> None:
        codec = conn.codec
        codec.publish(topic, payload, qos, retain, dup, mid)
        transport = conn.transport
        assert transport is not None
        for data in codec.data_to_send():
            transport.write(data)
        n = len(payload)
        stats = self.stats
        stats.published += 1
        stats.published_bytes += n
        if dup:
            stats.retransmitted += 1

    def _write(self, conn: Conn, rec: Outgoing) -> None:
        rec.wired = True
        self._send(conn, rec.topic, rec.payload, rec.qos, rec.retain, rec.dup, rec.mid)

    def _inflight_limit(self) -> int:
        """QoS 1 publishes awaiting PUBACK: ours, and no more than the broker's Receive
        Maximum (MQTT 5; it disconnects a client that exceeds it)."""
        return min(self.max_inflight, self._limits.receive_maximum)

    def admit(self, rec: Outgoing) -> None:
        """Send now if nothing is ahead of it, else queue within the outbox limits."""
        if self._closing:
            raise LinkClosed("the broker link is closed")
        limits = self._limits
        rec.qos = min(rec.qos, limits.maximum_qos)  # MQTT 5 Maximum QoS 0: no more than it allows
        if rec.retain and not limits.retain_available:
            # The broker would disconnect us for a retained publish (MQTT 5 Retain Available
            # 0); it is sent unretained and counted: revocations are republished anyway.
            rec.retain = False
            self.stats.retain_refused += 1
        conn = self._conn
        if (
            self._up
            and not self._outbox
            and conn is not None
            and not conn.paused
            and (rec.qos == 0 or len(self._unacked) < self._inflight_limit())
        ):
            if rec.qos:
                rec.mid = self._alloc_mid()
                self._unacked[rec.mid] = rec
            self._write(conn, rec)
            if not rec.qos:
                rec.complete()
            return
        n = len(rec.payload)
        if len(self._outbox) >= self.max_queued or self._queued_bytes + n > self.max_queued_bytes:
            raise BrokerQueueFull(
                f"{len(self._outbox)} publishes ({self._queued_bytes} bytes) already wait for the"
                f" broker at {self.settings.url}"
            )
        self._outbox.append(rec)
        self._queued_bytes += n

    def _flush(self) -> None:
        conn = self._conn
        if not self._up or conn is None:
            return
        outbox = self._outbox
        while outbox and not conn.paused:
            rec = outbox[0]
            if rec.cancelled:
                outbox.popleft()
                continue
            if rec.qos and not rec.mid:
                if len(self._unacked) >= self._inflight_limit():
                    break
                rec.mid = self._alloc_mid()
                self._unacked[rec.mid] = rec
            outbox.popleft()
            if not rec.dup:
                self._queued_bytes -= len(rec.payload)
            self._write(conn, rec)
            if not rec.qos:
                rec.complete()
        self._check_idle()

    def _withdraw(self, rec: Outgoing) -> None:
        """Take a publish its caller gave up on out of the outbox, unless already sent."""
        rec.waiter = None
        if rec.mid:
            return  # sent: the link delivers it at least once
        with contextlib.suppress(ValueError):
            self._outbox.remove(rec)
            self._queued_bytes -= len(rec.payload)
        self._check_idle()

    def _check_idle(self) -> None:
        if self._idle_waiters and not self._outbox and not self._unacked:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def on_publish(self, ev: Publish) -> None:
        self._routes.deliver(ev, self.stats)

    def on_writable_changed(self, conn: Conn) -> None:
        if conn is self._conn and not conn.paused:
            self._flush()

    def on_puback(self, mid: int, reason: int = 0) -> None:
        rec = self._unacked.pop(mid, None)
        if rec is None:
            return  # a duplicate acknowledgement: nothing waits for it
        if not rec.wired:  # acknowledged while queued for a retransmission: do not resend
            rec.cancelled = True
        if reason >= 0x80:  # MQTT 5: the broker took the packet and refused the message
            self.stats.publish_refused += 1
            why = CONNACK_REASONS.get(reason, f"reason {reason:#x}")
            rec.complete(
                BrokerLimitError(f"the broker at {self.settings.url} refused a publish: {why}")
            )
        else:
            self._acked_max = max(self._acked_max, len(rec.payload))
            rec.complete()
        if self._outbox:
            self._flush()
        elif self._idle_waiters and not self._unacked:
            self._check_idle()

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
    ) -> None:
        """Send (or queue during an outage) without waiting. Raises `BrokerQueueFull`.

        A QoS 1 publish made this way is still retransmitted until acknowledged; nothing tells
        the caller when that happened (use `publish()` or a `Pipeline` for that).
        """
        if qos not in (0, 1):
            raise ValueError("peerd publishes at QoS 0 or 1")
        payload = as_bytes_view(payload)
        self.admit(Outgoing(self.topic_for(topic, payload), payload, qos, retain, None, None))

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
    ) -> None:
        """Publish; return once written (QoS 0) or acknowledged by the broker (QoS 1).

        During an outage the publish waits in the outbox. On `timeout` (`BrokerTimeout`) or
        cancellation a publish not yet sent is withdrawn; a QoS 1 publish already sent stays
        with the link, which delivers it at least once.
        """
        if qos not in (0, 1):
            raise ValueError("peerd publishes at QoS 0 or 1")
        payload = as_bytes_view(payload)
        topic_raw = self.topic_for(topic, payload)
        conn = self._conn
        if (
            qos == 0
            and self._up
            and not self._outbox
            and conn is not None
            and not conn.paused
            and not self._closing
        ):
            self._send(conn, topic_raw, payload, 0, retain, False, 0)  # no future, no suspension
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rec = Outgoing(topic_raw, payload, qos, retain, waiter, None)
        self.admit(rec)
        if waiter.done():
            return
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            self._withdraw(rec)
            raise BrokerTimeout(
                f"a publish to {topic!r} was not {'acknowledged' if qos else 'sent'} within"
                f" {timeout}s (broker {self.settings.url})"
            ) from None
        except asyncio.CancelledError:
            self._withdraw(rec)
            raise

    def topic_for(self, topic: str, payload: bytes | bytearray | memoryview) -> bytes:
        """`topic` encoded, once the PUBLISH is known to fit the packet limit and the topic
        name to be valid."""
        raw = topic.encode()
        limit = self._limits.max_packet_size  # configured, or the broker's if smaller
        if len(payload) + len(raw) + 8 + (2 if self._limits.version == V5 else 0) > limit:
            raise ValueError(
                f"a {len(payload)}-byte payload exceeds the broker packet limit of {limit} bytes"
            )
        if not raw or len(raw) > 65535 or "+" in topic or "#" in topic or "\0" in topic:
            raise ValueError(f"invalid MQTT topic name {topic!r}")
        return raw

    def pipeline(self, depth: int = 16) -> Pipeline:
        """A window of up to `depth` QoS 1 publishes in flight (see `Pipeline`)."""
        if not 1 <= depth <= self.max_inflight:
            raise ValueError(f"pipeline depth must be 1-{self.max_inflight}")
        return Pipeline(self, depth)


def _limits_of(ack: ConnAck, configured: int) -> LinkLimits:
    broker = ack.limits
    packet, source = configured, "configured"
    if broker.max_packet_size is not None and broker.max_packet_size < packet:
        packet, source = broker.max_packet_size, "broker"
    return LinkLimits(
        max_packet_size=packet,
        source=source,
        version=ack.version,
        receive_maximum=broker.receive_maximum,
        maximum_qos=min(1, broker.maximum_qos),
        retain_available=broker.retain_available,
    )
