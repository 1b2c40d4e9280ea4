"""The authority's key directory, the text forms people paste, and the identity operations on a
node's real key files and real sqlite store (without a daemon)."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.pwhash
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.authority import (
    MEMBERSHIP_TEXT,
    REQUEST_TEXT,
    STATEMENT_TEXT,
    AuthorityError,
    AuthorityKey,
    MembershipError,
    MembershipRequest,
    check_membership,
    install_membership,
    membership_from_text,
    membership_to_text,
    request_for,
    retire_identity,
    statement_from_text,
    statement_to_text,
    succeed_identity,
)
from peerd.errors import PeerdError
from peerd.keystore import (
    IdentityRevoked,
    Keystore,
    WrongPassphrase,
    read_membership,
    read_retirement,
)
from peerd.store import Store
from protocol.identity import (
    AuthorityRevocation,
    InvalidText,
    Membership,
    TrustError,
    TrustView,
    decode_statement,
    fingerprint,
    format_authority_key,
    issue_membership,
    parse_authority_key,
)
from protocol.identity._codec import ALPHABET

NOW = 1_750_000_000.0
DAY = 86400
FAST = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)
NETWORK = "lab"


@pytest.fixture
def authority(tmp_path: Path) -> AuthorityKey:
    return AuthorityKey.create(tmp_path / "authority")


@pytest.fixture
def keys(tmp_path: Path) -> Keystore:
    return Keystore.create(tmp_path / "keys", now=NOW, certificate_days=30)


@pytest.fixture
async def store(tmp_path: Path, keys: Keystore) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "peerd.db", network=NETWORK, overlap=3600, create=True)
    try:
        await s.init_identity(
            peer_id=keys.peer_id,
            name="me",
            identity_public=keys.identity_public,
            certificate=keys.certificate,
            now=NOW,
        )
        yield s
    finally:
        await s.close()


def _request(keys: Keystore, network: str = NETWORK) -> MembershipRequest:
    return MembershipRequest(network, keys.peer_id, keys.identity_public)


# -- text forms ------------------------------------------------------------------------------


def test_text_forms_round_trip(authority: AuthorityKey, keys: Keystore) -> None:
    request = _request(keys)
    text = request.to_text()
    assert text.startswith("peerd-member-request-1-")
    assert MembershipRequest.from_text(text) == request
    assert MembershipRequest.from_text(f"  {text.upper()}\n") == request  # as pasted
    membership, _ = authority.issue(request, days=30, now=NOW)
    mtext = membership_to_text(membership)
    assert mtext.startswith("peerd-membership-1-")
    assert membership_from_text(mtext) == membership
    statement, _ = authority.revoke(network=NETWORK, peer_id=keys.peer_id, reason="x", now=NOW)
    stext = statement_to_text(statement.encode())
    assert stext.startswith("peerd-revocation-1-")
    assert statement_from_text(stext) == statement.encode()
    own = keys.revoke_identity(NOW, reason="gone").encode()
    assert decode_statement(statement_from_text(statement_to_text(own))).peer_id == keys.peer_id


@given(position=st.integers(min_value=0), symbol=st.sampled_from(ALPHABET))
def test_any_changed_symbol_is_reported_never_misread(position: int, symbol: str) -> None:
    request = MembershipRequest(NETWORK, "x8gbjhzgqjrdsnftppjh", bytes(range(32)))
    text = request.to_text()
    body_start = len("peerd-member-request-1-")
    i = body_start + position % (len(text) - body_start)
    if text[i] == symbol:
        return
    damaged = text[:i] + symbol + text[i + 1 :]
    with pytest.raises(InvalidText):
        MembershipRequest.from_text(damaged)


def test_text_forms_are_not_confused(authority: AuthorityKey, keys: Keystore) -> None:
    request_text = _request(keys).to_text()
    with pytest.raises(InvalidText, match="not a membership certificate"):
        membership_from_text(request_text)
    with pytest.raises(InvalidText, match="not a revocation statement"):
        statement_from_text(request_text)
    # A payload carried under another kind's prefix fails its checksum (distinct contexts).
    payload = REQUEST_TEXT.decode(request_text)
    forged = MEMBERSHIP_TEXT.prefix + request_text[len(REQUEST_TEXT.prefix) :]
    with pytest.raises(InvalidText, match="checksum"):
        membership_from_text(forged)
    # A well-formed text of the right kind whose payload is not that object.
    with pytest.raises(InvalidText, match="invalid"):
        membership_from_text(MEMBERSHIP_TEXT.encode(payload))
    with pytest.raises(InvalidText, match="invalid"):
        statement_from_text(STATEMENT_TEXT.encode(payload))


def test_a_text_of_another_version_names_it(keys: Keystore) -> None:
    text = _request(keys).to_text().replace("-request-1-", "-request-2-", 1)
    with pytest.raises(InvalidText, match="version 2"):
        MembershipRequest.from_text(text)
    with pytest.raises(InvalidText, match="truncated"):
        MembershipRequest.from_text("peerd-member-request-1-00")
    with pytest.raises(InvalidText, match="too long"):
        MembershipRequest.from_text("peerd-member-request-1-" + "0" * 5000)


@pytest.mark.parametrize(
    "fields",
    [
        [1, "Lab", "x8gbjhzgqjrdsnftppjh", bytes(32)],  # network: lowercase only
        [1, "lab", "x8gbjhzgqjrdsnftppjj", bytes(32)],  # peer id: bad check symbols
        [1, "lab", "x8gbjhzgqjrdsnftppjh", bytes(31)],
        [2, "lab", "x8gbjhzgqjrdsnftppjh", bytes(32)],
    ],
)
def test_a_bad_request_is_refused(fields: list[object]) -> None:
    from protocol.identity._codec import pack  # noqa: PLC0415

    with pytest.raises(InvalidText):
        MembershipRequest.from_text(REQUEST_TEXT.encode(pack(fields)))


# -- the authority's key directory -------------------------------------------------------------


def test_authority_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    key = AuthorityKey.create(tmp_path / "a")
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "authority.key").stat().st_mode) == 0o600
    assert parse_authority_key(key.key_text) == key.public
    assert AuthorityKey.read_public(tmp_path / "a") == (key.public, False)
    assert AuthorityKey.load(tmp_path / "a").public == key.public
    before = (tmp_path / "a" / "authority.key").read_bytes()
    with pytest.raises(AuthorityError, match="already exists"):
        AuthorityKey.create(tmp_path / "a")
    assert (tmp_path / "a" / "authority.key").read_bytes() == before
    with pytest.raises(AuthorityError, match="no authority key"):
        AuthorityKey.load(tmp_path / "elsewhere")


def test_an_authority_dir_readable_by_others_is_refused(tmp_path: Path) -> None:
    AuthorityKey.create(tmp_path / "a")
    os.chmod(tmp_path / "a", 0o755)
    with pytest.raises(AuthorityError, match="accessible to other users"):
        AuthorityKey.load(tmp_path / "a")
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(AuthorityError, match="accessible to other users"):
        AuthorityKey.create(tmp_path / "open")
    assert not (tmp_path / "open" / "authority.key").exists()


def test_a_sealed_authority_key_needs_its_passphrase(tmp_path: Path) -> None:
    key = AuthorityKey.create(tmp_path / "a", passphrase=b"correct horse", seal_limits=FAST)
    raw = (tmp_path / "a" / "authority.key").read_bytes()
    assert key._seed not in raw  # the private key is not on disk in the clear
    assert AuthorityKey.read_public(tmp_path / "a") == (key.public, True)
    with pytest.raises(WrongPassphrase):
        AuthorityKey.load(tmp_path / "a")
    with pytest.raises(WrongPassphrase):
        AuthorityKey.load(tmp_path / "a", passphrase=b"wrong")
    assert AuthorityKey.load(tmp_path / "a", passphrase=b"correct horse").public == key.public


def test_a_node_key_file_is_not_an_authority_key(tmp_path: Path, keys: Keystore) -> None:
    (tmp_path / "a").mkdir(mode=0o700)
    (tmp_path / "a" / "authority.key").write_bytes((keys.dir / "identity.key").read_bytes())
    os.chmod(tmp_path / "a" / "authority.key", 0o600)
    with pytest.raises(PeerdError, match="not a peerd authority key file"):
        AuthorityKey.load(tmp_path / "a")


def test_issue_and_revoke_are_signed_and_logged(authority: AuthorityKey, keys: Keystore) -> None:
    membership, record = authority.issue(_request(keys), days=30, now=NOW)
    membership.verify_signature()
    assert membership.authority_public == authority.public
    assert (membership.not_before, membership.not_after) == (int(NOW), int(NOW) + 30 * DAY)
    assert record["fingerprint"] == keys.fingerprint
    statement, _ = authority.revoke(network=NETWORK, peer_id=keys.peer_id, reason="r", now=NOW)
    statement.verify_signature()
    assert (statement.network, statement.peer_id, statement.reason) == (NETWORK, keys.peer_id, "r")
    records = AuthorityKey.records(authority.dir)
    assert [r["action"] for r in records] == ["membership", "revocation"]
    assert records[0]["not_after"] == membership.not_after
    assert AuthorityKey.network_of(authority.dir, keys.peer_id) == NETWORK
    assert AuthorityKey.network_of(authority.dir, "x8gbjhzgqjrdsnftppjh") is None
    with pytest.raises(PeerdError, match="valid for"):
        authority.issue(_request(keys), days=3661, now=NOW)
    with pytest.raises(PeerdError, match="256 bytes"):
        authority.revoke(network=NETWORK, peer_id=keys.peer_id, reason="x" * 257, now=NOW)
    assert len(AuthorityKey.records(authority.dir)) == 2  # refused ones are not logged


def test_a_damaged_issued_log_is_reported(authority: AuthorityKey, keys: Keystore) -> None:
    authority.issue(_request(keys), days=1, now=NOW)
    with (authority.dir / "issued.log").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(AuthorityError, match="line 2"):
        AuthorityKey.records(authority.dir)


# -- a node's membership ------------------------------------------------------------------------


def test_check_membership_refuses_what_the_node_cannot_use(
    authority: AuthorityKey, keys: Keystore, tmp_path: Path
) -> None:
    good, _ = authority.issue(_request(keys), days=30, now=NOW)
    check_membership(keys, good, network=NETWORK, authority_key=authority.public, now=NOW)
    other_node = Keystore.create(tmp_path / "other", now=NOW, certificate_days=30)
    other_auth = AuthorityKey.create(tmp_path / "other-authority")
    cases = {
        "network": (authority.issue(_request(keys, "other"), days=30, now=NOW)[0], NOW),
        "another node": (authority.issue(_request(other_node), days=30, now=NOW)[0], NOW),
        "another identity key": (
            authority.issue(
                MembershipRequest(NETWORK, keys.peer_id, other_node.identity_public),
                days=30,
                now=NOW,
            )[0],
            NOW,
        ),
        "another authority": (other_auth.issue(_request(keys), days=30, now=NOW)[0], NOW),
        "expired": (good, NOW + 30 * DAY),
    }
    for needle, (membership, when) in cases.items():
        with pytest.raises(MembershipError, match=needle):
            check_membership(
                keys, membership, network=NETWORK, authority_key=authority.public, now=when
            )
    forged = Membership(
        good.network,
        good.peer_id,
        good.identity_public,
        good.authority_public,
        good.not_before,
        good.not_after + DAY,  # a longer validity than the authority signed
        good.signature,
    )
    with pytest.raises(PeerdError, match="signature"):
        check_membership(keys, forged, network=NETWORK, authority_key=authority.public, now=NOW)


async def test_install_membership_keeps_it_and_logs_it(
    authority: AuthorityKey, keys: Keystore, store: Store
) -> None:
    membership, _ = authority.issue(_request(keys), days=30, now=NOW)
    result = await install_membership(
        keys, store, membership, network=NETWORK, authority_key=authority.public, now=NOW
    )
    assert result["authority_configured"] is True
    assert result["authority_key"] == format_authority_key(authority.public)
    assert read_membership(keys.dir) == membership
    reloaded = Keystore.load(keys.dir, now=NOW)
    assert reloaded.membership == membership
    # Its credentials now admit it at a node that trusts this authority, without pairing.
    view = TrustView(self_peer_id=None, network=NETWORK, overlap=0, authority_key=authority.public)
    auth = view.authenticate(reloaded.credentials(), reloaded.static.public, NOW + 1)
    assert auth.source.value == "authority"
    (event,) = [e for e in await store.events() if e.kind == "own-membership"]
    assert event.detail["not_after"] == membership.not_after
    # A refused one changes nothing: neither the file nor the log.
    before = len(await store.events())
    expired, _ = authority.issue(_request(keys), days=1, now=NOW - 2 * DAY)
    with pytest.raises(MembershipError, match="expired"):
        await install_membership(
            keys, store, expired, network=NETWORK, authority_key=authority.public, now=NOW
        )
    assert read_membership(keys.dir) == membership
    assert len(await store.events()) == before


async def test_succession_keeps_the_peer_id_and_drops_a_stale_membership(
    authority: AuthorityKey, keys: Keystore, store: Store
) -> None:
    membership, _ = authority.issue(_request(keys), days=30, now=NOW)
    keys.set_membership(membership.encode())
    old_fp, peer = keys.fingerprint, keys.peer_id
    link, result = await succeed_identity(keys, store, now=NOW + 10, certificate_days=30)
    assert (result["peer"], result["previous_fingerprint"]) == (peer, old_fp)
    assert result["fingerprint"] == fingerprint(link.new_identity) != old_fp
    assert result["membership_lost"] is True
    assert store.identity is not None
    assert store.identity.identity_public == link.new_identity
    assert request_for(keys.dir, NETWORK) == MembershipRequest(NETWORK, peer, link.new_identity)
    view = TrustView(self_peer_id=None, network=NETWORK, overlap=0, authority_key=authority.public)
    with pytest.raises(TrustError) as refused:
        view.authenticate(keys.credentials(), keys.static.public, NOW + 20)
    assert refused.value.reason == "unknown-peer"
    (event,) = [e for e in await store.events() if e.kind == "own-succession"]
    assert event.detail["index"] == 1


async def test_a_retired_node_never_loads_again(keys: Keystore, store: Store) -> None:
    statement = await retire_identity(keys, store, reason="stolen", now=NOW)
    assert statement.kind == "identity"
    statement.verify_signature()
    assert read_retirement(keys.dir) == statement.encode()
    with pytest.raises(IdentityRevoked, match="cannot run again"):
        Keystore.load(keys.dir, now=NOW)
    assert Keystore.read_public(keys.dir).peer_id == keys.peer_id  # `peerd id` still works
    (event,) = [e for e in await store.events() if e.kind == "own-revocation"]
    assert event.detail == {"kind": "identity", "serial": 0, "reason": "stolen"}
    # Every peer that learns the statement refuses the node for good.
    view = TrustView(self_peer_id=None, network=NETWORK, overlap=0)
    plan = view.plan_revocation(statement.encode(), NOW)
    assert plan.peer is not None
    assert plan.peer.state.value == "revoked"


def test_an_authority_statement_is_enforced_only_with_that_authority(
    authority: AuthorityKey, keys: Keystore, tmp_path: Path
) -> None:
    statement, _ = authority.revoke(network=NETWORK, peer_id=keys.peer_id, reason="", now=NOW)
    encoded = statement_from_text(statement_to_text(statement.encode()))
    assert isinstance(decode_statement(encoded), AuthorityRevocation)
    ours = TrustView(self_peer_id=None, network=NETWORK, overlap=0, authority_key=authority.public)
    assert ours.plan_revocation(encoded, NOW).changes
    other = AuthorityKey.create(tmp_path / "other").public
    for view, reason in (
        (TrustView(self_peer_id=None, network=NETWORK, overlap=0), "no-authority"),
        (
            TrustView(self_peer_id=None, network=NETWORK, overlap=0, authority_key=other),
            "wrong-authority",
        ),
        (
            TrustView(self_peer_id=None, network="x", overlap=0, authority_key=authority.public),
            "wrong-network",
        ),
    ):
        with pytest.raises(TrustError) as refused:
            view.plan_revocation(encoded, NOW)
        assert refused.value.reason == reason


def test_the_membership_text_form_is_pinned() -> None:
    """A fixed certificate (Ed25519 signatures are deterministic) has this one text form, so a
    change of the format is a deliberate one."""
    membership = issue_membership(
        bytes(range(32)),
        network="lab",
        peer_id="fzgvkqmhhbzn507p1w22",
        identity_public=bytes(range(32, 64)),
        now=1750000000,
        lifetime=365 * DAY,
    )
    text = (
        "peerd-membership-1-k00t6v31cat6cyk7esnq2vb8d1h7mvhn60vq0cbq68sc881044h269154rkjga9a5cp2"
        "tbhf60rk4csm6mv3ee1s78xkrf9y7z2200x10yzz7kggqreq1q8rwx5w16b7wkb316x51nfhvq46cg95acdrss"
        "m4xrc0ssn30580rh01q58q77y0y29p57g8aavcsvf95x1zdnknksgr13xsvbztync7nawgme49w637cyzhjvmc"
        "05mzeyq23hzyshjmsg353nyxx32c6n5q1yxpv6pw"
    )
    assert membership_to_text(membership) == text
    assert membership_from_text(text) == membership
