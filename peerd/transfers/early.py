"""Early chunks (SPEC 7.6, 7.7): frames a sender publishes with its Offer, which may arrive
before the receiver has accepted it. They are kept, copied, within bounds, until the Offer is
accepted (then fed to the transfer) or refused; beyond the bounds or EARLY_KEEP seconds they
are dropped, and the receiver asks for them again like any lost chunk."""

from __future__ import annotations

from collections.abc import Callable

EARLY_FRAMES = 64  # per transfer
EARLY_BYTES = 32 << 20  # in all
EARLY_KEEP = 30.0  # seconds


class EarlyChunks:
    """The early chunks of offers not yet accepted, by transfer id."""

    def __init__(self, max_transfers: Callable[[], int], trusted: Callable[[str], bool]) -> None:
        self._max_transfers = max_transfers  # [limits] active_receives, read as it is now
        self._trusted = trusted
        # transfer id -> (sender, when the first came, the frames)
        self._kept: dict[bytes, tuple[str, float, list[bytes]]] = {}
        self.bytes = 0

    def keep(self, sender: str, tid: bytes, payload: bytes | memoryview, now: float) -> bool:
        """Keep a copy of `payload` for `tid`; False when it is beyond the bounds (or from an
        untrusted sender, or from another sender than the transfer's first frame)."""
        for old in [t for t, (_, since, _) in self._kept.items() if now - since > EARLY_KEEP]:
            self.take(old)
        entry = self._kept.get(tid)
        if entry is None and len(self._kept) < self._max_transfers() and self._trusted(sender):
            entry = self._kept[tid] = (sender, now, [])
        if (
            entry is None
            or entry[0] != sender
            or len(entry[2]) >= EARLY_FRAMES
            or self.bytes + len(payload) > EARLY_BYTES
        ):
            return False
        entry[2].append(bytes(payload))
        self.bytes += len(payload)
        return True

    def take(self, tid: bytes) -> list[bytes]:
        """The frames kept for `tid`, which are no longer kept."""
        _, _, frames = self._kept.pop(tid, ("", 0.0, []))
        self.bytes -= sum(len(f) for f in frames)
        return frames
