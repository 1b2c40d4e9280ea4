"""A node's state written by the previous release (peerd 0.1.0) opens with the current code.

The fixture (tests/peerd/fixtures/store-0.1.0, made by make_store_0_1_0.py with that release's
code) holds peers in three trust states, rotated own keys, a peer's static-key revocation, an
open and a used invite, a received and a sent transfer, an unread message and a queued one, and
the audit log of all of it. An upgrade must migrate it in place and lose none of it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from peerd.config import load_config
from peerd.keystore import Keystore
from peerd.store import MIGRATIONS, open_store
from tests.support.cluster import UNREACHABLE, Node

FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0"


def expected() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURE / "expected.json").read_text())
    return data


def old_node(tmp_path: Path) -> Node:
    """The fixture as a node's state directory, with a config naming it (git keeps no modes:
    the private ones are restored as the keystore requires)."""
    node = Node(tmp_path, "alpha", UNREACHABLE)
    shutil.copytree(FIXTURE, node.dir, ignore=shutil.ignore_patterns("expected.json"))
    node.dir.chmod(0o700)
    keys = node.dir / "keys"
    keys.chmod(0o700)
    for path in keys.iterdir():
        path.chmod(0o600 if path.suffix == ".key" else 0o644)
    (node.dir / "peerd.db").chmod(0o600)
    node.config.write_text(
        f'[node]\nname = "alpha"\nnetwork = "test"\nstate_dir = "{node.dir}"\n'
        f'runtime_dir = "{node.dir / "run"}"\n\n[broker]\nurl = "{UNREACHABLE}"\n'
    )
    (node.dir / "run").mkdir(mode=0o700)
    want = expected()
    node.peer_id, node.fingerprint = want["peer_id"], want["fingerprint"]
    return node


def test_the_fixture_is_an_old_schema() -> None:
    # If a future release rewrites the fixture by mistake, this test says so.
    assert expected()["schema_version"] == 3
    assert expected()["schema_version"] <= len(MIGRATIONS)


async def test_an_old_store_migrates_and_keeps_every_record(tmp_path: Path) -> None:
    node = old_node(tmp_path)
    want = expected()
    store = await open_store(load_config(node.config))
    try:
        assert store.schema_version == len(MIGRATIONS)
        own = store.identity
        assert own is not None
        assert (own.peer_id, own.name, own.fingerprint) == (
            want["peer_id"],
            want["name"],
            want["fingerprint"],
        )
        report = await store.verify_log()  # raises AuditError on a broken chain
        assert report.entries >= want["log"]["entries"]
        old_head = await store.fetchone(
            "SELECT hash FROM events WHERE seq = ?", (want["log"]["entries"],)
        )
        assert old_head[0].hex() == want["log"]["head"]
        peers = {
            p.peer_id: {"state": p.state.value, "source": p.source and p.source.value}
            for p in store.peers()
        }
        assert peers == want["peers"]
        for peer_id, certs in want["certificates"].items():
            have = sorted((c.serial, c.status) for c in await store.certificates(peer_id))
            assert have == [tuple(c) for c in certs], peer_id
        revocations = await store.fetchall(
            "SELECT peer_id, kind, serial FROM revocations ORDER BY id"
        )
        assert [list(r) for r in revocations] == want["revocations"]
        assert [[i.state, i.note] for i in await store.invites()] == want["invites"]
        outbox = await store.fetchall(
            "SELECT peer_id, channel, seq, CAST(data AS TEXT) FROM outbox ORDER BY peer_id, seq"
        )
        assert [list(r) for r in outbox] == want["outbox"]
        inbox = await store.fetchall(
            "SELECT peer_id, channel, seq, CAST(data AS TEXT) FROM inbox ORDER BY id"
        )
        assert [list(r) for r in inbox] == want["inbox"]
        transfers = await store.fetchall(
            "SELECT hex(transfer_id), role, name, size, state FROM transfers ORDER BY role"
        )
        assert [list(r) for r in transfers] == want["transfers"]
        assert await store.integrity_check() == ["ok"]
    finally:
        await store.close()
    keys = Keystore.load(node.dir / "keys", now=time.time())
    assert keys.peer_id == want["peer_id"]
    assert keys.serial == 2  # the fixture's node rotated once


@pytest.mark.timeout(120)
def test_the_daemon_runs_on_an_old_state_directory(tmp_path: Path) -> None:
    node = old_node(tmp_path)
    want = expected()
    node.start(wait_broker=False)
    try:
        peers = {p["peer"]: p["state"] for p in node.json("peers")}
        assert peers == {pid: p["state"] for pid, p in want["peers"].items()}
        queued = node.json("msg", "outbox")
        assert [(o["peer"], o["channel"]) for o in queued["outbox"]] == [
            (peer, channel) for peer, channel, _seq, _data in want["outbox"]
        ]
        assert [i["channel"] for i in queued["inbox"]] == [i[1] for i in want["inbox"]]
    finally:
        assert node.stop() == 0
    assert json.loads(node.cli("audit", "verify", "--json"))["entries"] >= want["log"]["entries"]
