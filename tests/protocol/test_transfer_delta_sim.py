"""Held chunks (deltas, SPEC 7.11) in the transfer state machines, against the simulated
network of test_transfer_sim: a receiver that already holds chunks is never sent them, fan-out
publishes the union of what receivers miss, and crashes resume with the held chunks kept."""

from __future__ import annotations

import pytest

from protocol.transfer import delta
from tests.protocol.test_transfer_sim import (
    CHUNK,
    Link,
    Sim,
    assert_outcome,
    payload,
    small_config,
)


def test_held_chunks_are_never_published() -> None:
    sim = Sim(payload(40 * CHUNK + 17), ["bob"], held={"bob": [(0, 10), (12, 20), (35, 6)]})
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sorted(sim.published) == [10, 11, 32, 33, 34]


def test_everything_held_publishes_nothing_and_still_verifies() -> None:
    sim = Sim(payload(9 * CHUNK + 3), ["bob"], held={"bob": [(0, 10)]})
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sim.published == []


def test_fan_out_publishes_the_union_of_what_receivers_miss() -> None:
    held = {"bob": [(0, 20)], "carol": [(10, 20)]}
    sim = Sim(payload(30 * CHUNK), ["bob", "carol"], held=held)
    sim.run()
    assert_outcome(sim, all_succeed=True)
    # bob misses 20..29, carol 0..9: each published once, 10..19 not at all.
    assert sorted(sim.published) == [*range(10), *range(20, 30)]
    sim = Sim(payload(30 * CHUNK), ["bob", "carol"], held={"bob": [(0, 25)], "carol": [(5, 25)]})
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sorted(sim.published) == [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]


def test_held_chunks_far_beyond_the_window_are_skipped() -> None:
    # The window is 8 chunks: held chunks are reported as the window reaches them.
    held = [(0, 50), (51, 100), (152, 48)]
    sim = Sim(payload(200 * CHUNK), ["bob"], held={"bob": held})
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sorted(sim.published) == [50, 151]


@pytest.mark.parametrize("when", [0.005, 0.02, 0.05])
def test_receiver_crash_keeps_its_held_chunks(when: float) -> None:
    sim = Sim(
        payload(60 * CHUNK),
        ["bob"],
        held={"bob": [(0, 20), (30, 20)]},
        chunks=Link(delay=(0.002, 0.004)),
    )
    sim.at(when, lambda: sim.crash_receiver("bob", 0.5))
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert set(sim.published) <= set(range(20, 30)) | set(range(50, 60))


def test_lossy_network_with_held_chunks_delivers_exact_bytes() -> None:
    lossy = Link(loss=0.1, dup=0.05, delay=(0.0005, 0.01))
    sim = Sim(
        payload(50 * CHUNK + 9),
        ["bob", "carol"],
        seed=3,
        chunks=lossy,
        control=Link(loss=0.05, delay=(0.0005, 0.01)),
        held={"bob": [(0, 25)], "carol": [(20, 31)]},
    )
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert set(sim.published) <= set(range(51))


@pytest.mark.parametrize("receivers", [["bob"], ["bob", "carol"]])
def test_a_delta_candidate_sends_one_early_chunk_per_receiver(receivers: list[str]) -> None:
    # SPEC 7.7/7.11: an identical resend costs the first chunk, published early to each
    # receiver (which holds it already and drops it unread), and nothing else.
    config = small_config(early_window=delta.early_window(len(receivers)))
    sim = Sim(
        payload(30 * CHUNK + 5),
        receivers,
        config=config,
        held={p: [(0, 31)] for p in receivers},
    )
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sim.published == [0] * len(receivers) * delta.DELTA_EARLY_CHUNKS


def test_a_delta_candidates_early_chunk_counts_when_it_is_missing() -> None:
    # The receiver holds everything but the first chunk: the early copy is the one it keeps,
    # so chunk 0 is published once, early, and not again after the Accept.
    sim = Sim(
        payload(30 * CHUNK),
        ["bob"],
        config=small_config(early_window=delta.early_window(1)),
        held={"bob": [(1, 29)]},
    )
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sim.published == [0]
