"""Receiving a file: the shell around `protocol.transfer.ReceiverTransfer`.

An Offer from a trusted peer is checked against the receive policy (size limit, free space),
space is reserved with fallocate, and chunks are decrypted into one reused buffer and written at
their offsets of a temporary file in the sender's inbox directory. Credit is granted as chunks
arrive; progress is acknowledged as durable only after fdatasync (the machine asks for it), the
resumable state goes to the store before anything that depends on it is sent, and the final file
appears under its name only after every chunk is durable, the whole-file hash and the sender's
signature check out, and (for `.safetensors`) the header is valid: fsync, link into place
without clobbering, fsync the directory. The content key is erased from the store when the
transfer ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.errors import PeerdError
from peerd.events import LogBudget
from peerd.logs import log_event
from peerd.mqtt import BrokerError, Message
from peerd.transfers.chunkindex import (
    MIN_DELTA_SIZE,
    ChunkIndex,
    Follower,
    LateRecipes,
    Recipe,
    Recipes,
)
from peerd.transfers.direct import DirectWrites, HeldMemory, write_and_sync
from peerd.transfers.early import EarlyChunks
from peerd.transfers.files import (
    PART_SUFFIX,
    TransferError,
    UnsafeInbox,
    commit_file,
    create_part,
    open_inbox,
    reserve,
    safetensors_problem,
)
from peerd.transfers.side import Side
from peerd.waiting import wait_set
from protocol.errors import RemoteProtocolError
from protocol.identity.trust import PeerState
from protocol.safetensors import is_safetensors_name
from protocol.transfer import (
    Abort,
    Commit,
    Have,
    Offer,
    Persist,
    Progress,
    ReadChunk,
    ReceivePolicy,
    ReceiverTransfer,
    Refuse,
    SendControl,
    Sync,
    TransferConfig,
    TransferFailed,
    check_offer,
    parse_chunk_header,
)

if TYPE_CHECKING:
    from peerd.host import Host, Subscribed
    from peerd.transfers.outcomes import Outcomes
    from peerd.transfers.records import ActiveRow, TransferRecords

log = logging.getLogger("peerd.transfers")

# Reasons for which a receiver itself refuses a file it has received in full.
CONTENT_REJECTIONS = frozenset(
    {"hash-mismatch", "bad-signature", "manifest-mismatch", "bad-content", "bad-safetensors"}
)
# Reasons for which a receiver ends a transfer because of what its sender did (or did not do):
# counted as rejections, so an operator sees forged content and senders that go quiet.
COUNTED_FAILURES = CONTENT_REJECTIONS | {"timeout"}
# Senders whose path's window is remembered (the window a transfer from each reached), so that
# the next transfer starts there instead of probing the path again from the initial window.
REMEMBERED_PATHS = 1024


@dataclass(eq=False)
class Incoming:
    tid: bytes
    machine: ReceiverTransfer
    sender: str
    name: str
    size: int
    temp: Path
    directory: Path
    fd: int
    dirfd: int  # the sender's inbox directory: every name in it is resolved from this fd
    topic: str
    buf: bytearray
    started_at: float
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[dict[str, Any]] | None = None
    sub: Subscribed | None = None
    syncing: bool = False
    received: int = 0
    task: asyncio.Task[None] | None = None
    final: Path | None = None
    recipe: Recipe | None = None  # the file's chunk list (deltas): indexed once committed
    reused: int = 0  # bytes copied from local files instead of received
    direct: DirectWrites | None = None  # chunks held for O_DIRECT writes (None: pwrite)

    def close_files(self) -> None:
        for fd in (self.fd, self.dirfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.direct is not None:
            self.direct.close()


ACCEPT_REACH_WAIT = 0.1  # seconds an Accept may wait for recipe parts to reach one window


class Receiving(Side):
    """The files this node is receiving, one task and one chunk-topic subscription each."""

    def __init__(
        self,
        host: Host,
        config: TransferConfig,
        records: TransferRecords,
        outcomes: Outcomes,
    ) -> None:
        super().__init__(host, config, records, outcomes)
        self.inc: dict[bytes, Incoming] = {}
        self.accepting: set[bytes] = set()  # offers being accepted (their records not yet made)
        self.frames_rejected = 0
        self._header_checks = asyncio.Semaphore(1)
        self.index = ChunkIndex(host.store)
        self.held = HeldMemory(lambda: host.config.limits.held_chunks_memory)
        self.recipes = Recipes()
        self.late = LateRecipes(self.index, self.recipes, lambda w, n: host.spawn(w, name=n))
        self._windows: dict[str, int] = {}  # sender -> the window its last transfer reached
        self.early = EarlyChunks(
            lambda: host.config.limits.active_receives,
            lambda peer: host.store.view().is_trusted(peer),  # the trust of the moment
        )
        # Lines a peer's offers can cause (a trusted sender may repeat an offer every probe).
        self._logs = LogBudget(log)

    def refuse(self, peer: str, message: Abort | Refuse) -> None:
        """Answer an Offer (or a message for no transfer) with a refusal, and count it: an
        operator sees offers refused by policy, and probes for transfers that do not exist."""
        self.host.count_rejection(f"transfer-refused-{message.reason}")
        self.host.transmit(peer, message.encode())

    # -- starting ----------------------------------------------------------------------------

    async def accept_offer(self, peer: str, offer: Offer) -> None:
        host = self.host
        view = host.store.view()
        record = view.peer(peer)
        now = time.time()
        identity = None if record is None else record.identity
        if record is None or record.state is not PeerState.TRUSTED or identity is None:
            self.refuse(peer, Abort(offer.transfer_id, "not-trusted", "not a trusted peer"))
            return
        if len(self.inc) >= host.config.limits.active_receives:
            self.refuse(peer, Abort(offer.transfer_id, "busy", "too many transfers at once"))
            return
        directory = host.config.node.inbox_dir / peer
        try:
            dirfd = open_inbox(host.config.node.inbox_dir, peer)
        except (UnsafeInbox, OSError) as exc:
            self._inbox_refused(peer, offer.transfer_id, directory, exc)
            return
        taken: list[Incoming] = []  # the transfer that took over dirfd, if one started
        self.accepting.add(offer.transfer_id)
        try:
            await self._accept_into(
                peer=peer,
                offer=offer,
                identity=identity,
                directory=directory,
                dirfd=dirfd,
                now=now,
                taken=taken,
            )
        finally:
            self.accepting.discard(offer.transfer_id)
            self.early.take(offer.transfer_id)  # refused: its early chunks are of no use
            if not taken:
                os.close(dirfd)

    def _inbox_refused(
        self, peer: str, tid: bytes, directory: Path, exc: UnsafeInbox | OSError
    ) -> None:
        # The peer learns only that this side failed; the path stays in the local log.
        self.host.transmit(peer, Abort(tid, "receiver-error", "the inbox is not usable").encode())
        if isinstance(exc, UnsafeInbox):
            self.host.count_rejection("transfer-inbox-unsafe")
            self._logs.log(logging.ERROR, "inbox-unsafe", "refusing a file from %s: %s", peer, exc)
        else:
            self._logs.log(
                logging.ERROR, "inbox-error", "cannot prepare the inbox %s: %s", directory, exc
            )

    async def _accept_into(
        self,
        *,
        peer: str,
        offer: Offer,
        identity: bytes,
        directory: Path,
        dirfd: int,
        now: float,
        taken: list[Incoming],
    ) -> None:
        host = self.host
        cfg = host.config.receive
        try:
            vfs = os.fstatvfs(dirfd)
        except OSError as exc:
            self._inbox_refused(peer, offer.transfer_id, directory, exc)
            return
        policy = ReceivePolicy(
            max_size=cfg.max_file_size,
            free_space=vfs.f_bavail * vfs.f_frsize,
            reserve=cfg.free_space_margin,
        )
        refusal = check_offer(offer, policy)
        if refusal is not None:
            self._logs.log(
                logging.WARNING,
                f"refused-{refusal.reason}",
                "refused %s from %s: %s",
                offer.name,
                peer,
                refusal.detail,
            )
            self.refuse(peer, refusal)
            self.outcomes.done(
                offer.transfer_id,
                {
                    "id": offer.transfer_id.hex(),
                    "direction": "receive",
                    "name": offer.name,
                    "size": offer.size,
                    "peers": [peer],
                    "state": "refused",
                    "reason": refusal.reason,
                    "detail": refusal.detail,
                    "started_at": now,
                    "finished_at": now,
                },
            )
            return
        tid = offer.transfer_id
        part = f".{tid.hex()}{PART_SUFFIX}"
        try:
            fd = create_part(directory, dirfd, part)
        except (UnsafeInbox, OSError) as exc:
            self._inbox_refused(peer, tid, directory, exc)
            return
        try:
            reserve(fd, offer.size)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=dirfd)
            host.transmit(
                peer, Abort(tid, "no-space", f"cannot reserve the space: {exc.strerror}").encode()
            )
            return
        try:
            i, follower = await self._prepare(
                peer=peer,
                offer=offer,
                identity=identity,
                directory=directory,
                dirfd=dirfd,
                fd=fd,
                now=now,
            )
        except (PeerdError, OSError) as exc:
            # The record could not be written, or a local step failed: the sender learns it now
            # rather than at its answer deadline, and the part goes (no record names it).
            self._drop_unkept(tid, fd)
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=dirfd)
            host.transmit(peer, Abort(tid, "receiver-error", "cannot start receiving").encode())
            self._logs.log(
                logging.ERROR, "accept-error", "cannot accept %s from %s: %s", offer.name, peer, exc
            )
            return
        except BaseException:
            # Cancelled (shutdown): its part is left to resume (if its record was written) or
            # to the orphan sweep.
            self._drop_unkept(tid, fd)
            raise
        i.direct = self._direct(dirfd, part, fd, offer.chunk_size)  # no await until it is kept
        self.inc[tid] = i  # from here the transfer's end closes its descriptors
        taken.append(i)
        self.outcomes.stats.started["receive"] += 1
        self.outcomes.stats.bytes_reused += i.reused
        await self._start(i)
        for frame in self.early.take(tid):
            self._on_payload(i, frame)
        if follower is not None:
            host.spawn(self._follow(i, follower), name=f"recipe {tid.hex()[:8]}")
        log_event(
            log,
            "transfer.start",
            id=tid.hex(),
            direction="receive",
            name=offer.name,
            bytes=offer.size,
            peer=peer,
        )

    def _drop_unkept(self, tid: bytes, fd: int) -> None:
        """What an accept that did not keep its transfer opened: nothing else closes it."""
        with contextlib.suppress(OSError):
            os.close(fd)
        self.recipes.discard(tid)

    async def _prepare(
        self,
        *,
        peer: str,
        offer: Offer,
        identity: bytes,
        directory: Path,
        dirfd: int,
        fd: int,
        now: float,
    ) -> tuple[Incoming, Follower | None]:
        """From a reserved part to a recorded transfer, not yet kept: the caller owns `fd`
        until it keeps the transfer."""
        host = self.host
        tid = offer.transfer_id
        part = f".{tid.hex()}{PART_SUFFIX}"
        temp = directory / part
        stream = None
        if host.config.receive.deltas:
            await self.late.settled(peer)  # the last file's chunks, if they just came
            stream = self.recipes.claim(peer, tid)
        follower = None
        held: list[tuple[int, int]] = []
        if stream is not None:
            # The parts there now are looked up before the Accept, so the early chunk and the
            # first credit go as far as they reach; the rest follow the transfer (_follow).
            follower = Follower(
                self.index,
                stream,
                tid=tid,
                part_fd=fd,  # until _follow has its own
                size=offer.size,
                chunk_size=offer.chunk_size,
            )
            # Accept once the parts reach a window (or the whole file), bounded.
            held = await follower.apply_until(
                min(self.config.window, offer.chunk_count), ACCEPT_REACH_WAIT, offer.name
            )
        else:
            self.recipes.discard(tid)
        machine = ReceiverTransfer(
            offer,
            sender=peer,
            sender_key=identity,
            now=now,
            config=self.config,
            held=held,
            start_window=self._windows.get(peer),
            reach=None if follower is None else follower.reach,
        )
        if follower is not None:
            # The sender's report ("90% already at bob"); what it may skip is in the Accept.
            host.transmit(peer, Have(tid, follower.held_bytes).encode())
        i = Incoming(
            tid=tid,
            machine=machine,
            sender=peer,
            name=offer.name,
            size=offer.size,
            temp=temp,
            directory=directory,
            fd=fd,
            dirfd=dirfd,
            topic=host.topics.transfer(peer, tid),
            buf=bytearray(offer.chunk_size),
            started_at=now,
            reused=0 if follower is None else follower.held_bytes,
        )
        i.done = asyncio.get_running_loop().create_future()
        await self.records.add_receive(
            tid,
            sender=peer,
            name=offer.name,
            size=offer.size,
            directory=str(directory),
            temp=str(temp),
            now=now,
        )
        return i, follower

    async def _follow(self, i: Incoming, f: Follower) -> None:
        """The rest of a streamed recipe (SPEC 7.11): each part looked up and copied, then the
        credit extended to it, until the last part (the recipe is then kept, to index the
        file once committed) or until the machine lifts its cap (no part for recipe_wait)."""
        m, tid = i.machine, i.tid
        # Its own descriptor: each copy duplicates it after awaits, when the transfer may have
        # ended (and closed i.fd) and the kernel given that number out again.
        try:
            f.part_fd = os.dup(i.fd)
        except OSError:  # the transfer ended already (its fd closed)
            self.recipes.discard(tid)
            return
        try:
            while m.capped and self.inc.get(tid) is i and not f.broken:
                if not await f.wait(self.config.recipe_wait):
                    i.wake.set()  # the machine's timer lifts the cap
                    continue
                before = f.held_bytes
                held = await f.apply()
                m.extend(held, f.reach, time.time())
                i.wake.set()
                if f.held_bytes != before:
                    self.outcomes.stats.bytes_reused += f.held_bytes - before
                    i.reused = f.held_bytes
                    self.host.transmit(i.sender, Have(tid, f.held_bytes).encode())
            if f.complete and self.inc.get(tid) is i:
                i.recipe = f.recipe()
                await self.index.save_recipe(tid, i.recipe)
        except OSError as exc:
            log.warning("copying local chunks for %s failed: %s", i.name, exc)
            m.extend([], m.offer.chunk_count, time.time())  # the rest is fetched
            i.wake.set()
        finally:
            os.close(f.part_fd)
            self.recipes.discard(tid)
            if f.stale:
                # Indexed files gone or changed: dropped from the index, off the data path.
                await self.index.forget_files(f.stale)

    async def resume(self, row: ActiveRow, snapshot: bytes, now: float) -> None:
        sender = row.peers[0]
        record = self.host.store.view().peer(sender)
        identity = None if record is None else record.identity
        if record is None or identity is None or record.state is not PeerState.TRUSTED:
            raise TransferError(f"the sender {sender} is no longer trusted")
        machine = ReceiverTransfer.restore(
            snapshot, sender_key=identity, now=now, config=self.config
        )
        assert row.temp is not None
        temp, directory = Path(row.temp), Path(row.path)
        recipe = await self.index.load_recipe(row.tid)  # before anything is opened
        dirfd = open_inbox(directory.parent, directory.name)
        try:
            fd = os.open(temp.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except BaseException:
            os.close(dirfd)
            raise
        i = Incoming(
            tid=row.tid,
            machine=machine,
            sender=sender,
            name=row.name,
            size=row.size,
            temp=temp,
            directory=directory,
            fd=fd,
            dirfd=dirfd,
            topic=self.host.topics.transfer(sender, row.tid),
            buf=bytearray(machine.offer.chunk_size),
            started_at=row.created,
            direct=self._direct(dirfd, temp.name, fd, machine.offer.chunk_size),
            recipe=recipe,
        )
        i.done = asyncio.get_running_loop().create_future()
        self.inc[row.tid] = i
        await self._start(i)
        log_event(log, "transfer.resume", id=row.tid.hex(), direction="receive", peer=sender)

    def _direct(self, dirfd: int, name: str, fd: int, chunk_size: int) -> DirectWrites | None:
        if not self.host.config.receive.direct_writes:
            return None
        return DirectWrites.open(dirfd, name, fd, chunk_size, self.held)

    async def _start(self, i: Incoming) -> None:
        # The SUBSCRIBE goes out before the Accept, on the same connection, and a broker handles
        # one connection's packets in order: the sender's first chunks, which follow the Accept,
        # find the subscription in place. Waiting for the SUBACK as well would cost every
        # transfer a round trip to the broker before its first chunk (issue 13). Both clients
        # write the SUBSCRIBE in the first step of the call, which the yield below lets run.
        self.host.spawn(self._subscribe(i), name=f"subscribe {i.tid.hex()[:8]}")
        await asyncio.sleep(0)
        i.task = self.host.spawn(self._loop(i), name=f"receive {i.tid.hex()[:8]}")

    async def _subscribe(self, i: Incoming) -> None:
        try:
            sub = await self.host.link.subscribe(i.topic, qos=0, handler=partial(self._on_frame, i))
        except BrokerError as exc:
            log.error("transfer %s: cannot subscribe to its chunks: %s", i.tid.hex(), exc)
            i.machine.abort("receiver-error", "cannot subscribe to the transfer's chunks")
            i.wake.set()
            return
        if self.inc.get(i.tid) is not i:  # ended meanwhile
            with contextlib.suppress(BrokerError):
                await sub.close()
            return
        i.sub = sub

    # -- hooks -------------------------------------------------------------------------------

    def trust_changed(self) -> None:
        """A revoked or blocked sender sends us no more."""
        view = self.host.store.view()
        for i in self.inc.values():
            record = view.peer(i.sender)
            if record is not None and record.state in (PeerState.REVOKED, PeerState.BLOCKED):
                i.machine.abort(record.state.value, f"the sender is {record.state.value}")
                i.wake.set()
        # What was received from them is no longer offered to them as a base for deltas.
        gone = [
            p.peer_id for p in view.peers() if p.state in (PeerState.REVOKED, PeerState.BLOCKED)
        ]
        if gone:
            self.host.spawn(self.index.forget_senders(gone), name="forget chunks")

    def cancel(self, i: Incoming) -> None:
        i.machine.abort("cancelled", "cancelled by the receiver's user")
        i.wake.set()

    def peers_with_work(self) -> set[str]:
        return {i.sender for i in self.inc.values()}

    def tasks(self) -> list[asyncio.Task[None]]:
        return [i.task for i in self.inc.values() if i.task]

    def close_files(self) -> None:
        for i in self.inc.values():
            i.close_files()

    # -- chunks and the machine's actions ----------------------------------------------------

    # -- early chunks: sent with the Offer, before the Accept ------------------------------

    async def listen_early(self) -> None:
        """Subscribe, for the daemon's life, to the early chunks any sender sends this node."""
        host = self.host
        try:
            await host.link.subscribe(
                host.topics.early_filter(host.peer_id), qos=0, handler=self._on_early
            )
        except BrokerError as exc:  # early chunks then come again after the Accept
            log.warning("cannot subscribe to early chunks: %s", exc)

    def _on_early(self, msg: Message) -> None:
        sender = msg.topic.rsplit("/", 2)[-2]
        try:
            tid = parse_chunk_header(msg.payload).transfer_id
        except RemoteProtocolError as exc:
            self.frames_rejected += 1
            self.host.count_rejection(f"chunk-{exc.reason}")
            return
        i = self.inc.get(tid)
        if i is not None:
            if i.sender == sender:
                self._on_frame(i, msg)
            else:
                self.frames_rejected += 1
                self.host.count_rejection("chunk-wrong-sender")
            return
        # Not accepted yet (the Offer may still be on its way through the session).
        if not self.early.keep(sender, tid, msg.payload, time.monotonic()):
            self.host.count_rejection("chunk-early-dropped")

    def _on_frame(self, i: Incoming, msg: Message) -> None:
        self._on_payload(i, msg.payload)

    def _on_payload(self, i: Incoming, payload: bytes | bytearray | memoryview) -> None:
        m = i.machine
        d = i.direct
        slot = None if d is None else d.buffer()
        try:
            w = m.on_frame(payload, i.buf if slot is None else slot, time.time())
        except RemoteProtocolError as exc:
            self.frames_rejected += 1
            self.host.count_rejection(f"chunk-{exc.reason}")
            return
        if w is not None:
            try:
                # Held for the next Sync's O_DIRECT write, or written through the page cache.
                if d is None or not d.keep(w.index, w.offset, w.data):
                    os.pwrite(i.fd, w.data, w.offset)
            except OSError as exc:
                m.abort("receiver-error", f"writing failed: {exc.strerror}")
            i.received += 1
            self.outcomes.stats.chunks_received += 1
            self.outcomes.stats.bytes_received += len(w.data)
        if m.has_actions():
            i.wake.set()

    async def _loop(self, i: Incoming) -> None:
        m = i.machine
        while True:
            await self._actions(i)
            if i.done is not None and i.done.done():
                return
            now = time.time()
            if (d := m.next_deadline()) is not None and d <= now:
                m.on_timer(now)
                continue
            i.wake.clear()
            if m.has_actions():
                continue
            delay = 1.0 if d is None else min(max(d - now, 0.0), 1.0)
            await wait_set(i.wake, max(delay, 0.001))

    async def _actions(self, i: Incoming) -> None:
        while actions := i.machine.take_actions():
            await self._batch(i, actions)

    async def _batch(self, i: Incoming, actions: list[Any]) -> None:
        m = i.machine
        for a in actions:
            if isinstance(a, SendControl):
                self.host.transmit(i.sender, a.message.encode())
            elif isinstance(a, Persist):
                await self.records.persist(i.tid, a.snapshot)
            elif isinstance(a, Sync):
                self._spawn_sync(i, a)
            elif isinstance(a, ReadChunk):
                held = None if i.direct is None else i.direct.read(a.index)
                data = os.pread(i.fd, a.length, a.offset) if held is None else held
                m.on_read(a, data, time.time())
                i.wake.set()
            elif isinstance(a, Progress):
                self._event(i, "transfer.progress", bytes=a.bytes)
            elif isinstance(a, Commit):
                await self._commit(i, a.manifest.manifest.file_hash)
            elif isinstance(a, TransferFailed):
                await self._fail(i, a)

    def _spawn_sync(self, i: Incoming, sync: Sync) -> None:
        # The chunks held so far are this sync's to write: every write handed out before it,
        # and perhaps a few since, which is no harm (SPEC 7.10).
        batch = None if i.direct is None else i.direct.take()

        async def do() -> None:
            try:
                direct = await write_and_sync(i.fd, i.direct, batch)
            except OSError as exc:
                i.machine.abort("receiver-error", f"writing or fdatasync failed: {exc.strerror}")
            else:
                self.outcomes.stats.chunks_direct += direct
                i.machine.on_synced(sync, time.time())
            i.wake.set()

        self.host.spawn(do(), name=f"sync {i.tid.hex()[:8]}")

    # -- the end -----------------------------------------------------------------------------

    async def _commit(self, i: Incoming, file_hash: bytes) -> None:
        m = i.machine
        now = time.time()
        if is_safetensors_name(i.name):
            problem = await self._check_safetensors(i)
            if problem is not None:
                log_event(
                    log,
                    "transfer.refused",
                    logging.WARNING,
                    id=i.tid.hex(),
                    peer=i.sender,
                    reason="bad-safetensors",
                    detail=problem,
                )
                m.abort("bad-safetensors", problem)
                await self._actions(i)
                return
        try:
            final = i.directory / commit_file(i.fd, i.dirfd, i.temp.name, i.name)
        except OSError as exc:
            m.abort("receiver-error", f"committing failed: {exc.strerror}")
            await self._actions(i)
            return
        i.final = final
        m.committed(now)
        await self.records.update(
            i.tid,
            state="verified",
            path=str(final),
            temp_path=None,
            snapshot=None,
            finished_at=now,
            file_hash=file_hash,
        )
        await self._actions(i)  # the Verified to the sender
        if i.recipe is not None:
            try:
                await self.index.add_file(i.sender, final, i.recipe)
            except OSError as exc:
                log.warning("not indexing %s for deltas: %s", final, exc)
            await self.index.drop_recipe(i.tid)
        elif self.host.config.receive.deltas and i.size >= MIN_DELTA_SIZE:
            self.late.expect(i.tid, i.sender, final, now)
        await self._end(i, "verified")

    async def _check_safetensors(self, i: Incoming) -> str | None:
        """The header check in a worker thread (a 16 MiB header of many tensors is CPU work the
        event loop must not wait for), one at a time (each costs memory up to the caps). The
        thread owns a duplicate of the fd: the transfer may end, and its fd close, meanwhile."""
        async with self._header_checks:
            fd = os.dup(i.fd)
            job = asyncio.get_running_loop().run_in_executor(None, safetensors_problem, fd, i.size)
            # Shielded: a cancelled caller must not cancel a job that has not started yet, or
            # nobody would close its fd; the job runs (bounded by the caps) and closes it.
            return await asyncio.shield(job)

    async def _fail(self, i: Incoming, failed: TransferFailed) -> None:
        with contextlib.suppress(OSError):
            os.unlink(i.temp.name, dir_fd=i.dirfd)
        await self.records.update(
            i.tid,
            state="cancelled" if failed.reason == "cancelled" else "failed",
            reason=failed.reason,
            detail=failed.detail,
            snapshot=None,
            temp_path=None,
            finished_at=time.time(),
        )
        if i.recipe is not None:
            await self.index.drop_recipe(i.tid)
        if not failed.remote and failed.reason in COUNTED_FAILURES:
            # This node refused the file itself: forged chunks (a co-receiver holds the content
            # key), a bad Seal, bad content, or a sender that went quiet and held the slot.
            # Counted so an operator sees the attack.
            self.host.count_rejection(f"transfer-failed-{failed.reason}")
        await self._end(i, "failed", reason=failed.reason, detail=failed.detail)

    async def _end(self, i: Incoming, state: str, **extra: Any) -> None:
        self.inc.pop(i.tid, None)
        self._windows.pop(i.sender, None)  # most recent last: the oldest is dropped first
        self._windows[i.sender] = i.machine.window
        credit = i.machine.credit
        log.debug(
            "transfer %s: window %d chunks, round trip %s, delivery rate %.1f MB/s",
            i.tid.hex(),
            credit.window,
            "unmeasured" if credit.min_rtt is None else f"{credit.min_rtt * 1e3:.0f} ms",
            credit.rate / 1e6,
        )
        if len(self._windows) > REMEMBERED_PATHS:
            del self._windows[next(iter(self._windows))]
        i.close_files()
        if i.sub is not None:
            with contextlib.suppress(BrokerError):
                await i.sub.close()
        result = self.describe(i)
        result.update(state=state, finished_at=time.time(), **extra)
        if i.done is not None and not i.done.done():
            i.done.set_result(result)
        self.outcomes.done(i.tid, result)

    def _event(self, i: Incoming, name: str, **data: Any) -> None:
        self.host.publish_event(
            name, {"id": i.tid.hex(), "direction": "receive", "peer": i.sender, **data}
        )

    def describe(self, i: Incoming) -> dict[str, Any]:
        return {
            "id": i.tid.hex(),
            "direction": "receive",
            "name": i.name,
            "path": str(i.final) if i.final else None,
            "size": i.size,
            "peers": [i.sender],
            "state": "active",
            "bytes": i.machine.durable_chunks * i.machine.offer.chunk_size
            if i.final is None
            else i.size,
            "started_at": i.started_at,
            "reused_bytes": i.reused,
        }
