"""`python -m scripts.evaluation [--quick] [--out DIR] [--only versions] [--versions-mb N]`:
run every experiment, write the page.

The full run writes docs/evaluation.md, docs/figures/*.png and docs/data/*.csv; --quick runs a
reduced plan (CI) and --out puts the page, figures and data elsewhere. `--only versions` runs
only the model-versions experiment (versions.py) and rewrites only its CSV, its figure and its
section of an existing page. Exit status 0 only if every experiment ran and every check held
(verified transfers, bit-identical federated runs).
"""

from __future__ import annotations

import os

# Before numpy loads: one BLAS thread, so results do not depend on thread scheduling and the
# training does not compete with the daemons for the cores.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

from scripts.evaluation import versions  # noqa: E402
from scripts.evaluation.experiments import ROOT, Bench, Plan  # noqa: E402
from scripts.evaluation.report import Results, write, write_versions  # noqa: E402
from tests.support.broker import mosquitto_binary  # noqa: E402

_T0 = time.perf_counter()


def log(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {text}", flush=True)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and of every child it waited for (daemons, broker,
    workers, CLI calls: all of them are waited for by the time the run ends)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def environment(quick: bool) -> dict[str, str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    mosquitto = subprocess.run(
        [mosquitto_binary(), "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    cores = str(os.cpu_count())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {cores} cores, {mem_kb / 1024**2:.0f} GiB, Linux {platform.release()}",
        "cores": cores,
        "versions": (
            f"peerd {version('peerd')} (commit {commit or 'unknown'}),"
            f" Python {platform.python_version()}, {mosquitto.replace('version ', '')},"
            f" PyNaCl {version('pynacl')}, numpy {version('numpy')},"
            f" scikit-learn {version('scikit-learn')}, matplotlib {version('matplotlib')}"
        ),
        "load_before": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "quick": "yes" if quick else "no",
    }


async def experiments(bench: Bench, results: Results) -> None:
    async def step(name: str, coro: object) -> object:
        log(name)
        t = time.perf_counter()
        value = await coro  # type: ignore[misc]
        results.seconds[name] = time.perf_counter() - t
        return value

    try:
        await bench.start(log)
        results.frame_sizes = bench.frame_sizes
        results.handshakes, results.handshake_summary = await step(  # type: ignore[misc]
            "key exchange: handshake times", bench.handshake_distribution()
        )
        for row in results.handshake_summary:
            log(
                f"    {row['mode']:<9} p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms,"
                f" {row['wire_bytes_per_handshake']:.0f} bytes on the wire"
            )
        results.scaling = await step(  # type: ignore[assignment]
            "key exchange: 1 to N peers at once", bench.handshake_scaling()
        )
        results.transfers = await step(  # type: ignore[assignment]
            "CPU and bytes: one file, one receiver", bench.transfers(log)
        )
        results.fanout = await step("fan-out", bench.fanout(log))  # type: ignore[assignment]
        results.federated = await step(  # type: ignore[assignment]
            "federated averaging", bench.federated(log)
        )
        results.versions_model, results.versions = await step(  # type: ignore[misc]
            "model versions",
            asyncio.to_thread(versions.run, bench.plan.versions_mb, bench.root, log),
        )
    finally:
        await bench.close()


def only_versions(plan: Plan, work: Path, results: Results) -> None:
    log("model versions")
    t = time.perf_counter()
    results.versions_model, results.versions = versions.run(plan.versions_mb, work, log)
    results.seconds["model versions"] = time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run CI makes")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="where evaluation.md, figures/, data/ go"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.add_argument(
        "--only",
        choices=["versions"],
        help="run only this experiment and rewrite only its CSV, figure and section of the page",
    )
    parser.add_argument(
        "--versions-mb",
        type=int,
        metavar="N",
        help=f"model size of the checkpoint series (default {Plan.versions_mb}, --quick"
        f" {Plan.quick().versions_mb})",
    )
    args = parser.parse_args()
    plan = Plan.quick() if args.quick else Plan()
    if args.versions_mb is not None:
        if args.versions_mb < 1:
            parser.error("--versions-mb must be at least 1")
        plan = dataclasses.replace(plan, versions_mb=args.versions_mb)
    results = Results(plan, environment(args.quick))
    started, busy0, own0 = time.perf_counter(), machine_busy_seconds(), own_seconds()
    # Short: the daemons' control sockets live under it (a Unix socket path has 107 bytes).
    work = Path(tempfile.mkdtemp(prefix="peerd-eval-", dir="/tmp"))
    kind = "quick" if args.quick else "full"
    log(f"evaluation ({kind}{', only ' + args.only if args.only else ''}) in {work}")
    bench = None
    try:
        if args.only == "versions":
            only_versions(plan, work, results)
        else:
            bench = Bench.create(plan, work, log)
            asyncio.run(experiments(bench, results))
    except Exception as exc:
        if args.debug:
            raise
        log(f"evaluation FAILED: {type(exc).__name__}: {exc} (--debug shows where)")
        return 1
    finally:
        if bench is not None:
            bench.lab.close()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    # How quiet the machine was: what everything else on it used while the evaluation ran.
    elapsed = time.perf_counter() - started
    others = max(0.0, (machine_busy_seconds() - busy0) - (own_seconds() - own0))
    share = others / (elapsed * (os.cpu_count() or 1)) * 100
    results.env["others"] = (
        f"other processes used {others:.0f} CPU seconds during the {elapsed:.0f} s run"
        f" ({share:.0f} % of the machine)"
    )
    for path in (write_versions if args.only else write)(results, args.out):
        size = path.stat().st_size
        log(f"wrote {path} ({size / 1024:.0f} KiB)")
    log("evaluation: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
