"""Application messages inside a session, and reliable channels (SPEC.md section 5).

An APP payload is a msgpack array whose first element is a type tag. Tags 1..31 are defined
here; 32..63 belong to the transfer protocol (`protocol/transfer`), which decodes its own.

Channels give exactly-once, in-order delivery per (peer, channel) over sessions that may drop,
duplicate or reorder (a peer restarts, the broker restarts, a rekey happens): the sender numbers
messages 1, 2, 3 ... per (peer, channel) and retransmits until a cumulative ACK covers them;
the receiver delivers each number once and in order, buffering a bounded number ahead of a gap.
Both sides persist their counters in the shell's store, so this survives restarts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError

TAG_MSG = 1
TAG_ACK = 2
TAG_REVOCATION = 3
TRANSFER_TAGS = range(32, 64)

MAX_MESSAGE = 60000  # bytes of application data in one channel message
MAX_CHANNEL = 64
MAX_STATEMENT = 4096
MAX_SEQ = 2**63 - 1
_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")


def check_channel(name: str) -> str:
    """Channel names: 1..64 of letters, digits and `._/-`, starting with a letter or digit."""
    if not _CHANNEL.fullmatch(name):
        raise LocalProtocolError(
            f"invalid channel name {name!r}",
            hint="use 1-64 letters, digits, '.', '_', '/' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    channel: str
    seq: int
    data: bytes

    def encode(self) -> bytes:
        return msgpack.packb([TAG_MSG, self.channel, self.seq, self.data])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class ChannelAck:
    """Every message of `channel` up to and including `seq` is durably delivered."""

    channel: str
    seq: int

    def encode(self) -> bytes:
        return msgpack.packb([TAG_ACK, self.channel, self.seq])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class RevocationPush:
    """A signed revocation statement (section 6), pushed to connected peers at once."""

    statement: bytes

    def encode(self) -> bytes:
        return msgpack.packb([TAG_REVOCATION, self.statement])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class TransferPayload:
    """A transfer-protocol message, still encoded: `protocol.transfer` decodes it."""

    tag: int
    raw: bytes


AppMessage = ChannelMessage | ChannelAck | RevocationPush | TransferPayload


def _bad(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed application message: {detail}", reason="malformed")


def decode_app(payload: bytes) -> AppMessage:
    if len(payload) > 65535:
        raise _bad("too large")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=65535)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise _bad("not msgpack") from exc
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], int):
        raise _bad("not a tagged array")
    tag = obj[0]
    if tag in TRANSFER_TAGS:
        return TransferPayload(tag, payload)
    if tag == TAG_MSG:
        if len(obj) != 4:
            raise _bad("MSG has 4 fields")
        _, channel, seq, data = obj
        _check_channel_seq(channel, seq)
        if not isinstance(data, bytes) or len(data) > MAX_MESSAGE:
            raise _bad("MSG data must be bytes of at most 60000")
        return ChannelMessage(channel, seq, data)
    if tag == TAG_ACK:
        if len(obj) != 3:
            raise _bad("ACK has 3 fields")
        _, channel, seq = obj
        _check_channel_seq(channel, seq)
        return ChannelAck(channel, seq)
    if tag == TAG_REVOCATION:
        if len(obj) != 2 or not isinstance(obj[1], bytes) or len(obj[1]) > MAX_STATEMENT:
            raise _bad("REVOCATION carries one statement")
        return RevocationPush(obj[1])
    raise _bad(f"unknown tag {tag}")


def _check_channel_seq(channel: object, seq: object) -> None:
    if not isinstance(channel, str) or not _CHANNEL.fullmatch(channel):
        raise _bad("bad channel name")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise _bad("bad sequence number")


@dataclass(frozen=True, slots=True)
class Inbound:
    """What receiving one message means: deliver these (in order), then acknowledge `ack`."""

    deliver: tuple[ChannelMessage, ...]
    ack: int
    duplicate: bool


class InboundChannel:
    """The receiving end of one (peer, channel). `last` is the last number delivered durably."""

    __slots__ = ("_ahead", "last", "max_ahead")

    def __init__(self, last: int = 0, max_ahead: int = 256) -> None:
        self.last = last
        self.max_ahead = max_ahead
        self._ahead: dict[int, ChannelMessage] = {}

    def receive(self, msg: ChannelMessage) -> Inbound:
        if msg.seq <= self.last or msg.seq in self._ahead:
            # Already have it: acknowledge again, the ACK may have been lost.
            return Inbound((), self.last, True)
        if msg.seq > self.last + self.max_ahead:
            # Too far ahead to buffer; the sender retransmits after the gap is filled.
            return Inbound((), self.last, False)
        self._ahead[msg.seq] = msg
        ready = []
        while self.last + 1 in self._ahead:
            self.last += 1
            ready.append(self._ahead.pop(self.last))
        return Inbound(tuple(ready), self.last, False)

    @property
    def buffered(self) -> int:
        return len(self._ahead)


class OutboundChannel:
    """The sending end of one (peer, channel): which numbers to (re)send when.

    The messages themselves live in the shell's durable outbox; this tracks numbers only.
    """

    __slots__ = ("_highest", "_sent", "acked", "rto", "window")

    def __init__(self, acked: int = 0, *, window: int = 64, rto: float = 2.0) -> None:
        self.acked = acked
        self.window = window
        self.rto = rto
        self._sent: dict[int, float] = {}  # seq -> when last sent
        self._highest = acked

    def due(self, pending: list[int], now: float) -> list[int]:
        """Of the numbers waiting in the outbox (ascending), those to send now."""
        out = []
        for seq in pending:
            if seq <= self.acked:
                continue
            if seq > self.acked + self.window:
                break
            sent = self._sent.get(seq)
            if sent is None or now - sent >= self.rto:
                self._sent[seq] = now
                self._highest = max(self._highest, seq)
                out.append(seq)
        return out

    def ack(self, seq: int) -> bool:
        """A cumulative ACK; False if it acknowledges nothing new (stale or duplicate), or
        claims numbers never sent (a confused or hostile peer must not make us skip any)."""
        if seq <= self.acked or seq > self._highest:
            return False
        self.acked = seq
        for s in [s for s in self._sent if s <= seq]:
            del self._sent[s]
        return True

    def reset(self) -> None:
        """A new session: everything unacknowledged goes again at once."""
        self._sent.clear()

    def next_deadline(self) -> float | None:
        return min(self._sent.values()) + self.rto if self._sent else None


# -- the revocation index (SPEC.md 2.1) --------------------------------------------------------

INDEX_VERSION = 1
MAX_INDEX_STATEMENTS = 32
MAX_INDEX_SIZE = 16384  # fits the smallest packet limit peerd accepts (16 KiB chunks + 1 KiB)


def encode_revocation_index(statements: list[bytes]) -> bytes:
    """The retained payload of `rev/<issuer>/index`: the issuer's statements, in its order
    (newest first), as many as fit `MAX_INDEX_STATEMENTS` and `MAX_INDEX_SIZE`; the rest are
    left out. Raises LocalProtocolError for a statement that is no statement's size."""
    chosen: list[bytes] = []
    for statement in statements:
        if not isinstance(statement, bytes) or not 0 < len(statement) <= MAX_STATEMENT:
            raise LocalProtocolError("a revocation statement is 1-4096 bytes")
        if statement in chosen:
            continue
        candidate = [*chosen, statement]
        if len(_pack_index(candidate)) > MAX_INDEX_SIZE:
            break
        chosen = candidate
        if len(chosen) == MAX_INDEX_STATEMENTS:
            break
    return _pack_index(chosen)


