"""What a CLI command costs from the shell (issue 16 item 0).

Measured, alternating the contenders round by round so that the machine's load falls on each
alike:
- `peerd status` against a bare interpreter start (`python -c pass`, the same interpreter);
  goal: at most 2x;
- `peerd send FILE --to PEER --wait --no-progress` of a 4 KiB file against the same send through
  `peerd.Client` from a running Python process (connect, send, wait for the verified file);
  goal: at most 100 ms more;
- for reference, `peerd id` (an offline command: it reads the keys, no daemon),
  `peerd status` with no bytecode for peerd's own modules, and both `python -c pass` and
  `peerd status` in a virtualenv with no `.pth` file (see below).

Every process runs from compiled bytecode, as an installed peerd does (`scripts/install` and pip
compile it at install time; a checkout writes `__pycache__` on its first run): the runs share a
fresh `PYTHONPYCACHEPREFIX`, filled by one warm-up run of each command. Without this, in an
environment that sets `PYTHONDONTWRITEBYTECODE` (as the tests' does) and a checkout with no
`__pycache__`, every command would compile peerd's sources at each start while the baseline's
standard library comes precompiled: not like with like. That case is the last row, for
reference: `peerd status` with `PYTHONDONTWRITEBYTECODE=1` and the checkout as it is.

The nodes are real daemons on a private Mosquitto configured as shipped, as in the other daemon
benchmarks. The CLI is the console script `peerd` installed in the virtualenv, as people run it
(the same interpreter as the baseline, with the same site-packages and `.pth` files). That
virtualenv is the developers' and the quickstart's: peerd is installed editable, and the `.pth`
of that install makes every start, the baseline's too, import pathlib, re and urllib.parse
(~10 ms). An installed peerd (`scripts/install`, a wheel) has no such `.pth`: its bare start is
shorter and the CLI pays those imports itself. The last two rows measure that case: a fresh
virtualenv of the same base interpreter with nothing in it, running the same console script
with peerd on PYTHONPATH (a daemon command needs nothing outside the standard library).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

from peerd.client import Client
from scripts.benchmarks._cluster import load_average, shipped_cluster
from scripts.benchmarks.common import median, table, verdict
from tests.support.cluster import ROOT, pair

GOAL_STATUS_RATIO = 2.0
GOAL_SEND_EXTRA_MS = 100.0


def _peerd() -> list[str]:
    script = Path(sys.executable).parent / "peerd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "peerd"]


def _timed_run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace')}")
    return elapsed


async def _client_send(socket: str, path: Path, peer: str) -> float:
    t0 = time.perf_counter()
    async with await Client.connect(socket_path=socket) as client:
        result = await client.send(path, peer, wait=True)
    elapsed = time.perf_counter() - t0
    if result["state"] != "verified":
        raise RuntimeError(f"the send through peerd.Client ended {result['state']}")
    return elapsed


def run(quick: bool = False) -> bool:
    rounds = 5 if quick else 21
    with shipped_cluster(["alice", "bob"]) as (_broker, (alice, bob)):
        pair(alice, bob)
        alice.wait_connected(bob)
        pycache = alice.dir.parent / "pycache"  # removed with the cluster's directory
        env = {**alice.env(), "PYTHONPYCACHEPREFIX": str(pycache)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        sources = {**alice.env(), "PYTHONDONTWRITEBYTECODE": "1"}
        sources.pop("PYTHONPYCACHEPREFIX", None)
        tree_bytecode = any((ROOT / "peerd" / "cli").glob("__pycache__/*.pyc"))
        empty_venv = alice.dir.parent / "empty-venv"
        venv.create(empty_venv, with_pip=False)
        plain_python = str(empty_venv / "bin" / "python")
        peerd = [*_peerd(), "--config", str(alice.config)]
        # The same console script (or `-m peerd`), run by the empty virtualenv's interpreter.
        plain_peerd = [plain_python, *(peerd[1:] if peerd[0] == sys.executable else peerd)]
        src = alice.dir / "small.bin"
        src.write_bytes(os.urandom(4096))
        send = [*peerd, "send", str(src), "--to", bob.peer_id, "--wait", "--no-progress"]
        for argv in (
            [sys.executable, "-c", "pass"],
            [*peerd, "status"],
            [*peerd, "id"],
            send,
            [plain_python, "-c", "pass"],
            [*plain_peerd, "status"],
        ):
            _timed_run(argv, env)  # compiles what each imports into the cache
        bare: list[float] = []
        status: list[float] = []
        offline: list[float] = []
        cli_send: list[float] = []
        api_send: list[float] = []
        no_bytecode: list[float] = []
        plain_bare: list[float] = []
        plain_status: list[float] = []
        load_before = load_average()
        for _ in range(rounds):
            bare.append(_timed_run([sys.executable, "-c", "pass"], env))
            status.append(_timed_run([*peerd, "status"], env))
            offline.append(_timed_run([*peerd, "id"], env))
            cli_send.append(_timed_run(send, env))
            api_send.append(asyncio.run(_client_send(str(alice.socket), src, bob.peer_id)))
            no_bytecode.append(_timed_run([*peerd, "status"], sources))
            plain_bare.append(_timed_run([plain_python, "-c", "pass"], env))
            plain_status.append(_timed_run([*plain_peerd, "status"], env))
        load_after = load_average()
    ms = {
        k: median(v) * 1000
        for k, v in {
            "bare": bare,
            "status": status,
            "offline": offline,
            "cli": cli_send,
            "api": api_send,
            "source": no_bytecode,
            "plain_bare": plain_bare,
            "plain_status": plain_status,
        }.items()
    }
    table(
        ["command", "median ms", "vs baseline"],
        [
            ["`python -c pass` (baseline)", f"{ms['bare']:.1f}", "1.00x"],
            ["`peerd status`", f"{ms['status']:.1f}", f"{ms['status'] / ms['bare']:.2f}x"],
            [
                "`peerd id` (offline, reads the keys)",
                f"{ms['offline']:.1f}",
                f"{ms['offline'] / ms['bare']:.2f}x",
            ],
            ["send 4 KiB --wait via `peerd.Client` (baseline)", f"{ms['api']:.1f}", "+0 ms"],
            ["`peerd send` 4 KiB `--wait`", f"{ms['cli']:.1f}", f"{ms['cli'] - ms['api']:+.1f} ms"],
            [
                "`peerd status`, PYTHONDONTWRITEBYTECODE=1, "
                + ("the checkout's `__pycache__`" if tree_bytecode else "no `__pycache__`"),
                f"{ms['source']:.1f}",
                f"{ms['source'] / ms['bare']:.2f}x",
            ],
            ["`python -c pass`, a virtualenv with no `.pth`", f"{ms['plain_bare']:.1f}", "1.00x"],
            [
                "`peerd status`, the same",
                f"{ms['plain_status']:.1f}",
                f"{ms['plain_status'] / ms['plain_bare']:.2f}x",
            ],
        ],
    )
    print(f"\n{rounds} rounds, load average {load_before} before, {load_after} after")
    status_ok = ms["status"] / ms["bare"] <= GOAL_STATUS_RATIO
    send_ok = ms["cli"] - ms["api"] <= GOAL_SEND_EXTRA_MS
    print(
        f"peerd status {ms['status'] / ms['bare']:.2f}x a bare start (goal <= "
        f"{GOAL_STATUS_RATIO:.0f}x): {verdict(status_ok)}"
    )
    print(
        f"peerd send --wait {ms['cli'] - ms['api']:+.1f} ms over peerd.Client (goal <= "
        f"{GOAL_SEND_EXTRA_MS:.0f} ms): {verdict(send_ok)}"
    )
    return status_ok and send_ok
