"""The receiver's window controller (protocol/transfer/window.py) on simulated paths: simulated
time, no clock. A path is a round trip and a bottleneck rate; the sender sends whatever its
credit allows, the bottleneck serialises it, and credit travels back half a round trip later."""

from __future__ import annotations

import heapq
import itertools

import nacl.signing
import pytest

from protocol.transfer import (
    ChunkCipher,
    Offer,
    ReceiverTransfer,
    SendControl,
    Sync,
    TransferConfig,
    frame_buffer,
)
from protocol.transfer.window import CreditWindow

CHUNK = 256 * 1024


def simulate(
    rtt: float, rate: float, seconds: float, *, initial: int = 64, maximum: int = 256
) -> tuple[CreditWindow, float]:
    """Run a bulk transfer for `seconds` through a path of `rtt` and `rate` bytes/s with credit
    granted on receipt (an Ack every quarter window). Returns the controller and the delivery
    rate over the last quarter of the run."""
    cw = CreditWindow(initial=initial, maximum=maximum, chunk_size=CHUNK)
    seq = itertools.count()
    events: list[tuple[float, int, str, int]] = []  # (time, tiebreak, kind, value)
    limit_at_sender = 0
    sent = 0
    received = 0
    granted = 0
    free_at = 0.0  # when the bottleneck is next free
    arrivals: list[float] = []

    def grant(now: float) -> None:
        nonlocal granted
        limit = received + cw.window
        if limit > granted:
            cw.granted(limit, now)
            granted = limit
            heapq.heappush(events, (now + rtt / 2, next(seq), "credit", limit))

    def send(now: float) -> None:
        nonlocal sent, free_at
        while sent < limit_at_sender:
            free_at = max(free_at, now) + CHUNK / rate
            heapq.heappush(events, (free_at + rtt / 2, next(seq), "chunk", sent))
            sent += 1

    grant(0.0)
    while events:
        now, _, kind, value = heapq.heappop(events)
        if now > seconds:
            break
        if kind == "credit":
            limit_at_sender = max(limit_at_sender, value)
            send(now)
        else:
            cw.arrived(value, CHUNK, now)
            received += 1
            arrivals.append(now)
            if received + cw.window >= granted + max(1, cw.window // 4):
                grant(now)
    tail = [t for t in arrivals if t >= 0.75 * seconds]
    return cw, len(tail) * CHUNK / (seconds / 4)


@pytest.mark.parametrize(
    ("rtt", "rate"),
    [(0.020, 50e6), (0.080, 50e6), (0.200, 50e6), (0.080, 125e6), (0.200, 125e6)],
)
def test_window_grows_to_twice_the_path_and_fills_it(rtt: float, rate: float) -> None:
    cw, delivered = simulate(rtt, rate, seconds=max(3.0, 30 * rtt))
    bdp_chunks = rate * rtt / CHUNK
    if cw.min_rtt is not None:  # measured only when credit made the sender wait
        assert rtt <= cw.min_rtt <= rtt + 2 * CHUNK / rate  # a round trip, plus serialisation
    # Where the initial window is short of 1.5 x the path it grows, up to 2 x the
    # bandwidth-delay product (within the measurement's granularity of a chunk per round).
    assert cw.window >= min(1.5 * bdp_chunks, 256)
    assert cw.window <= max(64, 2 * bdp_chunks * 1.15 + 2)
    # Whatever it settles at, the path is full.
    assert delivered >= 0.97 * rate


def test_the_long_fat_path_is_measured() -> None:
    cw, _ = simulate(0.200, 125e6, seconds=6.0)
    assert cw.min_rtt is not None
    assert 0.200 <= cw.min_rtt <= 0.200 + 2 * CHUNK / 125e6
    assert cw.rate >= 0.97 * 125e6


def test_a_fixed_window_would_not_fill_a_long_fat_path() -> None:
    """The baseline the controller removes: 64 chunks at 200 ms carry 84 MB/s at most."""
    cw, delivered = simulate(0.200, 125e6, seconds=6.0, maximum=64)
    assert cw.window == 64
    assert delivered <= 64 * CHUNK / 0.200 * 1.01
    assert delivered < 0.7 * 125e6


def test_a_short_path_keeps_the_initial_window() -> None:
    # A LAN / loopback broker: 0.5 ms at 600 MB/s holds ~1 chunk; the initial window stays.
    cw, delivered = simulate(0.0005, 600e6, seconds=1.0)
    assert cw.window == 64
    assert delivered >= 0.97 * 600e6


def test_the_window_stays_within_its_memory_bound() -> None:
    # 125 MB/s at 1 s holds 477 chunks: twice that is far beyond the bound of 256.
    cw, _ = simulate(1.0, 125e6, seconds=20.0, maximum=256)
    assert cw.window == 256


def test_a_sender_never_short_of_credit_gives_no_round_trip_sample() -> None:
    # Credit far ahead of the sender (a large initial window): every chunk waited behind
    # earlier ones at the bottleneck, not for its credit, so no sample is taken (it would
    # measure that queue), and the window, ample, stays.
    cw, delivered = simulate(0.050, 50e6, seconds=3.0, initial=256, maximum=256)
    assert cw.min_rtt is None
    assert cw.window == 256
    assert delivered >= 0.97 * 50e6


def test_it_only_grows() -> None:
    cw = CreditWindow(initial=4, maximum=100, chunk_size=1000)
    cw.granted(4, 0.0)  # the Accept: no yardstick (early chunks may come at once)
    for i in range(4):
        cw.arrived(i, 1000, 0.001 + i * 0.001)
    assert cw.min_rtt is None
    cw.granted(8, 0.01)
    cw.arrived(4, 1000, 0.11)  # after a silence: the sender waited for this credit
    assert cw.min_rtt == pytest.approx(0.1)
    for i in range(5, 200):  # fast rounds: 1000 B / ms
        cw.arrived(i, 1000, 0.11 + (i - 4) * 0.001)
    grown = cw.window
    assert grown > 4
    for i in range(200, 220):  # then a trickle
        cw.arrived(i, 1000, 1.0 + (i - 200) * 0.5)
    assert cw.window == grown


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="initial"):
        CreditWindow(initial=10, maximum=5, chunk_size=1)
    with pytest.raises(ValueError, match="gain"):
        CreditWindow(initial=1, maximum=5, chunk_size=1, gain=0.5)


