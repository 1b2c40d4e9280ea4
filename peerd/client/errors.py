"""The daemon's errors on this side of the socket: `DaemonNotRunning`, `ConnectionLost`,
`Timeout`, and the `PeerdError` subclass re-raised for each JSON-RPC error the daemon sends
(the same class when this process knows it, else a `RemoteCallError` stand-in of that name).
"""

from __future__ import annotations

from peerd import control
from peerd.control import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    AccessDenied,
    ControlError,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    SubscriberDropped,
)
from peerd.errors import (
    ConfigError,
    LocalProtocolError,
    PeerdError,
    ProtocolError,
    RemoteProtocolError,
    UsageError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the CLI loads this)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any


class DaemonNotRunning(PeerdError):
    """The daemon's control socket is missing or nothing answers on it."""

    hint = "start it with `systemctl start peerd` or `peerd run`"


class ConnectionLost(DaemonNotRunning):
    """The daemon closed the connection (it stopped, or restarted) while it was in use."""

    hint = "check that the daemon is running (`systemctl status peerd`) and retry"


class Timeout(PeerdError):
    """The daemon did not answer within the call's timeout."""

    hint = "the daemon may be busy or stuck: retry with a longer timeout, or check its log"


class RemoteCallError(PeerdError):
    """The daemon answered with an error this process has no class for.

    Unknown error types become a subclass of this one named like the daemon's class (so the
    CLI's exit codes, keyed by class name, still apply) and derived from the nearest ancestor
    this process knows.
    """

    code: int = control.APPLICATION_ERROR
    data: Any = None

    def __init__(
        self, message: str, *, code: int | None = None, data: Any = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        if code is not None:
            self.code = code
        self.data = data


# --- errors from the wire -----------------------------------------------------------------------

_REGISTERED: dict[str, type[PeerdError]] = {}
_STAND_INS: dict[tuple[str, type[PeerdError] | None], type[PeerdError]] = {}


def register_error(cls: type[PeerdError]) -> type[PeerdError]:
    """Make `cls` the class re-raised for daemon errors of its name (also a decorator).

    Classes that are imported are found without this; registering settles name clashes.
    """
    _REGISTERED[cls.__name__] = cls
    return cls


for _cls in (
    AccessDenied,
    ConfigError,
    ConnectionLost,
    ControlError,
    DaemonNotRunning,
    InvalidParams,
    LocalProtocolError,
    MethodNotFound,
    Overloaded,
    PeerdError,
    ProtocolError,
    RemoteCallError,
    RemoteProtocolError,
    SubscriberDropped,
    Timeout,
    UsageError,
):
    register_error(_cls)


def _known_class(name: str) -> type[PeerdError] | None:
    if name in _REGISTERED:
        return _REGISTERED[name]
    found: list[type[PeerdError]] = []
    todo: list[type[PeerdError]] = [PeerdError]
    seen: set[type[PeerdError]] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.__name__ == name and cls not in _STAND_INS.values():
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found[0] if len(found) == 1 else None


def _error_class(name: str, bases: Iterable[Any]) -> type[PeerdError]:
    known = _known_class(name)
    if known is not None:
        return known
    ancestor = next(
        (c for c in (_known_class(b) for b in bases if isinstance(b, str)) if c is not None),
        None,
    )
    if ancestor is PeerdError:
        ancestor = None
    key = (name, ancestor)
    if key not in _STAND_INS:
        parents: tuple[type[PeerdError], ...] = (RemoteCallError,)
        if ancestor is not None and not issubclass(RemoteCallError, ancestor):
            parents += (ancestor,)
        _STAND_INS[key] = type(name, parents, {"__module__": "peerd.client"})
    return _STAND_INS[key]


def error_from_wire(error: Any) -> PeerdError:
    """The exception for a JSON-RPC error object sent by the daemon."""
    if not isinstance(error, dict):
        return RemoteCallError(f"the daemon sent a malformed error: {error!r:.200}")
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    message = error.get("message")
    message = message if isinstance(message, str) else "error"
    data = error.get("data")
    if not isinstance(data, dict):
        data = {}
    name = data.get("type")
    if isinstance(name, str) and name.isidentifier() and len(name) <= 64:
        bases = data.get("bases")
        cls = _error_class(name, bases if isinstance(bases, list) else [])
    elif code == METHOD_NOT_FOUND:
        cls = MethodNotFound
    elif code == INVALID_PARAMS:
        cls = InvalidParams
    else:
        return RemoteCallError(
            message,
            code=code,
            data=data or None,
            hint="the daemon's log may say more" if code == control.INTERNAL_ERROR else None,
        )
    # Built without calling the class's __init__, whose signature is the class's own business:
    # what crosses the socket is a message, a hint and a reason.
    exc = cls.__new__(cls, message)
    Exception.__init__(exc, message)
    hint = data.get("hint")
    if isinstance(hint, str) and hint:
        exc.hint = hint
    reason = data.get("reason")
    if isinstance(reason, str):
        exc.reason = reason  # type: ignore[attr-defined]
    exc.code = code  # type: ignore[attr-defined]
    exc.data = data  # type: ignore[attr-defined]
    return exc
