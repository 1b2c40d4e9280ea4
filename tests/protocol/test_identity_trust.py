"""TrustView: every rule of the handshake decision, session overlap, and change planning."""

from __future__ import annotations

import pytest

from protocol.errors import LocalProtocolError
from protocol.identity import (
    Authenticated,
    Blocked,
    Conflict,
    Credentials,
    Expired,
    InviteGrant,
    MalformedObject,
    NotYetValid,
    PeerState,
    Revoked,
    Rollback,
    TrustError,
    TrustSource,
    TrustView,
    UnknownPeer,
    WrongPeer,
    fingerprint,
    issue_authority_revocation,
    issue_certificate,
    issue_revocation,
    new_identity_seed,
)
from protocol.identity._codec import ed25519_public
from tests.protocol.test_identity_helpers import DAY, NOW, Node

OVERLAP = 3600.0


def _view(**kwargs: object) -> TrustView:
    args: dict[str, object] = {"self_peer_id": None, "network": "lab", "overlap": OVERLAP}
    args.update(kwargs)
    return TrustView(**args)  # type: ignore[arg-type]


def _auth(view: TrustView, node: Node, now: float = NOW, **kwargs: object) -> Authenticated:
    return view.authenticate(node.credentials(), node.static.public, now, **kwargs)  # type: ignore[arg-type]


def _trusted(view: TrustView, node: Node, now: float = NOW) -> None:
    """Pair `node` as an invite would, and apply it as the store does after COMMIT."""
    planned = view.plan_authenticated(_auth(view, node, now, allow_unknown=True), now)
    assert planned is not None
    view.put_peer(planned)


def _refused(view: TrustView, node: Node, reason: str, now: float = NOW, **kw: object) -> None:
    with pytest.raises(TrustError) as info:
        _auth(view, node, now, **kw)
    assert info.value.reason == reason, info.value


# -- first contact -----------------------------------------------------------------------------


def test_unknown_peer_is_refused_with_a_hint() -> None:
    with pytest.raises(UnknownPeer) as info:
        _auth(_view(), Node())
    assert info.value.reason == "unknown-peer"
    assert "peerd invite" in info.value.hint


def test_allow_unknown_accepts_as_invite() -> None:
    view, node = _view(), Node()
    auth = _auth(view, node, allow_unknown=True)
    assert auth.peer_id == node.peer_id
    assert auth.source is TrustSource.INVITE
    assert auth.certificate_is_new
    assert auth.state_before is None
    assert auth.fingerprint == fingerprint(node.identity_public)
    assert len(view) == 0  # authenticate changes nothing


def test_trusted_peer_is_accepted_and_nothing_new_to_record() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    auth = _auth(view, node)
    assert not auth.certificate_is_new
    assert auth.state_before is PeerState.TRUSTED
    assert view.plan_authenticated(auth, NOW) is None


def test_static_key_must_be_the_handshake_key() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    with pytest.raises(TrustError) as info:
        view.authenticate(node.credentials(), Node().static.public, NOW)
    assert info.value.reason == "static-mismatch"


def test_expected_peer_and_self() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    with pytest.raises(WrongPeer):
        _auth(view, node, expected_peer=Node().peer_id)
    assert _auth(view, node, expected_peer=node.peer_id).peer_id == node.peer_id
    me = _view(self_peer_id=node.peer_id)
    with pytest.raises(TrustError) as info:
        _auth(me, node, allow_unknown=True)
    assert info.value.reason == "self"


def test_malformed_credentials() -> None:
    view = _view()
    with pytest.raises(MalformedObject):
        view.authenticate(b"\x94\x01", b"\x00" * 32, NOW, allow_unknown=True)
    with pytest.raises(MalformedObject):
        view.authenticate(b"", b"\x00" * 32, NOW, allow_unknown=True)


def test_forged_certificate() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    mallory = Node()
    # Mallory signs a certificate for her static key claiming node's peer id.
    node.static = mallory.static
    node.cert = issue_certificate(
        mallory.seed,
        peer_id=node.peer_id,
        static_public=mallory.static.public,
        serial=99,
        now=NOW,
        lifetime=DAY,
    )
    _refused(view, node, "bad-signature")  # mallory's key does not hash to node's peer id


