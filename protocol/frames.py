"""The binary frames published to a node's inbox topic (SPEC.md section 3).

Every frame starts with a version byte and a type byte; integers are big-endian. Handshake
frames carry Noise handshake messages; DATA frames carry Noise transport ciphertext with an
explicit 64-bit counter, whose 14-byte header is the AEAD associated data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from protocol.errors import RemoteProtocolError

VERSION = 1
MAX_PEER_ID_LEN = 23
INVITE_ID_LEN = 16
TICKET_ID_LEN = 16
# A Noise message is at most 65535 bytes; the largest header is HELLO_PSK's.
MAX_FRAME_LEN = 65535 + 2 + 4 + 1 + MAX_PEER_ID_LEN + INVITE_ID_LEN


class FrameType(IntEnum):
    HELLO = 0x01  # Noise message 1, ordinary session
    HELLO_PSK = 0x02  # Noise message 1, pairing by invite (XXpsk3 with the invite's PSK)
    REPLY = 0x03  # Noise message 2
    FINISH = 0x04  # Noise message 3
    DATA = 0x05  # transport message
    RESUME = 0x06  # Noise message 1 of a resumption (KKhfs+psk0 with a ticket, SPEC.md 4.7)
    EARLY = 0x07  # an initiator's early data, between RESUME and the REPLY
    REFUSED = 0x08  # the answer to a HELLO_PSK naming an invite already used or expired


@dataclass(frozen=True, slots=True)
class Hello:
    sender_index: int
    reply_to: str
    noise: bytes
    invite_id: bytes | None = None  # set for HELLO_PSK
    ticket_id: bytes | None = None  # set for RESUME


@dataclass(frozen=True, slots=True)
class Reply:
    receiver_index: int
    sender_index: int
    noise: bytes


@dataclass(frozen=True, slots=True)
class Finish:
    receiver_index: int
    noise: bytes


@dataclass(frozen=True, slots=True)
class Data:
    receiver_index: int
    counter: int
    ciphertext: bytes
    header: bytes  # the first DATA_HEADER.size bytes: the AEAD associated data


@dataclass(frozen=True, slots=True)
class Early:
    sender_index: int  # the initiator's index, as in its RESUME
    counter: int
    ciphertext: bytes
    header: bytes  # the first DATA_HEADER.size bytes: the AEAD associated data


@dataclass(frozen=True, slots=True)
class Refused:
    """An inviter's answer to a HELLO_PSK for an invite it closed: unauthenticated, so it only
    ends the joiner's wait early (SPEC.md 3 and SECURITY.md say why that is safe)."""

    receiver_index: int  # the joiner's sender_index from its HELLO_PSK
    reason: str  # "used" or "expired"


REFUSAL_CODES: dict[str, int] = {"used": 1, "expired": 2}
_REFUSAL_NAMES = {code: name for name, code in REFUSAL_CODES.items()}

Frame = Hello | Reply | Finish | Data | Early | Refused

_HEAD = struct.Struct(">BB")
_HELLO = struct.Struct(">BBIB")
_REPLY = struct.Struct(">BBII")
_FINISH = struct.Struct(">BBI")
DATA_HEADER = struct.Struct(">BBIQ")


def valid_peer_id(text: str) -> bool:
    """A peer id as it addresses a node on the broker (its MQTT client id): 1-23 of a-z, 0-9."""
    return (
        0 < len(text) <= MAX_PEER_ID_LEN
        and text.isascii()
        and text.isalnum()
        and (text == text.lower())
    )


def encode_hello(sender_index: int, reply_to: str, noise: bytes, invite_id: bytes | None) -> bytes:
    rt = reply_to.encode("ascii")
    kind = FrameType.HELLO if invite_id is None else FrameType.HELLO_PSK
    head = _HELLO.pack(VERSION, kind, sender_index, len(rt)) + rt
    return head + (invite_id or b"") + noise


def encode_resume(sender_index: int, reply_to: str, ticket_id: bytes, noise: bytes) -> bytes:
    rt = reply_to.encode("ascii")
    head = _HELLO.pack(VERSION, FrameType.RESUME, sender_index, len(rt)) + rt
    return head + ticket_id + noise


