"""The verified-credentials cache of TrustView saves signature checks, never a rule."""

from __future__ import annotations

import pytest

from protocol.identity import (
    BadSignature,
    Credentials,
    Expired,
    Revoked,
    issue_certificate,
    issue_revocation,
    new_identity_seed,
    peer_id_for,
)
from protocol.identity._codec import ed25519_public
from protocol.identity.objects import REVOKE_IDENTITY
from protocol.identity.trust import PeerState, PeerTrust, TrustSource, TrustView
from protocol.noise import KeyPair

NOW = 1_800_000_000.0
DAY = 86400


def _peer() -> tuple[bytes, str, KeyPair, bytes]:
    seed = new_identity_seed()
    pid = peer_id_for(ed25519_public(seed))
    static = KeyPair.generate()
    cert = issue_certificate(
        seed, peer_id=pid, static_public=static.public, serial=1, now=NOW, lifetime=30 * DAY
    )
    return seed, pid, static, Credentials((), cert).encode()


def _view(pid: str, identity: bytes) -> TrustView:
    view = TrustView(self_peer_id=None, network="net", overlap=3600)
    view.put_peer(PeerTrust(pid, PeerState.TRUSTED, TrustSource.INVITE, identities=(identity,)))
    return view


def test_validity_is_checked_every_time_even_when_cached() -> None:
    seed, pid, static, creds = _peer()
    view = _view(pid, ed25519_public(seed))
    assert view.authenticate(creds, static.public, NOW + 10).peer_id == pid
    with pytest.raises(Expired):
        view.authenticate(creds, static.public, NOW + 31 * DAY)


def test_trust_rules_are_applied_every_time_even_when_cached() -> None:
    seed, pid, static, creds = _peer()
    view = _view(pid, ed25519_public(seed))
    view.authenticate(creds, static.public, NOW + 10)
    statement = issue_revocation(seed, peer_id=pid, kind=REVOKE_IDENTITY, now=NOW + 20)
    plan = view.plan_revocation(statement.encode(), NOW + 20)
    assert plan.peer is not None
    view.put_peer(plan.peer)
    with pytest.raises(Revoked):
        view.authenticate(creds, static.public, NOW + 30)


def test_a_forgery_is_never_cached() -> None:
    seed, pid, static, creds = _peer()
    view = _view(pid, ed25519_public(seed))
    forged = bytearray(creds)
    forged[-10] ^= 1  # inside the certificate's signature
    for _ in range(2):
        with pytest.raises(BadSignature):
            view.authenticate(bytes(forged), static.public, NOW + 10)
    assert view.authenticate(creds, static.public, NOW + 10).peer_id == pid


def test_revocations_of_never_met_peers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone can mint identities and retain their self-revocations: beyond the bound they are
    refused with a reason, and peers already met are never affected."""
    import protocol.identity.trust as trust_module  # noqa: PLC0415
    from protocol.identity import TrustError  # noqa: PLC0415

    monkeypatch.setattr(trust_module, "MAX_UNMET_REVOCATIONS", 3)
    seed, pid, static, creds = _peer()
    view = _view(pid, ed25519_public(seed))
    for _ in range(3):
        junk_seed, junk_pid, _, _ = _peer()
        statement = issue_revocation(junk_seed, peer_id=junk_pid, kind=REVOKE_IDENTITY, now=NOW)
        plan = view.plan_revocation(statement.encode(), NOW)
        assert plan.peer is not None
        view.put_peer(plan.peer)
    junk_seed, junk_pid, _, _ = _peer()
    statement = issue_revocation(junk_seed, peer_id=junk_pid, kind=REVOKE_IDENTITY, now=NOW)
    with pytest.raises(TrustError) as info:
        view.plan_revocation(statement.encode(), NOW)
    assert info.value.reason == "unmet-revocations-full"
    # The peer we know can still be revoked: the bound is only for strangers.
    real = issue_revocation(seed, peer_id=pid, kind=REVOKE_IDENTITY, now=NOW)
    plan = view.plan_revocation(real.encode(), NOW)
    assert plan.peer is not None
    view.put_peer(plan.peer)
    with pytest.raises(Revoked):
        view.authenticate(creds, static.public, NOW + 10)
