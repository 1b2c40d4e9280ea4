"""Who may use the control socket, with real processes of other uids and groups.

The server runs as root here; the callers are child processes that drop to `nobody` (65534)
with chosen groups, then use the real `peerd.client.Client`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from peerd.control import ControlServer, PeerCredentials
from tests.peerd.test_control_support import FAIL_AFTER, Raw, running, short_dir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run callers as other users"
)

NOBODY = 65534
NOGROUP = 65534
CONTROL_GROUP = 4242  # the configured control group; need not exist in /etc/group

REPO = str(Path(__file__).resolve().parents[2])
# The interpreter nobody can run may not be the venv's: give it the venv's packages (PyNaCl...).
PYTHONPATH = os.pathsep.join(
    [REPO, *dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])]
)

# Connects as whoever this process is and reports the outcome as one JSON line.
CALLER = """
import asyncio, json, os, sys
from peerd.client import Client
from peerd.errors import PeerdError

async def main():
    try:
        async with await Client.connect(sys.argv[1], timeout=20) as client:
            print(json.dumps({"ok": client.server_info["caller"]}))
    except PeerdError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))

asyncio.run(main())
"""


@functools.cache
def python_for_nobody() -> str:
    """An interpreter (>= 3.11) that `nobody` may execute: the venv's may live under /root."""
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),
    ]
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                user=NOBODY,
                group=NOGROUP,
                extra_groups=[],
                check=False,
                capture_output=True,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python >= 3.11 that the user nobody may run")


async def run_caller(
    path: str, *, uid: int, gid: int, groups: list[int] | None = None
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        python_for_nobody(),
        "-c",
        CALLER,
        path,
        user=uid,
        group=gid,
        extra_groups=groups or [],
        cwd=REPO,
        env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(FAIL_AFTER):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_a_caller_of_another_uid_is_refused_by_peer_credentials() -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "control.sock")) as srv:
            # Open the file itself to everyone, so that only the SO_PEERCRED check stands
            # between `nobody` and the daemon.
            os.chmod(srv.path, 0o666)
            result = await run_caller(srv.path, uid=NOBODY, gid=NOGROUP)
            assert result["error"] == "AccessDenied"
            assert f"uid {NOBODY}" in result["message"]
            assert srv.stats()["refused"] == {"not-allowed": 1}
            assert srv.stats()["errors"] == {"-32001": 1}
            # Root, on the same server, is served.
            raw = await Raw.connect(srv.path)
            assert (await raw.call("v1.hello"))["result"]["caller"]["uid"] == 0
            await raw.close()


async def test_the_socket_mode_keeps_other_users_out_before_any_check() -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "control.sock")) as srv:
            result = await run_caller(srv.path, uid=NOBODY, gid=NOGROUP)
            assert result["error"] == "AccessDenied"
            assert "access denied to the peerd control socket" in result["message"]
            assert srv.stats()["connections_total"] == 0  # the kernel refused the connect


@pytest.mark.parametrize(
    ("gid", "groups"),
    [
        (CONTROL_GROUP, []),  # the group as primary group
        (NOGROUP, [1234, CONTROL_GROUP]),  # the group among the supplementary groups
    ],
)
async def test_members_of_the_configured_group_are_allowed(gid: int, groups: list[int]) -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "control.sock"), group=CONTROL_GROUP) as srv:
            assert os.lstat(srv.path).st_gid == CONTROL_GROUP
            result = await run_caller(srv.path, uid=NOBODY, gid=gid, groups=groups)
            assert result == {"ok": {"pid": result["ok"]["pid"], "uid": NOBODY, "gid": gid}}
            assert srv.stats()["refused"] == {}


async def test_non_members_are_refused_even_when_a_group_is_configured() -> None:
    with short_dir() as d:
        async with running(os.path.join(d, "control.sock"), group=CONTROL_GROUP) as srv:
            os.chmod(srv.path, 0o666)
            result = await run_caller(srv.path, uid=NOBODY, gid=NOGROUP, groups=[1234])
            assert result["error"] == "AccessDenied"
            assert srv.stats()["refused"] == {"not-allowed": 1}


def test_allowed_rule() -> None:
    srv = ControlServer("/tmp/unused.sock", group=CONTROL_GROUP)
    assert srv.allowed(PeerCredentials(1, 0, 0, ()))  # root
    assert srv.allowed(PeerCredentials(1, os.geteuid(), 99, ()))  # the daemon's own uid
    assert srv.allowed(PeerCredentials(1, 1000, CONTROL_GROUP, ()))
    assert srv.allowed(PeerCredentials(1, 1000, 1000, (5, CONTROL_GROUP)))
    assert not srv.allowed(PeerCredentials(1, 1000, 1000, (5, 6)))
    no_group = ControlServer("/tmp/unused.sock")
    assert not no_group.allowed(PeerCredentials(1, 1000, CONTROL_GROUP, (CONTROL_GROUP,)))


# A control server as an unprivileged daemon runs it: as its own user, here `nobody`.
SERVER = """
import asyncio, sys
from peerd.control import ControlServer

async def main():
    server = ControlServer(sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()

asyncio.run(main())
"""


async def test_an_unprivileged_daemon_serves_its_own_user_and_root_only() -> None:
    with short_dir() as d:
        run_dir = os.path.join(d, "run")
        os.mkdir(run_dir, 0o750)
        os.chown(run_dir, NOBODY, NOGROUP)
        path = os.path.join(run_dir, "peerd.sock")
        daemon = await asyncio.create_subprocess_exec(
            python_for_nobody(),
            "-c",
            SERVER,
            path,
            user=NOBODY,
            group=NOGROUP,
            extra_groups=[],
            cwd=REPO,
            env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin"},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert daemon.stdin is not None
        assert daemon.stdout is not None
        try:
            async with asyncio.timeout(FAIL_AFTER):
                assert await daemon.stdout.readline() == b"ready\n"
            st = os.lstat(path)
            assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (NOBODY, NOGROUP, "0o660")
            # The daemon's own user, and root.
            same_user = await run_caller(path, uid=NOBODY, gid=NOGROUP)
            assert same_user["ok"]["uid"] == NOBODY
            raw = await Raw.connect(path)
            assert (await raw.call("v1.hello"))["result"]["caller"]["uid"] == 0
            await raw.close()
            # Anyone else: refused by the peer-credential check even with the file opened up.
            os.chmod(run_dir, 0o755)
            os.chmod(path, 0o666)
            other = await run_caller(path, uid=NOBODY - 1, gid=NOGROUP - 1)
            assert other["error"] == "AccessDenied"
            assert f"uid {NOBODY - 1}" in other["message"]
        finally:
            daemon.stdin.close()
            async with asyncio.timeout(FAIL_AFTER):
                assert await daemon.wait() == 0
        assert os.listdir(run_dir) == ["peerd.sock.lock"]  # the socket is removed on shutdown
