"""Transfer control messages: what sender and receivers say to each other inside their Noise
sessions (the chunks themselves travel outside, on the transfer topic).

Each message is a msgpack array whose first element is its type tag, in 32..63 (the session
layer owns the other tags), followed by the transfer id and fixed fields. Decoding is strict and
bounded (MAX_CONTROL_BYTES); anything else raises MalformedTransferObject, a
RemoteProtocolError. The protocol tolerates loss, duplication and reordering of every message:
each one either states a fact that only grows (progress), or is answered again when repeated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Self

from protocol.errors import LocalProtocolError
from protocol.transfer import delta
from protocol.transfer._codec import (
    MalformedTransferObject,
    fields,
    pack,
    unpack,
    want_bytes,
    want_int,
    want_list,
    want_str,
)
from protocol.transfer.manifest import (
    CONTENT_KEY_BYTES,
    HASH_BYTES,
    MAX_CHUNK_COUNT,
    MAX_CHUNK_SIZE,
    MAX_FILE_SIZE,
    MAX_MANIFEST_BYTES,
    NAME_MAX_BYTES,
    SIGNATURE_BYTES,
    TRANSFER_ID_BYTES,
    check_layout,
    name_problem,
)

MAX_CONTROL_BYTES = 2048
MAX_RECIPE_BYTES = 32768  # a Recipe message: 1600 entries of 20 bytes and its fields
MAX_WINDOW = 1024  # chunks a receiver may grant beyond its durable prefix
MAX_SACK_BYTES = MAX_WINDOW // 8
MAX_REQUEST_RANGES = 64
MAX_INCARNATION = 2**63 - 1
MAX_DETAIL_BYTES = 200
_REASON = re.compile(r"[a-z][a-z0-9-]{0,31}")


class Tag(IntEnum):
    OFFER = 32
    ACCEPT = 33
    REFUSE = 34
    ACK = 35
    REQUEST = 36
    SEAL = 37
    VERIFIED = 38
    ABORT = 39
    RECIPE = 40
    HAVE = 41


class Reason:
    """Stable reason labels carried by Refuse and Abort (any label of the same form decodes)."""

    CANCELLED = "cancelled"
    SOURCE_CHANGED = "source-changed"
    REVOKED = "revoked"
    UNTRUSTED = "untrusted"
    TOO_LARGE = "too-large"
    NO_SPACE = "no-space"
    POLICY = "policy"
    HASH_MISMATCH = "hash-mismatch"
    BAD_SIGNATURE = "bad-signature"
    MANIFEST_MISMATCH = "manifest-mismatch"
    BAD_CONTENT = "bad-content"
    IO_ERROR = "io-error"
    TIMEOUT = "timeout"
    UNKNOWN_TRANSFER = "unknown-transfer"
    PROTOCOL = "protocol-error"
    OVER_BUDGET = "over-budget"


REASON_TEXT = {
    Reason.CANCELLED: "the transfer was cancelled",
    Reason.SOURCE_CHANGED: "the source file changed during the transfer",
    Reason.REVOKED: "a key involved in the transfer was revoked",
    Reason.UNTRUSTED: "the receiver does not trust the sender",
    Reason.TOO_LARGE: "the file is larger than the receiver accepts",
    Reason.NO_SPACE: "the receiver does not have enough free space",
    Reason.POLICY: "the receiver's policy refuses this file",
    Reason.HASH_MISMATCH: "the received file does not match the sender's signed hash",
    Reason.BAD_SIGNATURE: "the manifest's signature does not verify",
    Reason.MANIFEST_MISMATCH: "the signed manifest does not match the offer",
    Reason.BAD_CONTENT: "the received file's content was rejected",
    Reason.IO_ERROR: "a disk read or write failed",
    Reason.TIMEOUT: "the peer did not answer in time",
    Reason.UNKNOWN_TRANSFER: "the peer does not know this transfer",
    Reason.PROTOCOL: "the peer broke the transfer protocol",
    Reason.OVER_BUDGET: "the receiver asked for more re-sends than a transfer allows",
}
# Reasons for which a sender drops a receiver because of what the receiver did: a shell counts
# them as rejections of that peer.
PEER_FAULTS = frozenset({Reason.PROTOCOL, Reason.OVER_BUDGET})


def describe(reason: str) -> str:
    """One line for a user: what a reason label means."""
    return REASON_TEXT.get(reason, f"failed ({reason})")


def _is_control(ch: str) -> bool:
    """A C0/C1 control, a line or paragraph separator, or a bidi embedding or override."""
    return ch < " " or "\x7f" <= ch <= "\x9f" or ch in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e"


def _is_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


def detail_problem(text: str) -> str | None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DETAIL_BYTES:
        return f"longer than {MAX_DETAIL_BYTES} bytes"
    for ch in text:
        if _is_control(ch):
            return f"contains the control character U+{ord(ch):04X}"
        if _is_surrogate(ch):
            return "contains a lone surrogate"
    return None


def safe_detail(text: str) -> str:
    """`text` made fit for a Refuse or Abort detail (it passes `detail_problem`): control
    characters and lone surrogates dropped, truncated."""
    cleaned = "".join(ch for ch in text if not (_is_control(ch) or _is_surrogate(ch)))
    data = cleaned.encode()[:MAX_DETAIL_BYTES]
    return data.decode(errors="ignore")


def _check_reason(value: Any, detail: Any, what: str) -> tuple[str, str]:
    if type(value) is not str or not _REASON.fullmatch(value):
        raise MalformedTransferObject(f"{what} reason is not a label ([a-z][a-z0-9-]{{0,31}})")
    text = want_str(detail, f"{what} detail", max_len=MAX_DETAIL_BYTES)
    problem = detail_problem(text)
    if problem is not None:
        raise MalformedTransferObject(f"{what} detail {problem}")
    return value, text


def _check_own(check: Any, *args: Any, **kwargs: Any) -> None:
    """Run a field check on a message we build ourselves: a failure is our bug."""
    try:
        check(*args, **kwargs)
    except MalformedTransferObject as exc:
        raise LocalProtocolError(f"invalid control message: {exc}") from exc


class _Message:
    __slots__ = ()
    TAG: ClassVar[Tag]
    transfer_id: bytes

    def fields(self) -> list[Any]:
        raise NotImplementedError

    def encode(self) -> bytes:
        return pack([int(self.TAG), self.transfer_id, *self.fields()])

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Self:
        message = decode_message(data)
        if not isinstance(message, cls):
            raise MalformedTransferObject(
                f"expected a {cls.__name__} message, got {type(message).__name__}"
            )
        return message


# -- Offer ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer(_Message):
    """Sender -> receiver: a file is offered, with the content key for its chunks.

    It carries the manifest's fields except the hash, which the sender computes while sending
    (see Seal). The Noise session authenticates the sender; the signature comes with the Seal.
    """

    TAG: ClassVar[Tag] = Tag.OFFER
    transfer_id: bytes
    name: str
    size: int
    chunk_size: int
    chunk_count: int
    created: int
    content_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_own(_check_offer, self)

    def fields(self) -> list[Any]:
        return [
            self.name,
            self.size,
            self.chunk_size,
            self.chunk_count,
            self.created,
            self.content_key,
        ]

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Offer:
        fields(v, "offer", 6)
        name = want_str(v[0], "file name", max_len=NAME_MAX_BYTES)
        problem = name_problem(name)
        if problem is not None:
            raise MalformedTransferObject(f"unsafe file name: {problem}", reason="bad-name")
        size = want_int(v[1], "file size", hi=MAX_FILE_SIZE)
        chunk_size = want_int(v[2], "chunk size", hi=MAX_CHUNK_SIZE)
        chunk_count = want_int(v[3], "chunk count", hi=MAX_CHUNK_COUNT)
        check_layout(size, chunk_size, chunk_count)
        created = want_int(v[4], "creation time")
        key = want_bytes(v[5], "content key", CONTENT_KEY_BYTES)
        return cls(transfer_id, name, size, chunk_size, chunk_count, created, key)


def _check_offer(m: Offer) -> None:
    want_bytes(m.transfer_id, "transfer id", TRANSFER_ID_BYTES)
    if type(m.name) is not str or name_problem(m.name) is not None:
        raise MalformedTransferObject(f"unsafe file name: {name_problem(str(m.name))}")
    want_int(m.size, "file size", hi=MAX_FILE_SIZE)
    want_int(m.chunk_size, "chunk size", hi=MAX_CHUNK_SIZE)
    want_int(m.chunk_count, "chunk count", hi=MAX_CHUNK_COUNT)
    check_layout(m.size, m.chunk_size, m.chunk_count)
    want_int(m.created, "creation time")
    want_bytes(m.content_key, "content key", CONTENT_KEY_BYTES)


# -- Accept / Ack: receiver progress ---------------------------------------------------------


def sack_bitmap(cum: int, indices: Iterable[int]) -> bytes:
    """The canonical bitmap of `indices` (all > cum): bit k (LSB first) is index cum + 1 + k."""
    bits = 0
    for i in indices:
        bits |= 1 << (i - cum - 1)
    return bits.to_bytes((bits.bit_length() + 7) // 8, "little")


def sack_indices(cum: int, sack: bytes) -> list[int]:
    bits = int.from_bytes(sack, "little")
    out = []
    k = 0
    while bits:
        if bits & 1:
            out.append(cum + 1 + k)
        bits >>= 1
        k += 1
    return out


def _check_status(transfer_id: Any, incarnation: Any, cum: Any, limit: Any, sack: Any) -> None:
    want_bytes(transfer_id, "transfer id", TRANSFER_ID_BYTES)
    want_int(incarnation, "incarnation", lo=1, hi=MAX_INCARNATION)
    want_int(cum, "acknowledged prefix", hi=MAX_CHUNK_COUNT)
    want_int(limit, "credit limit", lo=cum, hi=cum + MAX_WINDOW)
    want_bytes(sack, "selective acknowledgement", max_len=MAX_SACK_BYTES)
    if sack and sack[-1] == 0:
        raise MalformedTransferObject("a selective acknowledgement has trailing zero bytes")
    bits = int.from_bytes(sack, "little")
    if bits and cum + bits.bit_length() >= limit:
        raise MalformedTransferObject("a selective acknowledgement reaches beyond the credit")


@dataclass(frozen=True, slots=True)
class _Status(_Message):
    """Durable progress and credit: every index < cum, and cum + 1 + k for each bit k of `sack`,
    is durable at the receiver; the sender may send indices < limit. `incarnation` counts the
    receiver's (re)starts of this transfer (1, then +1 at each restore, recorded before use): a
    higher one means the receiver restarted and lost what was not durable, so the sender
    resynchronises; a lower one is stale (delayed) and ignored."""

    transfer_id: bytes
    incarnation: int
    cum: int
    limit: int
    sack: bytes = b""

    def __post_init__(self) -> None:
        _check_own(
            _check_status, self.transfer_id, self.incarnation, self.cum, self.limit, self.sack
        )

    def fields(self) -> list[Any]:
        return [self.incarnation, self.cum, self.limit, self.sack]

    def durable(self) -> list[int]:
        """The selectively acknowledged indices (those above `cum`)."""
        return sack_indices(self.cum, self.sack)

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Self:
        fields(v, cls.__name__.lower(), 4)
        _check_status(transfer_id, *v)
        return cls(transfer_id, v[0], v[1], v[2], v[3])


@dataclass(frozen=True, slots=True)
class Accept(_Status):
    """Receiver -> sender: the offer is accepted; here is what I already have (resume)."""

    TAG: ClassVar[Tag] = Tag.ACCEPT


@dataclass(frozen=True, slots=True)
class Ack(_Status):
    """Receiver -> sender: progress and credit, after data became durable or on a timer."""

    TAG: ClassVar[Tag] = Tag.ACK


# -- Request ----------------------------------------------------------------------------------


def _check_ranges(ranges: Any) -> None:
    want_list(ranges, "requested ranges", max_len=MAX_REQUEST_RANGES)
    if not ranges:
        raise MalformedTransferObject("a request names no chunk")
    end = -1
    total = 0
    for r in ranges:
        if type(r) not in (list, tuple) or len(r) != 2:
            raise MalformedTransferObject("a requested range is [start, count]")
        start = want_int(r[0], "range start", hi=MAX_CHUNK_COUNT)
        count = want_int(r[1], "range length", lo=1, hi=MAX_WINDOW)
        if start <= end:
            raise MalformedTransferObject("requested ranges must be sorted, apart and disjoint")
        end = start + count
        total += count
        if end > MAX_CHUNK_COUNT or total > MAX_WINDOW:
            raise MalformedTransferObject("a request names too many chunks")


@dataclass(frozen=True, slots=True)
class Request(_Message):
    """Receiver -> sender: these chunks are missing, send them again.

    `ranges` are (start, count) pairs, sorted, disjoint and not adjacent, at most MAX_WINDOW
    chunks in all.
    """

    TAG: ClassVar[Tag] = Tag.REQUEST
    transfer_id: bytes
    incarnation: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        _check_own(want_bytes, self.transfer_id, "transfer id", TRANSFER_ID_BYTES)
        _check_own(want_int, self.incarnation, "incarnation", lo=1, hi=MAX_INCARNATION)
        _check_own(_check_ranges, list(self.ranges))

    def fields(self) -> list[Any]:
        return [self.incarnation, [list(r) for r in self.ranges]]

    def indices(self) -> Iterable[int]:
        for start, count in self.ranges:
            yield from range(start, start + count)

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Request:
        fields(v, "request", 2)
        incarnation = want_int(v[0], "incarnation", lo=1, hi=MAX_INCARNATION)
        _check_ranges(v[1])
        return cls(transfer_id, incarnation, tuple((r[0], r[1]) for r in v[1]))


def ranges_of(indices: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted distinct indices as canonical (start, count) ranges."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return tuple((s, c) for s, c in out)


# -- Seal, Verified ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seal(_Message):
    """Sender -> receiver: the signed manifest, with the whole-file hash, once it is known."""

    TAG: ClassVar[Tag] = Tag.SEAL
    transfer_id: bytes
    manifest: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_own(want_bytes, self.transfer_id, "transfer id", TRANSFER_ID_BYTES)
        _check_own(want_bytes, self.manifest, "manifest", None, max_len=MAX_MANIFEST_BYTES)
        _check_own(want_bytes, self.signature, "signature", SIGNATURE_BYTES)

    def fields(self) -> list[Any]:
        return [self.manifest, self.signature]

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Seal:
        fields(v, "seal", 2)
        body = want_bytes(v[0], "manifest", max_len=MAX_MANIFEST_BYTES)
        signature = want_bytes(v[1], "signature", SIGNATURE_BYTES)
        return cls(transfer_id, body, signature)


@dataclass(frozen=True, slots=True)
class Verified(_Message):
    """Receiver -> sender: the file matched the signed hash and is committed under its name."""

    TAG: ClassVar[Tag] = Tag.VERIFIED
    transfer_id: bytes
    file_hash: bytes

    def __post_init__(self) -> None:
        _check_own(want_bytes, self.transfer_id, "transfer id", TRANSFER_ID_BYTES)
        _check_own(want_bytes, self.file_hash, "file hash", HASH_BYTES)

    def fields(self) -> list[Any]:
        return [self.file_hash]

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Verified:
        fields(v, "verified", 1)
        return cls(transfer_id, want_bytes(v[0], "file hash", HASH_BYTES))


# -- Refuse, Abort ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ending(_Message):
    transfer_id: bytes
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        _check_own(want_bytes, self.transfer_id, "transfer id", TRANSFER_ID_BYTES)
        _check_own(_check_reason, self.reason, self.detail, type(self).__name__.lower())

    def fields(self) -> list[Any]:
        return [self.reason, self.detail]

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Self:
        what = cls.__name__.lower()
        fields(v, what, 2)
        reason, detail = _check_reason(v[0], v[1], what)
        return cls(transfer_id, reason, detail)


@dataclass(frozen=True, slots=True)
class Refuse(_Ending):
    """Receiver -> sender: the offer is refused (the sender shows `reason` and `detail`)."""

    TAG: ClassVar[Tag] = Tag.REFUSE


@dataclass(frozen=True, slots=True)
class Abort(_Ending):
    """Either way: the transfer ended without success for this receiver, and why."""

    TAG: ClassVar[Tag] = Tag.ABORT


# -- Recipe, Have (deltas, SPEC 7.11) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recipe(_Message):
    """Sender -> receiver: part `part` of the file's chunk list, (length, id) records whose ids
    are keyed with `key`, the pair's chunk-id key; `final` on the last part. Part 0 goes just
    before the Offer, the others as the sender cuts the file (SPEC 7.11)."""

    TAG: ClassVar[Tag] = Tag.RECIPE
    transfer_id: bytes
    part: int
    final: bool
    key: bytes = field(repr=False)
    entries: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_own(want_bytes, self.transfer_id, "transfer id", TRANSFER_ID_BYTES)
        _check_own(self._check, self.part, self.final, self.key, self.entries)

    @staticmethod
    def _check(part: Any, final: Any, key: Any, entries: Any) -> None:
        want_int(part, "recipe part", lo=0, hi=delta.MAX_RECIPE_PARTS - 1)
        if type(final) is not bool:
            raise MalformedTransferObject("recipe final is a boolean")
        want_bytes(key, "recipe key", delta.KEY_BYTES)
        delta.decode_entries(want_bytes(entries, "recipe entries", max_len=MAX_RECIPE_BYTES))

    def fields(self) -> list[Any]:
        return [self.part, self.final, self.key, self.entries]

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Recipe:
        fields(v, "recipe", 4)
        cls._check(*v)
        return cls(transfer_id, v[0], v[1], v[2], v[3])


@dataclass(frozen=True, slots=True)
class Have(_Message):
    """Receiver -> sender, before its Accept: how many bytes of the offered file it found in
    files it received from this sender (for the sender's report only; what it may skip is in
    the Accept and Acks, as always)."""

    TAG: ClassVar[Tag] = Tag.HAVE
    transfer_id: bytes
    held: int

    def __post_init__(self) -> None:
        _check_own(want_bytes, self.transfer_id, "transfer id", TRANSFER_ID_BYTES)
        _check_own(want_int, self.held, "held bytes", lo=0, hi=MAX_FILE_SIZE)

    def fields(self) -> list[Any]:
        return [self.held]

    @classmethod
    def _from(cls, transfer_id: bytes, v: list[Any]) -> Have:
        fields(v, "have", 1)
        return cls(transfer_id, want_int(v[0], "held bytes", lo=0, hi=MAX_FILE_SIZE))


ControlMessage = Offer | Accept | Refuse | Ack | Request | Seal | Verified | Abort | Recipe | Have

_TYPES: dict[int, Any] = {
    Tag.OFFER: Offer,
    Tag.ACCEPT: Accept,
    Tag.REFUSE: Refuse,
    Tag.ACK: Ack,
    Tag.REQUEST: Request,
    Tag.SEAL: Seal,
    Tag.VERIFIED: Verified,
    Tag.ABORT: Abort,
    Tag.RECIPE: Recipe,
    Tag.HAVE: Have,
}


def is_transfer_tag(tag: int) -> bool:
    """Tags 32..63 belong to transfers; the session layer owns the rest."""
    return 32 <= tag <= 63


def decode_message(data: bytes | bytearray | memoryview) -> ControlMessage:
    """Decode any transfer control message; raises MalformedTransferObject."""
    # A Recipe (tag 40, right after the array header) carries up to 32000 bytes of entries.
    recipe = len(data) > 1 and data[1] == Tag.RECIPE
    limit = MAX_RECIPE_BYTES if recipe else MAX_CONTROL_BYTES
    value = unpack(data, what="transfer message", max_size=limit)
    if len(value) < 2:
        raise MalformedTransferObject("a transfer message has a type and a transfer id")
    tag = value[0]
    if type(tag) is not int or tag not in _TYPES:
        raise MalformedTransferObject(
            f"unknown transfer message type {tag!r}", reason="unknown-type"
        )
    transfer_id = want_bytes(value[1], "transfer id", TRANSFER_ID_BYTES)
    message: ControlMessage = _TYPES[tag]._from(transfer_id, value[2:])
    return message
