"""Processes the daemon benchmarks start (one role per process, so that nothing shares an
interpreter with what it measures):

    python -m scripts.benchmarks._workers floor-ping|floor-pong|loadgen   (arguments: BENCH_ARGS)

- `floor-ping` / `floor-pong`: the plaintext floor of a handshake. Three messages of the sizes of
  peerd's HELLO, REPLY and FINISH go A -> B -> A -> B through the broker, paced like the daemon
  benchmark paces its handshakes, and stamped with `time.time()` at the same points as the
  daemons stamp theirs: A before it publishes the first, B when the third arrives.
- `loadgen`: plays many peers against one daemon. Each peer has its own identity (made with the
  real keystore), its own broker connection (username = peer id, as the shipped ACL wants) and
  its own `SessionManager`. It prints a JSON line when connected, then obeys commands on stdin:
  "one" (every peer opens one session with the daemon), "go" (every peer opens a new session as
  soon as its last one is confirmed, for `duration` seconds; "go RATE": the peers together offer
  RATE sessions per second), each answered with a JSON line of
  counts; it keeps its connections (so the daemon's sessions stay up) until "exit".

Each worker prints JSON lines on stdout; the parent reads them with `read_line` and ends them
with `finish`, both from scripts.bench_mqtt, whose workers work the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.bench_mqtt import _Endpoint, cpu_time, emit

ROOT = Path(__file__).resolve().parents[2]


# -- the parent's side ---------------------------------------------------------------------------


def spawn(role: str, **args: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, BENCH_ARGS=json.dumps(args), PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.benchmarks._workers", role],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def tell(proc: subprocess.Popen[str], command: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()


# -- the floor -----------------------------------------------------------------------------------


def pause_before(i: int, schedule: dict[str, float]) -> float:
    """How long to wait before round `i`: `gap`, except `pause` before every `burst`-th round
    (when `burst` is set). The daemon benchmark paces its handshakes with the same function."""
    burst = int(schedule.get("burst", 0))
    if burst and i % burst == 0:
        return schedule["pause"]
    return schedule["gap"]


async def _floor(args: dict[str, Any], *, initiator: bool) -> None:
    me, other = (args["a"], args["b"]) if initiator else (args["b"], args["a"])
    qos, rounds = args["qos"], args["rounds"]
    m1, m2, m3 = (os.urandom(n) for n in args["sizes"])
    inbox = "peerd/v1/bench/in/{}"
    async with _Endpoint(args["client"], args["url"], me) as ep:
        await ep.subscribe(inbox.format(me), qos)
        to_other = inbox.format(other)
        stamps: list[float] = []
        if not initiator:
            emit(ready=True)
            for _ in range(rounds):
                await ep.next_payload()
                await ep.publish(to_other, m2, qos)
                await ep.next_payload()
                stamps.append(time.time())
                await ep.publish(to_other, b"next", qos)  # paces the rounds; not timed
            emit(t3=stamps)
        else:
            for i in range(rounds):
                await asyncio.sleep(pause_before(i, args["schedule"]))
                t0 = time.time()
                await ep.publish(to_other, m1, qos)
                await ep.next_payload()
                await ep.publish(to_other, m3, qos)
                stamps.append(t0)
                await ep.next_payload()
            emit(t0=stamps)


# -- the load generator --------------------------------------------------------------------------


class _AcceptAnyone:
    """The load generator measures the daemon, not itself: it decodes the daemon's credentials
    (so the session is real) without a trust store of its own."""

    def authenticate(self, credentials: bytes, remote_static: bytes, now: float, **_: Any) -> Any:
        from protocol.identity import Credentials  # noqa: PLC0415

        creds = Credentials.decode(credentials)
        return type("Peer", (), {"peer_id": creds.certificate.peer_id})()

    def refuse_hello(self, peer_id: str) -> str | None:
        return None

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        return None

    def closed_invite(self, invite_id: bytes) -> str | None:
        return None


async def _loadgen(args: dict[str, Any]) -> None:
    from peerd.keystore import Keystore  # noqa: PLC0415
    from peerd.mqtt import BrokerSettings, Message, MqttLink, Topics  # noqa: PLC0415
    from protocol.session import (  # noqa: PLC0415
        HandshakeFailed,
        Output,
        SendFrame,
        SessionLimits,
        SessionManager,
        SessionUp,
    )

    target: str = args["target"]
    topics = Topics(args["network"])
    target_inbox = topics.inbox(target)
    host_port = args["url"].removeprefix("mqtt://")
    now = time.time()
    loop = asyncio.get_running_loop()
    stop = False
    completed: list[float] = []
    failures = 0

    class Peer:
        def __init__(self, keys_dir: str, password: str) -> None:
            keys = Keystore.load(keys_dir, now=now)
            self.id = keys.peer_id
            self.manager = SessionManager(
                peer_id=keys.peer_id,
                network=args["network"],
                static=keys.static,
                credentials=keys.credentials(),
                trust=_AcceptAnyone(),
                limits=SessionLimits(handshake_timeout=2.0),
            )
            url = f"mqtt://{keys.peer_id}:{password}@{host_port}"
            self.link = MqttLink(BrokerSettings.from_url(url, client_id=keys.peer_id))
            self.up: asyncio.Future[None] | None = None

        def handle(self, outs: list[Output]) -> None:
            for out in outs:
                if isinstance(out, SendFrame):
                    self.link.publish_nowait(target_inbox, out.frame, qos=0)
                elif self.up is None or self.up.done():
                    continue
                elif isinstance(out, SessionUp) and out.initiator:
                    self.up.set_result(None)
                elif isinstance(out, HandshakeFailed):
                    self.up.set_exception(RuntimeError(out.reason))

        def on_inbox(self, msg: Message) -> None:
            self.handle(self.manager.receive(msg.payload, time.time()))

        async def run_once(self) -> bool:
            self.up = loop.create_future()
            self.handle(self.manager.connect(target, time.time()))
            try:
                await asyncio.wait_for(self.up, 30)
            except (TimeoutError, RuntimeError):
                return False
            return True

        async def run(self, interval: float) -> None:
            """Sessions one after another; with `interval`, at most one per `interval` seconds
            (the peers together then offer a steady rate), else as fast as they complete."""
            nonlocal failures
            next_start = time.time() + random.random() * interval
            while not stop:
                if interval:
                    await asyncio.sleep(max(0.0, next_start - time.time()))
                    next_start += interval
                if await self.run_once():
                    completed.append(time.time())
                else:
                    failures += 1

    peers = [Peer(d, pw) for d, pw in args["peers"]]
    async with contextlib.AsyncExitStack() as stack:
        for p in peers:
            await stack.enter_async_context(p.link)
        for p in peers:
            await p.link.wait_connected(30)
            await p.link.subscribe(topics.inbox(p.id), qos=0, handler=p.on_inbox)

        async def timers() -> None:
            while True:
                await asyncio.sleep(0.05)
                t = time.time()
                for p in peers:
                    p.handle(p.manager.on_timer(t))

        timer_task = asyncio.create_task(timers())
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        emit(ready=True, peers=[p.id for p in peers])
        while command := (await reader.readline()).decode().strip():
            if command == "one":  # every peer opens one session
                stop = True
                results = await asyncio.gather(*(p.run_once() for p in peers))
                emit(completed=sum(results), failures=len(results) - sum(results))
            elif command.startswith("go"):
                # "go": every peer opens sessions as fast as they complete; "go RATE": the
                # peers together offer RATE per second. Until `duration` is over.
                rate = float(command[2:] or 0)
                interval = len(peers) / rate if rate else 0.0
                stop = False
                completed.clear()
                failures = 0
                cpu0 = cpu_time()
                started = time.time()
                tasks = [asyncio.create_task(p.run(interval)) for p in peers]
                await asyncio.sleep(args["duration"])
                stop = True
                await asyncio.wait(tasks, timeout=35)
                emit(
                    completed=completed,
                    failures=failures,
                    started=started,
                    ended=time.time(),
                    cpu=cpu_time() - cpu0,
                )
            else:  # "exit"
                break
        timer_task.cancel()


def main() -> None:
    role = sys.argv[1]
    args = json.loads(os.environ["BENCH_ARGS"])
    if role == "floor-ping":
        asyncio.run(_floor(args, initiator=True))
    elif role == "floor-pong":
        asyncio.run(_floor(args, initiator=False))
    elif role == "loadgen":
        asyncio.run(_loadgen(args))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
