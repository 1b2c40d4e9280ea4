"""File transfers between running daemons (issue 5, "Performance").

Every peerd number is timed in-process with the Python client (`Client.send(..., wait=True)`):
from the send request to the sender learning that every receiver has the file verified (hash
and signature), fsynced and renamed into place. Daemons run on a private Mosquitto configured as
shipped (its ACL, limits and queue bounds), each authenticated as its peer id. Received files
are deleted between runs. Before each peerd run the file is rewritten with new random bytes (a
model the receiver never had, as a first send is; the contenders that follow in that round send
the same bytes); the source files stay in the page cache for every contender alike.

1. Throughput of one file against, in the same run, (a) aiomqtt publishing it in 256 KiB chunks
   with 16 QoS 1 publishes in flight to a subscriber process that writes and fsyncs it
   (`scripts/bench_mqtt.py`; its broker has the queue limits lifted, because this baseline has no
   flow control of its own), goal >= 0.9x; (b) `scp -c aes128-gcm@openssh.com` to a private sshd
   on loopback, timed to the copy fsynced, goal >= 1.0x. For information: our link's plaintext
   transfer (16 in flight), a plain `await publish()` loop, default scp. Runs are interleaved;
   medians.
2. Peak resident memory (VmHWM) of each daemon, restarted before each size, for a small and a
   large file: goal <= 150 MB and the two sizes within 10% of each other.
3. Fan-out to 8 receivers: bytes the sender published (the transfer's `published_bytes`, and the
   sender's broker link counter) against the file size, goal <= 1.05x; wall time against the
   same file to one receiver, goal <= 2x.
4. A receiver SIGKILLed half way (a proxy holds chunk frames after half of them), restarted: the
   frames the sender published again (`resent_frames`), goal <= two windows (128 chunks: credit
   is granted as chunks arrive, so what was in flight plus what was written but not yet durable
   is at most two windows, protocol/SPEC.md 7.6).
5. The two MQTT clients of the transport port side by side (`scripts/benchmarks/clients.py`):
   transfer MB/s, daemon CPU per GB and session setup with `[broker] client` builtin and aiomqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import blake3

from peerd.client import Client
from scripts.bench_mqtt import _test_file, run_plain_transfer, shipped_broker
from scripts.benchmarks._cluster import (
    hwm,
    load_average,
    scratch_dir,
    shipped_cluster,
)
from scripts.benchmarks.common import median, table, verdict
from scripts.evaluation.lab import cpu_seconds, node_pid
from tests.support.cluster import Node, pair, wait_until
from tests.support.hostile import TO_CLIENT, Hold, HostileProxy

CHUNK = 256 * 1024
WINDOW = 64  # chunks: protocol.transfer.TransferConfig.window (the initial one; loopback keeps it)
GOAL_VS_AIOMQTT = 0.9
GOAL_VS_SCP = 1.0
# Issue 12: LAN transfer stays at least at the 1.4x aiomqtt-16 measured when it was filed.
HOLD_VS_AIOMQTT = 1.4
GOAL_MEMORY = 150e6
GOAL_MEMORY_SPREAD = 0.10
GOAL_FANOUT_BYTES = 1.05
GOAL_FANOUT_TIME = 2.0
FANOUT = 8


def _digest(path: Path) -> bytes:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.digest()


def _rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


# -- peerd --------------------------------------------------------------------------------------


def _inbox(receiver: Node, sender: Node) -> Path:
    return receiver.dir / "inbox" / sender.peer_id


def _clear_inbox(receivers: list[Node], sender: Node) -> None:
    for r in receivers:
        inbox = _inbox(r, sender)
        if inbox.exists():
            for p in inbox.iterdir():
                if not p.name.startswith("."):
                    p.unlink()


async def _send(sender: Node, path: Path, receivers: list[Node]) -> tuple[float, dict[str, Any]]:
    async with await Client.connect(socket_path=sender.socket, timeout=None) as c:
        t0 = time.perf_counter()
        result = await c.send(path, [r.peer_id for r in receivers], wait=True)
        seconds = time.perf_counter() - t0
    if result["state"] != "verified":
        raise RuntimeError(f"the transfer ended {result['state']}: {result}")
    return seconds, result


def peerd_send(
    sender: Node,
    path: Path,
    receivers: list[Node],
    *,
    check: bool = True,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """One timed transfer of new content; the received copies are checked and deleted. CPU
    seconds of each daemon (and of the broker, if its pid is given) during the transfer under
    "cpu".

    The file is rewritten with new random bytes first (same path and size, so the contenders
    that follow send the same bytes): a model a receiver has not had. Sent unchanged run after
    run, from the second run on it would be a file sent before, which goes with its recipe
    beside it (protocol/SPEC.md 7.11) to a receiver that deleted its copy. After the transfer
    this waits for the recipe that follows a new file, so its CPU lands in no other run."""
    refresh(path)
    _clear_inbox(receivers, sender)
    pids = {"sender": node_pid(sender), **{r.name: node_pid(r) for r in receivers}}
    if broker_pid is not None:
        pids["broker"] = broker_pid
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    published0 = sender.status()["broker"]["stats"]["published_bytes"]
    seconds, result = asyncio.run(_send(sender, path, receivers))
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    published = sender.status()["broker"]["stats"]["published_bytes"] - published0
    late_recipes_sent(sender)
    if check:
        want = _digest(path)
        for r in receivers:
            got = _inbox(r, sender) / path.name
            if _digest(got) != want:
                raise RuntimeError(f"{r.name} received a different file")
    _clear_inbox(receivers, sender)
    return {
        "seconds": seconds,
        "mb_s": _rate(path.stat().st_size, seconds),
        "published_bytes": result["published_bytes"],
        "link_published_bytes": published,
        "resent_frames": result["resent_frames"],
        "cpu": cpu,
    }


def refresh(path: Path) -> None:
    """New random content for `path`, in place, written back before anything is timed."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        for off in range(0, size, 8 << 20):
            f.write(os.urandom(min(8 << 20, size - off)))
        f.flush()
        os.fsync(f.fileno())


