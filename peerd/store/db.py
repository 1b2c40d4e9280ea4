"""The trust store: one sqlite file (WAL, foreign keys on), driven through aiosqlite.

The store persists what the trust rules (protocol.identity.trust) decide. Every write follows
one pattern, inside one `BEGIN IMMEDIATE` transaction under one lock:

1. plan the change with the `TrustView` (which raises if the rules forbid it: nothing written);
2. write the rows and append the event(s) that record it to the hash-chained log;
3. COMMIT; only then apply the change to the in-memory `TrustView` and tell the listeners.

So the view is always exactly what the file holds, a refused change leaves both untouched, and a
crash leaves the file before or after a change, never in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosqlite

from peerd.store.log import (
    GENESIS,
    AuditError,
    Event,
    LogReport,
    StoreError,
    canonical_detail,
    entry_hash,
    verify_entries,
)
from peerd.store.schema import APPLICATION_ID, MIGRATIONS
from protocol.identity import (
    Authenticated,
    AuthorityRevocation,
    InviteGrant,
    InviteToken,
    KeyCertificate,
    Membership,
    PeerState,
    PeerTrust,
    Revocation,
    Succession,
    Superseded,
    TrustError,
    TrustSource,
    TrustView,
    fingerprint,
    new_invite,
    parse_fingerprint,
)
from protocol.identity.trust import MAX_INVITES, MAX_SUPERSEDED

SQLITE_MAGIC: Final = b"SQLite format 3\0"
BUSY_TIMEOUT_MS: Final = 5000

Listener = Callable[[Event], None]


class StoreVersionError(StoreError):
    hint = "upgrade peerd: this store was written by a newer version"


class NotAStore(StoreError):
    hint = "check [node] store: peerd never overwrites a file it did not create"


class CorruptStore(StoreError):
    hint = "restore the store from a backup; peerd does not rebuild a damaged store"


@dataclass(frozen=True, slots=True)
class OwnIdentity:
    peer_id: str
    name: str
    first_identity: bytes
    identity_public: bytes
    serial: int
    created_at: float

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_public)


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    peer_id: str
    serial: int
    static_public: bytes
    not_before: int
    not_after: int
    status: str  # current, superseded, revoked
    first_seen: float
    superseded_at: float | None


@dataclass(frozen=True, slots=True)
class InviteRecord:
    invite_id: bytes
    state: str  # open, used, expired
    created_at: float
    expires_at: int
    closed_at: float | None
    used_by: str | None
    note: str


def _sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return CorruptStore(f"the store {path} is damaged or not a database: {text}")
    return StoreError(f"the store {path}: {text}")


class Transaction:
    """One open transaction: run statements, append log events, defer view updates."""

    def __init__(self, store: Store, now: float) -> None:
        self._store = store
        self._db = store._conn()
        self.now = float(now)
        self._after: list[Callable[[], None]] = []
        self.events: list[Event] = []

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        return await self._db.execute(sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._db.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(sql, params) as cursor:
            return await cursor.fetchone()

    def after_commit(self, action: Callable[[], None]) -> None:
        self._after.append(action)

    async def log(self, kind: str, peer_id: str | None, detail: dict[str, Any]) -> Event:
        """Append one event to the log, in this transaction."""
        row = await self.fetchone("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        text = canonical_detail(detail)
        digest = entry_hash(prev, seq, self.now, kind, peer_id=peer_id, detail=text)
        await self.execute(
            "INSERT INTO events (seq, at, kind, peer_id, detail, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, self.now, kind, peer_id, text, prev, digest),
        )
        await self.execute(
            "INSERT INTO meta (key, value) VALUES ('log_head_seq', ?), ('log_head_hash', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (seq, digest),
        )
        event = Event(seq, self.now, kind, peer_id, detail, digest)
        self.events.append(event)
        return event


class Store:
    """The trust store of one node. Open with `await Store.open(...)`; close when done."""

    def __init__(self, path: Path, db: aiosqlite.Connection, view: TrustView) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = db
        self._view = view
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._identity: OwnIdentity | None = None
        self.schema_version = 0

    # -- opening and closing ------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        network: str,
        overlap: float,
        authority_key: bytes | None = None,
        create: bool = False,
    ) -> Store:
        """Open the store at `path` (creating it only if `create`), migrate, load the view.

        A newer schema, a file that is not a peerd store and a damaged file are errors; the
        file is never modified in those cases.
        """
        p = _check_file(path, create=create)
        try:
            db = await aiosqlite.connect(p, isolation_level=None)
        except sqlite3.Error as exc:
            raise _sqlite_error(p, exc) from exc
        view = TrustView(
            self_peer_id=None, network=network, overlap=overlap, authority_key=authority_key
        )
        store = cls(p, db, view)
        try:
            await store._prepare()
            await store._load()
        except sqlite3.Error as exc:
            await db.close()
            raise _sqlite_error(p, exc) from exc
        except BaseException:
            await db.close()
            raise
        return store

    async def _prepare(self) -> None:
        db = self._conn()
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Read before writing anything: a foreign or newer file must stay untouched.
        app_id = (await _one(db, "PRAGMA application_id"))[0]
        version = await self._read_version(app_id)
        if version > len(MIGRATIONS):
            raise StoreVersionError(
                f"the store {self.path} has schema version {version}; this peerd knows up to "
                f"{len(MIGRATIONS)}"
            )
        check = await db.execute_fetchall("PRAGMA quick_check")
        problems = [r[0] for r in check if r[0] != "ok"]
        if problems:
            raise CorruptStore(f"the store {self.path} is damaged: {'; '.join(problems[:3])}")
        mode = (await _one(db, "PRAGMA journal_mode = WAL"))[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"the store {self.path} cannot use WAL mode (got {mode})")
        await db.execute("PRAGMA synchronous = FULL")
        # Erased secrets (an invite's PSK, a finished transfer's content key) are overwritten
        # in the file, not left in free pages.
        await db.execute("PRAGMA secure_delete = ON")
        await db.execute("PRAGMA foreign_keys = ON")
        while version < len(MIGRATIONS):
            await db.execute("BEGIN IMMEDIATE")
            try:
                await MIGRATIONS[version](db)
                if version == 0:
                    await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                version += 1
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (version,),
                )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        self.schema_version = version

    async def _read_version(self, app_id: int) -> int:
        db = self._conn()
        tables = [
            r[0]
            for r in await db.execute_fetchall(
                "SELECT name FROM sqlite_schema WHERE type = 'table'"
            )
        ]
        if app_id == 0 and not tables:
            return 0  # a new, empty database: ours to set up
        if app_id != APPLICATION_ID:
            raise NotAStore(f"{self.path} is an SQLite database, but not a peerd store")
        if "meta" not in tables:
            raise CorruptStore(f"the store {self.path} has no meta table")
        row = await _one(db, "SELECT value FROM meta WHERE key = 'schema_version'", allow_none=True)
        if row is None or type(row[0]) is not int or row[0] < 1:
            raise CorruptStore(f"the store {self.path} has no valid schema version")
        version: int = row[0]
        return version

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db

    # -- the view -----------------------------------------------------------------------

    def view(self) -> TrustView:
        """The live in-memory trust state (the same object for the store's whole life)."""
        return self._view

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` for every event, after the change it records is committed."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def _load(self) -> None:
        db = self._conn()
        row = await _one(
            db,
            "SELECT peer_id, name, first_identity, identity_public, serial, created_at"
            " FROM identity WHERE id = 1",
            allow_none=True,
        )
        if row is not None:
            self._identity = OwnIdentity(*row)
            self._view.self_peer_id = row[0]
        try:
            for record in await _load_peers(db):
                self._view.put_peer(record)
        except TrustError as exc:
            raise CorruptStore(f"the store {self.path} holds an invalid object: {exc}") from exc
        for peer_id, serial in await db.execute_fetchall(
            "SELECT peer_id, MAX(serial) FROM revocations WHERE kind = 'static' GROUP BY peer_id"
        ):
            self._view.put_revoked_through(peer_id, serial)
        for invite_id, psk, expires_at in await db.execute_fetchall(
            "SELECT invite_id, psk, expires_at FROM invites WHERE state = 'open'"
        ):
            self._view.put_invite(InviteGrant(invite_id, psk, expires_at))

    # -- transactions -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, now: float) -> AsyncIterator[Transaction]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT) under the store's lock.

        For other modules' tables too: write with `tx.execute`, record with `tx.log`, and defer
        in-memory updates with `tx.after_commit`. An exception rolls everything back.
        """
        async with self._lock:
            db = self._conn()
            tx = Transaction(self, now)
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield tx
                    await db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc
        for action in tx._after:
            action()
        for event in tx.events:
            for listener in list(self._listeners):
                listener(event)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read outside any transaction, for other modules' tables. It takes the store's
        lock so it never sees another coroutine's uncommitted writes on the shared connection."""
        async with self._lock:
            try:
                return list(await self._conn().execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    # -- own identity -------------------------------------------------------------------

    @property
    def identity(self) -> OwnIdentity | None:
        return self._identity

    async def init_identity(
        self,
        *,
        peer_id: str,
        name: str,
        identity_public: bytes,
        certificate: KeyCertificate,
        now: float,
    ) -> OwnIdentity:
        """Record this node's identity (once: a store belongs to one node)."""
        if self._identity is not None:
            raise StoreError(
                f"the store {self.path} already belongs to node {self._identity.peer_id}",
                hint="use another state directory for another node",
            )
        own = OwnIdentity(peer_id, name, identity_public, identity_public, certificate.serial, now)
        async with self.transaction(now) as tx:
            await tx.execute(
                "INSERT INTO identity (id, peer_id, name, first_identity, identity_public,"
                " serial, created_at, updated_at) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (peer_id, name, identity_public, identity_public, certificate.serial, now, now),
            )
            await tx.log(
                "identity-created",
                peer_id,
                {
                    "fingerprint": fingerprint(identity_public),
                    "serial": certificate.serial,
                    "static": certificate.static_public.hex(),
                    "not_after": certificate.not_after,
                },
            )
            tx.after_commit(lambda: self._set_identity(own))
        return own

    def _set_identity(self, own: OwnIdentity) -> None:
        self._identity = own
        self._view.self_peer_id = own.peer_id

    def _own(self) -> OwnIdentity:
        if self._identity is None:
            raise StoreError(f"the store {self.path} has no identity", hint="run `peerd init`")
        return self._identity

    async def record_own_certificate(self, certificate: KeyCertificate, *, now: float) -> None:
        """Log a rotation of this node's static key (the keystore holds the key itself)."""
        own = self._own()
        if certificate.peer_id != own.peer_id or certificate.serial <= own.serial:
            raise StoreError(
                f"certificate {certificate.serial} does not follow {own.serial} of this node"
            )
        updated = OwnIdentity(
            own.peer_id,
            own.name,
            own.first_identity,
            certificate.identity_public,
            certificate.serial,
            own.created_at,
        )
        async with self.transaction(now) as tx:
            await tx.execute(
                "UPDATE identity SET serial = ?, identity_public = ?, updated_at = ? WHERE id = 1",
                (certificate.serial, certificate.identity_public, now),
            )
            await tx.log(
                "own-certificate",
                own.peer_id,
                {
                    "serial": certificate.serial,
                    "static": certificate.static_public.hex(),
                    "not_after": certificate.not_after,
                },
            )
            tx.after_commit(lambda: self._set_identity(updated))

    async def record_own_succession(
        self, succession: Succession, certificate: KeyCertificate, *, now: float
    ) -> None:
        """Log a succession of this node's identity key, with the certificate it came with."""
        own = self._own()
        if succession.old_identity != own.identity_public or (
            certificate.identity_public != succession.new_identity
        ):
            raise StoreError("this succession does not continue this node's identity")
        updated = OwnIdentity(
            own.peer_id,
            own.name,
            own.first_identity,
            succession.new_identity,
            certificate.serial,
            own.created_at,
        )
        async with self.transaction(now) as tx:
            await tx.execute(
                "UPDATE identity SET serial = ?, identity_public = ?, updated_at = ? WHERE id = 1",
                (certificate.serial, succession.new_identity, now),
            )
            await tx.log(
                "own-succession",
                own.peer_id,
                {
                    "index": succession.index,
                    "fingerprint": fingerprint(succession.new_identity),
                    "previous": fingerprint(succession.old_identity),
                    "serial": certificate.serial,
                },
            )
            tx.after_commit(lambda: self._set_identity(updated))

    async def record_own_revocation(self, statement: Revocation, *, now: float) -> None:
        """Log a revocation statement this node issued about itself."""
        own = self._own()
        if statement.peer_id != own.peer_id:
            raise StoreError("this revocation is not about this node")
        async with self.transaction(now) as tx:
            await tx.log(
                "own-revocation",
                own.peer_id,
                {"kind": statement.kind, "serial": statement.serial, "reason": statement.reason},
            )

    # -- peers --------------------------------------------------------------------------

    def peer(self, peer_id: str) -> PeerTrust | None:
        return self._view.peer(peer_id)

    def peers(self) -> list[PeerTrust]:
        return sorted(self._view.peers(), key=lambda p: p.peer_id)

    async def add_pending(
        self,
        peer_id: str,
        expected_fingerprint: str,
        *,
        source: TrustSource = TrustSource.FINGERPRINT,
        now: float,
    ) -> PeerTrust:
        """Expect `peer_id` to show an identity key with this fingerprint; it becomes trusted
        at its first successful handshake. Also what a joiner does with an invite token."""
        fp = parse_fingerprint(expected_fingerprint)
        async with self.transaction(now) as tx:
            planned = self._view.plan_pending(peer_id, fp, source, now)
            if planned is not None:
                await self._write_peer(tx, planned)
                await tx.log("peer-pending", peer_id, {"fingerprint": fp, "source": source.value})
        return self._peer_after(peer_id)

    async def accept_invite_token(self, token: InviteToken, *, now: float) -> PeerTrust:
        """The joiner's side of an invite: expect the inviter's identity key (pending, by
        invite) so that the XXpsk3 handshake with `expected_peer=token.inviter` pins it."""
        token.check_fresh(now)
        if token.network != self._view.network:
            raise TrustError(
                f"the invite is for network {token.network!r}, this node is in "
                f"{self._view.network!r}",
                reason="wrong-network",
                hint="set [node] network to the inviter's network",
            )
        if token.inviter == self._view.self_peer_id:
            raise TrustError("this invite was issued by this node", reason="self")
        return await self.add_pending(
            token.inviter,
            fingerprint(token.inviter_identity),
            source=TrustSource.INVITE,
            now=now,
        )

    async def trust(self, peer_id: str, *, fingerprint: str | None = None, now: float) -> PeerTrust:
        """The `trust` command: lift a block, or expect a fingerprint. Never un-revokes."""
        fp = None if fingerprint is None else parse_fingerprint(fingerprint)
        async with self.transaction(now) as tx:
            planned = self._view.plan_trust(peer_id, fp, now)
            if planned is not None:
                await self._write_peer(tx, planned)
                kind = "peer-trusted" if planned.state is PeerState.TRUSTED else "peer-pending"
                await tx.log(
                    kind,
                    peer_id,
                    {
                        "fingerprint": planned.fingerprint,
                        "source": _value(planned.source),
                        "by": "command",
                    },
                )
        return self._peer_after(peer_id)

    async def block(self, peer_id: str, *, now: float) -> PeerTrust:
        async with self.transaction(now) as tx:
            planned = self._view.plan_block(peer_id, now)
            if planned is not None:
                await self._write_peer(tx, planned)
                await tx.log("peer-blocked", peer_id, {})
        return self._peer_after(peer_id)

    async def record_authenticated(self, auth: Authenticated, *, now: float) -> PeerTrust:
        """Record what a successful handshake showed: first contact, rotation, succession.

        The rules are applied again (the state may have changed since `authenticate`); a
        refusal raises and records nothing.
        """
        async with self.transaction(now) as tx:
            await self._record_auth(tx, auth)
        return self._peer_after(auth.peer_id)

    async def _record_auth(self, tx: Transaction, auth: Authenticated) -> None:
        before = self._view.peer(auth.peer_id)
        planned = self._view.plan_authenticated(auth, tx.now)
        if planned is None:
            return
        await self._write_peer(tx, planned)
        was_trusted = before is not None and before.state is PeerState.TRUSTED
        old_chain = 0 if before is None else len(before.successions)
        for link in planned.successions[old_chain:]:
            await tx.log(
                "peer-succession",
                auth.peer_id,
                {"index": link.index, "fingerprint": fingerprint(link.new_identity)},
            )
        cert = planned.certificate
        assert cert is not None
        if before is None or before.certificate != cert:
            await tx.log(
                "peer-certificate",
                auth.peer_id,
                {
                    "serial": cert.serial,
                    "static": cert.static_public.hex(),
                    "not_after": cert.not_after,
                    "previous": None
                    if before is None or before.certificate is None
                    else before.certificate.serial,
                },
            )
        if not was_trusted:
            await tx.log(
                "peer-trusted",
                auth.peer_id,
                {
                    "fingerprint": auth.fingerprint,
                    "source": _value(planned.source),
                    "by": "handshake",
                },
            )

    def _peer_after(self, peer_id: str) -> PeerTrust:
        record = self._view.peer(peer_id)
        assert record is not None
        return record

    async def _write_peer(self, tx: Transaction, after: PeerTrust) -> None:
        """Write a peer's planned record: its row, new successions, a new current cert."""
        before = self._view.peer(after.peer_id)
        now = tx.now
        await tx.execute(
            "INSERT INTO peers (peer_id, state, source, expected_fingerprint, first_identity,"
            " identity_public, membership, added_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (peer_id) DO UPDATE SET state = excluded.state,"
            " source = excluded.source, expected_fingerprint = excluded.expected_fingerprint,"
            " first_identity = excluded.first_identity,"
            " identity_public = excluded.identity_public, membership = excluded.membership,"
            " updated_at = excluded.updated_at",
            (
                after.peer_id,
                after.state.value,
                _value(after.source),
                after.expected_fingerprint,
                after.identities[0] if after.identities else None,
                after.identity,
                None if after.membership is None else after.membership.encode(),
                now,
                now,
            ),
        )
        old_chain = () if before is None else before.successions
        if after.successions[: len(old_chain)] != old_chain:
            raise StoreError(f"internal: the identity chain of {after.peer_id} would be rewritten")
        for link in after.successions[len(old_chain) :]:
            await tx.execute(
                "INSERT INTO successions (peer_id, idx, encoded, recorded_at) VALUES (?, ?, ?, ?)",
                (after.peer_id, link.index, link.encode(), now),
            )
        cert = after.certificate
        if cert is not None and (before is None or before.certificate != cert):
            if before is not None and before.certificate is not None:
                # Its successor's arrival starts the overlap, whatever its status (a revoked
                # certificate stays revoked).
                await tx.execute(
                    "UPDATE certificates SET superseded_at = ?, status = CASE status"
                    " WHEN 'current' THEN 'superseded' ELSE status END"
                    " WHERE peer_id = ? AND serial = ?",
                    (now, after.peer_id, before.certificate.serial),
                )
            status = (
                "revoked"
                if cert.serial <= self._view.revoked_through(after.peer_id)
                else ("current")
            )
            await tx.execute(
                "INSERT INTO certificates (peer_id, serial, static_public, identity_public,"
                " not_before, not_after, encoded, status, first_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    after.peer_id,
                    cert.serial,
                    cert.static_public,
                    cert.identity_public,
                    cert.not_before,
                    cert.not_after,
                    cert.encode(),
                    status,
                    now,
                ),
            )
        if after.state is PeerState.REVOKED:
            await tx.execute(
                "UPDATE certificates SET status = 'revoked' WHERE peer_id = ?", (after.peer_id,)
            )
        tx.after_commit(lambda: self._view.put_peer(after))

    # -- revocations --------------------------------------------------------------------

    async def record_revocation(self, statement: bytes, *, now: float) -> bool:
        """Verify and apply a revocation statement (the owner's or the authority's).

        Returns False when it changes nothing (a replay, or a serial already revoked): that is
        not an error, and nothing is written. A forged or foreign statement raises.
        """
        async with self.transaction(now) as tx:
            plan = self._view.plan_revocation(statement, now)
            if not plan.changes:
                return False
            parsed = plan.statement
            if isinstance(parsed, AuthorityRevocation):
                kind, serial, by = "authority", 0, "authority"
            else:
                kind, serial, by = parsed.kind, parsed.serial, "owner"
            await tx.execute(
                "INSERT INTO revocations (peer_id, kind, serial, statement, issued_at,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (parsed.peer_id, kind, serial, plan.encoded, parsed.issued_at, now),
            )
            if plan.peer is not None:
                await self._write_peer(tx, plan.peer)
            if plan.revoked_through is not None:
                through = plan.revoked_through
                peer_id = parsed.peer_id
                await tx.execute(
                    "UPDATE certificates SET status = 'revoked' WHERE peer_id = ? AND serial <= ?",
                    (peer_id, through),
                )
                tx.after_commit(lambda: self._view.put_revoked_through(peer_id, through))
            await tx.log(
                "peer-revoked" if kind != "static" else "certificates-revoked",
                parsed.peer_id,
                {
                    "kind": kind,
                    "serial": serial,
                    "by": by,
                    "reason": parsed.reason,
                    "issued_at": parsed.issued_at,
                },
            )
        return True

    async def revocation_statements(self, peer_id: str | None = None) -> list[bytes]:
        """The stored statements (to publish again, or to show), oldest first."""
        sql = "SELECT statement FROM revocations"
        params: tuple[Any, ...] = ()
        if peer_id is not None:
            sql += " WHERE peer_id = ?"
            params = (peer_id,)
        rows = await self._conn().execute_fetchall(sql + " ORDER BY id", params)
        return [r[0] for r in rows]

    # -- invites ------------------------------------------------------------------------

    async def create_invite(
        self, *, network: str, ttl: float, now: float, note: str = ""
    ) -> InviteToken:
        """Issue a one-time invite token for this node (its PSK is kept until used)."""
        own = self._own()
        token = new_invite(
            network=network,
            inviter=own.peer_id,
            inviter_identity=own.identity_public,
            now=now,
            ttl=ttl,
        )
        grant = InviteGrant(token.invite_id, token.psk, token.expires_at)
        async with self.transaction(now) as tx:
            if self._view.open_invite_count() >= MAX_INVITES:
                raise StoreError("too many open invites", hint="let some expire or be used")
            await tx.execute(
                "INSERT INTO invites (invite_id, state, psk, created_at, expires_at, note)"
                " VALUES (?, 'open', ?, ?, ?, ?)",
                (token.invite_id, token.psk, now, token.expires_at, note[:200]),
            )
            await tx.log(
                "invite-created",
                None,
                {
                    "invite": token.invite_id.hex(),
                    "expires_at": token.expires_at,
                    "note": note[:200],
                },
            )
            tx.after_commit(lambda: self._view.put_invite(grant))
        return token

    async def consume_invite(
        self, invite_id: bytes, auth: Authenticated, *, now: float
    ) -> PeerTrust:
        """Use an invite once and trust the peer it admitted, in one transaction.

        `auth` comes from `authenticate(..., allow_unknown=True)` on the XXpsk3 handshake that
        used this invite's PSK. A used, expired or unknown invite raises and changes nothing.
        """
        invite_id = bytes(invite_id)
        async with self.transaction(now) as tx:
            row = await tx.fetchone(
                "SELECT state, expires_at FROM invites WHERE invite_id = ?", (invite_id,)
            )
            if row is None:
                raise TrustError("no such invite", reason="unknown-invite")
            if row[0] != "open":
                raise TrustError(
                    f"the invite was already {row[0]}",
                    reason="invite-used",
                    hint="each invite works once; issue a new one",
                )
            if now >= row[1]:
                raise TrustError(
                    "the invite expired",
                    reason="expired",
                    hint="issue a new one with `peerd invite`",
                )
            cursor = await tx.execute(
                "UPDATE invites SET state = 'used', psk = NULL, closed_at = ?, used_by = ?"
                " WHERE invite_id = ? AND state = 'open'",
                (now, auth.peer_id, invite_id),
            )
            if cursor.rowcount != 1:
                raise TrustError("the invite was already used", reason="invite-used")
            await tx.log("invite-used", auth.peer_id, {"invite": invite_id.hex()})
            await self._record_auth(tx, auth)
            tx.after_commit(lambda: self._view.drop_invite(invite_id))
        return self._peer_after(auth.peer_id)

    async def expire_invites(self, *, now: float) -> list[bytes]:
        """Close every open invite whose time has passed and erase its PSK; their ids."""
        async with self.transaction(now) as tx:
            rows = await tx.fetchall(
                "SELECT invite_id FROM invites WHERE state = 'open' AND expires_at <= ?",
                (int(now),),
            )
            ids = [r[0] for r in rows]
            if not ids:
                return []
            await tx.execute(
                "UPDATE invites SET state = 'expired', psk = NULL, closed_at = ?"
                " WHERE state = 'open' AND expires_at <= ?",
                (now, int(now)),
            )
            await tx.log("invites-expired", None, {"invites": [i.hex() for i in ids]})
            tx.after_commit(lambda: self._drop_invites(ids))
        return ids

    def _drop_invites(self, ids: list[bytes]) -> None:
        for invite_id in ids:
            self._view.drop_invite(invite_id)

    async def invites(self) -> list[InviteRecord]:
        rows = await self._conn().execute_fetchall(
            "SELECT invite_id, state, created_at, expires_at, closed_at, used_by, note"
            " FROM invites ORDER BY created_at"
        )
        return [InviteRecord(*r) for r in rows]

    # -- reading ------------------------------------------------------------------------

    async def certificates(self, peer_id: str) -> list[CertificateRecord]:
        rows = await self._conn().execute_fetchall(
            "SELECT peer_id, serial, static_public, not_before, not_after, status, first_seen,"
            " superseded_at FROM certificates WHERE peer_id = ? ORDER BY serial",
            (peer_id,),
        )
        return [CertificateRecord(*r) for r in rows]

    async def events(self, *, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = await self._conn().execute_fetchall(
            "SELECT seq, at, kind, peer_id, detail, hash FROM events WHERE seq > ?"
            " ORDER BY seq LIMIT ?",
            (after, max(0, min(limit, 100_000))),
        )
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows]

    async def verify_log(self) -> LogReport:
        """Check the whole event log's hash chain; `AuditError` names the first bad entry."""
        db = self._conn()
        head: dict[str, Any] = {
            r[0]: r[1]
            for r in await db.execute_fetchall(
                "SELECT key, value FROM meta WHERE key IN ('log_head_seq', 'log_head_hash')"
            )
        }
        rows = await db.execute_fetchall(
            "SELECT seq, at, kind, peer_id, detail, prev_hash, hash FROM events ORDER BY seq"
        )
        return verify_entries(
            [tuple(r) for r in rows],
            head_seq=head.get("log_head_seq"),
            head_hash=head.get("log_head_hash"),
        )

    async def integrity_check(self) -> list[str]:
        """sqlite's full `PRAGMA integrity_check`: ["ok"] for a sound file."""
        return [r[0] for r in await self._conn().execute_fetchall("PRAGMA integrity_check")]


# -- helpers ------------------------------------------------------------------------------------


def _value(source: TrustSource | None) -> str | None:
    return None if source is None else source.value


async def _one(db: aiosqlite.Connection, sql: str, *, allow_none: bool = False) -> Any:
    async with db.execute(sql) as cursor:
        row = await cursor.fetchone()
    if row is None and not allow_none:
        raise StoreError(f"no result for {sql}")
    return row


def _check_file(where: str | os.PathLike[str], *, create: bool) -> Path:
    """Refuse a missing store (unless creating) and a file that is not SQLite, before sqlite
    touches it (sqlite would happily treat an empty or foreign file as a new database)."""
    path = Path(where).absolute()
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        if not create:
            raise StoreError(
                f"there is no store at {path}", hint="run `peerd init` first"
            ) from None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot create the store {path}: {exc.strerror}") from exc
        return path
    except OSError as exc:
        raise StoreError(f"cannot read the store {path}: {exc.strerror}") from exc
    if head and head != SQLITE_MAGIC:
        raise NotAStore(f"{path} is not a peerd store (not an SQLite database)")
    if not head and not create:
        raise NotAStore(f"{path} is an empty file, not a peerd store")
    return path


async def _load_peers(db: aiosqlite.Connection) -> list[PeerTrust]:
    chains: dict[str, list[Succession]] = {}
    for peer_id, encoded in await db.execute_fetchall(
        "SELECT peer_id, encoded FROM successions ORDER BY peer_id, idx"
    ):
        chains.setdefault(peer_id, []).append(Succession.decode(encoded))
    current: dict[str, KeyCertificate] = {}
    superseded: dict[str, list[Superseded]] = {}
    for peer_id, encoded, superseded_at in await db.execute_fetchall(
        "SELECT peer_id, encoded, superseded_at FROM certificates ORDER BY peer_id, serial"
    ):
        cert = KeyCertificate.decode(encoded)
        current[peer_id] = cert  # ordered by serial: ends at the highest seen, revoked or not
        if superseded_at is not None:
            superseded.setdefault(peer_id, []).append(
                Superseded(cert.serial, superseded_at, cert.not_after)
            )
    out = []
    for row in await db.execute_fetchall(
        "SELECT peer_id, state, source, expected_fingerprint, first_identity, membership,"
        " updated_at FROM peers"
    ):
        peer_id, state, source, expected, first, membership, updated_at = row
        chain = tuple(chains.get(peer_id, ()))
        identities: tuple[bytes, ...] = ()
        if first is not None:
            identities = (first, *(link.new_identity for link in chain))
        out.append(
            PeerTrust(
                peer_id=peer_id,
                state=PeerState(state),
                source=None if source is None else TrustSource(source),
                expected_fingerprint=expected,
                identities=identities,
                successions=chain,
                certificate=current.get(peer_id),
                superseded=tuple(superseded.get(peer_id, [])[-MAX_SUPERSEDED:]),
                membership=None if membership is None else Membership.decode(membership),
                updated_at=updated_at,
            )
        )
    return out


__all__ = [
    "AuditError",
    "CertificateRecord",
    "CorruptStore",
    "Event",
    "InviteRecord",
    "LogReport",
    "NotAStore",
    "OwnIdentity",
    "Store",
    "StoreError",
    "StoreVersionError",
    "Transaction",
]
