"""`Client`: the asyncio API of a running daemon, over its control socket."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple, TypeVar

from peerd import control, locate
from peerd.client.errors import (
    ConnectionLost,
    DaemonNotRunning,
    RemoteCallError,
    Timeout,
    error_from_wire,
)
from peerd.control import (
    DROPPED_METHOD,
    EVENT_METHOD,
    AccessDenied,
    SubscriberDropped,
    decode_line,
    encode_line,
)
from peerd.errors import (
    PeerdError,
    UsageError,
)

log = logging.getLogger("peerd.client")

DEFAULT_SOCKET_PATH: Final = locate.DEFAULT_SOCKET_PATH
DEFAULT_TIMEOUT: Final = 60.0  # seconds a call may take unless told otherwise
MAX_PENDING_EVENTS: Final = 4096  # per subscription, waiting for the application to read
_READ_LIMIT: Final = control.MAX_REPLY + 1024
_LAST_WORDS: Final = 2.0  # seconds to read why the daemon hung up, after a failed write

T = TypeVar("T")


# --- where the socket is ------------------------------------------------------------------------


def socket_path_from_config(config_path: str | os.PathLike[str] | None = None) -> str:
    """The control socket that the configuration names (`[node] socket`, by default
    `<runtime_dir>/peerd.sock`). The file is `config_path`, else $PEERD_CONFIG, else
    ~/.config/peerd/peerd.toml if it exists, else /etc/peerd/peerd.toml (`peerd.locate`). A
    file at the default location that does not exist or that this user may not read means the
    default socket; anywhere else, it is a ConfigError."""
    path = locate.config_file(config_path)
    found = locate.socket_from_config(path)
    if found is None:
        from peerd.config import load_config  # noqa: PLC0415 - names what is wrong in the file

        found = str(load_config(path).node.socket)
    return found


# --- the async client ---------------------------------------------------------------------------


class ReceivedMessage(NamedTuple):
    """A message from a peer's channel (see `Client.messages`)."""

    id: int
    peer: str
    channel: str
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """One event from a subscription: its name (e.g. "session.up") and its payload."""

    name: str
    data: Any
    subscription: int


class UseDefault:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = UseDefault()  # "the client's timeout", for `request(timeout=...)`


class EventStream:
    """A subscription: `async with client.subscribe(...) as stream: async for event in stream`.

    Iteration ends with an exception, never silently: `ConnectionLost` if the daemon went away,
    `SubscriberDropped` if events were lost because this side did not keep up.
    """

    def __init__(
        self,
        client: Client,
        events: list[str],
        filter: Mapping[str, Any] | None,
        max_pending: int,
    ) -> None:
        self._client = client
        self.events = events
        self.filter = dict(filter or {})
        self.id: int | None = None
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._end: PeerdError | None = None  # why iteration fails once the queue is empty
        self._stopped = False  # closed by its owner: iteration just stops
        self._max_pending = max_pending

    async def __aenter__(self) -> EventStream:
        params: dict[str, Any] = {"events": self.events}
        if self.filter:
            params["filter"] = self.filter
        await self._client._request("v1.subscribe", params, DEFAULT, self._attach)
        return self

    def _attach(self, result: Any) -> None:
        # Runs in the client's reader as the reply is read, before the events that follow it.
        if isinstance(result, dict) and isinstance(result.get("subscription"), int):
            self.id = result["subscription"]
            self._client._streams[result["subscription"]] = self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Unsubscribe (if the connection is still up) and end the stream."""
        if self.id is None:
            return
        sub_id, self.id = self.id, None
        self._client._streams.pop(sub_id, None)
        self._stopped = True
        self._ready.set()
        if self._client._failure is None and not self._client.closed:
            try:
                await self._client.request("v1.unsubscribe", {"subscription": sub_id})
            except (ConnectionLost, Timeout):
                pass

    def _deliver(self, event: Event) -> None:
        if self._end is not None or self._stopped:
            return
        if len(self._queue) >= self._max_pending:
            self._end = SubscriberDropped(
                f"more than {self._max_pending} events were waiting to be read; later ones "
                "were dropped"
            )
        else:
            self._queue.append(event)
        self._ready.set()

    def _fail(self, exc: PeerdError) -> None:
        if self._end is None:
            self._end = exc
        self._ready.set()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._stopped:
                raise StopAsyncIteration
            if self._end is not None:
                raise self._end
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    async def get(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109 (API)
        """The next event; `Timeout` if none comes within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except TimeoutError:
            raise Timeout(f"no event within {timeout} s") from None


