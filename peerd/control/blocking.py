"""`ControlLink`: a blocking, single-threaded client of the control socket, for the CLI.

`peerd.Client` is the API for programs; it needs asyncio, whose import alone costs a command
more than the rest of its start-up. A CLI command makes one or two calls and perhaps watches
events while it waits, which a blocking socket does as well: this module uses only `_socket`,
`json` (through the wire format) and the client's error classes, so `peerd status` costs little
more than the interpreter's own start (`scripts/bench cli`, `scripts/check_imports.py`).
`_socket` is the C module under `socket`: the same socket objects and errors, without the
wrapper module, whose import (enum classes built for every address family and flag, `selectors`)
costs a command ~3 ms, an eighth of a bare interpreter's start.

Every wait has a deadline; a daemon that hangs up mid-call is `ConnectionLost`, a missing one
`DaemonNotRunning`, errors it sends are re-raised as the same classes `peerd.Client` raises.
Ctrl-C (KeyboardInterrupt) interrupts any wait.
"""

from __future__ import annotations

import _socket
import time

from peerd.client.errors import ConnectionLost, DaemonNotRunning, Timeout, error_from_wire
from peerd.control.wire import (
    DROPPED_METHOD,
    EVENT_METHOD,
    JSONRPC,
    MAX_LINE,
    MAX_REPLY,
    AccessDenied,
    SubscriberDropped,
    decode_line,
    encode_line,
)
from peerd.errors import PeerdError, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the CLI loads this)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType
    from typing import Any, Final

    EventHandler = Callable[[str, Any], None]

_READ_LIMIT: Final = MAX_REPLY + 1024
_POLL: Final = 0.5  # seconds between checks of a deadline while nothing arrives


class ControlLink:
    """One connection to the daemon. `with ControlLink.connect(path) as link: link.call(...)`."""

    def __init__(self, sock: _socket.socket, path: str) -> None:
        self.path = path
        self._sock = sock
        self._buffer = bytearray()
        self._next_id = 1
        self._last_error: PeerdError | None = None

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> ControlLink:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, FileNotFoundError):
                raise DaemonNotRunning(f"peerd is not running: there is no socket {path}") from None
            if isinstance(exc, ConnectionRefusedError):
                raise DaemonNotRunning(f"peerd is not running: nothing listens on {path}") from None
            if isinstance(exc, PermissionError):
                raise AccessDenied(f"access denied to the peerd control socket {path}") from None
            if isinstance(exc, OSError):
                raise DaemonNotRunning(f"cannot reach peerd on {path}: {exc.strerror}") from exc
            raise
        link = cls(sock, path)
        try:
            info = link.call("v1.hello", timeout=timeout)
            if not isinstance(info, dict) or info.get("server") != "peerd":
                raise DaemonNotRunning(f"{path} is not a peerd control socket")
        except BaseException:
            link.close()
            raise
        return link

    def __enter__(self) -> ControlLink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- calls ---------------------------------------------------------------------------------

    def start(self, method: str, params: Mapping[str, Any] | None = None) -> int:
        """Send a request without waiting: its id, for `result`."""
        request_id = self._next_id
        self._next_id += 1
        message = {"jsonrpc": JSONRPC, "id": request_id, "method": method}
        message["params"] = dict(params or {})
        try:
            line = encode_line(message)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"parameters of {method} are not JSON: {exc}") from exc
        if len(line) > MAX_LINE:
            raise UsageError(
                f"the request is {len(line)} bytes; the daemon takes at most {MAX_LINE}"
            )
        try:
            self._sock.sendall(line)
        except OSError as exc:
            # What the daemon said before it hung up (e.g. "access denied") may still be here.
            self._drain_last_words()
            raise self._last_error or ConnectionLost(
                f"lost the connection to peerd on {self.path}"
            ) from exc
        return request_id

    def result(
        self, request_id: int, *, timeout: float | None, on_event: EventHandler | None = None
    ) -> Any:
        """The answer to request `request_id`, handing the events that arrive meanwhile to
        `on_event`; `Timeout` after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._read(deadline, what=f"an answer within {timeout} s")
            if self._is_event(message, on_event):
                continue
            if message.get("id") != request_id:
                continue  # the answer to a call given up on earlier
            if "error" in message:
                raise error_from_wire(message["error"])
            return message.get("result")

    def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = 60.0,
        on_event: EventHandler | None = None,
    ) -> Any:
        try:
            return self.result(self.start(method, params), timeout=timeout, on_event=on_event)
        except Timeout:
            raise Timeout(f"peerd did not answer {method} within {timeout} s") from None

    def subscribe(self, events: list[str]) -> int:
        """Events by name from now on (see `result`'s `on_event`); the subscription's id."""
        result = self.call("v1.subscribe", {"events": events})
        return int(result["subscription"])

    # -- reading -------------------------------------------------------------------------------

    def _is_event(self, message: dict[str, Any], on_event: EventHandler | None) -> bool:
        method = message.get("method")
        params = message.get("params")
        if method is None:
            return False
        if method == EVENT_METHOD and isinstance(params, dict):
            name = params.get("event")
            if isinstance(name, str) and on_event is not None:
                on_event(name, params.get("data"))
        elif method == DROPPED_METHOD and isinstance(params, dict):
            hint = params.get("hint")
            self._last_error = SubscriberDropped(
                str(params.get("message") or "the daemon dropped this connection"),
                hint=hint if isinstance(hint, str) else None,
            )
        return True

    def _read(self, deadline: float | None, *, what: str) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                try:
                    message = decode_line(line)
                except ValueError:
                    raise ConnectionLost("peerd sent a line that is not JSON") from None
                if not isinstance(message, dict):
                    continue
                if message.get("id", 0) is None and "error" in message:
                    # An error tied to no request: why the daemon is about to hang up.
                    self._last_error = error_from_wire(message["error"])
                    continue
                return message
            if len(self._buffer) > _READ_LIMIT:
                raise ConnectionLost(f"peerd sent a line over {_READ_LIMIT} bytes")
            wait = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
            if wait <= 0:
                raise Timeout(f"peerd sent no {what}")
            self._sock.settimeout(wait)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                raise self._last_error or ConnectionLost(
                    f"lost the connection to peerd: {exc}"
                ) from exc
            if not chunk:
                raise self._last_error or ConnectionLost(
                    f"peerd closed the connection on {self.path}"
                )
            self._buffer += chunk

    def _drain_last_words(self) -> None:
        try:
            self._read(time.monotonic() + 2.0, what="last words")
        except PeerdError:
            pass


__all__ = ["ControlLink", "EventHandler"]