def test_expired_and_not_yet_valid_certificates() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    with pytest.raises(Expired):
        _auth(view, node, node.cert.not_after)
    node.rotate(NOW + DAY)
    with pytest.raises(NotYetValid):
        _auth(view, node, NOW)


# -- rotation, rollback, overlap ---------------------------------------------------------------


def test_rotation_is_new_and_old_serial_is_rollback() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    old_static, old_cert = node.static, node.cert
    node.rotate(NOW + 10)
    auth = _auth(view, node, NOW + 10)
    assert auth.certificate_is_new
    assert auth.serial == 2
    planned = view.plan_authenticated(auth, NOW + 10)
    assert planned is not None
    view.put_peer(planned)
    assert planned.certificate == node.cert
    assert [s.serial for s in planned.superseded] == [1]
    # The old certificate never authenticates a new handshake again.
    node.static, node.cert = old_static, old_cert
    _refused(view, node, "rollback", NOW + 11)


def test_same_serial_other_content_is_a_conflict() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    node.serial -= 1  # re-issue serial 1 for another static key
    node.rotate(NOW + 5)
    _refused(view, node, "conflict", NOW + 5)


def test_session_overlap_window() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    assert view.check_session(node.peer_id, 1, NOW) == node.cert.not_after
    node.rotate(NOW + 100)
    planned = view.plan_authenticated(_auth(view, node, NOW + 100), NOW + 100)
    assert planned is not None
    view.put_peer(planned)
    # The session on serial 1 may finish within the overlap, counted from when we saw serial 2.
    assert view.check_session(node.peer_id, 1, NOW + 200) == NOW + 100 + OVERLAP
    with pytest.raises(Expired):
        view.check_session(node.peer_id, 1, NOW + 100 + OVERLAP)
    assert view.check_session(node.peer_id, 2, NOW + 100 + OVERLAP) == node.cert.not_after
    with pytest.raises(TrustError) as info:
        view.check_session(node.peer_id, 7, NOW)
    assert info.value.reason == "unknown-certificate"
    with pytest.raises(UnknownPeer):
        view.check_session(Node().peer_id, 1, NOW)


def test_overlap_zero_ends_old_sessions_at_once() -> None:
    view, node = _view(overlap=0), Node()
    _trusted(view, node)
    node.rotate(NOW + 1)
    planned = view.plan_authenticated(_auth(view, node, NOW + 1), NOW + 1)
    assert planned is not None
    view.put_peer(planned)
    with pytest.raises(Expired):
        view.check_session(node.peer_id, 1, NOW + 1)


def test_stale_authentication_of_a_rotated_peer_is_refused() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    node.rotate(NOW + 1)
    stale = _auth(view, node, NOW + 1)  # serial 2, computed before ...
    node.rotate(NOW + 2)
    planned = view.plan_authenticated(_auth(view, node, NOW + 2), NOW + 2)
    assert planned is not None
    view.put_peer(planned)  # ... serial 3 was recorded
    with pytest.raises(Rollback):
        view.plan_authenticated(stale, NOW + 3)


# -- revocation --------------------------------------------------------------------------------


def _apply_revocation(view: TrustView, statement: bytes, now: float = NOW) -> bool:
    plan = view.plan_revocation(statement, now)
    if plan.peer is not None:
        view.put_peer(plan.peer)
    if plan.revoked_through is not None:
        view.put_revoked_through(plan.statement.peer_id, plan.revoked_through)
    return plan.changes


def test_static_revocation_revokes_through_a_serial_and_is_idempotent() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    node.rotate(NOW + 1)
    planned = view.plan_authenticated(_auth(view, node, NOW + 1), NOW + 1)
    assert planned is not None
    view.put_peer(planned)
    statement = issue_revocation(
        node.seed, peer_id=node.peer_id, kind="static", serial=1, now=NOW + 2
    ).encode()
    assert _apply_revocation(view, statement)
    assert not _apply_revocation(view, statement)  # a replay changes nothing
    lower = issue_revocation(
        node.seed, peer_id=node.peer_id, kind="static", serial=1, now=NOW + 3, reason="again"
    ).encode()
    assert not _apply_revocation(view, lower)  # nothing un-revokes, nothing lowers
    assert view.revoked_through(node.peer_id) == 1
    with pytest.raises(Revoked):  # a session on serial 1 ends at once, overlap or not
        view.check_session(node.peer_id, 1, NOW + 3)
    assert view.check_session(node.peer_id, 2, NOW + 3) > NOW  # serial 2 stays good
    _auth(view, node, NOW + 3)


