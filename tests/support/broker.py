"""A private Mosquitto for tests, benchmarks and the quickstart.

Each instance runs its own `mosquitto -c <generated conf>` on a free loopback port in its own
directory, so nothing depends on (or disturbs) a system broker. It can be stopped, killed and
restarted on the same port to inject faults; persistence is on so retained messages survive a
restart, as they would on a production broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed; run ./scripts/setup")
    return found


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Broker:
    """One private Mosquitto process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        extra_conf: str = "",
        persistence: bool = True,
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="peerd-broker-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Without it a QoS 1 round trip costs 44-88 ms (Nagle against delayed ACK).
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.dir}/",
                "autosave_interval 1",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n" + self.extra_conf + "\n")

    def start(self) -> Broker:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.write_conf()
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.kill()
            raise RuntimeError(
                f"mosquitto did not start on port {self.port}; see {self.log_path}"
            ) from None
        return self

    def stop(self) -> None:
        """Graceful stop: SIGTERM, so Mosquitto saves retained messages."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Crash: SIGKILL, as a fault."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
