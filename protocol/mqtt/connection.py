"""One MQTT client connection as a sans-IO state machine: bytes in, events out, bytes to send.

    conn = Connection(version=V5, max_packet_size=1 << 20)
    conn.connect(client_id="...", keepalive=30, clean_start=True)
    write(conn.data_to_send())
    ... conn.receive_data(bytes_from_socket)
    while (event := conn.next_event()) is not None: ...

The asyncio shell (peerd/mqtt/) only pumps it. For the hot path the receive side is also an
`asyncio.BufferedProtocol`-shaped pair, `get_buffer()` / `buffer_updated()`: the socket reads
straight into this object's buffer, and a large packet body straight into a buffer of its own
size, so a 256 KiB chunk is not copied on its way in. On the way out a large payload is handed to
`data_to_send()` as it was given (no join with its header).

Incoming QoS 1 PUBLISH packets are acknowledged as soon as they are parsed (the PUBACK is queued
for `data_to_send()`): a PUBACK is not durability or flow control, which belong to the layers
above. A packet above `max_packet_size` is skipped without being buffered whole, and counted as a
`Dropped` event; a QoS 1 one is acknowledged anyway, or it would hold one of the broker's
in-flight slots for us forever.

What the broker sends that breaks the protocol ends the connection with a `Violation` event (the
last one). What we ask for that breaks it (a publish above the broker's packet limit, a publish
before CONNACK) raises `LocalProtocolError`.
"""

from __future__ import annotations

import enum
from collections import deque

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.mqtt.events import (
    BrokerLimits,
    ConnAck,
    Disconnect,
    Dropped,
    Event,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    UnsubAck,
    Violation,
)
from protocol.mqtt.packets import (
    ASSIGNED_CLIENT_ID,
    BINARY,
    BYTE,
    DISCONNECT,
    MAX_REMAINING,
    MAXIMUM_PACKET_SIZE,
    MAXIMUM_QOS,
    PAIR,
    PINGREQ,
    PROPERTY_TYPES,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    RETAIN_AVAILABLE,
    SERVER_KEEP_ALIVE,
    SESSION_EXPIRY,
    U16,
    U32,
    USER_PROPERTY,
    UTF8,
    V5,
    V311,
    VARINT,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    connect_packet,
    puback_packet,
    publish_header,
    subscribe_packet,
    unsubscribe_packet,
)

__all__ = ["READ_BUFFER", "Connection", "State"]

# Read buffer: small packets are parsed out of it in batches; a packet body larger than
# DIRECT_BODY is read straight into a buffer of its own size (no copy through this one). Its size
# also covers the longest PUBLISH prefix (topic + packet id + properties) we must parse to
# acknowledge an oversize packet we skip.
READ_BUFFER = 128 * 1024
DIRECT_BODY = 16 * 1024
# Payloads up to this size are joined to their header (one write); larger ones are not copied.
JOIN_BELOW = 16 * 1024


class State(enum.Enum):
    CONNECTING = "connecting"  # CONNECT not yet answered
    CONNECTED = "connected"
    CLOSED = "closed"  # refused, violated, disconnected by the broker, or by us


Buffer = bytes | bytearray | memoryview


