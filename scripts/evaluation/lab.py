"""A private Mosquitto configured as shipped, peerd nodes that log in to it, and meters.

The broker runs systemd/mosquitto-peerd.conf (authentication, the ACL, limits) through
`tests.support.broker.Broker(shipped=True)`: every MQTT client logs in with its peer id as
username, so the ACL confines it to its own inbox, exactly as operators install it. Users must
be known before the broker starts (its password file is written then), so a `Lab` first creates
every participant - `peerd init` for nodes, a user name for plaintext workers - then starts.

Meters read what the kernel counts, so nothing is instrumented:
- CPU seconds of a process (all its threads): utime + stime of /proc/<pid>/stat;
- bytes on the wire per process: the TCP counters (bytes_sent, bytes_received) of its
  connections to the broker, from `ss -tinp`. They count every MQTT byte - fixed headers,
  topics, payloads, acknowledgements, pings - but not TCP/IP headers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scripts.bench_mqtt import NO_QUEUE_LIMITS
from tests.support.broker import Broker
from tests.support.cluster import Node

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (all its threads)."""
    user, system = cpu_times(pid)
    return user + system


_SS_PID = re.compile(r"pid=(\d+)")
_SS_SENT = re.compile(r"bytes_sent:(\d+)")
_SS_RECV = re.compile(r"bytes_received:(\d+)")


