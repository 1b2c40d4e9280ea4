"""A private NATS cluster for tests: N nats-server processes with JetStream and MQTT on each,
routed to each other, on free loopback ports in a directory of the test's own.

NATS serves MQTT on top of JetStream (sessions, retained messages), so a cluster of three keeps
its MQTT state with one node lost. Each node is killed by its own pid (`kill(i)`), nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.broker import free_port, wait_for_port

NATS_CANDIDATES = ("nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server")


def nats_binary() -> str | None:
    for candidate in NATS_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class NatsCluster:
    def __init__(self, directory: Path, size: int = 3) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.binary = binary
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.mqtt_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[object] = []

    def url(self, i: int) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_ports[i]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(self.size)]

    def _conf(self, i: int) -> Path:
        size = min(self.size, 3)
        routes = ", ".join(
            f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i
        )
        node = self.dir / f"n{i + 1}"
        node.mkdir(parents=True, exist_ok=True)
        conf = node / "nats.conf"
        conf.write_text(
            f"server_name: n{i + 1}\n"
            "listen: 127.0.0.1:-1\n"
            f"http: 127.0.0.1:{self.http_ports[i]}\n"
            f'jetstream {{ store_dir: "{node / "js"}" }}\n'
            f"cluster {{ name: peerdtest, listen: 127.0.0.1:{self.route_ports[i]},"
            f" routes: [{routes}] }}\n"
            # Three replicas of MQTT's streams and consumers, whatever the cluster looked like
            # when the first client came: left to itself NATS picks from the nodes it sees then
            # (2 here once), and an R2 stream without one of its two nodes has no quorum. (R1
            # consumers were worse: placed on the dead node, their creation timed out.)
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]},"
            f" stream_replicas: {size}, consumer_replicas: {size} }}\n"
        )
        return conf

    def start_node(self, i: int) -> None:
        log = (self.dir / f"n{i + 1}.log").open("ab")
        self._logs.append(log)
        self.procs[i] = subprocess.Popen(
            [self.binary, "-c", str(self._conf(i))],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> NatsCluster:
        for i in range(self.size):
            self.start_node(i)
        for i in range(self.size):
            wait_for_port(self.mqtt_ports[i], 30)
        self.wait_healthy(60)
        return self

    def healthy(self, i: int) -> bool:
        """JetStream of node i is up and in a cluster with a meta leader."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_ports[i]}/healthz", timeout=2
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.healthy(i) for i in range(self.size) if self.procs[i] is not None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the NATS cluster in {self.dir} did not become healthy")
            time.sleep(0.2)

    def kill(self, i: int) -> None:
        """SIGKILL node i, by its pid."""
        proc = self.procs[i]
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        self.procs[i] = None

    def close(self) -> None:
        for i in range(self.size):
            self.kill(i)
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
