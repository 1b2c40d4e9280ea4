"""`BrokerLink` on aiomqtt (`[broker] client = "aiomqtt"`): the standard asyncio MQTT client.

An honest adapter: connecting, subscribing, publishing and reading go through aiomqtt's public
API (`Client`, `subscribe`, `publish`, `messages`). The one exception is `publish_nowait`, which
the daemon calls from synchronous code: it hands the message to aiomqtt's paho client
(`Client._client.publish`, non-blocking) instead of spawning a task per frame.

What this adapter adds is what `MqttLink` promises and aiomqtt leaves to its user: reconnects
with backoff, subscriptions restored after each reconnect, a bounded outbox during an outage,
bounded per-subscription queues (aiomqtt's own incoming queue is bounded too, and drained at
once), errors translated into the Broker* family. Payloads are copied into `bytes` (paho takes
no memoryview), so the caller may reuse its buffer once a publish returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from peerd.mqtt.common import LinkCommon
from peerd.mqtt.errors import (
    CONNACK_REASONS,
    BrokerError,
    BrokerQueueFull,
    BrokerRefused,
    BrokerTimeout,
    BrokerUnreachable,
    LinkClosed,
    SubscribeRefused,
    client_certificate_error,
)
from peerd.mqtt.limits import LinkLimits
from peerd.mqtt.settings import Backoff, BrokerSettings
from peerd.mqtt.subscription import Message, Subscription
from peerd.mqtt.urls import BrokerSet

__all__ = ["AiomqttLink"]

log = logging.getLogger("peerd.mqtt")

# An outbox entry's waiter: paho's record of the publish, and the end of the connection it
# was handed to on.
Handed = asyncio.Future[tuple[paho.MQTTMessageInfo, asyncio.Future[None]]]
# paho logs every packet at DEBUG: formatting a line per chunk is not what `--log-level debug`
# is for, so its logger starts at INFO.
_PAHO_LOG = logging.getLogger("peerd.mqtt.aiomqtt")
_PAHO_LOG.setLevel(logging.INFO)
_INCOMING = 4096  # aiomqtt's own queue, drained by our reader at once; a bound all the same


class AiomqttLink(LinkCommon):
    """A self-healing connection through aiomqtt. Run it with `run()` or `async with`."""

    def __init__(
        self,
        settings: BrokerSettings | BrokerSet,
        *,
        on_state: Callable[[bool], None] | None = None,
        backoff: Backoff | None = None,
        max_queued: int = 4096,
        max_queued_bytes: int = 64 << 20,
    ) -> None:
        super().__init__(settings, on_state=on_state, backoff=backoff)
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._version = self.settings.mqtt_version or _V5
        self._client: aiomqtt.Client | None = None
        self._down: asyncio.Future[None] | None = None  # done when the current connection drops
        self._runner: asyncio.Task[Any] | None = None  # the task in run(), awaited by close()
        self._outbox: deque[tuple[str, bytes, int, bool, Handed | None]] = deque()
        self._queued_bytes = 0
        self._sent: deque[paho.MQTTMessageInfo] = deque()  # for drain(): written yet?
        self._socket_error = ""  # paho's last socket error, for _translate
        self._alert: asyncio.Future[BrokerError | aiomqtt.MqttError] | None = None  # see _enter
        self._retries: set[asyncio.Task[None]] = set()  # subscriptions asked for again

    # -- the port's properties --

    @property
    def queued(self) -> int:
        return len(self._outbox)

    # -- lifecycle --

    async def run(self) -> None:
        if self._closed or self._stop is not None:
            raise RuntimeError("an AiomqttLink runs once")
        self._stop = asyncio.get_running_loop().create_future()
        self._runner = asyncio.current_task()
        try:
            while not self._closing:
                try:
                    client = await self._until_stopped(self._open())
                    try:
                        self.stats.connects += 1
                        await self._until_stopped(self._restore(client))
                        self._set_up(client)
                        self._connected()
                        reader = asyncio.ensure_future(self._read(client))
                        try:
                            await asyncio.wait(
                                (reader, self._stop), return_when=asyncio.FIRST_COMPLETED
                            )
                        finally:
                            reader.cancel()
                            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                                await reader
                            self._set_down()
                    finally:
                        with contextlib.suppress(aiomqtt.MqttError):
                            await client.__aexit__(None, None, None)
                except aiomqtt.MqttError as exc:
                    self._failed(self._translate(exc))
                except LinkClosed:
                    pass
                except BrokerError as exc:
                    self._failed(exc)
                if self._stopping():
                    break
                await self._pause_before_reconnect()
        finally:
            self._shutdown()

    async def _open(self) -> aiomqtt.Client:
        """A connected client, at the protocol level that worked last (as MqttLink: MQTT 5
        first when configured `auto`, then 3.1.1 if the broker refuses 5 or never answers)."""
        version = self._version
        props: list[Any] = []
        client = self._connect(version, props)
        try:
            await self._enter(client)
        except aiomqtt.MqttError as exc:
            refused = isinstance(exc, MqttConnectError) and _code(exc.rc) in (0x01, 0x84)
            silent = not isinstance(exc, MqttConnectError)  # closed or timed out before CONNACK
            if self.settings.mqtt_version or version != _V5 or not (refused or silent):
                raise
            log.info("broker %s: no MQTT 5 (%s); trying MQTT 3.1.1", self.settings.url, exc)
            version = self._version = _V311
            # A list of its own: the v5 refusal's CONNACK must not count as this attempt's,
            # or a close before this attempt's CONNACK would not cut it short.
            props = []
            client = self._connect(version, props)
            await self._enter(client)
        self._limits = self._with_found(
            _limits_of(props[-1] if props else None, version, self.settings)
        )
        return client

    async def _enter(self, client: aiomqtt.Client) -> None:
        """aiomqtt's connect, cut short when the connection ends before the CONNACK: by a TLS
        alert refusing our client certificate, or by any close (a TLS 1.3 broker that refuses a
        certificate after the handshake can reset the connection before its alert is read).
        aiomqtt ignores a disconnect before the CONNACK, and would report either only as a
        timeout, `connect_timeout` later."""
        alert: asyncio.Future[BrokerError | aiomqtt.MqttError]
        alert = asyncio.get_running_loop().create_future()
        self._alert = alert
        enter = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.wait((enter, alert), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._alert = None
            if not enter.done():
                enter.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await enter
                if alert.done():
                    raise alert.result()
        enter.result()

    def _connect(self, version: int, props: list[Any]) -> aiomqtt.Client:
        s = self.settings
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            username=s.username,
            password=s.password,
            keepalive=s.keepalive,
            protocol=aiomqtt.ProtocolVersion.V5 if version == _V5 else aiomqtt.ProtocolVersion.V311,
            clean_session=s.clean_session if version == _V311 else None,
            timeout=s.connect_timeout,
            tls_context=s.ssl_context(),
            max_queued_incoming_messages=_INCOMING,
            # Nagle against delayed ACK costs a QoS 1 round trip 44-88 ms (measured here, as
            # peerd/mqtt/conn.py says).
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            logger=_PAHO_LOG,
            # ws:// and wss:// (peerd/mqtt/websocket.py says why): paho's own WebSocket framing.
            transport="tcp" if s.websocket_path is None else "websockets",
            websocket_path=s.websocket_path,
        )
        # aiomqtt drops the CONNACK's properties; they carry the MQTT 5 limits, so keep them.
        paho_client = client._client
        on_connect: Any = paho_client.on_connect

        def keep_properties(*args: Any) -> None:
            props.append(args[4] if len(args) > 4 else None)
            on_connect(*args)

        paho_client.on_connect = keep_properties
        on_disconnect: Any = paho_client.on_disconnect

        def end_attempt(*args: Any) -> None:
            # After a CONNACK (props holds its properties) aiomqtt has the outcome, a refusal
            # with its reason included.
            if not props and self._alert is not None and not self._alert.done():
                why = f": {self._socket_error}" if self._socket_error else ""
                self._socket_error = ""
                # An MqttError, as aiomqtt's timeout was: _open falls back to 3.1.1 on it.
                self._alert.set_result(
                    aiomqtt.MqttError(f"closed the connection before accepting it{why}")
                )
            on_disconnect(*args)

        paho_client.on_disconnect = end_attempt

        def keep_socket_error(_c: Any, _u: Any, level: int, text: str) -> None:
            # A TLS alert read after the handshake (a client certificate missing or refused)
            # reaches aiomqtt as a timeout; paho reports the alert only here.
            if level != paho.MQTT_LOG_ERR:
                return
            self._socket_error = text
            err = client_certificate_error(s.url, text, has_cert=s.cert_file is not None)
            if err is not None and self._alert is not None and not self._alert.done():
                self._alert.set_result(err)

        paho_client.on_log = keep_socket_error
        return client

    def _translate(self, exc: aiomqtt.MqttError) -> BrokerError:
        url = self.settings.url
        has_cert = self.settings.cert_file is not None
        seen, self._socket_error = f"{exc} {self._socket_error}", ""
        if cert_error := client_certificate_error(url, seen, has_cert=has_cert):
            return cert_error
        if isinstance(exc, MqttConnectError):
            code = _code(exc.rc)
            reason = CONNACK_REASONS.get(code, f"return code {code}")
            return BrokerRefused(f"the broker at {url} refused the connection: {reason}", code=code)
        if str(exc).startswith("closed the connection"):  # from _enter, as MqttLink says it
            return BrokerUnreachable(f"the broker at {url} {exc}")
        if "timed out" in str(exc):
            return BrokerTimeout(f"the broker at {url} did not answer in time: {exc}")
        return BrokerUnreachable(f"the connection to the broker at {url} failed: {exc}")

    async def _restore(self, client: aiomqtt.Client) -> None:
        """Re-subscribe every subscription (all at once, as MqttLink) before reporting up. One
        the broker refuses or leaves unanswered for now (a NATS cluster electing after a node
        died: each JetStream consumer must be made within NATS's 4 s) is kept and asked for
        again on this connection with backoff while everything else flows: dropping the
        connection for it would make the broker start over on every consumer."""
        done: set[str] = set()
        while True:
            # A subscribe() made while this runs is not sent by it (the link is not up yet):
            # it is in the routes now, and goes in the next pass.
            items = [
                (f, max(s.qos for s in subs))
                for f, subs in self._routes.by_filter.items()
                if f not in done
            ]
            if not items:
                return
            done.update(f for f, _ in items)
            results = await asyncio.gather(
                *(self._subscribe_at(client, f, qos) for f, qos in items), return_exceptions=True
            )
            if not client._client.is_connected():
                raise BrokerUnreachable(
                    f"the connection to the broker at {self.settings.url} dropped"
                )
            for (topic_filter, _), result in zip(items, results, strict=True):
                if isinstance(result, aiomqtt.MqttError):
                    self._retry_subscribe(client, topic_filter, f"left unanswered ({result})")
                elif isinstance(result, BaseException):
                    raise result
                elif result:
                    self._retry_subscribe(client, topic_filter, "refused")

    def _retry_subscribe(self, client: aiomqtt.Client, topic_filter: str, why: str) -> None:
        task = asyncio.ensure_future(self._resubscribe(client, topic_filter, why))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _resubscribe(self, client: aiomqtt.Client, topic_filter: str, why: str) -> None:
        """Subscribe again to `topic_filter` on this connection after 1 s, doubling the delay
        (to 30 s) while the broker refuses or does not answer; the subscription is kept
        meanwhile. Ends with the connection (the next one restores it anyway)."""
        delay = 1.0
        while True:
            log.warning(
                "broker %s %s the subscription to %r; asking again in %.0fs",
                self.settings.url,
                why,
                topic_filter,
                delay,
            )
            await asyncio.sleep(delay)
            subs = self._routes.by_filter.get(topic_filter)
            if client is not self._client or not subs or self._closing:
                return
            try:
                refused = await self._subscribe_at(client, topic_filter, max(s.qos for s in subs))
            except aiomqtt.MqttError as exc:
                why = f"left unanswered ({exc})"
            else:
                if not refused:
                    log.info("broker %s: subscribed to %r again", self.settings.url, topic_filter)
                    return
                why = "refused"
            delay = min(delay * 2, 30.0)

    async def _subscribe_at(self, client: aiomqtt.Client, topic_filter: str, qos: int) -> bool:
        """Subscribe; True if the broker refused a subscription it had confirmed before."""
        codes = await client.subscribe(topic_filter, qos, timeout=self.settings.connect_timeout)
        refused = any(_code(c) >= 0x80 for c in codes)
        kept = False
        for sub in list(self._routes.by_filter.get(topic_filter, ())):
            if refused and sub._confirmed.done():
                kept = True
            elif refused:
                self._routes.drop(sub)
                sub._confirm(
                    SubscribeRefused(
                        f"the broker at {self.settings.url} refused the subscription to"
                        f" {topic_filter!r}"
                    )
                )
            else:
                sub._confirm(None)
        return kept

    async def _read(self, client: aiomqtt.Client) -> None:
        routes, stats = self._routes, self.stats
        async for m in client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else bytes(str(m.payload), "utf8")
            routes.deliver(Message(m.topic.value, payload, m.qos, m.retain, False), stats)

    def _set_up(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._down = asyncio.get_running_loop().create_future()
        self._up = True
        self.last_error = None
        log.info("broker %s: connected as %s (aiomqtt)", self.settings.url, self.settings.client_id)
        self._flush()
        for w in self._state_waiters:
            if not w.done():
                w.set_result(None)
        self._notify(True)
        self._start_probe()

    def _set_down(self) -> None:
        was_up, self._up, self._client = self._up, False, None
        for task in list(self._retries):
            task.cancel()
        if self._down is not None and not self._down.done():
            self._down.set_result(None)
        if was_up:
            self.stats.disconnects += 1
            log.info("broker %s: connection lost", self.settings.url)
            self._notify(False)

    def _shutdown(self) -> None:
        self._closing = self._closed = True
        self._up = False
        closed = LinkClosed("the broker link was closed")
        for *_, fut in self._outbox:
            if fut is not None and not fut.done():
                fut.set_exception(closed)
                fut.exception()
        self._outbox.clear()
        self._queued_bytes = 0
        for w in self._state_waiters:
            if not w.done():
                w.set_exception(closed)
                w.exception()
        for sub in self._routes.subs:
            sub._confirm(closed)
            sub._end(None)
        self._routes.clear()

    async def close(self) -> None:
        self._closing = True
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        self._task = None
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            await asyncio.wait((runner,), timeout=self.settings.connect_timeout)
        elif self._stop is None:
            self._shutdown()

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
        """Wait until the outbox is empty and paho has written (QoS 1: had acknowledged) every
        publish handed to it."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while self._sent and self._sent[0].is_published():
                        self._sent.popleft()
                    if not self._outbox and not self._sent:
                        return
                    if self._closed:
                        raise LinkClosed("the broker link closed with publishes outstanding")
                    await asyncio.sleep(0.005)
        except TimeoutError:
            raise BrokerTimeout(
                f"{len(self._outbox) + len(self._sent)} publishes still outstanding after"
                f" {timeout}s"
            ) from None

    # -- publishing --

    def _check(self, topic: str, payload: bytes | bytearray | memoryview, qos: int) -> bytes:
        self._check_publish(topic, len(payload), qos, 8 + 2 * (self._limits.version == _V5))
        if self._closing:
            raise LinkClosed("the broker link is closed")
        return bytes(payload)

    def _enqueue(self, topic: str, data: bytes, qos: int, retain: bool, fut: Handed | None) -> None:
        if len(self._outbox) >= self.max_queued or self._queued_bytes + len(data) > (
            self.max_queued_bytes
        ):
            raise BrokerQueueFull(
                f"{len(self._outbox)} publishes ({self._queued_bytes} bytes) already wait for the"
                f" broker at {self.settings.url}"
            )
        self._outbox.append((topic, data, qos, retain, fut))
        self._queued_bytes += len(data)
        self._flush()  # up, with others queued ahead: they go first, then this one

    def _hand_to_paho(
        self, topic: str, data: bytes, qos: int, retain: bool
    ) -> paho.MQTTMessageInfo | None:
        client = self._client
        if client is None:
            return None
        info = client._client.publish(topic, data, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.debug("broker %s: paho refused a publish (rc %s)", self.settings.url, info.rc)
            return None
        self._sent.append(info)
        if len(self._sent) > 4096:
            while self._sent and self._sent[0].is_published():
                self._sent.popleft()
        self.stats.published += 1
        self.stats.published_bytes += len(data)
        return info

    def _flush(self) -> None:
        while self._outbox and self._up:
            topic, data, qos, retain, fut = self._outbox[0]
            info = self._hand_to_paho(topic, data, qos, retain)
            if info is None:
                return
            self._outbox.popleft()
            self._queued_bytes -= len(data)
            if fut is not None and not fut.done():
                assert self._down is not None
                fut.set_result((info, self._down))

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
    ) -> None:
        data = self._check(topic, payload, qos)
        if self._up and not self._outbox and self._hand_to_paho(topic, data, qos, retain):
            return
        self._enqueue(topic, data, qos, retain, None)

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a BrokerTimeout that says what timed out
    ) -> None:
        data = self._check(topic, payload, qos)
        try:
            async with asyncio.timeout(timeout):
                if qos:
                    await self._publish_acknowledged(topic, data, retain)
                else:
                    await self._publish_written(topic, data, retain)
        except TimeoutError:
            raise BrokerTimeout(
                f"a publish to {topic!r} was not {'acknowledged' if qos else 'sent'} within"
                f" {timeout}s (broker {self.settings.url})"
            ) from None

    async def _race_drop(self, topic: str, data: bytes, qos: int, retain: bool) -> bool:
        """Publish on the connection up now; True once paho reports it done, False if the
        connection went first. aiomqtt waits for paho's on_publish without regard to the
        connection: a drop in between would leave the publish waiting for ever."""
        client, down = self._client, self._down
        assert client is not None
        assert down is not None
        pub = asyncio.ensure_future(client.publish(topic, data, qos, retain, timeout=math.inf))
        try:
            await asyncio.wait((pub, down), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pub.done():
                pub.cancel()
        if not pub.done() or pub.cancelled():
            return False
        try:
            pub.result()
        except aiomqtt.MqttError as exc:
            # paho refuses a publish once it saw the connection go, which may be before our
            # reader does: the publish goes again on the next connection.
            log.debug("broker %s: publish refused (%s)", self.settings.url, exc)
            return False
        self.stats.published += 1
        self.stats.published_bytes += len(data)
        return True

    async def _publish_written(self, topic: str, data: bytes, retain: bool) -> None:
        if self._up and not self._outbox and self._client is not None:
            await self._race_drop(topic, data, 0, retain)
            return  # best effort: a QoS 0 publish on a connection that died is lost
        fut: Handed = asyncio.get_running_loop().create_future()
        self._enqueue(topic, data, 0, retain, fut)
        await fut

    async def _publish_acknowledged(self, topic: str, data: bytes, retain: bool) -> None:
        """Until the broker acknowledges it. Each connection gets it once, in its turn behind
        what the outbox held (a new aiomqtt client per connection keeps no in-flight state, so
        a drop means sending it again)."""
        drops = 0
        while True:
            if self._up and not self._outbox and self._client is not None:
                down = self._down
                assert down is not None
                if await self._race_drop(topic, data, 1, retain):
                    break
                await down  # paho may refuse before our reader sees the drop: wait for it
            else:
                fut: Handed = asyncio.get_running_loop().create_future()
                self._enqueue(topic, data, 1, retain, fut)
                info, down = await fut
                while not info.is_published() and not down.done():
                    # paho's acknowledgement reaches aiomqtt's own waiter only: look at it.
                    await asyncio.wait((down,), timeout=0.005)
                if info.is_published():
                    break
            drops += 1
            if (err := self._blame(len(data), drops)) is not None:
                raise err
        self._acked_max = max(self._acked_max, len(data))

    # -- subscribing --

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
        sub, want = self._new_subscription(topic_filter, qos, handler, max_messages, max_bytes)
        client = self._client
        try:
            async with asyncio.timeout(timeout):
                if client is not None and self._up:
                    with contextlib.suppress(aiomqtt.MqttError):  # a drop: _restore does it
                        await self._subscribe_at(client, topic_filter, want)
                await asyncio.shield(sub._confirmed)
        except TimeoutError:
            self._routes.drop(sub)
            raise BrokerTimeout(
                f"the broker at {self.settings.url} did not confirm the subscription to"
                f" {topic_filter!r} within {timeout}s"
            ) from None
        except BaseException:
            self._routes.drop(sub)
            raise
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if not self._routes.drop(sub):
            return
        client = self._client
        if client is None or self._closing:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(sub.filter, timeout=self.settings.connect_timeout)
        self._routes.stale.discard(sub.filter)


def _code(rc: int | ReasonCode | None) -> int:
    """A CONNACK or SUBACK code, whichever type paho gave it as."""
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return int(rc or 0)


_V311, _V5 = 4, 5


def _limits_of(props: Any, version: int, settings: BrokerSettings) -> LinkLimits:
    """The limits in force from paho's CONNACK properties (MQTT 5; None in 3.1.1)."""
    packet, source = settings.max_packet_size, "configured"
    broker = getattr(props, "MaximumPacketSize", None)
    if isinstance(broker, int) and 0 < broker < packet:
        packet, source = broker, "broker"
    return LinkLimits(
        max_packet_size=packet,
        source=source,
        version=version,
        receive_maximum=int(getattr(props, "ReceiveMaximum", 65535)),
        maximum_qos=min(1, int(getattr(props, "MaximumQoS", 1))),
        retain_available=bool(getattr(props, "RetainAvailable", 1)),
    )
