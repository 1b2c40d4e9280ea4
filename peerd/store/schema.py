"""The store's schema, as a list of migrations.

`MIGRATIONS[i]` takes a store from schema version `i` to `i + 1`. Each runs inside the same
transaction that records the new version, so a crash leaves the store at one version or the
next. To change the schema, append one function with `@migration` (never edit a released one):

    @migration
    async def _v2_outbox(db: aiosqlite.Connection) -> None:
        await db.executescript(...)   # no BEGIN/COMMIT: the runner holds the transaction

A store whose version is higher than `len(MIGRATIONS)` was written by a newer peerd and is
refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiosqlite

# "peer" in ASCII: `PRAGMA application_id` marks a peerd store (see sqlite's file format).
APPLICATION_ID = 0x70656572

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]
MIGRATIONS: list[Migration] = []


def migration(func: Migration) -> Migration:
    MIGRATIONS.append(func)
    return func


async def _run(db: aiosqlite.Connection, *statements: str) -> None:
    # executescript would COMMIT first; statements one by one keep the runner's transaction.
    for statement in statements:
        await db.execute(statement)


@migration
async def _v1_trust(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY NOT NULL,
            value
        )
        """,
        """
        CREATE TABLE identity (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            peer_id TEXT NOT NULL,
            name TEXT NOT NULL,
            first_identity BLOB NOT NULL CHECK (length(first_identity) = 32),
            identity_public BLOB NOT NULL CHECK (length(identity_public) = 32),
            serial INTEGER NOT NULL CHECK (serial >= 1),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE peers (
            peer_id TEXT PRIMARY KEY NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'trusted', 'blocked', 'revoked')),
            source TEXT CHECK (source IN ('invite', 'fingerprint', 'authority')),
            expected_fingerprint TEXT,
            first_identity BLOB CHECK (length(first_identity) = 32),
            identity_public BLOB CHECK (length(identity_public) = 32),
            membership BLOB,
            added_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE successions (
            peer_id TEXT NOT NULL REFERENCES peers (peer_id),
            idx INTEGER NOT NULL CHECK (idx >= 1),
            encoded BLOB NOT NULL,
            recorded_at REAL NOT NULL,
            PRIMARY KEY (peer_id, idx)
        )
        """,
        """
        CREATE TABLE certificates (
            peer_id TEXT NOT NULL REFERENCES peers (peer_id),
            serial INTEGER NOT NULL CHECK (serial >= 1),
            static_public BLOB NOT NULL CHECK (length(static_public) = 32),
            identity_public BLOB NOT NULL CHECK (length(identity_public) = 32),
            not_before INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            encoded BLOB NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('current', 'superseded', 'revoked')),
            first_seen REAL NOT NULL,
            superseded_at REAL,
            PRIMARY KEY (peer_id, serial)
        )
        """,
        """
        CREATE UNIQUE INDEX certificates_one_current ON certificates (peer_id)
            WHERE status = 'current'
        """,
        """
        CREATE TABLE revocations (
            id INTEGER PRIMARY KEY,
            peer_id TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('static', 'identity', 'authority')),
            serial INTEGER NOT NULL,
            statement BLOB NOT NULL UNIQUE,
            issued_at INTEGER NOT NULL,
            received_at REAL NOT NULL
        )
        """,
        """
        CREATE INDEX revocations_peer ON revocations (peer_id)
        """,
        """
        CREATE TABLE invites (
            invite_id BLOB PRIMARY KEY NOT NULL CHECK (length(invite_id) = 16),
            state TEXT NOT NULL CHECK (state IN ('open', 'used', 'expired')),
            psk BLOB CHECK ((state = 'open') = (psk IS NOT NULL)),
            created_at REAL NOT NULL,
            expires_at INTEGER NOT NULL,
            closed_at REAL,
            used_by TEXT,
            note TEXT NOT NULL DEFAULT ''
        )
        """,
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            peer_id TEXT,
            detail TEXT NOT NULL,
            prev_hash BLOB NOT NULL,
            hash BLOB NOT NULL
        )
        """,
        """
        CREATE TRIGGER events_no_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END
        """,
        """
        CREATE TRIGGER events_no_delete BEFORE DELETE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END
        """,
    )


@migration
async def _v2_messages(db: aiosqlite.Connection) -> None:
    """Channels: the durable outbox of messages to peers and the inbox of received ones, with
    each (peer, channel)'s counters (peerd/messages.py)."""
    await _run(
        db,
        """
        CREATE TABLE channels_out (
            peer_id TEXT NOT NULL,
            channel TEXT NOT NULL,
            next_seq INTEGER NOT NULL CHECK (next_seq >= 1),
            PRIMARY KEY (peer_id, channel)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE outbox (
            peer_id TEXT NOT NULL,
            channel TEXT NOT NULL,
            seq INTEGER NOT NULL CHECK (seq >= 1),
            data BLOB NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (peer_id, channel, seq)
        )
        """,
        "CREATE INDEX outbox_expiry ON outbox (expires_at)",
        """
        CREATE TABLE channels_in (
            peer_id TEXT NOT NULL,
            channel TEXT NOT NULL,
            last_seq INTEGER NOT NULL CHECK (last_seq >= 0),
            PRIMARY KEY (peer_id, channel)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE inbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            peer_id TEXT NOT NULL,
            channel TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL,
            received_at REAL NOT NULL,
            UNIQUE (peer_id, channel, seq)
        )
        """,
        "CREATE INDEX inbox_channel ON inbox (channel, id)",
    )


