"""The control socket's wire format: JSON-RPC 2.0, one object per line, shared by the server
(`peerd.control.server`) and the clients (`peerd.client`, the CLI's `peerd.control.blocking`).
The handlers' parameter checks are in `peerd.control.params`. This module does not import
`typing` at run time: every CLI command loads it (scripts/check_imports.py).

Wire format (each message is one JSON value, UTF-8, terminated by `\\n`):

- requests, notifications and batches exactly as JSON-RPC 2.0 says; methods take named params
  only (an object), and method names carry their API version (`v1.status`);
- errors use the standard codes, and for `PeerdError`s raised by a handler a code in
  -32000..-32099 with `data = {"type": class name, "bases": [ancestor names], "hint": ...,
  "reason": ...}` so that a client re-raises the same class;
- events are the notification `v1.event {"subscription": id, "event": name, "data": payload}`;
  a subscriber that falls behind gets `v1.dropped {"reason": ..., "message": ..., "hint": ...}`
  and is disconnected. Outside a batch, the reply to `v1.subscribe` precedes every event of
  that subscription.
"""

from __future__ import annotations

import json

from peerd.errors import PeerdError, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the CLI loads this)
if TYPE_CHECKING:
    from typing import Any, Final


JSONRPC: Final = "2.0"
API_VERSION: Final = 1

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
APPLICATION_ERROR: Final = -32000  # a PeerdError with no more specific code

# Application error codes, looked up by class name along the raised class's MRO (by name, as the
# CLI's exit codes are, so modules can add codes without importing each other). The client does
# not need them: it re-raises by `data.type`; they let a non-Python client branch on the code.
APPLICATION_ERROR_CODES: dict[str, int] = {
    "PeerdError": APPLICATION_ERROR,
    "AccessDenied": -32001,
    "Timeout": -32002,
    "UsageError": -32003,
    "ConfigError": -32004,
    "TrustError": -32005,
    "ProtocolError": -32006,
    "Overloaded": -32007,
    "StoreError": -32008,
}

EVENT_METHOD: Final = "v1.event"
DROPPED_METHOD: Final = "v1.dropped"

# The events the daemon publishes (it may add more with `events=`).
DEFAULT_EVENTS: Final = (
    "session.up",
    "session.down",
    "trust.changed",
    "transfer.progress",
    "message",
)

MAX_LINE: Final = 1 << 20  # a request line; more is refused with -32600
MAX_REPLY: Final = 16 << 20  # a reply line; a bigger result is an internal error, not a send
MAX_BATCH: Final = 64
MAX_INFLIGHT: Final = 32  # requests (a batch counts once) in flight per connection
MAX_QUEUE: Final = 1024  # output lines waiting per connection; events beyond it drop the client
MAX_CONNECTIONS: Final = 128
MAX_GARBAGE: Final = 16  # consecutive bad lines before the connection is closed
MAX_SUBSCRIPTIONS: Final = 32  # per connection
MAX_FILTER_KEYS: Final = 16
CLOSE_GRACE: Final = 5.0  # seconds a closing connection gets to take its last lines


class ControlError(PeerdError):
    """The control socket could not be set up (path, permissions, another daemon)."""


class AccessDenied(PeerdError):
    """The caller may not use the control socket."""

    hint = "ask an administrator to add you to the daemon's group, or run as the daemon's user"


class InvalidParams(UsageError):
    """A method was called with missing, unknown or mistyped parameters."""

    hint = "check the method's parameters"


class MethodNotFound(UsageError):
    """The daemon has no such method."""

    hint = "the daemon may be older than this client: compare `peerd --version` with the daemon's"


class Overloaded(PeerdError):
    """The daemon refused work to stay within its limits."""

    hint = "retry later, or with fewer concurrent connections or requests"


class SubscriberDropped(Overloaded):
    """An event subscriber fell behind and was disconnected."""

    hint = "consume events faster, or subscribe to fewer events"


# --- wire helpers -------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode_line(line: bytes) -> Any:
    """Parse one line; ValueError for anything that is not strict JSON (incl. NaN, deep nests)."""
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def encode_line(value: Any) -> bytes:
    """One compact JSON line. Raises TypeError/ValueError for values JSON cannot carry."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode() + b"\n"


def error_code_for(exc: PeerdError) -> int:
    if isinstance(exc, InvalidParams):
        return INVALID_PARAMS
    if isinstance(exc, MethodNotFound):
        return METHOD_NOT_FOUND
    for cls in type(exc).__mro__:
        if cls.__name__ in APPLICATION_ERROR_CODES:
            return APPLICATION_ERROR_CODES[cls.__name__]
    return APPLICATION_ERROR


def error_object(exc: PeerdError, code: int | None = None) -> dict[str, Any]:
    """The JSON-RPC error object for a PeerdError, with what a client needs to re-raise it."""
    bases = [
        cls.__name__
        for cls in type(exc).__mro__[1:]
        if issubclass(cls, PeerdError) and cls is not PeerdError
    ]
    data: dict[str, Any] = {"type": type(exc).__name__, "bases": bases, "hint": exc.hint}
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        data["reason"] = reason
    message = str(exc) or type(exc).__name__
    return {"code": error_code_for(exc) if code is None else code, "message": message, "data": data}


def response(request_id: Any, *, result: Any = None, error: Any = None) -> dict[str, Any]:
    if error is not None:
        return {"jsonrpc": JSONRPC, "id": request_id, "error": error}
    return {"jsonrpc": JSONRPC, "id": request_id, "result": result}


def plain_error(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


__all__ = [
    "API_VERSION",
    "APPLICATION_ERROR",
    "APPLICATION_ERROR_CODES",
    "CLOSE_GRACE",
    "DEFAULT_EVENTS",
    "DROPPED_METHOD",
    "EVENT_METHOD",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "JSONRPC",
    "MAX_BATCH",
    "MAX_CONNECTIONS",
    "MAX_FILTER_KEYS",
    "MAX_GARBAGE",
    "MAX_INFLIGHT",
    "MAX_LINE",
    "MAX_QUEUE",
    "MAX_REPLY",
    "MAX_SUBSCRIPTIONS",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "AccessDenied",
    "ControlError",
    "InvalidParams",
    "MethodNotFound",
    "Overloaded",
    "SubscriberDropped",
    "decode_line",
    "encode_line",
    "error_code_for",
    "error_object",
    "plain_error",
    "response",
]
