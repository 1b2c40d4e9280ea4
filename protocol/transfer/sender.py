"""The sending side of a transfer: one file, one content key, N receivers.

Each chunk is read once, hashed in order and encrypted once; the frame is published once on the
transfer topic that every receiver subscribes to. Receivers drive the pace: each grants credit
(indices below its `limit`), acknowledges what is durable and re-requests what it missed. The
sender keeps, per receiver, a cursor (everything below it was acknowledged or sent) and a set of
requested repairs, all inside that receiver's window, so memory is O(receivers x window),
independent of the file size.

Fan-out pacing: a chunk that receivers in lockstep all need next is published only when all of
them have credit for it, so it goes out once. A receiver that holds the group back for longer
than `lag_timeout` stops pacing it and is served by its own re-sends (it is "lagging"); a
receiver behind the group (e.g. restarted) is served the same way, interleaved.

The hash is computed while sending: chunks are first sent in index order, so the sender hashes
each as it reads it, and signs the manifest (the Seal) after the last. No separate read pass of
the file delays the first chunk. After a restart without a persisted seal, the sender re-reads
the prefix that no receiver needs any more, only to hash it.

The shell drives it (see protocol/SPEC.md section 7 for the loop): `next_read()` while it has
room to publish, `on_chunk_read()` with the bytes, `receive()` for control messages,
`on_timer()` at `next_deadline()`, and `take_actions()` after every call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import nacl.signing
import nacl.utils

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.transfer._codec import (
    MalformedTransferObject,
    fields,
    pack,
    unpack,
    want_bytes,
    want_int,
    want_list,
    want_str,
)
from protocol.transfer.chunks import NONCE_EXTENSION_BYTES, ChunkCipher
from protocol.transfer.events import (
    Accepted,
    Finished,
    Persist,
    Progress,
    ReadChunk,
    ReceiverFailed,
    ReceiverVerified,
    Sealed,
    SendControl,
    SenderAction,
    TransferConfig,
)
from protocol.transfer.manifest import (
    CONTENT_KEY_BYTES,
    MAX_MANIFEST_BYTES,
    SIGNATURE_BYTES,
    TRANSFER_ID_BYTES,
    FileHasher,
    Manifest,
    SignedManifest,
    check_local_peer_id,
    check_peer_id,
    chunk_count_for,
    chunk_length,
    name_problem,
)
from protocol.transfer.messages import (
    Abort,
    Accept,
    Ack,
    ControlMessage,
    Offer,
    Reason,
    Refuse,
    Request,
    Seal,
    Verified,
    safe_detail,
)

MAX_RECEIVERS = 64
_SNAPSHOT_VERSION = 1
_MAX_SNAPSHOT_BYTES = 16384

# Per-receiver states.
OFFERED = "offered"
ACTIVE = "active"
VERIFIED = "verified"
FAILED = "failed"
_STATUS_CODES = {OFFERED: 0, VERIFIED: 1, FAILED: 2}  # ACTIVE is persisted as OFFERED


class _Receiver:
    __slots__ = (
        "acked",
        "cum",
        "cursor",
        "deliveries",
        "detail",
        "early",
        "heard_at",
        "incarnation",
        "lagging",
        "limit",
        "next_probe",
        "peer",
        "probe_interval",
        "reason",
        "repair",
        "restarts",
        "sacked",
        "seal_at",
        "stalled_since",
        "state",
    )

    def __init__(self, peer: str, now: float) -> None:
        self.peer = peer
        self.heard_at = now  # its last message (or when it was offered the file)
        self.state = OFFERED
        self.reason = ""
        self.detail = ""
        self.incarnation = 0  # the receiver's latest incarnation heard (0: none yet)
        self.cum = 0  # every index below is acknowledged durable
        self.sacked: set[int] = set()  # acknowledged indices above cum
        self.limit = 0  # may send indices below
        self.cursor = 0  # every index in [cum, cursor) is acknowledged or was sent
        self.repair: set[int] = set()  # requested again; all < cursor
        self.early = 0  # chunks [0, early) were published to it before it accepted
        self.acked = 0
        self.stalled_since: float | None = None  # since when it has had no credit
        self.lagging = False  # stalled too long: it no longer paces the others
        # When to re-send the offer: unanswered, or silent since (a lost Verified or Abort
        # leaves a finished receiver quiet; the offer makes it say again how it ended).
        self.next_probe = 0.0
        self.probe_interval = 0.0
        # What this receiver's claims have cost, against the budgets (TransferConfig).
        self.restarts = 0  # new incarnations announced since it accepted
        self.deliveries = 0  # publishes that served it: first sends and re-sends
        self.seal_at = -1e18  # when a Seal was last sent to it on its own report


EARLY_DUPLICATES = 64  # a fan-out's early copies beyond one: at most 1/64 of the file


def early_chunks(config: TransferConfig, receivers: int, count: int) -> int:
    """How many chunks go early to each receiver (SPEC 7.7): the initial window shared among
    the receivers and, since each receiver gets its own copy, for a fan-out also at most
    `count / (64 x (receivers - 1))`, so that the copies beyond one stay within 1/64 of the file
    (a fan-out of 256 MiB to 8 published 56 chunks twice: 1.055x the file); but one at least,
    so that the first byte still travels right behind the Offer."""
    e = min(config.early_window, config.window) // receivers
    if receivers > 1 and e > 0:
        e = min(e, max(1, count // (EARLY_DUPLICATES * (receivers - 1))))
    return e


class SenderTransfer:
    """One file sent to up to MAX_RECEIVERS receivers. See the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        size: int,
        receivers: Iterable[str],
        sender: str,
        signing_key: nacl.signing.SigningKey,
        now: float,
        config: TransferConfig | None = None,
        random: Callable[[int], bytes] = nacl.utils.random,
    ) -> None:
        """Start a transfer of `size` bytes under the base name `name`.

        `sender` is this node's peer id, `signing_key` its Ed25519 identity key. Emits a Persist
        (store it before sending anything) and an Offer to each receiver.
        """
        config = config or TransferConfig()
        problem = name_problem(name) if type(name) is str else "the name is not a string"
        if problem is not None:
            raise LocalProtocolError(
                f"cannot send a file under this name: {problem}",
                hint="rename the file to a plain base name",
            )
        check_local_peer_id(sender, "sender")
        transfer_id = random(TRANSFER_ID_BYTES)
        content_key = random(CONTENT_KEY_BYTES)
        chunk_size = config.chunk_size
        offer = _local(
            Offer,
            transfer_id,
            name,
            size,
            chunk_size,
            chunk_count_for(size, chunk_size) if type(size) is int and size >= 0 else -1,
            int(now),
            content_key,
        )
        peers = list(dict.fromkeys(receivers))
        self._setup(
            offer=offer,
            sender=sender,
            signing_key=signing_key,
            peers=peers,
            config=config,
            random=random,
            now=now,
        )
        # Early chunks (SPEC 7.7): the first chunks go out right after the Offers, to each
        # receiver's early topic, instead of a round trip later; the budget is shared among the
        # receivers since each gets its own copy.
        self._early_end = min(self._count, early_chunks(config, len(peers), self._count))
        self._persist()
        for r in self._receivers.values():
            self._send_offer(r, now)

    @classmethod
    def restore(
        cls,
        snapshot: bytes,
        *,
        signing_key: nacl.signing.SigningKey,
        now: float,
        config: TransferConfig | None = None,
        random: Callable[[int], bytes] = nacl.utils.random,
    ) -> SenderTransfer:
        """Rebuild a transfer from its last Persist after a restart. Receivers that had not
        finished are offered the transfer again and answer with what they hold; each is then
        re-sent at most its window."""
        config = config or TransferConfig()
        offer, sender, statuses, seal = _decode_snapshot(snapshot)
        self = cls.__new__(cls)
        self._setup(
            offer=offer,
            sender=sender,
            signing_key=signing_key,
            peers=[p for p, _, _, _ in statuses],
            config=config,
            random=random,
            now=now,
        )
        if seal is not None:
            try:
                sealed = SignedManifest.open(seal[0], seal[1], signing_key.verify_key)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"corrupt sender snapshot: {exc}") from exc
            self._adopt_seal(sealed)
        for peer, status, reason, detail in statuses:
            r = self._receivers[peer]
            if status == VERIFIED:
                r.state = VERIFIED
            elif status == FAILED:
                r.state, r.reason, r.detail = FAILED, reason, detail
        for r in self._receivers.values():
            if r.state == OFFERED:
                self._send_offer(r, now)
        self._check_finished()
        return self

    def _setup(
        self,
        *,
        offer: Offer,
        sender: str,
        signing_key: nacl.signing.SigningKey,
        peers: list[str],
        config: TransferConfig,
        random: Callable[[int], bytes],
        now: float,
    ) -> None:
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise LocalProtocolError("signing_key must be a nacl.signing.SigningKey")
        if not 1 <= len(peers) <= MAX_RECEIVERS:
            raise LocalProtocolError(f"a transfer has 1..{MAX_RECEIVERS} receivers")
        for p in peers:
            check_local_peer_id(p, "receiver")
        if sender in peers:
            raise LocalProtocolError("a node cannot send a file to itself")
        self.offer = offer
        self.sender = sender
        self.config = config
        self._signing_key = signing_key
        self._random = random
        self._cipher = ChunkCipher(offer.content_key, offer.transfer_id)
        self._count = offer.chunk_count
        self._receivers: dict[str, _Receiver] = {p: _Receiver(p, now) for p in peers}
        self._actions: list[SenderAction] = []
        self._reads: deque[tuple[ReadChunk, bool]] = deque()
        self._hasher: FileHasher | None = FileHasher()
        self._hash_next = 0  # next index to issue for hashing
        self._hash_done = 0  # indices hashed so far
        self._seal: SignedManifest | None = None
        self._start_at = now + config.start_wait
        self._started = False
        self._early_next = 0  # the next early chunk to publish
        self._early_end = 0  # none after a restart: the receivers answer with what they hold
        self._finished = False
        self._frontier = 0  # one past the highest index this instance has published
        # Publishes that may serve one receiver: every chunk once, plus re-sends (its repairs,
        # its restarts) up to resend_ratio of the file, at least resend_floor chunks.
        self._delivery_budget = self._count + max(
            math.ceil(self._count * config.resend_ratio), config.resend_floor
        )
        # Counters for the shell's status and the fan-out benchmark.
        self.published_frames = 0
        self.published_bytes = 0
        self.resent_frames = 0  # publishes of an index this instance had published before

    # -- properties ---------------------------------------------------------------------------

    @property
    def transfer_id(self) -> bytes:
        return self.offer.transfer_id

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def seal(self) -> SignedManifest | None:
        return self._seal

    def receiver_state(self, peer: str) -> str:
        """offered, active, verified or failed."""
        return self._receivers[peer].state

    def receivers(self) -> dict[str, str]:
        return {p: r.state for p, r in self._receivers.items()}

    def silent_since(self, peer: str) -> float | None:
        """When a receiver still in the transfer (offered or active) was last heard from (or
        offered the file); None once it verified or failed. The shell tells "bob offline since
        12 s" from it: a live receiver answers every probe (`probe_interval`)."""
        r = self._receivers[peer]
        return r.heard_at if r.state in (OFFERED, ACTIVE) else None

    def acked_chunks(self, peer: str) -> int:
        return self._receivers[peer].acked

    # -- outputs ------------------------------------------------------------------------------

    def take_actions(self) -> list[SenderAction]:
        """Everything the shell must do or report, in order; call after every other method."""
        actions, self._actions = self._actions, []
        return actions

    def has_actions(self) -> bool:
        """Whether `take_actions` would return anything (cheap; for the shell's data path)."""
        return bool(self._actions)

    def next_deadline(self) -> float | None:
        """When `on_timer` must next be called, or None."""
        if self._finished:
            return None
        deadlines: list[float] = []
        if not self._started:
            deadlines.append(self._start_at)
        lag = self.config.lag_timeout
        for r in self._receivers.values():
            if r.state in (OFFERED, ACTIVE):
                deadlines.append(r.next_probe)
                deadlines.append(r.heard_at + self.config.idle_timeout)
            if r.state == ACTIVE and r.stalled_since is not None and not r.lagging:
                deadlines.append(r.stalled_since + lag)
        return min(deadlines) if deadlines else None

    # -- the data path ------------------------------------------------------------------------

    def next_read(self, now: float) -> ReadChunk | None:
        """The next chunk to read, or None if nothing may be sent now.

        Call while the shell has room to publish; hand every result back to `on_chunk_read`,
        in this order. A result with `publish=False` is only hashed (after a restart).
        """
        if self._finished:
            return None
        if len(self._reads) >= self.config.max_outstanding_reads:
            return None
        if not self._started:
            return self._next_early()
        count = self._count
        lag = self.config.lag_timeout
        blocking: set[int] = set()
        candidates: list[int] = []
        min_cursor = count
        active = False
        for r in self._receivers.values():
            if r.state != ACTIVE:
                continue
            active = True
            cursor = r.cursor
            if cursor < count and cursor >= r.limit:
                if r.stalled_since is None:
                    r.stalled_since = now
                elif now - r.stalled_since >= lag:
                    r.lagging = True
                if not r.lagging:
                    blocking.add(cursor)
                    min_cursor = min(min_cursor, cursor)
            else:
                min_cursor = min(min_cursor, cursor)
            if r.repair:
                want = min(r.repair)
            elif cursor < count:
                want = cursor
            else:
                continue
            if want < r.limit:
                candidates.append(want)
        best: int | None = None
        for i in sorted(set(candidates)):
            if i not in blocking:
                best = i
                break
        hash_next = self._hash_next
        if (
            active
            and self._hasher is not None
            and hash_next < count
            and hash_next < min_cursor
            and (best is None or best > hash_next)
        ):
            # After a restart: a chunk no receiver needs fresh is read only to be hashed.
            return self._issue(hash_next, publish=False, hashed=True)
        if best is None:
            return None
        over: list[_Receiver] = []
        for r in self._receivers.values():
            if r.state != ACTIVE or best >= r.limit:
                continue
            if best in r.repair:
                r.repair.discard(best)
            elif best == r.cursor:
                self._advance_cursor(r, best + 1)
            else:
                continue
            r.deliveries += 1
            if r.deliveries > self._delivery_budget:
                over.append(r)
        for r in over:
            self._drop(
                r,
                Reason.OVER_BUDGET,
                f"it was sent {r.deliveries} chunks of a {self._count}-chunk file",
            )
        self.published_frames += 1
        if best < self._frontier:
            self.resent_frames += 1
        else:
            self._frontier = best + 1
        hashed = self._hasher is not None and best == hash_next
        return self._issue(best, publish=True, hashed=hashed)

    def _next_early(self) -> ReadChunk | None:
        """Before any receiver accepted: the next early chunk, to every receiver that has not
        answered yet (a receiver that already holds parts of the transfer answers with them)."""
        i = self._early_next
        if i >= self._early_end:
            return None
        if any(r.state == ACTIVE for r in self._receivers.values()):
            # Once one accepted, early chunks to the others would be chunks it must get again
            # on the transfer topic: the rest goes there once, when every receiver answered.
            return None
        peers = tuple(
            r.peer for r in self._receivers.values() if r.state == OFFERED and r.incarnation == 0
        )
        if not peers:
            return None
        self._early_next = i + 1
        for p in peers:
            r = self._receivers[p]
            r.early = i + 1
            r.deliveries += 1
        self.published_frames += len(peers)
        self._frontier = max(self._frontier, i + 1)
        hashed = self._hasher is not None and i == self._hash_next
        return self._issue(i, publish=True, hashed=hashed, early=peers)

    def _issue(
        self, index: int, *, publish: bool, hashed: bool, early: tuple[str, ...] = ()
    ) -> ReadChunk:
        if hashed:
            self._hash_next += 1
        read = ReadChunk(
            index,
            index * self.offer.chunk_size,
            chunk_length(index, self.offer.size, self.offer.chunk_size, self._count),
            publish,
            early,
        )
        self._reads.append((read, hashed))
        return read

    def on_chunk_read(
        self,
        read: ReadChunk,
        data: bytes | bytearray | memoryview,
        out: bytearray | memoryview | None = None,
    ) -> memoryview | None:
        """The bytes of `read`; returns the frame to publish (a view of `out`), or None.

        `out` should be a reused buffer of `frame_buffer(chunk_size)` bytes; the frame must be
        published (or copied) before `out` is reused. Fewer or more bytes than asked means the
        file changed: the transfer is aborted (reason source-changed) and None is returned.
        """
        if self._finished:
            return None  # cancelled or aborted while the read was outstanding
        if not self._reads or self._reads[0][0] is not read:
            raise LocalProtocolError("chunk reads must be returned in the order they were issued")
        _, hashed = self._reads.popleft()
        if len(data) != read.length:
            self.source_changed(
                f"chunk {read.index} read {len(data)} bytes where {read.length} were expected"
            )
            return None
        if hashed and self._hasher is not None:
            self._hasher.update(data)
            self._hash_done += 1
            if self._hash_done == self._count:
                self._finish_hash()
        if not read.publish:
            return None
        buf = out if out is not None else bytearray(read.length + 64)
        n = self._cipher.seal_into(
            buf,
            read.index,
            read.index == self._count - 1,
            data,
            self._random(NONCE_EXTENSION_BYTES),
        )
        self.published_bytes += n
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        return view[:n]

    def _finish_hash(self) -> None:
        assert self._hasher is not None
        o = self.offer
        manifest = Manifest(
            o.transfer_id,
            self.sender,
            o.name,
            o.size,
            o.chunk_size,
            o.chunk_count,
            o.created,
            self._hasher.digest(),
        )
        self._adopt_seal(manifest.sign(self._signing_key))
        assert self._seal is not None
        self._actions.append(Sealed(self._seal))
        self._persist()
        for r in self._receivers.values():
            if r.state == ACTIVE:
                self._send_seal(r)

    def _adopt_seal(self, sealed: SignedManifest) -> None:
        m = sealed.manifest
        o = self.offer
        if (m.transfer_id, m.sender, m.name, m.size, m.chunk_size, m.created) != (
            o.transfer_id,
            self.sender,
            o.name,
            o.size,
            o.chunk_size,
            o.created,
        ):
            raise LocalProtocolError("the stored seal does not match the stored offer")
        self._seal = sealed
        self._hasher = None
        self._hash_next = self._hash_done = self._count

    # -- control messages ---------------------------------------------------------------------

    def receive(self, peer: str, message: ControlMessage, now: float) -> None:
        """A control message from `peer`, decoded from its Noise session.

        Raises RemoteProtocolError for a message that breaks the protocol (count it, drop it;
        the transfer goes on), LocalProtocolError if the shell routed another transfer's
        message here.
        """
        if message.transfer_id != self.offer.transfer_id:
            raise LocalProtocolError("a message for another transfer was routed here")
        r = self._receivers.get(peer)
        if r is None:
            raise RemoteProtocolError(
                f"{peer} is not a receiver of this transfer", reason="not-a-receiver"
            )
        r.heard_at = max(r.heard_at, now)
        if r.state == ACTIVE:
            self._heard(r, now)
        if isinstance(message, Accept | Ack):
            self._on_status(r, message, now)
        elif isinstance(message, Request):
            self._on_request(r, message)
        elif isinstance(message, Verified):
            self._on_verified(r, message)
        elif isinstance(message, Refuse | Abort):
            if r.state in (OFFERED, ACTIVE):
                self._fail(
                    r,
                    message.reason,
                    message.detail,
                    remote=True,
                    refused=isinstance(message, Refuse),
                )
                self._check_finished()
        else:
            raise RemoteProtocolError(
                f"a receiver does not send {type(message).__name__}", reason="unexpected-message"
            )

    def _on_status(self, r: _Receiver, m: Accept | Ack, now: float) -> None:
        if r.state == VERIFIED:
            return
        if r.state == FAILED:
            self._send(r, Abort(self.transfer_id, r.reason or Reason.CANCELLED, r.detail))
            return
        count = self._count
        durable = m.durable()
        if m.cum > count or (durable and durable[-1] >= count):
            raise RemoteProtocolError(
                "an acknowledgement names chunks past the end", reason="bad-ack"
            )
        limit = min(m.limit, count)
        if m.incarnation < r.incarnation:
            return  # sent before the receiver restarted, delayed: stale
        if r.state == ACTIVE and m.incarnation > r.incarnation:
            # A restart. `cum` covers only chunks the receiver had made durable and recorded
            # before it acknowledged them, so a restart cannot lose them: a lower one is a lie
            # (or a receiver that lost its disk) and would make this side re-send the file.
            if m.cum < r.cum:
                self._drop(
                    r,
                    Reason.PROTOCOL,
                    f"its durable prefix went back from {r.cum} to {m.cum} chunks",
                )
                return
            r.restarts += 1
            if r.restarts > self.config.max_restarts:
                self._drop(r, Reason.OVER_BUDGET, f"it restarted {r.restarts} times")
                return
        if r.state == OFFERED or m.incarnation > r.incarnation:
            r.incarnation = m.incarnation
            r.cum = m.cum
            r.sacked = set(durable)
            r.limit = limit
            r.repair.clear()
            # The early chunks count as sent to its first incarnation: one it lost shows as a
            # gap and is asked for again.
            start = max(r.cum, r.early) if m.incarnation == 1 else r.cum
            r.cursor = start
            self._advance_cursor(r, start)
            if r.state == OFFERED:
                r.state = ACTIVE
                self._actions.append(Accepted(r.peer))
                self._heard(r, now)
                self._check_started(now)
                if self._seal is not None:
                    self._send_seal(r)
        else:
            if m.cum > r.cum:
                r.cum = m.cum
                r.sacked = {i for i in r.sacked if i > r.cum}
            r.sacked.update(i for i in durable if i > r.cum)
            r.limit = max(r.limit, limit)
            if r.repair:
                r.repair = {i for i in r.repair if i >= r.cum and i not in r.sacked}
            self._advance_cursor(r, max(r.cursor, r.cum))
        if r.cursor < r.limit or r.cursor >= count:
            r.stalled_since = None
            r.lagging = False
        acked = r.cum + len(r.sacked)
        if acked != r.acked:
            r.acked = acked
            self._actions.append(Progress(r.peer, acked, self._bytes_of(r)))
        if (
            r.cum == count
            and self._seal is not None
            and now - r.seal_at >= self.config.probe_interval
        ):
            # It may have lost the first one, and waits for nothing else; at most once per
            # probe interval, so its Acks cannot make this side send a Seal for each.
            r.seal_at = now
            self._send_seal(r)

    def _on_request(self, r: _Receiver, m: Request) -> None:
        if r.state != ACTIVE or m.incarnation != r.incarnation:
            return
        for i in m.indices():
            if i >= self._count:
                raise RemoteProtocolError(
                    "a request names chunks past the end", reason="bad-request"
                )
            if i < r.cum or i in r.sacked or i >= r.cursor or i >= r.limit:
                continue  # already durable there, or not sent yet (it will come)
            r.repair.add(i)

    def _on_verified(self, r: _Receiver, m: Verified) -> None:
        if self._seal is None:
            return  # restarted and not yet re-hashed: it will be asked again after sealing
        if m.file_hash != self._seal.manifest.file_hash:
            raise RemoteProtocolError(
                "a receiver verified a different file hash", reason="bad-verified"
            )
        if r.state in (OFFERED, ACTIVE):
            r.state = VERIFIED
            r.repair.clear()
            self._actions.append(ReceiverVerified(r.peer))
            self._persist()
            self._check_finished()

    # -- local decisions ----------------------------------------------------------------------

    def cancel(self, reason: str = Reason.CANCELLED, detail: str = "") -> None:
        """End the transfer for every receiver that has not finished (user cancel, shutdown of
        the transfer, revocation of this node's key)."""
        for r in self._receivers.values():
            if r.state in (OFFERED, ACTIVE):
                self._fail(r, reason, safe_detail(detail), remote=False, notify=True)
        self._check_finished()

    def source_changed(self, detail: str = "") -> None:
        """The shell saw the file change (size, mtime, inode) during the transfer: abort, so
        that no receiver assembles a mix of two versions (it would fail the hash anyway)."""
        self.cancel(Reason.SOURCE_CHANGED, detail)

    def remove_receiver(self, peer: str, reason: str, detail: str = "") -> None:
        """End the transfer for one receiver (its key was revoked, the user dropped it)."""
        r = self._receivers.get(peer)
        if r is None:
            raise LocalProtocolError(f"{peer} is not a receiver of this transfer")
        if r.state in (OFFERED, ACTIVE):
            self._fail(r, reason, safe_detail(detail), remote=False, notify=True)
            self._check_finished()

    def peer_reachable(self, peer: str, now: float) -> None:
        """The shell has a session with `peer` again (it came online, or restarted): probe it
        at the next `on_timer` instead of waiting out the backed-off probe interval."""
        r = self._receivers.get(peer)
        if r is not None and r.state in (OFFERED, ACTIVE):
            r.probe_interval = 0.0
            r.next_probe = now

    def on_timer(self, now: float) -> None:
        if self._finished:
            return
        if not self._started and now >= self._start_at:
            self._started = True
        for r in self._receivers.values():
            if r.state in (OFFERED, ACTIVE) and now >= r.heard_at + self.config.idle_timeout:
                # Silent (or gone) for the idle deadline: it no longer holds the transfer, its
                # slot and its content key open; the Abort tells it, should it come back.
                self._fail(
                    r,
                    Reason.TIMEOUT,
                    f"nothing heard from it for {self.config.idle_timeout:g} s",
                    remote=False,
                    notify=True,
                )
                continue
            if r.state in (OFFERED, ACTIVE) and now >= r.next_probe:
                self._send_offer(r, now)
            if r.state == ACTIVE:
                stalled = r.stalled_since
                if stalled is not None and now - stalled >= self.config.lag_timeout:
                    r.lagging = True
        self._check_finished()

    # -- internals ----------------------------------------------------------------------------

    def _advance_cursor(self, r: _Receiver, start: int) -> None:
        i = max(start, r.cum)
        sacked = r.sacked
        while i in sacked:
            i += 1
        r.cursor = i

    def _bytes_of(self, r: _Receiver) -> int:
        o = self.offer
        total = r.acked * o.chunk_size
        last = self._count - 1
        if r.cum > last or last in r.sacked:
            total -= o.chunk_size - chunk_length(last, o.size, o.chunk_size, self._count)
        return total

    def _check_started(self, now: float) -> None:
        if not self._started and (
            now >= self._start_at or all(r.state != OFFERED for r in self._receivers.values())
        ):
            self._started = True

    def _send(self, r: _Receiver, message: ControlMessage) -> None:
        self._actions.append(SendControl(r.peer, message))

    def _send_offer(self, r: _Receiver, now: float) -> None:
        self._send(r, self.offer)
        cfg = self.config
        r.probe_interval = (
            cfg.probe_interval
            if r.probe_interval == 0
            else min(r.probe_interval * 2, cfg.max_probe_interval)
        )
        r.next_probe = now + r.probe_interval

    def _heard(self, r: _Receiver, now: float) -> None:
        r.probe_interval = 0.0
        r.next_probe = now + self.config.probe_interval

    def _send_seal(self, r: _Receiver) -> None:
        assert self._seal is not None
        self._send(r, Seal(self.transfer_id, self._seal.body, self._seal.signature))

    def _fail(
        self,
        r: _Receiver,
        reason: str,
        detail: str,
        *,
        remote: bool,
        refused: bool = False,
        notify: bool = False,
    ) -> None:
        r.state = FAILED
        r.reason, r.detail = reason, detail
        r.repair.clear()
        if notify:
            self._send(r, Abort(self.transfer_id, reason, detail))
        self._actions.append(ReceiverFailed(r.peer, reason, detail, remote, refused))
        self._persist()

    def _drop(self, r: _Receiver, reason: str, detail: str) -> None:
        """End the transfer for a receiver because of what it did (its claims would cost more
        than the budget allows); the shell counts and logs the reason."""
        self._fail(r, reason, safe_detail(detail), remote=False, notify=True)
        self._check_finished()

    def _check_finished(self) -> None:
        if self._finished:
            return
        if all(r.state in (VERIFIED, FAILED) for r in self._receivers.values()):
            self._finished = True
            self._reads.clear()
            self._actions.append(
                Finished(
                    tuple(p for p, r in self._receivers.items() if r.state == VERIFIED),
                    tuple(p for p, r in self._receivers.items() if r.state == FAILED),
                )
            )

    def snapshot(self) -> bytes:
        """The resumable state: offer (with the content key), receivers' outcomes, seal."""
        return pack(
            [
                _SNAPSHOT_VERSION,
                self.offer.encode(),
                self.sender,
                [
                    [p, _STATUS_CODES.get(r.state, 0), r.reason, r.detail]
                    for p, r in self._receivers.items()
                ],
                self._seal.body if self._seal else None,
                self._seal.signature if self._seal else None,
            ]
        )

    def _persist(self) -> None:
        self._actions.append(Persist(self.snapshot()))


