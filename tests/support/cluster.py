"""Real peerd nodes for end-to-end tests, benchmarks and the quickstart.

Each `Node` is a state directory made by the real `peerd init --state-dir`, driven through the
real CLI, with its daemon a real `peerd run` process that can be stopped (SIGTERM), killed
(SIGKILL) and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peerd.client import Client, Timeout

ROOT = Path(__file__).resolve().parents[2]
PEERD = [sys.executable, "-m", "peerd"]


class CliError(AssertionError):
    def __init__(self, args: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"`peerd {' '.join(args)}` exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        self.result = result


def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# The MQTT client the nodes' daemons use ([broker] client): unset means the default.
MQTT_CLIENT_ENV = "PEERD_TEST_MQTT_CLIENT"


class Node:
    def __init__(
        self, root: Path, name: str, broker_url: str, network: str = "test", **init: str
    ) -> None:
        self.name = name
        self.dir = root / name
        self.config = self.dir / "peerd.toml"
        self.broker_url = broker_url
        self.network = network
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "daemon.log"
        self._log: Any = None
        self._init_args = init
        self.peer_id = ""
        self.fingerprint = ""

    # -- CLI ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PEERD_CONFIG", None)
        env["PYTHONPATH"] = str(ROOT)
        return env

    def run_cli(
        self, *args: str, input: bytes | str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        text_input = input.decode() if isinstance(input, bytes) else input
        return subprocess.run(
            [*PEERD, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            input=text_input,
            timeout=timeout,
            env=self.env(),
            cwd=ROOT,
            check=False,
        )

    def cli(self, *args: str, input: bytes | str | None = None, timeout: float = 60.0) -> str:
        result = self.run_cli(*args, input=input, timeout=timeout)
        if result.returncode != 0:
            raise CliError(list(args), result)
        return result.stdout

    def json(self, *args: str, timeout: float = 60.0) -> Any:
        return json.loads(self.cli(*args, "--json", timeout=timeout))

    def init(self) -> Node:
        args = [
            "init",
            "--state-dir",
            str(self.dir),
            "--name",
            self.name,
            "--network",
            self.network,
            "--broker",
            self.broker_url,
        ]
        for key, value in self._init_args.items():
            args += [f"--{key.replace('_', '-')}", value]
        result = subprocess.run(
            [*PEERD, *args, "--json"],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise CliError(args, result)
        info = json.loads(result.stdout)
        self.peer_id = info["peer_id"]
        self.fingerprint = info["fingerprint"]
        if client := os.environ.get(MQTT_CLIENT_ENV):
            # The daemon and e2e suites run against each MQTT client (CI runs both).
            conf = self.config.read_text()
            self.config.write_text(conf.replace('client = "builtin"', f'client = "{client}"', 1))
        return self

    # -- daemon ---------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "peerd.sock"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait_broker: bool = True, extra_env: dict[str, str] | None = None) -> Node:
        assert not self.running, f"{self.name} is already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while the daemon runs
        env = self.env()
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [*PEERD, "--config", str(self.config), "run", "--log-level", "debug"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        # The socket file may be a stale one from a killed run: wait for an answer on it.
        wait_until(
            lambda: not self.running or self.run_cli("status").returncode == 0,
            30,
            interval=0.05,
            what=f"{self.name}'s control socket",
        )
        if not self.running:
            raise AssertionError(f"{self.name} exited at start:\n{self.log()}")
        if wait_broker:
            wait_until(
                lambda: self.status()["broker"]["connected"], 30, what=f"{self.name} on broker"
            )
        return self

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.json("status")
        return result

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the exit code."""
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.log()}") from None
        self._close_log()
        return code

    def kill(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    # -- conveniences -----------------------------------------------------------------------

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p["peer"]: p for p in self.json("peers")}

    def connected_to(self, other: Node) -> bool:
        peer = self.peers().get(other.peer_id)
        return bool(peer and peer["connected"])

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventRecorder]:
        recorder = EventRecorder(self.socket, names)
        try:
            yield recorder
        finally:
            recorder.close()

    def wait_connected(self, other: Node, timeout: float = 15.0) -> None:
        wait_until(
            lambda: self.connected_to(other),
            timeout,
            what=f"{self.name} connected to {other.name}",
        )


class EventRecorder:
    """Events of one daemon, received by a subscriber thread and stamped with `time.time()`
    on arrival (so tests can compare with when they acted)."""

    def __init__(self, socket: Path, names: tuple[str, ...]) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(socket, names), daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise TimeoutError("could not subscribe to the daemon's events")
        if self._error is not None:
            raise self._error

    def _run(self, socket: Path, names: tuple[str, ...]) -> None:
        async def go() -> None:
            async with (
                await Client.connect(socket_path=socket) as client,
                client.subscribe(list(names)) as stream,
            ):
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        ev = await stream.get(timeout=0.1)
                    except Timeout:
                        continue
                    self.events.put({"event": ev.name, "data": ev.data, "at": time.time()})

        try:
            asyncio.run(go())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the expected event did not come")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(event):
                return event

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def pair(a: Node, b: Node) -> None:
    """Pair b with a by invite, through the real CLI."""
    token = a.cli("invite").strip()
    b.cli("join", token)


def make_nodes(root: Path, broker_url: str, names: list[str], **init: str) -> list[Node]:
    return [Node(root, name, broker_url, **init).init() for name in names]


# A broker URL to make nodes with before their broker exists (nothing listens on port 1).
UNREACHABLE = "mqtt://127.0.0.1:1"


def log_in(node: Node, broker_url: str, password: str, *, placeholder: str = UNREACHABLE) -> None:
    """Point `node` (made for the broker URL `placeholder`) at `broker_url`, logging in as its
    peer id with `password` (kept in a 0600 file next to its config)."""
    secret = node.dir / "broker-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    conf = node.config.read_text().replace(placeholder, broker_url)
    conf = conf.replace(
        "[broker]\n", f'[broker]\nusername = "{node.peer_id}"\npassword_file = "{secret}"\n', 1
    )
    node.config.write_text(conf)
