"""Canonical msgpack arrays, shared by the identity objects and the transfer's wire objects.

Both encode every object as a msgpack array with a fixed field order and decode strictly, so
that one object has exactly one encoding: the decoded value must re-encode to the very bytes
received. Each layer raises its own error type (`protocol.identity` a `MalformedObject`,
`protocol.transfer` a `MalformedTransferObject`) and checks its fields with its own helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError

MAX_INT_FIELD = 2**63 - 1  # sqlite stores signed 64-bit integers; no field may exceed this


def pack(fields: Sequence[Any]) -> bytes:
    data: bytes = msgpack.packb(list(fields), use_bin_type=True)
    return data


def unpack_canonical(
    data: bytes | bytearray | memoryview,
    *,
    what: str,
    max_size: int,
    error: type[RemoteProtocolError],
    length: int | None = None,
) -> list[Any]:
    """Decode one msgpack array (of exactly `length` fields, if given) in canonical form.

    Raises `error` (reason "malformed", "too-large" or "non-canonical") for bytes that break
    the rules, LocalProtocolError for an argument that is not bytes at all.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"{what}: expected bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise error(
            f"{what} is {len(data)} bytes, more than the limit of {max_size}", reason="too-large"
        )
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # Every msgpack decoding error and bad UTF-8 is a ValueError; keep the others in case.
        raise error(f"{what} is not valid msgpack: {exc}") from exc
    if not isinstance(value, list):
        raise error(f"{what} must be a msgpack array")
    if length is not None and len(value) != length:
        raise error(f"{what} must have {length} fields, not {len(value)}")
    if pack(value) != data:
        raise error(f"{what} is not in canonical form", reason="non-canonical")
    return value
