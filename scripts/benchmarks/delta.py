"""Deltas (issue 15, protocol/SPEC.md 7.11): bytes on the wire for new versions of a model,
against `rsync --stats --no-whole-file` over the same pair of files, in one run.

A 256 MiB safetensors model of 120 tensors (sizes 0.3x-1.7x of the mean, like real layers);
v2 rewrites every tenth tensor (~10% of the bytes, as a fine-tune that freezes most layers).
Wire bytes are what the sender daemon published to the broker during the transfer (its broker
link counter: chunk frames, recipes, every control message), so the recipe's cost is included.

1. v2 after v1: wire <= 12% of the file and <= rsync's literal data + 2% of the file.
2. The identical file again: wire <= 1% of the file.
3. A 256 MiB file with nothing in common, to a receiver that holds v1 and v2 (new content
   every run, never sent to bob: the sender samples it, finds nothing sent, sends it without a
   recipe, and the recipe follows the transfer): throughput >= 0.95x a pair of daemons with
   `[receive] deltas = false` (today's transfers), 9 runs interleaved, medians (the fastest
   runs and the sender's CPU for information, the transfer's and with the late recipe; on this
   VM a run whose received file lands in memory the host had taken back loses up to 0.8 s per
   256 MiB, docs/benchmarks.md). Each run waits for its late recipe before the next starts.
4. For information: the sender's chunking pass (CDC + BLAKE3 per chunk) in MB/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peerd.client import Client
from peerd.transfers.chunkindex import file_chunks
from scripts.benchmarks._cluster import load_average, scratch_dir, shipped_cluster
from scripts.benchmarks.common import median, table, verdict
from scripts.benchmarks.transfer import late_recipes_sent
from scripts.evaluation.lab import cpu_seconds, node_pid
from tests.support.broker import Broker
from tests.support.cluster import Node, pair
from tests.support.files import sha256
from tests.support.models import tensor_sizes, write_model

MIB = 1 << 20
GOAL_DELTA = 0.12
GOAL_VS_RSYNC = 0.02
GOAL_RESEND = 0.01
GOAL_THROUGHPUT = 0.95


def _published(node: Node) -> int:
    return int(node.status()["broker"]["stats"]["published_bytes"])


async def _send(sender: Node, path: Path, receiver: Node) -> tuple[float, dict[str, Any]]:
    async with await Client.connect(socket_path=sender.socket, timeout=None) as c:
        t0 = time.perf_counter()
        result = await c.send(path, [receiver.peer_id], wait=True)
        seconds = time.perf_counter() - t0
    if result["state"] != "verified":
        raise RuntimeError(f"the transfer ended {result['state']}: {result}")
    return seconds, result


def send(sender: Node, path: Path, receiver: Node) -> dict[str, Any]:
    """One timed transfer; the received copy is checked against the source."""
    before = _published(sender)
    cpu = cpu_seconds(node_pid(sender))
    seconds, result = asyncio.run(_send(sender, path, receiver))
    transfer_cpu = cpu_seconds(node_pid(sender)) - cpu
    # A file sent without a recipe has it follow (SPEC 7.11): charged to this file, not the next.
    late_recipes_sent(sender)
    cpu = cpu_seconds(node_pid(sender)) - cpu
    wire = _published(sender) - before
    inbox = receiver.dir / "inbox" / sender.peer_id
    got = max(inbox.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    if sha256(got) != sha256(path):
        raise RuntimeError(f"{receiver.name} received a different file")
    return {
        "seconds": seconds,
        "mb_s": path.stat().st_size / seconds / 1e6,
        "wire": wire,
        "held": result["receivers"][receiver.peer_id].get("held_bytes", 0),
        "got": got,
        "sender_cpu": cpu,
        "transfer_cpu": transfer_cpu,
    }


@contextlib.contextmanager
def delta_pairs() -> Iterator[tuple[Broker, tuple[Node, Node, Node, Node]]]:
    """Four daemons on a private Mosquitto configured as shipped, paired two by two: alice ->
    bob with deltas (the default), carol -> dave with `[receive] deltas = false` on both
    (every send is the whole file, as before deltas)."""
    with shipped_cluster(["alice", "bob", "carol", "dave"]) as (broker, nodes):
        alice, bob, carol, dave = nodes
        for node in (carol, dave):
            node.stop()
            text = node.config.read_text()
            text = re.sub(r"(?m)^#? ?deltas = true$", "deltas = false", text)
            if "deltas = false" not in text:
                raise RuntimeError("no [receive] deltas key in the generated config")
            node.config.write_text(text)
            node.start()
        pair(alice, bob)
        pair(carol, dave)
        yield broker, (alice, bob, carol, dave)


def rsync_literal(old: Path | None, new: Path, scratch: Path) -> tuple[int, int]:
    """rsync's literal data and total bytes sent, updating a copy of `old` (nothing if None)
    to `new`."""
    dest = scratch / "rsync-dest"
    src = scratch / "rsync-src"
    for d in (dest, src):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    if old is not None:
        shutil.copy(old, dest / "model.safetensors")
    os.link(new, src / "model.safetensors")
    out = subprocess.run(
        # --ignore-times: files of one size written within the same second (--quick) would
        # otherwise pass rsync's quick check and not be compared at all.
        [
            "rsync",
            "--stats",
            "--no-whole-file",
            "--ignore-times",
            "-t",
            str(src / "model.safetensors"),
            str(dest),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    literal = int(re.search(r"Literal data: ([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    return literal, sent


def chunking_rate(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        file_chunks(fd, path.stat().st_size, path.name)
        return path.stat().st_size / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)


def run(quick: bool = False) -> bool:
    print(f"load average before: {load_average()}, {os.cpu_count()} CPUs\n")
    size = (64 if quick else 256) * MIB
    runs = 2 if quick else 9
    scratch = scratch_dir("peerd-bench-delta-")
    try:
        sizes = tensor_sizes(size, 120, seed=15)
        # Every tenth tensor (10% of them), from the start that comes closest to 10% of the bytes.
        start = min(range(10), key=lambda k: abs(sum(sizes[k::10]) - size / 10))
        changed = dict.fromkeys(range(start, len(sizes), 10), 1)
        v1 = write_model(scratch / "v1.safetensors", sizes)
        v2 = write_model(scratch / "v2.safetensors", sizes, changed=changed)
        n = v2.stat().st_size
        changed_bytes = sum(sizes[i] for i in changed)
        rate = median([chunking_rate(v2) for _ in range(3)])
        literal, rsync_sent = rsync_literal(v1, v2, scratch)
        with delta_pairs() as (_, (alice, bob, carol, dave)):
            first = send(alice, v1, bob)
            send(carol, v1, dave)  # warm-up of the baseline pair's session
            second = send(alice, v2, bob)
            again = send(alice, v2, bob)
            # A checkpoint series: each fine-tune rewrites another tenth of the tensors.
            series, versions, prev = [], dict(changed), v2
            for k in range(1, 4 if quick else 6):
                for i in range((start + k) % 10, len(sizes), 10):
                    versions[i] = versions.get(i, 0) + 1
                path = write_model(scratch / f"v{k + 2}.safetensors", sizes, changed=versions)
                r = send(alice, path, bob)
                series.append((k + 2, r["wire"], rsync_literal(prev, path, scratch)[0]))
                prev = path
            new, old, new_cpu, old_cpu, new_tcpu = [], [], [], [], []
            for k in range(runs):  # interleaved
                # New content each run, of the same layout (its header is v1's): a file with
                # nothing in common with anything sent to bob before, and a copy for the pair
                # without deltas.
                copies = [write_model(scratch / f"other-on-{k}.safetensors", sizes, seed=100 + k)]
                copies.append(scratch / f"other-off-{k}.safetensors")
                shutil.copy(copies[0], copies[1])
                os.sync()
                r = send(alice, copies[0], bob)
                r["got"].unlink()
                new.append(r["mb_s"])
                new_cpu.append(r["sender_cpu"])
                new_tcpu.append(r["transfer_cpu"])
                r = send(carol, copies[1], dave)
                r["got"].unlink()
                old.append(r["mb_s"])
                old_cpu.append(r["sender_cpu"])
                for c in copies:
                    c.unlink()
        print(f"load average after: {load_average()}\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def pct(x: float) -> str:
        return f"{100 * x / n:.2f}%"

    ok_delta = second["wire"] <= GOAL_DELTA * n and second["wire"] <= literal + GOAL_VS_RSYNC * n
    ok_resend = again["wire"] <= GOAL_RESEND * n
    ratio = median(new) / median(old)
    ok_tp = ratio >= GOAL_THROUGHPUT
    table(
        ["case", "bytes on the wire", "of the file", "held at bob", "seconds", "goal", "verdict"],
        [
            [
                "v1 (first send)",
                first["wire"],
                pct(first["wire"]),
                0,
                f"{first['seconds']:.2f}",
                "-",
                "-",
            ],
            [
                f"v2 ({len(changed)} of {len(sizes)} tensors, {pct(changed_bytes)} changed)",
                second["wire"],
                pct(second["wire"]),
                pct(second["held"]),
                f"{second['seconds']:.2f}",
                f"<= 12% and <= rsync literal {pct(literal)} + 2%",
                verdict(ok_delta),
            ],
            [
                "v2 again (identical)",
                again["wire"],
                pct(again["wire"]),
                pct(again["held"]),
                f"{again['seconds']:.2f}",
                "<= 1%",
                verdict(ok_resend),
            ],
            [
                "rsync --no-whole-file v1 -> v2",
                rsync_sent,
                pct(rsync_sent),
                f"literal {literal} ({pct(literal)})",
                "-",
                "-",
                "-",
            ],
        ],
    )
    print()
    table(
        [
            "nothing in common",
            "MB/s (median)",
            "fastest run",
            "sender CPU s: transfer / with late recipe (median)",
            "runs",
            "goal",
            "verdict",
        ],
        [
            [
                "deltas on (sampled; the recipe follows the transfer)",
                f"{median(new):.0f}",
                f"{max(new):.0f}",
                f"{median(new_tcpu):.2f} / {median(new_cpu):.2f}",
                " ".join(f"{x:.0f}" for x in new),
                "-",
                "-",
            ],
            [
                "deltas off (today)",
                f"{median(old):.0f}",
                f"{max(old):.0f}",
                f"{median(old_cpu):.2f} / -",
                " ".join(f"{x:.0f}" for x in old),
                "-",
                "-",
            ],
            [
                "ratio",
                f"{ratio:.2f}x",
                f"{max(new) / max(old):.2f}x",
                "",
                "",
                ">= 0.95x",
                verdict(ok_tp),
            ],
        ],
    )
    print()
    table(
        ["checkpoint", "bytes on the wire", "of the file", "rsync literal data"],
        [[f"v{v}", w, pct(w), f"{lit} ({pct(lit)})"] for v, w, lit in series],
    )
    print(f"\nchunking (CDC per tensor + BLAKE3 per chunk), sender side: {rate:.0f} MB/s")
    print(
        f"\nSummary: v2 {pct(second['wire'])} on the wire (rsync literal {pct(literal)}),"
        f" identical {pct(again['wire'])}, nothing in common {ratio:.2f}x."
    )
    return ok_delta and ok_resend and ok_tp
