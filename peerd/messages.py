"""Messages on named channels: the durable outbox and inbox around `protocol.messaging`
(`Messenger`), and the daemon extension that serves them (`Messages`: the `v1.msg.*` control
methods, delivery of what peers send, retransmission timers and expiry).

Sending: `send()` stores the message in the outbox with the next number of its (peer, channel)
in one transaction, then the pump transmits what is due whenever the peer has a session. A
cumulative ACK from the peer deletes what it covers. Messages wait for offline peers, survive
restarts, and expire after their time to live; the outbox is bounded per peer and in bytes.

Receiving: a message is stored in the inbox and its channel's counter advanced in one
transaction, and only then acknowledged; the application takes messages from the inbox
(`receive`) and deletes them with `ack`. So each message reaches the inbox exactly once and in
order, whatever the network duplicated or reordered, and survives a crash of either daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peerd.control import optional, require
from peerd.errors import PeerdError, UsageError
from peerd.events import LogBudget
from peerd.host import Extension, control_method
from peerd.logs import log_event
from peerd.receivers import check_receiver
from protocol.identity import parse_peer_id
from protocol.messaging import (
    MAX_MESSAGE,
    ChannelAck,
    ChannelMessage,
    InboundChannel,
    OutboundChannel,
    check_channel,
)

if TYPE_CHECKING:
    from peerd.host import Host
    from peerd.store import Store
    from protocol.messaging import AppMessage

log = logging.getLogger(__name__)

DEFAULT_TTL = 7 * 24 * 3600.0
MAX_TTL = 365 * 24 * 3600.0
# Receiving state cached per (peer, channel): a peer names channels, so the cache is bounded
# (an evicted entry reloads its last number from the store; what it buffered is sent again).
MAX_INBOUND_CACHE = 4096
# Each stored message counts this much besides its data against the inbox bound, so that a
# peer cannot fill the disk with empty messages.
ROW_OVERHEAD = 64


class OutboxFull(PeerdError):
    """The outbox for a peer (or in total) is at its limit."""

    hint = "wait for the peer to come online, or raise [limits] outbox_* in the config"


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_messages_per_peer: int = 10_000
    max_bytes: int = 256 << 20
    max_inbox_bytes: int = 256 << 20


@dataclass(frozen=True, slots=True)
class Received:
    id: int
    peer: str
    channel: str
    seq: int
    data: bytes
    received_at: float

    def as_json(self) -> dict[str, Any]:
        import base64  # noqa: PLC0415 - only the JSON path needs it

        return {
            "id": self.id,
            "peer": self.peer,
            "channel": self.channel,
            "seq": self.seq,
            "data_b64": base64.b64encode(self.data).decode("ascii"),
            "received_at": self.received_at,
        }


# Sends one encoded application payload to a peer; False when there is no session now.
Transmit = Callable[[str, bytes], bool]


class Messenger:
    def __init__(
        self, store: Store, transmit: Transmit, limits: OutboxLimits | None = None
    ) -> None:
        self.store = store
        self.transmit = transmit
        self.limits = limits or OutboxLimits()
        self._out: dict[tuple[str, str], OutboundChannel] = {}
        self._in: dict[tuple[str, str], InboundChannel] = {}
        self._arrived = asyncio.Condition()
        self._lock = asyncio.Lock()  # inbound state: one message processed at a time
        self.counters = {"sent": 0, "resent": 0, "received": 0, "duplicates": 0, "expired": 0}
        # What peers sent that was refused, by reason (shown in `peerd status`).
        self.rejections: Counter[str] = Counter()
        # A peer that keeps sending into a full inbox costs a line per message otherwise.
        self._logs = LogBudget(log)

    # -- sending ---------------------------------------------------------------------------

    async def send(
        self, peer: str, channel: str, data: bytes, *, ttl: float = DEFAULT_TTL, now: float
    ) -> int:
        """Store a message for `peer` and return its sequence number on the channel."""
        check_channel(channel)
        if len(data) > MAX_MESSAGE:
            raise PeerdError(
                f"a message is at most {MAX_MESSAGE} bytes ({len(data)} given)",
                hint="send larger payloads as a file with `peerd send`",
            )
        if not 0 < ttl <= MAX_TTL:
            raise PeerdError(f"a message's time to live is 1 s to {int(MAX_TTL)} s")
        async with self.store.transaction(now) as tx:
            count, total = await tx.fetchone(
                "SELECT (SELECT COUNT(*) FROM outbox WHERE peer_id = ?),"
                " (SELECT COALESCE(SUM(length(data)), 0) FROM outbox)",
                (peer,),
            )
            if count >= self.limits.max_messages_per_peer:
                raise OutboxFull(f"the outbox for {peer} holds {count} messages already")
            if total + len(data) > self.limits.max_bytes:
                raise OutboxFull(f"the outbox holds {total} bytes already")
            row = await tx.fetchone(
                "SELECT next_seq FROM channels_out WHERE peer_id = ? AND channel = ?",
                (peer, channel),
            )
            seq = 1 if row is None else row[0]
            await tx.execute(
                "INSERT INTO channels_out (peer_id, channel, next_seq) VALUES (?, ?, ?)"
                " ON CONFLICT (peer_id, channel) DO UPDATE SET next_seq = excluded.next_seq",
                (peer, channel, seq + 1),
            )
            await tx.execute(
                "INSERT INTO outbox (peer_id, channel, seq, data, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (peer, channel, seq, data, now, now + ttl),
            )
        await self.pump(peer, now=now)
        return seq

    async def _outbound(self, peer: str, channel: str) -> OutboundChannel:
        key = (peer, channel)
        out = self._out.get(key)
        if out is None:
            row = await self.store.fetchone(
                "SELECT MIN(seq) FROM outbox WHERE peer_id = ? AND channel = ?", (peer, channel)
            )
            first = row[0] if row and row[0] is not None else None
            out = self._out[key] = OutboundChannel(acked=(first - 1) if first else 0)
        return out

    async def pump(self, peer: str, *, now: float, reset: bool = False) -> None:
        """Transmit what is due for `peer` (everything unacknowledged after `reset`)."""
        channels = await self.store.fetchall(
            "SELECT DISTINCT channel FROM outbox WHERE peer_id = ?", (peer,)
        )
        for (channel,) in channels:
            out = await self._outbound(peer, channel)
            if reset:
                out.reset()
            rows = await self.store.fetchall(
                "SELECT seq, data FROM outbox WHERE peer_id = ? AND channel = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (peer, channel, out.acked, out.window),
            )
            data = dict(rows)
            for seq in out.due(list(data), now):
                if not self.transmit(peer, ChannelMessage(channel, seq, data[seq]).encode()):
                    out.reset()  # no session: everything goes again once there is one
                    return
                self.counters["sent"] += 1

    async def on_ack(self, peer: str, ack: ChannelAck, *, now: float) -> None:
        if (peer, ack.channel) not in self._out:
            row = await self.store.fetchone(
                "SELECT next_seq FROM channels_out WHERE peer_id = ? AND channel = ?",
                (peer, ack.channel),
            )
            if row is None or ack.seq >= row[0]:
                # A channel never used, or numbers never sent: refused before anything is
                # cached, so a peer's ACKs cannot grow our state.
                self.rejections["bad-ack"] += 1
                return
        out = await self._outbound(peer, ack.channel)
        if not out.ack(ack.seq):
            return
        async with self.store.transaction(now) as tx:
            await tx.execute(
                "DELETE FROM outbox WHERE peer_id = ? AND channel = ? AND seq <= ?",
                (peer, ack.channel, ack.seq),
            )
        await self.pump(peer, now=now)

    def next_deadline(self) -> float | None:
        deadlines = [d for out in self._out.values() if (d := out.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    async def on_timer(self, peers_with_session: list[str], *, now: float) -> None:
        for peer in {p for (p, _) in self._out} & set(peers_with_session):
            await self.pump(peer, now=now)

    async def expire(self, *, now: float) -> int:
        async with self.store.transaction(now) as tx:
            cur = await tx.execute("DELETE FROM outbox WHERE expires_at <= ?", (now,))
            n = cur.rowcount or 0
        if n:
            self.counters["expired"] += n
            self._out.clear()  # numbers may have gaps now; reload from the outbox
            log_event(log, "messages.expired", count=n)
        return n

    async def peers_waiting(self) -> set[str]:
        """Peers with messages in the outbox."""
        rows = await self.store.fetchall("SELECT DISTINCT peer_id FROM outbox")
        return {r[0] for r in rows}

    async def outbox(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall(
            "SELECT peer_id, channel, COUNT(*), SUM(length(data)), MIN(created_at)"
            " FROM outbox GROUP BY peer_id, channel ORDER BY peer_id, channel"
        )
        return [
            {"peer": p, "channel": c, "messages": n, "bytes": b, "oldest": t}
            for p, c, n, b, t in rows
        ]

    # -- receiving ---------------------------------------------------------------------------

    async def on_message(self, peer: str, msg: ChannelMessage, *, now: float) -> None:
        async with self._lock:
            key = (peer, msg.channel)
            inbound = self._in.get(key)
            if inbound is None:
                row = await self.store.fetchone(
                    "SELECT last_seq FROM channels_in WHERE peer_id = ? AND channel = ?", key
                )
                self._evict_inbound()
                inbound = self._in[key] = InboundChannel(last=row[0] if row else 0)
            if msg.seq > inbound.last + inbound.max_ahead:
                self.rejections["too-far-ahead"] += 1
            result = inbound.receive(msg)
            if result.duplicate:
                self.counters["duplicates"] += 1
            if result.deliver:
                total = await self.store.fetchone(
                    "SELECT COALESCE(SUM(length(data) + ?), 0) FROM inbox", (ROW_OVERHEAD,)
                )
                if total[0] > self.limits.max_inbox_bytes:
                    # Do not acknowledge: the sender keeps it until the application catches up.
                    inbound.last -= len(result.deliver)
                    self.rejections["inbox-full"] += 1
                    self._logs.event(
                        logging.WARNING, "inbox-full", "messages.inbox_full", peer=peer
                    )
                    return
                async with self.store.transaction(now) as tx:
                    for m in result.deliver:
                        await tx.execute(
                            "INSERT INTO inbox (peer_id, channel, seq, data, received_at)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (peer, m.channel, m.seq, m.data, now),
                        )
                    await tx.execute(
                        "INSERT INTO channels_in (peer_id, channel, last_seq) VALUES (?, ?, ?)"
                        " ON CONFLICT (peer_id, channel)"
                        " DO UPDATE SET last_seq = excluded.last_seq",
                        (peer, msg.channel, result.ack),
                    )
                self.counters["received"] += len(result.deliver)
                async with self._arrived:
                    self._arrived.notify_all()
        # Acknowledge only what is durable: after the commit above (or a duplicate's old state).
        self.transmit(peer, ChannelAck(msg.channel, result.ack).encode())

    def _evict_inbound(self) -> None:
        if len(self._in) < MAX_INBOUND_CACHE:
            return
        idle = next((k for k, v in self._in.items() if not v.buffered), None)
        del self._in[idle if idle is not None else next(iter(self._in))]

    async def receive(self, channel: str, *, limit: int = 100, wait: float = 0.0) -> list[Received]:
        """Up to `limit` messages of `channel`, oldest first; wait up to `wait` seconds for one."""
        check_channel(channel)
        deadline = time.monotonic() + wait
        while True:
            rows = await self.store.fetchall(
                "SELECT id, peer_id, channel, seq, data, received_at FROM inbox"
                " WHERE channel = ? ORDER BY id LIMIT ?",
                (channel, max(1, min(limit, 1000))),
            )
            remaining = deadline - time.monotonic()
            if rows or remaining <= 0:
                return [Received(*r) for r in rows]
            async with self._arrived:
                with contextlib.suppress(TimeoutError):
                    # Not wait_for: see peerd/waiting.py (a Condition, not an Event, here).
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()

    async def ack(self, ids: list[int], *, now: float) -> int:
        if not ids:
            return 0
        async with self.store.transaction(now) as tx:
            marks = ",".join("?" * len(ids))
            cur = await tx.execute(f"DELETE FROM inbox WHERE id IN ({marks})", ids)  # noqa: S608 - only placeholders
            return cur.rowcount or 0

    async def inbox(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall(
            "SELECT channel, COUNT(*), SUM(length(data)) FROM inbox GROUP BY channel"
        )
        return [{"channel": c, "messages": n, "bytes": b} for c, n, b in rows]


class Messages(Extension):
    """The messenger in the daemon: what peers send reaches it on the event task, only from a
    session the store recorded and still trusts; the `v1.msg.*` methods are its API."""

    def __init__(self, host: Host, limits: OutboxLimits | None = None) -> None:
        self.host = host
        self.messenger = Messenger(host.store, host.transmit, limits)

    def on_app(self, peer: str, app: AppMessage) -> None:
        if isinstance(app, ChannelMessage):
            self.host.defer(lambda: self._deliver(peer, self.messenger.on_message, app))
        elif isinstance(app, ChannelAck):
            self.host.defer(lambda: self._deliver(peer, self.messenger.on_ack, app))

    async def _deliver(
        self, peer: str, handler: Callable[..., Awaitable[None]], app: ChannelMessage | ChannelAck
    ) -> None:
        """Hand a message (or ACK) to the messenger only if a session with `peer` that the store
        recorded and still trusts exists now: one refused at recording (say, a second joiner
        with an invite already used) is closed by then, and what it sent must not reach the
        inbox. Not acknowledged, a dropped message stays in its sender's outbox."""
        if not self.host.has_trusted_session(peer):
            self.host.count_rejection(
                "message-untrusted-session", "a message from %s without a trusted session", peer
            )
            return
        await handler(peer, app, now=time.time())

    async def session_up(self, peer: str) -> None:
        await self.messenger.pump(peer, now=time.time(), reset=True)

    def next_deadline(self) -> float | None:
        return self.messenger.next_deadline()

    def on_timer(self, now: float) -> None:
        self.host.defer(
            lambda: self.messenger.on_timer(self.host.connected_peers(), now=time.time())
        )

    async def housekeeping(self, now: float) -> None:
        await self.messenger.expire(now=now)

    async def peers_with_work(self) -> set[str]:
        return await self.messenger.peers_waiting()

    def status(self) -> dict[str, Any]:
        return {"messages": dict(self.messenger.counters)}

    def rejections(self) -> dict[str, int]:
        return {f"message-{k}": v for k, v in self.messenger.rejections.items() if v}

    # -- control methods ---------------------------------------------------------------------

    @control_method("v1.msg.send")
    async def _send(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        import base64  # noqa: PLC0415 - only this method needs it

        peer = parse_peer_id(require(params, "peer", str))
        channel = require(params, "channel", str)
        data = base64.b64decode(require(params, "data_b64", str), validate=True)
        ttl = optional(params, "ttl", float, self.host.config.limits.message_ttl_days * 86400)
        check_receiver(self.host.store.view(), peer, trusted_only=False)
        seq = await self.messenger.send(peer, channel, data, ttl=ttl, now=time.time())
        return {"peer": peer, "channel": channel, "seq": seq}

    @control_method("v1.msg.recv")
    async def _recv(self, params: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
        channel = require(params, "channel", str)
        limit = optional(params, "limit", int, 100)
        wait = optional(params, "wait", float, 0.0)
        msgs = await self.messenger.receive(channel, limit=limit, wait=min(wait, 3600.0))
        return [m.as_json() for m in msgs]

    @control_method("v1.msg.ack")
    async def _ack(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        ids = require(params, "ids", list)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UsageError("ids must be a list of integers")
        return {"acked": await self.messenger.ack(ids, now=time.time())}

    @control_method("v1.msg.outbox")
    async def _outbox(self, params: dict[str, Any], conn: Any) -> dict[str, Any]:
        return {"outbox": await self.messenger.outbox(), "inbox": await self.messenger.inbox()}
