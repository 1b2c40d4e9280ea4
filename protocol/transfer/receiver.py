"""The receiving side of a transfer.

It checks an offer against the local policy, then turns chunk frames into "write these bytes at
this offset" and drives the rest: credit, durability, repair, verification, commit.

- Credit: the sender may send indices below `limit = received prefix + window`, and never more
  than two windows beyond the durable prefix. Credit is granted as chunks arrive (an Ack every
  quarter window), not after they are durable, so an fsync is never on the path of the data.
  The window is sized from what the transfer measures (`window.CreditWindow`: 2 x round trip x
  delivery rate, within `max_window_bytes`). Frames beyond the limit are dropped unread,
  duplicates by their header alone, so chunks in flight and data written but not durable are
  bounded by two windows, whatever the file size.
- Durability: written chunks are batched into a Sync; only after the shell reports it done are
  they acknowledged as durable to the sender and recorded (Persist). A snapshot lists only
  durable chunks, so after a crash the receiver asks again for everything else (at most two
  windows).
- Repair: a gap older than `repair_delay` is re-requested; with no chunk arriving, a status
  timer re-sends credit and requests the head of the window (lost tail, lost acks).
- Verification: chunks are hashed in index order as they arrive; a chunk that arrives before
  its predecessors is hashed later from the file (a ReadChunk), and after a restart the durable
  prefix is re-read the same way. Commit is asked for only when every chunk is durable, the
  BLAKE3 hash equals the one in the manifest and the manifest's signature verifies under the
  sender's identity key: a final file is never incomplete, forged or from another transfer.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nacl.signing

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.transfer._codec import (
    MalformedTransferObject,
    fields,
    pack,
    unpack,
    want_bytes,
    want_int,
    want_list,
)
from protocol.transfer.chunks import FRAME_OVERHEAD, BadChunkFrame, ChunkCipher, parse_chunk_header
from protocol.transfer.events import (
    Commit,
    Persist,
    Progress,
    ReadChunk,
    ReceiverAction,
    SendControl,
    Sync,
    TransferConfig,
    TransferFailed,
    WriteChunk,
)
from protocol.transfer.manifest import (
    MAX_MANIFEST_BYTES,
    SIGNATURE_BYTES,
    FileHasher,
    SignedManifest,
    check_local_peer_id,
    check_peer_id,
    chunk_length,
)
from protocol.transfer.messages import (
    MAX_INCARNATION,
    MAX_REQUEST_RANGES,
    MAX_WINDOW,
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
    ranges_of,
    sack_bitmap,
    safe_detail,
)
from protocol.transfer.window import CreditWindow

RECEIVING = "receiving"
COMMITTING = "committing"
DONE = "done"
FAILED = "failed"

_SNAPSHOT_VERSION = 1
_MAX_SNAPSHOT_BYTES = 65536
_MAX_HELD_RANGES = 4096


@dataclass(frozen=True, slots=True)
class ReceivePolicy:
    """What this node accepts: the shell fills it from its config and a statvfs of the inbox."""

    max_size: int
    free_space: int
    reserve: int = 0  # bytes that must stay free after the file is written


def check_offer(offer: Offer, policy: ReceivePolicy) -> Refuse | None:
    """The Refuse to send if `policy` rejects `offer`, else None. (The name, the chunk layout
    and the bounds were checked when the offer was decoded.)"""
    if offer.size > policy.max_size:
        return Refuse(
            offer.transfer_id,
            Reason.TOO_LARGE,
            f"{offer.size} bytes is more than the limit of {policy.max_size}",
        )
    if offer.size + policy.reserve > policy.free_space:
        return Refuse(
            offer.transfer_id,
            Reason.NO_SPACE,
            f"{offer.size} bytes needed, {max(0, policy.free_space - policy.reserve)} available",
        )
    return None


class ReceiverTransfer:
    """One file being received from one sender. See the module docstring."""

    def __init__(
        self,
        offer: Offer,
        *,
        sender: str,
        sender_key: bytes | nacl.signing.VerifyKey,
        now: float,
        config: TransferConfig | None = None,
        held: Sequence[tuple[int, int]] = (),
        start_window: int | None = None,
        reach: int | None = None,
    ) -> None:
        """Accept `offer` from `sender` (its peer id; `sender_key` its Ed25519 identity key).

        Call `check_offer` first. `held`: ranges (start, count) of chunks the shell has already
        written into the temporary file from its own files and made durable (a delta, SPEC
        7.11); they count as durable from the start, are never asked for, and are hashed by
        reading them back like any chunk. `reach`: while a streamed recipe is still coming,
        credit is granted only below this chunk index (the chunks its parts cover so far), so
        the sender never sends a chunk the receiver may yet find it holds; `extend` raises it.
        `start_window` (chunks; clamped to the configured bounds) starts the window where an
        earlier transfer from this sender left it (`window`), instead of at `config.window`.
        Emits a Persist and the Accept.
        """
        self._setup(
            offer=offer,
            sender=sender,
            sender_key=sender_key,
            now=now,
            config=config or TransferConfig(),
            incarnation=1,
            start_window=start_window,
        )
        if reach is not None:
            self._reach = max(0, min(reach, self._count))
        self._hold(held)
        self._persist()
        self._send(self._status(Accept, now))
        self._schedule_read()  # held chunks are hashed from the file, in order

    @classmethod
    def restore(
        cls,
        snapshot: bytes,
        *,
        sender_key: bytes | nacl.signing.VerifyKey,
        now: float,
        config: TransferConfig | None = None,
    ) -> ReceiverTransfer:
        """Rebuild from the last Persist after a restart: the temporary file holds at least the
        chunks the snapshot calls durable. Tells the sender what it has (an Accept) and re-reads
        the durable prefix to rebuild the running hash."""
        offer, sender, incarnation, cum, durable, seal, held = _decode_snapshot(snapshot)
        self = cls.__new__(cls)
        self._setup(
            offer=offer,
            sender=sender,
            sender_key=sender_key,
            now=now,
            config=config or TransferConfig(),
            incarnation=incarnation + 1,
        )
        if cum > self._count or any(i >= self._count for i in durable):
            raise LocalProtocolError("corrupt receiver snapshot: chunks past the end")
        self._cum = cum
        # A smaller window than before forgets what lies beyond it: it is simply asked again.
        self._durable = {i for i in durable if cum < i < cum + 2 * self._credit.maximum}
        self._highest = max([cum, *(i + 1 for i in self._durable)])
        self._received = cum + len(self._durable)
        self._prefix = cum
        self._hold((s, n) for s, n in held if s + n <= self._count)
        if seal is not None:
            try:
                self._seal = self._open_seal(seal[0], seal[1])
            except RemoteProtocolError as exc:
                raise LocalProtocolError(f"corrupt receiver snapshot: {exc}") from exc
        # The new incarnation is recorded before anything is sent under it, so that the sender
        # can tell this process's messages from the delayed ones of the last.
        self._persist()
        self._send(self._status(Accept, now))
        self._schedule_read()
        self._maybe_finish()
        return self

    def _setup(
        self,
        *,
        offer: Offer,
        sender: str,
        sender_key: bytes | nacl.signing.VerifyKey,
        now: float,
        config: TransferConfig,
        incarnation: int,
        start_window: int | None = None,
    ) -> None:
        check_local_peer_id(sender, "sender")
        if isinstance(sender_key, nacl.signing.VerifyKey):
            self._verify_key = sender_key
        else:
            if type(sender_key) is not bytes or len(sender_key) != 32:
                raise LocalProtocolError("sender_key is a 32-byte Ed25519 public key")
            self._verify_key = nacl.signing.VerifyKey(sender_key)
        self.offer = offer
        self.sender = sender
        self.config = config
        self.incarnation = incarnation
        self._cipher = ChunkCipher(offer.content_key, offer.transfer_id)
        self._count = offer.chunk_count
        self._credit = CreditWindow(
            initial=config.window,
            maximum=config.max_window_for(offer.chunk_size),
            chunk_size=offer.chunk_size,
            gain=config.window_gain,
            start=start_window,
        )
        self._prefix = 0  # every index below has been received (durable or written)
        self._granted = 0  # the highest limit sent to the sender
        self.state = RECEIVING
        self.failure: TransferFailed | None = None
        self._actions: list[ReceiverAction] = []
        self._cum = 0  # every index below is durable
        self._durable: set[int] = set()  # durable indices above cum
        self._pending: set[int] = set()  # written, not yet durable
        self._unsynced: list[int] = []  # written since the last Sync was handed out
        self._unsynced_since = 0.0
        self._syncing: tuple[Sync, list[int]] | None = None
        self._sync_token = 0
        self._received = 0  # durable + pending
        self._highest = 0  # one past the highest index received in this incarnation
        self._hasher = FileHasher()
        self._hash_pos = 0  # every index below has been hashed
        self._read: ReadChunk | None = None
        self._seal: SignedManifest | None = None
        self._gap_at: float | None = None
        self._gap_interval = config.repair_delay
        self._status_interval = config.status_interval
        self._status_at = now + config.status_interval
        self._frame_since_status = False
        self._heard_at = now  # the sender's last valid frame or control message
        self._acked_chunks = -1
        self._held: set[int] = set()  # chunks copied locally (deltas)
        # Credit stops below this while a streamed recipe is still coming (deltas); a restored
        # transfer has none (its recipe is not resumed: the rest is simply fetched).
        self._reach = self._count
        self._reach_at = now
        self.dropped_duplicates = 0
        self.dropped_beyond_window = 0

    def _hold(self, held: Iterable[tuple[int, int]]) -> None:
        """Chunks made durable by the shell from its own files (a delta's local copies)."""
        new: set[int] = set()
        for start, count in held:
            if start < 0 or count < 1 or start + count > self._count:
                raise LocalProtocolError("held chunks past the end of the file")
            new.update(i for i in range(start, start + count) if not self.is_received(i))
        self._held |= new
        self._durable |= new
        self._received += len(new)
        cum = self._cum
        while cum in self._durable:
            self._durable.discard(cum)
            cum += 1
        self._cum = cum
        self._highest = max(self._highest, cum)
        self._prefix = max(self._prefix, cum)
        self._advance_prefix()

    # -- properties ---------------------------------------------------------------------------

    @property
    def transfer_id(self) -> bytes:
        return self.offer.transfer_id

    @property
    def window(self) -> int:
        """The current window, in chunks (it grows with the measured bandwidth-delay product)."""
        return self._credit.window

    @property
    def credit(self) -> CreditWindow:
        return self._credit

    @property
    def limit(self) -> int:
        """The sender may send chunk indices below this: a window beyond what has arrived, at
        most two beyond what is durable (and within the wire's MAX_WINDOW of it), and below
        the reach of a streamed recipe."""
        w = self._credit.window
        return min(self._prefix + w, self._cum + min(2 * w, MAX_WINDOW), self._reach)

    @property
    def capped(self) -> bool:
        """Whether a streamed recipe still caps the credit (`extend` lifts it)."""
        return self._reach < self._count

    def extend(self, held: Sequence[tuple[int, int]], reach: int, now: float) -> None:
        """The shell looked up one more part of a streamed recipe: `held` are the chunks it
        copied from its own files and made durable since (as for `held` at the start), `reach`
        the chunk index the recipe now covers (the chunk count once the last part is in). The
        credit grows to match. Ignored once the cap is lifted (by the last part, or by
        `config.recipe_wait` passing without a part: then the rest is fetched whole)."""
        if self.state != RECEIVING or not self.capped:
            return
        self._reach_at = now
        self._reach = max(self._reach, min(reach, self._count))
        if held:
            self._hold(held)
            self._persist()
            self._schedule_read()
        self._send_status(now)
        self._maybe_finish()

    @property
    def durable_chunks(self) -> int:
        return self._cum + len(self._durable)

    def in_window(self) -> int:
        """Chunks received (durable or not) beyond the durable prefix: at most two windows."""
        return len(self._durable) + len(self._pending)

    def is_received(self, index: int) -> bool:
        return index < self._cum or index in self._durable or index in self._pending

    # -- outputs ------------------------------------------------------------------------------

    def take_actions(self) -> list[ReceiverAction]:
        """Everything the shell must do or report, in order; call after every other method."""
        actions, self._actions = self._actions, []
        return actions

    def has_actions(self) -> bool:
        """Whether `take_actions` would return anything (cheap; for the shell's data path)."""
        return bool(self._actions)

    def next_deadline(self) -> float | None:
        if self.state != RECEIVING:
            return None
        deadlines = [self._status_at, self._heard_at + self.config.idle_timeout]
        if self.capped:
            deadlines.append(self._reach_at + self.config.recipe_wait)
        if self._unsynced and self._syncing is None:
            deadlines.append(self._unsynced_since + self.config.sync_delay)
        if self._gap_at is not None:
            deadlines.append(self._gap_at)
        return min(deadlines)

    # -- the data path ------------------------------------------------------------------------

    def on_frame(
        self, frame: bytes | bytearray | memoryview, out: bytearray | memoryview, now: float
    ) -> WriteChunk | None:
        """A frame from the transfer topic; `out` is a reused buffer of at least chunk-size
        bytes. Returns what to write (a view of `out`) or None for a frame that is dropped
        (duplicate, beyond the window, transfer over). Raises RemoteProtocolError (DecryptError
        for a bad tag) for a frame that is forged or malformed: count it and carry on, the
        transfer is not harmed."""
        if self.state != RECEIVING:
            return None
        header = parse_chunk_header(frame)
        if header.transfer_id != self.offer.transfer_id:
            raise BadChunkFrame("a chunk of another transfer", reason="wrong-transfer")
        i = header.index
        if i >= self._count:
            raise BadChunkFrame("a chunk index past the end of the file", reason="bad-index")
        if self.is_received(i):
            self.dropped_duplicates += 1
            return None
        if i >= self.limit:
            self.dropped_beyond_window += 1
            return None
        o = self.offer
        length = chunk_length(i, o.size, o.chunk_size, self._count)
        if header.last != (i == self._count - 1):
            raise BadChunkFrame("a chunk's last flag contradicts the manifest", reason="bad-flags")
        if len(frame) != length + FRAME_OVERHEAD:
            raise BadChunkFrame("a chunk of the wrong length", reason="bad-length")
        if len(out) < length:
            raise LocalProtocolError(f"plaintext buffer too small: {len(out)} < {length}")
        self._cipher.open_into(out, frame)
        self._heard_at = max(self._heard_at, now)
        self._pending.add(i)
        if not self._unsynced:
            self._unsynced_since = now
        self._unsynced.append(i)
        self._received += 1
        self._frame_since_status = True
        self._credit.arrived(i, length, now)
        if i == self._prefix:
            self._advance_prefix()
        if i > self._highest and self._gap_at is None:
            self._gap_at = now + self.config.repair_delay
        self._highest = max(self._highest, i + 1)
        view = out if isinstance(out, memoryview) else memoryview(out)
        data = view[:length]
        if i == self._hash_pos and self._read is None:
            self._hasher.update(data)
            self._hash_pos += 1
            self._schedule_read()
        self._maybe_sync(now)
        if self.limit >= self._granted + max(1, self._credit.window // 4):
            # Credit on receipt: the sender need not wait for the fsync to keep the path full.
            self._send_status(now)
        return WriteChunk(i, i * o.chunk_size, data)

    def on_synced(self, sync: Sync, now: float) -> None:
        """The shell made durable every write handed out before `sync`."""
        if self._syncing is None or self._syncing[0] is not sync:
            raise LocalProtocolError("on_synced for a sync that is not outstanding")
        covered = self._syncing[1]
        self._syncing = None
        if self.state != RECEIVING:
            return
        self._pending.difference_update(covered)
        self._durable.update(covered)
        cum = self._cum
        while cum in self._durable:
            self._durable.discard(cum)
            cum += 1
        self._cum = cum
        self._persist()
        durable = self.durable_chunks
        if durable != self._acked_chunks:
            self._acked_chunks = durable
            o = self.offer
            done_bytes = durable * o.chunk_size
            if self.is_durable(self._count - 1):
                done_bytes -= o.chunk_size - chunk_length(
                    self._count - 1, o.size, o.chunk_size, self._count
                )
            self._actions.append(Progress(self.sender, durable, done_bytes))
        self._send_status(now)
        self._maybe_sync(now)
        self._maybe_finish()

    def is_durable(self, index: int) -> bool:
        return index < self._cum or index in self._durable

    def on_read(self, read: ReadChunk, data: bytes | bytearray | memoryview, now: float) -> None:
        """The bytes of a ReadChunk this receiver asked for (to hash them in order)."""
        if read is not self._read:
            raise LocalProtocolError("on_read for a read that is not outstanding")
        self._read = None
        if self.state != RECEIVING:
            return
        if len(data) != read.length:
            self.abort(Reason.IO_ERROR, f"chunk {read.index} read back short")
            return
        self._hasher.update(data)
        self._hash_pos += 1
        self._schedule_read()
        self._maybe_finish()

    def committed(self, now: float) -> None:
        """The shell renamed the file into place and synced the directory."""
        if self.state != COMMITTING:
            raise LocalProtocolError("committed() without a Commit")
        self.state = DONE
        assert self._seal is not None
        self._send(Verified(self.transfer_id, self._seal.manifest.file_hash))

    def abort(self, reason: str, detail: str = "") -> None:
        """End the transfer from this side (disk full, I/O error, the content was rejected, the
        sender's key was revoked, the user cancelled); the sender is told why."""
        if self.state in (RECEIVING, COMMITTING):
            self._fail(reason, safe_detail(detail), remote=False)

    # -- control messages ---------------------------------------------------------------------

    def receive(self, message: ControlMessage, now: float) -> None:
        """A control message from the sender, decoded from its Noise session. Raises
        RemoteProtocolError for one that breaks the protocol (count it, drop it)."""
        if message.transfer_id != self.offer.transfer_id:
            raise LocalProtocolError("a message for another transfer was routed here")
        if isinstance(message, Offer | Seal | Abort):
            self._heard_at = max(self._heard_at, now)
        if isinstance(message, Offer | Seal) and self.state in (DONE, FAILED):
            self._send(self._final_answer())
            return
        if isinstance(message, Offer):
            if message != self.offer:
                raise RemoteProtocolError(
                    "the sender offered the same transfer twice, differently",
                    reason="offer-mismatch",
                )
            if self.state == RECEIVING:
                self._send(self._status(Accept, now))
        elif isinstance(message, Seal):
            self._on_seal(message)
        elif isinstance(message, Abort):
            # Once committing, the file is verified: a late cancel does not undo it (the
            # sender learns from the Verified that it arrived).
            if self.state == RECEIVING:
                self._fail(message.reason, message.detail, remote=True)
        else:
            raise RemoteProtocolError(
                f"a sender does not send {type(message).__name__}", reason="unexpected-message"
            )

    def _on_seal(self, m: Seal) -> None:
        if self.state != RECEIVING:
            return
        if self._seal is not None:
            if (m.manifest, m.signature) != (self._seal.body, self._seal.signature):
                raise RemoteProtocolError("a second, different seal", reason="seal-mismatch")
            return
        try:
            self._seal = self._open_seal(m.manifest, m.signature)
        except RemoteProtocolError as exc:
            reason = (
                Reason.BAD_SIGNATURE if exc.reason == "bad-signature" else Reason.MANIFEST_MISMATCH
            )
            self._fail(reason, safe_detail(str(exc)), remote=False)
            return
        self._persist()
        self._maybe_finish()

    def _open_seal(self, body: bytes, signature: bytes) -> SignedManifest:
        sealed = SignedManifest.open(body, signature, self._verify_key)
        m, o = sealed.manifest, self.offer
        if (m.transfer_id, m.sender, m.name, m.size, m.chunk_size, m.chunk_count, m.created) != (
            o.transfer_id,
            self.sender,
            o.name,
            o.size,
            o.chunk_size,
            o.chunk_count,
            o.created,
        ):
            raise RemoteProtocolError(
                "the signed manifest does not match the offer", reason="manifest-mismatch"
            )
        return sealed

    # -- timers -------------------------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        if self.state != RECEIVING:
            return
        if now >= self._heard_at + self.config.idle_timeout:
            self._fail(
                Reason.TIMEOUT,
                f"nothing heard from the sender for {self.config.idle_timeout:g} s",
                remote=False,
            )
            return
        if self.capped and now >= self._reach_at + self.config.recipe_wait:
            self._reach = self._count  # the recipe stopped coming: fetch the rest whole
            self._send_status(now)
        if (
            self._unsynced
            and self._syncing is None
            and now >= self._unsynced_since + self.config.sync_delay
        ):
            self._maybe_sync(now, force=True)
        if self._gap_at is not None and now >= self._gap_at:
            missing = self._missing(self._highest)
            if missing:
                self._send(Request(self.transfer_id, self.incarnation, missing))
                self._gap_interval = min(self._gap_interval * 2, self.config.status_interval)
                self._gap_at = now + self._gap_interval
            else:
                self._gap_at = None
                self._gap_interval = self.config.repair_delay
        if now >= self._status_at:
            idle = not self._frame_since_status
            self._send_status(now)
            # The lost tail is asked for only when nothing arrives (SPEC 7.6): while frames
            # flow, a loss shows as a gap, and asking for every chunk not yet here would have
            # the sender re-send all it has in flight each interval (a slow or loaded path
            # doubled its upload, and would spend the receiver's re-send budget).
            if idle and self._received < self._count:
                missing = self._missing(self.limit)
                if missing:
                    self._send(Request(self.transfer_id, self.incarnation, missing))
            if idle:
                self._status_interval = min(
                    self._status_interval * 2, self.config.max_status_interval
                )
            else:
                self._status_interval = self.config.status_interval
            self._status_at = now + self._status_interval

    # -- internals ----------------------------------------------------------------------------

    def _missing(self, end: int) -> tuple[tuple[int, int], ...]:
        """Ranges not received in [cum, end), at most MAX_REQUEST_RANGES of them."""
        out: list[int] = []
        runs = 0
        prev = -2
        for i in range(self._cum, min(end, self._count)):
            if not self.is_received(i):
                if i != prev + 1:
                    runs += 1
                    if runs > MAX_REQUEST_RANGES:
                        break
                out.append(i)
                prev = i
        return ranges_of(out)

    def _maybe_sync(self, now: float, *, force: bool = False) -> None:
        if self._syncing is not None or not self._unsynced:
            return
        if force or len(self._unsynced) >= self.config.sync_batch or self._received == self._count:
            self._sync_token += 1
            sync = Sync(self._sync_token)
            self._syncing = (sync, self._unsynced)
            self._unsynced = []
            self._actions.append(sync)

    def _schedule_read(self) -> None:
        if self._read is None and self._hash_pos < self._count and self.is_received(self._hash_pos):
            i = self._hash_pos
            o = self.offer
            self._read = ReadChunk(
                i, i * o.chunk_size, chunk_length(i, o.size, o.chunk_size, self._count), False
            )
            self._actions.append(self._read)

    def _maybe_finish(self) -> None:
        if (
            self.state != RECEIVING
            or self._seal is None
            or self._cum < self._count
            or self._hash_pos < self._count
        ):
            return
        if not hmac.compare_digest(self._hasher.digest(), self._seal.manifest.file_hash):
            self._fail(
                Reason.HASH_MISMATCH,
                "the assembled file does not match the sender's signed hash",
                remote=False,
            )
            return
        self.state = COMMITTING
        self._actions.append(Commit(self._seal))

    def _status(self, cls: type[Accept] | type[Ack], now: float) -> Accept | Ack:
        cum = self._cum
        # Never below what was granted before (the sender keeps the maximum anyway).
        limit = max(self.limit, self._granted)
        self._credit.granted(limit, now)
        self._granted = max(self._granted, limit)
        durable: Iterable[int] = self._durable
        if self._held:
            # Held chunks (deltas) may lie beyond the credit: the sack reports below the limit
            # only; the rest is reported as the limit reaches it.
            durable = [i for i in range(cum + 1, limit) if i in self._durable]
        return cls(
            self.transfer_id,
            self.incarnation,
            cum,
            limit,
            sack_bitmap(cum, durable),
        )

    def _advance_prefix(self) -> None:
        p = self._prefix
        while p < self._count and self.is_received(p):
            p += 1
        self._prefix = p

    def _send_status(self, now: float) -> None:
        self._send(self._status(Ack, now))
        self._frame_since_status = False
        self._status_at = now + self._status_interval

    def _send(self, message: ControlMessage) -> None:
        self._actions.append(SendControl(self.sender, message))

    def _final_answer(self) -> ControlMessage:
        if self.state == DONE:
            assert self._seal is not None
            return Verified(self.transfer_id, self._seal.manifest.file_hash)
        assert self.failure is not None
        return Abort(self.transfer_id, self.failure.reason, self.failure.detail)

    def _fail(self, reason: str, detail: str, *, remote: bool) -> None:
        self.state = FAILED
        self.failure = TransferFailed(reason, detail, remote)
        self._pending.clear()
        self._unsynced = []
        if not remote:
            self._send(Abort(self.transfer_id, reason, detail))
        self._actions.append(self.failure)

    def snapshot(self) -> bytes:
        """The resumable state: the offer (with the content key), the sender, the incarnation,
        the durable chunks and the seal once received. Nothing that is not durable."""
        return pack(
            [
                _SNAPSHOT_VERSION,
                self.offer.encode(),
                self.sender,
                self.incarnation,
                self._cum,
                sorted(i for i in self._durable if i not in self._held)[:MAX_WINDOW],
                self._seal.body if self._seal else None,
                self._seal.signature if self._seal else None,
                # Held chunks not yet passed by the durable prefix, as [start, count] ranges
                # (a bounded number: past it they are simply fetched again after a restart).
                [list(r) for r in ranges_of(i for i in self._held if i >= self._cum)][
                    :_MAX_HELD_RANGES
                ]
                if self._held
                else [],
            ]
        )

    def _persist(self) -> None:
        self._actions.append(Persist(self.snapshot()))


def _decode_snapshot(
    snapshot: bytes,
) -> tuple[Offer, str, int, int, list[int], tuple[bytes, bytes] | None, list[tuple[int, int]]]:
    try:
        raw = unpack(snapshot, what="receiver snapshot", max_size=_MAX_SNAPSHOT_BYTES)
        # 9 fields since deltas (held ranges); a snapshot of 8 holds none.
        v: list[Any] = fields(raw, "receiver snapshot", 9 if len(raw) == 9 else 8)
        if want_int(v[0], "snapshot version") != _SNAPSHOT_VERSION:
            raise MalformedTransferObject("unknown snapshot version")
        offer = Offer.decode(want_bytes(v[1], "offer", max_len=_MAX_SNAPSHOT_BYTES))
        sender = check_peer_id(v[2], "sender")
        incarnation = want_int(v[3], "incarnation", lo=1, hi=MAX_INCARNATION - 1)
        cum = want_int(v[4], "durable prefix")
        durable = [
            want_int(i, "durable chunk")
            for i in want_list(v[5], "durable chunks", max_len=MAX_WINDOW)
        ]
        seal = None
        if v[6] is not None:
            seal = (
                want_bytes(v[6], "seal", max_len=MAX_MANIFEST_BYTES),
                want_bytes(v[7], "seal signature", SIGNATURE_BYTES),
            )
        held: list[tuple[int, int]] = []
        for r in want_list(v[8], "held", max_len=_MAX_HELD_RANGES) if len(v) == 9 else []:
            start, count = want_list(r, "held range", max_len=2)
            held.append((want_int(start, "held start"), want_int(count, "held count", lo=1)))
    except (RemoteProtocolError, ValueError) as exc:
        raise LocalProtocolError(f"corrupt receiver snapshot: {exc}") from exc
    return offer, sender, incarnation, cum, durable, seal, held