class Client:
    """An asyncio connection to the daemon. Make one with `await Client.connect()`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        socket_path: str,
        timeout: float | None,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.server_info: dict[str, Any] = {}
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._on_result: dict[int, Callable[[Any], None]] = {}
        self._streams: dict[int, EventStream] = {}
        self._last_error: PeerdError | None = None  # an id-less error: why the daemon hangs up
        self._failure: PeerdError | None = None  # set once the connection is gone
        self._closed = False
        self._reader_task = asyncio.create_task(self._read_loop(), name="peerd-client-reader")

    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike[str] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the calls' default)
    ) -> Client:
        """Connect to the daemon. `socket_path` defaults to the one the config file names
        (`config_path`, else $PEERD_CONFIG, else /etc/peerd/peerd.toml). `timeout` is the
        default for every call (None: wait as long as it takes)."""
        path = os.fspath(socket_path) if socket_path is not None else None
        if path is None:
            path = socket_path_from_config(config_path)
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=_READ_LIMIT)
        except FileNotFoundError:
            raise DaemonNotRunning(f"peerd is not running: there is no socket {path}") from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(f"peerd is not running: nothing listens on {path}") from None
        except PermissionError:
            raise AccessDenied(f"access denied to the peerd control socket {path}") from None
        except OSError as exc:
            raise DaemonNotRunning(f"cannot reach peerd on {path}: {exc.strerror}") from exc
        client = cls(reader, writer, path, timeout)
        try:
            info = await client.request("v1.hello")
        except BaseException:
            await client.close()
            raise
        if not isinstance(info, dict) or info.get("server") != "peerd":
            await client.close()
            raise DaemonNotRunning(f"{path} is not a peerd control socket")
        client.server_info = info
        return client

    @property
    def closed(self) -> bool:
        return self._closed or self._failure is not None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._reader_task.cancel()
        try:
            await self._reader_task
        except asyncio.CancelledError:
            pass
        self._fail_all(ConnectionLost("the client closed the connection"))
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    # Calls.

    async def call(self, method: str, /, **params: Any) -> Any:
        """Call `method` with named params; its result, or the daemon's error raised here.
        Uses the client's timeout; `request()` takes one per call."""
        return await self._request(method, params, DEFAULT, None)

    async def call_as(self, kind: type[T], method: str, /, **params: Any) -> T:
        """`call`, checking the result's type: the base of typed one-liners such as
        `async def status(self) -> dict[str, Any]: return await self.call_as(dict, "v1.status")`.
        """
        result = await self._request(method, params, DEFAULT, None)
        if not isinstance(result, kind):
            raise RemoteCallError(
                f"{method} returned {type(result).__name__}, expected {kind.__name__}"
            )
        return result

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | UseDefault | None = DEFAULT,  # noqa: ASYNC109 (a per-call deadline)
    ) -> Any:
        """`call` with params as a mapping and a timeout of its own (None: no limit)."""
        return await self._request(method, params, timeout, None)

    async def notify(self, method: str, /, **params: Any) -> None:
        """Send a JSON-RPC notification: the daemon runs `method` and answers nothing."""
        line = self._encode({"jsonrpc": control.JSONRPC, "method": method, "params": params})
        await self._send(line)

    def subscribe(
        self,
        events: str | Iterable[str],
        *,
        filter: Mapping[str, Any] | None = None,
        max_pending: int = MAX_PENDING_EVENTS,
    ) -> EventStream:
        """Events by name ("session.up"), prefix ("session.*") or all ("*"), optionally only
        those whose payload has the fields in `filter`. Use with `async with`."""
        names = [events] if isinstance(events, str) else list(events)
        return EventStream(self, names, filter, max_pending)

    # The API for programs: one method per daemon method.

    async def status(self) -> dict[str, Any]:
        """The daemon's state: identity, broker, sessions, counters of rejections."""
        return await self.call_as(dict, "v1.status")

    async def peers(self) -> list[dict[str, Any]]:
        return await self.call_as(list, "v1.peers")

    async def send(
        self,
        path: str | os.PathLike[str],
        to: str | Iterable[str],
        *,
        wait: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (how long receivers have to accept)
    ) -> dict[str, Any]:
        """Send a file to one or more trusted peers. Returns the transfer (its "id" among
        others) at once, or with `wait=True` once every receiver has verified the file (or
        failed: see "receivers" and "state"). What deltas saved: "published_bytes" (sent to
        the broker, once for all receivers) and, per receiver, "held_bytes" (what it already
        had from earlier files of this node; protocol/SPEC.md 7.11)."""
        peers = [to] if isinstance(to, str) else list(to)
        # abspath only joins the cwd: the daemon needs the path as the caller means it.
        params: dict[str, Any] = {"path": os.path.abspath(path), "to": peers}  # noqa: ASYNC240
        if timeout is not None:
            params["timeout"] = timeout
        started: dict[str, Any] = await self.request("v1.send", params)
        if not wait:
            return started
        return await self.wait(started["id"])

    async def transfers(self) -> list[dict[str, Any]]:
        return await self.call_as(list, "v1.transfers")

    async def cancel(self, transfer_id: str) -> dict[str, Any]:
        return await self.call_as(dict, "v1.cancel", id=transfer_id)

    async def wait(
        self,
        transfer_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-call deadline)
    ) -> dict[str, Any]:
        """Until the transfer ends, on either side; its final record."""
        params: dict[str, Any] = {"id": transfer_id}
        if timeout is not None:
            params["timeout"] = timeout
        result: dict[str, Any] = await self.request("v1.transfer.wait", params, timeout=None)
        return result

    async def receive_file(
        self,
        *,
        peer: str | None = None,
        name: str | None = None,
        since: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-call deadline)
    ) -> str:
        """The path of the next file received and verified (from `peer`, named `name`) after
        `since` (default: now). Raises `Timeout` if none arrives within `timeout` seconds."""
        params: dict[str, Any] = {
            "since": time.time() if since is None else since,
            "wait": 24 * 3600.0 if timeout is None else timeout,
        }
        if peer is not None:
            params["peer"] = peer
        if name is not None:
            params["name"] = name
        while True:
            found = await self.request("v1.transfer.received", params, timeout=None)
            if found is not None:
                return str(found["path"])
            if timeout is not None:
                raise Timeout(f"no file arrived within {timeout} s")

    async def send_message(
        self, peer: str, channel: str, data: bytes, *, ttl: float | None = None
    ) -> int:
        """Queue a message for `peer` on `channel` (delivered exactly once, in order, even if
        the peer is offline now); its sequence number."""
        params: dict[str, Any] = {
            "peer": peer,
            "channel": channel,
            "data_b64": base64.b64encode(data).decode("ascii"),
        }
        if ttl is not None:
            params["ttl"] = ttl
        result = await self.request("v1.msg.send", params)
        return int(result["seq"])

    async def messages(
        self, channel: str, *, wait: float = 30.0
    ) -> AsyncGenerator[ReceivedMessage, None]:
        """Messages arriving on `channel`, each acknowledged (removed from the daemon's inbox)
        once the loop body has run for it: a crash repeats at most the message at hand."""
        while True:
            batch = await self.request(
                "v1.msg.recv", {"channel": channel, "wait": wait}, timeout=wait + 30
            )
            for m in batch:
                yield ReceivedMessage(
                    m["id"], m["peer"], m["channel"], m["seq"], base64.b64decode(m["data_b64"])
                )
                await self.request("v1.msg.ack", {"ids": [m["id"]]})

    # Internals.

    def _encode(self, message: dict[str, Any]) -> bytes:
        try:
            line = encode_line(message)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"parameters of {message['method']} are not JSON: {exc}") from exc
        if len(line) > control.MAX_LINE:
            raise UsageError(
                f"the request is {len(line)} bytes; the daemon takes at most {control.MAX_LINE}"
            )
        return line

    async def _send(self, line: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise ConnectionLost("the client is closed")
        try:
            self._writer.write(line)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            # The daemon hung up; what it said last (e.g. "access denied") is still to be read.
            await asyncio.wait({self._reader_task}, timeout=_LAST_WORDS)
            raise self._failure or ConnectionLost(
                f"lost the connection to peerd on {self.socket_path}"
            ) from exc

    async def _request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        timeout: float | UseDefault | None,  # noqa: ASYNC109
        on_result: Callable[[Any], None] | None,
    ) -> Any:
        if isinstance(timeout, UseDefault):
            timeout = self.timeout
        request_id = self._next_id
        self._next_id += 1
        message = {"jsonrpc": control.JSONRPC, "id": request_id, "method": method}
        message["params"] = dict(params or {})
        line = self._encode(message)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if on_result is not None:
            self._on_result[request_id] = on_result
        try:
            await self._send(line)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise Timeout(f"peerd did not answer {method} within {timeout} s") from None
        finally:
            self._pending.pop(request_id, None)
            self._on_result.pop(request_id, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: already raised by _send, or a late reply

    async def _read_loop(self) -> None:
        failure: PeerdError | None = None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    message = decode_line(line)
                except ValueError:
                    failure = ConnectionLost("peerd sent a line that is not JSON")
                    break
                self._dispatch(message)
        except ValueError:  # a line over the read limit
            failure = ConnectionLost(f"peerd sent a line over {_READ_LIMIT} bytes")
        except (ConnectionError, OSError) as exc:
            failure = self._last_error or ConnectionLost(f"lost the connection to peerd: {exc}")
        if failure is None:
            failure = self._last_error or ConnectionLost(
                f"peerd closed the connection on {self.socket_path}"
            )
        self._fail_all(failure)

    def _fail_all(self, failure: PeerdError) -> None:
        if self._failure is None:
            self._failure = failure
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._failure)
        for stream in list(self._streams.values()):
            stream._fail(self._failure)

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            log.warning("ignoring a control message that is not an object")
            return
        if "id" in message and ("result" in message or "error" in message):
            request_id = message["id"]
            if request_id is None:
                # An error tied to no request: the daemon refuses us or is about to hang up.
                self._last_error = error_from_wire(message.get("error"))
                return
            future = self._pending.get(request_id) if isinstance(request_id, int) else None
            if future is None or future.done():
                return  # a call that timed out
            if "error" in message:
                future.set_exception(error_from_wire(message["error"]))
                return
            hook = self._on_result.get(request_id)
            if hook is not None:
                hook(message["result"])
            future.set_result(message["result"])
            return
        method = message.get("method")
        params = message.get("params")
        if not isinstance(params, dict):
            return
        if method == EVENT_METHOD:
            stream = self._streams.get(params.get("subscription"))  # type: ignore[arg-type]
            event = params.get("event")
            if stream is not None and isinstance(event, str):
                stream._deliver(Event(event, params.get("data"), params["subscription"]))
        elif method == DROPPED_METHOD:
            hint = params.get("hint")
            self._last_error = SubscriberDropped(
                str(params.get("message") or "the daemon dropped this connection"),
                hint=hint if isinstance(hint, str) else None,
            )
