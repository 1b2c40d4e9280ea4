"""Crash safety: a child process applies a fixed sequence of trust changes to a real store file
and is killed with SIGKILL at random moments, many times. After each kill the file must pass
`PRAGMA integrity_check`, its event log must verify, and its whole content must equal the
content after exactly k changes for some k: never a change half applied."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from peerd.store import Store
from protocol.identity import issue_revocation
from tests.protocol.test_identity_helpers import NOW, Node

REPO = Path(__file__).resolve().parents[2]
KILLS = 24
INVITES = 4


async def _open(path: Path) -> Store:
    return await Store.open(path, network="lab", overlap=3600.0)


async def apply(store: Store, index: int, op: list[Any]) -> None:
    """One change of the sequence, at time NOW + index."""
    now = NOW + index
    kind = op[0]
    view = store.view()
    if kind == "auth":
        auth = view.authenticate(op[1], op[2], now, allow_unknown=op[3])
        await store.record_authenticated(auth, now=now)
    elif kind == "invite":
        auth = view.authenticate(op[2], op[3], now, allow_unknown=True)
        await store.consume_invite(op[1], auth, now=now)
    elif kind == "revoke":
        assert await store.record_revocation(op[1], now=now)
    elif kind == "block":
        await store.block(op[1], now=now)
    elif kind == "trust":
        await store.trust(op[1], now=now)
    else:
        raise AssertionError(kind)


def child(db: str, ops_file: str) -> None:
    """The process that gets killed: apply every change, as fast as it can."""
    ops = msgpack.unpackb(Path(ops_file).read_bytes(), raw=False)

    async def main() -> None:
        store = await _open(Path(db))
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        for index, op in enumerate(ops):
            await apply(store, index, op)
        await store.close()

    asyncio.run(main())


def make_ops(invite_ids: list[bytes]) -> list[list[Any]]:
    nodes = [Node() for _ in range(5)]
    ops: list[list[Any]] = []

    def auth(node: Node, allow_unknown: bool = False) -> None:
        ops.append(["auth", node.credentials(), node.static.public, allow_unknown])

    for node in nodes[:3]:
        auth(node, allow_unknown=True)
    for invite_id, node in zip(invite_ids, nodes[3:], strict=False):
        ops.append(["invite", invite_id, node.credentials(), node.static.public])
    for round_ in range(25):
        for n, node in enumerate(nodes[:4]):
            node.rotate(NOW)
            auth(node)
            if round_ % 3 == n % 3:
                ops.append(
                    [
                        "revoke",
                        issue_revocation(
                            node.seed,
                            peer_id=node.peer_id,
                            kind="static",
                            serial=node.serial - 1,
                            now=NOW,
                        ).encode(),
                    ]
                )
        if round_ % 5 == 4:
            ops.append(["block", nodes[4].peer_id])
            ops.append(["trust", nodes[4].peer_id])
    ops.append(
        [
            "revoke",
            issue_revocation(
                nodes[2].seed, peer_id=nodes[2].peer_id, kind="identity", now=NOW
            ).encode(),
        ]
    )
    return ops


def content(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        ]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


async def prepare(base: Path) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The base store (identity and open invites), the changes, and the content after each."""
    me = Node()
    store = await Store.open(base, network="lab", overlap=3600.0, create=True)
    await store.init_identity(
        peer_id=me.peer_id,
        name="me",
        identity_public=me.identity_public,
        certificate=me.cert,
        now=NOW,
    )
    invite_ids = [
        (await store.create_invite(network="lab", ttl=86400, now=NOW)).invite_id
        for _ in range(INVITES)
    ]
    await store.close()
    ops = make_ops(invite_ids)
    work = base.with_name("expected.db")
    shutil.copy(base, work)
    store = await _open(work)
    expected = [content(work)]
    for index, op in enumerate(ops):
        events = len(await store.events(limit=100_000))
        await apply(store, index, op)
        assert len(await store.events(limit=100_000)) > events  # every change is logged
        expected.append(content(work))
    await store.close()
    return ops, expected


def run_child(db: Path, ops_file: Path, kill_after: float | None) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "import sys; from tests.peerd.test_store_crash import child; child(*sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db), str(ops_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else b""
    started = time.monotonic()
    if kill_after is None:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        return time.monotonic() - started
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return time.monotonic() - started


@pytest.mark.slow
def test_sigkill_mid_transaction_leaves_before_or_after(tmp_path: Path) -> None:
    base = tmp_path / "base.db"
    ops, expected = asyncio.run(prepare(base))
    by_events = {len(state["events"]): k for k, state in enumerate(expected)}
    ops_file = tmp_path / "ops.msgpack"
    ops_file.write_bytes(msgpack.packb(ops, use_bin_type=True))

    # One uninterrupted run: the child reaches the last state, and gives the time to aim at.
    db = tmp_path / "run.db"
    shutil.copy(base, db)
    duration = run_child(db, ops_file, None)
    assert content(db) == expected[-1]

    rng = random.Random(0x9EE7D)
    seen: set[int] = set()
    for _ in range(KILLS):
        db.unlink()
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copy(base, db)
        run_child(db, ops_file, rng.uniform(0, duration))
        with sqlite3.connect(db) as conn:  # recovers the WAL like any later opener
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        state = content(db)
        k = by_events.get(len(state["events"]))
        assert k is not None, f"{len(state['events'])} events match no state"
        assert state == expected[k], f"the store after a kill is not the state after {k} changes"

        async def reopen() -> None:
            store = await _open(db)
            try:
                await store.verify_log()
            finally:
                await store.close()

        asyncio.run(reopen())
        seen.add(k)
    # The kills landed at many different points of the sequence, not all at its ends.
    assert len(seen - {0, len(ops)}) >= KILLS // 3
