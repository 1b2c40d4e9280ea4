"""The trust store (aiosqlite): peers, certificates, revocations, invites, the event log.

`Store` is in `peerd.store.db`, assembled from its records by concern: `peerd.store.core`
(connection, transactions, erasure), `peerd.store.peers` (own identity, peers, certificates,
revocations), `peerd.store.invites`. The schema and its migrations are in `peerd.store.schema`,
the hash-chained event log in `peerd.store.log`.
"""

from __future__ import annotations

from peerd.config import Config
from peerd.store.db import (
    CertificateRecord,
    CorruptStore,
    InviteRecord,
    NotAStore,
    OwnIdentity,
    Store,
    StoreVersionError,
    Transaction,
)
from peerd.store.log import AuditError, Event, LogReport, StoreError
from peerd.store.schema import MIGRATIONS, migration


async def open_store(config: Config, *, create: bool = False) -> Store:
    """The store named by the configuration, with its network, overlap and authority key."""
    return await Store.open(
        config.node.store,
        network=config.node.network,
        overlap=config.keys.overlap_seconds,
        authority_key=config.network.authority_public,
        create=create,
    )


__all__ = [
    "MIGRATIONS",
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
    "migration",
    "open_store",
]
