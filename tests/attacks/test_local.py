"""A local unprivileged user (`nobody`) against a running daemon's control socket: the socket
file's mode keeps it out, and when an administrator has loosened that mode by mistake the
daemon still refuses it by its kernel-checked credentials (SO_PEERCRED), counting
`control-not-allowed`. Also: garbage request lines are counted, and an absurd invite token is
refused before it is parsed."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.errors import UsageError
from tests.attacks.helpers import Api
from tests.support.broker import Broker
from tests.support.cluster import Node, make_nodes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")


@pytest.fixture
def node(tmp_path: Path, module_broker: Broker) -> Iterator[Node]:
    """A daemon whose socket directory other users may traverse (as /run/peerd would be with
    a group configured), so that only the socket's own mode and the credential check decide."""
    (n,) = make_nodes(tmp_path, module_broker.url, ["solo"])
    runtime = Path(tempfile.mkdtemp(prefix="peerd-local-", dir="/tmp"))
    runtime.chmod(0o711)
    config = n.config.read_text()
    config = config.replace(f'runtime_dir = "{n.dir}/run"', f'runtime_dir = "{runtime}"')
    config = config.replace(
        f'socket = "{n.dir}/run/peerd.sock"', f'socket = "{runtime}/peerd.sock"'
    )
    n.config.write_text(config)
    shutil.rmtree(n.dir / "run")
    (n.dir / "run").symlink_to(runtime)  # where the test helpers look for the socket
    n.start()
    try:
        yield n
    finally:
        n.kill()
        shutil.rmtree(runtime, ignore_errors=True)


def _as_nobody(socket_path: Path) -> dict[str, object]:
    """Connect and ask for the status as user nobody (a forked child that drops to nobody's
    uid, gid and no supplementary groups: the kernel records those for SO_PEERCRED)."""
    import socket  # noqa: PLC0415

    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            out: dict[str, object]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                try:
                    s.connect(str(socket_path))
                except PermissionError:
                    out = {"connect": "EACCES"}
                else:
                    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"v1.status"}\n')
                    data = b""
                    while b"\n" not in data and (chunk := s.recv(65536)):
                        data += chunk
                    reply = json.loads(data.split(b"\n")[0]) if data else None
                    out = {"connect": "ok", "reply": reply}
            os.write(write_end, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, object] = json.loads(raw)
    return result


def test_nobody_cannot_use_the_control_socket(node: Node) -> None:
    api = Api(node)
    try:
        sock = (node.dir / "run" / "peerd.sock").resolve()  # nobody cannot pass tmp_path
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
        assert _as_nobody(sock) == {"connect": "EACCES"}

        sock.chmod(0o666)  # an administrator's mistake: the credential check still holds
        answer = _as_nobody(sock)
        assert answer["connect"] == "ok"
        reply = answer["reply"]
        assert isinstance(reply, dict)
        assert "result" not in reply
        assert reply["error"]["data"]["type"] == "AccessDenied"
        assert (
            "uid 65534" in reply["error"]["message"] or "access denied" in reply["error"]["message"]
        )
        assert api.rejected("control-not-allowed") == 1
        status = node.cli("status")
        assert "control-not-allowed 1" in status
    finally:
        api.close()


def test_garbage_lines_and_absurd_tokens_are_refused_and_counted(node: Node) -> None:
    import socket  # noqa: PLC0415

    api = Api(node)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(node.dir / "run" / "peerd.sock"))
            s.sendall(b"not json\n" * 16)  # MAX_GARBAGE lines in a row: the server hangs up
            s.settimeout(30)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.count(b'"code":-32700') == 16
        rejections = api.rejections()
        assert rejections["control-parse-error"] == 16
        assert rejections["control-closed-for-garbage"] == 1
        # A near-megabyte "token" (the longest request line): refused before the base32
        # decoder, whose cost grows with the square of the length, would stall the daemon.
        with pytest.raises(UsageError, match="invite token"):
            api.call("v1.join", token="peerd-invite-1-" + "a" * 1_000_000)
        assert api.status()["peer_id"] == node.peer_id
    finally:
        api.close()
