"""A private NATS cluster for tests: N nats-server processes with JetStream and MQTT on each,
routed to each other, on free loopback ports in a directory of the test's own.

NATS serves MQTT on top of JetStream (sessions, retained messages), so a cluster of three keeps
its MQTT state with one node lost. Each node is killed by its own pid (`kill(i)`), nothing else.

Each MQTT stream (`$MQTT_sess`, `$MQTT_msgs`, `$MQTT_rmsgs`) has one leader; killing the
retained stream's leader makes the others elect a new one, and a retained message published
meanwhile can be acknowledged and not stored (issue 12). `stream_leader()` reads a leader from
the monitoring endpoint and `separate_retained_leader()` moves the other streams' leaders away
from it (JetStream's step-down request), so a test can kill exactly that stream's leader.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.broker import free_port, wait_for_port

RETAINED_STREAM = "$MQTT_rmsgs"
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
        # Distinct: free_port() releases each port it finds, so two calls may return the same
        # one (seen: a node's client port was another's monitoring port, and that node died).
        ports: list[int] = []
        while len(ports) < 4 * size:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.mqtt_ports = ports[:size]
        self.route_ports = ports[size : 2 * size]
        self.http_ports = ports[2 * size : 3 * size]
        self.client_ports = ports[3 * size :]
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
            f"listen: 127.0.0.1:{self.client_ports[i]}\n"
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

    def stream_leader(self, stream: str = RETAINED_STREAM, timeout: float = 30.0) -> int:
        """The index of the node leading `stream`, as a running node's monitoring reports it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in range(self.size):
                if self.procs[n] is None:
                    continue
                url = f"http://127.0.0.1:{self.http_ports[n]}/jsz?accounts=true&streams=true"
                with contextlib.suppress(OSError, ValueError):
                    with urllib.request.urlopen(url, timeout=2) as answer:
                        data = json.load(answer)
                    for account in data.get("account_details", []):
                        for detail in account.get("stream_detail", []):
                            leader = (detail.get("cluster") or {}).get("leader")
                            if detail.get("name") == stream and leader:
                                return int(leader.removeprefix("n")) - 1
            time.sleep(0.2)
        raise TimeoutError(f"no leader of {stream} after {timeout}s")

    def leaders(self) -> dict[str, int]:
        """The node leading each MQTT stream that has a leader now."""
        out: dict[str, int] = {}
        for stream in ("$MQTT_sess", "$MQTT_msgs", RETAINED_STREAM):
            with contextlib.suppress(TimeoutError):
                out[stream] = self.stream_leader(stream, timeout=5)
        return out

    def step_down(self, stream: str) -> None:
        """Ask `stream`'s leader to step down (JetStream API over the NATS protocol): the
        others elect a new one. Returns once the request was answered."""
        node = next(n for n in range(self.size) if self.procs[n] is not None)
        with socket.create_connection(("127.0.0.1", self.client_ports[node]), 5) as sock:
            sock.settimeout(10)
            sock.recv(4096)  # INFO
            sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                b"SUB _INBOX.stepdown 1\r\n"
                + f"PUB $JS.API.STREAM.LEADER.STEPDOWN.{stream} _INBOX.stepdown 0\r\n\r\n".encode()
            )
            seen = b""
            while b"MSG _INBOX.stepdown" not in seen:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("nats-server closed the connection")
                seen += chunk

    def separate_retained_leader(self, timeout: float = 60.0) -> int:
        """Make the retained-message stream's leader lead no other MQTT stream (step those
        down until they move), so that killing it costs only that stream its leader; its
        index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = self.leaders()
            retained = leaders.get(RETAINED_STREAM)
            others = [s for s, n in leaders.items() if s != RETAINED_STREAM and n == retained]
            if retained is not None and len(leaders) == 3 and not others:
                return retained
            for stream in others:
                self.step_down(stream)
            time.sleep(1)
        raise TimeoutError(f"the MQTT streams' leaders did not separate: {self.leaders()}")

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
