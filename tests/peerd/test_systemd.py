"""sd_notify against real datagram sockets, and the shipped unit files against systemd's tools."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.systemd import Notifier, watchdog_interval, watchdog_loop
from tests.peerd.test_control_support import FAIL_AFTER, short_dir

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
# Where scripts/install puts the entry point; the shipped units run it from there.
INSTALLED_PEERD = "/opt/peerd/bin/peerd"


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """systemd's end: a datagram socket bound in a temp dir, with SCM_CREDENTIALS on."""
    with short_dir() as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(FAIL_AFTER)
        try:
            yield sock, path
        finally:
            sock.close()


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the pid of its sender, as the kernel reports it."""
    size = struct.calcsize("3i")
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(size))
    pid = -1
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", value[:size])[0]
    return data, pid


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_states_arrive_as_datagrams(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert receive(sock) == (b"READY=1", os.getpid())
    assert notifier.ready("3 sessions\nup")
    assert receive(sock)[0] == b"READY=1\nSTATUS=3 sessions up"  # one line, always
    assert notifier.watchdog()
    assert receive(sock)[0] == b"WATCHDOG=1"
    assert notifier.status("x" * 2000)
    assert receive(sock)[0] == b"STATUS=" + b"x" * 512
    assert notifier.reloading()
    reloading = receive(sock)[0].split(b"\n")
    assert reloading[0] == b"RELOADING=1"
    assert re.fullmatch(rb"MONOTONIC_USEC=[0-9]+", reloading[1])
    assert notifier.stopping("draining")
    assert receive(sock)[0] == b"STOPPING=1\nSTATUS=draining"
    with pytest.raises(ValueError, match="NUL"):
        notifier.notify("STATUS=a\0b")
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"peerd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(FAIL_AFTER)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_a_vanished_notify_socket_does_not_raise() -> None:
    with short_dir() as d:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": os.path.join(d, "gone")})
        assert notifier.ready() is False


def test_another_process_notifies(receiver: tuple[socket.socket, str]) -> None:
    # What systemd sees from `peerd run`: datagrams sent by the daemon's own pid.
    sock, path = receiver
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from peerd.systemd import Notifier\n"
            "n = Notifier.from_environ()\n"
            "n.ready('serving'); n.watchdog(); n.stopping()\n",
        ],
        cwd=REPO,
        env={**os.environ, "NOTIFY_SOCKET": path, "PYTHONPATH": str(REPO)},
    )
    assert child.wait(FAIL_AFTER) == 0
    messages = [receive(sock) for _ in range(3)]
    assert messages == [
        (b"READY=1\nSTATUS=serving", child.pid),
        (b"WATCHDOG=1", child.pid),
        (b"STOPPING=1", child.pid),
    ]


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "-5"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_loop_pings_while_healthy(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    sock.setblocking(False)
    notifier = Notifier(path)
    answers = iter([True, False, False, True, True])
    asked = 0

    def healthy() -> bool:
        nonlocal asked
        asked += 1
        return next(answers, True)

    task = asyncio.create_task(watchdog_loop(notifier, 0.002, healthy))
    loop = asyncio.get_running_loop()
    pings = 0
    try:
        async with asyncio.timeout(FAIL_AFTER):
            while pings < 3:
                data = await loop.sock_recv(sock, 4096)
                assert data == b"WATCHDOG=1"
                pings += 1
    finally:
        task.cancel()
    # The two unhealthy rounds sent nothing: the third ping came on the fifth question.
    assert asked >= 5


# --- unit files ----------------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_security_exposure_is_at_most_2() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/check_unit_security.py", "systemd/peerd.service"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    score = float(re.search(r"exposure ([0-9.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 2.0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_security_check_fails_an_unhardened_unit(tmp_path: Path) -> None:
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/usr/bin/peerd run\n")
    result = subprocess.run(
        [sys.executable, "scripts/check_unit_security.py", str(weak)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_unit_security_check_skips_without_systemd_analyze() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/check_unit_security.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": "/nonexistent"},
    )
    assert result.returncode == 0
    assert "skipped" in result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_verify_cleanly(tmp_path: Path) -> None:
    # systemd-analyze verify checks every directive name and value; it also insists that
    # ExecStart= exists, so the copies point at an executable that does.
    for name in ("peerd.service", "peerd-rotate.service", "peerd-rotate.timer"):
        text = (UNITS / name).read_text().replace(INSTALLED_PEERD, "/bin/true")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_service_declares_what_the_daemon_relies_on() -> None:
    service = unit("peerd.service")["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split() == [INSTALLED_PEERD, "run"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"]
    assert service["Restart"] == "on-failure"
    assert (service["StateDirectory"], service["StateDirectoryMode"]) == ("peerd", "0700")
    assert (service["RuntimeDirectory"], service["RuntimeDirectoryMode"]) == ("peerd", "0750")
    assert service["ConfigurationDirectory"] == "peerd"
    families = set(service["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # PrivateUsers= would make every caller's uid "nobody" to SO_PEERCRED.
    assert "PrivateUsers" not in service
    rotate = unit("peerd-rotate.service")["Service"]
    assert rotate["ExecStart"].split() == [INSTALLED_PEERD, "rotate"]
    assert rotate["User"] == service["User"]
    assert "OnCalendar" in unit("peerd-rotate.timer")["Timer"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
    reason="needs root and systemd-sysusers",
)
def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(UNITS / "peerd.sysusers")],
        check=True,
        capture_output=True,
    )
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    service = unit("peerd.service")["Service"]
    user = passwd[service["User"]]
    assert user[5] == "/var/lib/peerd"
    assert user[6].endswith("nologin")
    uid, gid = int(user[2]), int(user[3])
    group = {line.split(":")[0]: line for line in (root / "etc/group").read_text().splitlines()}
    assert service["Group"] in group

    # What `peerd init` leaves: a world-readable config in a world-readable directory.
    (root / "etc/peerd").mkdir(mode=0o755)
    (root / "etc/peerd/peerd.toml").write_text("[node]\n")
    (root / "etc/peerd/peerd.toml").chmod(0o644)
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "peerd.tmpfiles")],
        check=True,
        capture_output=True,
    )

    def owner_mode(path: str) -> tuple[int, int, str]:
        st = (root / path.lstrip("/")).stat()
        return st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)

    # The same owners and modes systemd gives the unit's directories.
    assert owner_mode("/var/lib/peerd") == (uid, gid, "0o" + service["StateDirectoryMode"][1:])
    assert owner_mode("/run/peerd") == (uid, gid, "0o" + service["RuntimeDirectoryMode"][1:])
    assert owner_mode("/etc/peerd") == (0, gid, "0o750")
    assert owner_mode("/etc/peerd/peerd.toml") == (0, gid, "0o640")