def test_certificate_for_a_revoked_serial_is_refused() -> None:
    view, node = _view(), Node()
    statement = issue_revocation(node.seed, peer_id=node.peer_id, kind="static", serial=5, now=NOW)
    assert _apply_revocation(view, statement.encode())  # learned before ever meeting the peer
    _refused(view, node, "revoked", allow_unknown=True)
    for _ in range(4):
        node.rotate()
    _refused(view, node, "revoked", allow_unknown=True)  # serial 5
    node.rotate()
    assert _auth(view, node, allow_unknown=True).serial == 6


def test_identity_revocation_is_final() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    statement = issue_revocation(node.seed, peer_id=node.peer_id, kind="identity", now=NOW)
    assert _apply_revocation(view, statement.encode())
    record = view.peer(node.peer_id)
    assert record is not None
    assert record.state is PeerState.REVOKED
    _refused(view, node, "revoked")
    _refused(view, node, "revoked", allow_unknown=True)
    node.rotate()
    _refused(view, node, "revoked")
    with pytest.raises(Revoked):
        view.check_session(node.peer_id, 1, NOW)
    for plan in (
        lambda: view.plan_trust(node.peer_id, None, NOW),
        lambda: view.plan_trust(node.peer_id, fingerprint(node.identity_public), NOW),
        lambda: view.plan_pending(
            node.peer_id, fingerprint(node.identity_public), TrustSource.FINGERPRINT, NOW
        ),
    ):
        with pytest.raises(Revoked):
            plan()
    assert view.plan_block(node.peer_id, NOW) is None
    assert not _apply_revocation(view, statement.encode())
    with pytest.raises(LocalProtocolError):
        view.put_peer(record.__class__(node.peer_id, PeerState.TRUSTED))


def test_revocation_by_a_stranger_is_refused() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    mallory = Node()
    forged = issue_revocation(mallory.seed, peer_id=node.peer_id, kind="identity", now=NOW)
    with pytest.raises(TrustError) as info:
        view.plan_revocation(forged.encode(), NOW)
    assert info.value.reason == "unknown-signer"
    # A stranger cannot even claim to be a known key: the signature must verify.
    claimed = type(forged)(
        forged.kind,
        forged.peer_id,
        node.identity_public,
        forged.serial,
        forged.issued_at,
        forged.reason,
        forged.signature,
    )
    with pytest.raises(TrustError) as info:
        view.plan_revocation(claimed.encode(), NOW)
    assert info.value.reason == "bad-signature"


def test_only_the_current_identity_key_revokes_a_succeeded_node() -> None:
    """SPEC 6.8: a succeeded identity key cannot sign for the node any more, revocations
    included. The threat: the node erased its old key when it succeeded, so whoever still holds
    one (a thief, an old backup: often the reason for the succession) could otherwise revoke the
    peer id for good at every verifier - a kill switch - or revoke every future static serial."""
    view, node = _view(), Node()
    first_seed = node.seed
    node.succeed()
    middle_seed = node.seed
    node.succeed()
    _trusted(view, node)
    middle = node.successions[0].new_identity  # neither first nor current
    assert middle not in (node.first_identity, node.identity_public)
    for old_seed in (first_seed, middle_seed):
        for kind, serial in (("identity", 0), ("static", 2**40)):
            stolen = issue_revocation(
                old_seed, peer_id=node.peer_id, kind=kind, serial=serial, now=NOW
            )
            with pytest.raises(TrustError) as info:
                view.plan_revocation(stolen.encode(), NOW)
            assert info.value.reason == "superseded-signer"
    assert view.peer(node.peer_id).state is PeerState.TRUSTED  # type: ignore[union-attr]
    assert view.revoked_through(node.peer_id) == 0
    # The owner, with the current key, can.
    statement = issue_revocation(node.seed, peer_id=node.peer_id, kind="identity", now=NOW)
    assert view.plan_revocation(statement.encode(), NOW).changes
    # An unknown peer's revocation by a successor key cannot be verified yet.
    stranger = Node()
    stranger.succeed()
    late = issue_revocation(stranger.seed, peer_id=stranger.peer_id, kind="identity", now=NOW)
    with pytest.raises(TrustError) as info:
        view.plan_revocation(late.encode(), NOW)
    assert info.value.reason == "unknown-signer"