def test_receiver_grants_credit_on_receipt_and_grows_its_window() -> None:
    """The state machine: on a 200 ms path the Acks carry more credit before any chunk is
    durable, and the window grows past its initial size."""
    sk = nacl.signing.SigningKey(bytes(range(32)))
    count = 600
    offer = Offer(bytes(16), "model.bin", count * 1024, 1024, count, 1000, bytes(range(32)))
    config = TransferConfig(chunk_size=1024, window=8, sync_batch=8, max_window_bytes=64 * 1024)
    rt = ReceiverTransfer(
        offer, sender="alice", sender_key=bytes(sk.verify_key), now=0.0, config=config
    )
    cipher = ChunkCipher(offer.content_key, offer.transfer_id)
    out = frame_buffer(1024)
    limits: list[tuple[int, int]] = []  # (cum, limit) of every status sent

    credit_in_flight: list[tuple[float, int]] = []  # (when it reaches the sender, limit)

    def status(actions: list[object], now: float) -> None:
        for a in actions:
            if isinstance(a, SendControl) and hasattr(a.message, "limit"):
                limits.append((a.message.cum, a.message.limit))
                credit_in_flight.append((now + 0.1, a.message.limit))

    status(rt.take_actions(), 0.0)
    # The sender sends at 1 chunk per ms whatever it is allowed, credit reaching it 100 ms
    # after it was granted and each chunk arriving 100 ms after it was sent.
    sender_limit, next_index, t = limits[-1][1], 0, 0.0
    syncing: list[tuple[float, Sync]] = []  # each fsync takes 50 ms
    while next_index < count and t < 30.0:
        t += 0.001
        while credit_in_flight and credit_in_flight[0][0] <= t:
            sender_limit = max(sender_limit, credit_in_flight.pop(0)[1])
        while syncing and syncing[0][0] <= t + 0.1:
            rt.on_synced(syncing.pop(0)[1], t + 0.1)
            late = rt.take_actions()
            status(late, t + 0.1)
            syncing += [(t + 0.15, a) for a in late if isinstance(a, Sync)]
        if round(t * 1000) % 10 == 0:
            rt.on_timer(t + 0.1)  # a batch of fewer than 8 written chunks is synced after 50 ms
            late = rt.take_actions()
            status(late, t + 0.1)
            syncing += [(t + 0.15, a) for a in late if isinstance(a, Sync)]
        if next_index < sender_limit:
            n = cipher.seal_into(out, next_index, next_index == count - 1, bytes(1024), bytes(8))
            frame = bytes(out[:n])
            next_index += 1
            arrival = t + 0.1
            assert rt.on_frame(frame, bytearray(1024), arrival) is not None
            actions = rt.take_actions()
            status(actions, arrival)
            syncing += [(arrival + 0.05, a) for a in actions if isinstance(a, Sync)]
    assert next_index == count
    # Credit beyond the first window went out before anything was durable.
    first_more = next(cum for cum, limit in limits if limit > 8)
    assert first_more == 0
    assert rt.window > 8  # grown from what it measured (1 chunk/ms x 200 ms)


@pytest.mark.parametrize(("start", "window"), [(None, 8), (40, 40), (1000, 64), (2, 8)])
def test_a_receiver_may_start_where_the_last_transfer_left_the_window(
    start: int | None, window: int
) -> None:
    """The shell passes the window the previous transfer from this sender reached; it is
    clamped to the configured bounds, and the Accept grants it at once."""
    sk = nacl.signing.SigningKey(bytes(range(32)))
    offer = Offer(bytes(16), "model.bin", 500 * 1024, 1024, 500, 1000, bytes(range(32)))
    config = TransferConfig(chunk_size=1024, window=8, sync_batch=8, max_window_bytes=64 * 1024)
    rt = ReceiverTransfer(
        offer,
        sender="alice",
        sender_key=bytes(sk.verify_key),
        now=0.0,
        config=config,
        start_window=start,
    )
    [accept] = [a.message for a in rt.take_actions() if isinstance(a, SendControl)]
    assert rt.window == window
    assert accept.limit == window  # type: ignore[union-attr]
