"""The contract between the daemon and the parts plugged into it.

The daemon (`peerd.daemon.Daemon`) owns the sessions, the broker link, the trust store, the keys
and the control socket: it is the **host**. Transfers, authority mode and messages are
**extensions**: each gets the host's narrow interface (`Host`) when it is built, implements the
hooks of `Extension` it needs, and declares its control methods with `@control_method`. No
extension holds a reference to the daemon itself or calls anything but `Host`, so an extension
can be built and driven in a test against an in-memory host, and the daemon can be read without
following calls back and forth.

This is the layering aioquic uses for HTTP/3 on QUIC (`H3Connection(quic)` sends through the
connection's narrow interface and turns its events into its own), and the one
`peerd.messages.Messenger(store, transmit, limits)` has always had.

Threading model (there is one: the daemon's event loop). Hooks named `on_*` and the synchronous
hooks are called in the broker link's read path: they must not block or await; store work goes
through `Host.defer`. The `async` hooks run on the daemon's event task, one at a time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import asyncio

    from peerd.config import Config
    from peerd.errors import PeerdError
    from peerd.keystore import Keystore
    from peerd.mqtt import LinkLimits, Message, Topics
    from peerd.store import Store
    from protocol.messaging import AppMessage

# A control method's handler: (params, the calling connection) -> a JSON value. The connection
# is typed loosely here so that this module stays free of the control server's imports.
Handler = Callable[[dict[str, Any], Any], Awaitable[Any]]
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

_CONTROL_METHOD = "__peerd_control_method__"


def control_method(name: str) -> Callable[[H], H]:
    """Declare a method of an extension (or of the daemon) as the control method `name`
    (`v1.send`): `control_methods(obj)` finds it, the host registers it. The method takes
    `(self, params, conn)`."""

    def mark(fn: H) -> H:
        setattr(fn, _CONTROL_METHOD, name)
        return fn

    return mark


def control_methods(obj: object) -> dict[str, Handler]:
    """The control methods `obj`'s class declares with `@control_method`, bound to `obj`."""
    out: dict[str, Handler] = {}
    for cls in reversed(type(obj).__mro__):
        for attr, fn in vars(cls).items():
            name = getattr(fn, _CONTROL_METHOD, None)
            if isinstance(name, str):
                out[name] = getattr(obj, attr)
    return out


class Subscribed(Protocol):
    """A broker subscription an extension holds (a transfer's chunk topic)."""

    @property
    def closed(self) -> bool:
        """Ended: closed, or refused by the broker (also when restored after a reconnect)."""
        ...

    async def close(self) -> None: ...


class Link(Protocol):
    """What extensions use of the broker link: publish, subscribe, and wait for it to flush."""

    @property
    def connected(self) -> bool: ...

    @property
    def limits(self) -> LinkLimits:
        """The broker's limits in force: transfers size their chunks to fit."""
        ...

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        qos: int = 0,
        retain: bool = False,
    ) -> None: ...

    async def subscribe(
        self, topic_filter: str, *, qos: int = 1, handler: Callable[[Message], None] | None = None
    ) -> Subscribed: ...

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the link's own BrokerTimeout
        ...

    async def settled(self, timeout: float) -> LinkLimits:  # noqa: ASYNC109 - a bound, not a failure
        """The limits in force once a probe of the broker's packet limit under way finished."""
        ...

    def reprobe(self) -> None:
        """Probe the broker's packet limit again: what fitted went nowhere."""


