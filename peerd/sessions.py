"""The daemon's session-layer helpers that need none of its state: the trust policy the session
manager asks (over the store's live view), the network PSK file, and which session a
`SessionUp` is."""

from __future__ import annotations

import os
from pathlib import Path

from peerd.errors import DaemonError
from protocol.identity import TrustError
from protocol.identity.trust import Authenticated, TrustView
from protocol.session import SessionUp


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
