"""Helpers the daemon benchmarks share: real nodes on a private Mosquitto configured as shipped,
and what /proc says about a process (memory; its CPU time: `scripts.evaluation.lab.cpu_seconds`).

The shipped broker config authenticates every client and its ACL confines a node to the inbox
named by its username, so each node connects with its peer id as username and a password of its
own (written to `[broker] password_file` in the node's config by the evaluation lab's
`add_broker_login`), exactly as an operator sets it up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from scripts.evaluation.lab import add_broker_login
from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes

NETWORK = "bench"


def scratch_dir(prefix: str) -> Path:
    """A temporary directory on the disk the transfers use (not a tmpfs), removed by the
    caller."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("PEERD_BENCH_DIR")))


@contextlib.contextmanager
def shipped_cluster(
    names: list[str],
    *,
    extra_users: Mapping[str, str] | None = None,
    extra_conf: str = "",
    start: bool = True,
) -> Iterator[tuple[Broker, list[Node]]]:
    """A private Mosquitto running the shipped config and one node per name (started unless
    `start` is false), each authenticated as its peer id. `extra_users` (name -> password) are
    broker accounts for other clients of the benchmark (plaintext baselines, load generators)."""
    root = scratch_dir("peerd-bench-")
    broker = Broker(root / "broker", shipped=True, extra_conf=extra_conf)
    nodes: list[Node] = []
    try:
        nodes = make_nodes(root, broker.url, names, network=NETWORK)
        for node in nodes:
            password = secrets.token_hex(12)
            broker.add_user(node.peer_id, password)
            add_broker_login(node, password)
        for user, password in (extra_users or {}).items():
            broker.add_user(user, password)
        broker.start()
        if start:
            for node in nodes:
                node.start()
        yield broker, nodes
    finally:
        for node in nodes:
            node.kill()
        broker.close()
        shutil.rmtree(root, ignore_errors=True)


# -- /proc ---------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, ...), in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def rss(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def hwm(pid: int) -> int:
    return proc_status(pid)["VmHWM"]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
