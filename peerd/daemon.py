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
import ctypes
import ctypes.util
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from peerd import __version__
from peerd.authority.extension import Authority
from peerd.config import Config, load_config
from peerd.control import Connection, ControlServer, optional, require
from peerd.errors import PeerdError, UsageError
from peerd.events import EventLanes, LaneLimits, LogBudget
from peerd.keystore import Keystore, read_passphrase
from peerd.messages import Messenger, OutboxLimits
from peerd.mqtt import (
    BrokerError,
    BrokerQueueFull,
    BrokerSettings,
    Message,
    MqttLink,
    Topics,
    statement_id,
)
from peerd.store import Store, open_store
from peerd.systemd import Notifier, watchdog_interval, watchdog_loop
from peerd.transfers import Transfers
from protocol.errors import RemoteProtocolError
from protocol.identity import (
    InviteToken,
    Revocation,
    TrustError,
    decode_statement,
    format_peer_id,
    parse_fingerprint,
    parse_peer_id,
)
from protocol.identity.trust import Authenticated, TrustView
from protocol.messaging import (
    ChannelAck,
    ChannelMessage,
    RevocationPush,
    TransferPayload,
    decode_app,
)
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
    "trust.revoked",
    "keys.rotated",
    "message",
    "transfer.progress",
    "transfer.done",
)
EVENT_QUEUE = 10_000  # bulk store work waiting for the event task; beyond it: drop and count
JOIN_TIMEOUT = 30.0
MAX_TOKEN_TEXT = 4096  # an invite token is ~230 characters, more with line breaks
HOUSEKEEPING_EVERY = 60.0


class DaemonError(PeerdError):
    """The daemon cannot start or go on."""


class JoinFailed(PeerdError):
    hint = "check that the inviter's daemon is running and the token is fresh"


class _Shutdown(Exception):
    """Raised inside the root TaskGroup to end it."""


