"""The Python API of a running peerd daemon: `Client` (asyncio) and `SyncClient` (blocking).

Both talk JSON-RPC 2.0 over the daemon's control socket (see `peerd.control`)::

    async with await Client.connect() as client:
        status = await client.call("v1.status")
        async with client.subscribe(["session.up", "session.down"]) as events:
            async for event in events:
                print(event.name, event.data)

    with SyncClient() as client:              # scripts and notebooks
        print(client.call("v1.status"))

Errors the daemon raises come back as the same `PeerdError` subclass when this process knows
the class (else as a `RemoteCallError` subclass of the same name), with the daemon's message
and hint. A daemon that is not running is `DaemonNotRunning`; a refused caller
`AccessDenied`; a call that takes longer than its timeout `Timeout`.
"""

from __future__ import annotations

from peerd.client.errors import (
    ConnectionLost,
    DaemonNotRunning,
    RemoteCallError,
    Timeout,
    error_from_wire,
    register_error,
)
from peerd.control import AccessDenied, InvalidParams, MethodNotFound, SubscriberDropped

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the CLI loads this)
if TYPE_CHECKING:
    from peerd.client.aio import (
        DEFAULT,
        DEFAULT_SOCKET_PATH,
        DEFAULT_TIMEOUT,
        Client,
        Event,
        EventStream,
        ReceivedMessage,
        socket_path_from_config,
    )
    from peerd.client.sync import SyncClient, SyncEventStream

# Loaded when first used: asyncio and the clients are most of this package's import time, and
# the CLI needs only the errors (it talks to the daemon with peerd.control.blocking).
_LAZY = {
    **dict.fromkeys(
        (
            "DEFAULT",
            "DEFAULT_SOCKET_PATH",
            "DEFAULT_TIMEOUT",
            "Client",
            "Event",
            "EventStream",
            "ReceivedMessage",
            "socket_path_from_config",
        ),
        "peerd.client.aio",
    ),
    "SyncClient": "peerd.client.sync",
    "SyncEventStream": "peerd.client.sync",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peerd.client' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - only when a client name is first used

    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT",
    "DEFAULT_SOCKET_PATH",
    "DEFAULT_TIMEOUT",
    "AccessDenied",
    "Client",
    "ConnectionLost",
    "DaemonNotRunning",
    "Event",
    "EventStream",
    "InvalidParams",
    "MethodNotFound",
    "ReceivedMessage",
    "RemoteCallError",
    "SubscriberDropped",
    "SyncClient",
    "SyncEventStream",
    "Timeout",
    "error_from_wire",
    "register_error",
    "socket_path_from_config",
]
