"""The control socket: JSON-RPC 2.0 over a Unix stream socket, one object per line.

The `peerd` CLI and `peerd.client` talk to the daemon through this socket. The daemon builds a
`ControlServer`, registers its methods (`server.register("v1.status", handler)`), starts it, and
publishes events (`server.publish_event("session.up", {...})`) that subscribed connections
receive as notifications.

- `peerd.control.wire`: the wire format both ends share (framing, error objects and codes);
- `peerd.control.params`: the handlers' parameter checks (`require`, `optional`, `only`);
- `peerd.control.credentials`: who is calling (SO_PEERCRED, SO_PEERGROUPS);
- `peerd.control.connection`: one accepted connection (limits, output queue, subscriptions);
- `peerd.control.server`: the socket file, accepting and refusing, dispatch, events.

Importing this package loads only the wire format (and not `typing`: the CLI's commands load it):
the client needs nothing else. The server's names are loaded when first used
(`from peerd.control import ControlServer, require` works as before).
"""

from __future__ import annotations

from peerd.control.wire import (
    API_VERSION,
    APPLICATION_ERROR,
    APPLICATION_ERROR_CODES,
    CLOSE_GRACE,
    DEFAULT_EVENTS,
    DROPPED_METHOD,
    EVENT_METHOD,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    JSONRPC,
    MAX_BATCH,
    MAX_CONNECTIONS,
    MAX_FILTER_KEYS,
    MAX_GARBAGE,
    MAX_INFLIGHT,
    MAX_LINE,
    MAX_QUEUE,
    MAX_REPLY,
    MAX_SUBSCRIPTIONS,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    AccessDenied,
    ControlError,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    SubscriberDropped,
    decode_line,
    encode_line,
    error_code_for,
    error_object,
    plain_error,
    response,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the CLI loads this)
if TYPE_CHECKING:
    from peerd.control.connection import Connection, Subscription
    from peerd.control.credentials import PeerCredentials, peer_credentials, resolve_group
    from peerd.control.params import JSONValue, Params, only, optional, require
    from peerd.control.server import ControlServer, Handler

_SERVER_SIDE = {
    "Connection": "peerd.control.connection",
    "Subscription": "peerd.control.connection",
    "PeerCredentials": "peerd.control.credentials",
    "peer_credentials": "peerd.control.credentials",
    "resolve_group": "peerd.control.credentials",
    "ControlServer": "peerd.control.server",
    "Handler": "peerd.control.server",
    "JSONValue": "peerd.control.params",
    "Params": "peerd.control.params",
    "only": "peerd.control.params",
    "optional": "peerd.control.params",
    "require": "peerd.control.params",
}


def __getattr__(name: str) -> object:
    # Lazy: the server side (sockets, groups, the lock file, the handlers' parameter checks) is
    # the daemon's, not the client's.
    module = _SERVER_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'peerd.control' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - only when a server-side name is first used

    return getattr(importlib.import_module(module), name)


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
    "Connection",
    "ControlError",
    "ControlServer",
    "Handler",
    "InvalidParams",
    "JSONValue",
    "MethodNotFound",
    "Overloaded",
    "Params",
    "PeerCredentials",
    "SubscriberDropped",
    "Subscription",
    "decode_line",
    "encode_line",
    "error_code_for",
    "error_object",
    "only",
    "optional",
    "peer_credentials",
    "plain_error",
    "require",
    "resolve_group",
    "response",
]
