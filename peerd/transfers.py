"""File transfers: the daemon's shell around `protocol.transfer`'s state machines.

Sending: the file is read chunk by chunk into one reused buffer, sealed into one reused frame
buffer and published once to the transfer's topic, which every receiver subscribes to; the
state machine decides what to read next from the receivers' credit and acknowledgements, which
arrive inside the Noise sessions. The file's size, mtime and inode are watched: a change aborts.

Receiving: an Offer from a trusted peer is checked against the receive policy (size limit, free
space), space is reserved with fallocate, and chunks are decrypted into one reused buffer and
written at their offsets of a temporary file in the sender's inbox directory. Progress is
acknowledged only after fdatasync (the machine asks for it), the resumable state goes to the
store before anything that depends on it is sent, and the final file appears under its name only
after every chunk is durable, the whole-file hash and the sender's signature check out, and (for
`.safetensors`) the header is valid: fsync, link into place without clobbering, fsync the
directory. The content key is erased from the store when the transfer ends.

Memory per transfer is two chunk-sized buffers and the machines' window bookkeeping, whatever
the file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.control import Connection, optional, require
from peerd.errors import PeerdError, UsageError
from peerd.events import LogBudget
from peerd.mqtt import BrokerError, Message, Subscription
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.identity import TrustError, parse_peer_id
from protocol.identity.trust import PeerState
from protocol.safetensors import (
    SafetensorsError,
    header_length,
    is_safetensors_name,
    parse_header,
)
from protocol.transfer import (
    PEER_FAULTS,
    Abort,
    Accepted,
    Commit,
    ControlMessage,
    Finished,
    Offer,
    Persist,
    Progress,
    ReadChunk,
    ReceivePolicy,
    ReceiverFailed,
    ReceiverTransfer,
    ReceiverVerified,
    Refuse,
    Seal,
    Sealed,
    SendControl,
    SenderTransfer,
    Sync,
    TransferConfig,
    TransferFailed,
    Verified,
    check_offer,
    describe,
    numbered_name,
)
from protocol.transfer.chunks import frame_buffer
from protocol.transfer.messages import decode_message

if TYPE_CHECKING:
    from peerd.daemon import Daemon

log = logging.getLogger("peerd.transfers")

# Reasons for which a receiver itself refuses a file it has received in full.
CONTENT_REJECTIONS = frozenset(
    {"hash-mismatch", "bad-signature", "manifest-mismatch", "bad-content", "bad-safetensors"}
)
# Reasons for which a receiver ends a transfer because of what its sender did (or did not do):
# counted as rejections, so an operator sees forged content and senders that go quiet.
COUNTED_FAILURES = CONTENT_REJECTIONS | {"timeout"}
PART_SUFFIX = ".part"
# `.<transfer id in hex>.part`: the temporary files this shell creates, and the only ones the
# start-up sweep removes.
_PART_NAME = re.compile(r"\.[0-9a-f]{32}\.part")
KEEP_FINISHED = 24 * 3600.0  # finished transfers are listed (and late Seals answered) this long
YIELD_EVERY = 4  # chunks published before the sender lets the event loop read acknowledgements


class TransferError(PeerdError):
    """A transfer could not be started or failed."""


@dataclass(eq=False)
class _Outgoing:
    tid: bytes
    machine: SenderTransfer
    path: Path
    fd: int
    stat: tuple[int, int, int, int]  # size, mtime_ns, inode, device
    topic: str
    receivers: list[str]
    started_at: float
    deadline: float | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[dict[str, Any]] | None = None
    progress: dict[str, int] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Incoming:
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
    sub: Subscription | None = None
    syncing: bool = False
    received: int = 0
    task: asyncio.Task[None] | None = None
    final: Path | None = None


def _stat_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _stat_tuple(values: list[int]) -> tuple[int, int, int, int]:
    size, mtime, ino, dev = values
    return (size, mtime, ino, dev)


class Transfers:
    """Plugged into the daemon: control methods, session hooks and one task per transfer."""

    def __init__(self, daemon: Daemon, config: TransferConfig | None = None) -> None:
        self.d = daemon
        self.config = config or TransferConfig(idle_timeout=daemon.config.receive.idle_timeout)
        self.out: dict[bytes, _Outgoing] = {}
        self.inc: dict[bytes, _Incoming] = {}
        self.finished: dict[bytes, dict[str, Any]] = {}  # recent outcomes, for wait/list
        self._done_event = asyncio.Event()
        self.counters: dict[str, int] = {
            "frames-rejected": 0,
            "control-rejected": 0,
            "orphans-removed": 0,
        }
        self._header_checks = asyncio.Semaphore(1)
        # Lines a peer's offers can cause (a trusted sender may repeat an offer every probe).
        self._logs = LogBudget(log)
        self._accepting: set[bytes] = set()  # offers being accepted (their records not yet made)
        self._stopping = False
        daemon._extensions.append(self)
        self._register()

    # -- daemon hooks ------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume what was under way when the daemon stopped, then expire old records."""
        await self._resume()
        await self._sweep()
        while True:
            await asyncio.sleep(3600)
            await self.d.store.fetchall("SELECT 1")  # keeps the loop honest about the store
            cutoff = time.time() - KEEP_FINISHED
            for tid, rec in list(self.finished.items()):
                if rec.get("finished_at", 0) < cutoff:
                    del self.finished[tid]

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t.task for t in self.out.values() if t.task]
        tasks += [t.task for t in self.inc.values() if t.task]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for o in self.out.values():
            os.close(o.fd)
        for i in self.inc.values():
            os.close(i.fd)
            os.close(i.dirfd)

    def reload(self, config: Any) -> None:
        """SIGHUP: transfers that start from now on use the new idle deadline."""
        self.config = dataclasses.replace(self.config, idle_timeout=config.receive.idle_timeout)

    def peers_with_work(self) -> set[str]:
        peers = {p for o in self.out.values() for p in o.receivers}
        return peers | {i.sender for i in self.inc.values()}

    async def session_up(self, peer: str) -> None:
        now = time.time()
        for o in self.out.values():
            if peer in o.receivers:
                o.machine.peer_reachable(peer, now)
                o.wake.set()

    def session_down(self, peer: str, reason: str) -> None:
        return None  # the machines' timers re-probe; nothing is lost by waiting

    def trust_changed(self) -> None:
        """A revoked or blocked peer gets no more of any file, and sends us no more."""
        view = self.d.store.view()
        for o in self.out.values():
            for peer in o.receivers:
                record = view.peer(peer)
                if record is not None and record.state in (PeerState.REVOKED, PeerState.BLOCKED):
                    with contextlib.suppress(LocalProtocolError):
                        o.machine.remove_receiver(peer, record.state.value)
                    o.wake.set()
        for i in self.inc.values():
            record = view.peer(i.sender)
            if record is not None and record.state in (PeerState.REVOKED, PeerState.BLOCKED):
                i.machine.abort(record.state.value, f"the sender is {record.state.value}")
                i.wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "transfers": {
                "sending": len(self.out),
                "receiving": len(self.inc),
                "active": len(self.out) + len(self.inc),
                **{k: v for k, v in self.counters.items() if v},
            }
        }

    def on_control(self, peer: str, raw: bytes) -> None:
        """A transfer control message from `peer`'s session (synchronous, in the read path)."""
        try:
            msg = decode_message(raw)
        except RemoteProtocolError as exc:
            self._reject(exc.reason, peer, str(exc))
            return
        tid = msg.transfer_id
        o = self.out.get(tid)
        if o is not None:
            try:
                o.machine.receive(peer, msg, time.time())
            except RemoteProtocolError as exc:
                self._reject(exc.reason, peer, str(exc))
            o.wake.set()
            return
        i = self.inc.get(tid)
        if i is not None:
            if peer != i.sender:
                self._reject("not-the-sender", peer, "a message about another peer's transfer")
                return
            try:
                i.machine.receive(msg, time.time())
            except RemoteProtocolError as exc:
                self._reject(exc.reason, peer, str(exc))
            i.wake.set()
            return
        self.d._queue(lambda: self._unknown_transfer(peer, msg))

    def _reject(self, reason: str, peer: str | None, detail: str) -> None:
        self.counters["control-rejected"] += 1
        self.d.sessions.rejections[f"transfer-{reason}"] += 1
        log.debug("transfer message from %s rejected (%s): %s", peer, reason, detail)

    def _refuse(self, peer: str, message: Abort | Refuse) -> None:
        """Answer an Offer (or a message for no transfer) with a refusal, and count it: an
        operator sees offers refused by policy, and probes for transfers that do not exist."""
        self.d.sessions.rejections[f"transfer-refused-{message.reason}"] += 1
        self.d._transmit(peer, message.encode())

    async def _unknown_transfer(self, peer: str, msg: ControlMessage) -> None:
        tid = msg.transfer_id
        if tid in self.inc or tid in self.out:
            self.on_control(peer, msg.encode())  # it started while this waited in the queue
            return
        if tid in self._accepting:
            return  # the same offer again, while the first is being accepted
        row = await self.d.store.fetchone(
            "SELECT role, peers, state, file_hash FROM transfers WHERE transfer_id = ?", (tid,)
        )
        if row is not None:
            role, peers, state, file_hash = row
            if role == "receive" and json.loads(peers) == [peer]:
                if state == "verified" and isinstance(msg, Offer | Seal):
                    self.d._transmit(peer, Verified(tid, file_hash).encode())
                elif not isinstance(msg, Abort):
                    self.d._transmit(peer, Abort(tid, "cancelled", "already ended").encode())
            return
        if isinstance(msg, Offer):
            await self._accept_offer(peer, msg)
        elif not isinstance(msg, Abort):
            self._refuse(peer, Abort(tid, "unknown-transfer", ""))

    # -- sending -----------------------------------------------------------------------------

    async def send(
        self, path: Path, receivers: list[str], *, answer_within: float | None = None
    ) -> dict[str, Any]:
        """Offer the file at `path` (absolute) to `receivers`; those that have not accepted
        within `answer_within` seconds (if given) are dropped with reason "timeout"."""
        most = self.d.config.limits.active_sends
        if len(self.out) >= most:
            raise TransferError(
                f"{most} transfers are already being sent",
                hint="wait for one to finish, or raise [limits] active_sends",
            )
        view = self.d.store.view()
        for peer in receivers:
            record = view.peer(peer)
            # A trusted peer, or (with an authority) a member met at its first handshake.
            if not view.is_trusted(peer) and not (record is None and view.could_accept(peer)):
                state = "unknown" if record is None else record.state.value
                raise TrustError(
                    f"peer {peer} is {state}; files go only to trusted peers",
                    reason="not-trusted",
                    hint="pair with it first (peerd invite / peerd join)",
                )
        fd, st = _open_source(path)
        try:
            now = time.time()
            machine = SenderTransfer(
                name=path.name,
                size=st.st_size,
                receivers=receivers,
                sender=self.d.peer_id,
                signing_key=self.d.keys.signing_key(),
                now=now,
                config=self.config,
            )
        except BaseException:
            os.close(fd)
            raise
        tid = machine.transfer_id
        o = _Outgoing(
            tid=tid,
            machine=machine,
            path=path,
            fd=fd,
            stat=_stat_of(st),
            topic=self.d.topics.transfer(self.d.peer_id, tid),
            receivers=list(dict.fromkeys(receivers)),
            started_at=now,
            deadline=None if answer_within is None else now + answer_within,
        )
        o.done = asyncio.get_running_loop().create_future()
        async with self.d.store.transaction(now) as tx:
            await tx.execute(
                "INSERT INTO transfers (transfer_id, role, peers, name, size, path, state,"
                " source_stat, created_at, updated_at, deadline)"
                " VALUES (?, 'send', ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (
                    tid,
                    json.dumps(o.receivers),
                    path.name,
                    st.st_size,
                    str(path),
                    json.dumps(o.stat),
                    now,
                    now,
                    o.deadline,
                ),
            )
        self.out[tid] = o
        for peer in o.receivers:
            self.d._connect(peer, now)
        o.task = asyncio.create_task(self._pump(o), name=f"send {tid.hex()[:8]}")
        o.task.add_done_callback(self.d._task_done)
        log.info("sending %s (%d bytes) to %s as %s", path.name, st.st_size, o.receivers, tid.hex())
        return self._describe_out(o)

    async def _pump(self, o: _Outgoing) -> None:
        m = o.machine
        read_buf = bytearray(m.offer.chunk_size)
        read_view = memoryview(read_buf)
        out = frame_buffer(m.offer.chunk_size)
        link = self.d.link
        try:
            while True:
                await self._sender_actions(o)
                if m.finished:
                    return
                now = time.time()
                if o.deadline is not None and now >= o.deadline:
                    self._expire_unaccepted(o)
                if (d := m.next_deadline()) is not None and d <= now:
                    m.on_timer(now)
                sent = 0
                while (r := m.next_read(now)) is not None:
                    problem = self._source_problem(o, sent)
                    if problem:
                        m.source_changed(problem)
                        break
                    n = os.preadv(o.fd, [read_view[: r.length]], r.offset)
                    frame = m.on_chunk_read(r, read_view[:n], out)
                    if frame is not None:
                        await link.publish(o.topic, frame, qos=0)
                    sent += 1
                    if sent % YIELD_EVERY == 0:
                        if m.has_actions():
                            await self._sender_actions(o)
                        await asyncio.sleep(0)  # let acknowledgements in
                        now = time.time()
                if sent:
                    continue
                o.wake.clear()
                await self._sender_actions(o)
                if o.machine.finished:
                    return
                d = m.next_deadline()
                delay = 1.0 if d is None else min(max(d - time.time(), 0.0), 1.0)
                if o.deadline is not None:
                    delay = min(delay, max(o.deadline - time.time(), 0.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(o.wake.wait(), max(delay, 0.001))
        except BrokerError as exc:
            log.error("transfer %s: the broker link failed: %s", o.tid.hex(), exc)
            m.cancel("broker", str(exc))
            await self._sender_actions(o)
        except OSError as exc:
            log.error("transfer %s: reading %s failed: %s", o.tid.hex(), o.path, exc)
            m.source_changed(f"read error: {exc.strerror}")
            await self._sender_actions(o)

    def _source_problem(self, o: _Outgoing, sent: int) -> str | None:
        st = _stat_of(os.fstat(o.fd))
        if st[:2] != o.stat[:2]:
            return "the file changed while it was being sent (size or modification time)"
        if sent % 64 == 0:
            try:
                on_disk = _stat_of(os.stat(o.path))
            except OSError:
                return "the file was removed while it was being sent"
            if on_disk[2:] != o.stat[2:]:
                return "the file was replaced while it was being sent"
        return None

    def _expire_unaccepted(self, o: _Outgoing) -> None:
        o.deadline = None
        for peer, state in o.machine.receivers().items():
            if state == "offered":
                o.machine.remove_receiver(peer, "timeout", "the receiver did not answer in time")

    async def _sender_actions(self, o: _Outgoing) -> None:
        # Until none is left: control messages that arrive while a Persist is awaited add
        # actions (the final Finished among them) that must not wait for the next wake-up.
        while actions := o.machine.take_actions():
            await self._sender_batch(o, actions)

    async def _sender_batch(self, o: _Outgoing, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, SendControl):
                self.d._transmit(a.peer, a.message.encode())
            elif isinstance(a, Persist):
                await self._persist(o.tid, a.snapshot)
            elif isinstance(a, Progress):
                o.progress[a.peer] = a.bytes
                self._event(o, "transfer.progress", peer=a.peer, bytes=a.bytes)
            elif isinstance(a, Accepted):
                self._event(o, "transfer.progress", peer=a.peer, bytes=0, accepted=True)
            elif isinstance(a, Sealed):
                await self._update(o.tid, file_hash=a.manifest.manifest.file_hash)
            elif isinstance(a, ReceiverVerified):
                o.outcome[a.peer] = "verified"
                o.progress[a.peer] = o.machine.offer.size
                self._event(
                    o, "transfer.progress", peer=a.peer, bytes=o.machine.offer.size, verified=True
                )
            elif isinstance(a, ReceiverFailed):
                o.outcome[a.peer] = f"failed: {a.reason}"
                if not a.remote and a.reason in PEER_FAULTS:
                    # This side dropped the receiver for what it did (broke the protocol, asked
                    # for more re-sends than the budget): counted against that peer.
                    self.d.sessions.rejections[f"transfer-dropped-{a.reason}"] += 1
                log.warning(
                    "transfer %s to %s failed: %s (%s)", o.tid.hex(), a.peer, a.reason, a.detail
                )
                self._event(
                    o,
                    "transfer.progress",
                    peer=a.peer,
                    failed=a.reason,
                    detail=a.detail or describe(a.reason),
                )
            elif isinstance(a, Finished):
                await self._finish_out(o, a)

    async def _finish_out(self, o: _Outgoing, fin: Finished) -> None:
        state = "failed" if fin.failed else "verified"
        if (
            fin.failed
            and all(o.outcome.get(p, "").endswith("cancelled") for p in fin.failed)
            and not fin.verified
        ):
            state = "cancelled"
        reasons = {p: o.outcome.get(p, "") for p in fin.failed}
        await self._update(
            o.tid,
            state=state,
            snapshot=None,
            finished_at=time.time(),
            reason=json.dumps(reasons) if reasons else None,
        )
        self.out.pop(o.tid, None)
        with contextlib.suppress(OSError):
            os.close(o.fd)
        result = self._describe_out(o)
        result["state"] = state
        result["finished_at"] = time.time()
        self.finished[o.tid] = result
        if o.done is not None and not o.done.done():
            o.done.set_result(result)
        self._done_event.set()
        self._done_event = asyncio.Event()
        self.d._publish_event("transfer.done", result)
        log.info("transfer %s finished: %s", o.tid.hex(), state)

    def _describe_out(self, o: _Outgoing) -> dict[str, Any]:
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
                }
                for p in o.receivers
            },
            "state": "active",
            "started_at": o.started_at,
            "published_bytes": m.published_bytes,
            "resent_frames": m.resent_frames,
        }

    # -- receiving ---------------------------------------------------------------------------

    async def _accept_offer(self, peer: str, offer: Offer) -> None:
        view = self.d.store.view()
        record = view.peer(peer)
        now = time.time()
        identity = None if record is None else record.identity
        if record is None or record.state is not PeerState.TRUSTED or identity is None:
            self._refuse(peer, Abort(offer.transfer_id, "not-trusted", "not a trusted peer"))
            return
        if len(self.inc) >= self.d.config.limits.active_receives:
            self._refuse(peer, Abort(offer.transfer_id, "busy", "too many transfers at once"))
            return
        directory = self.d.config.node.inbox_dir / peer
        try:
            dirfd = _open_inbox(self.d.config.node.inbox_dir, peer)
        except (UnsafeInbox, OSError) as exc:
            self._inbox_refused(peer, offer.transfer_id, directory, exc)
            return
        taken: list[_Incoming] = []  # the transfer that took over dirfd, if one started
        self._accepting.add(offer.transfer_id)
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
            self._accepting.discard(offer.transfer_id)
            if not taken:
                os.close(dirfd)

    def _inbox_refused(
        self, peer: str, tid: bytes, directory: Path, exc: UnsafeInbox | OSError
    ) -> None:
        # The peer learns only that this side failed; the path stays in the local log.
        self.d._transmit(peer, Abort(tid, "receiver-error", "the inbox is not usable").encode())
        if isinstance(exc, UnsafeInbox):
            self.d.sessions.rejections["transfer-inbox-unsafe"] += 1
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
        taken: list[_Incoming],
    ) -> None:
        cfg = self.d.config.receive
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
            self._refuse(peer, refusal)
            refused: dict[str, Any] = {
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
            }
            self.finished[offer.transfer_id] = refused
            self.d._publish_event("transfer.done", refused)
            return
        tid = offer.transfer_id
        part = f".{tid.hex()}{PART_SUFFIX}"
        temp = directory / part
        try:
            # O_EXCL | O_NOFOLLOW: a name planted in the inbox (a symlink, a file) is refused,
            # never written through; the transfer id is fresh, so a clean inbox has no such name.
            fd = os.open(
                part,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o640,
                dir_fd=dirfd,
            )
        except OSError as exc:
            planted = exc.errno in (errno.EEXIST, errno.ELOOP)
            problem = UnsafeInbox(f"{temp} exists already (planted?)") if planted else exc
            self._inbox_refused(peer, tid, directory, problem)
            return
        try:
            if offer.size and os.environ.get("PEERD_NO_FALLOC") is None:
                os.posix_fallocate(fd, 0, offer.size)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=dirfd)
            self.d._transmit(
                peer, Abort(tid, "no-space", f"cannot reserve the space: {exc.strerror}").encode()
            )
            return
        machine = ReceiverTransfer(
            offer, sender=peer, sender_key=identity, now=now, config=self.config
        )
        i = _Incoming(
            tid=tid,
            machine=machine,
            sender=peer,
            name=offer.name,
            size=offer.size,
            temp=temp,
            directory=directory,
            fd=fd,
            dirfd=dirfd,
            topic=self.d.topics.transfer(peer, tid),
            buf=bytearray(offer.chunk_size),
            started_at=now,
        )
        taken.append(i)
        i.done = asyncio.get_running_loop().create_future()
        async with self.d.store.transaction(now) as tx:
            await tx.execute(
                "INSERT INTO transfers (transfer_id, role, peers, name, size, path, temp_path,"
                " state, created_at, updated_at) VALUES (?, 'receive', ?, ?, ?, ?, ?, 'active',"
                " ?, ?)",
                (
                    tid,
                    json.dumps([peer]),
                    offer.name,
                    offer.size,
                    str(directory),
                    str(temp),
                    now,
                    now,
                ),
            )
        self.inc[tid] = i
        await self._start_incoming(i)
        log.info("receiving %s (%d bytes) from %s as %s", offer.name, offer.size, peer, tid.hex())

    async def _start_incoming(self, i: _Incoming) -> None:
        # Subscribe before the Accept goes out, so the first chunks are not lost.
        i.sub = await self.d.link.subscribe(i.topic, qos=0, handler=partial(self._on_frame, i))
        i.task = asyncio.create_task(self._receive_loop(i), name=f"receive {i.tid.hex()[:8]}")
        i.task.add_done_callback(self.d._task_done)

    def _on_frame(self, i: _Incoming, msg: Message) -> None:
        m = i.machine
        try:
            w = m.on_frame(msg.payload, i.buf, time.time())
        except RemoteProtocolError as exc:
            self.counters["frames-rejected"] += 1
            self.d.sessions.rejections[f"chunk-{exc.reason}"] += 1
            return
        if w is not None:
            try:
                os.pwrite(i.fd, w.data, w.offset)
            except OSError as exc:
                m.abort("receiver-error", f"writing failed: {exc.strerror}")
            i.received += 1
        if m.has_actions():
            i.wake.set()

    async def _receive_loop(self, i: _Incoming) -> None:
        m = i.machine
        while True:
            await self._receiver_actions(i)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(i.wake.wait(), max(delay, 0.001))

    async def _receiver_actions(self, i: _Incoming) -> None:
        while actions := i.machine.take_actions():
            await self._receiver_batch(i, actions)

    async def _receiver_batch(self, i: _Incoming, actions: list[Any]) -> None:
        m = i.machine
        for a in actions:
            if isinstance(a, SendControl):
                self.d._transmit(i.sender, a.message.encode())
            elif isinstance(a, Persist):
                await self._persist(i.tid, a.snapshot)
            elif isinstance(a, Sync):
                self._spawn_sync(i, a)
            elif isinstance(a, ReadChunk):
                data = os.pread(i.fd, a.length, a.offset)
                m.on_read(a, data, time.time())
                i.wake.set()
            elif isinstance(a, Progress):
                self._event_in(i, "transfer.progress", bytes=a.bytes)
            elif isinstance(a, Commit):
                await self._commit(i, a.manifest.manifest.file_hash)
            elif isinstance(a, TransferFailed):
                await self._fail_in(i, a)

    def _spawn_sync(self, i: _Incoming, sync: Sync) -> None:
        async def do() -> None:
            try:
                await asyncio.to_thread(os.fdatasync, i.fd)
            except OSError as exc:
                i.machine.abort("receiver-error", f"fdatasync failed: {exc.strerror}")
            else:
                i.machine.on_synced(sync, time.time())
            i.wake.set()

        task = asyncio.ensure_future(do())
        task.add_done_callback(self.d._task_done)

    async def _commit(self, i: _Incoming, file_hash: bytes) -> None:
        m = i.machine
        now = time.time()
        if is_safetensors_name(i.name):
            problem = await self._check_safetensors(i)
            if problem is not None:
                log.warning("refusing %s from %s: %s", i.name, i.sender, problem)
                m.abort("bad-safetensors", problem)
                await self._receiver_actions(i)
                return
        try:
            os.fsync(i.fd)
            final = i.directory / _link_unique(i.dirfd, i.temp.name, i.name)
            os.fsync(i.dirfd)
        except OSError as exc:
            m.abort("receiver-error", f"committing failed: {exc.strerror}")
            await self._receiver_actions(i)
            return
        i.final = final
        m.committed(now)
        await self._update(
            i.tid,
            state="verified",
            path=str(final),
            temp_path=None,
            snapshot=None,
            finished_at=now,
            file_hash=file_hash,
        )
        await self._receiver_actions(i)  # the Verified to the sender
        await self._end_incoming(i, "verified")
        log.info("received %s from %s: verified, %s", i.name, i.sender, final)

    async def _check_safetensors(self, i: _Incoming) -> str | None:
        """The header check in a worker thread (a 16 MiB header of many tensors is CPU work the
        event loop must not wait for), one at a time (each costs memory up to the caps). The
        thread owns a duplicate of the fd: the transfer may end, and its fd close, meanwhile."""
        async with self._header_checks:
            fd = os.dup(i.fd)
            job = asyncio.get_running_loop().run_in_executor(None, _safetensors_problem, fd, i.size)
            # Shielded: a cancelled caller must not cancel a job that has not started yet, or
            # nobody would close its fd; the job runs (bounded by the caps) and closes it.
            return await asyncio.shield(job)

    async def _fail_in(self, i: _Incoming, failed: TransferFailed) -> None:
        with contextlib.suppress(OSError):
            os.unlink(i.temp.name, dir_fd=i.dirfd)
        await self._update(
            i.tid,
            state="cancelled" if failed.reason == "cancelled" else "failed",
            reason=failed.reason,
            detail=failed.detail,
            snapshot=None,
            temp_path=None,
            finished_at=time.time(),
        )
        log.warning(
            "receiving %s from %s failed: %s (%s)", i.name, i.sender, failed.reason, failed.detail
        )
        if not failed.remote and failed.reason in COUNTED_FAILURES:
            # This node refused the file itself: forged chunks (a co-receiver holds the content
            # key), a bad Seal, bad content, or a sender that went quiet and held the slot.
            # Counted so an operator sees the attack.
            self.d.sessions.rejections[f"transfer-failed-{failed.reason}"] += 1
        await self._end_incoming(i, "failed", reason=failed.reason, detail=failed.detail)

    async def _end_incoming(self, i: _Incoming, state: str, **extra: Any) -> None:
        self.inc.pop(i.tid, None)
        with contextlib.suppress(OSError):
            os.close(i.fd)
        with contextlib.suppress(OSError):
            os.close(i.dirfd)
        if i.sub is not None:
            with contextlib.suppress(BrokerError):
                await i.sub.close()
        result = self._describe_in(i)
        result.update(state=state, finished_at=time.time(), **extra)
        self.finished[i.tid] = result
        if i.done is not None and not i.done.done():
            i.done.set_result(result)
        self._done_event.set()
        self._done_event = asyncio.Event()
        self.d._publish_event("transfer.done", result)

    def _describe_in(self, i: _Incoming) -> dict[str, Any]:
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
        }

    # -- store -------------------------------------------------------------------------------

    async def _persist(self, tid: bytes, snapshot: bytes) -> None:
        await self._update(tid, snapshot=snapshot)

    async def _update(self, tid: bytes, **columns: Any) -> None:
        now = time.time()
        sets = ", ".join(f"{k} = ?" for k in columns)
        async with self.d.store.transaction(now) as tx:
            await tx.execute(
                f"UPDATE transfers SET {sets}, updated_at = ? WHERE transfer_id = ?",  # noqa: S608 - column names are ours
                (*columns.values(), now, tid),
            )

    async def _sweep(self) -> None:
        """Remove the `.part` files of no transfer being received (left by a crash between
        creating one and recording it, or by a store restored from a backup): each holds
        reserved space. Off the event loop: an inbox may list many files."""
        root = self.d.config.node.inbox_dir
        found = await asyncio.to_thread(_find_parts, root)
        # Decided here, on the loop, against the transfers of this moment: an offer accepted
        # while the thread listed the inbox has a .part that is no orphan.
        busy = {i.temp.name for i in self.inc.values()}
        busy |= {f".{tid.hex()}{PART_SUFFIX}" for tid in self._accepting}
        removed = size = 0
        for sender, name, n in found:
            if name not in busy and _remove_part(root, sender, name):
                removed += 1
                size += n
        if removed:
            self.counters["orphans-removed"] += removed
            log.warning("removed %d orphaned .part files (%d bytes)", removed, size)

    async def _resume(self) -> None:
        rows = await self.d.store.fetchall(
            "SELECT transfer_id, role, peers, name, size, path, temp_path, snapshot,"
            " source_stat, deadline, created_at FROM transfers WHERE state = 'active'"
        )
        now = time.time()
        for (
            tid,
            role,
            peers,
            name,
            size,
            path,
            temp,
            snapshot,
            source_stat,
            deadline,
            created,
        ) in rows:
            peers = json.loads(peers)
            try:
                if snapshot is None:
                    raise TransferError("no resumable state was recorded")
                if role == "send":
                    await self._resume_send(
                        tid,
                        peers,
                        Path(path),
                        snapshot,
                        source_stat=source_stat,
                        deadline=deadline,
                        created=created,
                        now=now,
                    )
                else:
                    await self._resume_receive(
                        tid,
                        peers[0],
                        snapshot,
                        name=name,
                        size=size,
                        directory=Path(path),
                        temp=Path(temp),
                        created=created,
                        now=now,
                    )
            except (PeerdError, OSError) as exc:
                log.warning("cannot resume transfer %s: %s", tid.hex(), exc)
                # Its .part (if any) is an orphan now: the sweep below removes it.
                await self._update(
                    tid,
                    state="failed",
                    reason="resume-failed",
                    detail=str(exc),
                    snapshot=None,
                    finished_at=now,
                )

    async def _resume_send(
        self,
        tid: bytes,
        peers: list[str],
        path: Path,
        snapshot: bytes,
        *,
        source_stat: str,
        deadline: float | None,
        created: float,
        now: float,
    ) -> None:
        machine = SenderTransfer.restore(
            snapshot, signing_key=self.d.keys.signing_key(), now=now, config=self.config
        )
        fd, _ = _open_source(path)
        o = _Outgoing(
            tid=tid,
            machine=machine,
            path=path,
            fd=fd,
            stat=_stat_tuple(json.loads(source_stat)),
            topic=self.d.topics.transfer(self.d.peer_id, tid),
            receivers=peers,
            started_at=created,
            deadline=deadline,
        )
        o.done = asyncio.get_running_loop().create_future()
        self.out[tid] = o
        if _stat_of(os.fstat(fd)) != o.stat:
            machine.source_changed("the file changed while the daemon was stopped")
        o.task = asyncio.create_task(self._pump(o), name=f"send {tid.hex()[:8]}")
        o.task.add_done_callback(self.d._task_done)
        log.info("resuming sending %s to %s", path.name, peers)

    async def _resume_receive(
        self,
        tid: bytes,
        sender: str,
        snapshot: bytes,
        *,
        name: str,
        size: int,
        directory: Path,
        temp: Path,
        created: float,
        now: float,
    ) -> None:
        record = self.d.store.view().peer(sender)
        identity = None if record is None else record.identity
        if record is None or identity is None or record.state is not PeerState.TRUSTED:
            raise TransferError(f"the sender {sender} is no longer trusted")
        machine = ReceiverTransfer.restore(
            snapshot, sender_key=identity, now=now, config=self.config
        )
        dirfd = _open_inbox(directory.parent, directory.name)
        try:
            fd = os.open(temp.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except BaseException:
            os.close(dirfd)
            raise
        i = _Incoming(
            tid=tid,
            machine=machine,
            sender=sender,
            name=name,
            size=size,
            temp=temp,
            directory=directory,
            fd=fd,
            dirfd=dirfd,
            topic=self.d.topics.transfer(sender, tid),
            buf=bytearray(machine.offer.chunk_size),
            started_at=created,
        )
        i.done = asyncio.get_running_loop().create_future()
        self.inc[tid] = i
        await self._start_incoming(i)
        log.info("resuming receiving %s from %s", name, sender)

    # -- events ------------------------------------------------------------------------------

    def _event(self, o: _Outgoing, name: str, **data: Any) -> None:
        self.d._publish_event(name, {"id": o.tid.hex(), "direction": "send", **data})

    def _event_in(self, i: _Incoming, name: str, **data: Any) -> None:
        self.d._publish_event(
            name, {"id": i.tid.hex(), "direction": "receive", "peer": i.sender, **data}
        )

    # -- control methods ---------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        items = [self._describe_out(o) for o in self.out.values()]
        items += [self._describe_in(i) for i in self.inc.values()]
        items += list(self.finished.values())
        return sorted(items, key=lambda t: t["started_at"])

    async def wait(self, tid: bytes, within: float | None) -> dict[str, Any]:
        known = self.out.get(tid) or self.inc.get(tid)
        if known is None:
            if tid in self.finished:
                return self.finished[tid]
            row = await self.d.store.fetchone(
                "SELECT role, name, path, state, reason FROM transfers WHERE transfer_id = ?",
                (tid,),
            )
            if row is None:
                raise UsageError(f"no transfer {tid.hex()}")
            role, name, path, state, reason = row
            return {
                "id": tid.hex(),
                "direction": role,
                "name": name,
                "path": path,
                "state": state,
                "reason": reason,
            }
        assert known.done is not None
        try:
            return await asyncio.wait_for(asyncio.shield(known.done), within)
        except TimeoutError:
            raise TransferError(
                f"transfer {tid.hex()} did not finish within {within} s",
                hint="it goes on; `peerd transfers` shows it",
            ) from None

    async def received(
        self, *, since: float, peer: str | None, name: str | None, within: float
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + within
        while True:
            for rec in sorted(self.finished.values(), key=lambda r: r["finished_at"]):
                if (
                    rec["direction"] == "receive"
                    and rec["state"] == "verified"
                    and rec["finished_at"] >= since
                    and (peer is None or rec["peers"] == [peer])
                    and (name is None or rec["name"] == name)
                ):
                    return rec
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done_event.wait(), remaining)

    def cancel(self, tid: bytes) -> dict[str, Any]:
        o = self.out.get(tid)
        if o is not None:
            o.machine.cancel("cancelled", "cancelled by the sender's user")
            o.wake.set()
            return {"id": tid.hex(), "cancelled": True}
        i = self.inc.get(tid)
        if i is not None:
            i.machine.abort("cancelled", "cancelled by the receiver's user")
            i.wake.set()
            return {"id": tid.hex(), "cancelled": True}
        raise UsageError(f"no active transfer {tid.hex()}")

    def _register(self) -> None:
        m = self.d.control.method

        @m("v1.send")
        async def _send(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            path = Path(require(params, "path", str))
            to = require(params, "to", list)
            if not to or not all(isinstance(p, str) for p in to):
                raise UsageError("`to` is a non-empty list of peer ids")
            receivers = [parse_peer_id(p) for p in to]
            timeout = optional(params, "timeout", float, None)
            if not path.is_absolute():
                raise UsageError("the path must be absolute (the CLI resolves it)")
            return await self.send(path, receivers, answer_within=timeout)

        @m("v1.transfers")
        async def _list(params: dict[str, Any], conn: Connection) -> list[dict[str, Any]]:
            return self.list()

        @m("v1.transfer.wait")
        async def _wait(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            tid = _tid(require(params, "id", str))
            return await self.wait(tid, optional(params, "timeout", float, None))

        @m("v1.transfer.received")
        async def _received(params: dict[str, Any], conn: Connection) -> dict[str, Any] | None:
            peer = optional(params, "peer", str, None)
            return await self.received(
                since=optional(params, "since", float, 0.0),
                peer=None if peer is None else parse_peer_id(peer),
                name=optional(params, "name", str, None),
                within=min(optional(params, "wait", float, 0.0), 24 * 3600.0),
            )

        @m("v1.cancel")
        async def _cancel(params: dict[str, Any], conn: Connection) -> dict[str, Any]:
            return self.cancel(_tid(require(params, "id", str)))


def _tid(text: str) -> bytes:
    try:
        tid = bytes.fromhex(text)
    except ValueError:
        tid = b""
    if len(tid) != 16:
        raise UsageError(f"{text!r} is not a transfer id (32 hex digits)")
    return tid


class UnsafeInbox(TransferError):
    """The sender's inbox directory, or a name in it, is not this daemon's to write: a symlink,
    someone else's directory, or a name planted before the file arrived."""


def _open_source(path: Path) -> tuple[int, os.stat_result]:
    """Open a file to send. O_NONBLOCK: opening a FIFO would otherwise block (on the event
    loop) until a writer comes; with it the open returns and the fstat refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(
                f"{path} is not a regular file",
                hint="send a regular file (not a FIFO, device, socket or directory)",
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_inbox(root: Path, peer: str) -> int:
    """A directory fd for the inbox of files from `peer`, under `root` (the configured inbox,
    which the operator chose). The per-sender directory is created if missing and must be a
    real directory (not a symlink a local user planted) owned by this user and not writable by
    others; every name in it is then resolved from the fd."""
    root.mkdir(parents=True, exist_ok=True, mode=0o750)
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(peer, 0o750, dir_fd=rootfd)
        try:
            fd = os.open(
                peer, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rootfd
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeInbox(f"{root / peer} is not a directory (a symlink?)") from exc
            raise
    finally:
        os.close(rootfd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWOTH:
        os.close(fd)
        raise UnsafeInbox(f"{root / peer} belongs to uid {st.st_uid} or is writable by others")
    return fd


def _link_unique(dirfd: int, temp: str, name: str) -> str:
    """Give the verified temporary file (`temp`, in the directory `dirfd`) its name without
    ever replacing an existing file: `model.safetensors`, else `model-2.safetensors`,
    `model-3...`, shortened to fit the file system's name limit (see `numbered_name`). link(2)
    fails if the name is taken, so there is no check-then-rename race, and it does not follow
    a symlink planted at either name."""
    try:
        name_max = os.fpathconf(dirfd, "PC_NAME_MAX")
    except OSError:
        name_max = 255
    for n in range(1, 10_000):
        candidate = numbered_name(name, n, name_max=name_max)
        try:
            os.link(temp, candidate, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(temp, dir_fd=dirfd)
        return candidate
    raise OSError(errno.EEXIST, "no free name for the received file")


def _safetensors_problem(fd: int, size: int) -> str | None:
    """Why the safetensors file open at `fd` is malformed, or None. Runs in a worker thread
    and closes `fd` (its own duplicate)."""
    try:
        n = header_length(os.pread(fd, 8, 0), size)
        parse_header(os.pread(fd, 8 + n, 0), size)
    except SafetensorsError as exc:
        return f"malformed safetensors header ({exc.reason}): {exc}"
    except OSError as exc:
        return f"reading the header failed: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def _find_parts(root: Path, most: int = 100_000) -> list[tuple[str, str, int]]:
    """(sender directory, name, size) of the `.<id>.part` regular files under `root/<sender>/`
    (at most `most`); symlinks and other files are not listed."""
    found: list[tuple[str, str, int]] = []
    try:
        rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return found
    try:
        for sender in os.scandir(rootfd):
            if not sender.is_dir(follow_symlinks=False):
                continue
            try:
                dirfd = os.open(
                    sender.name,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=rootfd,
                )
            except OSError:
                continue
            try:
                for entry in os.scandir(dirfd):
                    if _PART_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            size = entry.stat(follow_symlinks=False).st_size
                            found.append((sender.name, entry.name, size))
                            if len(found) >= most:
                                return found
            finally:
                os.close(dirfd)
    finally:
        os.close(rootfd)
    return found


def _remove_part(root: Path, sender: str, name: str) -> bool:
    """Unlink `root/sender/name` without following a symlink at any step; False if it could
    not (gone already, the directory replaced meanwhile)."""
    try:
        dirfd = _open_inbox(root, sender)
    except (UnsafeInbox, OSError):
        return False
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        return False
    finally:
        os.close(dirfd)
    return True


__all__ = ["TransferError", "Transfers"]
