"""Erasing secrets for real: no file of the state directory keeps a secret once its row let go.

The store holds two kinds of secret in sqlite pages (`SECRET_COLUMNS`): a transfer's content key
(inside `transfers.snapshot`, while the transfer runs) and an open invite's PSK
(`invites.psk`). Setting such a column to NULL is not enough. `secure_delete` zeroes the freed
bytes in the new image of the page, but in WAL mode that image is appended to `-wal`: every
earlier image of the page - each snapshot ever persisted, the PSK's insert - stays in the WAL
file until a later frame happens to overwrite it, and a checkpoint copies pages to the main file
without shortening the WAL. A copy of the state directory then yields the key (this is how an
outside review decrypted recorded chunk frames after a "verified, key erased" transfer).

So every statement that erases a secret is noticed by a TEMP trigger (it calls a function the
store registers; a caller cannot forget to announce an erasure, whatever module wrote the SQL),
and after that transaction commits the store runs `PRAGMA wal_checkpoint(TRUNCATE)`: the zeroed
page images go into the main file and the WAL is cut to zero bytes. `-shm` holds only the WAL
index (page numbers and checksums), never page content; no rollback journal exists in WAL mode;
`temp_store = MEMORY` keeps sqlite's temporary files (sorts, statement journals) off disk.

The checkpoint cannot finish while another connection (the CLI, an operator's `sqlite3`, a
backup tool) holds a read transaction on the WAL; sqlite then reports it busy. The store never
takes that as done: it keeps `scrub_pending`, counts the failure, logs once, and retries after
the next transaction (at most every `SCRUB_RETRY_SECONDS`), at open and at close. A crash (even
SIGKILL) between the erasing commit and the checkpoint leaves the old frames in the WAL: the
next open of the store scrubs before anything else.

Below the file level nothing is promised: a filesystem may keep old blocks (copy-on-write,
journalling data, snapshots), an SSD remaps writes, and a backup taken while a secret was live
holds it. Full-disk encryption covers that; see docs/SECURITY.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import aiosqlite

# (table, column): every column that ever holds a secret. A new one belongs here, in the same
# commit as the migration that adds it (tests/peerd/test_store_erasure.py checks the schema).
SECRET_COLUMNS: Final = (
    ("invites", "psk"),  # an open invite's pre-shared key
    ("transfers", "snapshot"),  # a running transfer's resumable state, content key included
)

ERASED_FUNCTION: Final = "peerd_secret_erased"
# How long a scrub waits for another connection's reader before it reports busy (and the store
# retries later): short, because the store's lock is held meanwhile.
SCRUB_BUSY_MS: Final = 100
SCRUB_RETRY_SECONDS: Final = 1.0


async def watch_secrets(db: aiosqlite.Connection, on_erased: Callable[[], None]) -> None:
    """Call `on_erased()` (in sqlite's thread) for each row whose secret is erased or deleted.

    TEMP triggers live in this connection only: the file's schema does not change, and another
    program opening the file does not need the function.
    """
    await db.create_function(ERASED_FUNCTION, 0, on_erased)
    for table, column in SECRET_COLUMNS:
        await db.execute(
            f"CREATE TEMP TRIGGER IF NOT EXISTS peerd_erase_{table}_{column}"
            f" AFTER UPDATE OF {column} ON main.{table}"
            f" WHEN old.{column} IS NOT NULL AND new.{column} IS NULL"
            f" BEGIN SELECT {ERASED_FUNCTION}(); END"
        )
        await db.execute(
            f"CREATE TEMP TRIGGER IF NOT EXISTS peerd_delete_{table}_{column}"
            f" AFTER DELETE ON main.{table} WHEN old.{column} IS NOT NULL"
            f" BEGIN SELECT {ERASED_FUNCTION}(); END"
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
    "SCRUB_BUSY_MS",
    "SCRUB_RETRY_SECONDS",
    "SECRET_COLUMNS",
    "checkpoint_truncate",
    "watch_secrets",
]
