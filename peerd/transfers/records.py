"""The transfers' rows in the trust store (table `transfers`, peerd/store/schema.py): every SQL
statement of the transfer code is here.

A row is written when a transfer starts (before anything depends on it), its resumable state
(`snapshot`) after each durable step, and its outcome when it ends; the content key lives only
in the snapshot, which is cleared when the transfer ends.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peerd.store import Store


@dataclass(frozen=True, slots=True)
class ActiveRow:
    """A transfer under way when the daemon stopped, to be resumed."""

    tid: bytes
    role: str  # "send" | "receive"
    peers: list[str]
    name: str
    size: int
    path: str  # the source (send) or the sender's inbox directory (receive)
    temp: str | None
    snapshot: bytes | None
    source_stat: str | None
    deadline: float | None
    created: float


@dataclass(frozen=True, slots=True)
class EndedRow:
    role: str
    peers: list[str]
    name: str
    path: str | None
    state: str
    reason: str | None
    file_hash: bytes | None


class TransferRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add_send(
        self,
        tid: bytes,
        *,
        receivers: list[str],
        name: str,
        size: int,
        path: str,
        source_stat: tuple[int, ...],
        deadline: float | None,
        now: float,
    ) -> None:
        async with self.store.transaction(now) as tx:
            await tx.execute(
                "INSERT INTO transfers (transfer_id, role, peers, name, size, path, state,"
                " source_stat, created_at, updated_at, deadline)"
                " VALUES (?, 'send', ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (
                    tid,
                    json.dumps(receivers),
                    name,
                    size,
                    path,
                    json.dumps(source_stat),
                    now,
                    now,
                    deadline,
                ),
            )

    async def add_receive(
        self,
        tid: bytes,
        *,
        sender: str,
        name: str,
        size: int,
        directory: str,
        temp: str,
        now: float,
    ) -> None:
        async with self.store.transaction(now) as tx:
            await tx.execute(
                "INSERT INTO transfers (transfer_id, role, peers, name, size, path, temp_path,"
                " state, created_at, updated_at) VALUES (?, 'receive', ?, ?, ?, ?, ?, 'active',"
                " ?, ?)",
                (tid, json.dumps([sender]), name, size, directory, temp, now, now),
            )

    async def update(self, tid: bytes, **columns: Any) -> None:
        now = time.time()
        sets = ", ".join(f"{k} = ?" for k in columns)
        async with self.store.transaction(now) as tx:
            await tx.execute(
                f"UPDATE transfers SET {sets}, updated_at = ? WHERE transfer_id = ?",  # noqa: S608 - column names are ours
                (*columns.values(), now, tid),
            )

    async def persist(self, tid: bytes, snapshot: bytes) -> None:
        await self.update(tid, snapshot=snapshot)

    async def active(self) -> list[ActiveRow]:
        rows = await self.store.fetchall(
            "SELECT transfer_id, role, peers, name, size, path, temp_path, snapshot,"
            " source_stat, deadline, created_at FROM transfers WHERE state = 'active'"
        )
        return [
            ActiveRow(tid, role, json.loads(peers), name, size, path, temp, snap, st, dl, created)
            for (tid, role, peers, name, size, path, temp, snap, st, dl, created) in rows
        ]

    async def get(self, tid: bytes) -> EndedRow | None:
        row = await self.store.fetchone(
            "SELECT role, peers, name, path, state, reason, file_hash FROM transfers"
            " WHERE transfer_id = ?",
            (tid,),
        )
        if row is None:
            return None
        role, peers, name, path, state, reason, file_hash = row
        return EndedRow(role, json.loads(peers), name, path, state, reason, file_hash)
