"""The trust event log: append-only, each entry chained to the previous one by its hash.

    hash(n) = BLAKE2b-256("peerd/v1/event\\0" || hash(n-1)
                          || msgpack([seq, at, kind, peer, detail]))

with hash(0) = 32 zero bytes, `seq` counting from 1 without gaps, `at` a float64 (Unix
seconds), `peer` a peer id or nil and `detail` canonical JSON text (sorted keys, no spaces,
ASCII). Changing, inserting, deleting or reordering any entry breaks the chain from that entry
on; `verify` names the first entry where it breaks. The store also keeps the head (last seq and
hash) in its meta table, updated in the same transaction, so truncating the tail is detected too.
Triggers refuse UPDATE and DELETE on the table; the chain is what catches someone who drops them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from peerd.errors import PeerdError

GENESIS = bytes(32)
_CONTEXT = b"peerd/v1/event\0"


class StoreError(PeerdError):
    """The trust store cannot be opened, read or written."""

    hint = "check the store file ([node] store) and its directory"


class AuditError(StoreError):
    """The event log's hash chain is broken: the store was tampered with or damaged."""

    hint = "the store was modified outside peerd; restore it from a backup and investigate"

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(f"the event log is broken at entry {seq}: {problem}")
        self.seq = seq
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at: float
    kind: str
    peer_id: str | None
    detail: Mapping[str, Any]
    hash: bytes


@dataclass(frozen=True, slots=True)
class LogReport:
    entries: int
    head: bytes  # the last entry's hash (GENESIS for an empty log)


def canonical_detail(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(
    prev_hash: bytes, seq: int, at: float, kind: str, *, peer_id: str | None, detail: str
) -> bytes:
    body = msgpack.packb([seq, float(at), kind, peer_id, detail], use_bin_type=True)
    return hashlib.blake2b(_CONTEXT + prev_hash + body, digest_size=32).digest()


def verify_entries(
    rows: Iterable[Sequence[Any]],
    *,
    head_seq: int | None,
    head_hash: bytes | None,
) -> LogReport:
    """Check rows (seq, at, kind, peer_id, detail, prev_hash, hash) in seq order."""
    expected_seq = 1
    prev = GENESIS
    for seq, at, kind, peer_id, detail, prev_hash, digest in rows:
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                raise AuditError(expected_seq, "the entry is missing (deleted)")
            raise AuditError(expected_seq, f"unexpected sequence number {seq!r}")
        if not (
            isinstance(at, float)
            and isinstance(kind, str)
            and (peer_id is None or isinstance(peer_id, str))
            and isinstance(detail, str)
            and isinstance(prev_hash, bytes)
            and isinstance(digest, bytes)
        ):
            raise AuditError(seq, "a field has the wrong type")
        if prev_hash != prev:
            raise AuditError(seq, "it does not link to the previous entry")
        if entry_hash(prev, seq, at, kind, peer_id=peer_id, detail=detail) != digest:
            raise AuditError(seq, "its content does not match its hash (modified)")
        prev = digest
        expected_seq += 1
    count = expected_seq - 1
    if head_seq is not None and head_seq != count:
        if head_seq > count:
            raise AuditError(count + 1, f"the log ends early: {head_seq - count} entries deleted")
        raise AuditError(head_seq + 1, "entries appended outside peerd")
    if head_hash is not None and head_hash != prev:
        raise AuditError(count, "the last entry is not the one the store recorded")
    return LogReport(count, prev)


__all__ = [
    "GENESIS",
    "AuditError",
    "Event",
    "LogReport",
    "StoreError",
    "canonical_detail",
    "entry_hash",
    "verify_entries",
]