def test_a_node_refuses_its_own_revocation_by_a_key_it_succeeded() -> None:
    """A node holds no record of itself, so its own first key (which hashes to its id) looked
    like the one key to accept: a thief of it could expel the node. The node checks against its
    own current identity key instead (SPEC 6.8)."""
    node = Node()
    first_seed = node.seed
    node.succeed()
    view = _view()
    view.self_peer_id, view.self_identity = node.peer_id, node.identity_public
    stolen = issue_revocation(first_seed, peer_id=node.peer_id, kind="identity", now=NOW)
    with pytest.raises(TrustError) as info:
        view.plan_revocation(stolen.encode(), NOW)
    assert info.value.reason == "superseded-signer"
    own = issue_revocation(node.seed, peer_id=node.peer_id, kind="identity", now=NOW)
    assert view.plan_revocation(own.encode(), NOW).changes


def test_a_verifier_that_never_saw_the_chain_accepts_the_first_key() -> None:
    """The bound of the rule above, stated as a test: a verifier that has pinned no chain for a
    node knows no key but the one that hashes to its peer id, so it accepts a revocation signed
    by it, even after the node succeeded (SECURITY.md 3.3). Once it pins the chain, it refuses."""
    node = Node()
    first_seed = node.seed
    node.succeed()
    stolen = issue_revocation(first_seed, peer_id=node.peer_id, kind="identity", now=NOW)
    assert _view().plan_revocation(stolen.encode(), NOW).changes
    view = _view()
    _trusted(view, node)
    with pytest.raises(TrustError) as info:
        view.plan_revocation(stolen.encode(), NOW)
    assert info.value.reason == "superseded-signer"


# -- blocked and pending -----------------------------------------------------------------------


def test_blocked_peer_is_refused_whatever_it_presents() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    planned = view.plan_block(node.peer_id, NOW)
    assert planned is not None
    view.put_peer(planned)
    _refused(view, node, "blocked")
    _refused(view, node, "blocked", allow_unknown=True)
    with pytest.raises(Blocked):
        view.check_session(node.peer_id, 1, NOW)
    unblocked = view.plan_trust(node.peer_id, None, NOW)
    assert unblocked is not None
    assert unblocked.state is PeerState.TRUSTED
    view.put_peer(unblocked)
    _auth(view, node)


def test_pending_by_fingerprint() -> None:
    view, node = _view(), Node()
    planned = view.plan_trust(node.peer_id, fingerprint(node.identity_public), NOW)
    assert planned is not None
    assert planned.state is PeerState.PENDING
    view.put_peer(planned)
    auth = _auth(view, node)
    assert auth.source is TrustSource.FINGERPRINT
    assert auth.state_before is PeerState.PENDING
    after = view.plan_authenticated(auth, NOW)
    assert after is not None
    assert after.state is PeerState.TRUSTED
    assert after.expected_fingerprint is None


def test_pending_with_another_fingerprint_is_an_impersonation() -> None:
    view, node = _view(), Node()
    planned = view.plan_pending(
        node.peer_id, fingerprint(Node().identity_public), TrustSource.FINGERPRINT, NOW
    )
    assert planned is not None
    view.put_peer(planned)
    _refused(view, node, "fingerprint-mismatch")
    _refused(view, node, "fingerprint-mismatch", allow_unknown=True)