def _local(cls: Any, *args: Any) -> Any:
    try:
        return cls(*args)
    except LocalProtocolError as exc:
        raise LocalProtocolError(f"cannot start the transfer: {exc}") from exc


def _decode_snapshot(
    snapshot: bytes,
) -> tuple[Offer, str, list[tuple[str, str, str, str]], tuple[bytes, bytes] | None]:
    try:
        v = fields(
            unpack(snapshot, what="sender snapshot", max_size=_MAX_SNAPSHOT_BYTES),
            "sender snapshot",
            6,
        )
        if want_int(v[0], "snapshot version") != _SNAPSHOT_VERSION:
            raise MalformedTransferObject("unknown snapshot version")
        offer = Offer.decode(want_bytes(v[1], "offer", max_len=_MAX_SNAPSHOT_BYTES))
        sender = check_peer_id(v[2], "sender")
        codes = {code: state for state, code in _STATUS_CODES.items()}
        statuses = []
        for entry in want_list(v[3], "receivers", max_len=MAX_RECEIVERS):
            e = fields(want_list(entry, "receiver", max_len=4), "receiver", 4)
            peer = check_peer_id(e[0], "receiver")
            code = want_int(e[1], "receiver status", hi=2)
            statuses.append(
                (
                    peer,
                    codes[code],
                    want_str(e[2], "reason", max_len=64),
                    want_str(e[3], "detail", max_len=1024),
                )
            )
        seal = None
        if v[4] is not None:
            seal = (
                want_bytes(v[4], "seal", max_len=MAX_MANIFEST_BYTES),
                want_bytes(v[5], "seal signature", SIGNATURE_BYTES),
            )
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"corrupt sender snapshot: {exc}") from exc
    return offer, sender, statuses, seal
