"""Strict msgpack decoding for the transfer's wire objects.

Every control message and the manifest are msgpack arrays with a fixed field order. Decoding is
strict so that one object has exactly one encoding: exact types (a msgpack bool is not an int, a
str is not a bin), bounded sizes, and the decoded value must re-encode to the very bytes received.
The manifest relies on that for its signature; the control messages rely on it so that a fuzzer
finds nothing "almost valid".
"""

from __future__ import annotations

from typing import Any

from protocol import _msgpack
from protocol._msgpack import unpack_canonical
from protocol.errors import RemoteProtocolError

# Shared with the identity codec (protocol/_msgpack.py); re-exported for this package.
MAX_INT_FIELD = _msgpack.MAX_INT_FIELD
pack = _msgpack.pack


class MalformedTransferObject(RemoteProtocolError):
    """A manifest or transfer control message that breaks the encoding rules."""

    reason = "malformed"


def unpack(data: bytes | bytearray | memoryview, *, what: str, max_size: int) -> list[Any]:
    """Decode one msgpack array in canonical form; the caller checks its fields."""
    return unpack_canonical(data, what=what, max_size=max_size, error=MalformedTransferObject)


def fields(value: list[Any], what: str, count: int) -> list[Any]:
    if len(value) != count:
        raise MalformedTransferObject(f"{what} must have {count} fields, not {len(value)}")
    return value


def want_int(value: Any, what: str, *, lo: int = 0, hi: int = MAX_INT_FIELD) -> int:
    if type(value) is not int:
        raise MalformedTransferObject(f"{what} must be an integer")
    if not lo <= value <= hi:
        raise MalformedTransferObject(f"{what} is out of range ({value} not in {lo}..{hi})")
    return value


def want_bytes(value: Any, what: str, length: int | None = None, *, max_len: int = 0) -> bytes:
    if type(value) is not bytes:
        raise MalformedTransferObject(f"{what} must be a byte string")
    if length is not None and len(value) != length:
        raise MalformedTransferObject(f"{what} must be {length} bytes, not {len(value)}")
    if length is None and len(value) > max_len:
        raise MalformedTransferObject(f"{what} is longer than {max_len} bytes")
    return value


def want_str(value: Any, what: str, *, max_len: int) -> str:
    if type(value) is not str:
        raise MalformedTransferObject(f"{what} must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > max_len:
        raise MalformedTransferObject(f"{what} is longer than {max_len} bytes")
    return value


def want_list(value: Any, what: str, *, max_len: int) -> list[Any]:
    if type(value) is not list:
        raise MalformedTransferObject(f"{what} must be an array")
    if len(value) > max_len:
        raise MalformedTransferObject(f"{what} has more than {max_len} entries")
    return value
