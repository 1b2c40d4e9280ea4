"""A private Mosquitto for tests, benchmarks and the quickstart.

Each instance runs its own `mosquitto -c <generated conf>` on a free loopback port in its own
directory, so nothing depends on (or disturbs) a system broker. It can be stopped, killed and
restarted on the same port to inject faults; persistence is on so retained messages survive a
restart, as they would on a production broker.

`Broker(shipped=True, users={...})` runs the configuration peerd ships
(systemd/mosquitto-peerd.conf: authentication, ACL, limits) with its paths rewritten into the
broker's directory, so tests and benchmarks exercise exactly what operators install.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

SHIPPED_CONF = Path(__file__).resolve().parents[2] / "systemd" / "mosquitto-peerd.conf"
SHIPPED_DROP_IN = SHIPPED_CONF.with_name("mosquitto-peerd-malloc.conf")
# Directives of the shipped file that name paths or addresses of an installed system; a private
# broker replaces them with its own.
_LOCAL_DIRECTIVES = {
    "listener",
    "certfile",
    "keyfile",
    "cafile",
    "password_file",
    "acl_file",
    "persistence_location",
    "log_dest",
    "autosave_interval",
}


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


def shipped_acl(conf_text: str | None = None) -> str:
    """The ACL embedded in the shipped config (its section "ACL", uncommented)."""
    text = conf_text if conf_text is not None else SHIPPED_CONF.read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# --- ACL"))
    acl = [line[4:] for line in lines[start + 1 :] if line.startswith("#   ")]
    return "\n".join(acl) + "\n"


def shipped_directives(conf_text: str | None = None) -> list[str]:
    """The shipped config's directives, without comments and without system-local ones."""
    text = conf_text if conf_text is not None else SHIPPED_CONF.read_text()
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line.split()[0] not in _LOCAL_DIRECTIVES:
            out.append(line)
    return out


def password_line(user: str, password: str, iterations: int = 101) -> str:
    """One line of a Mosquitto 2 password file (what `mosquitto_passwd -b` writes)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{user}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    path.write_text("".join(password_line(u, p) + "\n" for u, p in users.items()))
    path.chmod(0o600)


def shipped_environment() -> dict[str, str]:
    """The environment the shipped systemd drop-in gives Mosquitto (its `Environment=` lines),
    so a broker run "as shipped" runs as installed."""
    env: dict[str, str] = {}
    for line in SHIPPED_DROP_IN.read_text().splitlines():
        if line.startswith("Environment="):
            for item in line.removeprefix("Environment=").split():
                key, _, value = item.partition("=")
                env[key] = value
    return env


class Broker:
    """One private Mosquitto process. Use as a context manager or call start()/stop().

    shipped: run systemd/mosquitto-peerd.conf (authentication with `users`, its ACL, its limits)
    with the environment of systemd/mosquitto-peerd-malloc.conf, as installed, instead of the
    permissive test configuration; `extra_acl` is appended to its ACL (an
    operator's additions, e.g. a bridge's account).
    """

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        extra_conf: str = "",
        persistence: bool = True,
        *,
        shipped: bool = False,
        users: Mapping[str, str] | None = None,
        extra_acl: str = "",
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="peerd-broker-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.shipped = shipped
        self.users = dict(users or {})
        self.extra_acl = extra_acl
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.acl_path = self.dir / "peerd.acl"
        self.passwd_path = self.dir / "peerd.passwd"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def add_user(self, user: str, password: str) -> None:
        """Add (or change) a user of a shipped-config broker; applies at the next (re)start."""
        self.users[user] = password

    def _local_lines(self) -> list[str]:
        # Started as root, Mosquitto drops to user "mosquitto", which cannot open this directory
        # (0700, ours): the log, persistence and password files would silently not work.
        return ["user root"] if os.geteuid() == 0 else []

    def write_conf(self) -> None:
        if self.shipped:
            self._write_shipped_conf()
            return
        lines = [
            *self._local_lines(),
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

    def _write_shipped_conf(self) -> None:
        self.acl_path.write_text(shipped_acl() + self.extra_acl)
        write_password_file(self.passwd_path, self.users)
        lines = [
            *self._local_lines(),
            f"listener {self.port} 127.0.0.1",
            *shipped_directives(),
            f"password_file {self.passwd_path}",
            f"acl_file {self.acl_path}",
            f"log_dest file {self.log_path}",
            "autosave_interval 1",
        ]
        if self.persistence:
            lines.append(f"persistence_location {self.dir}/")
        else:
            lines = [line for line in lines if line != "persistence true"]
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
            env={**os.environ, **shipped_environment()} if self.shipped else None,
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