def tune_allocator() -> None:
    """Large, short-lived buffers (256 KiB chunks) must not be mmap'd and unmapped each time:
    with glibc's defaults every fresh one page-faults (~133 us per chunk, ~0.5 s per GiB per
    copy). Keep them in the heap. A no-op where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 4 << 20)
    mallopt(m_trim_threshold, 256 << 20)


class _Trust:
    """The session layer's trust policy over the store's live view."""

    def __init__(self, view: TrustView) -> None:
        self.view = view

    def authenticate(
        self,
        credentials: bytes,
        remote_static: bytes,
        now: float,
        *,
        expected_peer: str | None = None,
        allow_unknown: bool = False,
    ) -> Authenticated:
        return self.view.authenticate(
            credentials,
            remote_static,
            now,
            expected_peer=expected_peer,
            allow_unknown=allow_unknown,
        )

    def refuse_hello(self, peer_id: str) -> str | None:
        if self.view.could_accept(peer_id):
            return None
        record = self.view.peer(peer_id)
        return "unknown-peer" if record is None else record.state.value

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        try:
            return self.view.invite_psk(invite_id, now)
        except TrustError:
            return None


class Daemon:
    def __init__(self, config: Config, *, passphrase: bytes | None = None) -> None:
        self.config = config
        self.passphrase = passphrase
        self.started_at = time.time()
        self.counters: Counter[str] = Counter()
        self._events = EventLanes(LaneLimits(bulk=EVENT_QUEUE))
        self._logs = LogBudget(log)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
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
        self.link: MqttLink
        self.control: ControlServer
        self.messenger: Messenger
        self.topics = Topics(config.node.network)
        self._extensions: list[Any] = []
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
            network_psk = _read_psk(cfg.network.psk_file)
        self.sessions = SessionManager(
            peer_id=self.keys.peer_id,
            network=cfg.node.network,
            static=self.keys.static,
            credentials=self.keys.credentials(),
            trust=_Trust(self.store.view()),
            network_psk=network_psk,
            limits=SessionLimits(
                hello_rate=cfg.limits.handshakes_per_second,
                hello_burst=2 * cfg.limits.handshakes_per_second,
                hello_rate_per_peer=cfg.limits.handshakes_per_second_per_peer,
                hello_burst_per_peer=2 * cfg.limits.handshakes_per_second_per_peer,
                max_half_open=cfg.limits.half_open_handshakes,
            ),
        )
        b = cfg.broker
        password = None
        if b.password_file is not None:
            try:
                password = b.password_file.read_text().strip()
            except OSError as exc:
                raise DaemonError(f"cannot read the broker password file: {exc}") from exc
        settings = BrokerSettings.from_url(
            b.url,
            client_id=self.keys.peer_id,
            ca_file=b.ca_file,
            cert_file=b.cert_file,
            key_file=b.key_file,
            username=b.username,
            password=password,
            keepalive=b.keepalive,
        )
        self.link = MqttLink(settings, on_state=self._on_link_state)
        self.messenger = Messenger(
            self.store,
            self._transmit,
            OutboxLimits(
                max_messages_per_peer=cfg.limits.outbox_messages_per_peer,
                max_bytes=cfg.limits.outbox_size,
                max_inbox_bytes=cfg.limits.inbox_size,
            ),
        )
        self.control = ControlServer(cfg.node.socket, group=cfg.control.group, events=EVENTS)
        self._register_methods()
        Transfers(self)  # registers itself as an extension: methods, hooks, a task
        Authority(self)  # membership, relayed revocations, succession, retirement
        self.store.add_listener(lambda _event: self._trust_changed())

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `stop()`; returns after a clean shutdown."""
        await self._open()
        loop = asyncio.get_running_loop()
        notifier = self.notifier = Notifier.from_environ()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload()))
        try:
            await self.control.start()
            log.info(
                "peerd %s: node %s (%s) in network %r, broker %s",
                __version__,
                format_peer_id(self.peer_id),
                self.config.node.name,
                self.config.node.network,
                self.link.settings.url,
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
            await self.control.close()
            await self.store.close()
            if self._stop.is_set():
                log.info("peerd stopped")

    def stop(self) -> None:
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

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background work failed: %s", exc, exc_info=exc)

    async def _reload(self) -> None:
        """SIGHUP: re-read the config; apply what can change live, say what needs a restart."""
        path = self.config.path
        if path is None:
            return
        try:
            new = load_config(path)
        except PeerdError as exc:
            log.error("reload: %s; keeping the running configuration", exc.one_line())
            return
        # Live: [receive] limits, [keys] overlap and rotation schedule, the authority key.
        # The rest names sockets, files and the broker connection: those need a restart.
        restart = [
            name
            for name in ("node", "broker", "control")
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
            if hasattr(ext, "reload"):
                ext.reload(new)
        if restart:
            log.warning("reload: changes in [%s] take effect at restart", "], [".join(restart))
        log.info("configuration reloaded from %s", path)

    # -- the broker --------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        await self.link.subscribe(self.topics.inbox(self.peer_id), qos=0, handler=self._on_inbox)
        await self.link.subscribe(
            self.topics.revocations, qos=1, handler=self._on_revocation_message
        )

    def _status_line(self) -> str:
        """The one line `systemctl status` shows."""
        broker = "broker connected" if self.link.connected else "waiting for the broker"
        sessions = len(self.sessions.connected_peers())
        return f"node {self.peer_id}: {broker}, {sessions} session(s)"

    def _on_link_state(self, up: bool) -> None:
        self.notifier.status(self._status_line())
        log.info("broker %s: %s", self.link.settings.url, "connected" if up else "disconnected")
        self._publish_event("broker." + ("up" if up else "down"), {"url": self.link.settings.url})
        if up:
            # Whatever waited for the broker: peers with queued work, republished revocations.
            self._spawn(self._after_reconnect())

    async def _after_reconnect(self) -> None:
        now = time.time()
        for peer in await self._peers_with_work():
            self._connect(peer, now)
        for statement in await self.store.revocation_statements(self.peer_id):
            self._publish_revocation(statement)

    async def _peers_with_work(self) -> set[str]:
        rows = await self.store.fetchall("SELECT DISTINCT peer_id FROM outbox")
        peers = {r[0] for r in rows}
        for ext in self._extensions:
            if hasattr(ext, "peers_with_work"):
                peers |= ext.peers_with_work()
        return peers

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

    def _transmit(self, peer: str, payload: bytes) -> bool:
        """Send an application payload on `peer`'s session; False (and connect) if none."""
        now = time.time()
        if not self.sessions.has_session(peer):
            self._connect(peer, now)
            return False
        try:
            outs = self.sessions.send(peer, payload, now)
        except PeerdError:
            self._connect(peer, now)
            return False
        self._handle(outs, now)
        return True

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
        self._wake.set()

    def _session_up(self, up: SessionUp, now: float) -> None:
        key = _local_key(up)
        self._unrecorded.add(key)
        if not self._events.urgent(lambda: self._on_session_up(up)):
            # Never a live session the store does not know: refuse it at its source.
            self._unrecorded.discard(key)
            self._refuse_session(up, "events-full", "too much store work", now)

    def _queue(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Bulk store work (messages, acknowledgements, transfer bookkeeping): what a drop
        loses, its sender sends again."""
        if self._events.bulk(work):
            return True
        self.counters["events-dropped"] += 1
        return False

    def _refused(self, reason: str, msg: str, *args: object) -> None:
        """Count a refusal under `reason` (`peerd status`) and log it within the budget."""
        self.sessions.rejections[reason] += 1
        self._logs.log(logging.INFO, reason, msg, *args)

    def _rejected(self, rej: Rejected) -> None:
        # Counted by the session manager; logged with a budget so a flood is not a log flood.
        self._logs.log(
            logging.INFO,
            rej.reason,
            "rejected (%s)%s: %s",
            rej.reason,
            f" from {rej.peer_id}" if rej.peer_id else "",
            rej.detail,
        )

    async def _on_session_up(self, up: SessionUp) -> None:
        try:
            await self._record_session_up(up)
        finally:
            self._unrecorded.discard(_local_key(up))

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
            self._logs.log(
                logging.INFO, "session-up", "session with %s up (%s)", up.peer_id, up.protocol
            )
            self.notifier.status(self._status_line())
        self._publish_event("session.up", record)
        await self.messenger.pump(up.peer_id, now=now, reset=True)
        for ext in self._extensions:
            if hasattr(ext, "session_up"):
                await ext.session_up(up.peer_id)

    def _refuse_session(self, up: SessionUp, reason: str, detail: str, now: float) -> None:
        """A session up that the store will not record: close it (its peer's other sessions
        too) and fail a join waiting for it. Messages already queued from it are dropped at
        delivery (`_from_trusted_session`)."""
        self.sessions.rejections[reason] += 1
        self._logs.log(
            logging.WARNING, reason, "session with %s refused on recording: %s", up.peer_id, detail
        )
        self._handle(self.sessions.close(up.peer_id, reason, now), now)
        waiter = self._joins.pop(up.peer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(JoinFailed(f"pairing with {up.peer_id} failed: {detail}"))

    def _on_session_down(self, down: SessionDown) -> None:
        self._session_since.pop(down.peer_id, None)
        self._logs.log(
            logging.INFO, "session-down", "session with %s down: %s", down.peer_id, down.reason
        )
        self.notifier.status(self._status_line())
        self._publish_event("session.down", {"peer": down.peer_id, "reason": down.reason})
        for ext in self._extensions:
            if hasattr(ext, "session_down"):
                ext.session_down(down.peer_id, down.reason)

    def _on_handshake_failed(self, failed: HandshakeFailed) -> None:
        self._logs.log(
            logging.INFO,
            f"handshake-{failed.reason}",
            "handshake with %s failed: %s",
            failed.peer_id,
            failed.reason,
        )
        self._publish_event("session.failed", {"peer": failed.peer_id, "reason": failed.reason})
        waiter = self._joins.pop(failed.peer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(JoinFailed(f"no session with {failed.peer_id}: {failed.reason}"))

    def _on_app(self, msg: SessionMessage) -> None:
        try:
            app = decode_app(msg.payload)
        except RemoteProtocolError as exc:
            # Inside an authenticated session: a peer's bug or malice, not a broker's.
            self.sessions.rejections[f"app-{exc.reason}"] += 1
            return
        peer = msg.peer_id
        if isinstance(app, ChannelMessage):
            self._queue(lambda: self._deliver(peer, self.messenger.on_message, app))
        elif isinstance(app, ChannelAck):
            self._queue(lambda: self._deliver(peer, self.messenger.on_ack, app))
        elif isinstance(app, RevocationPush):
            # Pushed by an authenticated peer: its lane is its own. A statement verifies itself,
            # whatever the trust in the peer that carried it.
            self._admit_statement(peer, app.statement, source=peer)
        elif isinstance(app, TransferPayload):
            for ext in self._extensions:
                if hasattr(ext, "on_control"):
                    ext.on_control(peer, app.raw)

    async def _deliver(
        self, peer: str, handler: Callable[..., Awaitable[None]], app: ChannelMessage | ChannelAck
    ) -> None:
        """Hand a message (or ACK) to the messenger only if a session with `peer` that the store
        recorded and still trusts exists now: one refused at recording (say, a second joiner
        with an invite already used) is closed by then, and what it sent must not reach the
        inbox. Not acknowledged, a dropped message stays in its sender's outbox."""
        now = time.time()
        if not self._from_trusted_session(peer, now):
            self._refused(
                "message-untrusted-session", "a message from %s without a trusted session", peer
            )
            return
        await handler(peer, app, now=now)

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
                self._logs.log(
                    logging.WARNING,
                    f"closing-{exc.reason}",
                    "closing a session with %s: %s",
                    peer,
                    exc,
                )
                self.sessions.rejections[exc.reason] += 1
                self._handle(self.sessions.close_session(session, exc.reason, now), now)
                auth = session.auth
                assert isinstance(auth, Authenticated)
                self._publish_event(
                    "session.closed",
                    {"peer": peer, "reason": exc.reason, "serial": auth.serial},
                )
        for ext in self._extensions:
            if hasattr(ext, "trust_changed"):
                ext.trust_changed()

    def _on_revocation_message(self, msg: Message) -> None:
        """A statement from `rev/<publisher>/<statement id>`: the cheap checks here, in the
        link's read path, before anything is queued; the signature in the event task, within
        the publisher's lane and rate (peerd/events.py)."""
        statement = msg.payload
        if not statement:
            # Someone cleared a retained statement: it un-revokes nothing (the store keeps
            # what it learned), but an operator should see the attempt.
            self._refused("revocation-cleared", "a retained revocation cleared on %s", msg.topic)
            return
        where = self.topics.parse(msg.topic)
        if where is None or where[0] != "rev":
            self._refused("revocation-bad-topic", "a revocation on topic %r", msg.topic[:200])
            return
        publisher, sid = where[1]
        if sid != statement_id(statement):
            self._refused(
                "revocation-topic-mismatch", "a revocation under %s that is not %s", publisher, sid
            )
            return
        try:
            parsed = decode_statement(statement)
        except RemoteProtocolError as exc:
            self._refused("revocation-malformed", "a revocation from %s: %s", publisher, exc)
            return
        # The ACL lets only the publisher write under rev/<publisher>/: its own statements,
        # an authority's it relays, or (relayed) another node's - taken only for a peer this
        # node knows, so that one account cannot retain statements of made-up identities.
        if (
            isinstance(parsed, Revocation)
            and parsed.peer_id != publisher
            and self.store.view().peer(parsed.peer_id) is None
        ):
            self._refused(
                "revocation-wrong-issuer",
                "%s published a revocation of %s, a peer this node does not know",
                publisher,
                parsed.peer_id,
            )
            return
        self._admit_statement(publisher, statement, source="broker", sid=sid)

    def _admit_statement(
        self, publisher: str, statement: bytes, *, source: str, sid: str | None = None
    ) -> None:
        sid = sid or statement_id(statement)
        refused = self._events.statement(
            publisher, sid, lambda: self._learn_revocation(statement, source=source, sid=sid)
        )
        if (
            refused is not None and refused != "duplicate"
        ):  # a replay is no error (the store's rule)
            self._refused(
                f"revocation-{refused}", "a revocation from %s not queued: %s", publisher, refused
            )

    async def _learn_revocation(self, statement: bytes, *, source: str, sid: str) -> None:
        try:
            changed = await self.store.record_revocation(statement, now=time.time())
        except PeerdError as exc:
            reason = f"revocation-{getattr(exc, 'reason', 'malformed')}"
            self._refused(reason, "revocation statement from %s refused: %s", source, exc)
            return
        self._events.applied(sid)
        if changed:
            log.warning("learned a revocation (via %s)", source)
            self._publish_event("trust.revoked", {"via": source})

    def _publish_revocation(self, statement: bytes) -> None:
        try:
            self.link.publish_nowait(
                self.topics.revocation(self.peer_id, statement), statement, qos=1, retain=True
            )
        except BrokerQueueFull:
            self.counters["revocations-unpublished"] += 1

    # -- loops -------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            now = time.time()
            self._handle(self.sessions.on_timer(now), now)
            if (d := self.messenger.next_deadline()) is not None and d <= now:
                self._queue(
                    lambda: self.messenger.on_timer(
                        self.sessions.connected_peers(), now=time.time()
                    )
                )
            deadlines = [
                d
                for d in (self.sessions.next_deadline(), self.messenger.next_deadline())
                if d is not None
            ]
            delay = min(max(min(deadlines) - time.time(), 0.0), 60.0) if deadlines else 60.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.005))

    async def _event_loop(self) -> None:
        while True:
            work = await self._events.get()
            try:
                await work()
            except PeerdError as exc:
                self._logs.log(logging.WARNING, "event-error", "%s", exc.one_line())
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
                await self.messenger.expire(now=now)
                # Certificates and memberships expire on their own: end those sessions.
                self._trust_changed()
                if self.keys.needs_rotation(
                    now, rotate_before_days=self.config.keys.rotate_before_days
                ):
                    await self.rotate(reason="scheduled")
                self.keys.prune(now, overlap=self.config.keys.overlap_seconds)
            except PeerdError as exc:
                log.error("housekeeping: %s", exc.one_line())
            await asyncio.sleep(HOUSEKEEPING_EVERY)

    # -- operations behind the control methods ------------------------------------------------

    async def rotate(self, *, reason: str = "command") -> dict[str, Any]:
        now = time.time()
        cert = self.keys.rotate(now, certificate_days=self.config.keys.certificate_days)
        await self.store.record_own_certificate(cert, now=now)
        self.sessions.set_identity(self.keys.static, self.keys.credentials())
        # A fresh handshake with every connected peer carries the new certificate to it.
        for peer in self.sessions.connected_peers():
            self._handle(self.sessions.connect(peer, now), now)
        log.info("static key rotated to serial %d (%s)", cert.serial, reason)
        self._publish_event("keys.rotated", {"serial": cert.serial, "not_after": cert.not_after})
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
            self._transmit(peer, push)
        self._publish_revocation(encoded)
        return {"revoked_through": old_serial, "serial": self.keys.serial}

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

    def _publish_event(self, name: str, payload: dict[str, Any]) -> None:
        with contextlib.suppress(PeerdError):
            self.control.publish_event(name, payload)

    def method(self, name: str) -> Callable[[Any], Any]:
        return self.control.method(name)

    def _register_methods(self) -> None:
        m = self.control.method

        @m("v1.status")
        async def _status(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            return self.status()

        @m("v1.peers")
        async def _peers(params: dict[str, Any], conn: Connection) -> list[dict[str, Any]]:
            return self.peers()

        @m("v1.invite.create")
        async def _invite(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            ttl = optional(params, "ttl", int, 3600)
            note = optional(params, "note", str, "")
            token = await self.store.create_invite(
                network=self.config.node.network, ttl=ttl, now=time.time(), note=note
            )
            return {
                "token": token.to_text(),
                "expires_at": token.expires_at,
                "invite_id": token.invite_id.hex(),
            }

        @m("v1.join")
        async def _join(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            token = require(params, "token", str)
            timeout = optional(params, "timeout", float, JOIN_TIMEOUT)
            return await self.join(token, timeout)

        @m("v1.trust")
        async def _trust(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            peer = parse_peer_id(require(params, "peer", str))
            fp = optional(params, "fingerprint", str, None)
            if fp is not None:
                fp = parse_fingerprint(fp)
            record = await self.store.trust(peer, fingerprint=fp, now=time.time())
            self._connect(peer, time.time())
            return _peer_json(record, connected=self.sessions.has_session(peer))

        @m("v1.block")
        async def _block(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            peer = parse_peer_id(require(params, "peer", str))
            record = await self.store.block(peer, now=time.time())
            now = time.time()
            self._handle(self.sessions.close(peer, "blocked", now), now)
            return _peer_json(record, connected=False)

        @m("v1.rotate")
        async def _rotate(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            return await self.rotate()

        @m("v1.revoke")
        async def _revoke(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            reason = optional(params, "reason", str, "")
            return await self.revoke_own(reason)

        @m("v1.connect")
        async def _connect(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            peer = parse_peer_id(require(params, "peer", str))
            now = time.time()
            self._handle(self.sessions.connect(peer, now), now)
            return {"peer": peer, "connecting": True}

        @m("v1.handshakes")
        async def _handshakes(params: dict[str, Any], conn: Connection) -> list[dict[str, Any]]:
            return list(self._recent_handshakes)

        @m("v1.msg.send")
        async def _msg_send(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            import base64  # noqa: PLC0415

            peer = parse_peer_id(require(params, "peer", str))
            channel = require(params, "channel", str)
            data = base64.b64decode(require(params, "data_b64", str), validate=True)
            ttl = optional(params, "ttl", float, self.config.limits.message_ttl_days * 86400)
            if not self.store.view().could_accept(peer):
                raise TrustError(
                    f"peer {peer} is not trusted",
                    reason="unknown-peer",
                    hint="pair with it first (peerd invite / peerd join)",
                )
            seq = await self.messenger.send(peer, channel, data, ttl=ttl, now=time.time())
            return {"peer": peer, "channel": channel, "seq": seq}

        @m("v1.msg.recv")
        async def _msg_recv(params: dict[str, Any], conn: Connection) -> list[dict[str, Any]]:
            channel = require(params, "channel", str)
            limit = optional(params, "limit", int, 100)
            wait = optional(params, "wait", float, 0.0)
            msgs = await self.messenger.receive(channel, limit=limit, wait=min(wait, 3600.0))
            return [m.as_json() for m in msgs]

        @m("v1.msg.ack")
        async def _msg_ack(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            ids = require(params, "ids", list)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise UsageError("ids must be a list of integers")
            return {"acked": await self.messenger.ack(ids, now=time.time())}

        @m("v1.msg.outbox")
        async def _msg_outbox(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            return {
                "outbox": await self.messenger.outbox(),
                "inbox": await self.messenger.inbox(),
            }

        @m("v1.debug.tasks")
        async def _tasks(params: dict[str, Any], conn: Connection) -> list[dict[str, Any]]:
            """Every asyncio task and where it waits: for diagnosing a stuck daemon."""
            out = []
            for task in asyncio.all_tasks():
                frames = task.get_stack(limit=8)
                out.append(
                    {
                        "name": task.get_name(),
                        "stack": [
                            f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} "
                            f"{f.f_code.co_name}"
                            for f in frames
                        ],
                    }
                )
            return out

        @m("v1.audit.verify")
        async def _audit(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            report = await self.store.verify_log()
            return {"entries": report.entries, "head": report.head.hex()}

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        view = self.store.view()
        states = Counter(p.state.value for p in view.peers())
        rejections = dict(self.sessions.rejections)
        rejections.update({k: v for k, v in self.counters.items() if v})
        rejections.update(
            local_refusals(self.control.stats(), self.link.stats.as_dict(), self.messenger)
        )
        return {
            "version": __version__,
            "peer_id": self.peer_id,
            "name": self.config.node.name,
            "network": self.config.node.network,
            "fingerprint": self.keys.fingerprint,
            "serial": self.keys.serial,
            "certificate_not_after": self.keys.certificate.not_after,
            "uptime": time.time() - self.started_at,
            "broker": {
                "url": self.link.settings.url,
                "connected": self.link.connected,
                "queued": self.link.queued,
                "last_error": None if self.link.last_error is None else str(self.link.last_error),
                "stats": self.link.stats.as_dict(),
            },
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
            "peers": dict(states),
            "rejections": rejections,
            "messages": dict(self.messenger.counters),
            "control": self.control.stats(),
            "events_queued": len(self._events),
            "log_lines_suppressed": self._logs.suppressed,
            **{
                name: value
                for ext in self._extensions
                if hasattr(ext, "status")
                for name, value in ext.status().items()
            },
        }

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for record in sorted(self.store.view().peers(), key=lambda p: p.peer_id):
            item = _peer_json(record, connected=self.sessions.has_session(record.peer_id))
            item["session_since"] = self._session_since.get(record.peer_id)
            session = self.sessions.session(record.peer_id)
            item["session_protocol"] = None if session is None else session.protocol
            out.append(item)
        return out


# Refusals counted outside the session layer, under the labels `peerd status` shows.
_LINK_DROPS = {
    "dropped_queue_full": "broker-queue-full",
    "dropped_oversize": "broker-oversize",
    "dropped_unsolicited": "broker-unsolicited",
    "dropped_bad_topic": "broker-bad-topic",
    "protocol_errors": "broker-protocol-error",
    "handler_errors": "broker-handler-error",
}
_CONTROL_ERRORS = {"-32700": "control-parse-error", "-32600": "control-invalid-request"}


def local_refusals(
    control: dict[str, Any], link: dict[str, int], messenger: Messenger
) -> dict[str, int]:
    """The control socket's refused callers and bad lines, the broker link's dropped packets
    and the messenger's refused messages, as `rejections` entries (zeros left out)."""
    out = {f"control-{k}": v for k, v in control["refused"].items()}
    out["control-closed-for-garbage"] = control["closed_for_garbage"]
    out["control-subscriber-dropped"] = control["subscribers_dropped"]
    out.update({label: control["errors"].get(code, 0) for code, label in _CONTROL_ERRORS.items()})
    out.update({label: link.get(name, 0) for name, label in _LINK_DROPS.items()})
    out.update({f"message-{k}": v for k, v in messenger.rejections.items()})
    return {k: v for k, v in out.items() if v}


def _peer_json(record: Any, *, connected: bool) -> dict[str, Any]:
    cert = record.certificate
    return {
        "peer": record.peer_id,
        "state": record.state.value,
        "source": None if record.source is None else record.source.value,
        "fingerprint": record.fingerprint,
        "serial": None if cert is None else cert.serial,
        "connected": connected,
        "updated_at": record.updated_at,
    }


def _read_psk(path: os.PathLike[str] | str) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DaemonError(f"cannot read the network PSK file {path}: {exc}") from exc
    text = raw.strip()
    try:
        psk = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else raw
    except (UnicodeDecodeError, ValueError):
        psk = raw
    if len(psk) != 32:
        raise DaemonError(
            f"the network PSK file {path} must hold 32 bytes (or 64 hex digits)",
            hint="create one with: head -c 32 /dev/urandom > network.psk",
        )
    return psk


def _local_key(up: SessionUp) -> tuple[str, int]:
    """(peer, this node's index) of the session `up` announces."""
    return up.peer_id, up.session_id[0] if up.initiator else up.session_id[1]
