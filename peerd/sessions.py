"""The daemon's session-layer helpers that need none of its state: the trust policy the session
manager asks (over the store's live view), the resumption tickets' rows in the store, the
network PSK file, and which session a `SessionUp` is."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from peerd.errors import DaemonError
from protocol.identity import TrustError
from protocol.identity.trust import Authenticated, TrustView
from protocol.resumption import Ticket
from protocol.session import SessionUp, TicketIssued, TicketSpent

if TYPE_CHECKING:
    from peerd.store import Store

Work = Callable[[], Awaitable[None]]


class SessionTrust:
    """The session layer's trust policy over the store's live view."""

    def __init__(self, view: TrustView) -> None:
        self.view = view

    def authenticate(
        self,
        credentials: bytes,
        remote_static: bytes,
        now: float,
        *,
        expected_peer: str | None = None,
        allow_unknown: bool = False,
    ) -> Authenticated:
        return self.view.authenticate(
            credentials,
            remote_static,
            now,
            expected_peer=expected_peer,
            allow_unknown=allow_unknown,
        )

    def refuse_hello(self, peer_id: str) -> str | None:
        if self.view.could_accept(peer_id):
            return None
        record = self.view.peer(peer_id)
        return "unknown-peer" if record is None else record.state.value

    def invite_psk(self, invite_id: bytes, now: float) -> bytes | None:
        try:
            return self.view.invite_psk(invite_id, now)
        except TrustError:
            return None

    def closed_invite(self, invite_id: bytes) -> str | None:
        return self.view.closed_invite(invite_id)


class TicketKeeper:
    """The session manager's resumption tickets in the store (table `tickets`), so that a known
    peer resumes in one round trip after a restart too (SPEC.md 4.7).

    The manager announces each ticket issued and each ticket spent (used, refused, replaced,
    expired); `note` collects them in order and `flush` writes them in one transaction. The
    shell runs `flush` in the urgent lane: a spent ticket left in the store would be accepted
    again after a restart (a replayed RESUME; SECURITY.md 3.3 says what that can do)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[TicketIssued | TicketSpent] = []
        self._scheduled = False
        self.not_scheduled = 0  # the urgent lane was at its hard cap: tried again next time

    async def load(self) -> list[Ticket]:
        rows = await self.store.fetchall(
            "SELECT peer_id, initiator, ticket_id, secret, local_static, peer_static, expires_at"
            " FROM tickets"
        )
        return [
            Ticket(peer, bool(init), tid, secret, local, remote, expires)
            for (peer, init, tid, secret, local, remote, expires) in rows
        ]

    def note(self, out: TicketIssued | TicketSpent, urgent: Callable[[Work], bool]) -> None:
        """Collect one change and make sure a flush is scheduled in the `urgent` lane."""
        self._pending.append(out)
        if not self._scheduled:
            self._scheduled = urgent(self.flush)
            self.not_scheduled += not self._scheduled

    async def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        async with self.store.transaction(time.time()) as tx:
            for out in pending:
                t = out.ticket
                # DELETE then INSERT, not INSERT OR REPLACE: the erasure trigger sees a DELETE.
                if isinstance(out, TicketSpent):
                    await tx.execute("DELETE FROM tickets WHERE ticket_id = ?", (t.ticket_id,))
                    continue
                await tx.execute(
                    "DELETE FROM tickets WHERE ticket_id = ? OR (peer_id = ? AND initiator = ?)",
                    (t.ticket_id, t.peer_id, int(t.initiator)),
                )
                await tx.execute(
                    "INSERT INTO tickets (peer_id, initiator, ticket_id, secret,"
                    " local_static, peer_static, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        t.peer_id,
                        int(t.initiator),
                        t.ticket_id,
                        t.secret,
                        t.local_static,
                        t.peer_static,
                        t.expires,
                    ),
                )


def read_psk(path: os.PathLike[str] | str) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DaemonError(f"cannot read the network PSK file {path}: {exc}") from exc
    text = raw.strip()
    try:
        psk = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else raw
    except (UnicodeDecodeError, ValueError):
        psk = raw
    if len(psk) != 32:
        raise DaemonError(
            f"the network PSK file {path} must hold 32 bytes (or 64 hex digits)",
            hint="create one with: head -c 32 /dev/urandom > network.psk",
        )
    return psk


def local_key(up: SessionUp) -> tuple[str, int]:
    """(peer, this node's index) of the session `up` announces."""
    return up.peer_id, up.session_id[0] if up.initiator else up.session_id[1]
