"""One TCP/TLS connection to the broker: an asyncio protocol that pumps the sans-IO codec."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Protocol

from peerd.mqtt.settings import BrokerSettings
from peerd.mqtt.subscription import LinkStats
from protocol.mqtt import (
    ConnAck,
    Connection,
    Disconnect,
    Dropped,
    PubAck,
    Publish,
    SubAck,
    UnsubAck,
    Violation,
)

__all__ = ["Conn", "ConnOwner"]


class ConnOwner(Protocol):
    """What a connection needs of the link that owns it (MqttLink): its settings and counters,
    and one public method per thing the connection reports. Named here, so conn.py never
    imports link.py."""

    settings: BrokerSettings
    stats: LinkStats

    def on_publish(self, ev: Publish) -> None: ...

    def on_puback(self, mid: int, reason: int = 0) -> None: ...

    def on_suback(self, mid: int, codes: bytes) -> None: ...

    def on_unsuback(self, mid: int) -> None: ...

    def on_protocol_violation(self, conn: Conn, what: str) -> None: ...

    def on_broker_disconnect(self, conn: Conn, ev: Disconnect) -> None: ...

    def on_conn_lost(self, conn: Conn) -> None: ...

    def on_writable_changed(self, conn: Conn) -> None: ...


class Conn(asyncio.BufferedProtocol):
    """Pumps one TCP/TLS connection through its `Connection` codec; the link outlives it."""

    def __init__(self, link: ConnOwner, version: int) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        s = link.settings
        self.codec = Connection(version=version, max_packet_size=s.max_packet_size)
        # asyncio reads straight into the codec's buffer: no copy on the way in.
        self.get_buffer = self.codec.get_buffer  # type: ignore[method-assign] # the zero-copy path
        self.paused = False
        self.last_recv = time.monotonic()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[ConnAck] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle against delayed ACK costs a QoS 1 round trip 44-88 ms (measured here).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=4 << 20)
        s = self.link.settings
        self.codec.connect(
            client_id=s.client_id,
            keepalive=s.keepalive,
            clean_start=s.clean_session,
            username=s.username,
            password=s.password,
        )
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            # A TLS alert (a client certificate missing or refused) says more than the close.
            self.connack.set_exception(
                exc
                if isinstance(exc, ssl.SSLError)
                else ConnectionResetError("closed the connection before accepting it")
            )
            self.connack.exception()
        if not self.closed.done():
            self.closed.set_result(None)
        self.link.on_conn_lost(self)

    def pause_writing(self) -> None:
        self.paused = True
        self.link.on_writable_changed(self)

    def resume_writing(self) -> None:
        self.paused = False
        self.link.on_writable_changed(self)

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:  # replaced per instance in __init__
        return self.codec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_recv = time.monotonic()
        codec = self.codec
        codec.buffer_updated(nbytes)
        link = self.link
        while (ev := codec.next_event()) is not None:
            if type(ev) is Publish:
                link.on_publish(ev)
            elif type(ev) is PubAck:
                link.on_puback(ev.mid, ev.reason)
            else:
                self._event(ev)
            if self.transport is None:
                return
        self.flush()

    def _event(self, ev: object) -> None:
        link = self.link
        if isinstance(ev, SubAck):
            link.on_suback(ev.mid, ev.codes)
        elif isinstance(ev, UnsubAck):
            link.on_unsuback(ev.mid)
        elif isinstance(ev, Dropped):
            if ev.reason == "oversize":
                link.stats.dropped_oversize += 1
            else:
                link.stats.received += 1
                link.stats.dropped_bad_topic += 1
        elif isinstance(ev, ConnAck):
            if not self.connack.done():
                self.connack.set_result(ev)
        elif isinstance(ev, Violation):
            link.on_protocol_violation(self, ev.what)
        elif isinstance(ev, Disconnect):
            link.on_broker_disconnect(self, ev)

    def flush(self) -> None:
        t = self.transport
        if t is not None:
            for data in self.codec.data_to_send():
                t.write(data)

    def abort(self) -> None:
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    def finish(self, *, graceful: bool) -> None:
        """Close the connection, with a DISCONNECT first when `graceful` (once)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if graceful and self.connack.done():
            self.codec.disconnect()
            self.flush()
            t.close()
        else:
            t.abort()
