"""The experiments: each runs the same work through peerd and in plaintext MQTT, in one run,
through one broker, and returns rows for the CSVs.

`Bench` sets up the participants (everything is created before the broker starts, because the
shipped broker's password file is written then):
- daemons: `a` (the daemon under test, the sender) and receivers b, c, ... (real `peerd run`);
- plaintext workers (`plain.py`): p0 (the hub and the source) and p1, p2, ... (responders and
  sinks), one process each, like the daemons;
- the load generator (`loadgen.py`): many peers in one process, pinned to and trusted by `a`;
- for federated averaging, three plaintext MQTT users the parties use in-process.
Plaintext names are 20 characters long, like peer ids, so topics have the same length.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerd.client import Client
from peerd.keystore import Keystore
from peerd.mqtt import BrokerSettings, Message, MqttLink, Topics
from scripts.benchmarks.common import percentile
from scripts.evaluation import fl
from scripts.evaluation.lab import Lab, Usage, node_pid
from scripts.evaluation.loadgen import handshake_frame_sizes
from scripts.evaluation.model import write_model
from tests.support.cluster import Node

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class Plan:
    """How much of each experiment to run (`--quick` for CI)."""

    handshakes: int = 300  # sequential handshakes between two daemons, for the distribution
    handshake_interval: float = 0.04  # between handshakes; the peers alternate, so 12.5/s each
    scaling_peers: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200)
    scaling_daemons: tuple[int, ...] = (1, 2, 4, 8)
    scaling_reps: int = 5
    transfer_mb: int = 1000
    transfer_runs: int = 5
    fanout: tuple[int, ...] = (1, 2, 4, 8)
    fanout_mb: int = 256
    fanout_runs: int = 2
    fl_rounds: int = 30
    fl_target: float = 0.95
    versions_mb: int = 256  # the model of the checkpoint series (versions.py)
    seed: int = 20240601

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            handshakes=40,
            scaling_peers=(1, 5, 20),
            scaling_daemons=(1, 2),
            scaling_reps=2,
            transfer_mb=32,
            transfer_runs=1,
            fanout=(1, 2),
            fanout_mb=16,
            fanout_runs=1,
            fl_rounds=4,
            versions_mb=8,
        )

    @property
    def receivers(self) -> int:
        return max(*self.fanout, *self.scaling_daemons, 2)


def plain_name(tag: str) -> str:
    """A 20-character MQTT user name, as long as a peer id."""
    return (tag + "0" * 20)[:20]


class Worker:
    """A plaintext worker process (plain.py), driven by JSON lines."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, lab: Lab, name: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.evaluation.plain",
            lab.login_url(name),
            name,
            lab.network,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_worker_env(),
            limit=1 << 24,
        )
        worker = cls(name, proc)
        await worker.read(60)
        return worker

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def read(self, within: float = 300) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"plaintext worker {self.name} exited ({self.proc.returncode})")
        result: dict[str, Any] = json.loads(line)
        return result

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, BrokenPipeError, ConnectionResetError):
                self.send(op="quit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _worker_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@dataclass
class Bench:
    plan: Plan
    root: Path
    lab: Lab
    a: Node
    receivers: list[Node]
    loadgen_keys: list[Path]
    fl_users: list[str]
    clients: dict[str, Client] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    loadgen: asyncio.subprocess.Process | None = None
    frame_sizes: tuple[int, int, int, int] = (0, 0, 0, 0)
    loadgen_ids: list[str] = field(default_factory=list)

    # -- setting up ----------------------------------------------------------------------------

    @classmethod
    def create(cls, plan: Plan, root: Path, log: Any = print) -> Bench:
        """Everything that needs a broker user, then the broker and the daemons."""
        lab = Lab(root, network="eval", queue_limits=False)
        try:
            names = ["a", *(f"r{i}" for i in range(1, plan.receivers + 1))]
            log(f"  {len(names)} daemons: peerd init")
            nodes = lab.add_nodes(names)
            for i in range(plan.receivers + 1):
                lab.user(plain_name(f"plain{i}"))
            fl_users = [plain_name(f"flparty{i}") for i in range(fl.PARTIES)]
            for user in fl_users:
                lab.user(user)
            n = max(plan.scaling_peers)
            log(f"  {n} load-generator identities")
            now = time.time()
            keys = [root / "loadgen" / f"p{i}" for i in range(n)]
            # Each identity is three fsynced files: write them from a few threads at once.
            with ThreadPoolExecutor(8) as pool:
                made = pool.map(lambda d: Keystore.create(d, now=now, certificate_days=30), keys)
                for keystore in made:
                    lab.user(keystore.peer_id)
            lab.start_broker()
            lab.start_nodes(nodes)
        except BaseException:
            lab.close()
            raise
        return cls(plan, root, lab, nodes[0], nodes[1:], keys, fl_users)

    async def start(self, log: Any = print) -> None:
        for node in [self.a, *self.receivers]:
            self.clients[node.name] = await Client.connect(socket_path=node.socket, timeout=300)
        a = self.clients["a"]
        log(f"  pairing a with {len(self.receivers)} daemons by invite, and r1 with r2")
        pairs = [("a", r.name) for r in self.receivers] + [("r1", "r2")]
        for inviter, joiner in pairs:
            invite = await self.clients[inviter].call("v1.invite.create", ttl=600)
            await self.clients[joiner].request(
                "v1.join", {"token": invite["token"], "timeout": 60.0}, timeout=90
            )
        # A join returns when the joiner has the session; the inviter records the new peer a
        # moment later, from its own event queue.
        by_name = {n.name: n for n in [self.a, *self.receivers]}
        for inviter, joiner in pairs:
            for _ in range(600):
                peers = await self.clients[inviter].peers()
                if any(
                    p["peer"] == by_name[joiner].peer_id and p["state"] == "trusted" for p in peers
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"{inviter} did not record {joiner} after the join")
        log(f"  {self.plan.receivers + 1} plaintext workers, the load generator")
        self.workers = list(
            await asyncio.gather(
                *(
                    Worker.start(self.lab, plain_name(f"plain{i}"))
                    for i in range(self.plan.receivers + 1)
                )
            )
        )
        public = [Keystore.read_public(d) for d in self.loadgen_keys]
        ids = [p.peer_id for p in public]
        self.loadgen_ids = ids
        config = {
            "url": self.lab.url,
            "network": self.lab.network,
            "target": self.a.peer_id,
            "target_fingerprint": self.a.fingerprint,
            "peers": [
                {"dir": str(d), "password": self.lab.broker.users[i]}
                for d, i in zip(self.loadgen_keys, ids, strict=True)
            ],
        }
        config_path = self.root / "loadgen.json"
        config_path.write_text(json.dumps(config))
        self.loadgen = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.evaluation.loadgen",
            str(config_path),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_worker_env(),
        )
        assert self.loadgen.stdout is not None
        line = await asyncio.wait_for(self.loadgen.stdout.readline(), 300)
        if not line:
            raise RuntimeError("the load generator exited before it was ready")
        # `a` pins each generated peer by fingerprint (`peerd trust PEER --fingerprint FP`) and
        # connects at once; the first handshake makes it trusted. Wait for all of them, so that
        # no first contact (store writes, retries) falls into a measurement.
        log(f"  a trusts {len(ids)} load-generator peers by fingerprint")
        async with self.session_ups() as events:
            waiting = set(ids)
            for p in public:
                await a.call("v1.trust", peer=p.peer_id, fingerprint=p.fingerprint)
            while waiting:
                waiting.discard((await events.get(timeout=120)).data["peer"])
        now = time.time()
        ka, kb = (Keystore.load(d, now=now) for d in self.loadgen_keys[:2])
        self.frame_sizes = handshake_frame_sizes(ka, kb, self.lab.network)

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.stop()
        if self.loadgen is not None and self.loadgen.returncode is None:
            assert self.loadgen.stdin is not None
            self.loadgen.stdin.close()
            try:
                await asyncio.wait_for(self.loadgen.wait(), 20)
            except TimeoutError:
                self.loadgen.kill()
                await self.loadgen.wait()

    # -- helpers -------------------------------------------------------------------------------

    @property
    def hub(self) -> Worker:
        return self.workers[0]

    @property
    def sinks(self) -> list[Worker]:
        return self.workers[1:]

    def pids(self, **named: int) -> dict[str, int]:
        assert self.lab.broker.proc is not None
        return {**named, "broker": self.lab.broker.proc.pid}

    @contextlib.asynccontextmanager
    async def session_ups(self) -> AsyncIterator[Any]:
        async with self.clients["a"].subscribe(["session.up"]) as stream:
            yield stream

    # -- key exchange ------------------------------------------------------------------------

    async def handshake_distribution(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """`a` opens sessions with r1 and r2 alternately (each a complete handshake: these are
        rekeys of live sessions, the same three Noise messages and confirmation); the baseline
        runs the same four messages, same sizes, between plaintext workers p0 and p1/p2."""
        plan = self.plan
        a = self.clients["a"]
        r1, r2 = self.receivers[:2]
        rows: list[dict[str, Any]] = []
        pids = self.pids(a=node_pid(self.a), b=node_pid(r1), c=node_pid(r2))
        async with self.session_ups() as events:
            with self.lab.measure(pids) as meter:
                for i in range(plan.handshakes):
                    peer = (r1, r2)[i % 2]
                    started = time.perf_counter()
                    await a.call("v1.connect", peer=peer.peer_id)
                    while True:
                        ev = await events.get(timeout=30)
                        if ev.data["peer"] == peer.peer_id:
                            break
                    ms = (ev.data["completed_at"] - ev.data["started_at"]) * 1e3
                    rows.append({"mode": "peerd", "i": i, "ms": ms})
                    await asyncio.sleep(
                        max(0.0, plan.handshake_interval - (time.perf_counter() - started))
                    )
        usage_peerd = _usage(meter.usage)
        p1, p2 = self.sinks[:2]
        pids = self.pids(a=self.hub.pid, b=p1.pid, c=p2.pid)
        with self.lab.measure(pids) as meter:
            self.hub.send(
                op="ping",
                rounds=[[(p1, p2)[i % 2].name] for i in range(plan.handshakes)],
                sizes=self.frame_sizes,
                interval=plan.handshake_interval,
            )
            result = await self.hub.read()
        usage_plain = _usage(meter.usage)
        rows += [{"mode": "plaintext", "i": i, "ms": ms[0]} for i, ms in enumerate(result["ms"])]
        per = {"peerd": usage_peerd, "plaintext": usage_plain}
        summary = [
            {
                "mode": mode,
                "handshakes": plan.handshakes,
                "p50_ms": percentile([r["ms"] for r in rows if r["mode"] == mode], 50),
                "p90_ms": percentile([r["ms"] for r in rows if r["mode"] == mode], 90),
                "p99_ms": percentile([r["ms"] for r in rows if r["mode"] == mode], 99),
                "wire_bytes_per_handshake": u.wire("a", "b", "c") / plan.handshakes,
                "initiator_sent_bytes_per_handshake": u.sent["a"] / plan.handshakes,
                "frames_bytes": sum(self.frame_sizes),
            }
            for mode, u in per.items()
        ]
        return rows, summary

    async def handshake_scaling(self) -> list[dict[str, Any]]:
        """`a` opens sessions with N peers at once: load-generator peers (1..200) and real
        daemons (1..8). Baseline: p0 runs the four-message exchange with N plaintext
        responders at once (the load generator's connections / the plaintext workers)."""
        plan = self.plan
        a = self.clients["a"]
        rows: list[dict[str, Any]] = []
        series = [
            ("load generator", n, self.loadgen_ids[:n], self.loadgen_ids[:n])
            for n in plan.scaling_peers
        ] + [
            (
                "daemons",
                n,
                [r.peer_id for r in self.receivers[:n]],
                [w.name for w in self.sinks[:n]],
            )
            for n in plan.scaling_daemons
        ]
        for kind, n, peer_ids, plain_ids in series:
            for rep in range(plan.scaling_reps):
                await asyncio.sleep(0.3)
                ms, makespan = await self._connect_all(a, peer_ids)
                rows.append(_scaling_row("peerd", kind, n, rep, ms, makespan))
            self.hub.send(
                op="ping",
                rounds=[plain_ids] * plan.scaling_reps,
                sizes=self.frame_sizes,
                interval=0.3,
            )
            result = await self.hub.read()
            for rep, (ms, makespan) in enumerate(
                zip(result["ms"], result["makespan_ms"], strict=True)
            ):
                rows.append(_scaling_row("plaintext", kind, n, rep, ms, makespan))
        return rows

    async def _connect_all(self, a: Client, peers: list[str]) -> tuple[list[float], float]:
        waiting = set(peers)
        records = []
        async with self.session_ups() as events:
            await asyncio.gather(*(a.call("v1.connect", peer=p) for p in peers))
            while waiting:
                ev = await events.get(timeout=60)
                if ev.data["peer"] in waiting:
                    waiting.discard(ev.data["peer"])
                    records.append(ev.data)
        ms = [(r["completed_at"] - r["started_at"]) * 1e3 for r in records]
        makespan = max(r["completed_at"] for r in records) - min(r["started_at"] for r in records)
        return ms, makespan * 1e3

    # -- transfers -----------------------------------------------------------------------------

    async def peerd_transfer(self, path: Path, size: int, receivers: list[Node]) -> dict[str, Any]:
        pids = self.pids(
            sender=node_pid(self.a),
            **{f"receiver{i}": node_pid(r) for i, r in enumerate(receivers)},
        )
        # Write back what earlier runs left dirty, so no run pays for another's writeback.
        await asyncio.to_thread(os.sync)
        with self.lab.measure(pids) as meter:
            result = await self.clients["a"].send(path, [r.peer_id for r in receivers], wait=True)
        states = {p: r["state"] for p, r in result["receivers"].items()}
        if result["state"] != "verified" or set(states.values()) != {"verified"}:
            raise RuntimeError(f"a peerd transfer ended {result['state']}: {states}")
        for r in receivers:
            (r.dir / "inbox" / self.a.peer_id / path.name).unlink()
        return _transfer_row("peerd", size, len(receivers), meter.usage)

    async def plain_transfer(self, path: Path, size: int, sinks: list[Worker]) -> dict[str, Any]:
        # The shipped ACL lets only the sender publish on its chunk topics, x/<sender>/<id>.
        topic = Topics(self.lab.network).transfer(self.hub.name, os.urandom(16))
        outs = [self.root / f"plain-received-{w.name}" for w in sinks]
        for worker, out in zip(sinks, outs, strict=True):
            worker.send(op="sink", topic=topic, size=size, out=str(out))
            await worker.read(60)
        pids = self.pids(
            sender=self.hub.pid, **{f"receiver{i}": w.pid for i, w in enumerate(sinks)}
        )
        await asyncio.to_thread(os.sync)
        with self.lab.measure(pids) as meter:
            self.hub.send(op="source", topic=topic, path=str(path), inflight=16)
            done = await asyncio.gather(*(w.read() for w in sinks))
            await self.hub.read()
        for d, out in zip(done, outs, strict=True):
            if d["written"] != size or out.stat().st_size != size:
                raise RuntimeError(f"a plaintext sink got {d['written']} of {size} bytes")
            out.unlink()
        return _transfer_row("plaintext", size, len(sinks), meter.usage)

    async def transfers(self, log: Any = print) -> list[dict[str, Any]]:
        """One file, sender -> one receiver, `transfer_runs` times each way, after one
        unmeasured transfer each way (first-use costs: page cache, allocator, broker)."""
        plan = self.plan
        path, size = self.model_file(plan.transfer_mb)
        await self.peerd_transfer(path, size, self.receivers[:1])
        await self.plain_transfer(path, size, self.sinks[:1])
        rows = []
        for run in range(plan.transfer_runs):
            for row in (
                await self.peerd_transfer(path, size, self.receivers[:1]),
                await self.plain_transfer(path, size, self.sinks[:1]),
            ):
                rows.append({"run": run, **row})
                log(
                    f"    {row['mode']:<9} {row['seconds']:.2f} s, {row['mb_s']:.0f} MB/s,"
                    f" CPU {row['cpu_sender_s']:.2f} + {row['cpu_receivers_s']:.2f}"
                    f" + broker {row['cpu_broker_s']:.2f} s"
                )
        return rows

    async def fanout(self, log: Any = print) -> list[dict[str, Any]]:
        plan = self.plan
        path, size = self.model_file(plan.fanout_mb)
        rows = []
        for run in range(plan.fanout_runs):
            for k in plan.fanout:
                for row in (
                    await self.peerd_transfer(path, size, self.receivers[:k]),
                    await self.plain_transfer(path, size, self.sinks[:k]),
                ):
                    rows.append({"run": run, **row})
                    log(
                        f"    {k} receivers, {row['mode']:<9} {row['seconds']:.2f} s,"
                        f" sender sent {row['sender_sent_bytes'] / MB:.1f} MB"
                    )
        return rows

    def model_file(self, size_mb: int) -> tuple[Path, int]:
        path = self.root / f"model-{size_mb}MB.safetensors"
        if not path.exists():
            write_model(path, size_mb * 1_000_000, seed=size_mb)
        with path.open("rb") as f:  # into the page cache, for every run alike
            while f.read(8 << 20):
                pass
        return path, path.stat().st_size

    # -- federated averaging ---------------------------------------------------------------

    async def federated(self, log: Any = print) -> list[dict[str, Any]]:
        plan = self.plan
        parties = [self.a, *self.receivers[:2]]
        runs: list[tuple[str, int, fl.Transport]] = [
            ("peerd", 1, PeerdTransport([self.clients[n.name] for n in parties], parties)),
            ("peerd", 2, PeerdTransport([self.clients[n.name] for n in parties], parties)),
        ]
        rows: list[dict[str, Any]] = []
        async with PlainTransport.open(self.lab, self.fl_users) as plain:
            runs.append(("plaintext", 1, plain))
            for mode, run, transport in runs:
                results = await fl.run(transport, seed=plan.seed, rounds=plan.fl_rounds)
                reached = fl.rounds_to(results, plan.fl_target)
                log(
                    f"    {mode} run {run}: final accuracy {results[-1].accuracy:.4f},"
                    f" {reached} rounds to {plan.fl_target:.0%},"
                    f" median round {statistics.median(r.seconds for r in results) * 1e3:.0f} ms"
                )
                rows += [
                    {
                        "mode": mode,
                        "run": run,
                        "round": r.round,
                        "accuracy": r.accuracy,
                        "loss": r.loss,
                        "seconds": r.seconds,
                        "update_bytes": r.update_bytes,
                        "model_sha256": r.model_sha256,
                    }
                    for r in results
                ]
        check_identical(rows)
        return rows


def check_identical(rows: list[dict[str, Any]]) -> None:
    """Every run with the same seed has the same accuracy, loss and model at every round."""
    curves: dict[tuple[str, int], list[tuple[float, float, str]]] = {}
    for r in rows:
        curves.setdefault((r["mode"], r["run"]), []).append(
            (r["accuracy"], r["loss"], r["model_sha256"])
        )
    first, *others = curves.items()
    for key, curve in others:
        if curve != first[1]:
            raise RuntimeError(f"federated run {key} differs from {first[0]} with the same seed")


class PeerdTransport:
    """Updates as peerd messages: channel per round, exactly once, end to end encrypted."""

    def __init__(self, clients: list[Client], nodes: list[Node]) -> None:
        self.clients = clients
        self.ids = [n.peer_id for n in nodes]

    async def send(self, src: int, dst: int, channel: str, data: bytes) -> None:
        await self.clients[src].send_message(self.ids[dst], channel, data)

    async def receive(self, dst: int, channel: str, count: int) -> list[bytes]:
        client = self.clients[dst]
        got: list[bytes] = []
        while len(got) < count:
            batch = await client.request(
                "v1.msg.recv", {"channel": channel, "wait": 60.0, "limit": count - len(got)}
            )
            if batch:
                await client.request("v1.msg.ack", {"ids": [m["id"] for m in batch]})
            got += [base64.b64decode(m["data_b64"]) for m in batch]
        return got


class PlainTransport:
    """Updates as plaintext MQTT messages (QoS 1) to each party's inbox topic."""

    def __init__(self, links: list[MqttLink], users: list[str], topics: Topics) -> None:
        self.links = links
        self.users = users
        self.topics = topics
        self.boxes: dict[tuple[int, str], asyncio.Queue[bytes]] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, lab: Lab, users: list[str]) -> AsyncIterator[PlainTransport]:
        topics = Topics(lab.network)
        async with contextlib.AsyncExitStack() as stack:
            links = []
            for user in users:
                settings = BrokerSettings.from_url(lab.login_url(user), client_id=user)
                links.append(await stack.enter_async_context(MqttLink(settings)))
            transport = cls(links, users, topics)
            for i, (link, user) in enumerate(zip(links, users, strict=True)):
                await link.wait_connected(30)
                await link.subscribe(
                    topics.inbox(user), qos=1, handler=transport._handler(i), timeout=30
                )
            yield transport

    def _box(self, dst: int, channel: str) -> asyncio.Queue[bytes]:
        return self.boxes.setdefault((dst, channel), asyncio.Queue())

    def _handler(self, dst: int) -> Any:
        def on_message(msg: Message) -> None:
            n = msg.payload[0]
            channel = bytes(msg.payload[1 : 1 + n]).decode()
            self._box(dst, channel).put_nowait(bytes(msg.payload[1 + n :]))

        return on_message

    async def send(self, src: int, dst: int, channel: str, data: bytes) -> None:
        tag = channel.encode()
        await self.links[src].publish(
            self.topics.inbox(self.users[dst]), bytes([len(tag)]) + tag + data, qos=1
        )

    async def receive(self, dst: int, channel: str, count: int) -> list[bytes]:
        box = self._box(dst, channel)
        return [await asyncio.wait_for(box.get(), 60) for _ in range(count)]