class Connection:
    """The client side of one MQTT connection (protocol level 4 or 5)."""

    def __init__(self, *, version: int = V311, max_packet_size: int = MAX_REMAINING + 5) -> None:
        if version not in (V311, V5):
            raise LocalProtocolError(f"unsupported MQTT protocol level {version}")
        if max_packet_size < 64:
            raise LocalProtocolError("a packet limit below 64 bytes leaves no room for a PUBLISH")
        self.version = version
        self.max_packet_size = max_packet_size  # what we accept (and announce in MQTT 5)
        self.state = State.CONNECTING
        # What the broker accepts: the whole packet, fixed header included (MQTT 5 CONNACK).
        self.send_limit = MAX_REMAINING + 5
        self.limits: BrokerLimits | None = None
        self._events: deque[Event] = deque()
        self._out: list[Buffer] = []
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # A large packet body is read straight into `_store` (kept, and grown up to the packet
        # limit): a fresh buffer per packet would cost its page faults on every chunk.
        self._store = bytearray(0)
        self._store_view = memoryview(self._store)
        self._body = 0  # length of the large packet body being read directly, or 0
        self._body_view = self._view
        self._body_cmd = 0
        self._body_filled = 0
        self._skip = 0  # bytes left of an oversize packet being discarded

    # -- sending ---------------------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """The buffers to write, in order; the caller must not change them."""
        out = self._out
        if out:
            self._out = []
        return out

    def connect(
        self,
        *,
        client_id: str,
        keepalive: int,
        clean_start: bool = True,
        username: str | None = None,
        password: str | None = None,
        session_expiry: int = 0,
        receive_maximum: int | None = None,
        announce_limit: bool = False,
    ) -> None:
        """CONNECT. `announce_limit` tells an MQTT 5 broker our `max_packet_size`; off by default:
        Mosquitto then drops oversize messages for us but keeps their QoS 1 in-flight slots,
        and delivery to us stalls (measured), where skipping and acknowledging them here does
        not."""
        if self.state is not State.CONNECTING or self._out:
            raise LocalProtocolError("CONNECT is the first packet of a connection, once")
        self._out.append(
            connect_packet(
                version=self.version,
                client_id=client_id,
                keepalive=keepalive,
                clean_start=clean_start,
                username=username,
                password=password,
                session_expiry=session_expiry,
                receive_maximum=receive_maximum,
                max_packet_size=min(self.max_packet_size, 0xFFFFFFFF) if announce_limit else None,
            )
        )

    def publish(  # noqa: PLR0917 - the hot path: positional arguments are cheaper
        self,
        topic: bytes,
        payload: Buffer,
        qos: int,
        retain: bool,
        dup: bool,
        mid: int,
        expiry: int | None = None,
    ) -> None:
        """PUBLISH `payload` (not copied unless small). `topic` is the encoded topic name."""
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"cannot publish on a connection that is {self.state.value}")
        n = len(payload)
        header = publish_header(self.version, topic, n, qos, retain, dup, mid, expiry)
        if len(header) + n > self.send_limit:
            raise LocalProtocolError(
                f"a {len(header) + n}-byte PUBLISH exceeds the broker's packet limit of"
                f" {self.send_limit} bytes"
            )
        if n < JOIN_BELOW:
            self._out.append(header + payload)
        else:
            self._out.append(header)
            self._out.append(payload)

    def publish_overhead(self, topic: bytes, qos: int = 1, expiry: int | None = None) -> int:
        """Bytes a PUBLISH to `topic` adds around its payload (at the largest varint): the
        payload limit is `send_limit` minus this."""
        return len(publish_header(self.version, topic, 0, qos, False, False, 1, expiry)) + 3

    def subscribe(self, mid: int, filters: list[tuple[str, int]]) -> None:
        self._require_connected("subscribe")
        self._out.append(subscribe_packet(self.version, mid, filters))

    def unsubscribe(self, mid: int, filters: list[str]) -> None:
        self._require_connected("unsubscribe")
        self._out.append(unsubscribe_packet(self.version, mid, filters))

    def ping(self) -> None:
        self._require_connected("ping")
        self._out.append(PINGREQ)

    def disconnect(self) -> None:
        """Say DISCONNECT (once connected) and close."""
        if self.state is State.CONNECTED:
            self._out.append(DISCONNECT)
        self.state = State.CLOSED

    def _require_connected(self, what: str) -> None:
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"cannot {what} on a connection that is {self.state.value}")

    # -- receiving -------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event parsed from what was received, or None."""
        events = self._events
        return events.popleft() if events else None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the broker (a copy; `get_buffer` avoids it)."""
        view = memoryview(data).cast("B")
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the broker go (then call `buffer_updated`)."""
        if self._body:
            return self._body_view[self._body_filled :]
        if self._skip:
            return self._view[: min(self._skip, READ_BUFFER)]
        if self._end == READ_BUFFER:  # full of a partial small packet: compact
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written at the start of the last `get_buffer()` view."""
        if self.state is State.CLOSED:
            return
        try:
            if self._body:
                self._body_filled += nbytes
                if self._body_filled == self._body:
                    body, self._body_view = self._body_view, self._view
                    self._body = 0
                    self._handle(self._body_cmd, body)
                return
            if self._skip:
                self._skip -= nbytes
                return
            self._end += nbytes
            self._parse()
        except RemoteProtocolError as exc:
            self._fail(str(exc))

    def _fail(self, what: str) -> None:
        self.state = State.CLOSED
        self._events.append(Violation(f"the broker sent {what}"))
        self._start = self._end = self._skip = self._body = 0

    def _parse(self) -> None:
        buf = self._buf
        pos = self._start
        end = self._end
        while end - pos >= 2:
            cmd = buf[pos]
            b = buf[pos + 1]
            if b < 0x80:
                length = b
                hdr = 2
            else:
                length = b & 0x7F
                shift = 7
                i = pos + 2
                while True:
                    if i >= end:
                        length = -1
                        break
                    b = buf[i]
                    length |= (b & 0x7F) << shift
                    i += 1
                    if b < 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise _malformed("a remaining length longer than 4 bytes")
                if length < 0:
                    break
                hdr = i - pos
            total = hdr + length
            if total > self.max_packet_size:
                if not self._discard(cmd, pos + hdr, min(end - pos - hdr, length), total):
                    break  # need more of its prefix first
                if end - pos >= total:
                    pos += total
                    continue
                self._skip = total - (end - pos)
                self._start = self._end = 0
                return
            if end - pos >= total:
                self._handle(cmd, self._view[pos + hdr : pos + total])
                if self.state is State.CLOSED:
                    return
                pos += total
                continue
            if length > DIRECT_BODY:
                have = end - pos - hdr
                if len(self._store) < length:
                    self._store_view.release()
                    self._store = bytearray(length)
                    self._store_view = memoryview(self._store)
                self._body_view = self._store_view[:length]
                self._body_view[:have] = self._view[pos + hdr : end]
                self._body = length
                self._body_cmd = cmd
                self._body_filled = have
                self._start = self._end = 0
                return
            break
        if pos == end:
            self._start = self._end = 0
        else:
            self._start = pos
            if READ_BUFFER - end < DIRECT_BODY + 5:
                n = end - pos
                self._buf[:n] = self._buf[pos:end]
                self._start, self._end = 0, n

    def _discard(self, cmd: int, body_at: int, have: int, total: int) -> bool:
        """Count an oversize packet, acknowledging it if a QoS 1 PUBLISH; False: need more."""
        if cmd >> 4 != 3:
            raise _malformed(f"an oversize packet of type {cmd >> 4}")
        if have < 2:
            return False
        tlen = (self._buf[body_at] << 8) | self._buf[body_at + 1]
        qos = (cmd >> 1) & 3
        if have < 2 + tlen + (2 if qos else 0):
            return False
        if qos == 1:
            at = body_at + 2 + tlen
            self._out.append(puback_packet(bytes(self._buf[at : at + 2])))
        self._events.append(Dropped("oversize", total))
        return True

    def _handle(self, cmd: int, body: memoryview) -> None:
        kind = cmd >> 4
        if kind != 3 and cmd & 0x0F:
            raise _malformed(f"packet type {kind} with reserved flags {cmd & 0x0F:#x}")
        if kind == 2:
            self._connack(body)
            return
        if self.state is not State.CONNECTED:
            raise _malformed(f"a packet of type {kind} before CONNACK")
        v5 = self.version == V5
        if kind == 3:  # PUBLISH
            self._publish(cmd, body)
        elif kind == 4:  # PUBACK
            n = len(body)
            if n < 2 or (n != 2 and not v5):
                raise _malformed("a malformed PUBACK")
            reason = body[2] if n > 2 else 0
            if n > 3:
                _properties(body, 3)
            self._events.append(PubAck((body[0] << 8) | body[1], reason))
        elif kind == 9:  # SUBACK
            if len(body) < 3:
                raise _malformed("a malformed SUBACK")
            at = _properties(body, 2)[1] if v5 else 2
            if at >= len(body):
                raise _malformed("a SUBACK without reason codes")
            self._events.append(SubAck((body[0] << 8) | body[1], bytes(body[at:])))
        elif kind == 11:  # UNSUBACK
            if len(body) < 2 or (len(body) != 2 and not v5):
                raise _malformed("a malformed UNSUBACK")
            codes = b""
            if v5 and len(body) > 2:
                codes = bytes(body[_properties(body, 2)[1] :])
            self._events.append(UnsubAck((body[0] << 8) | body[1], codes))
        elif kind == 13:  # PINGRESP
            if len(body):
                raise _malformed("a malformed PINGRESP")
            self._events.append(PingResp())
        elif kind == 14 and v5:  # DISCONNECT from the broker, with its reason
            reason = body[0] if len(body) else 0
            props = _properties(body, 1)[0] if len(body) > 1 else {}
            self.state = State.CLOSED
            self._events.append(Disconnect(reason, _text(props.get(REASON_STRING))))
        else:
            raise _malformed(f"an unexpected packet of type {kind}")

    def _publish(self, cmd: int, body: memoryview) -> None:
        n = len(body)
        if n < 2:
            raise _malformed("a truncated PUBLISH")
        off = 2 + ((body[0] << 8) | body[1])
        qos = (cmd >> 1) & 3
        if qos:
            if qos != 1:
                raise _malformed(f"a QoS {qos} PUBLISH to a QoS 0/1 client")
            if off + 2 > n:
                raise _malformed("a truncated PUBLISH")
            self._out.append(puback_packet(bytes(body[off : off + 2])))
            topic_raw = bytes(body[2:off])
            off += 2
        else:
            if off > n:
                raise _malformed("a truncated PUBLISH")
            topic_raw = bytes(body[2:off])
        if self.version == V5:
            off = _skip_properties(body, off)
        try:
            topic = topic_raw.decode()
        except UnicodeDecodeError:
            topic = ""
        if not topic or "+" in topic or "#" in topic:
            # Empty: a topic alias, which we never allowed (Topic Alias Maximum is 0).
            self._events.append(Dropped("bad-topic", n - off))
            return
        self._events.append(Publish(topic, bytes(body[off:]), qos, bool(cmd & 1), bool(cmd & 8)))

    def _connack(self, body: memoryview) -> None:
        if self.state is not State.CONNECTING:
            raise _malformed("an unexpected CONNACK")
        n = len(body)
        if n < 2 or body[0] & 0xFE:
            raise _malformed("a malformed CONNACK")
        code = body[1]
        limits = BrokerLimits()
        reason_string = None
        if self.version == V5 and n > 2:
            props, _ = _properties(body, 2)
            limits = _limits(props)
            reason_string = _text(props.get(REASON_STRING))
        elif n != 2:
            raise _malformed("a malformed CONNACK")
        # A 3.1.1 broker answers a v5 CONNECT with a two-byte CONNACK: read it as such.
        version = self.version if n > 2 or self.version == V311 else V311
        if code == 0:
            self.state = State.CONNECTED
            self.limits = limits
            if limits.max_packet_size is not None:
                self.send_limit = limits.max_packet_size
        else:
            self.state = State.CLOSED
        self._events.append(ConnAck(code, bool(body[0] & 1), version, limits, reason_string))


def _malformed(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(what, reason="mqtt-malformed")


def _varint_at(body: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(at, min(at + 4, len(body))):
        b = body[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    raise _malformed("a malformed variable byte integer")


def _skip_properties(body: memoryview, at: int) -> int:
    length, at = _varint_at(body, at)
    if at + length > len(body):
        raise _malformed("properties longer than their packet")
    return at + length


def _properties(body: memoryview, at: int) -> tuple[dict[int, int | bytes], int]:
    """The MQTT 5 properties at `at` (id -> int or raw bytes; user properties dropped) and the
    offset after them. Unknown, truncated or repeated properties are malformed."""
    length, at = _varint_at(body, at)
    end = at + length
    if end > len(body):
        raise _malformed("properties longer than their packet")
    props: dict[int, int | bytes] = {}
    while at < end:
        pid, at = _varint_at(body, at)
        kind = PROPERTY_TYPES.get(pid)
        if kind is None:
            raise _malformed(f"an unknown property {pid:#x}")
        value: int | bytes
        if kind == BYTE:
            size = 1
        elif kind == U16:
            size = 2
        elif kind == U32:
            size = 4
        elif kind == VARINT:
            value, at = _varint_at(body, at)
            size = 0
        else:
            size = 0
        if kind in (BYTE, U16, U32):
            if at + size > end:
                raise _malformed("a truncated property")
            value = int.from_bytes(body[at : at + size], "big")
            at += size
        elif kind in (UTF8, BINARY, PAIR):
            value = b""
            for _ in range(2 if kind == PAIR else 1):
                if at + 2 > end:
                    raise _malformed("a truncated property")
                slen = (body[at] << 8) | body[at + 1]
                if at + 2 + slen > end:
                    raise _malformed("a truncated property")
                value = bytes(body[at + 2 : at + 2 + slen])
                at += 2 + slen
        if pid == USER_PROPERTY:
            continue
        if pid in props:
            raise _malformed(f"property {pid:#x} twice")
        props[pid] = value
    if at != end:
        raise _malformed("a property running past its block")
    return props, end


def _int(props: dict[int, int | bytes], pid: int, default: int) -> int:
    value = props.get(pid, default)
    return value if isinstance(value, int) else default


def _text(value: int | bytes | None) -> str | None:
    if not isinstance(value, bytes):
        return None
    return value.decode(errors="replace")


def _limits(props: dict[int, int | bytes]) -> BrokerLimits:
    max_packet = props.get(MAXIMUM_PACKET_SIZE)
    receive_maximum = _int(props, RECEIVE_MAXIMUM, 65535)
    maximum_qos = _int(props, MAXIMUM_QOS, 2)
    if (
        (max_packet is not None and not (isinstance(max_packet, int) and max_packet > 0))
        or receive_maximum == 0
        or (maximum_qos > 1 and MAXIMUM_QOS in props)
    ):
        raise _malformed("a CONNACK with invalid limits")
    session = props.get(SESSION_EXPIRY)
    keepalive = props.get(SERVER_KEEP_ALIVE)
    return BrokerLimits(
        max_packet_size=max_packet if isinstance(max_packet, int) else None,
        receive_maximum=receive_maximum,
        maximum_qos=maximum_qos,
        retain_available=_int(props, RETAIN_AVAILABLE, 1) == 1,
        wildcard_available=_int(props, WILDCARD_SUBSCRIPTION_AVAILABLE, 1) == 1,
        session_expiry=session if isinstance(session, int) else None,
        server_keepalive=keepalive if isinstance(keepalive, int) else None,
        assigned_client_id=_text(props.get(ASSIGNED_CLIENT_ID)),
    )
