"""Erasing secrets for real: no file of the state directory keeps a secret once its row let go.

The store holds secrets in sqlite pages (`SECRET_COLUMNS`): a transfer's content key (inside
`transfers.snapshot`, while the transfer runs), an open invite's PSK (`invites.psk`), resumption
tickets (`tickets.secret`, until used or replaced), and the
bodies of messages until they are delivered or taken (`outbox.data`, `inbox.data`). Private keys
are not in sqlite: they are files in the keys directory (peerd/keystore.py).

Setting such a column to NULL is not enough. `secure_delete` zeroes the freed bytes in the new
image of the page, but in WAL mode that image is appended to `-wal`: every earlier image of the
page - each snapshot ever persisted, the PSK's insert - stays in the WAL file until a later frame
happens to overwrite it, and a checkpoint copies pages to the main file without shortening the
WAL. A copy of the state directory then yields the key (this is how an outside review decrypted
recorded chunk frames after a "verified, key erased" transfer).

So every statement that erases a secret is noticed by a TEMP trigger (it calls a function the
store registers, so a caller cannot forget to announce an erasure, whatever module wrote the
SQL), and after that transaction commits the store runs `PRAGMA wal_checkpoint(TRUNCATE)`: the
zeroed page images go into the main file and the WAL is cut to zero bytes. Keys are scrubbed at
once; message bodies, deleted one by one and often, by the first commit `LAZY_SCRUB_SECONDS`
later. `-shm` holds only the WAL index (page numbers and checksums), never page content; no
rollback journal exists in WAL mode; `temp_store = MEMORY` keeps sqlite's temporary files
(sorts, statement journals) off disk.

The checkpoint cannot finish while another connection (the CLI, an operator's `sqlite3`, a
backup tool) holds a read transaction on the WAL; sqlite then reports it busy. The store never
takes that as done: it keeps `scrub_pending`, counts the failure, logs once, and retries after
the next transaction (at most every `SCRUB_RETRY_SECONDS`), at open and at close. A crash (even
SIGKILL) between the erasing commit and the checkpoint leaves the old frames in the WAL: the
next open of the store scrubs before anything else.

Why scrub the store rather than keep secrets out of sqlite: a transfer resumes after a crash of
either side, so its content key must be durable somewhere. A side file per key would need the
same overwrite-and-sync at erasure plus a second crash-consistency protocol beside the store's
transactions; encrypting the column under a key kept elsewhere only moves the question to that
key. The scrub costs a checkpoint per erasure (a few fsyncs; docs/benchmarks.md, "erasure").

Below the file level nothing is promised: a filesystem may keep old blocks (copy-on-write,
journalled data, snapshots), an SSD remaps writes, and a backup taken while a secret was live
holds it. Full-disk encryption covers that; see docs/SECURITY.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiosqlite


@dataclass(frozen=True, slots=True)
class Secret:
    table: str
    column: str
    at_once: bool  # scrub right after the erasing commit; else within LAZY_SCRUB_SECONDS


# Every column that ever holds a secret. A new one belongs here, in the same commit as the
# migration that adds it (tests/peerd/test_store_erasure.py checks them against the schema).
SECRET_COLUMNS: Final = (
    # An open invite's pre-shared key: whoever holds it can pair as the invitee.
    Secret("invites", "psk", at_once=True),
    # A running transfer's resumable state, content key included: it opens every chunk frame
    # the broker carried.
    Secret("transfers", "snapshot", at_once=True),
    # Message bodies, kept in the clear until delivered (outbox) or taken by the application
    # (inbox). Deleted often, one by one: a scrub per delete would cost a checkpoint per
    # message (scripts/bench erasure), so they leave the files within LAZY_SCRUB_SECONDS.
    Secret("outbox", "data", at_once=False),
    Secret("inbox", "data", at_once=False),
    # A resumption ticket's secret: with a static key it opens the early data of the session
    # it resumes (protocol/SPEC.md 4.7). Replaced at every session, i.e. on the way to a
    # transfer's first byte: a checkpoint there would hold the store's lock on the critical
    # path, so it leaves the files by the lazy bound (its row is deleted at once, which is
    # what refuses a replay).
    Secret("tickets", "secret", at_once=False),
)

ERASED_FUNCTION: Final = "peerd_secret_erased"
# How long a scrub waits for another connection's reader before it reports busy (and the store
# retries later): short, because the store's lock is held meanwhile.
SCRUB_BUSY_MS: Final = 100
SCRUB_RETRY_SECONDS: Final = 1.0
# Lazy secrets are scrubbed by the first commit this long after their erasure; the daemon's
# housekeeping commits every 60 s, so they are gone from every file within about two minutes.
LAZY_SCRUB_SECONDS: Final = 60.0


async def watch_secrets(db: aiosqlite.Connection, on_erased: Callable[[int], None]) -> None:
    """Call `on_erased(at_once)` (in sqlite's thread) for each row whose secret is erased
    (set to NULL) or deleted.

    TEMP triggers live in this connection only: the file's schema does not change, and another
    program opening the file does not need the function.
    """
    await db.create_function(ERASED_FUNCTION, 1, on_erased)
    for secret in SECRET_COLUMNS:
        t, c, urgent = secret.table, secret.column, int(secret.at_once)
        await db.execute(
            f"CREATE TEMP TRIGGER IF NOT EXISTS peerd_erase_{t}_{c} AFTER UPDATE OF {c}"
            f" ON main.{t} WHEN old.{c} IS NOT NULL AND new.{c} IS NULL"
            f" BEGIN SELECT {ERASED_FUNCTION}({urgent}); END"
        )
        await db.execute(
            f"CREATE TEMP TRIGGER IF NOT EXISTS peerd_delete_{t}_{c} AFTER DELETE ON main.{t}"
            f" WHEN old.{c} IS NOT NULL BEGIN SELECT {ERASED_FUNCTION}({urgent}); END"
        )


async def checkpoint_truncate(db: aiosqlite.Connection, *, restore_busy_ms: int) -> bool:
    """Copy the WAL into the main file and cut it to zero bytes; False if a reader prevented it.

    Must run outside a transaction.
    """
    await db.execute(f"PRAGMA busy_timeout = {SCRUB_BUSY_MS}")
    try:
        async with db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
            row = await cursor.fetchone()
    finally:
        await db.execute(f"PRAGMA busy_timeout = {restore_busy_ms}")
    # (busy, frames in the WAL, frames checkpointed): a truncated WAL reports (0, 0, 0).
    return row is not None and row[0] == 0 and row[1] == 0


__all__ = [
    "ERASED_FUNCTION",
    "LAZY_SCRUB_SECONDS",
    "SCRUB_BUSY_MS",
    "SCRUB_RETRY_SECONDS",
    "SECRET_COLUMNS",
    "Secret",
    "checkpoint_truncate",
    "watch_secrets",
]
