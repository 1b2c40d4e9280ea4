"""Held chunks (deltas, SPEC 7.11) in the transfer state machines, against the simulated
network of test_transfer_sim: a receiver that already holds chunks is never sent them, fan-out
publishes the union of what receivers miss, and crashes resume with the held chunks kept."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.transfer import delta
from tests.protocol.test_transfer_sim import (
    CHUNK,
    Link,
    Sim,
    Step,
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


# -- a streamed recipe: credit only as far as the parts looked up --------------------------------


def _streamed(count: int, steps: list[tuple[float, list[tuple[int, int]], int]], reach: int) -> Sim:
    return Sim(
        payload(count * CHUNK),
        ["bob"],
        config=small_config(early_window=delta.early_window(1)),
        streamed={"bob": (reach, steps)},
    )


def test_a_streamed_recipe_never_lets_a_held_chunk_be_published() -> None:
    # The parts come while chunks flow; each covers more of the file and finds some of it
    # held. Credit never passes the reach (checked on every publish by the Sim), so no chunk
    # a later part finds held is ever sent.
    steps = [
        (0.01, [(12, 5)], 20),
        (0.03, [(20, 10)], 40),
        (0.05, [(45, 15)], 60),
        (0.08, [(70, 30)], 100),
    ]
    sim = _streamed(100, steps, reach=10)
    sim.run()
    assert_outcome(sim, all_succeed=True)
    held = {*range(12, 17), *range(20, 30), *range(45, 60), *range(70, 100)}
    # (as a set: the simulated link reorders, and a gap is repaired by sending a chunk again)
    assert set(sim.published) == set(range(100)) - held


def test_credit_stops_at_the_reach_until_the_next_part() -> None:
    sim = _streamed(100, [(0.5, [], 100)], reach=10)
    sim.run(until=0.4)
    assert sorted(set(sim.published)) == list(range(10))
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert sorted(set(sim.published)) == list(range(100))


def test_a_recipe_that_stops_coming_lifts_the_cap_and_the_rest_is_fetched() -> None:
    # Parts after the second never arrive: after recipe_wait the receiver fetches the rest.
    config = small_config(early_window=1)
    sim = Sim(
        payload(60 * CHUNK),
        ["bob"],
        config=config,
        streamed={"bob": (10, [(0.01, [(10, 10)], 30)])},
    )
    sim.run(until=config.recipe_wait - 1)
    assert max(sim.published) < 30
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert set(sim.published) == {*range(10), *range(20, 60)}


def test_a_part_after_the_cap_was_lifted_changes_nothing() -> None:
    config = small_config(early_window=1)
    late = config.recipe_wait + 1.0
    sim = Sim(
        payload(40 * CHUNK),
        ["bob"],
        config=config,
        streamed={"bob": (10, [(late, [(20, 20)], 40)])},
    )
    sim.run()
    assert_outcome(sim, all_succeed=True)
    assert set(sim.published) == set(range(40))


@pytest.mark.parametrize("when", [0.005, 0.02, 0.06])
def test_a_receiver_restarted_mid_recipe_resumes_without_a_cap(when: float) -> None:
    steps = [(0.01, [(10, 10)], 30), (0.04, [(30, 10)], 50), (0.08, [], 60)]
    sim = Sim(
        payload(60 * CHUNK),
        ["bob"],
        config=small_config(early_window=1),
        chunks=Link(delay=(0.002, 0.004)),
        streamed={"bob": (10, steps)},
    )
    sim.at(when, lambda: sim.crash_receiver("bob", 0.2))
    sim.run()
    assert_outcome(sim, all_succeed=True)


def test_a_streamed_recipe_over_a_lossy_network_delivers_exact_bytes() -> None:
    steps = [(0.005 * k, [(10 * k + 2, 5)], 10 * k + 10) for k in range(1, 8)]
    sim = Sim(
        payload(80 * CHUNK + 7),
        ["bob"],
        seed=5,
        config=small_config(early_window=1),
        chunks=Link(loss=0.1, dup=0.05, delay=(0.0005, 0.01)),
        control=Link(loss=0.05, delay=(0.0005, 0.01)),
        streamed={"bob": (10, [*steps, (0.05, [], 81)])},
    )
    sim.run()
    assert_outcome(sim, all_succeed=True)
    held = {i for k in range(1, 8) for i in range(10 * k + 2, 10 * k + 7)}
    assert not held & set(sim.published)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(4, 60),
    receivers=st.integers(1, 3),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    keep=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=6, max_size=6),
    gap=st.sampled_from([0.001, 0.02, 0.3]),
    lose_last=st.booleans(),
    loss=st.sampled_from([0.0, 0.1]),
    crash=st.one_of(st.none(), st.floats(0.0, 0.1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_streamed_recipe_delivers_exact_bytes_and_never_sends_what_it_holds(
    count: int,
    receivers: int,
    cuts: list[float],
    keep: list[tuple[float, float]],
    gap: float,
    lose_last: bool,
    loss: float,
    crash: float | None,
    seed: int,
) -> None:
    # Each receiver's recipe reaches further at each step (`cuts`), and in each stretch it
    # holds a sub-range (`keep`); the last step may never come (the cap lifts after
    # recipe_wait), links may lose and duplicate, bob may crash. The file is always exact,
    # and without a crash no chunk a receiver held before its credit reached it is published
    # unless another receiver missed it.
    peers = ["bob", "carol", "dave"][:receivers]
    tail = seed % CHUNK  # a short last chunk, or none
    total = count + (tail > 0)
    reaches = sorted({max(1, int(c * count)) for c in cuts} | {total})
    streamed: dict[str, tuple[int, list[Step]]] = {}
    held_by: dict[str, set[int]] = {}
    for n, peer in enumerate(peers):
        steps: list[Step] = []
        held: set[int] = set()
        prev = reaches[0]
        for k, reach in enumerate(reaches[1:]):
            a, b = keep[(k + n) % len(keep)]
            lo = prev + int(min(a, b) * (reach - prev))
            hi = prev + int(max(a, b) * (reach - prev))
            ranges = [(lo, hi - lo)] if hi > lo else []
            held.update(range(lo, hi))
            steps.append((gap * (k + 1), ranges, reach))
            prev = reach
        if lose_last and len(steps) > 1:
            last = steps.pop()
            held -= set(range(last[1][0][0], sum(last[1][0]))) if last[1] else set()
        streamed[peer] = (reaches[0], steps)
        held_by[peer] = held
    sim = Sim(
        payload(count * CHUNK + tail, seed),
        peers,
        seed=seed,
        config=small_config(early_window=delta.early_window(len(peers))),
        chunks=Link(loss, 0.05, (0.0005, 0.01)),
        control=Link(loss, 0.05, (0.0005, 0.01)),
        streamed=streamed,
    )
    if crash is not None:
        sim.at(crash, lambda: sim.crash_receiver("bob", 0.3))
    sim.run(until=3600.0)
    assert_outcome(sim, all_succeed=True)
    if crash is None:
        everyone_held = set.intersection(*held_by.values())
        assert not everyone_held & set(sim.published)