def _pack_index(statements: list[bytes]) -> bytes:
    return msgpack.packb([INDEX_VERSION, statements], use_bin_type=True)  # type: ignore[no-any-return]


def decode_revocation_index(data: bytes) -> list[bytes]:
    """The statements of an index, checked for shape only (each is then checked as if it had
    come on its own topic). Raises RemoteProtocolError("malformed") for anything else."""

    def bad(detail: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"malformed revocation index: {detail}", reason="malformed")

    if len(data) > MAX_INDEX_SIZE:
        raise bad(f"{len(data)} bytes, more than {MAX_INDEX_SIZE}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_STATEMENT)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise bad("not msgpack") from exc
    if not isinstance(obj, list) or len(obj) != 2 or obj[0] != INDEX_VERSION:
        raise bad(f"not a version {INDEX_VERSION} index")
    statements = obj[1]
    if (
        not isinstance(statements, list)
        or len(statements) > MAX_INDEX_STATEMENTS
        or not all(isinstance(s, bytes) and s for s in statements)
        or len(set(statements)) != len(statements)
    ):
        raise bad(f"not a list of at most {MAX_INDEX_STATEMENTS} distinct statements")
    if _pack_index(statements) != bytes(data):
        raise bad("not in canonical form")
    return list(statements)
