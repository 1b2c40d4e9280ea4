"""The control socket server: JSON-RPC 2.0 over a Unix stream socket, one object per line.

The `peerd` CLI and `peerd.client` talk to the daemon through this socket. The daemon builds a
`ControlServer`, registers its methods (`server.register("v1.status", handler)`), starts it, and
publishes events (`server.publish_event("session.up", {...})`) that subscribed connections
receive as notifications.

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

Who may connect is decided twice: the socket file is mode 0660 (owner and group), and every
accepted connection's credentials (SO_PEERCRED, SO_PEERGROUPS: taken by the kernel at connect
time, so they cannot be raced) must be root, the daemon's own uid, or a member of the configured
group. A refused caller gets one JSON-RPC error line and the connection is closed.

Everything is bounded: line length, batch size, requests in flight per connection, queued
output per connection, connections, subscriptions, and garbage tolerated before hanging up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import pwd
import re
import socket
import stat
import struct
import tempfile
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, overload

from peerd import __version__
from peerd.errors import PeerdError, UsageError

log = logging.getLogger("peerd.control")

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

_SUN_PATH_MAX: Final = 107  # sizeof(sun_path) - 1 on Linux
_SO_PEERGROUPS: Final = int(getattr(socket, "SO_PEERGROUPS", 59))  # Linux >= 4.13
_METHOD_NAME = re.compile(r"v[0-9]+\.[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_REQUEST_MEMBERS: Final = frozenset({"jsonrpc", "id", "method", "params"})

JSONValue = Any  # what json.loads returns / json.dumps accepts; checked at the edges
Params = dict[str, Any]
Handler = Callable[[Params, "Connection"], Awaitable[JSONValue]]

T = TypeVar("T")


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


# --- parameter helpers for handlers -------------------------------------------------------------


def _type_ok(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


_JSON_TYPE_NAMES: Final = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "an object",
}


def require(params: Mapping[str, Any], name: str, kind: type[T]) -> T:
    """The parameter `name`, which must be present, non-null and of type `kind`."""
    if name not in params or params[name] is None:
        raise InvalidParams(f"missing parameter {name!r}")
    value = params[name]
    if not _type_ok(value, kind):
        raise InvalidParams(
            f"parameter {name!r} must be {_JSON_TYPE_NAMES.get(kind, kind.__name__)}"
        )
    if kind is float:
        value = float(value)
    return value  # type: ignore[no-any-return]


@overload
def optional(params: Mapping[str, Any], name: str, kind: type[T]) -> T | None: ...
@overload
def optional(params: Mapping[str, Any], name: str, kind: type[T], default: T) -> T: ...
def optional(
    params: Mapping[str, Any], name: str, kind: type[T], default: T | None = None
) -> T | None:
    """The parameter `name` if present and non-null (checked like `require`), else `default`."""
    if params.get(name) is None:
        return default
    return require(params, name, kind)


def only(params: Mapping[str, Any], *names: str) -> None:
    """Refuse parameters other than `names`, so a typo is an error rather than ignored."""
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise InvalidParams(f"unknown parameter(s): {', '.join(map(repr, unknown))}")


# --- wire helpers -------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode_line(line: bytes) -> JSONValue:
    """Parse one line; ValueError for anything that is not strict JSON (incl. NaN, deep nests)."""
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def encode_line(value: JSONValue) -> bytes:
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


def _response(
    request_id: JSONValue, *, result: JSONValue = None, error: Any = None
) -> dict[str, Any]:
    if error is not None:
        return {"jsonrpc": JSONRPC, "id": request_id, "error": error}
    return {"jsonrpc": JSONRPC, "id": request_id, "result": result}


def _plain_error(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


# --- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED and SO_PEERGROUPS of a connected Unix socket (OSError if unavailable)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid, _peer_groups(sock, uid, gid))


def _peer_groups(sock: socket.socket, uid: int, gid: int) -> tuple[int, ...]:
    size = struct.calcsize("I")
    for count in (64, 65536):  # NGROUPS_MAX is 65536
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, count * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                break
            raise
        return struct.unpack(f"{len(raw) // size}I", raw)
    # Kernels before 4.13: the groups the user database lists now (not those of the process).
    try:
        return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return ()


def resolve_group(group: str | int | None) -> int | None:
    """A group name or number to a gid (ControlError if the name is unknown)."""
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(
            f"control socket group {group!r} does not exist",
            hint="create the group or fix the control socket group in the configuration",
        ) from None


# --- subscriptions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscription:
    id: int
    patterns: tuple[str, ...]  # exact names, "prefix.*" or "*"
    filter: Mapping[str, Any]  # top-level payload fields that must be equal

    def matches(self, event: str, payload: JSONValue) -> bool:
        if not any(
            p in ("*", event) or (p.endswith(".*") and event.startswith(p[:-1]))
            for p in self.patterns
        ):
            return False
        if not self.filter:
            return True
        if not isinstance(payload, dict):
            return False
        return all(k in payload and payload[k] == v for k, v in self.filter.items())


# --- connections --------------------------------------------------------------------------------


class Connection:
    """One accepted client. Handlers receive it to learn the caller or to subscribe it."""

    def __init__(
        self,
        server: ControlServer,
        conn_id: int,
        peer: PeerCredentials,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.id = conn_id
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._out: deque[bytes] = deque()
        self._out_ready = asyncio.Event()
        self._out_space = asyncio.Event()
        self._out_space.set()
        self._closing = False  # no more output except what is queued
        self._finishing = False  # the writer exits once the queue is empty
        self._inflight = asyncio.Semaphore(server.max_inflight)
        self._requests: set[asyncio.Task[None]] = set()
        self._subscriptions: dict[int, Subscription] = {}
        self._next_subscription = 1
        self._garbage = 0
        self._reader_task: asyncio.Task[None] | None = None
        self.max_queued = 0  # the high-water mark of queued output lines

    def __repr__(self) -> str:
        return f"<Connection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        return len(self._out)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    # Subscriptions. The built-in v1.subscribe uses these; a daemon method may too (for example
    # a `v1.msg.listen {"channel": c}` subscribing to "message" with filter {"channel": c}).

    def subscribe(
        self, patterns: Iterable[str], filter: Mapping[str, Any] | None = None
    ) -> Subscription:
        patterns = tuple(patterns)
        if not patterns:
            raise InvalidParams("subscribe to at least one event")
        for pattern in patterns:
            self.server.check_event_pattern(pattern)
        filter = dict(filter or {})
        if len(filter) > MAX_FILTER_KEYS or not all(
            isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool))
            for k, v in filter.items()
        ):
            raise InvalidParams(
                f"filter must be an object of at most {MAX_FILTER_KEYS} scalar fields"
            )
        if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
            raise InvalidParams(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        sub = Subscription(self._next_subscription, patterns, filter)
        self._next_subscription += 1
        self._subscriptions[sub.id] = sub
        return sub

    def unsubscribe(self, subscription_id: int) -> bool:
        return self._subscriptions.pop(subscription_id, None) is not None

    def notify(self, method: str, params: Mapping[str, Any]) -> bool:
        """Queue a notification for this client. False if the connection is closing or was just
        dropped for falling behind (a notification is never allowed to grow the queue)."""
        line = encode_line({"jsonrpc": JSONRPC, "method": method, "params": params})
        return self._push_event(line)

    # Output.

    def _note_queued(self) -> None:
        self.max_queued = max(self.max_queued, len(self._out))
        self._out_ready.set()
        if len(self._out) >= self.server.max_queue:
            self._out_space.clear()

    async def _push_reply(self, line: bytes) -> None:
        while len(self._out) >= self.server.max_queue and not self._closing:
            await self._out_space.wait()
        if self._closing:
            return
        self._out.append(line)
        self._note_queued()

    def _push_event(self, line: bytes) -> bool:
        if self._closing:
            return False
        if len(self._out) >= self.server.max_queue:
            self._drop()
            return False
        self._out.append(line)
        self._note_queued()
        return True

    def _drop(self) -> None:
        """Disconnect a subscriber that fell behind: its queue is discarded (memory stays
        bounded) and replaced by one final notification saying why."""
        self.server._count("subscribers_dropped")
        log.warning(
            "dropping control connection %d (pid %d uid %d): %d lines queued, not reading",
            self.id,
            self.peer.pid,
            self.peer.uid,
            len(self._out),
        )
        exc = SubscriberDropped(
            f"the daemon dropped this connection: {len(self._out)} messages were waiting"
        )
        final = encode_line(
            {
                "jsonrpc": JSONRPC,
                "method": DROPPED_METHOD,
                "params": {"reason": "slow-subscriber", "message": str(exc), "hint": exc.hint},
            }
        )
        self._out.clear()
        self._out.append(final)
        self._finish(abort_requests=True)

    def _finish(self, *, abort_requests: bool) -> None:
        """Stop taking input; the writer sends what is queued and the connection closes."""
        self._closing = True
        self._finishing = True
        self._out_ready.set()
        self._out_space.set()
        reader = self._reader_task
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()
        if abort_requests:
            for task in self._requests:
                task.cancel()

    async def _write_loop(self) -> None:
        while True:
            while not self._out:
                if self._finishing:
                    return
                self._out_ready.clear()
                await self._out_ready.wait()
            line = self._out.popleft()
            if len(self._out) < self.server.max_queue:
                self._out_space.set()
            self._writer.write(line)
            await self._writer.drain()

    # Input.

    async def _read_loop(self) -> None:
        buf = bytearray()
        discarding = False  # inside an oversize line: skip up to its newline
        limit = self.server.max_line
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in chunk:
                *lines, rest = bytes(buf).split(b"\n")
                buf = bytearray(rest)
                for line in lines:
                    if discarding:
                        discarding = False
                        continue
                    if len(line) > limit:
                        await self._garbage_line(INVALID_REQUEST, f"line longer than {limit} bytes")
                    else:
                        await self._line(line)
                    if self._finishing:
                        return
            if len(buf) > limit:  # the start of an oversize line: refuse it once, skip the rest
                if not discarding:
                    await self._garbage_line(INVALID_REQUEST, f"line longer than {limit} bytes")
                    discarding = True
                buf.clear()
        # End of input: let the requests already received finish and answer.
        if self._requests:
            await asyncio.wait(set(self._requests))

    async def _garbage_line(self, code: int, message: str) -> None:
        self._garbage += 1
        self.server._count_error(code)
        await self._push_reply(encode_line(_response(None, error=_plain_error(code, message))))
        if self._garbage >= self.server.max_garbage:
            self.server._count("closed_for_garbage")
            log.warning(
                "closing control connection %d (pid %d uid %d): %d bad lines in a row",
                self.id,
                self.peer.pid,
                self.peer.uid,
                self._garbage,
            )
            self._finish(abort_requests=False)

    async def _line(self, line: bytes) -> None:
        if not line.strip():
            return  # blank lines are harmless (and handy with socat)
        try:
            message = decode_line(line)
        except ValueError as exc:
            await self._garbage_line(PARSE_ERROR, f"parse error: {exc}")
            return
        if isinstance(message, list):
            if not message:
                await self._garbage_line(INVALID_REQUEST, "empty batch")
                return
            if len(message) > self.server.max_batch:
                await self._garbage_line(
                    INVALID_REQUEST, f"batch of {len(message)} (at most {self.server.max_batch})"
                )
                return
        elif not isinstance(message, dict):
            await self._garbage_line(INVALID_REQUEST, "a request must be an object or an array")
            return
        self._garbage = 0
        await self._inflight.acquire()
        task = asyncio.create_task(self._process(message), name=f"control-{self.id}-request")
        self._requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        self._inflight.release()

    async def _process(self, message: JSONValue) -> None:
        if isinstance(message, list):
            replies = await asyncio.gather(*(self.server._handle(m, self) for m in message))
            body = [r for r in replies if r is not None]
            if body:
                await self._push_reply(self.server._encode_reply(body))
            return
        reply = await self.server._handle(message, self)
        if reply is not None:
            await self._push_reply(self.server._encode_reply(reply))

    async def _serve(self) -> None:
        writer_task = asyncio.create_task(self._write_loop(), name=f"control-{self.id}-writer")
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"control-{self.id}-reader")
        try:
            done, _ = await asyncio.wait(
                {self._reader_task, writer_task}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, ConnectionError | OSError):
                        log.error("control connection %d failed", self.id, exc_info=exc)
        finally:
            self._finish(abort_requests=True)
            try:
                async with asyncio.timeout(CLOSE_GRACE):
                    await asyncio.wait({writer_task})
                    await _hang_up(self._reader, self._writer)
            except (TimeoutError, ConnectionError, OSError):
                pass
            for task in (writer_task, self._reader_task):
                task.cancel()
            if self._requests:
                await asyncio.wait(set(self._requests))
            self._writer.transport.abort()  # a no-op unless the grace ran out


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after the client has read our last lines. Half-close first and discard what the
    client still sends until it closes too: closing while its request is unread would reset the
    connection, and the client would lose the lines that say why (access denied, dropped).
    Callers bound this with a timeout."""
    if writer.can_write_eof():
        writer.write_eof()
    while await reader.read(65536):
        pass
    writer.close()
    await writer.wait_closed()