# -- helpers ------------------------------------------------------------------------------------


def _usage(usage: Usage | None) -> Usage:
    assert usage is not None
    return usage


def _scaling_row(
    mode: str, kind: str, n: int, rep: int, ms: list[float], makespan: float
) -> dict[str, Any]:
    return {
        "mode": mode,
        "peers": kind,
        "n": n,
        "rep": rep,
        "p50_ms": statistics.median(ms),
        "max_ms": max(ms),
        "all_up_ms": makespan,
    }


def _transfer_row(mode: str, size: int, receivers: int, usage: Usage | None) -> dict[str, Any]:
    u = _usage(usage)
    names = [f"receiver{i}" for i in range(receivers)]
    return {
        "mode": mode,
        "receivers": receivers,
        "bytes": size,
        "seconds": u.seconds,
        "mb_s": size / u.seconds / MB,
        "cpu_sender_s": u.cpu["sender"],
        "cpu_receivers_s": sum(u.cpu[n] for n in names),
        "cpu_broker_s": u.cpu["broker"],
        "cpu_sender_system_s": u.cpu_system["sender"],
        "cpu_receivers_system_s": sum(u.cpu_system[n] for n in names),
        "cpu_broker_system_s": u.cpu_system["broker"],
        "sender_sent_bytes": u.sent["sender"],
        "sender_received_bytes": u.received["sender"],
        "receivers_sent_bytes": sum(u.sent[n] for n in names),
        "receivers_received_bytes": sum(u.received[n] for n in names),
    }
