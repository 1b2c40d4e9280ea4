"""What the transfer state machines ask of the shell (actions) and tell it (events), and their
tunables. All are frozen dataclasses; the shell dispatches on their type."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import LocalProtocolError
from protocol.transfer.manifest import DEFAULT_CHUNK_SIZE, SignedManifest
from protocol.transfer.messages import MAX_WINDOW, ControlMessage


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Tunables of both sides. Times are seconds. The initial window suits a LAN or loopback
    broker: at ~600 MB/s 64 chunks of 256 KiB are ~27 ms of data, far above the ~0.4 ms QoS 0
    round trip; on a long path the receiver grows it to twice the measured bandwidth-delay
    product, up to `max_window_bytes` (32 MiB: 167 MB/s at 200 ms)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Receiver: the initial (and smallest) window, in chunks: credit granted beyond what has
    # arrived. Chunks in flight plus data written but not durable stay within two windows, which
    # also bounds what is re-sent after either side crashes.
    window: int = 64
    # Receiver: the window grows to window_gain x delivery rate x round trip (both measured,
    # protocol/transfer/window.py), at most this many bytes of chunks (and MAX_WINDOW / 2).
    # Two windows (the most in flight to a receiver whose fsyncs lag) then fit the shipped
    # broker's queue per client (max_queued_bytes 64 MiB), so a slow receiver's chunks wait at
    # the broker instead of being dropped there.
    max_window_bytes: int = 32 << 20
    window_gain: float = 2.0
    # Sender: chunks it may publish to each receiver before its Accept (to the receiver's early
    # topic), so the first chunks travel with the Offer instead of a round trip after it. At
    # most the initial window (a receiver accepts them as part of its first credit), shared
    # among the receivers (the early chunks are published once per receiver). 0: none.
    early_window: int = 64
    # Receiver: ask for a sync once this many written chunks are not yet durable ...
    sync_batch: int = 16
    # ... or once the oldest of them has waited this long.
    sync_delay: float = 0.05
    # Receiver: a gap (a later chunk arrived, an earlier one did not) older than this is
    # re-requested; one publisher over one TCP connection does not reorder, so a gap is a loss.
    repair_delay: float = 0.05
    # Receiver: with no chunk arriving, report status (and request the head of the window) at
    # this interval, doubling while idle up to max_status_interval.
    status_interval: float = 0.5
    max_status_interval: float = 30.0
    # Sender: re-send the offer to a receiver that has not answered it, or has been silent for
    # this long (it answers with its state), doubling up to max_probe_interval.
    probe_interval: float = 2.0
    max_probe_interval: float = 60.0
    # Receiver: while a streamed recipe (deltas, SPEC 7.11) caps the credit at what its parts
    # cover, a part must come within this long of the last, or the cap is lifted and the rest
    # of the file is fetched whole (a lost part costs only the delta).
    recipe_wait: float = 5.0
    # Sender: before the first chunk, wait this long for every receiver to answer the offer, so
    # that all start together and each chunk is published once.
    start_wait: float = 1.0
    # Sender: a receiver that holds the group back (no credit) for this long stops pacing it; it
    # catches up later with its own re-sends.
    lag_timeout: float = 5.0
    # Sender: chunk reads handed to the shell and not yet returned.
    max_outstanding_reads: int = 64
    # Both sides: with nothing heard from the peer for this long, give up on it (reason
    # timeout). A receiver frees its slot and reserved space from a sender that went quiet; a
    # sender stops offering to, and holding its slot and content key for, a receiver that is
    # silent or gone. A live sender probes at least every max_probe_interval and a live
    # receiver reports at least every max_status_interval; a stopped peer that comes back
    # within this resumes.
    idle_timeout: float = 6 * 3600.0
    # Sender: restarts (new incarnations) one receiver may announce in one transfer; each can
    # cost a window of re-sends. Beyond, the receiver is dropped (reason over-budget).
    max_restarts: int = 16
    # Sender: chunks one receiver may have sent again (repairs, restarts), as a fraction of the
    # file's chunk count, but at least resend_floor chunks so a small file survives a lossy path
    # (the simulator at 30% loss needed up to 4x a 1-chunk file, 30 re-sends of an 8-chunk one;
    # a receiver killed while the broker held its chunks, on a loaded machine, needed 1x a
    # 120-chunk file: 4x leaves room). Beyond, the receiver is dropped (reason over-budget):
    # what a receiver's claims can cost the sender, the broker and every co-receiver is
    # bounded by the file, not by its wishes.
    resend_ratio: float = 4.0
    resend_floor: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.window <= MAX_WINDOW // 2:
            raise LocalProtocolError(f"window must be in 1..{MAX_WINDOW // 2}")
        if self.early_window < 0:
            raise LocalProtocolError("early_window must not be negative")
        if self.max_window_bytes < 0 or not self.window_gain >= 1:
            raise LocalProtocolError("max_window_bytes must be >= 0 and window_gain >= 1")
        if not 1 <= self.sync_batch <= self.window:
            raise LocalProtocolError("sync_batch must be in 1..window")
        if self.max_outstanding_reads < 1:
            raise LocalProtocolError("max_outstanding_reads must be positive")
        for name in (
            "sync_delay",
            "repair_delay",
            "status_interval",
            "probe_interval",
            "start_wait",
            "lag_timeout",
            "resend_ratio",
        ):
            if not getattr(self, name) >= 0:
                raise LocalProtocolError(f"{name} must not be negative")
        if not self.idle_timeout > 0:
            raise LocalProtocolError("idle_timeout must be positive")
        if self.max_restarts < 0 or self.resend_floor < 1:
            raise LocalProtocolError("max_restarts must be >= 0 and resend_floor >= 1")
        if self.max_status_interval < self.status_interval:
            raise LocalProtocolError("max_status_interval must be >= status_interval")
        if self.max_probe_interval < self.probe_interval:
            raise LocalProtocolError("max_probe_interval must be >= probe_interval")

    def max_window_for(self, chunk_size: int) -> int:
        """The largest window, in chunks, for a transfer of `chunk_size` chunks: the memory
        bound, but never below the initial window (nor above MAX_WINDOW / 2, so that two
        windows beyond the durable prefix fit the wire's limit)."""
        return max(self.window, min(self.max_window_bytes // chunk_size, MAX_WINDOW // 2))


# -- actions: the shell must do these ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendControl:
    """Send `message.encode()` to `peer` inside its Noise session."""

    peer: str
    message: ControlMessage


@dataclass(frozen=True, slots=True)
class ReadChunk:
    """Read `length` bytes at `offset` of the file and hand them back (`on_chunk_read` /
    `on_read`), in the order these were issued."""

    index: int
    offset: int
    length: int
    publish: bool  # sender only: the data becomes a frame to publish (else it is only hashed)
    # Sender only: an early chunk (SPEC 7.7), published to each of these receivers' early
    # topics instead of the transfer topic, before they accepted.
    early: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WriteChunk:
    """Write `data` at `offset` of the temporary file before calling the receiver again.

    `data` is a view of the caller's buffer passed to `on_frame`."""

    index: int
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Sync:
    """Make every write handed out before this action durable (fdatasync), then call
    `on_synced(sync)`. At most one is outstanding."""

    token: int


@dataclass(frozen=True, slots=True)
class Persist:
    """Store `snapshot` as this transfer's resumable state (replacing the previous one);
    `restore(snapshot, ...)` rebuilds the machine. It must be stored before any later
    SendControl goes out. Only the latest matters: a shell may coalesce several. It contains
    the content key."""

    snapshot: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """Receiver: every chunk is durable and the file matches the signed manifest. Rename the
    temporary file into place, fsync the directory, then call `committed()`."""

    manifest: SignedManifest


# -- events: the shell reports these ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    peer: str


@dataclass(frozen=True, slots=True)
class Progress:
    """Chunks (and bytes) that `peer` has durably received."""

    peer: str
    chunks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Sealed:
    """Sender: the whole file has been hashed and the manifest signed (also in the snapshot)."""

    manifest: SignedManifest


@dataclass(frozen=True, slots=True)
class ReceiverVerified:
    peer: str


@dataclass(frozen=True, slots=True)
class ReceiverFailed:
    """Sender: this receiver will not get the file. `refused` if it declined the offer,
    `remote` if it (rather than this side) ended it."""

    peer: str
    reason: str
    detail: str
    remote: bool
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """Sender: every receiver has verified or failed; erase the content key."""

    verified: tuple[str, ...]
    failed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """Receiver: the transfer ended without a file; delete the temporary file and erase the
    content key. `remote` if the sender ended it."""

    reason: str
    detail: str
    remote: bool


SenderAction = (
    SendControl
    | Persist
    | Accepted
    | Progress
    | Sealed
    | ReceiverVerified
    | ReceiverFailed
    | Finished
)
ReceiverAction = SendControl | Sync | ReadChunk | Persist | Progress | Commit | TransferFailed
