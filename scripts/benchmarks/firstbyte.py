"""Time to first transfer byte across emulated WAN paths, alone (issue 13 item 3).

The same measurement as the first-byte table of `scripts/bench wan` (scripts/benchmarks/wan.py:
the same delay lines, daemons, observer and definitions), without the throughput runs around it,
so that the session layer's part can be measured in a few minutes: at 20, 80 and 200 ms round
trip (50 MB/s links), and at loopback (the local processing), for a known peer with no session
(both daemons restarted) and with the session up. In round trips: all of it, and beyond the
loopback figure. The baseline in the same run: the known peer restarted *without* resumption
tickets (both stores' `tickets` emptied while stopped), i.e. an XX handshake as before
protocol/SPEC.md 4.7.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import sqlite3
from pathlib import Path

from scripts.bench_mqtt import _test_file
from scripts.benchmarks._cluster import load_average, shipped_cluster
from scripts.benchmarks.common import median, table, verdict
from scripts.benchmarks.transfer import peerd_send
from scripts.benchmarks.wan import (
    GOAL_FIRST_BYTE_RTTS,
    LINKS,
    RTTS,
    Bench,
    FirstFrames,
    Results,
    _timed_send,
    _url,
)
from tests.support.cluster import Node, wait_until


def without_tickets(bench: Bench, path: Path, runs: int) -> list[float]:
    """wan.first_byte's cold case with both daemons' tickets erased while they are stopped."""
    sender, receiver = bench.sender, bench.receiver
    observer = FirstFrames(_url(bench.observer_port), *bench.observer_login, sender.peer_id)
    out: list[float] = []
    try:
        for _ in range(runs):
            for node in (sender, receiver):
                node.stop()
                _erase_tickets(node)
            for node in (sender, receiver):
                node.start()
            t0, tid = asyncio.run(_timed_send(sender, path, receiver))
            first: float = wait_until(functools.partial(observer.first.get, tid), 10)
            out.append(first - t0)
            for p in (receiver.dir / "inbox" / sender.peer_id).glob(path.name + "*"):
                p.unlink()
    finally:
        observer.close()
    return out


def _erase_tickets(node: Node) -> None:
    with sqlite3.connect(node.dir / "peerd.db") as db:
        db.execute("DELETE FROM tickets")


def run(quick: bool = False) -> bool:
    rtts = (0.080,) if quick else RTTS
    runs = 3 if quick else 5
    print(f"load average before: {load_average()}, {os.cpu_count()} CPUs.\n")
    small = _test_file(1)
    res = Results()
    xx: dict[float, list[float]] = {}
    loads: dict[float, str] = {}
    observer = ("benchobs", secrets.token_hex(8))
    with shipped_cluster(["sender", "receiver"], extra_users=dict([observer]), start=False) as (
        broker,
        (sender, receiver),
    ):
        bench = Bench((sender, receiver), (broker.port, 0, 0), observer, {})
        with bench.daemon_links(0, 0):
            bench.first_bytes(res, 0, small, runs)
            xx[0] = without_tickets(bench, small, runs)
        loads[0] = load_average()
        for rtt in rtts:
            with bench.daemon_links(rtt, LINKS[0]):
                peerd_send(sender, small, [receiver])  # a session up, caches warm
                bench.first_bytes(res, rtt, small, runs)
                xx[rtt] = without_tickets(bench, small, runs)
            loads[rtt] = load_average()
            print(f"  measured {rtt * 1e3:.0f} ms", flush=True)
    for rtt, runs_xx in xx.items():
        res.first[rtt]["xx"] = runs_xx
    local = {k: median(v) for k, v in res.first[0].items()}
    ok = True
    rows: list[list[object]] = []
    for rtt, f in sorted(res.first.items()):
        row: list[object] = ["loopback" if rtt == 0 else f"{rtt * 1e3:.0f} ms"]
        for kind in ("xx", "cold", "warm"):
            mid = median(f[kind])
            row.append(f"**{mid * 1e3:.0f}** ({', '.join(f'{x * 1e3:.0f}' for x in f[kind])})")
            row.append("" if rtt == 0 else f"{mid / rtt:.2f}")
            row.append("" if rtt == 0 else f"**{(mid - local[kind]) / rtt:.2f}**")
        row.append(loads[rtt])
        rows.append(row)
        if rtt:
            ok = ok and median(f["cold"]) - local["cold"] <= GOAL_FIRST_BYTE_RTTS * rtt
    print(
        "\nTime to first transfer byte (1 MiB file), as in `scripts/bench wan`: ms, median (each "
        "run); round trips, all of it and beyond loopback. *Known peer*: both daemons restarted, "
        "no session; *no tickets*: their resumption tickets erased too, so the handshake is XX "
        "as before resumption. *Session up*: the next sends.\n"
    )
    table(
        [
            "RTT",
            "known peer, no tickets (XX, as before): ms",
            "RTTs",
            "RTTs beyond loopback",
            "known peer, no session (resumption): ms",
            "RTTs",
            "RTTs beyond loopback",
            "session up: ms",
            "RTTs",
            "RTTs beyond loopback",
            "load average after",
        ],
        rows,
    )
    print(
        f"\nSummary: first transfer byte to a known peer within {GOAL_FIRST_BYTE_RTTS} RTT "
        f"beyond local processing ({local['cold'] * 1e3:.0f} ms): {verdict(ok)}."
    )
    return ok
