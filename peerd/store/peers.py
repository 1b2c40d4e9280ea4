"""The store's trust records: this node's own identity, its peers with their identity chains and
certificates, and revocation statements. Every change is planned by the `TrustView` first (see
`peerd.store.db`), then written and logged in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from peerd.store.core import StoreCore, Transaction
from peerd.store.log import StoreError
from protocol.identity import (
    Authenticated,
    AuthorityRevocation,
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
    parse_fingerprint,
)
from protocol.identity.trust import MAX_SUPERSEDED

MAX_PEER_NAME = 64  # characters of a peer's name kept (display only)


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


class PeerRecords(StoreCore):
    """Own identity, peers, certificates and revocations."""

    def __init__(self, path: Path, db: aiosqlite.Connection, view: TrustView) -> None:
        super().__init__(path, db, view)
        self._identity: OwnIdentity | None = None

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
        self._view.self_identity = own.identity_public

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

    async def peer_names(self) -> dict[str, str]:
        """This node's names for its peers (only those that have one)."""
        rows = await self.fetchall("SELECT peer_id, name FROM peers WHERE name != ''")
        return dict(rows)

    async def name_peer(self, peer_id: str, name: str, *, now: float) -> None:
        """Give a known peer a name (empty: none), recorded in the trust event log."""
        name = " ".join(name.split())[:MAX_PEER_NAME]
        async with self.transaction(now) as tx:
            cursor = await tx.execute(
                "UPDATE peers SET name = ? WHERE peer_id = ?", (name, peer_id)
            )
            if cursor.rowcount != 1:
                raise StoreError(f"{peer_id} is not a known peer", hint="`peerd peers` lists them")
            await tx.log("peer-named", peer_id, {"name": name})

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

    async def record_authenticated(
        self, auth: Authenticated, *, now: float, protocol: str | None = None
    ) -> PeerTrust:
        """Record what a successful handshake showed: first contact, rotation, succession.

        The rules are applied again (the state may have changed since `authenticate`); a
        refusal raises and records nothing. `protocol`, the handshake's Noise protocol name,
        goes into the audit entries the handshake causes.
        """
        async with self.transaction(now) as tx:
            await self._record_auth(tx, auth, protocol)
        return self._peer_after(auth.peer_id)

    async def _record_auth(
        self, tx: Transaction, auth: Authenticated, protocol: str | None = None
    ) -> None:
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
                    **({"protocol": protocol} if protocol else {}),
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
                    **({"protocol": protocol} if protocol else {}),
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

    # -- reading ------------------------------------------------------------------------

    async def certificates(self, peer_id: str) -> list[CertificateRecord]:
        rows = await self._conn().execute_fetchall(
            "SELECT peer_id, serial, static_public, not_before, not_after, status, first_seen,"
            " superseded_at FROM certificates WHERE peer_id = ? ORDER BY serial",
            (peer_id,),
        )
        return [CertificateRecord(*r) for r in rows]


def _value(source: TrustSource | None) -> str | None:
    return None if source is None else source.value


async def load_peers(db: aiosqlite.Connection) -> list[PeerTrust]:
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
