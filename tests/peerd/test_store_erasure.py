"""Erased secrets are in no file of the store: not the main file, not -wal, not -shm, not a
journal (peerd/store/erasure.py). Real sqlite files; a real SIGKILL for the crash window; a real
second connection for the reader that holds the WAL. The daemon-level test, with a real transfer
and a real invite, is in attacks/test_forward_secrecy.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerd.sessions import TicketKeeper
from peerd.store import Store
from peerd.store.erasure import SECRET_COLUMNS
from protocol.resumption import Ticket
from protocol.session import TicketIssued, TicketSpent
from tests.protocol.test_identity_helpers import NOW, Node

ROOT = Path(__file__).resolve().parents[2]


def files_holding(directory: Path, secret: bytes) -> list[str]:
    """The files under `directory` whose bytes contain `secret`."""
    return sorted(p.name for p in directory.rglob("*") if p.is_file() and secret in p.read_bytes())


async def _open(path: Path, *, create: bool = False) -> Store:
    return await Store.open(path, network="lab", overlap=3600.0, create=create)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    me = Node()
    s = await _open(tmp_path / "peerd.db", create=True)
    await s.init_identity(
        peer_id=me.peer_id,
        name="me",
        identity_public=me.identity_public,
        certificate=me.cert,
        now=NOW,
    )
    try:
        yield s
    finally:
        await s.close()


async def _transfer_with_key(store: Store, key: bytes, tid: bytes) -> None:
    """A transfer row as peerd/transfers/records.py writes it: snapshots persisted again and again,
    each with the content key and a growing state, so page images pile up in the WAL."""
    async with store.transaction(NOW) as tx:
        await tx.execute(
            "INSERT INTO transfers (transfer_id, role, peers, name, size, path, state,"
            " created_at, updated_at) VALUES (?, 'send', '[]', 'f', 1, '/f', 'active', ?, ?)",
            (tid, NOW, NOW),
        )
    for n in range(20):
        async with store.transaction(NOW) as tx:
            await tx.execute(
                "UPDATE transfers SET snapshot = ? WHERE transfer_id = ?",
                (b"\x96" + key + os.urandom(40 * n), tid),
            )


def test_every_secret_column_exists_in_the_schema(tmp_path: Path) -> None:
    async def go() -> None:
        s = await _open(tmp_path / "peerd.db", create=True)
        await s.close()

    asyncio.run(go())
    db = sqlite3.connect(tmp_path / "peerd.db")
    try:
        for secret in SECRET_COLUMNS:
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({secret.table})")]
            assert secret.column in columns, secret
    finally:
        db.close()


async def test_content_keys_and_psks_erased_by_any_path_are_in_no_file(
    store: Store, tmp_path: Path
) -> None:
    joiner = Node()
    used = await store.create_invite(network="lab", ttl=600, now=NOW)
    expired = await store.create_invite(network="lab", ttl=60, now=NOW)
    finished, deleted = os.urandom(32), os.urandom(32)
    await _transfer_with_key(store, finished, b"a" * 16)
    await _transfer_with_key(store, deleted, b"b" * 16)
    secrets = (used.psk, expired.psk, finished, deleted)
    # Live secrets are in the files (the test would prove nothing otherwise).
    assert all(files_holding(tmp_path, s) for s in secrets)
    auth = store.view().authenticate(
        joiner.credentials(), joiner.static.public, NOW, allow_unknown=True
    )
    await store.consume_invite(used.invite_id, auth, now=NOW + 1)
    assert await store.expire_invites(now=NOW + 61) == [expired.invite_id]
    async with store.transaction(NOW) as tx:
        await tx.execute(
            "UPDATE transfers SET state = 'verified', snapshot = NULL WHERE transfer_id = ?",
            (b"a" * 16,),
        )
    async with store.transaction(NOW) as tx:
        await tx.execute("DELETE FROM transfers WHERE transfer_id = ?", (b"b" * 16,))
    for secret in secrets:
        assert files_holding(tmp_path, secret) == []
    assert store.scrubs >= 4
    assert not store.scrub_pending


async def test_a_reader_holding_the_wal_delays_the_scrub_but_never_silently(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await store.create_invite(network="lab", ttl=60, now=NOW)
    reader = sqlite3.connect(tmp_path / "peerd.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM invites").fetchall()  # holds a WAL snapshot
        await store.expire_invites(now=NOW + 61)
        # Not done, and the store says so: the PSK is still in the WAL.
        assert store.scrub_pending
        assert store.scrub_failures == 1
        assert "peerd.db-wal" in files_holding(tmp_path, token.psk)
        assert not await store.scrub()
        assert store.scrub_failures == 2
    finally:
        reader.execute("COMMIT")
        reader.close()
    # Retried after the next transaction once the reader let go (the retry is throttled).
    monkeypatch.setattr("peerd.store.core.SCRUB_RETRY_SECONDS", 0.0)
    await store.expire_invites(now=NOW + 62)
    assert not store.scrub_pending
    assert files_holding(tmp_path, token.psk) == []


_CRASH = """
import asyncio, os, signal, sys
from peerd.store import Store
from peerd.store.core import StoreCore
from tests.protocol.test_identity_helpers import NOW, Node

