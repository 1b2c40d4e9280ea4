"""The two MQTT clients behind the transport port, side by side (issue 12): `[broker] client =
"builtin"` (peerd's own, peerd/mqtt/) against `"aiomqtt"`, each between two real daemons on one
private Mosquitto configured as shipped. Transfers are interleaved (builtin, aiomqtt, builtin,
...) so that the machine's load hits both alike; the figures to read are the ratios.

- transfer MB/s: one file sender -> receiver, to the received file verified and fsynced;
- CPU per GB: user + system seconds of the sender's and the receiver's daemon per 10^9 bytes;
- session setup: a new session alice -> bob (`v1.connect`), HELLO to bob's receipt of message 3,
  median of paced rounds (the handshake benchmark's method).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from scripts.benchmarks._cluster import shipped_cluster
from scripts.benchmarks.common import median, table
from scripts.benchmarks.handshake import handshakes
from scripts.benchmarks.transfer import peerd_send
from tests.support.cluster import Node, pair

CLIENTS = ("builtin", "aiomqtt")


def _use_client(node: Node, client: str) -> None:
    conf = node.config.read_text()
    node.config.write_text(conf.replace('client = "builtin"', f'client = "{client}"', 1))


def compare(path: Path, runs: int, rounds: int) -> tuple[bool, str]:
    size = path.stat().st_size
    names = [f"{role}{c[0]}" for c in CLIENTS for role in ("s", "r")]
    rates: dict[str, list[float]] = {c: [] for c in CLIENTS}
    cpu_gb: dict[str, list[float]] = {c: [] for c in CLIENTS}
    setup: dict[str, float] = {}
    with shipped_cluster(names, start=False) as (_broker, nodes):
        pairs = {c: (nodes[2 * i], nodes[2 * i + 1]) for i, c in enumerate(CLIENTS)}
        for client, (s, r) in pairs.items():
            _use_client(s, client)
            _use_client(r, client)
            s.start()
            r.start()
            pair(s, r)
            peerd_send(s, path, [r])  # warm-up: session, caches
        for _ in range(runs):
            for client, (s, r) in pairs.items():
                res = peerd_send(s, path, [r])
                rates[client].append(res["mb_s"])
                cpu = res["cpu"]["sender"] + res["cpu"][r.name]
                cpu_gb[client].append(cpu / (size / 1e9))
        for client, (s, r) in pairs.items():
            to_responder, _ = asyncio.run(handshakes(s, r, rounds, {"gap": 0.06}))
            setup[client] = median(to_responder) * 1e3
    b, a = (median(rates[c]) for c in CLIENTS)
    rows = [
        [
            f"`{c}`" + (" (default)" if c == "builtin" else ""),
            f"**{median(rates[c]):.0f}**",
            ", ".join(f"{x:.0f}" for x in rates[c]),
            f"{median(cpu_gb[c]):.2f}",
            f"{setup[c]:.2f}",
        ]
        for c in CLIENTS
    ]
    print(
        f"\nThe MQTT clients behind the transport port, {size >> 20} MiB file, {runs} interleaved"
        f" runs each; session setup: median of {rounds} paced handshakes.\n"
    )
    table(
        ["[broker] client", "transfer MB/s", "runs", "CPU s per GB (both daemons)", "setup ms"],
        rows,
    )
    summary = (
        f"builtin vs aiomqtt: {b / a:.2f}x the transfer rate,"
        f" {median(cpu_gb['aiomqtt']) / median(cpu_gb['builtin']):.2f}x less CPU per GB,"
        f" session setup {setup['aiomqtt'] / setup['builtin']:.2f}x faster"
    )
    print(f"\n{summary}")
    return True, summary