def test_plan_trust_rules() -> None:
    view, node = _view(), Node()
    with pytest.raises(UnknownPeer):
        view.plan_trust(node.peer_id, None, NOW)
    _trusted(view, node)
    assert view.plan_trust(node.peer_id, None, NOW) is None
    assert view.plan_trust(node.peer_id, fingerprint(node.identity_public), NOW) is None
    with pytest.raises(Conflict):
        view.plan_trust(node.peer_id, fingerprint(Node().identity_public), NOW)
    with pytest.raises(Conflict):
        view.plan_pending(
            node.peer_id, fingerprint(Node().identity_public), TrustSource.INVITE, NOW
        )


def test_block_before_ever_seen_then_trust_by_fingerprint() -> None:
    view, node = _view(), Node()
    blocked = view.plan_block(node.peer_id, NOW)
    assert blocked is not None
    view.put_peer(blocked)
    _refused(view, node, "blocked", allow_unknown=True)
    with pytest.raises(Blocked):
        view.plan_pending(node.peer_id, fingerprint(node.identity_public), TrustSource.INVITE, NOW)
    pending = view.plan_trust(node.peer_id, fingerprint(node.identity_public), NOW)
    assert pending is not None
    assert pending.state is PeerState.PENDING
    view.put_peer(pending)
    assert _auth(view, node).source is TrustSource.FINGERPRINT


# -- identity succession -----------------------------------------------------------------------


def test_succession_keeps_the_peer_id_and_pins_the_new_key() -> None:
    view, node = _view(), Node()
    _trusted(view, node)
    first = node.identity_public
    old_creds = (node.successions, node.cert, node.static)
    node.succeed(NOW + 10)
    auth = _auth(view, node, NOW + 10)
    assert auth.peer_id == node.peer_id
    assert auth.identities == (first, node.identity_public)
    planned = view.plan_authenticated(auth, NOW + 10)
    assert planned is not None
    view.put_peer(planned)
    assert planned.fingerprint == fingerprint(node.identity_public)
    # Back to the succeeded identity key: refused even with a fresh certificate of it.
    node.successions, node.cert, node.static = old_creds
    _refused(view, node, "superseded-identity", NOW + 11)


def test_superseded_identity_cannot_sign_new_certificates() -> None:
    view, node = _view(), Node()
    old_seed = node.seed
    node.succeed()
    _trusted(view, node)
    # The thief of the old identity key issues a high serial without the chain.
    thief = Node(seed=old_seed)
    thief.serial = 50
    thief.rotate()
    _refused(view, thief, "superseded-identity")


def test_forked_chain_is_a_conflict() -> None:
    view, node = _view(), Node()
    fork = Node(seed=node.seed)
    node.succeed()
    _trusted(view, node)
    fork.succeed()  # the same first key hands over to another key
    fork.serial = node.serial + 5
    fork.rotate()
    _refused(view, fork, "conflict")


# -- authority mode ----------------------------------------------------------------------------


@pytest.fixture
def authority() -> bytes:
    return new_identity_seed()


def test_member_is_trusted_without_pairing(authority: bytes) -> None:
    view, node = _view(authority_key=ed25519_public(authority)), Node()
    node.join_authority(authority, "lab")
    auth = _auth(view, node)
    assert auth.source is TrustSource.AUTHORITY
    planned = view.plan_authenticated(auth, NOW)
    assert planned is not None
    view.put_peer(planned)
    assert planned.membership == node.membership
    # The session ends when the membership does.
    assert view.check_session(node.peer_id, 1, NOW) == min(
        node.cert.not_after,
        node.membership.not_after,  # type: ignore[union-attr]
    )


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("no-authority-configured", "unknown-peer"),
        ("no-membership", "unknown-peer"),
        ("other-authority", "wrong-authority"),
        ("other-network", "wrong-network"),
        ("other-peer", "membership-mismatch"),
        ("expired", "expired"),
        ("forged", "bad-signature"),
    ],
)
def test_membership_checks(authority: bytes, setup: str, reason: str) -> None:
    key = None if setup == "no-authority-configured" else ed25519_public(authority)
    view, node = _view(authority_key=key), Node()
    if setup == "other-authority":
        node.join_authority(new_identity_seed(), "lab")
    elif setup == "other-network":
        node.join_authority(authority, "elsewhere")
    elif setup == "other-peer":
        other = Node()
        node.membership = other.join_authority(authority, "lab")
    elif setup == "expired":
        node.join_authority(authority, "lab", now=NOW - 2 * DAY, lifetime=DAY)
    elif setup == "forged":
        m = node.join_authority(authority, "lab")
        node.membership = type(m)(
            m.network,
            m.peer_id,
            m.identity_public,
            m.authority_public,
            m.not_before,
            m.not_after + 1,
            m.signature,
        )
    elif setup != "no-membership":
        node.join_authority(authority, "lab")
    _refused(view, node, reason)


