"""The real `peerd` console script: init, id, audit verify, and --config / PEERD_CONFIG."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from peerd.config import load_config
from peerd.keystore import Keystore, WrongPassphrase
from peerd.store import Store
from protocol.identity import parse_fingerprint, parse_peer_id
from tests.protocol.test_identity_helpers import NOW, Node

PEERD = str(Path(sys.executable).with_name("peerd"))


def peerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "PEERD_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [PEERD, *args], capture_output=True, text=True, timeout=120, env=full_env, check=False
    )


def init(node: Path, *extra: str) -> dict[str, object]:
    result = peerd("init", "--state-dir", str(node), "--json", *extra)
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_puts_everything_under_the_state_dir(tmp_path: Path) -> None:
    node = tmp_path / "alpha"
    result = peerd(
        "init",
        "--state-dir",
        str(node),
        "--name",
        "alpha",
        "--network",
        "lab",
        "--broker",
        "mqtt://127.0.0.1:1999",
    )
    assert result.returncode == 0, result.stderr
    config = load_config(node / "peerd.toml")
    assert (config.node.name, config.node.network) == ("alpha", "lab")
    assert config.broker.port == 1999
    for path in (config.node.store, config.keys.dir, config.node.socket, config.node.inbox_dir):
        assert node in path.parents
    assert (node / "run").is_dir()
    assert (node / "inbox").is_dir()
    assert stat.S_IMODE((node / "keys" / "identity.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(config.node.store.stat().st_mode) == 0o600
    public = Keystore.read_public(config.keys.dir)
    assert public.peer_id in result.stdout
    assert public.fingerprint in result.stdout
    assert "# " in (node / "peerd.toml").read_text()  # a commented file


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    node = tmp_path / "n"
    init(node)
    before = {p: digest(p) for p in node.rglob("*") if p.is_file()}
    result = peerd("init", "--state-dir", str(node))
    assert result.returncode == 1
    assert "already initialised" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: digest(p) for p in node.rglob("*") if p.is_file()} == before


def test_init_with_options_over_an_existing_config_is_a_usage_error(tmp_path: Path) -> None:
    node = tmp_path / "n"
    init(node)
    result = peerd("init", "--state-dir", str(node), "--name", "other")
    assert result.returncode == 2
    assert "exists" in result.stderr


def test_init_completes_an_interrupted_init(tmp_path: Path) -> None:
    node = tmp_path / "n"
    first = init(node)
    (node / "peerd.db").unlink()  # the crash came after the keys, before the store
    second = init(node)
    assert second["peer_id"] == first["peer_id"]
    assert second["resumed"] is True
    assert first["resumed"] is False
    assert peerd("--config", str(node / "peerd.toml"), "audit", "verify").returncode == 0


def test_init_rejects_a_bad_network_naming_the_key(tmp_path: Path) -> None:
    result = peerd("init", "--state-dir", str(tmp_path / "n"), "--network", "Bad Net")
    assert result.returncode == 3
    assert "[node] network" in result.stderr
    assert not (tmp_path / "n" / "keys").exists()


def test_id_with_config_and_env(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ida, idb = init(a), init(b)
    assert ida["peer_id"] != idb["peer_id"]  # two nodes on one machine
    by_flag = json.loads(peerd("--config", str(a / "peerd.toml"), "id", "--json").stdout)
    by_env = json.loads(peerd("id", "--json", env={"PEERD_CONFIG": str(b / "peerd.toml")}).stdout)
    assert by_flag["peer_id"] == ida["peer_id"]
    assert by_env["peer_id"] == idb["peer_id"]
    assert parse_peer_id(by_flag["peer_id_display"]) == by_flag["peer_id"]
    assert parse_fingerprint(by_flag["fingerprint"]) == ida["fingerprint"]
    assert by_flag["certificate"]["serial"] == 1
    # --config wins over PEERD_CONFIG
    both = peerd(
        "--config",
        str(a / "peerd.toml"),
        "id",
        "--json",
        env={"PEERD_CONFIG": str(b / "peerd.toml")},
    )
    assert json.loads(both.stdout)["peer_id"] == ida["peer_id"]
    text = peerd("--config", str(a / "peerd.toml"), "id").stdout
    assert f"peer id      {ida['peer_id']}" in text


def test_id_without_a_config(tmp_path: Path) -> None:
    result = peerd("id", env={"PEERD_CONFIG": str(tmp_path / "absent.toml")})
    assert result.returncode == 3
    assert "no configuration file" in result.stderr
    assert "peerd init" in result.stderr


def test_passphrase_sealed_keys(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("a long passphrase\n")
    secret.chmod(0o600)
    node = tmp_path / "n"
    init(node, "--passphrase-file", str(secret))
    config = load_config(node / "peerd.toml")
    assert config.keys.passphrase_file == secret
    assert json.loads(peerd("--config", str(node / "peerd.toml"), "id", "--json").stdout)["sealed"]
    with pytest.raises(WrongPassphrase):
        Keystore.load(config.keys.dir, now=NOW)
    Keystore.load(config.keys.dir, now=NOW, passphrase=b"a long passphrase")


async def _add_history(config_path: Path) -> None:
    config = load_config(config_path)
    store = await Store.open(config.node.store, network=config.node.network, overlap=3600)
    try:
        for _ in range(4):
            node = Node()
            auth = store.view().authenticate(
                node.credentials(), node.static.public, NOW, allow_unknown=True
            )
            await store.record_authenticated(auth, now=NOW)
    finally:
        await store.close()


def test_audit_verify_and_a_tampered_log(tmp_path: Path) -> None:
    node = tmp_path / "n"
    init(node)
    cfg = str(node / "peerd.toml")
    asyncio.run(_add_history(node / "peerd.toml"))
    ok = peerd("--config", cfg, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "audit log OK: 9 entries" in ok.stdout
    shown = json.loads(peerd("--config", cfg, "audit", "show", "--json").stdout)
    assert [e["seq"] for e in shown] == list(range(1, 10))
    with sqlite3.connect(node / "peerd.db") as db:
        db.execute("DROP TRIGGER events_no_update")
        db.execute('UPDATE events SET detail = \'{"source":"fingerprint"}\' WHERE seq = 5')
    broken = peerd("--config", cfg, "audit", "verify")
    assert broken.returncode == 1
    assert "broken at entry 5" in broken.stderr
    assert "Traceback" not in broken.stderr
    as_json = peerd("--config", cfg, "audit", "verify", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["broken_at"] == 5


def test_audit_verify_refuses_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    node = tmp_path / "n"
    init(node)
    store = node / "peerd.db"
    store.unlink()
    store.write_bytes(b"my notes, not a database\n")
    result = peerd("--config", str(node / "peerd.toml"), "audit", "verify")
    assert result.returncode == 1
    assert "not a peerd store" in result.stderr
    assert store.read_bytes() == b"my notes, not a database\n"
    store.unlink()
    result = peerd("--config", str(node / "peerd.toml"), "audit", "verify")
    assert result.returncode == 1
    assert "no store" in result.stderr
    assert not store.exists()
