"""What real erasure costs: the WAL checkpoint (TRUNCATE) the store runs after a commit that
erases a secret (peerd/store/erasure.py), on a real store file with synchronous = FULL.

Measured, interleaved so drift hits all alike:
- persist: an ordinary commit (a transfer's snapshot persisted again), the commonest write;
- erase:   the commit that ends a transfer (snapshot = NULL), scrub included;
- erase, no scrub: the same commit with the scrub switched off (the cost before the fix).
Goal (issue 18): the scrub adds at most 10 ms to the end of a transfer or the use of an invite,
events that happen once per transfer or pairing, never per chunk or per message."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from peerd.store import Store
from peerd.store.core import StoreCore
from scripts.benchmarks.common import median, percentile, table, verdict

GOAL_MS = 10.0
PERSISTS_PER_TRANSFER = 30  # snapshots written while a transfer runs (they fill the WAL)


async def _transfer(store: Store, tid: bytes, times: list[float]) -> None:
    async with store.transaction(0.0) as tx:
        await tx.execute(
            "INSERT INTO transfers (transfer_id, role, peers, name, size, path, state,"
            " created_at, updated_at) VALUES (?, 'send', '[]', 'f', 1, '/f', 'active', 0, 0)",
            (tid,),
        )
    for _ in range(PERSISTS_PER_TRANSFER):
        t0 = time.perf_counter()
        async with store.transaction(0.0) as tx:
            await tx.execute(
                "UPDATE transfers SET snapshot = ? WHERE transfer_id = ?",
                (os.urandom(600), tid),
            )
        times.append(time.perf_counter() - t0)


async def _erase(store: Store, tid: bytes) -> float:
    t0 = time.perf_counter()
    async with store.transaction(0.0) as tx:
        await tx.execute(
            "UPDATE transfers SET state = 'verified', snapshot = NULL WHERE transfer_id = ?",
            (tid,),
        )
    return time.perf_counter() - t0


async def _run(rounds: int, directory: Path) -> tuple[list[float], list[float], list[float]]:
    store = await Store.open(directory / "peerd.db", network="bench", overlap=0.0, create=True)
    persist: list[float] = []
    scrubbed: list[float] = []
    unscrubbed: list[float] = []
    real = StoreCore._scrub_locked

    async def skip(self: StoreCore) -> bool:
        self._erased = False
        self._erased_lazily = None
        return True

    try:
        for i in range(rounds):
            await _transfer(store, b"s%015d" % i, persist)
            scrubbed.append(await _erase(store, b"s%015d" % i))
            StoreCore._scrub_locked = skip  # type: ignore[method-assign]
            try:
                await _transfer(store, b"u%015d" % i, persist)
                unscrubbed.append(await _erase(store, b"u%015d" % i))
            finally:
                StoreCore._scrub_locked = real  # type: ignore[method-assign]
    finally:
        await store.close()
    return persist, scrubbed, unscrubbed


def run(quick: bool = False) -> bool:
    rounds = 10 if quick else 100
    with tempfile.TemporaryDirectory(prefix="peerd-bench-erasure-", dir=Path.home()) as d:
        persist, scrubbed, unscrubbed = asyncio.run(_run(rounds, Path(d)))
    ms = 1000.0
    added = (median(scrubbed) - median(unscrubbed)) * ms
    table(
        ["commit", "median ms", "p90 ms", "n"],
        [
            [
                "persist a snapshot",
                f"{median(persist) * ms:.2f}",
                f"{percentile(persist, 90) * ms:.2f}",
                len(persist),
            ],
            [
                "end a transfer, scrub",
                f"{median(scrubbed) * ms:.2f}",
                f"{percentile(scrubbed, 90) * ms:.2f}",
                rounds,
            ],
            [
                "end a transfer, no scrub",
                f"{median(unscrubbed) * ms:.2f}",
                f"{percentile(unscrubbed, 90) * ms:.2f}",
                rounds,
            ],
        ],
    )
    ok = added <= GOAL_MS
    print(f"\nthe scrub adds {added:.2f} ms per erasure (goal <= {GOAL_MS:.0f} ms): {verdict(ok)}")
    return ok