class Host(Protocol):
    """The daemon as its extensions see it."""

    @property
    def config(self) -> Config:
        """The running configuration (a new object after a reload: read it each time)."""
        ...

    @property
    def peer_id(self) -> str: ...

    @property
    def keys(self) -> Keystore: ...

    @property
    def store(self) -> Store: ...

    @property
    def link(self) -> Link: ...

    @property
    def topics(self) -> Topics: ...

    def transmit(self, peer: str, payload: bytes) -> bool:
        """Send an encoded application payload on `peer`'s session. False when there is none
        (the host starts one; the caller tries again when `Extension.session_up` says so)."""
        ...

    def connect(self, peer: str) -> None:
        """Start a session with `peer` unless there is one, it is connecting, or the trust
        store would refuse it."""
        ...

    def connected_peers(self) -> list[str]: ...

    def has_trusted_session(self, peer: str) -> bool:
        """A session with `peer` exists that the store recorded and still allows (what a peer
        sends is taken only from such a session)."""
        ...

    def identity_changed(self, *, rehandshake: bool) -> None:
        """The keystore's static key or credentials changed: new handshakes present them, and
        with `rehandshake` every connected peer gets a fresh one now."""
        ...

    def publish_event(self, name: str, payload: Mapping[str, Any]) -> None:
        """An event for control-socket subscribers (declared in `Extension.events`)."""
        ...

    def publish_revocation(self, statement: bytes) -> None:
        """Retain a revocation statement on the broker under this node's id (best effort)."""
        ...

    def count_rejection(self, reason: str, message: str | None = None, *args: object) -> None:
        """Count something a peer sent that was refused, under `reason` (`peerd status`); with
        `message` (%-formatted with `args`), log it too, within the daemon's log budget."""
        ...

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run `work` as a task of its own; a failure is logged, never lost."""
        ...

    def defer(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Run `work` on the event task, after what is queued before it: how the read path
        hands on store work. Bounded: False (and counted) when the queue is full."""
        ...

    def stop(self, error: PeerdError | None = None) -> None:
        """Shut the daemon down cleanly; with `error`, `peerd run` then fails with it (its
        message and exit code)."""
        ...


class Extension(Protocol):
    """A part of the daemon built on `Host`. Subclass it to inherit the no-op hooks.

    Lifecycle: built with the host before the daemon starts; `run()` is one task of the daemon's
    root TaskGroup; `stop()` is awaited while the daemon drains.
    """

    # Control-socket events this extension publishes (besides the daemon's own).
    events: tuple[str, ...] = ()

    async def run(self) -> None:
        """The extension's own long-running work (resuming, timers, expiry)."""
        return

    async def stop(self) -> None:
        """Cancel the extension's work and release what it holds."""
        return

    async def session_up(self, peer: str) -> None:
        """A session with `peer` is up and recorded in the store."""
        return

    def session_down(self, peer: str, reason: str) -> None:
        """The session with `peer` ended (the host reconnects when there is work)."""
        return

    def on_app(self, peer: str, app: AppMessage) -> None:
        """An application payload from `peer`'s session (in the read path: never block)."""
        return

    def trust_changed(self) -> None:
        """After every committed trust event (and at housekeeping): end what is no longer
        allowed."""
        return

    async def broker_up(self) -> None:
        """The broker link (re)connected."""
        return

    def next_deadline(self) -> float | None:
        """When `on_timer` is next due (the host's timer loop waits for the earliest)."""
        return None

    def on_timer(self, now: float) -> None:
        """A deadline from `next_deadline` passed (in the timer loop: never block)."""
        return

    async def housekeeping(self, now: float) -> None:
        """Periodic expiry (about once a minute)."""
        return

    async def peers_with_work(self) -> set[str]:
        """Peers this extension waits for: the host connects to them after a reconnect."""
        return set()

    def reload(self, config: Config) -> None:
        """SIGHUP: the new configuration (also what `Host.config` returns from now on)."""
        return

    def status(self) -> dict[str, Any]:
        """Entries merged into `v1.status`."""
        return {}

    def rejections(self) -> dict[str, int]:
        """Refusals this extension counts itself, merged into `v1.status` `rejections`."""
        return {}


__all__ = [
    "Extension",
    "Handler",
    "Host",
    "Link",
    "Subscribed",
    "control_method",
    "control_methods",
]