def test_authority_trusted_peer_needs_a_valid_membership_each_time(authority: bytes) -> None:
    view, node = _view(authority_key=ed25519_public(authority)), Node()
    node.join_authority(authority, "lab", lifetime=DAY)
    planned = view.plan_authenticated(_auth(view, node), NOW)
    assert planned is not None
    view.put_peer(planned)
    with pytest.raises(Expired):
        _auth(view, node, NOW + DAY)  # the certificate is still valid; the membership is not
    node.join_authority(authority, "lab", now=NOW + DAY)
    _auth(view, node, NOW + DAY)


def test_authority_revocation(authority: bytes) -> None:
    view, node = _view(authority_key=ed25519_public(authority)), Node()
    node.join_authority(authority, "lab")
    planned = view.plan_authenticated(_auth(view, node), NOW)
    assert planned is not None
    view.put_peer(planned)
    statement = issue_authority_revocation(
        authority, network="lab", peer_id=node.peer_id, now=NOW
    ).encode()
    assert _apply_revocation(view, statement)
    _refused(view, node, "revoked")
    assert not _apply_revocation(view, statement)


@pytest.mark.parametrize("case", ["none-configured", "other-authority", "other-network"])
def test_authority_revocation_from_the_wrong_source(authority: bytes, case: str) -> None:
    key = None if case == "none-configured" else ed25519_public(authority)
    view, node = _view(authority_key=key), Node()
    signer = new_identity_seed() if case == "other-authority" else authority
    network = "other" if case == "other-network" else "lab"
    statement = issue_authority_revocation(signer, network=network, peer_id=node.peer_id, now=NOW)
    with pytest.raises(TrustError):
        view.plan_revocation(statement.encode(), NOW)
    assert view.peer(node.peer_id) is None


# -- invites -----------------------------------------------------------------------------------


def test_invite_psk_lookup() -> None:
    view = _view()
    grant = InviteGrant(b"i" * 16, b"k" * 32, int(NOW) + 60)
    view.put_invite(grant)
    assert view.invite_psk(b"i" * 16, NOW) == b"k" * 32
    with pytest.raises(Expired):
        view.invite_psk(b"i" * 16, NOW + 60)
    with pytest.raises(TrustError) as info:
        view.invite_psk(b"j" * 16, NOW)
    assert info.value.reason == "unknown-invite"
    view.drop_invite(b"i" * 16)
    with pytest.raises(TrustError):
        view.invite_psk(b"i" * 16, NOW)
    assert "k" * 32 not in repr(grant)


def test_credentials_verify_is_independent_of_trust() -> None:
    node = Node()
    keys = Credentials.decode(node.credentials()).verify(NOW)
    assert keys == (node.identity_public,)


def test_could_accept_before_any_cryptography(authority: bytes) -> None:
    view, node, stranger = _view(), Node(), Node()
    assert not view.could_accept(stranger.peer_id)
    _trusted(view, node)
    assert view.could_accept(node.peer_id)
    pending = Node()
    planned = view.plan_trust(pending.peer_id, fingerprint(pending.identity_public), NOW)
    assert planned is not None
    view.put_peer(planned)
    assert view.could_accept(pending.peer_id)
    blocked = view.plan_block(node.peer_id, NOW)
    assert blocked is not None
    view.put_peer(blocked)
    assert not view.could_accept(node.peer_id)
    view.configure(overlap=OVERLAP, authority_key=ed25519_public(authority))
    assert view.could_accept(stranger.peer_id)  # may be a member
    assert not view.could_accept(node.peer_id)
