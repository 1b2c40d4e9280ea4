"""`peerd backup` / `peerd restore`: a node's keys and trust store, sealed with a passphrase.

The node backed up is the 0.1.0 fixture (peers in three states, revocations, queued messages,
transfers, a 14-entry audit log), so a restore is checked against everything a store holds.
Library-level tests use libsodium's minimum Argon2id cost; the CLI tests pay the real one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import struct
from pathlib import Path
from typing import Any

import msgpack
import nacl.pwhash
import pytest

from peerd.backup import (
    MAGIC,
    BackupError,
    NodeExists,
    WrongBackupPassphrase,
    _daemon_excluded,
    backup_to,
    read_backup_file,
    restore,
    seal,
    snapshot,
    unseal,
)
from peerd.config import Config, load_config
from peerd.store import open_store
from tests.peerd.test_store_upgrade import expected, old_node
from tests.support.cluster import UNREACHABLE, Node

FAST = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)
PASSPHRASE = b"correct horse battery staple"


def empty_node(root: Path, name: str = "restored", network: str = "test") -> Node:
    """A configuration with no identity yet: where a backup is restored on a new machine."""
    node = Node(root, name, UNREACHABLE)
    node.dir.mkdir(mode=0o700)
    (node.dir / "run").mkdir(mode=0o700)
    node.config.write_text(
        f'[node]\nname = "{name}"\nnetwork = "{network}"\nstate_dir = "{node.dir}"\n'
        f'runtime_dir = "{node.dir / "run"}"\n\n[broker]\nurl = "{UNREACHABLE}"\n'
    )
    return node


def contents(config: Config) -> dict[str, Any]:
    """What a restore must bring back: key files byte for byte and the store's records."""

    async def read() -> dict[str, Any]:
        store = await open_store(config)
        try:
            report = await store.verify_log()
            return {
                "peers": sorted((p.peer_id, p.state.value) for p in store.peers()),
                "log": (report.entries, report.head),
                "outbox": await store.fetchall("SELECT * FROM outbox"),
                "inbox": await store.fetchall("SELECT * FROM inbox"),
                "transfers": await store.fetchall("SELECT * FROM transfers ORDER BY role"),
                "revocations": await store.fetchall("SELECT * FROM revocations"),
            }
        finally:
            await store.close()

    keys = {p.name: p.read_bytes() for p in sorted(config.keys.dir.iterdir())}
    return {"keys": keys, **asyncio.run(read())}


def passphrase_file(tmp_path: Path, text: bytes = PASSPHRASE) -> Path:
    path = tmp_path / "passphrase"
    path.write_bytes(text + b"\n")
    path.chmod(0o600)
    return path


def test_a_backup_restores_every_key_and_record(tmp_path: Path) -> None:
    old = load_config(old_node(tmp_path).config)
    path, made = backup_to(old, tmp_path / "node.peerd-backup", PASSPHRASE, limits=FAST)
    assert path.stat().st_mode & 0o777 == 0o600
    assert made.peer_id == expected()["peer_id"]
    data = path.read_bytes()
    assert made.peer_id.encode() not in data  # nothing readable without the passphrase
    assert b"waits for delta" not in data
    new = load_config(empty_node(tmp_path).config)
    restored = restore(new, unseal(data, PASSPHRASE))
    assert restored.moved_aside == ()
    assert contents(new) == contents(old)
    assert (new.keys.dir / "identity.key").stat().st_mode & 0o777 == 0o600
    assert new.keys.dir.stat().st_mode & 0o777 == 0o700


