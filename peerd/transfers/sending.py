"""Sending a file: the shell around `protocol.transfer.SenderTransfer`.

The file is read chunk by chunk into one reused buffer, sealed into one reused frame buffer and
published once to the transfer's topic, which every receiver subscribes to; the state machine
decides what to read next from the receivers' credit and acknowledgements, which arrive inside
the Noise sessions (`on_control`). The file's size, mtime and inode are watched: a change aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.logs import log_event
from peerd.mqtt import BrokerError
from peerd.mqtt.probe import ProbePlan
from peerd.receivers import check_receiver
from peerd.transfers.chunkindex import MIN_DELTA_SIZE, FileChunker, keyed_entries, pack_digests
from peerd.transfers.files import (
    StatKey,
    TransferError,
    open_source,
    source_problem,
    stat_key,
    stat_of,
)
from peerd.transfers.sent import Late, SentChunks
from peerd.transfers.side import Side
from peerd.waiting import wait_set
from protocol.errors import LocalProtocolError
from protocol.identity.trust import PeerState
from protocol.transfer import (
    PEER_FAULTS,
    Accepted,
    Finished,
    Offer,
    Persist,
    Progress,
    ReceiverFailed,
    ReceiverVerified,
    Recipe,
    Sealed,
    SendControl,
    SenderTransfer,
    TransferConfig,
    delta,
    describe,
)
from protocol.transfer.chunks import FRAME_OVERHEAD, frame_buffer

# The smallest chunk a broker's packet limit may push a transfer down to (issue 12): below it
# the per-chunk costs (a publish, a frame header and tag, an acknowledgement) dominate.
MIN_CHUNK = 16 * 1024
# How long a new transfer waits for the link's probe of the broker's packet limit to finish
# (a probe meets at most one unanswered size, peerd/mqtt/probe.py PROBE_TIMEOUT).
PROBE_WAIT = 10.0
# Chunks published and none acknowledged by any receiver for this long, while one has a session
# up: the broker drops them (a limit it does not state, or lowered since the probe). The sender
# ends the transfer with an error naming the sizes instead of waiting forever (issue 12: within
# 15 s of the first chunk).
STALL_LIMIT = 10.0

if TYPE_CHECKING:
    from peerd.host import Host
    from peerd.mqtt import LinkLimits, Topics
    from peerd.transfers.outcomes import Outcomes
    from peerd.transfers.records import ActiveRow, TransferRecords

log = logging.getLogger("peerd.transfers")

# Chunk lists kept (deltas), packed: 36 bytes a chunk, so ~28 GiB of files.
CHUNK_CACHE_BYTES = 16 << 20
# A receiver silent this long while in the transfer is shown offline: a live one answers the
# sender's probes (every 2 s while it is quiet) and acknowledges chunks as they come.
OFFLINE_AFTER = 10.0
OFFLINE_EVERY = 5.0  # while one is offline, an event this often: progress lines keep counting


def probe_plan(topics: Topics, peer_id: str, chunk_size: int) -> ProbePlan:
    """What the link probes at connect: the frame of every chunk size `_chunk_size` may pick,
    on a topic as long as a transfer's (one of this node's, which the broker ACL lets it use)."""
    sizes = []
    chunk = chunk_size
    while chunk >= MIN_CHUNK:
        sizes.append(chunk + FRAME_OVERHEAD)
        chunk //= 2
    return ProbePlan(topics.transfer(peer_id, bytes(16)), tuple(reversed(sizes)))


def _limit_text(limits: LinkLimits) -> str:
    how = {"broker": "stated by the broker", "probe": "found by a probe at connect"}
    return f"the broker's packet limit of {limits.max_packet_size} bytes" + (
        f" ({how[limits.source]})" if limits.source in how else ""
    )


YIELD_EVERY = 4  # chunks published before the sender lets the event loop read acknowledgements


@dataclass(eq=False)
class Outgoing:
    tid: bytes
    machine: SenderTransfer
    path: Path
    fd: int
    stat: StatKey
    topic: str
    receivers: list[str]
    started_at: float
    deadline: float | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[dict[str, Any]] | None = None
    progress: dict[str, int] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # why a receiver failed, in words
    task: asyncio.Task[None] | None = None
    # Deltas (SPEC 7.11): the file's CDC chunks (length, digest), cut into the recipe's parts
    # as the chunker gets through the file; the next part each receiver is to be sent.
    parts: list[bytes] = field(default_factory=list)  # packed (_pack)
    parts_done: bool = False
    recipe_next: dict[str, int] = field(default_factory=dict)
    cutter: asyncio.Task[None] | None = None
    late: bool = False  # sent without a recipe: it follows the transfer (peerd/transfers/sent.py)
    stop_cutting: bool = False
    held: dict[str, int] = field(default_factory=dict)  # bytes each receiver already had
    offline: dict[str, float] = field(default_factory=dict)  # receiver -> silent since (epoch)
    offline_said: float = 0.0  # when the last offline event went out
    unacked_since: float | None = None  # chunks published since, no progress heard (STALL_LIMIT)
    acked_base: int | None = None  # chunks acknowledged before the first publish (deltas: held)


class Sending(Side):
    """The files this node is sending, one task each."""

    def __init__(
        self,
        host: Host,
        config: TransferConfig,
        records: TransferRecords,
        outcomes: Outcomes,
    ) -> None:
        super().__init__(host, config, records, outcomes)
        self.out: dict[bytes, Outgoing] = {}
        # The chunk lists of the last files sent, by (device, inode, size, mtime): the same
        # file to one more peer, or again, is not chunked again.
        self._chunk_cache: dict[StatKey, list[bytes]] = {}  # the parts, packed
        self.sent = SentChunks(host, self._cache_chunks)

    # -- starting ----------------------------------------------------------------------------

    async def _chunk_size(self) -> int:
        """The configured chunk size, or the largest halving of it whose frame fits the
        broker's packet limit in force (negotiated with an MQTT 5 broker, `[broker]
        max_packet_size`, or found by the link's probe at connect), down to MIN_CHUNK; below
        that a transfer cannot go through."""
        limits = await self.host.link.settled(PROBE_WAIT)
        room = limits.max_payload(self.host.topics.transfer(self.host.peer_id, bytes(16)))
        chunk = self.config.chunk_size
        while chunk + FRAME_OVERHEAD > room and chunk > MIN_CHUNK:
            chunk //= 2
        if chunk + FRAME_OVERHEAD > room:
            raise TransferError(
                f"{_limit_text(limits)} leaves no room for a chunk of {MIN_CHUNK} bytes",
                hint="raise the broker's limit (Mosquitto max_packet_size / message_size_limit)"
                " and [broker] max_packet_size",
            )
        return chunk

    async def send(
        self, path: Path, receivers: list[str], *, answer_within: float | None = None
    ) -> dict[str, Any]:
        """Offer the file at `path` (absolute) to `receivers`; those that have not accepted
        within `answer_within` seconds (if given) are dropped with reason "timeout"."""
        host = self.host
        most = host.config.limits.active_sends
        if len(self.out) >= most:
            raise TransferError(
                f"{most} transfers are already being sent",
                hint="wait for one to finish, or raise [limits] active_sends",
            )
        view = host.store.view()
        for peer in receivers:
            check_receiver(view, peer, trusted_only=True)
        config = dataclasses.replace(self.config, chunk_size=await self._chunk_size())
        fd, st = open_source(path)
        chunker: FileChunker | None = None
        try:
            chunker, parts, late = await self._first_part(fd, st.st_size, path, receivers)
            if parts:
                # A delta candidate: the receiver may hold most chunks already and says which
                # as the recipe reaches them, so only the first chunk goes before its Accept
                # (SPEC 7.7): the first byte does not wait, an identical resend pays one chunk.
                peers = len(set(receivers))
                config = dataclasses.replace(config, early_window=delta.early_window(peers))
            now = time.time()
            machine = SenderTransfer(
                name=path.name,
                size=st.st_size,
                receivers=receivers,
                sender=host.peer_id,
                signing_key=host.keys.signing_key(),
                now=now,
                config=config,
            )
        except BaseException:
            if chunker is not None:
                await asyncio.to_thread(chunker.close)
            os.close(fd)
            raise
        tid = machine.transfer_id
        o = Outgoing(
            tid=tid,
            machine=machine,
            path=path,
            fd=fd,
            stat=stat_of(st),
            topic=host.topics.transfer(host.peer_id, tid),
            receivers=list(dict.fromkeys(receivers)),
            started_at=now,
            deadline=None if answer_within is None else now + answer_within,
            parts=parts,
            parts_done=chunker is None,
            late=late,
        )
        o.done = asyncio.get_running_loop().create_future()
        await self.records.add_send(
            tid,
            receivers=o.receivers,
            name=path.name,
            size=st.st_size,
            path=str(path),
            source_stat=o.stat,
            deadline=o.deadline,
            now=now,
        )
        self.out[tid] = o
        for peer in o.receivers:
            host.connect(peer)
        o.task = host.spawn(self._pump(o), name=f"send {tid.hex()[:8]}")
        if chunker is not None:
            o.cutter = host.spawn(self._cut(o, chunker), name=f"recipe {tid.hex()[:8]}")
        self.outcomes.stats.started["send"] += 1
        log_event(
            log,
            "transfer.start",
            id=tid.hex(),
            direction="send",
            name=path.name,
            bytes=st.st_size,
            peers=o.receivers,
        )
        return self.describe(o)

    async def _first_part(
        self, fd: int, size: int, path: Path, receivers: list[str]
    ) -> tuple[FileChunker | None, list[bytes], bool]:
        """The recipe's first part (deltas, SPEC 7.11), the chunker that cuts the rest while
        the transfer runs (None when the whole list is known: a file sent again), and whether
        the recipe follows the transfer instead (no receiver was sent any chunk sampled from
        the file: peerd/transfers/sent.py). No parts for a small file, or one that may have
        more chunks than a recipe may list."""
        if not self.host.config.receive.deltas:
            return None, [], False
        if size < MIN_DELTA_SIZE or size > delta.MAX_RECIPE_ENTRIES * delta.CDC_MIN:
            return None, [], False
        chunker: FileChunker | None = None
        try:
            ident = stat_of(os.fstat(fd))
            cached = self._chunk_cache.get(ident)
            if cached is not None:
                return None, cached, False
            if not await self.sent.worth_a_recipe(fd, size, path.name, receivers):
                return None, [], True
            chunker = await asyncio.to_thread(FileChunker, fd, size, path.name)
            if chunker.bound > delta.MAX_RECIPE_ENTRIES:
                await asyncio.to_thread(chunker.close)
                return None, [], False
            first = pack_digests(await asyncio.to_thread(chunker.take, delta.part_entries(0)))
        except (OSError, ValueError) as exc:
            log.warning("sending %s whole: chunking it failed: %s", path.name, exc)
            if chunker is not None:
                await asyncio.to_thread(chunker.close)
            return None, [], False
        if chunker.done:
            self._cache_chunks(ident, [first])
            return None, [first], False
        return chunker, [first], False

    def _cache_chunks(self, ident: StatKey, parts: list[bytes]) -> None:
        self._chunk_cache.pop(ident, None)
        self._chunk_cache[ident] = parts
        while len(self._chunk_cache) > 1 and (
            sum(len(p) for parts in self._chunk_cache.values() for p in parts) > CHUNK_CACHE_BYTES
        ):
            del self._chunk_cache[next(iter(self._chunk_cache))]

    async def _cut(self, o: Outgoing, chunker: FileChunker) -> None:
        """Cut the rest of the file into recipe parts while the transfer runs, sending each to
        the receivers already offered the file. A receiver caps its credit at what the parts
        it has cover, so this pass (~2 GB/s) overlaps the transfer instead of preceding it."""
        try:
            while not chunker.done and not o.stop_cutting:
                part = await asyncio.to_thread(chunker.take, delta.part_entries(len(o.parts)))
                o.parts.append(pack_digests(part))
                o.parts_done = chunker.done
                for peer in list(o.recipe_next):
                    self._send_recipe(o, peer)
        except (OSError, ValueError) as exc:
            # The receivers lift their cap when no part comes (recipe_wait) and fetch the rest.
            log.warning("the recipe of %s stopped: %s", o.path.name, exc)
        finally:
            with contextlib.suppress(BufferError, ValueError):
                chunker.close()  # a cancelled send (a take still running keeps it: then GC)
        if o.parts_done:
            self._cache_chunks(o.stat, list(o.parts))

    def _send_recipe(self, o: Outgoing, peer: str) -> None:
        """The parts `peer` has not had yet, keyed for this pair; part 0 goes just before the
        first Offer, on the same session, the others as they are cut."""
        k = o.recipe_next.setdefault(peer, 0)
        if k >= len(o.parts):
            return
        key = delta.pair_key(bytes(self.host.keys.signing_key()), peer)
        while k < len(o.parts):
            entries = keyed_entries(key, o.parts[k])
            final = o.parts_done and k == len(o.parts) - 1
            msg = Recipe(o.tid, k, final, key, delta.encode_entries(entries))
            if not self.host.transmit(peer, msg.encode()):
                return  # no session now: the rest goes with the next Offer or part
            k += 1
            o.recipe_next[peer] = k

    async def resume(self, row: ActiveRow, snapshot: bytes, now: float) -> None:
        machine = SenderTransfer.restore(
            snapshot, signing_key=self.host.keys.signing_key(), now=now, config=self.config
        )
        path = Path(row.path)
        fd, _ = open_source(path)
        assert row.source_stat is not None
        o = Outgoing(
            tid=row.tid,
            machine=machine,
            path=path,
            fd=fd,
            stat=stat_key(json.loads(row.source_stat)),
            topic=self.host.topics.transfer(self.host.peer_id, row.tid),
            receivers=row.peers,
            started_at=row.created,
            deadline=row.deadline,
        )
        o.done = asyncio.get_running_loop().create_future()
        self.out[row.tid] = o
        if stat_of(os.fstat(fd)) != o.stat:
            machine.source_changed("the file changed while the daemon was stopped")
        o.task = self.host.spawn(self._pump(o), name=f"send {row.tid.hex()[:8]}")
        log_event(log, "transfer.resume", id=row.tid.hex(), direction="send", peers=row.peers)

    # -- what the receivers say --------------------------------------------------------------

    def session_up(self, peer: str) -> None:
        now = time.time()
        for o in self.out.values():
            if peer in o.receivers:
                o.machine.peer_reachable(peer, now)
                o.wake.set()

    def trust_changed(self) -> None:
        """A revoked or blocked peer gets no more of any file."""
        view = self.host.store.view()
        for o in self.out.values():
            for peer in o.receivers:
                record = view.peer(peer)
                if record is not None and record.state in (PeerState.REVOKED, PeerState.BLOCKED):
                    with contextlib.suppress(LocalProtocolError):
                        o.machine.remove_receiver(peer, record.state.value)
                    o.wake.set()
        # What was sent to them is no longer a reason to send them a recipe.
        gone = [
            p.peer_id for p in view.peers() if p.state in (PeerState.REVOKED, PeerState.BLOCKED)
        ]
        if gone:
            self.host.spawn(self.sent.forget(gone), name="forget sent chunks")

    def cancel(self, o: Outgoing) -> None:
        o.machine.cancel("cancelled", "cancelled by the sender's user")
        o.wake.set()

    def peers_with_work(self) -> set[str]:
        return {p for o in self.out.values() for p in o.receivers}

    def tasks(self) -> list[asyncio.Task[None]]:
        return [o.task for o in self.out.values() if o.task]

    def close_files(self) -> None:
        for o in self.out.values():
            os.close(o.fd)
        self.sent.close()

    # -- the pump ----------------------------------------------------------------------------

    async def _pump(self, o: Outgoing) -> None:
        m = o.machine
        read_buf = bytearray(m.offer.chunk_size)
        read_view = memoryview(read_buf)
        out = frame_buffer(m.offer.chunk_size)
        link = self.host.link
        stats, resent = self.outcomes.stats, m.resent_frames
        try:
            while True:
                await self._actions(o)
                if m.finished:
                    return
                now = time.time()
                if o.deadline is not None and now >= o.deadline:
                    self._expire_unaccepted(o)
                if (d := m.next_deadline()) is not None and d <= now:
                    m.on_timer(now)
                self._check_offline(o, now)
                sent = 0
                if self._check_path(o, now):
                    continue
                while (r := m.next_read(now)) is not None:
                    problem = source_problem(o.fd, o.path, o.stat, sent)
                    if problem:
                        m.source_changed(problem)
                        break
                    n = os.preadv(o.fd, [read_view[: r.length]], r.offset)
                    frame = m.on_chunk_read(r, read_view[:n], out)
                    if frame is not None and r.early:
                        for peer in r.early:  # before the Accept: to its early topic
                            early = self.host.topics.early(self.host.peer_id, peer)
                            await link.publish(early, frame, qos=0)
                        stats.sent(n, resent=m.resent_frames != resent)  # once, as fan-out
                        resent = m.resent_frames
                    elif frame is not None:
                        await link.publish(o.topic, frame, qos=0)
                        stats.sent(n, resent=m.resent_frames != resent)
                        resent = m.resent_frames
                        if o.unacked_since is None:
                            o.unacked_since = now
                            if o.acked_base is None:
                                o.acked_base = self._acked(o)
                    sent += 1
                    if sent % YIELD_EVERY == 0:
                        if m.has_actions():
                            await self._actions(o)
                        await asyncio.sleep(0)  # let acknowledgements in
                        now = time.time()
                if sent:
                    continue
                o.wake.clear()
                await self._actions(o)
                if o.machine.finished:
                    return
                d = m.next_deadline()
                delay = 1.0 if d is None else min(max(d - time.time(), 0.0), 1.0)
                if o.deadline is not None:
                    delay = min(delay, max(o.deadline - time.time(), 0.0))
                await wait_set(o.wake, max(delay, 0.001))
        except BrokerError as exc:
            log_event(log, "transfer.error", logging.ERROR, id=o.tid.hex(), error=str(exc))
            m.cancel("broker", str(exc))
            await self._actions(o)
        except OSError as exc:
            log_event(log, "transfer.error", logging.ERROR, id=o.tid.hex(), error=str(exc))
            m.source_changed(f"read error: {exc.strerror}")
            await self._actions(o)

    def _check_offline(self, o: Outgoing, now: float) -> None:
        """A receiver silent for OFFLINE_AFTER (its daemon or its broker gone) is shown so
        ("bob offline since 12 s; waiting"), with an event every OFFLINE_EVERY while it lasts so
        a progress line keeps counting; the transfer waits for it (up to the idle timeout)."""
        m, changed = o.machine, False
        for peer in o.receivers:
            since = m.silent_since(peer)
            gone = since is not None and now - since >= OFFLINE_AFTER
            if gone and peer not in o.offline:
                assert since is not None
                o.offline[peer] = since
                changed = True
                log_event(log, "transfer.receiver_offline", id=o.tid.hex(), peer=peer)
            elif not gone and peer in o.offline:
                del o.offline[peer]
                changed = True
                self._event(o, "transfer.progress", peer=peer, online=True)
        if o.offline and (changed or now - o.offline_said >= OFFLINE_EVERY):
            o.offline_said = now
            for peer, since in o.offline.items():
                self._event(o, "transfer.progress", peer=peer, offline_since=since)

    @staticmethod
    def _acked(o: Outgoing) -> int:
        return sum(o.machine.acked_chunks(p) for p in o.receivers)

    def _check_path(self, o: Outgoing, now: float) -> bool:
        """End the transfer (True) where its chunks cannot reach anyone: a frame above the
        broker's limit now in force (found lower since the transfer began, or another broker),
        or chunks published and none acknowledged for STALL_LIMIT while a receiver is
        connected and asking (a broker that drops them without a word)."""
        m = o.machine
        link = self.host.link
        limits = link.limits
        frame = m.offer.chunk_size + FRAME_OVERHEAD
        # A receiver connected and heard lately: one whose broker or daemon went away is
        # offline (it resumes when back), not a sign that the broker drops chunks; the stall
        # clock counts only while one is reachable, so a receiver back after a long outage
        # is not failed before it had STALL_LIMIT to acknowledge anything.
        reachable = o.unacked_since is not None and any(
            state == "active"
            and p in self.host.connected_peers()
            and (heard := m.silent_since(p)) is not None
            and now - heard < OFFLINE_AFTER / 2
            for p, state in m.receivers().items()
        )
        if not reachable and o.unacked_since is not None:
            o.unacked_since = now
        if frame > limits.max_payload(o.topic):
            detail = f"its chunks of {m.offer.chunk_size} bytes exceed {_limit_text(limits)}"
        elif (
            reachable
            and o.unacked_since is not None
            and now - o.unacked_since >= STALL_LIMIT
            and self._acked(o) == o.acked_base  # no published chunk ever acknowledged
        ):
            detail = (
                f"no chunk of {m.offer.chunk_size} bytes was acknowledged in {STALL_LIMIT:g} s"
                f" although the receiver is connected: the broker drops them"
                f" ({_limit_text(limits)})"
            )
            link.reprobe()  # its limit may be lower than found: the next transfer fits it
        else:
            return False
        log.error("transfer %s: %s", o.tid.hex(), detail)
        m.cancel("broker", detail)
        return True

    def _expire_unaccepted(self, o: Outgoing) -> None:
        o.deadline = None
        for peer, state in o.machine.receivers().items():
            if state == "offered":
                o.machine.remove_receiver(peer, "timeout", "the receiver did not answer in time")

    async def _actions(self, o: Outgoing) -> None:
        # Until none is left: control messages that arrive while a Persist is awaited add
        # actions (the final Finished among them) that must not wait for the next wake-up.
        while actions := o.machine.take_actions():
            await self._batch(o, actions)

    async def _batch(self, o: Outgoing, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, SendControl):
                if o.parts and isinstance(a.message, Offer):
                    self._send_recipe(o, a.peer)
                self.host.transmit(a.peer, a.message.encode())
            elif isinstance(a, Persist):
                await self.records.persist(o.tid, a.snapshot)
            elif isinstance(a, Progress):
                o.progress[a.peer] = a.bytes
                o.unacked_since = None
                self._event(o, "transfer.progress", peer=a.peer, bytes=a.bytes)
            elif isinstance(a, Accepted):
                self._event(o, "transfer.progress", peer=a.peer, bytes=0, accepted=True)
            elif isinstance(a, Sealed):
                await self.records.update(o.tid, file_hash=a.manifest.manifest.file_hash)
            elif isinstance(a, ReceiverVerified):
                o.outcome[a.peer] = "verified"
                o.progress[a.peer] = o.machine.offer.size
                self._event(
                    o, "transfer.progress", peer=a.peer, bytes=o.machine.offer.size, verified=True
                )
            elif isinstance(a, ReceiverFailed):
                o.outcome[a.peer] = f"failed: {a.reason}"
                o.details[a.peer] = a.detail or describe(a.reason)
                if not a.remote and a.reason in PEER_FAULTS:
                    # This side dropped the receiver for what it did (broke the protocol, asked
                    # for more re-sends than the budget): counted against that peer.
                    self.host.count_rejection(f"transfer-dropped-{a.reason}")
                log_event(
                    log,
                    "transfer.receiver_failed",
                    logging.WARNING,
                    id=o.tid.hex(),
                    peer=a.peer,
                    reason=a.reason,
                    detail=a.detail,
                )
                self._event(
                    o,
                    "transfer.progress",
                    peer=a.peer,
                    failed=a.reason,
                    detail=o.details[a.peer],
                )
            elif isinstance(a, Finished):
                await self._finish(o, a)

    async def _finish(self, o: Outgoing, fin: Finished) -> None:
        state = "failed" if fin.failed else "verified"
        if (
            fin.failed
            and all(o.outcome.get(p, "").endswith("cancelled") for p in fin.failed)
            and not fin.verified
        ):
            state = "cancelled"
        reasons = {p: o.outcome.get(p, "") for p in fin.failed}
        await self.records.update(
            o.tid,
            state=state,
            snapshot=None,
            finished_at=time.time(),
            reason=json.dumps(reasons) if reasons else None,
        )
        self.out.pop(o.tid, None)
        o.stop_cutting = True  # the chunker stops after the part it is on
        self._remember(o, list(fin.verified))
        with contextlib.suppress(OSError):
            os.close(o.fd)
        result = self.describe(o)
        result["state"] = state
        result["finished_at"] = time.time()
        if o.done is not None and not o.done.done():
            o.done.set_result(result)
        self.outcomes.done(o.tid, result)

    def _remember(self, o: Outgoing, verified: list[str]) -> None:
        """Deltas (SPEC 7.11): what each receiver that verified the file now holds from this
        node is recorded for the next send's gate; a file sent without its recipe has it
        follow, to those receivers."""
        if o.late and verified:
            try:
                fd = os.dup(o.fd)
            except OSError as exc:
                log.warning("the recipe of %s does not follow it: %s", o.path.name, exc)
                return
            m = o.machine
            self.sent.send_late(Late(o.tid, fd, o.stat, o.path.name, m.offer.size, verified))
            return
        whole = [p for p in verified if o.parts_done and o.recipe_next.get(p) == len(o.parts)]
        for peer in whole:
            self.host.spawn(self.sent.record(peer, list(o.parts)), name="record sent chunks")

    def _event(self, o: Outgoing, name: str, **data: Any) -> None:
        self.host.publish_event(name, {"id": o.tid.hex(), "direction": "send", **data})

    def describe(self, o: Outgoing) -> dict[str, Any]:
        m = o.machine
        return {
            "id": o.tid.hex(),
            "direction": "send",
            "name": o.path.name,
            "path": str(o.path),
            "size": m.offer.size,
            "peers": o.receivers,
            "receivers": {
                p: {
                    "state": o.outcome.get(p, m.receivers().get(p, "?")),
                    "bytes": o.progress.get(p, 0),
                    **({"detail": o.details[p]} if p in o.details else {}),
                    "held_bytes": o.held.get(p, 0),
                    "offline_since": o.offline.get(p),
                }
                for p in o.receivers
            },
            "state": "active",
            "started_at": o.started_at,
            "published_bytes": m.published_bytes,
            "resent_frames": m.resent_frames,
        }
