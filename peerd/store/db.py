"""The trust store: one sqlite file (WAL, foreign keys on), driven through aiosqlite.

The store persists what the trust rules (protocol.identity.trust) decide. Every write follows
one pattern, inside one `BEGIN IMMEDIATE` transaction under one lock:

1. plan the change with the `TrustView` (which raises if the rules forbid it: nothing written);
2. write the rows and append the event(s) that record it to the hash-chained log;
3. COMMIT; only then apply the change to the in-memory `TrustView` and tell the listeners.

So the view is always exactly what the file holds, a refused change leaves both untouched, and a
crash leaves the file before or after a change, never in between.

The records are split by concern: `peerd.store.core` (connection, transactions, log appends),
`peerd.store.peers` (own identity, peers, certificates, revocations), `peerd.store.invites`;
this module opens the file, migrates it, loads the view and reads the log.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Final

import aiosqlite

from peerd.store.core import (
    BUSY_TIMEOUT_MS,
    CorruptStore,
    NotAStore,
    StoreVersionError,
    Transaction,
    _one,
    _sqlite_error,
)
from peerd.store.invites import InviteRecord, InviteRecords
from peerd.store.log import AuditError, Event, LogReport, StoreError, verify_entries
from peerd.store.peers import CertificateRecord, OwnIdentity, load_peers
from peerd.store.schema import APPLICATION_ID, MIGRATIONS
from protocol.identity import InviteGrant, TrustError, TrustView
from protocol.identity.trust import MAX_CLOSED_INVITES

SQLITE_MAGIC: Final = b"SQLite format 3\0"


class Store(InviteRecords):
    """The trust store of one node. Open with `await Store.open(...)`; close when done."""

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
            await store._watch_secrets()
            # A crash between an erasure and its scrub left the secret in the WAL: scrub first.
            await store._scrub_locked()
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
        # Erased secrets (an invite's PSK, a finished transfer's content key) are zeroed in the
        # page, not left in free space; the WAL's older page images are cut by the scrub that
        # follows each erasure (peerd.store.erasure). Temporary files stay in memory.
        await db.execute("PRAGMA secure_delete = ON")
        await db.execute("PRAGMA temp_store = MEMORY")
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
            self._view.self_identity = self._identity.identity_public
        try:
            for record in await load_peers(db):
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
        closed = await db.execute_fetchall(
            "SELECT invite_id, state FROM invites WHERE state != 'open'"
            " ORDER BY closed_at DESC LIMIT ?",
            (MAX_CLOSED_INVITES,),
        )
        for invite_id, state in reversed(list(closed)):
            self._view.drop_invite(invite_id, state)

    # -- reading the log ----------------------------------------------------------------

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