@migration
async def _v3_transfers(db: aiosqlite.Connection) -> None:
    """File transfers, both directions, resumable (peerd/transfers/records.py). `snapshot` holds the
    state machine's resumable state, content key included: it is set to NULL (and, with
    secure_delete, overwritten) as soon as the transfer ends."""
    await _run(
        db,
        """
        CREATE TABLE transfers (
            transfer_id BLOB PRIMARY KEY CHECK (length(transfer_id) = 16),
            role TEXT NOT NULL CHECK (role IN ('send', 'receive')),
            peers TEXT NOT NULL,
            name TEXT NOT NULL,
            size INTEGER NOT NULL CHECK (size >= 0),
            path TEXT NOT NULL,
            temp_path TEXT,
            state TEXT NOT NULL CHECK (state IN ('active', 'verified', 'failed', 'cancelled')),
            reason TEXT,
            detail TEXT,
            snapshot BLOB,
            source_stat TEXT,
            file_hash BLOB,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            deadline REAL
        )
        """,
        "CREATE INDEX transfers_state ON transfers (state, finished_at)",
    )


@migration
async def _v4_chunk_index(db: aiosqlite.Connection) -> None:
    """Deltas (protocol/SPEC.md 7.11): the chunks of received files, by sender and keyed id,
    and the recipe of each file being received (to index it once committed)."""
    await _run(
        db,
        """
        CREATE TABLE chunk_files (
            id INTEGER PRIMARY KEY,
            sender TEXT NOT NULL,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX chunk_files_sender ON chunk_files (sender, id)",
        """
        CREATE TABLE chunk_index (
            sender TEXT NOT NULL,
            chunk BLOB NOT NULL CHECK (length(chunk) = 16),
            file INTEGER NOT NULL REFERENCES chunk_files (id) ON DELETE CASCADE,
            offset INTEGER NOT NULL,
            length INTEGER NOT NULL,
            PRIMARY KEY (sender, chunk)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX chunk_index_file ON chunk_index (file)",
        """
        CREATE TABLE chunk_recipes (
            transfer_id BLOB PRIMARY KEY NOT NULL,
            key BLOB NOT NULL,
            entries BLOB NOT NULL
        )
        """,
    )


@migration
async def _v5_tickets(db: aiosqlite.Connection) -> None:
    """Resumption tickets (protocol/resumption.py, SPEC.md 4.7): at most one per peer and
    direction. `secret` is a secret (peerd/store/erasure.py): a row is deleted when its ticket
    is used, refused, replaced or expired, and the file scrubbed."""
    await _run(
        db,
        """
        CREATE TABLE tickets (
            peer_id TEXT NOT NULL,
            initiator INTEGER NOT NULL CHECK (initiator IN (0, 1)),
            ticket_id BLOB NOT NULL UNIQUE CHECK (length(ticket_id) = 16),
            secret BLOB NOT NULL CHECK (length(secret) = 32),
            local_static BLOB NOT NULL CHECK (length(local_static) = 32),
            peer_static BLOB NOT NULL CHECK (length(peer_static) = 32),
            expires_at REAL NOT NULL,
            PRIMARY KEY (peer_id, initiator)
        ) WITHOUT ROWID
        """,
    )


@migration
async def _v6_peer_names(db: aiosqlite.Connection) -> None:
    """A name for each peer, shown next to its id: this node's own label for it (the invite's
    note on the inviter, `join --name` / `peerd name` otherwise), never one the peer claims, so
    a peer cannot pass itself off under a name people trust."""
    await _run(db, "ALTER TABLE peers ADD COLUMN name TEXT NOT NULL DEFAULT ''")


@migration
async def _v7_sent_chunks(db: aiosqlite.Connection) -> None:
    """Deltas, the sender's side (protocol/SPEC.md 7.11): the keyed ids of the chunks of the files
    sent to each receiver with their whole recipe, so that a file sharing no sampled chunk
    with any of them is sent without waiting for its recipe (which follows the transfer)."""
    await _run(
        db,
        """
        CREATE TABLE sent_files (
            id INTEGER PRIMARY KEY,
            receiver TEXT NOT NULL,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX sent_files_receiver ON sent_files (receiver, id)",
        """
        CREATE TABLE sent_chunks (
            receiver TEXT NOT NULL,
            chunk BLOB NOT NULL CHECK (length(chunk) = 16),
            file INTEGER NOT NULL REFERENCES sent_files (id) ON DELETE CASCADE,
            PRIMARY KEY (receiver, chunk)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX sent_chunks_file ON sent_chunks (file)",
    )


__all__ = ["APPLICATION_ID", "MIGRATIONS", "Migration", "migration"]
