"""Plaintext MQTT baselines that peerd's benchmarks compare against, each between processes.

    .venv/bin/python -m scripts.bench_mqtt [--size-mb 1024] [--runs 3] [--rounds 2000] [--quick]

starts a private Mosquitto configured as shipped (systemd/mosquitto-peerd.conf: its ACL and
limits, users for the benchmark's clients) and prints, for aiomqtt (the reference the issues name)
and for peerd's own link (peerd/mqtt/):

- floor: three messages A -> B -> A -> B through the broker, p50/p99, QoS 0 and QoS 1: the
  plaintext floor of a three-message handshake (timed from A's first send to B's receipt of the
  third, on the machine's monotonic clock, which both processes share);
- transfer: a file in 256 KiB chunks, QoS 1, 16 publishes in flight (and a plain `await
  publish()` loop), a separate subscriber process writing it and fsyncing it at the end: MB/s
  from the first publish to the fsync (MB = 10^6 bytes), and CPU seconds of each process;
- small: 64-byte QoS 0 messages, one way: CPU microseconds per message on each side (the
  per-message overhead of a client, without the payload copies that dominate the transfer).

Other benchmarks import `run_pingpong_floor`, `run_plain_transfer` and `run_small_messages` and
pass the URL of a broker they started (without credentials) and `users`, the two broker accounts
the workers log in with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

CHUNK = 256 * 1024
Client = Literal["aiomqtt", "link"]
CLIENTS: tuple[Client, ...] = ("aiomqtt", "link")
ROOT = Path(__file__).resolve().parents[1]
# Sizes of the three messages of a peerd XX handshake (ephemeral key; + static key and
# certificate; + static key and certificate), so the floor carries comparable bytes.
HANDSHAKE_SIZES = (64, 256, 256)
QUIET = 10.0  # a transfer sink gives up after this long without a chunk


# --- the parent side ----------------------------------------------------------------------------


def _worker(kind: str, url: str, **args: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, BENCH_URL=url, BENCH_ARGS=json.dumps(args))
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.bench_mqtt", "--worker", kind],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The next JSON line a worker prints (it prints one when ready and one when done)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"a benchmark worker exited ({proc.returncode}) without a result")
    result: dict[str, Any] = json.loads(line)
    return result


def finish(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode:
            raise RuntimeError(f"a benchmark worker failed with exit code {proc.returncode}")


def with_credentials(url: str, user: str, password: str) -> str:
    """The broker URL `url` (mqtt://host:port) with a login in it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{user}:{password}@{parts.hostname}:{parts.port}"


def run_pingpong_floor(
    broker_url: str,
    rounds: int = 2000,
    *,
    qos: int = 0,
    client: Client = "aiomqtt",
    users: tuple[tuple[str, str], tuple[str, str]],
    warmup: int = 200,
) -> dict[str, Any]:
    """p50/p99 of three messages A -> B -> A -> B, in ms. `users`: ((a, pw), (b, pw))."""
    (a, pa), (b, pb) = users
    common = {"rounds": rounds + warmup, "qos": qos, "client": client, "peer_a": a, "peer_b": b}
    resp = _worker("pong", with_credentials(broker_url, b, pb), me=b, **common)
    read_line(resp)  # subscribed
    init = _worker("ping", with_credentials(broker_url, a, pa), me=a, **common)
    sent = read_line(init)["t0"]
    received = read_line(resp)["t3"]
    finish(init, resp)
    ms = sorted((t3 - t0) / 1e6 for t0, t3 in zip(sent[warmup:], received[warmup:], strict=True))
    return {
        "client": client,
        "qos": qos,
        "rounds": rounds,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
    }


def run_plain_transfer(
    broker_url: str,
    path: Path,
    *,
    client: Client = "aiomqtt",
    inflight: int = 16,
    qos: int = 1,
    out_dir: Path | None = None,
    users: tuple[tuple[str, str], tuple[str, str]],
    subscriber_url: str | None = None,
) -> dict[str, Any]:
    """A file in 256 KiB chunks to a subscriber process that writes and fsyncs it.

    `inflight` > 1 keeps that many publishes in flight; 1 is a plain `await publish()` loop.
    `users`: ((publisher, pw), (subscriber, pw)). The subscriber connects to `subscriber_url`
    if given (the same broker through another path, as the WAN benchmark's delay lines).
    """
    size = path.stat().st_size
    (pu, pp), (su, sp) = users
    topic = f"peerd/v1/bench/x/{pu}/{os.urandom(16).hex()}"  # the shipped ACL: sender's level
    with tempfile.TemporaryDirectory(dir=out_dir or path.parent) as tmp:
        out = Path(tmp) / "received"
        sub = _worker(
            "sink",
            with_credentials(subscriber_url or broker_url, su, sp),
            me=su,
            client=client,
            topic=topic,
            size=size,
            out=str(out),
            qos=qos,
        )
        read_line(sub)
        pub = _worker(
            "source",
            with_credentials(broker_url, pu, pp),
            me=pu,
            client=client,
            topic=topic,
            path=str(path),
            inflight=inflight,
            qos=qos,
        )
        started = read_line(pub)
        ended = read_line(sub)
        finish(pub, sub)
        complete = ended["t_end"] is not None
        seconds = (ended["t_end"] - started["t_start"]) / 1e9 if complete else None
        verified = complete and _sha256(out) == _sha256(path)
    return {
        "client": client,
        "inflight": inflight,
        "qos": qos,
        "bytes": size,
        "received": ended["written"],
        "seconds": seconds,
        "mb_s": size / seconds / 1e6 if seconds else None,
        "verified": verified,
        "publisher_cpu_s": started["cpu"],
        "subscriber_cpu_s": ended["cpu"],
    }


def run_small_messages(
    broker_url: str,
    count: int = 20000,
    *,
    client: Client = "aiomqtt",
    size: int = 64,
    users: tuple[tuple[str, str], tuple[str, str]],
) -> dict[str, Any]:
    """`count` QoS 0 messages one way; CPU microseconds per message in each process."""
    (pu, pp), (su, sp) = users
    topic = f"peerd/v1/bench/x/{pu}/{os.urandom(16).hex()}"  # the shipped ACL: sender's level
    sub = _worker(
        "count",
        with_credentials(broker_url, su, sp),
        me=su,
        client=client,
        topic=topic,
        count=count,
    )
    read_line(sub)
    pub = _worker(
        "spray",
        with_credentials(broker_url, pu, pp),
        me=pu,
        client=client,
        topic=topic,
        count=count,
        size=size,
    )
    sent = read_line(pub)
    got = read_line(sub)
    finish(pub, sub)
    return {
        "client": client,
        "count": count,
        "received": got["received"],
        "publisher_us_per_msg": sent["cpu"] / count * 1e6,
        "subscriber_us_per_msg": got["cpu"] / max(1, got["received"]) * 1e6,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- the workers (one per process) --------------------------------------------------------------


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def cpu_time() -> float:
    t = os.times()
    return t.user + t.system


class _Endpoint:
    """The same small API over aiomqtt and over peerd's link, for the workers."""

    def __init__(self, client: Client, url: str, me: str) -> None:
        self.kind = client
        self.url = url
        self.me = me
        self.stack = contextlib.AsyncExitStack()
        self.aio: Any = None
        self.link: Any = None
        self.queue: asyncio.Queue[bytes] | None = None
        self.messages: Any = None

    async def __aenter__(self) -> _Endpoint:
        parts = urlsplit(self.url)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if self.kind == "aiomqtt":
            import aiomqtt  # noqa: PLC0415 - only the aiomqtt workers need it

            self.aio = aiomqtt.Client(
                parts.hostname or "127.0.0.1",
                parts.port or 1883,
                identifier=self.me,
                username=user,
                password=password,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                max_inflight_messages=64,
            )
            self.aio.pending_calls_threshold = 1 << 30  # it logs a warning per publish beyond 10
            await self.stack.enter_async_context(self.aio)
        else:
            from peerd.mqtt import BrokerSettings, MqttLink  # noqa: PLC0415

            settings = BrokerSettings.from_url(self.url, client_id=self.me)
            self.link = await self.stack.enter_async_context(MqttLink(settings))
            await self.link.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()

    async def subscribe(self, topic: str, qos: int, handler: Any = None) -> None:
        if self.kind == "aiomqtt":
            await self.aio.subscribe(topic, qos=qos)
            self.messages = self.aio.messages.__aiter__()
        elif handler is not None:
            await self.link.subscribe(topic, qos=qos, handler=handler, timeout=10)
        else:
            self.messages = await self.link.subscribe(
                topic, qos=qos, max_messages=1 << 16, max_bytes=1 << 30, timeout=10
            )

    async def next_payload(self) -> bytes:
        if self.kind == "aiomqtt":
            payload: bytes = (await self.messages.__anext__()).payload
            return payload
        msg = await self.messages.get()
        data: bytes = msg.payload
        return data

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        if self.kind == "aiomqtt":
            await self.aio.publish(topic, payload, qos=qos)
        else:
            await self.link.publish(topic, payload, qos=qos)


async def _pingpong(args: dict[str, Any]) -> None:
    me, a, b = args["me"], args["peer_a"], args["peer_b"]
    qos, rounds = args["qos"], args["rounds"]
    m1, m2, m3 = (os.urandom(n) for n in HANDSHAKE_SIZES)
    async with _Endpoint(args["client"], os.environ["BENCH_URL"], me) as ep:
        await ep.subscribe(f"peerd/v1/bench/in/{me}", qos)
        to_a, to_b = f"peerd/v1/bench/in/{a}", f"peerd/v1/bench/in/{b}"
        stamps: list[int] = []
        if me == b:
            emit(ready=True)
            for _ in range(rounds):
                await ep.next_payload()
                await ep.publish(to_a, m2, qos)
                await ep.next_payload()
                stamps.append(time.perf_counter_ns())
                await ep.publish(to_a, b"next", qos)  # paces the rounds; not timed
            emit(t3=stamps)
        else:
            for _ in range(rounds):
                t0 = time.perf_counter_ns()
                await ep.publish(to_b, m1, qos)
                await ep.next_payload()
                await ep.publish(to_b, m3, qos)
                stamps.append(t0)
                await ep.next_payload()
            emit(t0=stamps)


async def _sink(args: dict[str, Any]) -> None:
    size = args["size"]
    fd = os.open(args["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    done = asyncio.get_running_loop().create_future()

    def write(msg: Any) -> None:  # the link's handler: written from the read path, in order
        nonlocal written
        written += os.write(fd, msg.payload)
        if written >= size and not done.done():
            done.set_result(None)

    t_end = None
    async with _Endpoint(args["client"], os.environ["BENCH_URL"], args["me"]) as ep:
        await ep.subscribe(args["topic"], args["qos"], write if ep.kind == "link" else None)
        emit(ready=True)
        cpu0 = cpu_time()
        # A chunk the broker dropped never comes: give up after QUIET seconds without progress.
        with contextlib.suppress(TimeoutError):
            if ep.kind == "link":
                while not done.done():
                    before = written
                    await asyncio.wait([done], timeout=QUIET)
                    if written == before and not done.done():
                        raise TimeoutError
            else:
                while written < size:
                    async with asyncio.timeout(QUIET):
                        payload = await ep.next_payload()
                    written += os.write(fd, payload)
            os.fsync(fd)
            t_end = time.perf_counter_ns()
        cpu = cpu_time() - cpu0
    os.close(fd)
    emit(t_end=t_end, cpu=cpu, written=written)


async def _source(args: dict[str, Any]) -> None:
    topic, qos, inflight = args["topic"], args["qos"], args["inflight"]
    async with _Endpoint(args["client"], os.environ["BENCH_URL"], args["me"]) as ep:
        with open(args["path"], "rb") as f:  # noqa: ASYNC230 - the read is part of the baseline
            t_start = time.perf_counter_ns()
            cpu0 = cpu_time()
            if inflight <= 1 or (ep.kind == "link" and qos == 0):
                # The link's QoS 0 publish returns once written; it waits only while the
                # socket's buffer is full, which is the flow control a QoS 0 window needs.
                while chunk := f.read(CHUNK):
                    await ep.publish(topic, chunk, qos)
            elif ep.kind == "link":
                async with ep.link.pipeline(inflight) as pipe:
                    while chunk := f.read(CHUNK):
                        await pipe.publish(topic, chunk)
            else:
                window = asyncio.Semaphore(inflight)
                tasks: set[asyncio.Task[None]] = set()
                while chunk := f.read(CHUNK):
                    await window.acquire()
                    task = asyncio.create_task(ep.publish(topic, chunk, qos))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _: window.release())
                await asyncio.gather(*tasks)
        emit(t_start=t_start, cpu=cpu_time() - cpu0)


async def _count(args: dict[str, Any]) -> None:
    count = args["count"]
    received = 0
    async with _Endpoint(args["client"], os.environ["BENCH_URL"], args["me"]) as ep:
        await ep.subscribe(args["topic"], 0)
        emit(ready=True)
        cpu0 = cpu_time()
        with contextlib.suppress(TimeoutError):
            while received < count:
                # QoS 0 may be lost; a quiet second ends the count.
                async with asyncio.timeout(1.0):
                    await ep.next_payload()
                received += 1
    emit(received=received, cpu=cpu_time() - cpu0)


async def _spray(args: dict[str, Any]) -> None:
    payload = os.urandom(args["size"])
    async with _Endpoint(args["client"], os.environ["BENCH_URL"], args["me"]) as ep:
        cpu0 = cpu_time()
        for i in range(args["count"]):
            await ep.publish(args["topic"], payload, 0)
            if i % 256 == 0:
                await asyncio.sleep(0)  # let the client's own writer run
    emit(cpu=cpu_time() - cpu0)


_WORKERS = {
    "ping": _pingpong,
    "pong": _pingpong,
    "sink": _sink,
    "source": _source,
    "count": _count,
    "spray": _spray,
}


# --- the command line ---------------------------------------------------------------------------


# The plaintext transfer baselines have no flow control of their own: a subscriber that falls
# behind (a busy CPU is enough) makes Mosquitto queue for it, and past the shipped per-client
# limit (64 MiB) drop, so the transfer never completes. They run with those limits lifted;
# everything else is the shipped config. (peerd's own transfer keeps the broker's queue within
# one credit window, so it runs under the shipped limits.)
NO_QUEUE_LIMITS = "max_queued_messages 0\nmax_queued_bytes 0\n"


@contextlib.contextmanager
def shipped_broker(users: dict[str, str], *, queue_limits: bool = True) -> Iterator[str]:
    """A private Mosquitto with the shipped config and these users; yields its URL."""
    sys.path.insert(0, str(ROOT))
    from tests.support.broker import Broker  # noqa: PLC0415 - a test helper, not a dependency

    extra = "" if queue_limits else NO_QUEUE_LIMITS
    with Broker(shipped=True, users=users, extra_conf=extra) as broker:
        yield broker.url


def _test_file(size_mb: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"peerd-bench-{size_mb}MiB.bin"
    if not path.exists() or path.stat().st_size != size_mb << 20:
        with path.open("wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1 << 20))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="transfer size in MiB")
    parser.add_argument("--runs", type=int, default=3, help="transfer runs per variant (median)")
    parser.add_argument("--rounds", type=int, default=2000, help="ping-pong rounds")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 run, 300 rounds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_WORKERS[args.worker](json.loads(os.environ["BENCH_ARGS"])))
        return 0
    if args.quick:
        args.size_mb, args.runs, args.rounds = 64, 1, 300
    users = {name: os.urandom(8).hex() for name in ("bencha", "benchb", "benchpub", "benchsub")}
    pair_ab = (("bencha", users["bencha"]), ("benchb", users["benchb"]))
    pair_ps = (("benchpub", users["benchpub"]), ("benchsub", users["benchsub"]))
    path = _test_file(args.size_mb)
    with shipped_broker(users) as url:
        print(f"# plaintext MQTT baselines (Mosquitto as shipped, {url})\n")
        print("| floor: 3 messages A->B->A->B | QoS | p50 ms | p99 ms |")
        print("|---|---|---|---|")
        for client in CLIENTS:
            for qos in (0, 1):
                r = run_pingpong_floor(url, args.rounds, qos=qos, client=client, users=pair_ab)
                print(f"| {client} | {qos} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
        print("\n| small: 64-byte QoS 0, one way | CPU us/msg publisher | CPU us/msg subscriber |")
        print("|---|---|---|")
        for client in CLIENTS:
            r = run_small_messages(url, 20000, client=client, users=pair_ps)
            print(
                f"| {client} | {r['publisher_us_per_msg']:.1f} |"
                f" {r['subscriber_us_per_msg']:.1f} ({r['received']} received) |"
            )
    with shipped_broker(users, queue_limits=False) as url:
        print(
            f"\n| transfer {args.size_mb} MiB, 256 KiB chunks (queue limits lifted) | QoS |"
            " in flight | MB/s (median) | runs | publisher CPU s | subscriber CPU s |"
        )
        print("|---|---|---|---|---|---|---|")
        for client, qos, inflight in (
            ("aiomqtt", 1, 16),
            ("aiomqtt", 1, 1),
            ("aiomqtt", 0, 16),
            ("link", 1, 16),
            ("link", 1, 1),
            ("link", 0, 1),
        ):
            runs = [
                run_plain_transfer(
                    url, path, client=client, inflight=inflight, qos=qos, users=pair_ps
                )
                for _ in range(args.runs)
            ]
            good = [r for r in runs if r["verified"]]
            window = "write-paced" if client == "link" and not qos else str(inflight)
            prefix = f"| {client} | {qos} | {window}"
            if not good:
                print(f"{prefix} | FAILED: incomplete or corrupt | | | |")
                continue
            rates = [r["mb_s"] for r in good]
            mid = sorted(good, key=lambda r: r["mb_s"])[len(good) // 2]
            failed = f" ({len(runs) - len(good)} failed)" if len(good) < len(runs) else ""
            print(
                f"{prefix} | {statistics.median(rates):.0f} |"
                f" {', '.join(f'{x:.0f}' for x in rates)}{failed} |"
                f" {mid['publisher_cpu_s']:.2f} | {mid['subscriber_cpu_s']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
