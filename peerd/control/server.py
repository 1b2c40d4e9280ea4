"""The control socket server: the socket file and its lock, accepting and refusing callers,
the method table, dispatch, and events to subscribers.

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
import fcntl
import json
import logging
import os
import re
import socket
import stat
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from peerd import __version__
from peerd.control.connection import Connection, hang_up
from peerd.control.credentials import PeerCredentials, peer_credentials, resolve_group
from peerd.control.params import JSONValue, Params, only, optional, require
from peerd.control.wire import (
    API_VERSION,
    CLOSE_GRACE,
    DEFAULT_EVENTS,
    EVENT_METHOD,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    JSONRPC,
    MAX_BATCH,
    MAX_CONNECTIONS,
    MAX_GARBAGE,
    MAX_INFLIGHT,
    MAX_LINE,
    MAX_QUEUE,
    MAX_REPLY,
    AccessDenied,
    ControlError,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    encode_line,
    error_object,
    plain_error,
    response,
)
from peerd.errors import PeerdError, UsageError

log = logging.getLogger("peerd.control")

Handler = Callable[[Params, Connection], Awaitable[JSONValue]]

_SUN_PATH_MAX: Final = 107  # sizeof(sun_path) - 1 on Linux
_METHOD_NAME = re.compile(r"v[0-9]+\.[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_REQUEST_MEMBERS: Final = frozenset({"jsonrpc", "id", "method", "params"})


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
            for sub in conn.subscriptions:
                if conn.closed:
                    break
                if sub.matches(name, payload):
                    line = (
                        f'{{"jsonrpc":"2.0","method":"{EVENT_METHOD}","params":'
                        f'{{"subscription":{sub.id},"event":{event},"data":{data}}}}}\n'
                    ).encode()
                    if conn.push_event(line):
                        delivered += 1
        self._counters["events"] += 1
        return delivered

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    # Counters.

    def count(self, name: str) -> None:
        self._counters[name] += 1

    def count_error(self, code: int) -> None:
        self._errors[code] += 1

    def stats(self) -> dict[str, Any]:
        """Counters for `peerd status`."""
        return {
            "socket": self.path,
            "connections": len(self._connections),
            "connections_total": self._counters["connections"],
            "requests": self._counters["requests"],
            "events": self._counters["events"],
            "subscriptions": sum(len(c.subscriptions) for c in self._connections.values()),
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
            conn.abort()
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
        self.count_error(error["code"])
        writer.write(encode_line(response(None, error=error)))
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await hang_up(reader, writer)
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
            await conn.serve()
        finally:
            del self._connections[conn.id]

    # Dispatch.

    def encode_reply(self, reply: JSONValue) -> bytes:
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
            response(r.get("id"), error=plain_error(INTERNAL_ERROR, "internal error"))
            for r in replies
        ]
        for _ in fixed:
            self.count_error(INTERNAL_ERROR)
        return encode_line(fixed if isinstance(reply, list) else fixed[0])

    async def handle(self, message: JSONValue, conn: Connection) -> dict[str, Any] | None:
        """Run one request object; its reply, or None for a notification."""
        self._counters["requests"] += 1
        if not isinstance(message, dict):
            self.count_error(INVALID_REQUEST)
            return response(None, error=plain_error(INVALID_REQUEST, "not a request object"))
        request_id = message.get("id")
        is_notification = "id" not in message
        if not (
            request_id is None
            or isinstance(request_id, str)
            or (isinstance(request_id, int | float) and not isinstance(request_id, bool))
        ):
            self.count_error(INVALID_REQUEST)
            return response(None, error=plain_error(INVALID_REQUEST, "bad id"))
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
            self.count_error(INVALID_REQUEST)
            return response(request_id, error=plain_error(INVALID_REQUEST, problem))
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
                error = plain_error(INTERNAL_ERROR, "internal error (see the daemon's log)")
        if error is not None:
            self.count_error(error["code"])
        if is_notification:
            return None
        return response(request_id, result=result, error=error)

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


__all__ = ["ControlServer", "Handler"]