# --- the server ---------------------------------------------------------------------------------


class ControlServer:
    """The control socket: `await start()`, serve until `await close()`.

    `group`: callers whose primary or supplementary groups include it are allowed (besides root
    and the daemon's own uid); the socket file's group is set to it as well, so the daemon's
    user must be a member of it (or be root).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        group: str | int | None = None,
        events: Iterable[str] = DEFAULT_EVENTS,
        max_line: int = MAX_LINE,
        max_batch: int = MAX_BATCH,
        max_inflight: int = MAX_INFLIGHT,
        max_queue: int = MAX_QUEUE,
        max_connections: int = MAX_CONNECTIONS,
        max_garbage: int = MAX_GARBAGE,
    ) -> None:
        self.path = os.fspath(path)
        self.gid = resolve_group(group)
        self.max_line = max_line
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.max_garbage = max_garbage
        self._events: set[str] = set()
        for name in events:
            self.add_event(name)
        self._methods: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: dict[int, Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 1
        self._counters: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._errors: Counter[int] = Counter()
        self.register("v1.hello", self._hello)
        self.register("v1.subscribe", self._subscribe)
        self.register("v1.unsubscribe", self._unsubscribe)

    # Registration.

    def register(self, name: str, handler: Handler) -> None:
        """Add a method. Names carry their API version: `v1.status`, `v1.msg.send`."""
        if not _METHOD_NAME.fullmatch(name):
            raise UsageError(f"bad method name {name!r}: use a versioned name like 'v1.status'")
        if name in self._methods:
            raise UsageError(f"method {name!r} is already registered")
        self._methods[name] = handler

    def method(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of `register`."""

        def add(handler: Handler) -> Handler:
            self.register(name, handler)
            return handler

        return add

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    def add_event(self, name: str) -> None:
        if not _EVENT_NAME.fullmatch(name):
            raise UsageError(f"bad event name {name!r}")
        self._events.add(name)

    @property
    def events(self) -> list[str]:
        return sorted(self._events)

    def check_event_pattern(self, pattern: object) -> None:
        if pattern == "*" or pattern in self._events:
            return
        if isinstance(pattern, str) and pattern.endswith(".*"):
            prefix = pattern[:-1]
            if any(e.startswith(prefix) for e in self._events):
                return
        raise InvalidParams(
            f"unknown event {pattern!r} (known: {', '.join(self.events)}; or 'prefix.*', or '*')"
        )

    # Events.

    def publish_event(self, name: str, payload: JSONValue = None) -> int:
        """Send an event to every matching subscription; returns how many got it. Never blocks:
        a subscriber whose queue is full is dropped instead."""
        if name not in self._events:
            raise UsageError(f"event {name!r} is not registered")
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        event = json.dumps(name)
        delivered = 0
        for conn in list(self._connections.values()):
            for sub in list(conn._subscriptions.values()):
                if conn.closed:
                    break
                if sub.matches(name, payload):
                    line = (
                        f'{{"jsonrpc":"2.0","method":"{EVENT_METHOD}","params":'
                        f'{{"subscription":{sub.id},"event":{event},"data":{data}}}}}\n'
                    ).encode()
                    if conn._push_event(line):
                        delivered += 1
        self._counters["events"] += 1
        return delivered

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    # Counters.

    def _count(self, name: str) -> None:
        self._counters[name] += 1

    def _count_error(self, code: int) -> None:
        self._errors[code] += 1

    def stats(self) -> dict[str, Any]:
        """Counters for `peerd status`."""
        return {
            "socket": self.path,
            "connections": len(self._connections),
            "connections_total": self._counters["connections"],
            "requests": self._counters["requests"],
            "events": self._counters["events"],
            "subscriptions": sum(len(c._subscriptions) for c in self._connections.values()),
            "subscribers_dropped": self._counters["subscribers_dropped"],
            "closed_for_garbage": self._counters["closed_for_garbage"],
            "refused": dict(self._refused),
            "errors": {str(code): n for code, n in sorted(self._errors.items())},
        }

    # Lifecycle.

    async def start(self) -> None:
        """Bind and listen. A stale socket file is replaced; a live one is a ControlError."""
        if self._server is not None:
            raise UsageError("the control server is already started")
        sock = self._listen()
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self._unlink_own()
            self._unlock()
            raise
        log.info("control socket listening on %s", self.path)

    def _listen(self) -> socket.socket:
        path = self.path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ControlError(
                f"control socket path is too long ({len(os.fsencode(path))} bytes, at most "
                f"{_SUN_PATH_MAX}): {path}",
                hint="choose a shorter runtime directory",
            )
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ControlError(
                f"the directory of the control socket does not exist: {directory}",
                hint="create the runtime directory (systemd does it with RuntimeDirectory=)",
            )
        self._lock()
        try:
            self._check_existing(path)
            return self._bind(path, directory)
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> None:
        # Two daemons starting at once would both find no live socket and replace each other's;
        # the first to take this lock owns the path. Read-only so any uid can take it.
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ControlError(f"cannot open {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ControlError(
                f"another peerd daemon is using the control socket {self.path}",
                hint="stop it first (`systemctl stop peerd`), or give this one another "
                "runtime directory",
            ) from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_existing(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{path} exists and is not a socket; refusing to replace it",
                hint="remove it or choose another runtime directory",
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale control socket %s", path)
            return
        except OSError as exc:
            raise ControlError(f"cannot tell whether {path} is in use: {exc.strerror}") from exc
        finally:
            probe.close()
        raise ControlError(
            f"another process answers on the control socket {path}",
            hint="stop the other daemon first (`systemctl stop peerd`)",
        )

    def _bind(self, path: str, directory: str) -> socket.socket:
        # The socket file is created by bind() with the process umask, so it is bound in a
        # private (0700) directory, given its final mode and group there, and then renamed into
        # place: at no moment is the path more open than 0660, and the process-wide umask (which
        # other threads may rely on) is never touched. rename() also replaces a stale socket
        # atomically.
        try:
            private = tempfile.mkdtemp(prefix=".ctl-", dir=directory)
        except OSError as exc:
            raise ControlError(
                f"cannot create the control socket in {directory}: {exc.strerror}",
                hint="the daemon's user must be able to write its runtime directory",
            ) from exc
        temp = os.path.join(private, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if len(os.fsencode(temp)) > _SUN_PATH_MAX:
                raise ControlError(
                    f"control socket path is too long to bind safely: {path}",
                    hint="choose a shorter runtime directory",
                )
            sock.bind(temp)
            os.chmod(temp, 0o660)
            # A new file takes the process's group; chown only when the configured group is
            # another one (the shipped unit's syscall filter forbids chown, and needs none).
            if self.gid is not None and os.stat(temp).st_gid != self.gid:
                os.chown(temp, -1, self.gid)
            sock.listen(64)
            os.rename(temp, path)
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot create the control socket {path}: {exc.strerror}") from exc
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            os.rmdir(private)
        sock.setblocking(False)
        return sock

    def _unlink_own(self) -> None:
        # Remove the socket file only if it is still ours, not one a successor put there.
        if self._inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    async def close(self) -> None:
        """Stop accepting, remove the socket file, close every connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._unlink_own()
        for conn in list(self._connections.values()):
            conn._out.clear()
            conn._finish(abort_requests=True)
            conn._writer.transport.abort()
        # Each connection now ends by itself (its transport is gone). Its task belongs to
        # asyncio's stream machinery, which (in 3.11) logs a spurious error for a cancelled one,
        # so it is cancelled only if it fails to end.
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await server.wait_closed()
        self._unlock()
        log.info("control socket %s closed", self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Connections.

    def allowed(self, peer: PeerCredentials) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        return self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._accepted(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reason: str,
        exc: PeerdError,
    ) -> None:
        self._refused[reason] += 1
        error = error_object(exc)
        self._count_error(error["code"])
        writer.write(encode_line(_response(None, error=error)))
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await _hang_up(reader, writer)
        except (TimeoutError, ConnectionError, OSError):
            pass
        writer.transport.abort()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counters["connections"] += 1
        sock = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("control connection refused: no peer credentials (%s)", exc)
            await self._refuse(
                reader, writer, "no-credentials", AccessDenied("no peer credentials")
            )
            return
        if not self.allowed(peer):
            log.warning(
                "control connection refused: pid %d uid %d gid %d is not allowed",
                peer.pid,
                peer.uid,
                peer.gid,
            )
            await self._refuse(
                reader,
                writer,
                "not-allowed",
                AccessDenied(f"access denied: uid {peer.uid} may not use the peerd control socket"),
            )
            return
        if len(self._connections) >= self.max_connections:
            await self._refuse(
                reader,
                writer,
                "too-many-connections",
                Overloaded(f"too many control connections (at most {self.max_connections})"),
            )
            return
        conn = Connection(self, self._next_id, peer, reader, writer)
        self._next_id += 1
        self._connections[conn.id] = conn
        log.debug("control connection %d from pid %d uid %d", conn.id, peer.pid, peer.uid)
        try:
            await conn._serve()
        finally:
            del self._connections[conn.id]

    # Dispatch.

    def _encode_reply(self, reply: JSONValue) -> bytes:
        try:
            line = encode_line(reply)
        except (TypeError, ValueError):
            log.exception("a control method returned a value JSON cannot carry")
            line = b""
        if line and len(line) <= MAX_REPLY:
            return line
        if line:
            log.error("a control reply of %d bytes exceeds %d", len(line), MAX_REPLY)
        # Answer every request with an internal error rather than nothing.
        replies = reply if isinstance(reply, list) else [reply]
        fixed = [
            _response(r.get("id"), error=_plain_error(INTERNAL_ERROR, "internal error"))
            for r in replies
        ]
        for _ in fixed:
            self._count_error(INTERNAL_ERROR)
        return encode_line(fixed if isinstance(reply, list) else fixed[0])

    async def _handle(self, message: JSONValue, conn: Connection) -> dict[str, Any] | None:
        """Run one request object; its reply, or None for a notification."""
        self._counters["requests"] += 1
        if not isinstance(message, dict):
            self._count_error(INVALID_REQUEST)
            return _response(None, error=_plain_error(INVALID_REQUEST, "not a request object"))
        request_id = message.get("id")
        is_notification = "id" not in message
        if not (
            request_id is None
            or isinstance(request_id, str)
            or (isinstance(request_id, int | float) and not isinstance(request_id, bool))
        ):
            self._count_error(INVALID_REQUEST)
            return _response(None, error=_plain_error(INVALID_REQUEST, "bad id"))
        method = message.get("method")
        params = message.get("params", {})
        problem = None
        if message.get("jsonrpc") != JSONRPC:
            problem = 'missing "jsonrpc": "2.0"'
        elif not isinstance(method, str):
            problem = "method must be a string"
        elif not set(message) <= _REQUEST_MEMBERS:
            problem = f"unknown member(s): {', '.join(sorted(set(message) - _REQUEST_MEMBERS))}"
        elif not isinstance(params, dict | list):
            problem = "params must be an object"
        if problem is not None:
            self._count_error(INVALID_REQUEST)
            return _response(request_id, error=_plain_error(INVALID_REQUEST, problem))
        assert isinstance(method, str)
        error: dict[str, Any] | None = None
        result: JSONValue = None
        handler = self._methods.get(method)
        if handler is None:
            error = error_object(MethodNotFound(f"no method {method!r}"))
        elif isinstance(params, list):
            error = error_object(InvalidParams("params must be an object (named parameters)"))
        else:
            try:
                result = await handler(params, conn)
            except PeerdError as exc:
                error = error_object(exc)
                log.debug("control method %s failed: %s", method, exc.one_line())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control method %s raised", method)
                error = _plain_error(INTERNAL_ERROR, "internal error (see the daemon's log)")
        if error is not None:
            self._count_error(error["code"])
        if is_notification:
            return None
        return _response(request_id, result=result, error=error)

    # Built-in methods.

    async def _hello(self, params: Params, conn: Connection) -> JSONValue:
        only(params)
        return {
            "server": "peerd",
            "version": __version__,
            "api": API_VERSION,
            "methods": self.methods,
            "events": self.events,
            "caller": {"pid": conn.peer.pid, "uid": conn.peer.uid, "gid": conn.peer.gid},
        }

    async def _subscribe(self, params: Params, conn: Connection) -> JSONValue:
        only(params, "events", "filter")
        events = require(params, "events", list)
        filter = optional(params, "filter", dict, {})
        sub = conn.subscribe(events, filter)
        return {"subscription": sub.id, "events": list(sub.patterns)}

    async def _unsubscribe(self, params: Params, conn: Connection) -> JSONValue:
        only(params, "subscription")
        return {"unsubscribed": conn.unsubscribe(require(params, "subscription", int))}


__all__ = [
    "API_VERSION",
    "APPLICATION_ERROR_CODES",
    "DEFAULT_EVENTS",
    "AccessDenied",
    "Connection",
    "ControlError",
    "ControlServer",
    "Handler",
    "InvalidParams",
    "MethodNotFound",
    "Overloaded",
    "Params",
    "PeerCredentials",
    "SubscriberDropped",
    "Subscription",
    "only",
    "optional",
    "peer_credentials",
    "require",
]
