"""The store's invites: one-time tokens whose PSK is kept only while the invite is open.

The PSK is a secret: using or expiring an invite sets it to NULL, and the store then scrubs the
file (see `peerd.store.core`), so no file of the state directory keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.store.log import StoreError
from peerd.store.peers import PeerRecords
from protocol.identity import (
    Authenticated,
    InviteGrant,
    InviteToken,
    PeerTrust,
    TrustError,
    new_invite,
)
from protocol.identity.trust import MAX_INVITES


@dataclass(frozen=True, slots=True)
class InviteRecord:
    invite_id: bytes
    state: str  # open, used, expired
    created_at: float
    expires_at: int
    closed_at: float | None
    used_by: str | None
    note: str


class InviteRecords(PeerRecords):
    """Invites: created, used once, or expired."""

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
        self, invite_id: bytes, auth: Authenticated, *, now: float, protocol: str | None = None
    ) -> PeerTrust:
        """Use an invite once and trust the peer it admitted, in one transaction.

        `auth` comes from `authenticate(..., allow_unknown=True)` on the XXpsk3 handshake that
        used this invite's PSK. A used, expired or unknown invite raises and changes nothing,
        except for the peer that used it: on a slow path the joiner's retry can complete after
        its first attempt did (both read the PSK while the invite was open), and that second
        session of the same peer is recorded as any other session of it, not refused (refusing
        it closed the first session too, and the joiner saw its pairing fail as "invite
        used").
        """
        invite_id = bytes(invite_id)
        async with self.transaction(now) as tx:
            row = await tx.fetchone(
                "SELECT state, expires_at, used_by FROM invites WHERE invite_id = ?", (invite_id,)
            )
            if row is None:
                raise TrustError("no such invite", reason="unknown-invite")
            if row[0] == "used" and row[2] == auth.peer_id:
                await self._record_auth(tx, auth, protocol)
                return self._peer_after(auth.peer_id)
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
            detail = {"invite": invite_id.hex(), **({"protocol": protocol} if protocol else {})}
            await tx.log("invite-used", auth.peer_id, detail)
            await self._record_auth(tx, auth, protocol)
            # The invite's note ("for bob") names the peer here, unless it already has a name.
            await tx.execute(
                "UPDATE peers SET name = (SELECT note FROM invites WHERE invite_id = ?)"
                " WHERE peer_id = ? AND name = ''",
                (invite_id, auth.peer_id),
            )
            tx.after_commit(lambda: self._view.drop_invite(invite_id, "used"))
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
            self._view.drop_invite(invite_id, "expired")

    async def invites(self) -> list[InviteRecord]:
        rows = await self._conn().execute_fetchall(
            "SELECT invite_id, state, created_at, expires_at, closed_at, used_by, note"
            " FROM invites ORDER BY created_at"
        )
        return [InviteRecord(*r) for r in rows]