def early_header(sender_index: int, counter: int) -> bytes:
    return DATA_HEADER.pack(VERSION, FrameType.EARLY, sender_index, counter)


def encode_reply(receiver_index: int, sender_index: int, noise: bytes) -> bytes:
    return _REPLY.pack(VERSION, FrameType.REPLY, receiver_index, sender_index) + noise


def encode_finish(receiver_index: int, noise: bytes) -> bytes:
    return _FINISH.pack(VERSION, FrameType.FINISH, receiver_index) + noise


_REFUSED = struct.Struct(">BBIB")


def encode_refused(receiver_index: int, reason: str) -> bytes:
    return _REFUSED.pack(VERSION, FrameType.REFUSED, receiver_index, REFUSAL_CODES[reason])


def data_header(receiver_index: int, counter: int) -> bytes:
    return DATA_HEADER.pack(VERSION, FrameType.DATA, receiver_index, counter)


def decode(frame: bytes) -> Frame:
    """Parse one inbox frame. Raises RemoteProtocolError (reason "malformed"/"oversize"/
    "version") for anything that is not a well-formed frame of this version."""
    n = len(frame)
    if n > MAX_FRAME_LEN:
        raise RemoteProtocolError(f"frame of {n} bytes is over the limit", reason="oversize")
    if n < _HEAD.size:
        raise RemoteProtocolError("frame too short", reason="malformed")
    version, kind = _HEAD.unpack_from(frame)
    if version != VERSION:
        raise RemoteProtocolError(f"frame version {version} is not {VERSION}", reason="version")
    if kind in (FrameType.DATA, FrameType.EARLY):
        if n < DATA_HEADER.size + 16:
            raise RemoteProtocolError("DATA frame too short", reason="malformed")
        _, _, index, counter = DATA_HEADER.unpack_from(frame)
        cls = Data if kind == FrameType.DATA else Early
        return cls(index, counter, frame[DATA_HEADER.size :], frame[: DATA_HEADER.size])
    if kind in (FrameType.HELLO, FrameType.HELLO_PSK, FrameType.RESUME):
        if n < _HELLO.size:
            raise RemoteProtocolError("HELLO frame too short", reason="malformed")
        _, _, index, rt_len = _HELLO.unpack_from(frame)
        pos = _HELLO.size + rt_len
        invite_id = ticket_id = None
        if kind == FrameType.HELLO_PSK:
            invite_id = frame[pos : pos + INVITE_ID_LEN]
            pos += INVITE_ID_LEN
        elif kind == FrameType.RESUME:
            ticket_id = frame[pos : pos + TICKET_ID_LEN]
            pos += TICKET_ID_LEN
        if n < pos + 32:  # at least the initiator's ephemeral key
            raise RemoteProtocolError("HELLO frame too short", reason="malformed")
        try:
            reply_to = frame[_HELLO.size : _HELLO.size + rt_len].decode("ascii")
        except UnicodeDecodeError:
            reply_to = ""
        if not valid_peer_id(reply_to):
            raise RemoteProtocolError("HELLO names an invalid reply peer id", reason="malformed")
        return Hello(index, reply_to, frame[pos:], invite_id, ticket_id)
    if kind == FrameType.REPLY:
        if n < _REPLY.size + 32:
            raise RemoteProtocolError("REPLY frame too short", reason="malformed")
        _, _, receiver, sender = _REPLY.unpack_from(frame)
        return Reply(receiver, sender, frame[_REPLY.size :])
    if kind == FrameType.FINISH:
        if n < _FINISH.size + 16:
            raise RemoteProtocolError("FINISH frame too short", reason="malformed")
        _, _, receiver = _FINISH.unpack_from(frame)
        return Finish(receiver, frame[_FINISH.size :])
    if kind == FrameType.REFUSED:
        if n != _REFUSED.size:
            raise RemoteProtocolError("REFUSED frame of the wrong size", reason="malformed")
        _, _, receiver, code = _REFUSED.unpack_from(frame)
        if code not in _REFUSAL_NAMES:
            raise RemoteProtocolError(f"REFUSED with unknown reason {code}", reason="malformed")
        return Refused(receiver, _REFUSAL_NAMES[code])
    raise RemoteProtocolError(f"unknown frame type {kind}", reason="malformed")
