"""Why a peer cannot be sent to: one refusal, in words a person can act on, shared by
`peerd send` (files) and `peerd msg send` (messages)."""

from __future__ import annotations

from datetime import UTC, datetime

from protocol.identity import TrustError
from protocol.identity.trust import PeerState, TrustView


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def check_receiver(view: TrustView, peer: str, *, trusted_only: bool) -> None:
    """Raise `TrustError` if nothing may go to `peer`: this node itself, a revoked or blocked
    peer, or one never paired. `trusted_only` (files) also refuses a pending peer; messages
    may queue for one (they wait in the outbox until its first handshake)."""
    if peer == view.self_peer_id:
        raise TrustError(
            f"{peer} is this node's own id; nothing is sent to oneself",
            reason="self",
            hint="name a peer (`peerd peers` lists them)",
        )
    record = view.peer(peer)
    if record is not None and record.state is PeerState.REVOKED:
        raise TrustError(
            f"{peer} was revoked on {_when(record.updated_at)}; its keys are refused for good",
            reason="revoked",
            hint="if its owner made a new node, pair with that one (peerd invite / peerd join)",
        )
    if record is not None and record.state is PeerState.BLOCKED:
        raise TrustError(
            f"{peer} is blocked on this node",
            reason="blocked",
            hint=f"`peerd trust {peer}` lifts the block",
        )
    if record is None:
        if view.could_accept(peer):
            return  # with an authority: a member, met at its first handshake
    elif record.state is PeerState.TRUSTED or (
        record.state is PeerState.PENDING and not trusted_only
    ):
        return
    state = "unknown" if record is None else f"{record.state.value}, not trusted yet"
    raise TrustError(
        f"peer {peer} is {state}; only trusted peers are sent to",
        reason="not-trusted",
        hint="pair with it first (peerd invite / peerd join)",
    )


__all__ = ["check_receiver"]