async def main():
    me = Node()
    s = await Store.open(sys.argv[1], network="lab", overlap=3600.0, create=True)
    await s.init_identity(peer_id=me.peer_id, name="me", identity_public=me.identity_public,
                          certificate=me.cert, now=NOW)
    token = await s.create_invite(network="lab", ttl=60, now=NOW)
    print(token.psk.hex(), flush=True)

    async def die(self, **_):
        os.kill(os.getpid(), signal.SIGKILL)  # after the erasing COMMIT, before the checkpoint

    StoreCore._scrub_locked = die
    await s.expire_invites(now=NOW + 61)

asyncio.run(main())
"""


def test_sigkill_between_erasure_and_scrub_is_scrubbed_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "peerd.db"
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    psk = bytes.fromhex(proc.stdout.strip())
    # What holds across the crash: the erasure committed, but the PSK's older page images are
    # still in the WAL (sqlite is not opened here: closing a connection would checkpoint).
    assert files_holding(tmp_path, psk) == ["peerd.db-wal"]

    async def reopen() -> None:
        s = await _open(path)
        try:
            # The open scrubbed before anything else; the erasure itself had committed.
            assert files_holding(tmp_path, psk) == []
            assert [i.state for i in await s.invites()] == ["expired"]
            assert not list(s.view().invites())
        finally:
            await s.close()

    asyncio.run(reopen())


async def test_delivered_message_bodies_leave_the_files_within_the_lazy_bound(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = os.urandom(48)
    async with store.transaction(NOW) as tx:
        await tx.execute(
            "INSERT INTO outbox (peer_id, channel, seq, data, created_at, expires_at)"
            " VALUES ('p', 'c', 1, ?, ?, ?)",
            (body, NOW, NOW + 600),
        )
    async with store.transaction(NOW) as tx:  # acknowledged: deleted, as messages.py does
        await tx.execute("DELETE FROM outbox WHERE peer_id = 'p' AND channel = 'c' AND seq <= 1")
    # Not at once (a checkpoint per message would cost too much) ...
    assert files_holding(tmp_path, body) != []
    # ... but by the first commit LAZY_SCRUB_SECONDS later (the daemon's housekeeping commits).
    monkeypatch.setattr("peerd.store.core.LAZY_SCRUB_SECONDS", 0.0)
    await store.expire_invites(now=NOW)
    assert files_holding(tmp_path, body) == []


async def test_resumption_tickets_used_or_replaced_are_in_no_file(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protocol/SPEC.md 4.7: a ticket's row goes when the session manager spends it (used,
    refused, expired) or a new session replaces it, and its secret leaves every file of the
    store by the lazy bound (the first commit LAZY_SCRUB_SECONDS later)."""
    keeper = TicketKeeper(store)

    def ticket(initiator: bool) -> Ticket:
        return Ticket(
            "bob", initiator, os.urandom(16), os.urandom(32), b"a" * 32, b"b" * 32, NOW + 60
        )

    used, replaced, kept = ticket(True), ticket(False), ticket(False)
    for t in (used, replaced):
        keeper.note(TicketIssued(t), lambda _work: True)
    await keeper.flush()
    assert all(files_holding(tmp_path, t.secret) for t in (used, replaced))
    assert {t.ticket_id for t in await keeper.load()} == {used.ticket_id, replaced.ticket_id}
    keeper.note(TicketSpent(used), lambda _work: True)
    keeper.note(TicketIssued(kept), lambda _work: True)  # same peer and direction as `replaced`
    await keeper.flush()
    assert [t.ticket_id for t in await keeper.load()] == [kept.ticket_id]  # gone at once
    monkeypatch.setattr("peerd.store.core.LAZY_SCRUB_SECONDS", 0.0)
    async with store.transaction(NOW) as tx:  # the daemon's housekeeping commit
        await tx.execute("SELECT 1")
    assert files_holding(tmp_path, used.secret) == []
    assert files_holding(tmp_path, replaced.secret) == []
    assert files_holding(tmp_path, kept.secret)
    assert not store.scrub_pending