def late_recipes_sent(sender: Node) -> None:
    """Until no recipe that follows a transfer waits at `sender` (at most 120 s)."""
    deadline = time.monotonic() + 120
    while sender.status()["transfers"].get("late-recipes-waiting", 0):
        if time.monotonic() > deadline:
            raise RuntimeError("the recipe that follows the transfer did not go within 120 s")
        time.sleep(0.05)


# -- scp to a private sshd -----------------------------------------------------------------------


def _ensure_sshd() -> str:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "openssh-server"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
    # sshd refuses to start without its (empty) privilege separation directory.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    return sshd


class Scp(Protocol):
    """Seconds to copy `src` to `dest` with scp (`cipher`, or ssh's default) and fsync the
    copy; through `port` instead of straight to the sshd if given (a relay in front of it)."""

    def __call__(
        self, src: Path, dest: Path, cipher: str | None, *, port: int | None = None
    ) -> float: ...


@contextlib.contextmanager
def private_sshd(port: int | None = None) -> Iterator[Scp]:
    """An sshd of our own on a loopback port (`port`, or a free one; generated host and client
    keys, a config in a temp dir; the system's sshd and its config are not touched)."""
    from tests.support.broker import free_port, wait_for_port  # noqa: PLC0415

    sshd = _ensure_sshd()
    d = scratch_dir("peerd-bench-ssh-")
    sshd_port = port or free_port()
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(d / "sshd.log", "wb"),  # noqa: SIM115 - lives as long as sshd
    )
    user = getpass.getuser()

    def scp(src: Path, dest: Path, cipher: str | None, *, port: int | None = None) -> float:
        args = [
            "scp",
            "-q",
            "-i",
            str(d / "client_key"),
            "-P",
            str(port or sshd_port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        if cipher:
            args += ["-c", cipher]
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        t0 = time.perf_counter()
        subprocess.run([*args, str(src), f"{user}@127.0.0.1:{dest}"], check=True)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - t0
        if dest.stat().st_size != src.stat().st_size:
            raise RuntimeError("scp copied a file of another size")
        dest.unlink()
        return seconds

    try:
        wait_for_port(sshd_port)
        yield scp
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


# -- the parts ------------------------------------------------------------------------------------


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in xs)


def throughput(
    sender: Node, receiver: Node, path: Path, runs: int, info_runs: int, broker_pid: int
) -> tuple[bool, str]:
    size = path.stat().st_size
    users = {"benchpub": secrets.token_hex(8), "benchsub": secrets.token_hex(8)}
    pair_ps = (("benchpub", users["benchpub"]), ("benchsub", users["benchsub"]))
    out_dir = scratch_dir("peerd-bench-sink-")
    rates: dict[str, list[float]] = {}
    cpu: list[dict[str, float]] = []

    def add(name: str, mb_s: float) -> None:
        rates.setdefault(name, []).append(mb_s)

    try:
        with (
            shipped_broker(users, queue_limits=False) as plain_url,
            private_sshd() as scp,
        ):
            dest = out_dir / "scp-copy"
            for _ in range(runs):
                r = peerd_send(sender, path, [receiver], broker_pid=broker_pid)
                add("peerd", r["mb_s"])
                cpu.append({**r["cpu"], "seconds": r["seconds"]})
                p = run_plain_transfer(
                    plain_url, path, inflight=16, qos=1, users=pair_ps, out_dir=out_dir
                )
                if not p["verified"]:
                    raise RuntimeError(f"the aiomqtt baseline did not complete: {p}")
                add("aiomqtt16", p["mb_s"])
                add("scp-gcm", _rate(size, scp(path, dest, "aes128-gcm@openssh.com")))
            for _ in range(info_runs):
                info: tuple[tuple[str, Literal["link", "aiomqtt"], int], ...] = (
                    ("link16", "link", 16),
                    ("aiomqtt1", "aiomqtt", 1),
                )
                for name, client, inflight in info:
                    p = run_plain_transfer(
                        plain_url,
                        path,
                        client=client,
                        inflight=inflight,
                        qos=1,
                        users=pair_ps,
                        out_dir=out_dir,
                    )
                    if p["verified"]:
                        add(name, p["mb_s"])
                add("scp", _rate(size, scp(path, dest, None)))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    ours = median(rates["peerd"])
    vs_aiomqtt = ours / median(rates["aiomqtt16"])
    vs_scp = ours / median(rates["scp-gcm"])
    ok_a = vs_aiomqtt >= GOAL_VS_AIOMQTT
    ok_s = vs_scp >= GOAL_VS_SCP
    label = {
        "peerd": "**peerd** daemon to daemon, end to end encrypted, verified, fsynced",
        "aiomqtt16": "(a) aiomqtt, 256 KiB chunks, QoS 1, 16 in flight, plaintext",
        "scp-gcm": "(b) scp -c aes128-gcm@openssh.com, private sshd on loopback",
        "link16": "info: peerd/mqtt pipeline, QoS 1, 16 in flight, plaintext",
        "aiomqtt1": "info: aiomqtt, plain `await publish()` loop, QoS 1, plaintext",
        "scp": "info: scp, default cipher (chacha20-poly1305)",
    }
    rows: list[list[object]] = []
    for key, name in label.items():
        if key not in rates:
            rows.append([name, "failed", "", "", ""])
            continue
        med = median(rates[key])
        ratio = ours / med
        goal = {"aiomqtt16": (GOAL_VS_AIOMQTT, ok_a), "scp-gcm": (GOAL_VS_SCP, ok_s)}.get(key)
        rows.append(
            [
                name,
                f"**{med:.0f}**",
                _runs(rates[key]),
                "" if key == "peerd" else f"{ratio:.2f}",
                "" if goal is None else f">= {goal[0]}: {verdict(goal[1])}",
            ]
        )
    mib = size >> 20
    print(
        f"\nThroughput, {mib} MiB file, MB/s (10^6 bytes/s) to the received file written and "
        "fsynced, median of the runs (interleaved).\n"
    )
    table(["transfer", "MB/s", "runs", "peerd / this", "goal"], rows)
    # Each pair ran back to back, so its ratio cancels the machine's drift between pairs (the
    # baseline alone has spread by a third within one run here).
    pairs = [a / b for a, b in zip(rates["peerd"], rates["aiomqtt16"], strict=True)]
    print(
        f"\npeerd / aiomqtt-16 per interleaved pair: {', '.join(f'{r:.2f}' for r in pairs)};"
        f" median {median(pairs):.2f} (issue 12 holds it at >= {HOLD_VS_AIOMQTT}:"
        f" {verdict(median(pairs) >= HOLD_VS_AIOMQTT)})."
    )
    mid = sorted(cpu, key=lambda c: c["seconds"])[len(cpu) // 2]
    print(
        f"\nCPU seconds during the median peerd run ({mid['seconds']:.2f} s wall): sender "
        f"daemon {mid['sender']:.2f}, receiver daemon {mid[receiver.name]:.2f}, broker "
        f"{mid['broker']:.2f}."
    )
    summary = (
        f"peerd {ours:.0f} MB/s: {vs_aiomqtt:.2f}x aiomqtt-16 (goal >= {GOAL_VS_AIOMQTT}: "
        f"{verdict(ok_a)}), {vs_scp:.2f}x scp-gcm (goal >= {GOAL_VS_SCP}: {verdict(ok_s)})"
    )
    return ok_a and ok_s, summary


def memory(sender: Node, receiver: Node, small: Path, large: Path) -> tuple[bool, str]:
    peaks: dict[str, dict[str, int]] = {}
    for path in (small, large):
        for node in (sender, receiver):
            node.stop()
            node.start()
        peerd_send(sender, path, [receiver], check=False)
        peaks[path.name] = {"sender": hwm(node_pid(sender)), "receiver": hwm(node_pid(receiver))}
    ok = True
    rows: list[list[object]] = []
    for role in ("sender", "receiver"):
        a, b = peaks[small.name][role], peaks[large.name][role]
        spread = abs(b - a) / min(a, b)
        good = max(a, b) <= GOAL_MEMORY and spread <= GOAL_MEMORY_SPREAD
        ok = ok and good
        rows.append(
            [
                f"{role} daemon",
                f"{a / 1e6:.1f}",
                f"{b / 1e6:.1f}",
                f"{spread:.1%}",
                verdict(good),
            ]
        )
    print(
        "\nPeak resident memory (VmHWM, MB) of each daemon, restarted before each file; goal "
        f"<= {GOAL_MEMORY / 1e6:.0f} MB and the two sizes within {GOAL_MEMORY_SPREAD:.0%}.\n"
    )
    table(
        [
            "daemon",
            f"{small.stat().st_size >> 20} MiB",
            f"{large.stat().st_size >> 20} MiB",
            "difference",
            "goal",
        ],
        rows,
    )
    worst = max(v for p in peaks.values() for v in p.values())
    return ok, f"peak RSS at most {worst / 1e6:.0f} MB: {verdict(ok)}"


def fanout(
    sender: Node, receivers: list[Node], path: Path, runs: int, broker_pid: int
) -> tuple[bool, str]:
    size = path.stat().st_size
    single = [peerd_send(sender, path, receivers[:1], broker_pid=broker_pid) for _ in range(runs)]
    many = [peerd_send(sender, path, receivers, broker_pid=broker_pid) for _ in range(runs)]
    t1 = median([r["seconds"] for r in single])
    t8 = median([r["seconds"] for r in many])
    published = max(r["published_bytes"] for r in many)
    on_link = max(r["link_published_bytes"] for r in many)
    ok_bytes = published / size <= GOAL_FANOUT_BYTES and on_link / size <= GOAL_FANOUT_BYTES
    ok_time = t8 / t1 <= GOAL_FANOUT_TIME
    cpu = sorted(many, key=lambda r: r["seconds"])[len(many) // 2]["cpu"]
    cpu1 = sorted(single, key=lambda r: r["seconds"])[len(single) // 2]["cpu"]
    print(
        f"\nFan-out: one {size >> 20} MiB file to {len(receivers)} receivers at once (each chunk "
        f"encrypted once, published once to the transfer's topic), median of {runs} runs.\n"
    )
    table(
        ["measured", "value", "ratio", "goal"],
        [
            [
                "bytes the sender published: the transfer's `published_bytes`",
                f"{published / 1e6:.1f} MB",
                f"{published / size:.3f}x the file",
                f"<= {GOAL_FANOUT_BYTES}: {verdict(published / size <= GOAL_FANOUT_BYTES)}",
            ],
            [
                "bytes the sender's broker link published (chunks + session traffic)",
                f"{on_link / 1e6:.1f} MB",
                f"{on_link / size:.3f}x the file",
                f"<= {GOAL_FANOUT_BYTES}: {verdict(on_link / size <= GOAL_FANOUT_BYTES)}",
            ],
            [
                f"wall time to {len(receivers)} receivers vs to 1",
                f"{t8:.2f} s vs {t1:.2f} s",
                f"{t8 / t1:.2f}x",
                f"<= {GOAL_FANOUT_TIME}: {verdict(ok_time)}",
            ],
        ],
    )
    receivers_cpu = sum(v for k, v in cpu.items() if k not in ("sender", "broker"))
    total = sum(cpu.values())
    print(
        f"\nCPU seconds in the median fan-out run: sender {cpu['sender']:.2f}, the "
        f"{len(receivers)} receivers together {receivers_cpu:.2f}, broker {cpu['broker']:.2f}: "
        f"{total:.2f} in all, which {os.cpu_count()} CPUs need at least "
        f"{total / (os.cpu_count() or 1):.2f} s of wall time for. To one receiver: sender "
        f"{cpu1['sender']:.2f}, receiver {cpu1[receivers[0].name]:.2f}, broker "
        f"{cpu1['broker']:.2f}."
    )
    return ok_bytes and ok_time, (
        f"fan-out {published / size:.3f}x bytes, {t8 / t1:.2f}x time: "
        f"{verdict(ok_bytes and ok_time)}"
    )


def resume(sender: Node, receiver: Node, proxy: HostileProxy, path: Path) -> tuple[bool, str]:
    """The receiver talks to the broker through `proxy`; SIGKILLed once half the chunk frames
    reached it, restarted once killed."""
    size = path.stat().st_size
    half = size // CHUNK // 2
    _clear_inbox([receiver], sender)
    hold = proxy.add_rule(TO_CLIENT, "peerd/v1/+/x/#", Hold(), skip=half)

    async def start() -> str:
        async with await Client.connect(socket_path=sender.socket) as c:
            return str((await c.send(path, receiver.peer_id))["id"])

    async def record(tid: str) -> dict[str, Any]:
        async with await Client.connect(socket_path=sender.socket) as c:
            return next(t for t in await c.transfers() if t["id"] == tid)

    tid = asyncio.run(start())
    wait_until(lambda: hold.applied > 0, 60, what="half of the chunks through")
    acked = asyncio.run(record(tid))["receivers"][receiver.peer_id]["bytes"]
    receiver.kill()
    proxy.remove_rule(hold)
    receiver.start()
    wait_until(lambda: asyncio.run(record(tid))["state"] != "active", 120, what="the transfer ends")
    final = asyncio.run(record(tid))
    if final["state"] != "verified":
        raise RuntimeError(f"the resumed transfer ended {final['state']}: {final}")
    got = _inbox(receiver, sender) / path.name
    if _digest(got) != _digest(path):
        raise RuntimeError("the resumed transfer delivered a different file")
    _clear_inbox([receiver], sender)
    resent = final["resent_frames"]
    extra = final["published_bytes"] - size
    ok = resent <= 2 * WINDOW
    print(
        f"\nResume: a {size >> 20} MiB file ({size // CHUNK} chunks); a proxy in front of the "
        f"receiver holds chunk frames after the first {half}; the receiver is SIGKILLed as soon "
        f"as the first is held (the sender had {acked / 1e6:.1f} MB acknowledged as durable) and "
        "restarted; the transfer resumes and completes, verified.\n"
    )
    table(
        ["measured", "value", "goal"],
        [
            [
                "chunk frames published again (`resent_frames`)",
                f"{resent} ({resent * CHUNK / 1e6:.1f} MB of chunks)",
                f"<= {2 * WINDOW} (two windows, {2 * WINDOW * CHUNK / 1e6:.1f} MB): {verdict(ok)}",
            ],
            [
                "bytes published beyond the file size (`published_bytes` - size, incl. framing)",
                f"{extra / 1e6:.1f} MB",
                "",
            ],
        ],
    )
    return ok, f"{resent} frames re-sent after SIGKILL (goal <= {2 * WINDOW}): {verdict(ok)}"


def run(quick: bool = False) -> bool:
    print(f"load average before: {load_average()}, {os.cpu_count()} CPUs\n")
    if quick:
        big, small, large, fan, half = 64, 16, 128, 16, 32
        runs, info_runs, fan_runs = 1, 1, 1
    else:
        big, small, large, fan, half = 1024, 256, 2048, 256, 256
        runs, info_runs, fan_runs = 5, 2, 3
    files = {n: _test_file(n) for n in {big, small, large, fan, half}}
    names = ["sender", *(f"r{i}" for i in range(1, FANOUT + 1)), "resumer"]
    results: list[tuple[bool, str]] = []
    with shipped_cluster(names, start=False) as (broker, nodes):
        sender, *receivers, resumer = nodes
        with HostileProxy(broker.port) as proxy:
            resumer.config.write_text(resumer.config.read_text().replace(broker.url, proxy.url))
            for node in (sender, receivers[0], resumer):
                node.start()
            pair(sender, receivers[0])
            pair(sender, resumer)
            peerd_send(sender, files[fan], [receivers[0]])  # warm-up: session, caches
            assert broker.proc is not None
            bpid = broker.proc.pid
            results.append(throughput(sender, receivers[0], files[big], runs, info_runs, bpid))
            results.append(resume(sender, resumer, proxy, files[half]))
            resumer.kill()
            results.append(memory(sender, receivers[0], files[small], files[large]))
            for r in receivers[1:]:
                r.start()
                pair(sender, r)
            results.append(fanout(sender, receivers, files[fan], fan_runs, bpid))
    from scripts.benchmarks.clients import compare  # noqa: PLC0415 - it imports this module

    results.append(compare(files[fan if quick else big], runs=2 if quick else runs, rounds=30))
    print("\nSummary: " + "; ".join(s for _, s in results) + ".")
    return all(ok for ok, _ in results)
