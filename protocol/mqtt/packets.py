"""MQTT packet encodings (3.1.1, protocol level 4, and 5) for what a client sends, and the MQTT 5
property codec both directions use.

Only what peerd needs: CONNECT, PUBLISH (QoS 0/1), PUBACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
DISCONNECT. No will message, no QoS 2, no topic aliases, no AUTH exchange.
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError

__all__ = [
    "DISCONNECT",
    "MAX_REMAINING",
    "PINGREQ",
    "V5",
    "V311",
    "connect_packet",
    "encode_properties",
    "puback_packet",
    "publish_header",
    "str16",
    "subscribe_packet",
    "unsubscribe_packet",
    "varint",
]

V311 = 4  # the protocol level byte of MQTT 3.1.1
V5 = 5
MAX_REMAINING = 268_435_455  # the largest remaining length four varint bytes can say

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"  # MQTT 5 reads an empty body as reason 0x00, normal disconnection

# MQTT 5 property identifiers peerd reads or writes (section 2.2.2.2 of the standard).
MESSAGE_EXPIRY = 0x02
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
REQUEST_PROBLEM_INFO = 0x17
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A
SERVER_REFERENCE = 0x1C
RESPONSE_INFORMATION = 0x1A
AUTHENTICATION_METHOD = 0x15
AUTHENTICATION_DATA = 0x16

# Every property of the standard and the type of its value: a decoder must skip (and check)
# properties it does not use, and one of an unknown identifier is malformed.
BYTE, U16, U32, VARINT, UTF8, BINARY, PAIR = range(7)
PROPERTY_TYPES: dict[int, int] = {
    0x01: BYTE,  # payload format indicator
    MESSAGE_EXPIRY: U32,
    0x03: UTF8,  # content type
    0x08: UTF8,  # response topic
    0x09: BINARY,  # correlation data
    0x0B: VARINT,  # subscription identifier
    SESSION_EXPIRY: U32,
    ASSIGNED_CLIENT_ID: UTF8,
    SERVER_KEEP_ALIVE: U16,
    AUTHENTICATION_METHOD: UTF8,
    AUTHENTICATION_DATA: BINARY,
    REQUEST_PROBLEM_INFO: BYTE,
    0x18: U32,  # will delay interval
    0x19: BYTE,  # request response information
    RESPONSE_INFORMATION: UTF8,
    SERVER_REFERENCE: UTF8,
    REASON_STRING: UTF8,
    RECEIVE_MAXIMUM: U16,
    TOPIC_ALIAS_MAXIMUM: U16,
    TOPIC_ALIAS: U16,
    MAXIMUM_QOS: BYTE,
    RETAIN_AVAILABLE: BYTE,
    USER_PROPERTY: PAIR,
    MAXIMUM_PACKET_SIZE: U32,
    WILDCARD_SUBSCRIPTION_AVAILABLE: BYTE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE: BYTE,
    SHARED_SUBSCRIPTION_AVAILABLE: BYTE,
}


def varint(n: int) -> bytes:
    """The MQTT variable byte integer of `n` (0 .. MAX_REMAINING)."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if not 0 <= n <= MAX_REMAINING:
        raise LocalProtocolError(f"{n} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def str16(raw: bytes) -> bytes:
    """A two-byte length prefix and `raw` (an MQTT string or binary data)."""
    if len(raw) > 0xFFFF:
        raise LocalProtocolError("an MQTT string is at most 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def encode_properties(props: dict[int, int | bytes]) -> bytes:
    """An MQTT 5 property block (its length, then each property) from id -> value."""
    out = bytearray()
    for pid, value in props.items():
        kind = PROPERTY_TYPES[pid]
        out += varint(pid)
        if kind == BYTE:
            assert isinstance(value, int)
            out.append(value)
        elif kind == U16:
            assert isinstance(value, int)
            out += value.to_bytes(2, "big")
        elif kind == U32:
            assert isinstance(value, int)
            out += value.to_bytes(4, "big")
        elif kind == VARINT:
            assert isinstance(value, int)
            out += varint(value)
        else:
            assert isinstance(value, bytes)
            out += str16(value)
    return varint(len(out)) + bytes(out)


def connect_packet(
    *,
    version: int,
    client_id: str,
    keepalive: int,
    clean_start: bool,
    username: str | None,
    password: str | None,
    session_expiry: int = 0,
    receive_maximum: int | None = None,
    max_packet_size: int | None = None,
) -> bytes:
    """CONNECT. With MQTT 5 it carries the session expiry, and the receive maximum and packet
    size this client accepts, so the broker holds itself to them."""
    if version not in (V311, V5):
        raise LocalProtocolError(f"unsupported MQTT protocol level {version}")
    flags = 0x02 if clean_start else 0
    payload = str16(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += str16(username.encode())
    if password is not None:
        if username is None and version == V311:
            raise LocalProtocolError("MQTT 3.1.1 has no password without a username")
        flags |= 0x40
        payload += str16(password.encode())
    body = b"\x00\x04MQTT" + bytes((version, flags)) + keepalive.to_bytes(2, "big")
    if version == V5:
        props: dict[int, int | bytes] = {}
        if session_expiry:
            props[SESSION_EXPIRY] = session_expiry
        if receive_maximum is not None:
            props[RECEIVE_MAXIMUM] = receive_maximum
        if max_packet_size is not None:
            props[MAXIMUM_PACKET_SIZE] = max_packet_size
        body += encode_properties(props)
    body += payload
    return b"\x10" + varint(len(body)) + body


def publish_header(  # noqa: PLR0917 - the hot path: positional arguments are cheaper
    version: int,
    topic: bytes,
    payload_len: int,
    qos: int,
    retain: bool,
    dup: bool,
    mid: int,
    expiry: int | None = None,
) -> bytes:
    """Everything of a PUBLISH before its payload (the payload is written as it is: no copy)."""
    tlen = len(topic)
    if version == V5:
        props = b"\x00" if expiry is None else b"\x05\x02" + expiry.to_bytes(4, "big")
    else:
        props = b""
    if qos:
        return (
            bytes((0x32 | (dup << 3) | retain,))
            + varint(4 + tlen + len(props) + payload_len)
            + tlen.to_bytes(2, "big")
            + topic
            + mid.to_bytes(2, "big")
            + props
        )
    return (
        bytes((0x30 | retain,))
        + varint(2 + tlen + len(props) + payload_len)
        + tlen.to_bytes(2, "big")
        + topic
        + props
    )


def puback_packet(mid: bytes) -> bytes:
    """PUBACK for the two packet id bytes `mid` (in MQTT 5 too: no reason code means success)."""
    return b"\x40\x02" + mid


def subscribe_packet(version: int, mid: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE. In MQTT 5 the options byte holds the QoS only: no local, retain as
    published and retained messages sent at subscribe are all left at the 3.1.1 behaviour."""
    body = mid.to_bytes(2, "big")
    if version == V5:
        body += b"\x00"
    body += b"".join(str16(f.encode()) + bytes((q,)) for f, q in filters)
    return b"\x82" + varint(len(body)) + body


def unsubscribe_packet(version: int, mid: int, filters: list[str]) -> bytes:
    body = mid.to_bytes(2, "big")
    if version == V5:
        body += b"\x00"
    body += b"".join(str16(f.encode()) for f in filters)
    return b"\xa2" + varint(len(body)) + body
