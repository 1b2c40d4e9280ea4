"""What a new user meets first, through the real CLI against a real daemon (issue 16 item 0)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.config import load_config
from tests.support.broker import Broker
from tests.support.cluster import (
    PEERD,
    ROOT,
    UNREACHABLE,
    Node,
    make_nodes,
    pair,
    wait_until,
)


@pytest.fixture
def node(tmp_path: Path, broker: Broker) -> Iterator[Node]:
    (a,) = make_nodes(tmp_path, broker.url, ["alice"])
    a.start()
    try:
        yield a
    finally:
        a.kill()


def peerd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI with no --config added: the test says where the configuration comes from."""
    return subprocess.run(
        [*PEERD, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False
    )


def closed_pipe(node: Node, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command whose reader has already gone, as `... | head -1` ends up doing."""
    proc = subprocess.Popen(
        [*PEERD, "--config", str(node.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=node.env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr)


@pytest.mark.parametrize("args", [("status", "--json"), ("id",)])
def test_a_closed_pipe_ends_the_command_without_a_traceback(
    node: Node, args: tuple[str, ...]
) -> None:
    result = closed_pipe(node, *args)
    assert result.stderr == b""
    assert result.returncode == 141


def test_msg_listen_fails_when_the_timeout_comes_before_the_count(node: Node) -> None:
    result = node.run_cli("msg", "listen", "updates", "--count", "1", "--timeout", "1s")
    assert result.returncode == 6
    assert result.stdout == ""
    assert "timed out after 0 of 1 messages" in result.stderr


def test_config_is_taken_after_the_subcommand_and_from_peerd_config(node: Node) -> None:
    after = peerd("status", "--json", "--config", str(node.config), env=node.env())
    assert after.returncode == 0, after.stderr
    assert node.peer_id in after.stdout
    nested = peerd("msg", "outbox", "--config", str(node.config), env=node.env())
    assert nested.returncode == 0, nested.stderr
    from_env = peerd("status", "--json", env={**node.env(), "PEERD_CONFIG": str(node.config)})
    assert from_env.returncode == 0, from_env.stderr
    assert node.peer_id in from_env.stdout
    # Given both before and after the subcommand, the one nearer the command wins.
    both = peerd("--config", "/nonexistent", "status", "--config", str(node.config), env=node.env())
    assert both.returncode == 0, both.stderr


def test_init_takes_the_broker_credentials(tmp_path: Path) -> None:
    secret = tmp_path / "broker-password"
    secret.write_text("s3cret\n")
    node = Node(
        tmp_path,
        "carol",
        "mqtt://127.0.0.1:1",
        broker_user="carol",
        broker_password_file=str(secret),
    ).init()
    config = load_config(node.config)
    assert config.broker.username == "carol"
    assert config.broker.password_file == secret
    refused = peerd(
        "init",
        "--state-dir",
        str(tmp_path / "dave"),
        "--broker",
        "mqtt://d:pw@h:1883",
        env=node.env(),
    )
    assert refused.returncode != 0
    assert "--broker-user" in refused.stderr


def test_send_without_wait_prints_the_transfer_id_at_once(
    node: Node, tmp_path: Path, broker: Broker
) -> None:
    (bob,) = make_nodes(tmp_path, broker.url, ["bob"])
    bob.start()
    try:
        pair(node, bob)
    finally:
        bob.stop()  # trusted, and now offline
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(4096))
    # The old CLI drew progress and blocked until bob came online: the subprocess timeout fails it.
    result = node.run_cli("send", str(src), "--to", bob.peer_id, timeout=30)
    assert result.returncode == 0, result.stderr
    printed = re.fullmatch(r"transfer ([0-9a-f]{32}): \S+\n", result.stdout)
    assert printed is not None, result.stdout
    queued = {t["id"]: t["state"] for t in node.json("transfers")}
    assert queued[printed.group(1)] not in ("verified", "failed", "cancelled")


def test_sending_to_itself_or_to_a_revoked_peer_says_which(
    node: Node, tmp_path: Path, broker: Broker
) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(4096))
    for command in (["send", str(src), "--to"], ["msg", "send"]):
        to_self = node.run_cli(*command, node.peer_id, *([] if "--to" in command else ["ch", "hi"]))
        assert to_self.returncode == 5, to_self.stderr
        assert "this node's own id" in to_self.stderr
        assert "pair with it first" not in to_self.stderr
    (bob,) = make_nodes(tmp_path, broker.url, ["bob"])
    bob.start()
    try:
        pair(node, bob)
        node.wait_connected(bob)
        bob.cli("revoke", "--identity", "--yes", "--reason", "laptop stolen")
        wait_until(lambda: node.peers()[bob.peer_id]["state"] == "revoked", 15, what="revoked")
    finally:
        bob.kill()
    for command in (["send", str(src), "--to"], ["msg", "send"]):
        refused = node.run_cli(*command, bob.peer_id, *([] if "--to" in command else ["ch", "hi"]))
        assert refused.returncode == 5, refused.stderr
        assert re.search(r"was revoked on \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", refused.stderr)
        assert "pair with it first" not in refused.stderr


def test_broker_login_changes_the_credentials_of_an_existing_node(tmp_path: Path) -> None:
    """A node made without credentials cannot log in to a broker with accounts; `peerd
    broker-login` sets them (password from stdin, written 0600), and the daemon then connects.
    A wrong password is replaced the same way."""
    (carol,) = make_nodes(tmp_path, UNREACHABLE, ["carol"])
    password = "correct horse battery"
    with Broker(tmp_path / "shipped", shipped=True, users={carol.peer_id: password}) as broker:
        conf = carol.config.read_text().replace(UNREACHABLE, broker.url)
        carol.config.write_text(conf + "# kept: the administrator's own remark\n")
        wrong = carol.run_cli(
            "broker-login", "--user", carol.peer_id, "--password-stdin", input="not it\n"
        )
        assert wrong.returncode == 0, wrong.stderr
        carol.start(wait_broker=False)
        try:
            wait_until(
                lambda: "not authori" in (carol.status()["broker"].get("last_error") or ""),
                15,
                what="refused login",
            )
        finally:
            carol.stop()
        fixed = carol.run_cli("broker-login", input=password + "\n")  # the user is kept
        assert fixed.returncode == 0, fixed.stderr
        assert password not in fixed.stdout + fixed.stderr
        secret = carol.dir / "broker-password"
        assert secret.read_text() == password + "\n"
        assert secret.stat().st_mode & 0o777 == 0o600
        config = load_config(carol.config)
        assert (config.broker.username, config.broker.password_file) == (carol.peer_id, secret)
        assert password not in carol.config.read_text()
        assert "# kept: the administrator's own remark" in carol.config.read_text()
        carol.start()  # waits until the daemon is on the broker
        carol.kill()
    empty = carol.run_cli("broker-login", input="")
    assert empty.returncode == 2
    assert "no password" in empty.stderr


def test_ctrl_c_during_send_wait_says_the_transfer_goes_on_and_how_to_cancel_it(
    node: Node, tmp_path: Path, broker: Broker
) -> None:
    (bob,) = make_nodes(tmp_path, broker.url, ["bob"])
    bob.start()
    try:
        pair(node, bob)
    finally:
        bob.stop()  # offline: the send waits
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(4096))
    # A CI runner started in the background of a non-interactive shell ignores SIGINT, and a
    # child inherits an ignored signal (Python then installs no KeyboardInterrupt handler); a
    # handled one is reset to the default at exec: the disposition a user's Ctrl-C meets.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [*PEERD, "--config", str(node.config), "send", str(src), "--to", bob.peer_id, "--wait"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=node.env(),
            cwd=ROOT,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # printed before it waits
    started = re.match(r"transfer ([0-9a-f]{32}): model.bin", first)
    assert started is not None, first
    tid = started.group(1)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in rest
    assert f"transfer {tid} goes on in the daemon" in rest
    assert f"peerd cancel {tid}" in rest
    states = {t["id"]: t["state"] for t in node.json("transfers")}
    assert states[tid] == "active"
    assert node.cli("cancel", tid).strip() == f"transfer {tid}: cancelled"


def test_peers_are_shown_by_name_next_to_their_id(
    node: Node, tmp_path: Path, broker: Broker
) -> None:
    """The inviter names the joiner after the invite's note; the joiner names the inviter with
    `join --name`; `peerd name` renames. Names show in peers, status, send and transfers."""
    (bob,) = make_nodes(tmp_path, broker.url, ["bob"])
    bob.start()
    try:
        token = node.cli("invite", "--note", "bob at the lab").strip()
        joined = bob.cli("join", token, "--name", "alice-hq")
        assert "(alice-hq)" in joined
        node.wait_connected(bob)
        assert node.peers()[bob.peer_id]["name"] == "bob at the lab"
        assert bob.peers()[node.peer_id]["name"] == "alice-hq"
        table = node.cli("peers")
        assert "NAME" in table.splitlines()[0]
        assert "bob at the lab" in table
        assert node.cli("name", bob.peer_id, "bob-gpu").strip().endswith("is now 'bob-gpu'")
        assert node.peers()[bob.peer_id]["name"] == "bob-gpu"
        status = node.cli("status")
        assert re.search(r"^\s+[0-9a-z-]+ \(bob-gpu\)$", status, re.M), status
        src = tmp_path / "model.bin"
        src.write_bytes(os.urandom(4096))
        sent = node.run_cli("send", str(src), "--to", bob.peer_id, "--wait")
        assert sent.returncode == 0, sent.stderr
        assert "(bob-gpu)" in sent.stderr.splitlines()[0]  # "transfer ID: ..., to ID (bob-gpu)"
        assert any(line.startswith("bob-gpu ") for line in sent.stderr.splitlines())
        assert "bob-gpu" in node.cli("transfers")
        audit = node.json("audit", "show")
        assert any(e["kind"] == "peer-named" and e["detail"]["name"] == "bob-gpu" for e in audit)
    finally:
        bob.kill()


def test_joining_with_a_used_token_says_so_at_once(
    node: Node, tmp_path: Path, broker: Broker
) -> None:
    """The inviter answers a HELLO_PSK for an invite it closed with REFUSED: the second joiner
    hears "already used" instead of waiting out --timeout for "no answer" (the old behaviour
    fails this test on the message, whatever the machine's speed)."""
    bob, carol = make_nodes(tmp_path, broker.url, ["bob", "carol"])
    for n in (bob, carol):
        n.start()
    try:
        token = node.cli("invite").strip()
        bob.cli("join", token)
        again = carol.run_cli("join", token, "--timeout", "20s")
        assert again.returncode == 1, again.stderr
        assert "this invite was already used" in again.stderr
        assert "no answer" not in again.stderr
        assert node.status()["rejections"].get("invite-used") == 1
        assert carol.peer_id not in node.peers()
    finally:
        for n in (bob, carol):
            n.kill()


def test_an_expired_token_names_its_expiry_in_utc(
    node: Node, tmp_path: Path, broker: Broker
) -> None:
    (bob,) = make_nodes(tmp_path, broker.url, ["bob"])
    bob.start()
    try:
        token = node.cli("invite", "--ttl", "1s").strip()
        time.sleep(2.0)  # past its expiry (a wait for a state, not a speed threshold)
        late = bob.run_cli("join", token)
        assert late.returncode == 5, late.stderr
        assert re.search(r"expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(\d", late.stderr)
        assert "ask the inviter for a new token" in late.stderr
    finally:
        bob.kill()


def test_a_broken_configuration_is_named_rather_than_not_running(tmp_path: Path) -> None:
    config = tmp_path / "peerd.toml"
    config.write_text(f'[node]\nsocket = "{tmp_path}/s.sock"\n[nodes]\nx = 1\n')
    result = peerd("--config", str(config), "status", env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 3, result.stderr
    assert "unknown section [nodes]" in result.stderr
