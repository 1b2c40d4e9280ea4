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
from peerd.client.errors import (
    ConnectionLost,
    DaemonNotRunning,
    RemoteCallError,
    Timeout,
    error_from_wire,
    register_error,
)
from peerd.client.sync import SyncClient, SyncEventStream
from peerd.control import AccessDenied, InvalidParams, MethodNotFound, SubscriberDropped

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
