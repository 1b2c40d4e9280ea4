"""The trust store against real sqlite files: schema, refusals that change nothing, the log."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from peerd.store import (
    MIGRATIONS,
    AuditError,
    CorruptStore,
    Event,
    NotAStore,
    Store,
    StoreError,
    StoreVersionError,
)
from peerd.store.log import GENESIS, entry_hash
from peerd.store.schema import APPLICATION_ID
from protocol.identity import (
    Blocked,
    Expired,
    InvalidText,
    PeerState,
    Revoked,
    Rollback,
    TrustError,
    TrustSource,
    fingerprint,
    issue_authority_revocation,
    issue_revocation,
    new_identity_seed,
)
from protocol.identity._codec import ed25519_public
from tests.protocol.test_identity_helpers import NOW, Node

OVERLAP = 3600.0


async def _open(path: Path, *, create: bool = False, authority: bytes | None = None) -> Store:
    return await Store.open(
        path, network="lab", overlap=OVERLAP, authority_key=authority, create=create
    )


async def _init_identity(store: Store, node: Node, name: str = "me") -> None:
    await store.init_identity(
        peer_id=node.peer_id,
        name=name,
        identity_public=node.identity_public,
        certificate=node.cert,
        now=NOW,
    )


@pytest.fixture
def me() -> Node:
    return Node()


@pytest.fixture
async def store(tmp_path: Path, me: Node) -> AsyncIterator[Store]:
    s = await _open(tmp_path / "peerd.db", create=True)
    await _init_identity(s, me)
    try:
        yield s
    finally:
        await s.close()


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read by a separate sqlite3 connection."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        ]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def view_state(s: Store) -> tuple[Any, ...]:
    v = s.view()
    return (
        sorted(v.peers(), key=lambda p: p.peer_id),
        {p.peer_id: v.revoked_through(p.peer_id) for p in v.peers()},
        sorted(g.invite_id for g in v.invites()),
    )


async def pair(s: Store, node: Node, now: float = NOW) -> None:
    await s.record_authenticated(
        s.view().authenticate(node.credentials(), node.static.public, now, allow_unknown=True),
        now=now,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- opening -----------------------------------------------------------------------------------


async def test_new_store_settings(store: Store, me: Node) -> None:
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.schema_version == len(MIGRATIONS)
    db = store._conn()
    assert (await (await db.execute("PRAGMA journal_mode")).fetchone())[0] == "wal"
    assert (await (await db.execute("PRAGMA foreign_keys")).fetchone())[0] == 1
    assert (await (await db.execute("PRAGMA application_id")).fetchone())[0] == APPLICATION_ID
    assert store.identity is not None
    assert store.identity.peer_id == me.peer_id
    assert store.view().self_peer_id == me.peer_id


async def test_missing_store_is_not_created_unless_asked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store") as info:
        await _open(tmp_path / "absent.db")
    assert "peerd init" in info.value.hint
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize(
    "content",
    [b"hello, I am a text file\n" * 10, os.urandom(4096), b"SQLite format 2\0" + bytes(100)],
)
async def test_a_file_that_is_not_a_store_is_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "peerd.db"
    path.write_bytes(content)
    with pytest.raises(NotAStore):
        await _open(path, create=True)
    assert path.read_bytes() == content


async def test_an_empty_file_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "peerd.db"
    path.write_bytes(b"")
    with pytest.raises(NotAStore):
        await _open(path)


async def test_another_programs_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT)")
        db.execute("INSERT INTO accounts (owner) VALUES ('alice')")
    before = sha(path)
    with pytest.raises(NotAStore, match="not a peerd store"):
        await _open(path, create=True)
    assert sha(path) == before


async def test_newer_schema_is_refused_without_changes(tmp_path: Path, me: Node) -> None:
    path = tmp_path / "peerd.db"
    s = await _open(path, create=True)
    await s.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    before = snapshot(path)
    with pytest.raises(StoreVersionError, match="schema version 99") as info:
        await _open(path)
    assert "upgrade peerd" in info.value.hint
    assert snapshot(path) == before


async def test_corrupt_store_is_reported_not_rebuilt(tmp_path: Path, me: Node) -> None:
    path = tmp_path / "peerd.db"
    s = await _open(path, create=True)
    await _init_identity(s, me)
    for _ in range(40):
        await pair(s, Node())
    await s.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    for offset in range(2 * page, len(data) - page, page):  # every page but the first: garbage
        data[offset + 8 : offset + 400] = os.urandom(392)
    path.write_bytes(bytes(data))
    before = sha(path)
    with pytest.raises(CorruptStore) as info:
        await _open(path)
    assert "backup" in info.value.hint
    assert sha(path) == before


async def test_a_migration_is_one_function(tmp_path: Path) -> None:
    path = tmp_path / "peerd.db"
    await (await _open(path, create=True)).close()

    async def extension(db: aiosqlite.Connection) -> None:
        await db.execute("CREATE TABLE test_extension (id INTEGER PRIMARY KEY, body BLOB)")

    known = len(MIGRATIONS)
    MIGRATIONS.append(extension)
    try:
        s = await _open(path)
        assert s.schema_version == known + 1
        async with s.transaction(NOW) as tx:
            await tx.execute("INSERT INTO test_extension (body) VALUES (x'00')")
            await tx.log("extension-used", None, {"n": 1})
        await s.verify_log()
        await s.close()
    finally:
        MIGRATIONS.remove(extension)
    # This peerd (without v2) now refuses the upgraded file.
    with pytest.raises(StoreVersionError):
        await _open(path)


async def test_a_failing_migration_leaves_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "peerd.db"
    await (await _open(path, create=True)).close()
    before = snapshot(path)

    async def broken(db: aiosqlite.Connection) -> None:
        await db.execute("CREATE TABLE half (x)")
        await db.execute("THIS IS NOT SQL")

    MIGRATIONS.append(broken)
    try:
        with pytest.raises(StoreError):
            await _open(path)
    finally:
        MIGRATIONS.remove(broken)
    assert snapshot(path) == before
    s = await _open(path)
    assert s.schema_version == len(MIGRATIONS)
    await s.close()


async def test_a_store_belongs_to_one_node(store: Store) -> None:
    other = Node()
    with pytest.raises(StoreError, match="already belongs"):
        await _init_identity(store, other, name="x")
    assert len(await store.events()) == 1


# -- refusals change nothing -------------------------------------------------------------------


async def _scenario(store: Store, me: Node) -> dict[str, Any]:
    """A store with a paired peer that rotated, a revoked peer, an open and a used invite."""
    peer = Node()
    await pair(store, peer)
    stale = store.view().authenticate(peer.credentials(), peer.static.public, NOW)
    peer.rotate(NOW + 10)
    await store.record_authenticated(
        store.view().authenticate(peer.credentials(), peer.static.public, NOW + 10), now=NOW + 10
    )
    revoked = Node()
    await pair(store, revoked)
    statement = issue_revocation(revoked.seed, peer_id=revoked.peer_id, kind="identity", now=NOW)
    assert await store.record_revocation(statement.encode(), now=NOW + 11)
    token = await store.create_invite(network="lab", ttl=600, now=NOW)
    used = await store.create_invite(network="lab", ttl=600, now=NOW)
    joiner = Node()
    await store.consume_invite(
        used.invite_id,
        store.view().authenticate(
            joiner.credentials(), joiner.static.public, NOW, allow_unknown=True
        ),
        now=NOW + 12,
    )
    return {
        "peer": peer,
        "stale": stale,
        "revoked": revoked,
        "statement": statement,
        "token": token,
        "used": used,
        "joiner": joiner,
    }


BAD_INPUTS = [
    "forged-revocation",
    "garbage-revocation",
    "replayed-revocation",
    "un-revoke",
    "un-revoke-by-fingerprint",
    "reused-invite",
    "expired-invite",
    "unknown-invite",
    "old-serial",
    "certificate-for-revoked-key",
    "bad-fingerprint-text",
    "mismatching-fingerprint",
    "authority-revocation-without-authority",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
async def test_bad_input_changes_nothing(store: Store, me: Node, case: str) -> None:
    s = await _scenario(store, me)
    peer, revoked = s["peer"], s["revoked"]
    before, view_before = snapshot(store.path), view_state(store)
    events: list[Event] = []
    store.add_listener(events.append)
    newcomer = Node()
    auth_new = store.view().authenticate(
        newcomer.credentials(), newcomer.static.public, NOW, allow_unknown=True
    )
    if case == "forged-revocation":
        mallory = Node()
        forged = issue_revocation(mallory.seed, peer_id=peer.peer_id, kind="identity", now=NOW)
        with pytest.raises(TrustError):
            await store.record_revocation(forged.encode(), now=NOW + 20)
    elif case == "garbage-revocation":
        with pytest.raises(TrustError):
            await store.record_revocation(b"\x98" + os.urandom(100), now=NOW + 20)
    elif case == "replayed-revocation":
        assert not await store.record_revocation(s["statement"].encode(), now=NOW + 20)
    elif case == "un-revoke":
        with pytest.raises(Revoked):
            await store.trust(revoked.peer_id, now=NOW + 20)
    elif case == "un-revoke-by-fingerprint":
        with pytest.raises(Revoked):
            await store.add_pending(
                revoked.peer_id, fingerprint(revoked.identity_public), now=NOW + 20
            )
    elif case == "reused-invite":
        with pytest.raises(TrustError) as info:
            await store.consume_invite(s["used"].invite_id, auth_new, now=NOW + 20)
        assert info.value.reason == "invite-used"
    elif case == "expired-invite":
        with pytest.raises(TrustError) as info:
            await store.consume_invite(s["token"].invite_id, auth_new, now=NOW + 600)
        assert info.value.reason == "expired"
    elif case == "unknown-invite":
        with pytest.raises(TrustError) as info:
            await store.consume_invite(b"\x00" * 16, auth_new, now=NOW + 20)
        assert info.value.reason == "unknown-invite"
    elif case == "old-serial":
        with pytest.raises(Rollback):
            await store.record_authenticated(s["stale"], now=NOW + 20)
    elif case == "certificate-for-revoked-key":
        revoked.rotate(NOW + 20)
        with pytest.raises(Revoked):
            store.view().authenticate(
                revoked.credentials(), revoked.static.public, NOW + 20, allow_unknown=True
            )
    elif case == "bad-fingerprint-text":
        with pytest.raises(InvalidText):
            await store.add_pending(newcomer.peer_id, "not-a-fingerprint", now=NOW + 20)
    elif case == "mismatching-fingerprint":
        with pytest.raises(TrustError):
            await store.trust(
                peer.peer_id, fingerprint=fingerprint(newcomer.identity_public), now=NOW + 20
            )
    elif case == "authority-revocation-without-authority":
        statement = issue_authority_revocation(
            new_identity_seed(), network="lab", peer_id=peer.peer_id, now=NOW
        )
        with pytest.raises(TrustError):
            await store.record_revocation(statement.encode(), now=NOW + 20)
    assert snapshot(store.path) == before
    assert view_state(store) == view_before
    assert events == []
    await store.verify_log()


async def test_a_revoked_peer_that_authenticated_before_the_revocation(store: Store) -> None:
    """The store re-checks: an `Authenticated` computed before a revocation is not recorded."""
    peer = Node()
    await pair(store, peer)
    peer.rotate(NOW + 1)
    auth = store.view().authenticate(peer.credentials(), peer.static.public, NOW + 1)
    statement = issue_revocation(peer.seed, peer_id=peer.peer_id, kind="identity", now=NOW + 2)
    await store.record_revocation(statement.encode(), now=NOW + 2)
    before = snapshot(store.path)
    with pytest.raises(Revoked):
        await store.record_authenticated(auth, now=NOW + 3)
    assert snapshot(store.path) == before


async def test_a_rejected_transaction_rolls_back(store: Store) -> None:
    before = snapshot(store.path)

    async def change_then_fail() -> None:
        async with store.transaction(NOW) as tx:
            await tx.log("something", None, {})
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        await change_then_fail()
    assert snapshot(store.path) == before


# -- what is recorded --------------------------------------------------------------------------


async def test_certificates_and_their_status(store: Store) -> None:
    peer = Node()
    await pair(store, peer)
    for i in range(1, 3):
        peer.rotate(NOW + i)
        await store.record_authenticated(
            store.view().authenticate(peer.credentials(), peer.static.public, NOW + i),
            now=NOW + i,
        )
    certs = await store.certificates(peer.peer_id)
    assert [(c.serial, c.status) for c in certs] == [
        (1, "superseded"),
        (2, "superseded"),
        (3, "current"),
    ]
    statement = issue_revocation(
        peer.seed, peer_id=peer.peer_id, kind="static", serial=2, now=NOW + 5
    )
    assert await store.record_revocation(statement.encode(), now=NOW + 5)
    certs = await store.certificates(peer.peer_id)
    assert [c.status for c in certs] == ["revoked", "revoked", "current"]
    assert await store.revocation_statements(peer.peer_id) == [statement.encode()]


async def test_pending_then_seen(store: Store) -> None:
    peer = Node()
    record = await store.add_pending(
        peer.peer_id, fingerprint(peer.identity_public).upper(), now=NOW
    )
    assert record.state is PeerState.PENDING
    auth = store.view().authenticate(peer.credentials(), peer.static.public, NOW + 1)
    record = await store.record_authenticated(auth, now=NOW + 1)
    assert (record.state, record.source) == (PeerState.TRUSTED, TrustSource.FINGERPRINT)
    kinds = [e.kind for e in await store.events()]
    assert kinds[-3:] == ["peer-pending", "peer-certificate", "peer-trusted"]


async def test_block_and_trust_again(store: Store) -> None:
    peer = Node()
    await pair(store, peer)
    record = await store.block(peer.peer_id, now=NOW + 1)
    assert record.state is PeerState.BLOCKED
    with pytest.raises(Blocked):
        store.view().authenticate(peer.credentials(), peer.static.public, NOW + 2)
    record = await store.trust(peer.peer_id, now=NOW + 3)
    assert record.state is PeerState.TRUSTED
    assert record.source is TrustSource.INVITE  # how it was first established


async def test_authority_member_and_revocation(tmp_path: Path, me: Node) -> None:
    authority = new_identity_seed()
    s = await _open(tmp_path / "peerd.db", create=True, authority=ed25519_public(authority))
    try:
        member = Node()
        member.join_authority(authority, "lab")
        auth = s.view().authenticate(member.credentials(), member.static.public, NOW)
        record = await s.record_authenticated(auth, now=NOW)
        assert record.source is TrustSource.AUTHORITY
        statement = issue_authority_revocation(
            authority, network="lab", peer_id=member.peer_id, now=NOW
        )
        assert await s.record_revocation(statement.encode(), now=NOW + 1)
        assert not await s.record_revocation(statement.encode(), now=NOW + 2)
        record = s.view().peer(member.peer_id)
        assert record is not None
        assert record.state is PeerState.REVOKED
    finally:
        await s.close()


async def test_invites_expire_and_lose_their_psk(store: Store) -> None:
    token = await store.create_invite(network="lab", ttl=60, now=NOW)
    assert store.view().invite_psk(token.invite_id, NOW) == token.psk
    assert await store.expire_invites(now=NOW + 30) == []
    assert await store.expire_invites(now=NOW + 60) == [token.invite_id]
    rows = snapshot(store.path)["invites"]
    assert rows[0][1:3] == ("expired", None)
    with pytest.raises(TrustError):
        store.view().invite_psk(token.invite_id, NOW)
    assert [i.state for i in await store.invites()] == ["expired"]


async def test_an_invite_is_consumed_once_even_concurrently(store: Store) -> None:
    token = await store.create_invite(network="lab", ttl=60, now=NOW)
    joiners = [Node() for _ in range(5)]
    auths = [
        store.view().authenticate(j.credentials(), j.static.public, NOW, allow_unknown=True)
        for j in joiners
    ]
    results = await asyncio.gather(
        *(store.consume_invite(token.invite_id, a, now=NOW + 1) for a in auths),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TrustError)]
    assert len(ok) == 1
    assert len(refused) == 4
    assert {r.reason for r in refused} == {"invite-used"}
    trusted = [p for p in store.peers() if p.state is PeerState.TRUSTED]
    assert len(trusted) == 1


async def test_the_joiner_that_used_an_invite_may_complete_a_second_attempt(store: Store) -> None:
    """On a slow path the joiner retries, and both attempts can complete (each read the PSK
    while the invite was open). The second is the same peer: recorded, not refused (refusing
    it closed the first session too). Anyone else is still refused."""
    token = await store.create_invite(network="lab", ttl=60, now=NOW)
    joiner, other = Node(), Node()
    view = store.view()
    auth = view.authenticate(joiner.credentials(), joiner.static.public, NOW, allow_unknown=True)
    first = await store.consume_invite(token.invite_id, auth, now=NOW + 1)
    again = await store.consume_invite(token.invite_id, auth, now=NOW + 2)
    assert again.peer_id == first.peer_id == joiner.peer_id
    assert again.state is PeerState.TRUSTED
    used = [e for e in await store.events() if e.kind == "invite-used"]
    assert len(used) == 1
    auth_other = view.authenticate(
        other.credentials(), other.static.public, NOW, allow_unknown=True
    )
    with pytest.raises(TrustError) as info:
        await store.consume_invite(token.invite_id, auth_other, now=NOW + 3)
    assert info.value.reason == "invite-used"
    assert other.peer_id not in {p.peer_id for p in store.peers()}


async def test_own_rotation_and_succession_are_logged(store: Store, me: Node) -> None:
    me.rotate(NOW + 1)
    await store.record_own_certificate(me.cert, now=NOW + 1)
    with pytest.raises(StoreError):
        await store.record_own_certificate(me.cert, now=NOW + 2)  # not a higher serial
    link = me.succeed(NOW + 3)
    await store.record_own_succession(link, me.cert, now=NOW + 3)
    assert store.identity is not None
    assert store.identity.identity_public == me.identity_public
    assert store.identity.serial == me.serial
    statement = issue_revocation(me.seed, peer_id=me.peer_id, kind="static", serial=1, now=NOW)
    await store.record_own_revocation(statement, now=NOW + 4)
    kinds = [e.kind for e in await store.events()]
    assert kinds == ["identity-created", "own-certificate", "own-succession", "own-revocation"]


async def test_listeners_see_committed_events(store: Store) -> None:
    seen: list[tuple[str, bool]] = []

    def listener(event: Event) -> None:
        # Called after COMMIT: the view already shows the change.
        seen.append((event.kind, store.view().peer(peer.peer_id) is not None))

    store.add_listener(listener)
    peer = Node()
    await pair(store, peer)
    assert seen == [("peer-certificate", True), ("peer-trusted", True)]
    store.remove_listener(listener)
    await store.block(peer.peer_id, now=NOW)
    assert len(seen) == 2


async def test_reopen_rebuilds_the_same_view(tmp_path: Path, store: Store, me: Node) -> None:
    await _scenario(store, me)
    peer = Node()
    await store.add_pending(peer.peer_id, fingerprint(peer.identity_public), now=NOW)
    await store.block(Node().peer_id, now=NOW)
    early = issue_revocation(peer.seed, peer_id=peer.peer_id, kind="static", serial=4, now=NOW)
    await store.record_revocation(early.encode(), now=NOW)
    expected = view_state(store)
    await store.close()
    reopened = await _open(store.path)
    try:
        assert view_state(reopened) == expected
        assert reopened.identity == store.identity
    finally:
        await reopened.close()


# -- the event log -----------------------------------------------------------------------------


async def _tamper(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER events_no_update")
        db.execute("DROP TRIGGER events_no_delete")
        for sql in statements:
            db.execute(sql)


async def _filled(store: Store, me: Node) -> Path:
    await _scenario(store, me)
    report = await store.verify_log()
    assert report.entries == len(await store.events())
    assert report.entries >= 10
    path = store.path
    await store.close()
    return path


async def test_log_is_append_only(store: Store, me: Node) -> None:
    await _scenario(store, me)
    db = store._conn()
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        await db.execute("UPDATE events SET kind = 'x' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        await db.execute("DELETE FROM events WHERE seq = 2")


@pytest.mark.parametrize(
    ("statements", "broken_at"),
    [
        (["UPDATE events SET detail = '{}' WHERE seq = 4"], 4),
        (["UPDATE events SET at = at + 1 WHERE seq = 2"], 2),
        (["UPDATE events SET peer_id = NULL WHERE seq = 5"], 5),
        (["DELETE FROM events WHERE seq = 3"], 3),
        (["UPDATE events SET hash = zeroblob(32) WHERE seq = 6"], 6),
    ],
)
async def test_tampering_names_the_first_broken_entry(
    store: Store, me: Node, statements: list[str], broken_at: int
) -> None:
    path = await _filled(store, me)
    await _tamper(path, *statements)
    s = await _open(path)
    try:
        with pytest.raises(AuditError) as info:
            await s.verify_log()
        assert info.value.seq == broken_at
        assert f"entry {broken_at}" in str(info.value)
    finally:
        await s.close()


async def test_truncating_the_tail_is_detected(store: Store, me: Node) -> None:
    path = await _filled(store, me)
    with sqlite3.connect(path) as db:
        last = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    await _tamper(path, f"DELETE FROM events WHERE seq = {last}")
    s = await _open(path)
    try:
        with pytest.raises(AuditError) as info:
            await s.verify_log()
        assert info.value.seq == last
    finally:
        await s.close()


async def test_rewriting_the_whole_chain_without_the_head_is_detected(
    store: Store, me: Node
) -> None:
    """Recomputing every hash after an edit still leaves the stored head behind."""
    path = await _filled(store, me)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, at, kind, peer_id, detail FROM events ORDER BY seq")
        rows = rows.fetchall()
    prev = GENESIS
    updates = []
    for seq, at, kind, peer_id, detail in rows:
        if seq == 2:
            detail = '{"forged":true}'
        digest = entry_hash(prev, seq, at, kind, peer_id=peer_id, detail=detail)
        updates.append(
            f"UPDATE events SET detail = '{detail}', prev_hash = x'{prev.hex()}',"
            f" hash = x'{digest.hex()}' WHERE seq = {seq}"
        )
        prev = digest
    await _tamper(path, *updates)
    s = await _open(path)
    try:
        with pytest.raises(AuditError):
            await s.verify_log()
    finally:
        await s.close()


async def test_invite_from_both_sides(tmp_path: Path, store: Store, me: Node) -> None:
    """Inviter and joiner, each with its own store, pin each other through one token."""
    token = await store.create_invite(network="lab", ttl=600, now=NOW)
    joiner = Node()
    other = await _open(tmp_path / "joiner.db", create=True)
    try:
        await _init_identity(other, joiner, name="j")
        pending = await other.accept_invite_token(token, now=NOW)
        assert (pending.state, pending.source) == (PeerState.PENDING, TrustSource.INVITE)
        # Joiner: the inviter must be the one the token names (a pending-by-invite peer).
        auth = other.view().authenticate(
            me.credentials(), me.static.public, NOW, expected_peer=token.inviter
        )
        inviter = await other.record_authenticated(auth, now=NOW)
        assert (inviter.state, inviter.source) == (PeerState.TRUSTED, TrustSource.INVITE)
        impostor = Node()
        with pytest.raises(TrustError):
            other.view().authenticate(
                impostor.credentials(), impostor.static.public, NOW, expected_peer=token.inviter
            )
        # Inviter: the PSK authenticated the joiner; the invite is consumed with it.
        auth = store.view().authenticate(
            joiner.credentials(), joiner.static.public, NOW, allow_unknown=True
        )
        joined = await store.consume_invite(token.invite_id, auth, now=NOW)
        assert joined.state is PeerState.TRUSTED
        with pytest.raises(Expired):
            await other.accept_invite_token(token, now=token.expires_at)
        wrong = await Store.open(
            tmp_path / "wrong.db", network="elsewhere", overlap=OVERLAP, create=True
        )
        try:
            with pytest.raises(TrustError) as info:
                await wrong.accept_invite_token(token, now=NOW)
            assert info.value.reason == "wrong-network"
        finally:
            await wrong.close()
    finally:
        await other.close()


def test_event_hash_vector() -> None:
    digest = entry_hash(
        GENESIS, 1, 1750000000.0, "peer-blocked", peer_id="fzgvkqmhhbzn507p1w22", detail="{}"
    )
    assert digest.hex() == "28831367ad58c2da8410f467142e4d508dacd5bc1eb618d6535fdae667415c3f"


async def test_a_succeeded_identity_key_cannot_revoke_and_nothing_is_written(
    store: Store, tmp_path: Path
) -> None:
    node = Node()
    old_seed = node.seed
    node.succeed()
    await pair(store, node)
    before = snapshot(tmp_path / "peerd.db")
    stolen = issue_revocation(old_seed, peer_id=node.peer_id, kind="identity", now=NOW)
    with pytest.raises(TrustError) as info:
        await store.record_revocation(stolen.encode(), now=NOW + 1)
    assert info.value.reason == "superseded-signer"
    assert snapshot(tmp_path / "peerd.db") == before
    assert store.peer(node.peer_id).state is PeerState.TRUSTED  # type: ignore[union-attr]
