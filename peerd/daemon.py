"""`peerd run`: the daemon.

One root TaskGroup with named tasks: the broker link, the timer loop that drives the session
layer, the event loop that does the store work sessions need, housekeeping (invite and outbox
expiry, scheduled key rotation), the systemd watchdog, and the control socket's server.

The handshake path is synchronous on purpose: a frame from the inbox is handed to the session
layer in the link's read path and the answer published at once, with the trust decision taken
from the store's in-memory view. Anything that needs the store (recording a peer, consuming an
invite, delivering a message) goes to the event task through `peerd.events.EventLanes`: session
records never dropped, revocation statements in per-publisher lanes checked cheaply before they
are queued, bulk work bounded. Log lines a peer or broker account can cause go through a
`LogBudget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any

from peerd import __version__
from peerd.authority.extension import Authority
from peerd.config import Config, load_config
from peerd.control import ControlServer
from peerd.errors import DaemonError, PeerdError, UsageError
from peerd.events import EventLanes, LaneLimits, LogBudget
from peerd.host import Extension, control_methods
from peerd.keystore import Keystore, read_passphrase
from peerd.logs import log_event
from peerd.messages import Messages, OutboxLimits
from peerd.metrics import Metrics
from peerd.mqtt import BrokerError, BrokerLink, BrokerQueueFull, Message, Topics, link_for_config
from peerd.mqtt.port import subscribe_steadily
from peerd.node import JOIN_REFUSALS, NodeMethods, broker_json, local_refusals, peer_json
from peerd.revocation_index import RevocationIndex
from peerd.revocations import Revocations
from peerd.sessions import SessionTrust, TicketKeeper, local_key, read_psk
from peerd.store import Store, open_store
from peerd.systemd import Notifier, watchdog_interval, watchdog_loop
from peerd.transfers import Transfers
from peerd.waiting import wait_set
from protocol.errors import RemoteProtocolError
from protocol.identity import (
    InviteToken,
    TrustError,
    format_peer_id,
)
from protocol.identity.trust import Authenticated
from protocol.messaging import RevocationPush, decode_app
from protocol.session import (
    HandshakeFailed,
    Output,
    Rejected,
    SendFrame,
    Session,
    SessionDown,
    SessionLimits,
    SessionManager,
    SessionUp,
    TicketIssued,
    TicketSpent,
)
from protocol.session import Message as SessionMessage

log = logging.getLogger("peerd")

EVENTS = (
    "broker.up",
    "broker.down",
    "session.up",
    "session.down",
    "session.failed",
    "session.closed",
    "trust.changed",
    "keys.rotated",
    "message",
)
EVENT_QUEUE = 10_000  # bulk store work waiting for the event task; beyond it: drop and count
MAX_TOKEN_TEXT = 4096  # an invite token is ~230 characters, more with line breaks
HOUSEKEEPING_EVERY = 60.0


class JoinFailed(PeerdError):
    hint = "check that the inviter's daemon is running and the token is fresh"


class _Shutdown(Exception):
    """Raised inside the root TaskGroup to end it."""


class Daemon:
    def __init__(self, config: Config, *, passphrase: bytes | None = None) -> None:
        self.config = config
        self.passphrase = passphrase
        self.started_at = time.time()
        self.counters: Counter[str] = Counter()
        self.handshake_counts: Counter[str] = Counter()  # "new", "rekey", "failed:<reason>"
        self._events = EventLanes(LaneLimits(bulk=EVENT_QUEUE))
        self._logs = LogBudget(log)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.stopped_for: PeerdError | None = None
        self._joins: dict[str, asyncio.Future[SessionUp]] = {}
        self._session_since: dict[str, float] = {}
        # Sessions up but not yet recorded in the store, as (peer, local index): a trust change
        # in between must not judge them by the state before their own recording (a pending
        # peer's first session would be closed as unknown); the recording applies the rules.
        self._unrecorded: set[tuple[str, int]] = set()
        self._recent_handshakes: deque[dict[str, Any]] = deque(maxlen=1000)
        self.store: Store
        self.keys: Keystore
        self.sessions: SessionManager
        self.link: BrokerLink
        self.control: ControlServer
        self.messages: Messages
        self.topics = Topics(config.node.network)
        self._extensions: list[Extension] = []
        self.notifier = Notifier(None)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.keys.peer_id

    async def _open(self) -> None:
        cfg = self.config
        now = time.time()
        if not Keystore.exists(cfg.keys.dir):
            raise DaemonError(
                f"no identity in {cfg.keys.dir}",
                hint=f"create one with `peerd init` (config {cfg.path or 'default'})",
            )
        passphrase = self.passphrase
        if passphrase is None and cfg.keys.passphrase_file is not None:
            passphrase = read_passphrase(cfg.keys.passphrase_file)
        self.keys = Keystore.load(
            cfg.keys.dir,
            now=now,
            passphrase=passphrase,
            certificate_days=cfg.keys.certificate_days,
        )
        self.store = await open_store(cfg)
        own = self.store.identity
        if own is None or own.peer_id != self.keys.peer_id:
            await self.store.close()
            raise DaemonError(
                f"the trust store {cfg.node.store} does not belong to the keys in {cfg.keys.dir}",
                hint="point [node] store and [keys] dir at the same node",
            )
        network_psk = None
        if cfg.network.psk_file is not None:
            network_psk = read_psk(cfg.network.psk_file)
        self.sessions = SessionManager(
            peer_id=self.keys.peer_id,
            network=cfg.node.network,
            static=self.keys.static,
            credentials=self.keys.credentials(),
            trust=SessionTrust(self.store.view()),
            network_psk=network_psk,
            limits=SessionLimits(
                hello_rate=cfg.limits.handshakes_per_second,
                hello_burst=2 * cfg.limits.handshakes_per_second,
                hello_rate_per_peer=cfg.limits.handshakes_per_second_per_peer,
                hello_burst_per_peer=2 * cfg.limits.handshakes_per_second_per_peer,
                max_half_open=cfg.limits.half_open_handshakes,
            ),
        )
        self.tickets = TicketKeeper(self.store)
        self._handle(self.sessions.load_tickets(await self.tickets.load(), now), now)
        self.link = link_for_config(
            cfg.broker, client_id=self.keys.peer_id, on_state=self._on_link_state
        )
        self.control = ControlServer(cfg.node.socket, group=cfg.control.group, events=EVENTS)
        self.messages = Messages(
            self,
            OutboxLimits(
                max_messages_per_peer=cfg.limits.outbox_messages_per_peer,
                max_bytes=cfg.limits.outbox_size,
                max_inbox_bytes=cfg.limits.inbox_size,
            ),
        )
        # The parts built on this host, which they see only as a peerd.host.Host. Order matters
        # where hooks do: a peer's queued messages are pumped first when its session comes up.
        transfers = Transfers(self)
        self._revocations = revocations = Revocations(self, self._events)
        index = RevocationIndex(self, revocations)
        self._extensions = [self.messages, revocations, index, transfers, Authority(self)]
        self.link.probe_plan = transfers.probe_plan()  # chunk sizes that fit the broker
        for ext in self._extensions:
            for name in ext.events:
                if name not in self.control.events:
                    self.control.add_event(name)
        self.metrics = Metrics(self)
        for part in (NodeMethods(self), self.metrics, *self._extensions):
            for method, handler in control_methods(part).items():
                self.control.register(method, handler)  # a name declared twice is an error
        self.store.add_listener(lambda _event: self._trust_changed())

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `stop()`; returns after a clean shutdown."""
        await self._open()
        loop = asyncio.get_running_loop()
        notifier = self.notifier = Notifier.from_environ()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self._reload(), name="reload"))
        try:
            await self.control.start()
            await self.metrics.start()
            log_event(log, "config.loaded", path=self.config.path)
            log_event(
                log,
                "daemon.start",
                version=__version__,
                node=format_peer_id(self.peer_id),
                name=self.config.node.name,
                network=self.config.node.network,
                broker=self.link.settings.url,
                config=self.config.path,
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.link.run(), name="mqtt-link")
                    tg.create_task(self._subscribe(), name="subscribe")
                    tg.create_task(self._timer_loop(), name="timers")
                    tg.create_task(self._event_loop(), name="events")
                    tg.create_task(self._housekeeping(), name="housekeeping")
                    for ext in self._extensions:
                        tg.create_task(ext.run(), name=type(ext).__name__)
                    interval = watchdog_interval()
                    if interval:
                        tg.create_task(watchdog_loop(notifier, interval), name="watchdog")
                    notifier.ready(self._status_line())
                    await self._stop.wait()
                    notifier.stopping()
                    await self._drain()
                    raise _Shutdown
            except* _Shutdown:
                pass
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                await self.link.close()
            await self.metrics.close()
            await self.control.close()
            await self.store.close()
            if self._stop.is_set():
                log_event(log, "daemon.stop")

    def stop(self, error: PeerdError | None = None) -> None:
        self.stopped_for = self.stopped_for or error  # `peerd run` fails with it
        self._stop.set()

    async def _drain(self) -> None:
        """Tell connected peers we are going (they stop sending on dead sessions), let the link
        flush for a moment, and let the event task finish what it holds."""
        now = time.time()
        for peer in self.sessions.connected_peers():
            self._handle(self.sessions.close(peer, "shutting down", now), now)
        for ext in self._extensions:
            with contextlib.suppress(Exception):
                await ext.stop()
        with contextlib.suppress(BrokerError, TimeoutError):
            await self.link.drain(timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._events.join(), 5.0)

    # -- the Host interface (peerd.host) ------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            name = getattr(task, "get_name", lambda: None)()
            log_event(log, "daemon.task_failed", logging.ERROR, task=name, exc_info=exc)

    async def _reload(self) -> None:
        """SIGHUP: re-read the config; apply what can change live, say what needs a restart."""
        path = self.config.path
        if path is None:
            return
        try:
            new = load_config(path)
        except PeerdError as exc:
            log_event(log, "config.reload_failed", logging.ERROR, error=exc.one_line())
            return
        # Live: [receive] limits, [keys] overlap and rotation schedule, the authority key.
        # The rest names sockets, files and the broker connection: those need a restart.
        restart = [
            name
            for name in ("node", "broker", "control", "metrics", "log")
            if getattr(new, name) != getattr(self.config, name)
        ]
        if new.network.psk_file != self.config.network.psk_file:
            restart.append("network")
        self.store.view().configure(
            overlap=new.keys.overlap_seconds, authority_key=new.network.authority_public
        )
        self.config = new
        self._trust_changed()  # a new authority key or overlap may end some sessions
        for ext in self._extensions:
            ext.reload(new)
        level = logging.WARNING if restart else logging.INFO
        log_event(log, "config.reloaded", level, path=path, restart_needed=restart or None)

    # -- the broker --------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        inbox = self.topics.inbox(self.peer_id)
        await subscribe_steadily(self.link, inbox, qos=0, handler=self._on_inbox)

    def _status_line(self) -> str:
        """The one line `systemctl status` shows."""
        broker = "broker connected" if self.link.connected else "waiting for the broker"
        sessions = len(self.sessions.connected_peers())
        return f"node {self.peer_id}: {broker}, {sessions} session(s)"

    def _on_link_state(self, up: bool) -> None:
        self.notifier.status(self._status_line())
        error = self.link.last_error
        event = "broker.connected" if up else "broker.lost"
        log_event(log, event, url=self.link.settings.url, error=None if up else error)
        self.publish_event("broker." + ("up" if up else "down"), {"url": self.link.settings.url})
        if up:
            # Whatever waited for the broker: peers with queued work, republished revocations.
            self.spawn(self._after_reconnect(), name="after-reconnect")

    async def _after_reconnect(self) -> None:
        now = time.time()
        for ext in self._extensions:
            for peer in await ext.peers_with_work():
                self._connect(peer, now)
        for ext in self._extensions:
            await ext.broker_up()

    def _on_inbox(self, msg: Message) -> None:
        now = time.time()
        self._handle(self.sessions.receive(msg.payload, now), now)

    def _publish_frame(self, out: SendFrame) -> None:
        try:
            self.link.publish_nowait(self.topics.inbox(out.peer_id), out.frame, qos=0)
        except BrokerQueueFull:
            self.counters["frames-dropped-broker-queue"] += 1
        except ValueError:  # not a peer id we can address: a bug upstream, never a peer's input
            log.exception("cannot publish to %r", out.peer_id)

    def transmit(self, peer: str, payload: bytes) -> bool:
        """Send an application payload on `peer`'s session; False (and connect) if none. With
        a resumption under way (a known peer) it goes as early data, right behind the HELLO."""
        now = time.time()
        if not self.sessions.has_session(peer):
            self._connect(peer, now)
            try:
                outs = self.sessions.send(peer, payload, now)
            except PeerdError:
                return False
            self._handle(outs, now)
            return True
        try:
            outs = self.sessions.send(peer, payload, now)
        except PeerdError:
            self._connect(peer, now)
            return False
        self._handle(outs, now)
        return True

    def connect(self, peer: str) -> None:
        self._connect(peer, time.time())

    def connected_peers(self) -> list[str]:
        return self.sessions.connected_peers()

    def identity_changed(self, *, rehandshake: bool) -> None:
        now = time.time()
        self._handle(self.sessions.set_identity(self.keys.static, self.keys.credentials()), now)
        if rehandshake:
            for peer in self.sessions.connected_peers():
                self._handle(self.sessions.connect(peer, now), now)

    def publish_event(self, name: str, payload: Mapping[str, Any]) -> None:
        with contextlib.suppress(PeerdError):
            self.control.publish_event(name, dict(payload))

    def count_rejection(self, reason: str, message: str | None = None, *args: object) -> None:
        self.sessions.rejections[reason] += 1
        if message is not None:
            self._logs.event_detail(
                logging.INFO, reason, "input.rejected", message, args, reason=reason
            )

    def has_session(self, peer: str) -> bool:
        return self.sessions.has_session(peer)

    def handshake_now(self, peer: str) -> None:
        """A handshake with `peer` now, whatever the trust store says (`peerd connect`)."""
        now = time.time()
        self._handle(self.sessions.connect(peer, now), now)

    def close_sessions(self, peer: str, reason: str) -> None:
        now = time.time()
        self._handle(self.sessions.close(peer, reason, now), now)

    def handshakes(self) -> list[dict[str, Any]]:
        return list(self._recent_handshakes)

    def _connect(self, peer: str, now: float) -> None:
        if peer == self.peer_id or self.sessions.is_connecting(peer):
            return
        # Trusted and pending peers, and (with an authority) anyone who may be a member.
        if not self.store.view().could_accept(peer):
            return
        self._handle(self.sessions.connect(peer, now), now)

    # -- session outputs ---------------------------------------------------------------------

    def _handle(self, outputs: list[Output], now: float) -> None:
        for out in outputs:
            kind = type(out)
            if kind is SendFrame:
                self._publish_frame(out)  # type: ignore[arg-type]
            elif kind is SessionMessage:
                self._on_app(out)  # type: ignore[arg-type]
            elif kind is Rejected:
                self._rejected(out)  # type: ignore[arg-type]
            elif kind is SessionUp:
                self._session_up(out, now)  # type: ignore[arg-type]
            elif kind is SessionDown:
                self._on_session_down(out)  # type: ignore[arg-type]
            elif kind is HandshakeFailed:
                self._on_handshake_failed(out)  # type: ignore[arg-type]
            elif kind is TicketIssued or kind is TicketSpent:
                self.tickets.note(out, self._events.urgent)  # type: ignore[arg-type]
        self._wake.set()

    def _session_up(self, up: SessionUp, now: float) -> None:
        self.handshake_counts["rekey" if up.rekey else "new"] += 1
        key = local_key(up)
        self._unrecorded.add(key)
        if not self._events.urgent(lambda: self._on_session_up(up)):
            # Never a live session the store does not know: refuse it at its source.
            self._unrecorded.discard(key)
            self._refuse_session(up, "events-full", "too much store work", now)

    def defer(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Bulk store work (messages, acknowledgements, transfer bookkeeping): what a drop
        loses, its sender sends again."""
        if self._events.bulk(work):
            return True
        self.counters["events-dropped"] += 1
        return False

    def _rejected(self, rej: Rejected) -> None:
        # Counted by the session manager; logged with a budget so a flood is not a log flood.
        self._logs.event(
            logging.INFO,
            rej.reason,
            "handshake.rejected",
            reason=rej.reason,
            peer=rej.peer_id,
            detail=rej.detail,
        )

    async def _on_session_up(self, up: SessionUp) -> None:
        try:
            await self._record_session_up(up)
        finally:
            self._unrecorded.discard(local_key(up))

    async def _record_session_up(self, up: SessionUp) -> None:
        now = time.time()
        auth = up.auth
        assert isinstance(auth, Authenticated)
        try:
            if up.invite_id is not None and not up.initiator:
                await self.store.consume_invite(up.invite_id, auth, now=now, protocol=up.protocol)
            else:
                await self.store.record_authenticated(auth, now=now, protocol=up.protocol)
        except PeerdError as exc:
            self._refuse_session(up, getattr(exc, "reason", "refused"), str(exc), now)
            return
        self._session_since[up.peer_id] = now
        record = {
            "peer": up.peer_id,
            "initiator": up.initiator,
            "started_at": up.started_at,
            "completed_at": up.completed_at,
            "session_id": list(up.session_id),
            "rekey": up.rekey,
            "protocol": up.protocol,
        }
        self._recent_handshakes.append(record)
        waiter = self._joins.pop(up.peer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(up)
        if not up.rekey:
            # A trusted peer may cycle sessions at its handshake rate: lines within the budget.
            self._logs.event(
                logging.INFO, "session-up", "session.up", peer=up.peer_id, protocol=up.protocol
            )
            self.notifier.status(self._status_line())
        self.publish_event("session.up", record)
        for ext in self._extensions:
            await ext.session_up(up.peer_id)

    def _refuse_session(self, up: SessionUp, reason: str, why: str, now: float) -> None:
        """A session up that the store will not record: close it (its peer's other sessions
        too) and fail a join waiting for it. Messages already queued from it are dropped at
        delivery (`_from_trusted_session`)."""
        self.sessions.rejections[reason] += 1
        self._logs.event(
            logging.WARNING, reason, "session.refused", peer=up.peer_id, reason=reason, detail=why
        )
        self._handle(self.sessions.close(up.peer_id, reason, now), now)
        waiter = self._joins.pop(up.peer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(JoinFailed(f"pairing with {up.peer_id} failed: {why}"))

    def _on_session_down(self, down: SessionDown) -> None:
        self._session_since.pop(down.peer_id, None)
        self._logs.event(
            logging.INFO, "session-down", "session.down", peer=down.peer_id, reason=down.reason
        )
        self.notifier.status(self._status_line())
        self.publish_event("session.down", {"peer": down.peer_id, "reason": down.reason})
        for ext in self._extensions:
            ext.session_down(down.peer_id, down.reason)

    def _on_handshake_failed(self, failed: HandshakeFailed) -> None:
        self.handshake_counts[f"failed:{failed.reason}"] += 1
        self._logs.event(
            logging.INFO,
            f"handshake-{failed.reason}",
            "handshake.failed",
            peer=failed.peer_id,
            reason=failed.reason,
        )
        self.publish_event("session.failed", {"peer": failed.peer_id, "reason": failed.reason})
        waiter = self._joins.pop(failed.peer_id, None)
        if waiter is not None and not waiter.done():
            why = JOIN_REFUSALS.get(failed.reason, f"no session with {failed.peer_id}")
            waiter.set_exception(JoinFailed(f"{why}: {failed.reason}"))

    def _on_app(self, msg: SessionMessage) -> None:
        try:
            app = decode_app(msg.payload)
        except RemoteProtocolError as exc:
            # Inside an authenticated session: a peer's bug or malice, not a broker's.
            self.sessions.rejections[f"app-{exc.reason}"] += 1
            return
        for ext in self._extensions:
            ext.on_app(msg.peer_id, app)

    def has_trusted_session(self, peer: str) -> bool:
        return self._from_trusted_session(peer, time.time())

    def _from_trusted_session(self, peer: str, now: float) -> bool:
        return any(refused is None for _, refused in self._session_trust(peer, now))

    def _session_trust(self, peer: str, now: float) -> Iterator[tuple[Session, TrustError | None]]:
        """Each session with `peer` the store recorded, and why trust no longer allows it
        (None: it does). Unrecorded ones are left to their recording."""
        view = self.store.view()
        for session in self.sessions.sessions_for(peer):
            if (peer, session.local_index) in self._unrecorded:
                continue
            auth = session.auth
            assert isinstance(auth, Authenticated)
            try:
                view.check_session(peer, auth.serial, now)
            except TrustError as exc:
                yield session, exc
                continue
            yield session, None

    # -- trust changes -----------------------------------------------------------------------

    def _trust_changed(self) -> None:
        """After every committed trust event: end sessions the new state no longer allows."""
        now = time.time()
        for peer in self.sessions.connected_peers():
            for session, exc in list(self._session_trust(peer, now)):
                if exc is None:
                    continue
                self._logs.event(
                    logging.WARNING,
                    f"closing-{exc.reason}",
                    "session.closed",
                    peer=peer,
                    reason=exc.reason,
                    detail=str(exc),
                )
                self.sessions.rejections[exc.reason] += 1
                self._handle(self.sessions.close_session(session, exc.reason, now), now)
                self._handle(self.sessions.forget_tickets(peer), now)  # no resuming either
                auth = session.auth
                assert isinstance(auth, Authenticated)
                self.publish_event(
                    "session.closed",
                    {"peer": peer, "reason": exc.reason, "serial": auth.serial},
                )
        for ext in self._extensions:
            ext.trust_changed()

    def publish_revocation(self, statement: bytes) -> None:
        try:
            self.link.publish_nowait(
                self.topics.revocation(self.peer_id, statement), statement, qos=1, retain=True
            )
        except BrokerQueueFull:
            self.counters["revocations-unpublished"] += 1
        self._revocations.keep(statement)  # republished and read back (peerd/revocations.py)

    # -- loops -------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            now = time.time()
            self._handle(self.sessions.on_timer(now), now)
            for ext in self._extensions:
                if (d := ext.next_deadline()) is not None and d <= now:
                    ext.on_timer(now)
            deadlines = [
                d
                for d in (
                    self.sessions.next_deadline(),
                    *(ext.next_deadline() for ext in self._extensions),
                )
                if d is not None
            ]
            delay = min(max(min(deadlines) - time.time(), 0.0), 60.0) if deadlines else 60.0
            self._wake.clear()
            await wait_set(self._wake, max(delay, 0.005))

    async def _event_loop(self) -> None:
        while True:
            work = await self._events.get()
            try:
                await work()
            except PeerdError as exc:
                self._logs.event(
                    logging.WARNING, "event-error", "event.error", error=exc.one_line()
                )
            except Exception:  # noqa: BLE001 - one failure must not end the event task
                self._logs.log(
                    logging.ERROR, "event-failed", "event handling failed", exc_info=True
                )
            finally:
                self._events.task_done()

    async def _housekeeping(self) -> None:
        while True:
            now = time.time()
            self._logs.flush()
            try:
                await self.store.expire_invites(now=now)
                for ext in self._extensions:
                    await ext.housekeeping(now)
                # Certificates and memberships expire on their own: end those sessions.
                self._trust_changed()
                if self.keys.needs_rotation(
                    now, rotate_before_days=self.config.keys.rotate_before_days
                ):
                    await self.rotate(reason="scheduled")
                self.keys.prune(now, overlap=self.config.keys.overlap_seconds)
            except PeerdError as exc:
                log_event(log, "housekeeping.failed", logging.ERROR, error=exc.one_line())
            await asyncio.sleep(HOUSEKEEPING_EVERY)

    # -- operations behind the control methods ------------------------------------------------

    async def rotate(self, *, reason: str = "command") -> dict[str, Any]:
        now = time.time()
        cert = self.keys.rotate(now, certificate_days=self.config.keys.certificate_days)
        await self.store.record_own_certificate(cert, now=now)
        # A fresh handshake with every connected peer carries the new certificate to it.
        self.identity_changed(rehandshake=True)
        log_event(log, "keys.rotated", serial=cert.serial, reason=reason)
        self.publish_event("keys.rotated", {"serial": cert.serial, "not_after": cert.not_after})
        return {"serial": cert.serial, "not_after": cert.not_after}

    async def revoke_own(self, reason: str) -> dict[str, Any]:
        """Revoke this node's current static key: rotate to a new one, then publish a statement
        revoking every older serial (to connected peers at once, and retained on the broker)."""
        old_serial = self.keys.serial
        await self.rotate(reason="revocation")
        now = time.time()
        statement = self.keys.revoke_static(now, through=old_serial, reason=reason)
        await self.store.record_own_revocation(statement, now=now)
        encoded = statement.encode()
        push = RevocationPush(encoded).encode()
        for peer in self.sessions.connected_peers():
            self.transmit(peer, push)
        self.publish_revocation(encoded)
        # Answer once the broker keeps it: the machine may go off right after (a stolen laptop).
        stored = await self._revocations.stored(encoded)
        return {"revoked_through": old_serial, "serial": self.keys.serial, "stored": stored}

    async def join(self, token_text: str, within: float) -> dict[str, Any]:
        now = time.time()
        if len(token_text) > MAX_TOKEN_TEXT:
            # Parsing runs on the event loop and its cost grows with the square of the length
            # (a megabyte would stall every session for a minute): refuse what no token is.
            raise UsageError(
                f"an invite token is a few hundred characters, not {len(token_text)}",
                hint="copy only the line `peerd invite` printed",
            )
        token = InviteToken.from_text(token_text)
        if token.inviter in self._joins:
            raise UsageError(f"already joining {token.inviter}")
        await self.store.accept_invite_token(token, now=now)
        waiter: asyncio.Future[SessionUp] = asyncio.get_running_loop().create_future()
        self._joins[token.inviter] = waiter
        try:
            self._handle(self.sessions.join(token.inviter, token.invite_id, token.psk, now), now)
            try:
                up = await asyncio.wait_for(asyncio.shield(waiter), within)
            except TimeoutError:
                raise JoinFailed(
                    f"no answer from the inviter {token.inviter} within {within:.0f} s"
                ) from None
        finally:
            self._joins.pop(token.inviter, None)
        auth = up.auth
        assert isinstance(auth, Authenticated)
        if auth.identity_public != token.inviter_identity and (
            token.inviter_identity not in auth.identities
        ):
            raise JoinFailed("the inviter answered with another identity key than the token's")
        return {"peer": token.inviter, "fingerprint": auth.fingerprint}

    # -- control methods ---------------------------------------------------------------------

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        view = self.store.view()
        states = Counter(p.state.value for p in view.peers())
        rejections = dict(self.sessions.rejections)
        rejections.update({k: v for k, v in self.counters.items() if v})
        rejections.update(local_refusals(self.control.stats(), self.link.stats.as_dict()))
        for ext in self._extensions:
            rejections.update(ext.rejections())
        return {
            "version": __version__,
            "peer_id": self.peer_id,
            "name": self.config.node.name,
            "network": self.config.node.network,
            "fingerprint": self.keys.fingerprint,
            "serial": self.keys.serial,
            "certificate_not_before": self.keys.certificate.not_before,
            "certificate_not_after": self.keys.certificate.not_after,
            "uptime": time.time() - self.started_at,
            "broker": broker_json(self.link, self.config.broker.client),
            "sessions": len(self.sessions.connected_peers()),
            # Each peer's current session, by the Noise protocol of its handshake (issue 14).
            "session_protocols": dict(
                Counter(
                    s.protocol
                    for p in self.sessions.connected_peers()
                    if (s := self.sessions.session(p)) is not None
                )
            ),
            "half_open_handshakes": self.sessions.half_open_count,
            "handshakes": dict(self.handshake_counts),
            "peers": dict(states),
            "rejections": rejections,
            "control": self.control.stats(),
            "events_queued": len(self._events),
            "event_lanes": self._events.depths(),
            "log_lines_suppressed": self._logs.suppressed,
            **{name: value for ext in self._extensions for name, value in ext.status().items()},
        }

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for record in sorted(self.store.view().peers(), key=lambda p: p.peer_id):
            item = peer_json(record, connected=self.sessions.has_session(record.peer_id))
            item["session_since"] = self._session_since.get(record.peer_id)
            session = self.sessions.session(record.peer_id)
            item["session_protocol"] = None if session is None else session.protocol
            item["silent_since"] = None if session is None else session.silent_since  # stale
            out.append(item)
        return out
