"""Revocation statements coming in: retained on the broker under `rev/<publisher>/<id>`, or
pushed by a peer inside its session. And those this node publishes (its own, and those it
relays) kept on the broker: one retained publish is not trusted (issue 12: a NATS cluster
electing a new leader for its retained-message stream acknowledged a statement and never stored
it, and a node offline at the time never learned it). Every statement is published again every
`[broker] republish_interval` and after every reconnect (same topic, same bytes: idempotent),
and then read back through fresh subscriptions to its exact topic (a retained delivery, which
RabbitMQ makes to exact topics too); one not read back is logged, counted and published again,
a few times a round.

The link's read path only files each statement under its publisher (the `rev/<publisher>/`
level, which the shipped ACL confines to that account): a small FIFO per publisher, bounded,
taken round-robin by a task of its own. Decoding a statement cost ~25 us in the read path, so a
flood of junk from one broker account filled the node's one connection to the broker, and its
handshake frames waited behind the junk, or the broker dropped them (docs/SECURITY.md 3.5.1).
Filed, a statement costs the read path a topic split and an append; beyond its publisher's
bound it is dropped and counted (`revocation-backlog-full`), and only that publisher's. The
task runs the cheap checks a few milliseconds at a time, yielding to the read path between
slices: the topic's shape, the statement id against the payload's hash, decoding, and that an
owner's statement is the publisher's own, an authority's, or a known peer's it relays
(protocol/SPEC.md 2). The signature is checked in the event task, within the publisher's lane
and rate (`peerd.events.EventLanes.statement`), when the store records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from peerd.errors import PeerdError
from peerd.host import Extension
from peerd.logs import log_event
from peerd.mqtt import BrokerError, LinkClosed, statement_id, subscribe_steadily
from peerd.mqtt.topics import INDEX_LEVEL
from peerd.waiting import wait_set
from protocol.errors import RemoteProtocolError
from protocol.identity import Revocation, decode_statement
from protocol.messaging import RevocationPush

if TYPE_CHECKING:
    from peerd.events import EventLanes
    from peerd.host import Host, Subscribed
    from peerd.mqtt import Message
    from protocol.messaging import AppMessage

log = logging.getLogger("peerd")

MAX_KEPT = 1024  # statements this node keeps retained (its own and relayed ones); beyond: counted
READBACK_BATCH = 64  # statements read back at once (one subscription each)
READBACK_WAIT = 5.0  # for a round's publishes to be acknowledged, and for their read-back
READBACK_TRIES = 3  # publishes of a statement not read back, per round
READBACK_PAUSE = 2.0  # between them (a cluster electing a leader takes about that)
# How long `peerd revoke` waits for the broker to show it keeps the statement: up to 3 tries
# of publish, read back and pause, about 12 s each.
STORED_WAIT = 40.0
# Statements from the broker waiting for their cheap checks: per publisher, and publishers at
# once (each holds a statement or more); beyond either, dropped and counted.
BACKLOG_PER_PUBLISHER = 256
BACKLOG_PUBLISHERS = 4096
BACKLOG_BYTES = 8 << 20  # in all (a statement is a few hundred bytes)
CHECK_SLICE = 0.005  # s of checks before the read path gets the loop back


class Revocations(Extension):
    events = ("trust.revoked",)

    def __init__(self, host: Host, lanes: EventLanes) -> None:
        self.host = host
        self.lanes = lanes
        self.applied = 0  # statements that changed the trust store (metrics)
        self._kept: dict[str, bytes] = {}  # statement id -> statement, kept retained
        self._wake = asyncio.Event()  # a round now: a new statement, or a reconnect
        self._own_loaded = False
        self._sub: Subscribed | None = None
        self.counts = {"republished": 0, "readback_rounds": 0, "readback_missing": 0}
        self.not_kept = 0
        # Per kept statement: set once a fresh subscription read it back from the broker.
        self._stored: dict[str, asyncio.Event] = {}
        # Statements from the broker waiting for the cheap checks, per publisher ("" for a
        # topic of no publisher, refused when its turn comes).
        self._backlog: OrderedDict[str, deque[Message]] = OrderedDict()
        self._backlog_ready = asyncio.Event()
        self._backlog_bytes = 0
        self._backlog_count = 0
        self.backlog_peak = 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._check_backlog(), name="revocation checks")
            await self._keep_published()

    async def _keep_published(self) -> None:
        await self._subscribe()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.host.config.broker.republish_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._sub is None or self._sub.closed:
                await self._subscribe()  # refused when restored after a reconnect
            if self._kept and self.host.link.connected:
                await self._round()

    async def _subscribe(self) -> None:
        """Subscribe to every publisher's statements; a broker may refuse for a while (a NATS
        cluster electing a leader does): tried again, backing off, instead of failing."""
        try:
            self._sub = await subscribe_steadily(
                self.host.link, self.host.topics.revocations, qos=1, handler=self.on_broker_message
            )
        except LinkClosed:
            return  # the daemon is stopping

    async def broker_up(self) -> None:
        """Retained statements can be lost with a broker's state: this node's own go again
        (relayed ones come back through `keep` from the authority extension)."""
        if not self._own_loaded:
            self._own_loaded = True
            for statement in await self.host.store.revocation_statements(self.host.peer_id):
                self._add(statement_id(statement), statement)
        self._wake.set()

    def keep(self, statement: bytes) -> None:
        """Keep `statement` (just published by the host) retained on the broker: republished
        and read back now, every period and after every reconnect while the daemon runs."""
        sid = statement_id(statement)
        if sid not in self._kept and len(self._kept) >= MAX_KEPT:
            self.not_kept += 1  # published once by the host; a restart reloads own ones
            return
        self._add(sid, statement)
        self._wake.set()  # read it back soon

    def _add(self, sid: str, statement: bytes) -> None:
        if sid not in self._kept:
            self._kept[sid] = statement
            self._stored[sid] = asyncio.Event()

    async def stored(self, statement: bytes, timeout: float = STORED_WAIT) -> bool:  # noqa: ASYNC109 - a bound, not a failure
        """Whether the broker keeps `statement` (kept with `keep`): True once a fresh
        subscription read it back, False if that did not happen within `timeout` s or the node
        is not connected (it is published again every period and after each reconnect)."""
        event = self._stored.get(statement_id(statement))
        if event is None:
            return False
        if event.is_set():
            return True
        return self.host.link.connected and await wait_set(event, timeout)

    def _mark_stored(self, sids: Iterable[str]) -> None:
        for sid in sids:
            self._stored[sid].set()

    async def _round(self) -> None:
        """Publish every kept statement again, read them back, and publish again (a few times,
        after a pause) what was not read back."""
        self.counts["readback_rounds"] += 1
        pending = dict(self._kept)
        if not self.host.link.limits.retain_available:
            # MQTT 5 Retain Available 0: the link sends them unretained (counted in its stats);
            # there is nothing to read back, and the live copies reach who is connected.
            await self._publish(pending)
            self._mark_stored(pending)  # acknowledged; this broker retains nothing to read
            return
        for attempt in range(1, READBACK_TRIES + 1):
            for start in range(0, len(pending), READBACK_BATCH):
                batch = dict(list(pending.items())[start : start + READBACK_BATCH])
                await self._publish(batch)
                missing = await self._read_back(batch)
                self._mark_stored(sid for sid in batch if sid not in missing)
                for sid in batch:
                    if sid not in missing:
                        del pending[sid]
            if not pending:
                return
            self.counts["readback_missing"] += len(pending)
            log.warning(
                "%d revocation statement(s) not read back from the broker (try %d of %d);"
                " publishing again",
                len(pending),
                attempt,
                READBACK_TRIES,
            )
            await asyncio.sleep(READBACK_PAUSE)

    async def _publish(self, batch: dict[str, bytes]) -> None:
        link, topics, me = self.host.link, self.host.topics, self.host.peer_id
        try:
            async with asyncio.timeout(READBACK_WAIT):
                await asyncio.gather(
                    *(
                        link.publish(topics.revocation(me, st), st, qos=1, retain=True)
                        for st in batch.values()
                    )
                )
        except (TimeoutError, BrokerError) as exc:
            log.info("republishing revocation statements: %s", exc or "no acknowledgement")
        self.counts["republished"] += len(batch)

    async def _read_back(self, batch: dict[str, bytes]) -> set[str]:
        """The statement ids of `batch` that fresh subscriptions to their topics did not get as
        retained messages within READBACK_WAIT."""
        missing = set(batch)
        done = asyncio.Event()

        def seen(msg: Message) -> None:
            where = self.host.topics.parse(msg.topic)
            # Only a retained delivery counts: a live copy of the publish just made comes
            # with the flag clear (and through rev/# to every subscription of the topic).
            if msg.retain and where is not None and where[0] == "rev":
                sid = where[1][1]
                if batch.get(sid) == msg.payload:
                    missing.discard(sid)
                    if not missing:
                        done.set()

        subs: list[Subscribed] = []
        me = self.host.peer_id
        try:
            async with asyncio.timeout(READBACK_WAIT):
                for st in batch.values():
                    topic = self.host.topics.revocation(me, st)
                    subs.append(await self.host.link.subscribe(topic, qos=1, handler=seen))
                await done.wait()
        except (TimeoutError, BrokerError):
            pass
        finally:
            for sub in subs:
                with contextlib.suppress(BrokerError):
                    await sub.close()
        return missing

    def status(self) -> dict[str, Any]:
        kept = {"kept": len(self._kept), "not_kept": self.not_kept, **self.counts}
        backlog = {"backlog": self.backlog(), "backlog_peak": self.backlog_peak}
        return {"revocations": {"applied": self.applied, **kept, **backlog}}

    def on_app(self, peer: str, app: AppMessage) -> None:
        if isinstance(app, RevocationPush):
            # Pushed by an authenticated peer: its lane is its own. A statement verifies itself,
            # whatever the trust in the peer that carried it.
            self.admit(peer, app.statement, source=peer)

    def on_broker_message(self, msg: Message) -> None:
        """A statement from `rev/<publisher>/<statement id>`, in the link's read path: filed in
        its publisher's backlog, nothing more (see the module docstring)."""
        parts = msg.topic.split("/")
        if parts[-1] == INDEX_LEVEL:
            return  # an issuer's index: peerd/revocation_index.py reads those it watches
        publisher = parts[-2] if len(parts) >= 2 else ""
        backlog = self._backlog.get(publisher)
        if (
            self._backlog_bytes + len(msg.payload) > BACKLOG_BYTES
            or (backlog is None and len(self._backlog) >= BACKLOG_PUBLISHERS)
            or (backlog is not None and len(backlog) >= BACKLOG_PER_PUBLISHER)
        ):
            self.host.count_rejection(
                "revocation-backlog-full",
                "revocations (the last from %s) faster than they can be checked",
                publisher[:80],
            )
            return
        if backlog is None:
            backlog = self._backlog[publisher] = deque()
        backlog.append(msg)
        self._backlog_bytes += len(msg.payload)
        self._backlog_count += 1
        self.backlog_peak = max(self.backlog_peak, self._backlog_count)
        self._backlog_ready.set()

    def backlog(self) -> int:
        """Statements from the broker waiting for their cheap checks."""
        return self._backlog_count

    async def _check_backlog(self) -> None:
        """The cheap checks of the filed statements, one publisher's after another's, in slices
        of `CHECK_SLICE` between which the read path runs."""
        while True:
            await self._backlog_ready.wait()
            self._backlog_ready.clear()
            started = time.monotonic()
            while self._backlog:
                publisher, backlog = next(iter(self._backlog.items()))
                msg = backlog.popleft()
                self._backlog_bytes -= len(msg.payload)
                self._backlog_count -= 1
                if backlog:
                    self._backlog.move_to_end(publisher)
                else:
                    del self._backlog[publisher]
                try:
                    self._check(msg)
                except Exception:  # noqa: BLE001 - as a handler's in the read path: counted, and the checks go on
                    self.host.count_rejection(
                        "revocation-check-failed", "checking a revocation on %s failed", msg.topic
                    )
                if time.monotonic() - started > CHECK_SLICE:
                    await asyncio.sleep(0)
                    started = time.monotonic()

    def _check(self, msg: Message) -> None:
        refuse = self.host.count_rejection
        statement = msg.payload
        where = self.host.topics.parse(msg.topic)  # an index never gets here: see above
        if not statement:
            # Someone cleared a retained statement: it un-revokes nothing (the store keeps
            # what it learned), but an operator should see the attempt.
            refuse("revocation-cleared", "a retained revocation cleared on %s", msg.topic)
            return
        if where is None or where[0] != "rev":
            refuse("revocation-bad-topic", "a revocation on topic %r", msg.topic[:200])
            return
        publisher, sid = where[1]
        self.check_broker_statement(publisher, statement, sid)

    def check_broker_statement(self, publisher: str, statement: bytes, sid: str) -> None:
        """The cheap checks of a statement published under `rev/<publisher>/` (on its own
        topic `sid`, or in the publisher's index), then `admit`."""
        refuse = self.host.count_rejection
        if sid != statement_id(statement):
            refuse(
                "revocation-topic-mismatch", "a revocation under %s that is not %s", publisher, sid
            )
            return
        try:
            parsed = decode_statement(statement)
        except RemoteProtocolError as exc:
            refuse("revocation-malformed", "a revocation from %s: %s", publisher, exc)
            return
        # Under rev/<publisher>/ the ACL lets only the publisher write: its own statements, an
        # authority's it relays, or (relayed) another node's - taken only for a peer this node
        # knows, so that one account cannot retain statements of made-up identities.
        if (
            isinstance(parsed, Revocation)
            and parsed.peer_id != publisher
            and self.host.store.view().peer(parsed.peer_id) is None
        ):
            refuse(
                "revocation-wrong-issuer",
                "%s published a revocation of %s, a peer this node does not know",
                publisher,
                parsed.peer_id,
            )
            return
        self.admit(publisher, statement, source="broker", sid=sid)

    def admit(
        self, publisher: str, statement: bytes, *, source: str, sid: str | None = None
    ) -> None:
        """Queue `statement` in its publisher's lane, to be verified and recorded."""
        sid = sid or statement_id(statement)
        refused = self.lanes.statement(
            publisher, sid, lambda: self._learn(statement, source=source, sid=sid)
        )
        if refused is not None and refused != "duplicate":  # a replay is no error (the store's)
            self.host.count_rejection(
                f"revocation-{refused}", "a revocation from %s not queued: %s", publisher, refused
            )

    async def _learn(self, statement: bytes, *, source: str, sid: str) -> None:
        try:
            changed = await self.host.store.record_revocation(statement, now=time.time())
        except PeerdError as exc:
            reason = f"revocation-{getattr(exc, 'reason', 'malformed')}"
            self.host.count_rejection(
                reason, "revocation statement from %s refused: %s", source, exc
            )
            return
        self.lanes.applied(sid)
        if changed:
            self.applied += 1
            log_event(log, "revocation.applied", logging.WARNING, via=source)
            self.host.publish_event("trust.revoked", {"via": source})
