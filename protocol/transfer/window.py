"""How much credit a receiver grants: a window sized from what the transfer measures.

A fixed window W caps a transfer at W / RTT: 64 chunks of 256 KiB (16.8 MB) are ample on a LAN
and starve a 125 MB/s path at 200 ms (25 MB in flight). The receiver therefore measures, in the
spirit of BBR (Cardwell et al., 2016) and of TCP's receive-window autotuning (Fisk and Feng's
Dynamic Right-Sizing; Linux's tcp_rcv_space_adjust):

- **the round trip**: an Ack granting credit from index L leaves at time t; chunk L cannot arrive
  before the sender has that Ack, so `arrival(first index >= L) - t` is at least one round trip,
  and exactly one when the sender was waiting for that credit. A sample counts only when the
  sender visibly waited: nothing arrived for at least a quarter of the sample before chunk L
  did. Otherwise chunk L waited behind a backlog of earlier chunks at the bottleneck (the sender
  had more credit than the path holds), and the sample measures that queue, not the path; the
  window is then large enough anyway. (Nor does the Accept's first credit count: a sender may
  send that much before it has heard anything.) The minimum over the transfer is
  the estimate (a sample is never below the true round trip, so the minimum only gets better).
- **the delivery rate**: bytes received per round (a round lasts the round trip, at least
  `MIN_ROUND`), the maximum of the last `RATE_ROUNDS` rounds.

and sets `window = gain x rate x round trip` (2 x the bandwidth-delay product), never below the
initial window and never above the memory bound. While credit limits the sender, a round
delivers one window, so the window doubles every round trip (like slow start, without loss as
the signal); once the path (or a CPU) limits the rate, the window settles at twice what the path
holds. It only grows: like TCP's receive buffer, a window larger than needed costs nothing while
the sender is paced by the path, and shrinking it would cut the rate whenever a round measured
low (a descheduled process on a busy machine).

Sans-IO: `now` is an input; the receiver calls `granted` whenever it sends credit and `arrived`
for every new chunk.
"""

from __future__ import annotations

import math
from collections import deque

MIN_ROUND = 0.01  # s: shorter rounds measure the scheduler, not the path
RATE_ROUNDS = 10  # the delivery rate is the maximum over this many rounds


class CreditWindow:
    """The receiver's window, in chunks. See the module docstring."""

    __slots__ = (
        "_grants",
        "_last_arrival",
        "_last_grant",
        "_rates",
        "_round_bytes",
        "_round_start",
        "chunk_size",
        "gain",
        "initial",
        "maximum",
        "min_rtt",
        "window",
    )

    def __init__(
        self,
        *,
        initial: int,
        maximum: int,
        chunk_size: int,
        gain: float = 2.0,
        start: int | None = None,
    ) -> None:
        """`initial` is the smallest window; `start` (default `initial`) where this transfer
        starts, e.g. the window the previous transfer from the same sender reached, so that a
        path already measured is not probed again from the bottom."""
        if not 1 <= initial <= maximum or chunk_size < 1 or gain < 1:
            raise ValueError("need 1 <= initial <= maximum, chunk_size >= 1 and gain >= 1")
        self.initial = initial
        self.maximum = maximum
        self.chunk_size = chunk_size
        self.gain = gain
        self.window = min(max(initial, start or initial), maximum)
        self.min_rtt: float | None = None
        # (first newly granted index, when): credit not yet "used" by an arrival.
        self._grants: deque[tuple[int, float]] = deque()
        self._last_grant = 0  # the highest limit granted so far
        self._last_arrival: float | None = None
        self._rates: deque[float] = deque(maxlen=RATE_ROUNDS)
        self._round_start: float | None = None
        self._round_bytes = 0

    @property
    def rate(self) -> float:
        """The delivery rate estimate, bytes/s (0 before a round has completed)."""
        return max(self._rates, default=0.0)

    def granted(self, limit: int, now: float) -> None:
        """Credit up to `limit` (exclusive) was sent at `now`."""
        if limit > self._last_grant and self._last_grant == 0:
            # The first credit (the Accept) is no yardstick: a sender may send that much before
            # it has heard anything (early chunks, SPEC 7.7), so those chunks may arrive at
            # once. Chunks beyond it cannot leave before an Ack reached the sender.
            self._last_grant = limit
        elif limit > self._last_grant:
            if len(self._grants) >= 4 * RATE_ROUNDS:
                self._grants.popleft()  # bounded; the oldest mark is the least useful
            self._grants.append((self._last_grant, now))
            self._last_grant = limit

    def arrived(self, index: int, length: int, now: float) -> None:
        """A chunk not received before arrived at `now`."""
        grants = self._grants
        if grants and index >= grants[0][0]:
            # The latest grant that covered `index` first is the one it waited for.
            sent = grants.popleft()[1]
            while grants and index >= grants[0][0]:
                sent = grants.popleft()[1]
            sample = max(now - sent, 0.0)
            waited = now - (sent if self._last_arrival is None else self._last_arrival)
            if (self.min_rtt is None or sample < self.min_rtt) and waited >= sample / 4:
                self.min_rtt = sample
        self._last_arrival = now
        if self.min_rtt is None:
            return
        if self._round_start is None:
            self._round_start, self._round_bytes = now, 0
        self._round_bytes += length
        elapsed = now - self._round_start
        if elapsed >= max(self.min_rtt, MIN_ROUND):
            self._rates.append(self._round_bytes / elapsed)
            self._round_start, self._round_bytes = now, 0
            self._resize()

    def _resize(self) -> None:
        assert self.min_rtt is not None
        want = math.ceil(self.gain * self.rate * self.min_rtt / self.chunk_size)
        self.window = max(self.window, min(want, self.maximum))