def test_a_wrong_passphrase_or_any_altered_byte_is_refused(tmp_path: Path) -> None:
    old = load_config(old_node(tmp_path).config)
    data = seal(snapshot(old), PASSPHRASE, limits=FAST)
    with pytest.raises(WrongBackupPassphrase):
        unseal(data, b"correct horse battery stable")
    # One byte in the salt, the nonce, the body and the tag: each fails the tag, never
    # yields a different node.
    hlen = struct.unpack(">H", data[len(MAGIC) : len(MAGIC) + 2])[0]
    body = len(MAGIC) + 2 + hlen
    for offset in (body - 40, body - 3, body + 10, len(data) // 2, len(data) - 1):
        altered = bytearray(data)
        altered[offset] ^= 0x01
        with pytest.raises(BackupError):
            unseal(bytes(altered), PASSPHRASE)
    with pytest.raises(BackupError, match="not a peerd backup"):
        unseal(b"SQLite format 3\0" + data, PASSPHRASE)
    with pytest.raises(BackupError):
        unseal(data[: body + 5], PASSPHRASE)


def test_a_file_asking_for_a_ruinous_kdf_cost_is_refused_before_any_work(tmp_path: Path) -> None:
    old = load_config(old_node(tmp_path).config)
    data = seal(snapshot(old), PASSPHRASE, limits=FAST)
    hlen = struct.unpack(">H", data[len(MAGIC) : len(MAGIC) + 2])[0]
    header = msgpack.unpackb(data[len(MAGIC) + 2 : len(MAGIC) + 2 + hlen])
    header[3] = 1 << 40  # a terabyte of memory
    forged = msgpack.packb(header)
    planted = MAGIC + struct.pack(">H", len(forged)) + forged + data[len(MAGIC) + 2 + hlen :]
    with pytest.raises(BackupError, match="Argon2id cost"):
        unseal(planted, PASSPHRASE)


def test_restore_refuses_another_network_and_an_existing_node(tmp_path: Path) -> None:
    old_config = load_config(old_node(tmp_path).config)
    backup = unseal(seal(snapshot(old_config), PASSPHRASE, limits=FAST), PASSPHRASE)
    other = load_config(empty_node(tmp_path, "other", network="elsewhere").config)
    with pytest.raises(BackupError, match="network 'test'"):
        restore(other, backup)
    assert not other.keys.dir.exists()
    # Over a node that exists (here: itself), only with force, and the old files are kept.
    before = contents(old_config)
    with pytest.raises(NodeExists, match="the same node"):
        restore(old_config, backup)
    assert contents(old_config) == before
    restored = restore(old_config, backup, force=True)
    assert sorted(p.name.split(".before-restore-")[0] for p in restored.moved_aside) == [
        "keys",
        "peerd.db",
    ]
    assert contents(old_config) == before


def _tampered_log(store: bytes) -> bytes:
    db = sqlite3.connect(":memory:")
    db.deserialize(store[:18] + b"\x01\x01" + store[20:])
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET detail = '{}' WHERE seq = 3")
    db.commit()
    data = db.serialize()
    db.close()
    return data


@pytest.mark.parametrize("damage", ["page", "audit log"])
def test_a_damaged_store_in_a_backup_is_refused_before_anything_moves(
    tmp_path: Path, damage: str
) -> None:
    old_config = load_config(old_node(tmp_path).config)
    backup = snapshot(old_config)
    if damage == "page":
        store = bytearray(backup.store)
        store[4096 : 4096 + 64] = b"\xff" * 64  # the b-tree header of page 2
        bad = bytes(store)
    else:
        bad = _tampered_log(backup.store)
    damaged = type(backup)(**{**_fields(backup), "store": bad})
    before = contents(old_config)
    with pytest.raises(BackupError) as raised:
        restore(old_config, unseal(seal(damaged, PASSPHRASE, limits=FAST), PASSPHRASE), force=True)
    if damage == "audit log":
        assert "audit log does not verify" in str(raised.value)
    assert contents(old_config) == before
    assert not [p for p in old_config.node.state_dir.iterdir() if "restore" in p.name]


def _fields(backup: Any) -> dict[str, Any]:
    return {name: getattr(backup, name) for name in backup.__slots__}


def test_a_backup_never_overwrites_a_file(tmp_path: Path) -> None:
    old = load_config(old_node(tmp_path).config)
    target = tmp_path / "exists"
    target.write_bytes(b"precious")
    with pytest.raises(BackupError, match="exists"):
        backup_to(old, target, PASSPHRASE, limits=FAST)
    assert target.read_bytes() == b"precious"


@pytest.mark.slow  # a daemon, two started, and three Argon2id runs at the real cost
@pytest.mark.timeout(180)
def test_backup_of_a_running_daemon_and_restore_refused_while_it_runs(tmp_path: Path) -> None:
    """Through the CLI: a backup while the daemon runs is a consistent store; a restore over
    it is refused while it runs, and no daemon can start while a restore holds its lock."""
    node = old_node(tmp_path)
    secret = passphrase_file(tmp_path)
    node.start(wait_broker=False)
    try:
        trusted = [pid for pid, p in expected()["peers"].items() if p["state"] == "trusted"]
        node.cli("msg", "send", trusted[0], "note/live", "queued during the backup")
        out = json.loads(
            node.cli(
                "backup", str(tmp_path / "live.bak"), "--passphrase-file", str(secret), "--json"
            )
        )
        assert out["peer_id"] == expected()["peer_id"]
        before = _digests(node.dir / "keys")
        refused = node.run_cli(
            "restore", str(tmp_path / "live.bak"), "--passphrase-file", str(secret), "--force"
        )
        assert refused.returncode == 1
        assert "daemon is running" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert _digests(node.dir / "keys") == before
    finally:
        assert node.stop() == 0
    config = load_config(node.config)
    with _daemon_excluded(config.node.socket):
        with pytest.raises(AssertionError, match="exited at start"):
            node.start(wait_broker=False)
        node.kill()
        assert "another peerd daemon" in node.log()
    # The live backup opens, verifies and restores on another machine.
    fresh = empty_node(tmp_path)
    done = fresh.run_cli(
        "restore", str(tmp_path / "live.bak"), "--passphrase-file", str(secret), "--json"
    )
    assert done.returncode == 0, done.stderr
    assert fresh.cli("audit", "verify").startswith("audit log OK")
    assert fresh.json("id")["peer_id"] == expected()["peer_id"]
    channels = [row[1] for row in contents(load_config(fresh.config))["outbox"]]
    assert "note/live" in channels  # what the running daemon had committed, WAL included


def test_restore_without_a_passphrase_source_is_a_usage_error(tmp_path: Path) -> None:
    node = empty_node(tmp_path)
    result = node.run_cli("restore", str(tmp_path / "none.bak"))
    assert result.returncode == 2
    assert "--passphrase-file" in result.stderr


def test_a_wrong_passphrase_on_the_cli_changes_nothing(tmp_path: Path) -> None:
    node = old_node(tmp_path)
    good = passphrase_file(tmp_path)
    node.cli("backup", str(tmp_path / "n.bak"), "--passphrase-file", str(good))
    bad = tmp_path / "bad"
    bad.write_bytes(b"not it\n")
    bad.chmod(0o600)
    fresh = empty_node(tmp_path)
    result = fresh.run_cli("restore", str(tmp_path / "n.bak"), "--passphrase-file", str(bad))
    assert result.returncode == 1
    assert "wrong passphrase" in result.stderr
    assert not (fresh.dir / "keys").exists()
    assert read_backup_file(tmp_path / "n.bak").startswith(MAGIC)


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if not os.path.islink(p)
    }


def test_a_backup_by_root_leaves_no_root_owned_file_in_the_daemons_state(tmp_path: Path) -> None:
    """`sudo peerd backup` beside the daemon: the -wal/-shm files the copy opens must stay the
    daemon user's, or the daemon could not open its store again (sqlite's unix VFS gives
    journals the database's owner when it runs as root; this keeps it so)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    node = old_node(tmp_path)
    nobody = 65534
    for path in [node.dir, *node.dir.rglob("*")]:
        os.chown(path, nobody, nobody)
    config = load_config(node.config)
    # A reader holding the WAL open keeps sqlite from removing -wal/-shm at the copy's close.
    holder = sqlite3.connect(config.node.store)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT count(*) FROM events").fetchone()
        backup_to(config, tmp_path / "n.bak", PASSPHRASE, limits=FAST)
        owners = {p.name: p.stat().st_uid for p in node.dir.iterdir() if p.is_file()}
    finally:
        holder.close()
    assert {name for name, uid in owners.items() if uid != nobody} <= {"peerd.toml"}
    assert {"peerd.db-wal", "peerd.db-shm"} <= set(owners)
