"""MQTT over WebSocket (`ws://`, `wss://`) for the built-in client: RFC 6455 framing under `Conn`.

Firewalls that pass only HTTPS on port 443 still pass a WebSocket, and every broker peerd meets
serves MQTT over one (Mosquitto's `protocol websockets` listener, RabbitMQ's web_mqtt, EMQX,
Azure Event Grid on `wss://...:443/mqtt`). The WebSocket itself is wsproto's: the maintained
sans-IO implementation (h11's authors), so this module only pumps it, as `Conn` pumps the MQTT
codec. `WebSocketPump` is the asyncio protocol on the TCP/TLS transport; it runs the HTTP upgrade
(subprotocol `mqtt`, MQTT-over-WebSocket's registered name), then hands `Conn` a transport of its
own (`WebSocketTransport`) whose `write()` sends one binary frame. MQTT packets may span frames
and frames may hold several packets, so incoming frames are fed to the codec as a byte stream.

What it costs: every byte the client sends is masked (RFC 6455 5.3) and every incoming frame's
payload copied once into the codec's buffer; `scripts/bench mqtt-ws` measures it against TCP.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from peerd.mqtt.errors import BrokerRefused

if TYPE_CHECKING:
    from peerd.mqtt.conn import Conn

__all__ = ["SUBPROTOCOL", "WebSocketPump", "WebSocketTransport", "websocket_pump"]

SUBPROTOCOL = "mqtt"  # MQTT 3.1.1 section 6 and MQTT 5 section 6 name it so, for either version


class WebSocketTransport(asyncio.Transport):
    """What `Conn` sees as its transport: writes become binary frames on the real one."""

    def __init__(self, pump: WebSocketPump) -> None:
        super().__init__()
        self._pump = pump

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pump.send_frame(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self._pump.send_frame(data)

    def is_closing(self) -> bool:
        return self._pump.transport is None or self._pump.transport.is_closing()

    def close(self) -> None:
        self._pump.close(1000)

    def abort(self) -> None:
        t = self._pump.transport
        if t is not None:
            t.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self._pump.transport
        return default if t is None else t.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._pump.transport is not None:
            self._pump.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        t = self._pump.transport
        return 0 if t is None else t.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return False


class WebSocketPump(asyncio.Protocol):
    """Runs one WebSocket on a TCP/TLS transport and carries `conn`'s bytes through it."""

    def __init__(self, conn: Conn, *, host: str, port: int, path: str, default_port: int) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.ws = WSConnection(ConnectionType.CLIENT)
        # RFC 7230 5.4: the port goes in Host only when it is not the scheme's default.
        bracketed = f"[{host}]" if ":" in host else host
        self._host = bracketed if port == default_port else f"{bracketed}:{port}"
        self._path = path
        self._open = False
        self._url = conn.link.settings.url

    # -- the real transport --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Conn does for TCP
        transport.write(
            self.ws.send(Request(host=self._host, target=self._path, subprotocols=[SUBPROTOCOL]))
        )

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if self._event(event):
                    return
        except RemoteProtocolError as exc:
            self._violation(f"a broken WebSocket ({exc})")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    # -- WebSocket events --

    def _event(self, event: object) -> bool:
        """Handle one event; True when the connection is over."""
        conn = self.conn
        if isinstance(event, BytesMessage):
            # wsproto hands over a large frame in pieces as they arrive: nothing waits for a
            # whole frame, so the codec's own packet limit is the only bound needed.
            view = memoryview(event.data)
            while view:
                buf = conn.get_buffer(len(view))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                conn.buffer_updated(n)
                view = view[n:]
                if conn.transport is None:  # the codec found a violation and dropped it
                    return True
        elif isinstance(event, AcceptConnection):
            if event.subprotocol != SUBPROTOCOL:
                self._refuse(f"answered the WebSocket upgrade without the {SUBPROTOCOL!r} protocol")
                return True
            self._open = True
            conn.connection_made(WebSocketTransport(self))
        elif isinstance(event, RejectConnection):
            self._refuse(f"refused the WebSocket upgrade (HTTP {event.status_code})")
            return True
        elif isinstance(event, Ping):
            self._write(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._write(self.ws.send(event.response()))
            if self.transport is not None:
                self.transport.close()
            return True
        elif isinstance(event, TextMessage):
            self._violation("a WebSocket text frame (MQTT is binary)")
            return True
        elif isinstance(event, RejectData):
            pass  # the body of a refusal: its status line said enough
        return False

    def _refuse(self, what: str) -> None:
        """The upgrade failed: the connect attempt fails with a permanent, one-line error."""
        fut = self.conn.connack
        if not fut.done():
            err = BrokerRefused(
                f"the broker at {self._url} {what}",
                code=0x80,
                hint="check the WebSocket path of the broker URL (often /mqtt) and that the"
                " listener speaks MQTT over WebSocket",
            )
            err.permanent = True
            fut.set_exception(err)
            fut.exception()
        if self.transport is not None:
            self.transport.abort()

    def _violation(self, what: str) -> None:
        if not self._open:
            self._refuse(f"broke the WebSocket upgrade: {what}")
            return
        self.conn.link.on_protocol_violation(self.conn, what)

    # -- sending --

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_frame(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._write(self.ws.send(BytesMessage(data=data)))  # type: ignore[arg-type] # wsproto takes any buffer
        except LocalProtocolError:
            pass  # closing: what is left is not sent, as on a closed TCP connection

    def close(self, code: int) -> None:
        """A closing handshake, then the TCP/TLS close once the write buffer is flushed."""
        if self.ws.state is ConnectionState.OPEN:
            self._write(self.ws.send(CloseConnection(code=code)))
        if self.transport is not None:
            self.transport.close()


def websocket_pump(conn: Conn) -> Callable[[], WebSocketPump]:
    """The protocol factory that carries `conn` over a WebSocket to its link's broker."""
    s = conn.link.settings
    assert s.websocket_path is not None
    default_port = 443 if s.tls else 80
    return lambda: WebSocketPump(
        conn, host=s.host, port=s.port, path=s.websocket_path or "/", default_port=default_port
    )