def wire_bytes(port: int) -> dict[int, tuple[int, int]]:
    """(bytes sent, bytes received) per client process over its connections to `port`."""
    try:
        out = subprocess.run(
            ["ss", "-tinpH", "state", "established", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except FileNotFoundError:
        raise RuntimeError("counting bytes on the wire needs `ss` (apt install iproute2)") from None
    totals: dict[int, tuple[int, int]] = {}
    # ss prints each socket on two lines: addresses and process, then the TCP info.
    lines = out.splitlines()
    for head, info in zip(lines[::2], lines[1::2], strict=False):
        pid = _SS_PID.search(head)
        if pid is None:
            continue
        sent = _SS_SENT.search(info)
        recv = _SS_RECV.search(info)
        s0, r0 = totals.get(int(pid.group(1)), (0, 0))
        totals[int(pid.group(1))] = (
            s0 + (int(sent.group(1)) if sent else 0),
            r0 + (int(recv.group(1)) if recv else 0),
        )
    return totals


@dataclass
class Usage:
    """What a set of processes used between two readings."""

    seconds: float
    cpu: dict[str, float]  # user + system
    cpu_system: dict[str, float]  # the system part: the kernel's work (I/O, fsync, sockets)
    sent: dict[str, int]
    received: dict[str, int]

    def wire(self, *names: str) -> int:
        """Bytes these processes sent and received (all of them if none are named)."""
        keys = names or tuple(self.sent)
        return sum(self.sent.get(k, 0) + self.received.get(k, 0) for k in keys)


@dataclass
class Meter:
    """CPU and wire bytes of named processes over an interval: `with lab.measure(...) as m:`."""

    port: int
    pids: dict[str, int]
    usage: Usage | None = None
    _t0: float = 0.0
    _cpu0: dict[str, tuple[float, float]] = field(default_factory=dict)
    _wire0: dict[int, tuple[int, int]] = field(default_factory=dict)

    def start(self) -> None:
        self._wire0 = wire_bytes(self.port)
        self._cpu0 = {n: cpu_times(p) for n, p in self.pids.items()}
        self._t0 = time.perf_counter()

    def stop(self) -> Usage:
        seconds = time.perf_counter() - self._t0
        now = {n: cpu_times(p) for n, p in self.pids.items()}
        cpu = {n: sum(now[n]) - sum(self._cpu0[n]) for n in self.pids}
        cpu_system = {n: now[n][1] - self._cpu0[n][1] for n in self.pids}
        wire = wire_bytes(self.port)
        sent, received = {}, {}
        for name, pid in self.pids.items():
            s1, r1 = wire.get(pid, (0, 0))
            s0, r0 = self._wire0.get(pid, (0, 0))
            sent[name], received[name] = s1 - s0, r1 - r0
        self.usage = Usage(seconds, cpu, cpu_system, sent, received)
        return self.usage


def node_pid(node: Node) -> int:
    assert node.proc is not None, f"{node.name} is not running"
    return node.proc.pid


def add_broker_login(node: Node, password: str) -> None:
    """Make a node log in to the broker with its peer id and this password (the shipped
    broker's ACL is written for that): [broker] username and password_file in its config."""
    secret = node.dir / "broker-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    text = node.config.read_text()
    login = f'[broker]\nusername = "{node.peer_id}"\npassword_file = "{secret}"\n'
    if text.count("[broker]\n") != 1:
        raise RuntimeError(f"unexpected layout of {node.config}: no single [broker] table")
    node.config.write_text(text.replace("[broker]\n", login, 1))


class Lab:
    """One broker and everything that talks to it, under one directory, cleaned up on exit.

    `queue_limits=False` lifts the shipped per-client queue limits for the plaintext baselines
    (NO_QUEUE_LIMITS, from scripts.bench_mqtt); everything else is the shipped configuration.
    peerd keeps the broker's queue within one credit window, far below the limits, so lifting
    them changes nothing for peerd and lets the baselines complete on the same broker."""

    def __init__(self, root: Path, *, network: str = "eval", queue_limits: bool = True) -> None:
        self.root = root
        self.network = network
        self.broker = Broker(
            root / "broker",
            shipped=True,
            persistence=False,
            extra_conf="" if queue_limits else NO_QUEUE_LIMITS,
        )
        self.nodes: dict[str, Node] = {}

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def port(self) -> int:
        return self.broker.port

    def user(self, name: str) -> str:
        """Register a broker user (a peer id or a worker's name); its password."""
        password = secrets.token_urlsafe(12)
        self.broker.add_user(name, password)
        return password

    def login_url(self, name: str) -> str:
        """The broker URL with this user's credentials (`user` first)."""
        return f"mqtt://{name}:{self.broker.users[name]}@127.0.0.1:{self.port}"

    def add_nodes(self, names: Iterable[str]) -> list[Node]:
        """`peerd init` each node (in parallel: each is a process) and give it a broker login."""
        made = [Node(self.root, name, self.url, network=self.network) for name in names]
        procs = [
            subprocess.Popen(
                [
                    *_peerd(),
                    "init",
                    "--state-dir",
                    str(n.dir),
                    "--name",
                    n.name,
                    "--network",
                    self.network,
                    "--broker",
                    self.url,
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=n.env(),
                text=True,
            )
            for n in made
        ]

        for node, proc in zip(made, procs, strict=True):
            out, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"peerd init of {node.name} failed: {err.strip()}")
            info = json.loads(out)
            node.peer_id, node.fingerprint = info["peer_id"], info["fingerprint"]
            add_broker_login(node, self.user(node.peer_id))
            self.nodes[node.name] = node
        return made

    def start_broker(self) -> None:
        self.broker.start()

    def start_nodes(self, nodes: Iterable[Node]) -> None:
        """Start daemons, all at once, then wait for each to be on the broker."""
        nodes = list(nodes)
        for node in nodes:
            node.start(wait_broker=False)
        for node in nodes:
            deadline = time.monotonic() + 30
            while not node.status()["broker"]["connected"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} did not connect to the broker:\n{node.log()}")
                time.sleep(0.05)

    @contextlib.contextmanager
    def measure(self, pids: dict[str, int]) -> Iterator[Meter]:
        meter = Meter(self.port, pids)
        meter.start()
        yield meter
        meter.stop()

    def close(self) -> None:
        """Stop every daemon this lab started, then the broker; never raises."""
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                if node.running:
                    node.stop(timeout=10)
            with contextlib.suppress(Exception):
                node.kill()
        with contextlib.suppress(Exception):
            self.broker.stop()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peerd() -> list[str]:
    from tests.support.cluster import PEERD  # noqa: PLC0415

    return list(PEERD)
