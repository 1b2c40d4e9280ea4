"""The store's machinery shared by every kind of record: the connection, the one lock, write
transactions that append to the hash-chained log, reads, listeners, and the errors.

The records themselves are in `peerd.store.peers` (own identity, peers, certificates,
revocations) and `peerd.store.invites`; `peerd.store.db` opens the file and puts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosqlite

from peerd.store.erasure import (
    LAZY_SCRUB_SECONDS,
    SCRUB_RETRY_SECONDS,
    checkpoint_truncate,
    watch_secrets,
)
from peerd.store.log import GENESIS, Event, StoreError, canonical_detail, entry_hash
from protocol.identity import TrustView

BUSY_TIMEOUT_MS: Final = 5000

log = logging.getLogger("peerd.store")

Listener = Callable[[Event], None]


class StoreVersionError(StoreError):
    hint = "upgrade peerd: this store was written by a newer version"


class NotAStore(StoreError):
    hint = "check [node] store: peerd never overwrites a file it did not create"


class CorruptStore(StoreError):
    hint = "restore the store from a backup; peerd does not rebuild a damaged store"


def _sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return CorruptStore(f"the store {path} is damaged or not a database: {text}")
    return StoreError(f"the store {path}: {text}")


class Transaction:
    """One open transaction: run statements, append log events, defer view updates."""

    # Given the connection, not the store: a transaction needs nothing else of it.
    def __init__(self, db: aiosqlite.Connection, now: float) -> None:
        self._db = db
        self.now = float(now)
        self._after: list[Callable[[], None]] = []
        self.events: list[Event] = []

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        return await self._db.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

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


class StoreCore:
    """What every part of the store uses: the connection, the lock, transactions, listeners."""

    def __init__(self, path: Path, db: aiosqlite.Connection, view: TrustView) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = db
        self._view = view
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self.schema_version = 0
        # Erasure (peerd.store.erasure): set from sqlite's thread by the TEMP triggers, read on
        # the loop after the statement's await, so no lock is needed.
        self._erased = False
        self._erased_lazily: float | None = None  # monotonic time of the first lazy erasure
        self._scrub_tried = 0.0
        self.scrub_pending = False  # an erased secret may still be in the WAL (a reader held it)
        self.scrubs = 0  # checkpoints that cut the WAL after an erasure
        self.scrub_failures = 0  # ... and those a reader (or an I/O error) prevented

    async def close(self) -> None:
        if self._db is not None:
            if self._erased or self._erased_lazily is not None or self.scrub_pending:
                async with self._lock:
                    await self._scrub_locked()
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

    # -- erasure ------------------------------------------------------------------------

    def _on_erased(self, at_once: int) -> None:
        if at_once:
            self._erased = True
        elif self._erased_lazily is None:
            self._erased_lazily = time.monotonic()

    async def _watch_secrets(self) -> None:
        await watch_secrets(self._conn(), self._on_erased)

    async def scrub(self) -> bool:
        """Cut the WAL now, so that no file keeps a secret erased so far; False if another
        connection's reader prevented it (then `scrub_pending` stays set and it is retried)."""
        async with self._lock:
            return await self._scrub_locked()

    async def _scrub_locked(self) -> bool:
        known = self._erased or self._erased_lazily is not None or self.scrub_pending
        self._erased = False
        self._erased_lazily = None
        self._scrub_tried = time.monotonic()
        try:
            done = await checkpoint_truncate(self._conn(), restore_busy_ms=BUSY_TIMEOUT_MS)
            problem = "another connection holds a read transaction on it"
        except sqlite3.Error as exc:
            done, problem = False, str(exc)
        if done:
            if self.scrub_pending:
                log.info("the store's WAL is scrubbed: erased secrets are gone from its files")
            self.scrub_pending = False
            self.scrubs += 1
            return True
        self.scrub_failures += 1
        if not self.scrub_pending:  # one line per episode, however long it lasts
            # Nothing known to be erased (the scrub at open, for a crash that may have happened;
            # a CLI command opening the store beside a busy daemon meets this): no alarm.
            level = logging.WARNING if known else logging.INFO
            log.log(
                level,
                "erased secrets may remain in %s-wal until it can be cut (%s); retrying",
                self.path,
                problem,
            )
        self.scrub_pending = True
        return False

    def _scrub_due(self) -> bool:
        if self._erased:
            return True
        now = time.monotonic()
        lazy = self._erased_lazily
        if lazy is not None and now - lazy >= LAZY_SCRUB_SECONDS:
            return True
        return self.scrub_pending and now - self._scrub_tried >= SCRUB_RETRY_SECONDS

    # -- transactions -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, now: float) -> AsyncIterator[Transaction]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT) under the store's lock.

        For other modules' tables too: write with `tx.execute`, record with `tx.log`, and defer
        in-memory updates with `tx.after_commit`. An exception rolls everything back.
        """
        async with self._lock:
            db = self._conn()
            tx = Transaction(db, now)
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
            if self._scrub_due():
                await self._scrub_locked()
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


async def _one(db: aiosqlite.Connection, sql: str, *, allow_none: bool = False) -> Any:
    async with db.execute(sql) as cursor:
        row = await cursor.fetchone()
    if row is None and not allow_none:
        raise StoreError(f"no result for {sql}")
    return row
