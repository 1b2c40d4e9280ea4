"""Session establishment between running daemons (issue 4, "Performance").

1. Latency. Two daemons on a private Mosquitto configured as shipped (its ACL, limits and
   `set_tcp_nodelay`, each node authenticated as its peer id). The parent asks alice for a new
   session with bob (`v1.connect`: a new handshake replaces the session) one at a time, paced
   below bob's per-peer HELLO rate limit (20/s), and matches the two daemons' `v1.handshakes`
   records by session id: the time is alice's `started_at` (as she makes her HELLO) to bob's
   `completed_at` (as message 3 reaches him). The floor is the same three messages (same sizes)
   sent in plaintext between two processes through the same broker, paced the same way and
   stamped at the same points with `time.time()`: once with peerd's own MQTT link (the one the
   daemon uses) and once with aiomqtt (the client of the issue's numbers). Blocks of the three
   are interleaved so that drift of the machine hits all alike. Goal: median ratio <= 2.0.

2. Throughput. One daemon and a load generator process playing 200 peers (200 identities made
   with the real keystore, each trusted by the daemon by fingerprint, each with its own broker
   account), every peer opening a new session as soon as its last one is confirmed. Counted at
   the daemon: `session.up` events whose `completed_at` falls in the measuring window.
   Goal: >= 500 per second. Also the daemon's resident memory (VmRSS) idle, with 200 sessions
   up, and after the load.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from peerd.client import Client, Timeout
from peerd.keystore import Keystore
from scripts.bench_mqtt import finish, read_line, run_pingpong_floor, with_credentials
from scripts.benchmarks import _workers as workers
from scripts.benchmarks._cluster import (
    NETWORK,
    hwm,
    load_average,
    rss,
    shipped_cluster,
)
from scripts.benchmarks.common import median, percentile, table, verdict
from scripts.evaluation.lab import cpu_seconds, node_pid
from scripts.evaluation.loadgen import handshake_frame_sizes
from tests.support.cluster import Node, pair, wait_until

GOAL_RATIO = 2.0
GOAL_RATE = 500.0
LOAD_PEERS = 200
OFFERED = 600.0  # sessions/s the 200 peers offer together in the paced phase
WARMUP_ROUNDS = 10  # of each floor process (connections, caches), and of the first handshakes


# -- the sizes of the real handshake messages -----------------------------------------------------


def handshake_sizes() -> tuple[int, int, int]:
    """HELLO, REPLY and FINISH frame sizes of a real handshake between two fresh identities."""
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = (Keystore.create(Path(tmp) / n, now=now, certificate_days=30) for n in "ab")
    return handshake_frame_sizes(a, b, NETWORK)[:3]


# -- latency -------------------------------------------------------------------------------------

# Bob admits 20 HELLOs per second from one peer (a burst of 40), so handshakes between two
# daemons cannot run back to back: they are paced, and so is the floor, identically. Two paces,
# because on this VM how long a process has been idle changes how fast it wakes (a 50 ms idle
# costs each hop more than a 2 ms one), for the floor as much as for the daemons.
SCHEDULES: dict[str, dict[str, float]] = {
    "isolated": {"gap": 0.05},  # one every 50 ms
    "bursts": {"gap": 0.002, "burst": 30, "pause": 1.6},  # 30 at 2 ms, then a pause
}


def floor(
    url: str,
    users: dict[str, str],
    client: str,
    rounds: int,
    sizes: tuple[int, int, int],
    schedule: dict[str, float],
) -> list[float]:
    """Seconds from A's first publish to B's receipt of the third message, per round (the
    first WARMUP_ROUNDS dropped)."""
    (a, pa), (b, pb) = users.items()
    common: dict[str, Any] = {
        "a": a,
        "b": b,
        "qos": 0,
        "rounds": rounds + WARMUP_ROUNDS,
        "schedule": schedule,
        "client": client,
        "sizes": sizes,
    }
    pong = workers.spawn("floor-pong", url=with_credentials(url, b, pb), **common)
    read_line(pong)
    ping = workers.spawn("floor-ping", url=with_credentials(url, a, pa), **common)
    t0 = read_line(ping)["t0"]
    t3 = read_line(pong)["t3"]
    finish(ping, pong)
    return [end - start for start, end in zip(t0, t3, strict=True)][WARMUP_ROUNDS:]


async def handshakes(
    a: Node, b: Node, rounds: int, schedule: dict[str, float]
) -> tuple[list[float], list[float]]:
    """Sessions alice -> bob, one at a time, paced like the floor (the first WARMUP_ROUNDS
    dropped). Per session: seconds from alice's HELLO to bob's receipt of message 3, and to
    alice's receipt of bob's confirmation."""
    async with (
        await Client.connect(socket_path=a.socket) as ca,
        await Client.connect(socket_path=b.socket) as cb,
        ca.subscribe("session.up", filter={"peer": b.peer_id, "initiator": True}) as ups,
    ):
        mine: list[dict[str, Any]] = []
        for i in range(rounds + WARMUP_ROUNDS):
            await asyncio.sleep(workers.pause_before(i, schedule))
            # A notification: no reply wakes this process while the handshake is in flight.
            await ca.notify("v1.connect", peer=b.peer_id)
            try:
                up = await ups.get(timeout=15)
            except Timeout:
                raise RuntimeError("a handshake did not complete within 15 s") from None
            mine.append(up.data)
        # Bob records a session after confirming it: his record of the last one may lag.
        for _ in range(50):
            theirs = {
                tuple(r["session_id"]): r
                for r in await cb.call("v1.handshakes")
                if not r["initiator"] and r["peer"] == a.peer_id
            }
            if all(tuple(rec["session_id"]) in theirs for rec in mine):
                break
            await asyncio.sleep(0.1)
    to_responder: list[float] = []
    to_confirmed: list[float] = []
    for rec in mine[WARMUP_ROUNDS:]:
        other = theirs.get(tuple(rec["session_id"]))
        if other is None:
            raise RuntimeError(f"bob has no record of session {rec['session_id']}")
        to_responder.append(other["completed_at"] - rec["started_at"])
        to_confirmed.append(rec["completed_at"] - rec["started_at"])
    return to_responder, to_confirmed


def _latency_table(
    name: str,
    schedule: dict[str, float],
    hs: list[float],
    confirmed: list[float],
    floors: dict[str, list[float]],
) -> dict[str, float]:
    ms = 1e3
    rows: list[list[object]] = [
        [
            "peerd session: alice's HELLO -> bob has message 3",
            len(hs),
            f"{median(hs) * ms:.3f}",
            f"{percentile(hs, 99) * ms:.3f}",
            "",
            "",
        ]
    ]
    ratios = {}
    for client, label in (("link", "peerd builtin client"), ("aiomqtt", "aiomqtt")):
        xs = floors[client]
        ratio = median(hs) / median(xs)
        ratios[client] = ratio
        rows.append(
            [
                f"floor: the 3 messages in plaintext, {label}",
                len(xs),
                f"{median(xs) * ms:.3f}",
                f"{percentile(xs, 99) * ms:.3f}",
                f"**{ratio:.2f}** (p99 {percentile(hs, 99) / percentile(xs, 99):.2f})",
                f"<= {GOAL_RATIO}: {verdict(ratio <= GOAL_RATIO)}",
            ]
        )
    rows.append(
        [
            "for information: alice's HELLO -> alice has bob's confirmation (4th message)",
            len(confirmed),
            f"{median(confirmed) * ms:.3f}",
            f"{percentile(confirmed, 99) * ms:.3f}",
            "",
            "",
        ]
    )
    if "burst" in schedule:
        pace = (
            f"bursts of {schedule['burst']:.0f} rounds {schedule['gap'] * 1e3:.0f} ms apart, "
            f"{schedule['pause']:.1f} s between bursts"
        )
    else:
        pace = f"one round every {schedule['gap'] * 1e3:.0f} ms"
    print(f"\n**{name}**: {pace}.\n")
    table(["measured", "n", "median ms", "p99 ms", "ratio session/floor (median)", "goal"], rows)
    return ratios


def latency(quick: bool) -> bool:
    blocks, per_block = (2, 30) if quick else (5, 120)
    sizes = handshake_sizes()
    floor_users = {"floora": secrets.token_hex(8), "floorb": secrets.token_hex(8)}
    results: dict[str, tuple[list[float], list[float], dict[str, list[float]]]] = {
        name: ([], [], {"link": [], "aiomqtt": []}) for name in SCHEDULES
    }
    back_to_back: dict[Literal["link", "aiomqtt"], list[float]] = {"link": [], "aiomqtt": []}
    with shipped_cluster(["alice", "bob"], extra_users=floor_users) as (broker, (a, b)):
        pair(a, b)
        a.wait_connected(b)
        (fa, pa), (fb, pb) = floor_users.items()
        pairs = ((fa, pa), (fb, pb))
        for _ in range(blocks):
            for name, schedule in SCHEDULES.items():
                hs, confirmed, floors = results[name]
                for client in floors:
                    floors[client] += floor(
                        broker.url, floor_users, client, per_block, sizes, schedule
                    )
                to_b, to_a = asyncio.run(handshakes(a, b, per_block, schedule))
                hs += to_b
                confirmed += to_a
            for client, medians in back_to_back.items():
                r = run_pingpong_floor(
                    broker.url, per_block * 2, client=client, users=pairs, warmup=50
                )
                medians.append(r["p50_ms"])
    print(
        "Session establishment between two daemons on Mosquitto as shipped, handshake frames at "
        f"QoS 0 ({sizes[0]}/{sizes[1]}/{sizes[2]} bytes; the floor sends the same sizes). "
        f"{blocks} blocks, each running every series below in turn."
    )
    ok = True
    for name, schedule in SCHEDULES.items():
        hs, confirmed, floors = results[name]
        ratios = _latency_table(name, schedule, hs, confirmed, floors)
        ok = ok and all(r <= GOAL_RATIO for r in ratios.values())
    hs_isolated = results["isolated"][0]
    print(
        "\nFor information, the floor as the issue measured it (scripts/bench_mqtt.py: back to "
        "back, no pause between rounds; median of the blocks' medians): "
        + ", ".join(
            f"{'peerd builtin client' if c == 'link' else c} {statistics.median(xs):.3f} ms"
            for c, xs in back_to_back.items()
        )
        + f". Paced sessions are {median(results['bursts'][0]) * 1e3:.3f} ms (bursts) and "
        f"{median(hs_isolated) * 1e3:.3f} ms (isolated)."
    )
    print(f"\nlatency ratios, every pace and floor (goal <= {GOAL_RATIO}): {verdict(ok)}")
    return ok


# -- throughput with 200 peers -------------------------------------------------------------------


def make_identities(root: Path, count: int) -> list[tuple[Keystore, str]]:
    now = time.time()
    return [
        (Keystore.create(root / f"p{i}", now=now, certificate_days=30), secrets.token_hex(8))
        for i in range(count)
    ]


async def _trust_all(node: Node, peers: list[Keystore]) -> None:
    async with await Client.connect(socket_path=node.socket) as c:
        for k in peers:
            await c.call("v1.trust", peer=k.peer_id, fingerprint=k.fingerprint)


async def _count_ups(node: Node, seen: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """Every `session.up` of the daemon: (its completed_at, when the event arrived)."""
    async with (
        await Client.connect(socket_path=node.socket) as c,
        c.subscribe("session.up", max_pending=1 << 20) as ups,
    ):
        while not stop.is_set():
            try:
                ev = await ups.get(timeout=0.2)
            except Timeout:
                continue
            seen.append((float(ev.data["completed_at"]), time.time()))


async def _phase(
    node: Node,
    pids: dict[str, int],
    gen: Any,
    command: str,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """One load phase: the daemon's sessions per second in the window after `warmup`, counted
    as the load generator saw them confirmed and as the daemon recorded them (its `session.up`
    events), what it dropped, and how late its records came."""
    async with await Client.connect(socket_path=node.socket) as c:
        dropped0 = (await c.status())["rejections"].get("events-dropped", 0)
    seen: list[tuple[float, float]] = []
    stop = asyncio.Event()
    counter = asyncio.create_task(_count_ups(node, seen, stop))
    await asyncio.sleep(0.5)  # subscribed
    workers.tell(gen, command)
    await asyncio.sleep(warmup)
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.time()
    await asyncio.sleep(duration - warmup - 0.5)
    t1 = time.time()
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    result = await asyncio.to_thread(read_line, gen)
    # The daemon records sessions after it has confirmed them: wait for the last records.
    waited = time.time()
    while time.time() - waited < 60:
        before = len(seen)
        await asyncio.sleep(1.0)
        if len(seen) == before:
            break
    stop.set()
    await counter
    async with await Client.connect(socket_path=node.socket) as c:
        dropped = (await c.status())["rejections"].get("events-dropped", 0) - dropped0
    window = t1 - t0
    recorded = [(done, arrived) for done, arrived in seen if t0 <= done < t1]
    lags = [arrived - done for done, arrived in recorded] or [0.0]
    confirmed = sum(t0 <= s < t1 for s in result["completed"])
    return {
        "recorded": len(recorded) / window,
        "confirmed": confirmed / window,
        "failures": result["failures"],
        "dropped": dropped,
        "lag_p50": median(lags),
        "lag_max": max(lags),
        "cpu": {k: (cpu1[k] - cpu0[k]) / window for k in pids},
        "cpu_ms": (cpu1["daemon"] - cpu0["daemon"]) / max(1, confirmed) * 1e3,
    }


def throughput(quick: bool) -> bool:
    duration, warmup = (6.0, 2.0) if quick else (20.0, 4.0)
    root = Path(tempfile.mkdtemp(prefix="peerd-bench-ids-"))
    try:
        ids = make_identities(root, LOAD_PEERS)
        users = {k.peer_id: pw for k, pw in ids}
        with shipped_cluster(["target"], extra_users=users) as (broker, (node,)):
            assert broker.proc is not None
            pid = node_pid(node)
            time.sleep(1.0)
            rss_idle = rss(pid)
            gen = workers.spawn(
                "loadgen",
                url=broker.url,
                target=node.peer_id,
                network=NETWORK,
                peers=[(str(k.dir), pw) for k, pw in ids],
                duration=duration,
            )
            try:
                read_line(gen)  # every peer connected and subscribed
                asyncio.run(_trust_all(node, [k for k, _ in ids]))
                # Trusting a peer makes the daemon open a session with it at once; the first
                # session of each records the peer's certificate (pending -> trusted).
                wait_until(
                    lambda: all(p["state"] == "trusted" for p in node.peers().values()),
                    60,
                    what="every peer trusted",
                )
                race = node.status()["rejections"].get("unknown-peer", 0)
                workers.tell(gen, "one")
                one = read_line(gen)
                wait_until(
                    lambda: node.status()["sessions"] == LOAD_PEERS, 30, what="200 sessions up"
                )
                time.sleep(1.0)
                rss_200 = rss(pid)
                pids = {"daemon": pid, "broker": broker.proc.pid, "loadgen": gen.pid}
                phases = {
                    f"offered {OFFERED:.0f}/s": asyncio.run(
                        _phase(node, pids, gen, f"go {OFFERED}", duration, warmup)
                    ),
                    "as fast as they complete": asyncio.run(
                        _phase(node, pids, gen, "go", duration, warmup)
                    ),
                }
                status = node.status()
                rss_after = rss(pid)
                peak = hwm(pid)
                workers.tell(gen, "exit")
                finish(gen)
            finally:
                if gen.poll() is None:
                    gen.kill()
                    gen.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if one["failures"]:
        raise RuntimeError(f"{one['failures']} of {LOAD_PEERS} peers could not open a session")
    paced = phases[f"offered {OFFERED:.0f}/s"]
    ok = bool(paced["recorded"] >= GOAL_RATE and not paced["dropped"])
    print(
        f"\nOne daemon; one load-generator process plays {LOAD_PEERS} peers, each opening a new "
        f"session with it (a full handshake, the daemon responding) after its last was confirmed; "
        f"first at a steady offered rate, then as fast as they complete. "
        f"{duration - warmup - 0.5:.1f} s measured after {warmup:.0f} s of warm-up. "
        "*Confirmed*: the daemon accepted message 3 and confirmed (counted by the load "
        "generator). *Recorded*: the daemon finished its work for the session (store, "
        "`session.up` event), counted by its events.\n"
    )
    rows: list[list[object]] = []
    for name, r in phases.items():
        cpu = r["cpu"]
        rows.append(
            [
                name,
                f"{r['confirmed']:.0f}",
                f"**{r['recorded']:.0f}**",
                r["dropped"],
                f"{r['lag_p50'] * 1e3:.0f} / {r['lag_max'] * 1e3:.0f}",
                f"{r['cpu_ms']:.2f}",
                f"{cpu['daemon']:.0%} / {cpu['broker']:.0%} / {cpu['loadgen']:.0%}",
                r["failures"],
            ]
        )
    table(
        [
            "load",
            "confirmed/s",
            "recorded/s",
            "session-ups dropped",
            "record lag p50 / max ms",
            "daemon CPU ms per session",
            "CPU daemon / broker / loadgen (of a core)",
            "timeouts",
        ],
        rows,
    )
    print(
        f"\nGoal: >= {GOAL_RATE:.0f} sessions/s recorded at the daemon with nothing dropped, at "
        f"{OFFERED:.0f}/s offered: {paced['recorded']:.0f}/s, {paced['dropped']} dropped: "
        f"{verdict(ok)}"
    )
    print(
        f"\nWhile the {LOAD_PEERS} peers were being trusted (by fingerprint, all online, "
        f"back to back), {race} of their first sessions were closed again (`unknown-peer`; 0 "
        "since sessions awaiting their recording are left to it). Rejections at the end: "
        + (", ".join(f"{k} {v}" for k, v in sorted(status["rejections"].items())) or "none")
        + ".\n"
    )
    table(
        ["daemon resident memory", "VmRSS MB"],
        [
            ["idle, no session", f"{rss_idle / 1e6:.1f}"],
            [f"{LOAD_PEERS} sessions up (one each)", f"{rss_200 / 1e6:.1f}"],
            [
                f"after the load: {status['sessions']} peers connected (up to 3 sessions each "
                "in their 60 s grace)",
                f"{rss_after / 1e6:.1f}",
            ],
            ["peak (VmHWM)", f"{peak / 1e6:.1f}"],
        ],
    )
    per = (rss_200 - rss_idle) / LOAD_PEERS
    print(f"\nabout {per / 1e3:.1f} kB per session (the 200-session RSS minus idle, / 200)")
    return ok


def run(quick: bool = False) -> bool:
    print(f"load average before: {load_average()}, {os.cpu_count()} CPUs\n")
    ok = latency(quick)
    ok = throughput(quick) and ok
    return ok
