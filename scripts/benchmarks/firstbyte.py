"""Time to first transfer byte across emulated WAN paths, alone (issue 13 item 3).

The same measurement as the first-byte table of `scripts/bench wan` (scripts/benchmarks/wan.py:
the same delay lines, daemons, observer and definitions), without the throughput runs around it,
so that the session layer's part can be measured in a few minutes: at 20, 80 and 200 ms round
trip (50 MB/s links), and at loopback (the local processing), for a known peer with no session
(both daemons restarted) and with the session up. In round trips: all of it, and beyond the
loopback figure.
"""

from __future__ import annotations

import os
import secrets

from scripts.bench_mqtt import _test_file
from scripts.benchmarks._cluster import load_average, shipped_cluster
from scripts.benchmarks.common import median, table, verdict
from scripts.benchmarks.transfer import peerd_send
from scripts.benchmarks.wan import GOAL_FIRST_BYTE_RTTS, LINKS, RTTS, Bench, Results


def run(quick: bool = False) -> bool:
    rtts = (0.080,) if quick else RTTS
    runs = 3 if quick else 5
    print(f"load average before: {load_average()}, {os.cpu_count()} CPUs.\n")
    small = _test_file(1)
    res = Results()
    loads: dict[float, str] = {}
    observer = ("benchobs", secrets.token_hex(8))
    with shipped_cluster(["sender", "receiver"], extra_users=dict([observer]), start=False) as (
        broker,
        (sender, receiver),
    ):
        bench = Bench((sender, receiver), (broker.port, 0, 0), observer, {})
        with bench.daemon_links(0, 0):
            bench.first_bytes(res, 0, small, runs)
        loads[0] = load_average()
        for rtt in rtts:
            with bench.daemon_links(rtt, LINKS[0]):
                peerd_send(sender, small, [receiver])  # a session up, caches warm
                bench.first_bytes(res, rtt, small, runs)
            loads[rtt] = load_average()
            print(f"  measured {rtt * 1e3:.0f} ms", flush=True)
    local = {k: median(v) for k, v in res.first[0].items()}
    ok = True
    rows: list[list[object]] = []
    for rtt, f in sorted(res.first.items()):
        row: list[object] = ["loopback" if rtt == 0 else f"{rtt * 1e3:.0f} ms"]
        for kind in ("cold", "warm"):
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
        "no session. *Session up*: the next sends.\n"
    )
    table(
        [
            "RTT",
            "known peer, no session: ms",
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
