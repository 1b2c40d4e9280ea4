"""Signed identity objects: byte-exact layout, strict decoding, signatures, validity, chains."""

from __future__ import annotations

import struct

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.identity import (
    CLOCK_SKEW,
    MAX_CHAIN,
    MAX_CREDENTIALS_SIZE,
    AuthorityRevocation,
    BadSignature,
    Conflict,
    Credentials,
    Expired,
    InvalidText,
    KeyCertificate,
    MalformedObject,
    Membership,
    NotYetValid,
    Revocation,
    Succession,
    TrustError,
    decode_statement,
    issue_authority_revocation,
    issue_certificate,
    issue_membership,
    issue_revocation,
    issue_succession,
    new_identity_seed,
    peer_id_for,
    verify_chain,
)
from protocol.identity._codec import ed25519_public, sign
from protocol.identity.objects import CERT_CONTEXT, REVOCATION_CONTEXT
from tests.protocol.test_identity_helpers import DAY, NOW, Node

SEED = bytes(range(32))
STATIC = bytes(range(32, 64))
PEER = peer_id_for(ed25519_public(SEED))


def _cert(**overrides: object) -> KeyCertificate:
    args: dict[str, object] = {
        "peer_id": PEER,
        "static_public": STATIC,
        "serial": 1,
        "now": NOW,
        "lifetime": 30 * DAY,
    }
    args.update(overrides)
    return issue_certificate(SEED, **args)  # type: ignore[arg-type]


# -- byte-exact layout -------------------------------------------------------------------------


def test_certificate_bytes_follow_the_spec_exactly() -> None:
    """Build the body by hand from the spec, and verify the signature with another library."""
    cert = _cert()
    identity = ed25519_public(SEED)
    body = (
        b"\x97\x01"
        + b"\xb4"
        + PEER.encode()
        + b"\xc4\x20"
        + identity
        + b"\xc4\x20"
        + STATIC
        + b"\x01"
        + b"\xce"
        + struct.pack(">I", int(NOW))
        + b"\xce"
        + struct.pack(">I", int(NOW) + 30 * DAY)
    )
    assert cert.body() == body
    assert cert.encode() == b"\x98" + body[1:] + b"\xc4\x40" + cert.signature
    Ed25519PublicKey.from_public_bytes(identity).verify(cert.signature, b"peerd/v1/cert\x00" + body)
    with pytest.raises(InvalidSignature):  # the context is part of what is signed
        Ed25519PublicKey.from_public_bytes(identity).verify(cert.signature, body)


def test_certificate_vector() -> None:
    """A fixed vector for second implementations (Ed25519 signatures are deterministic)."""
    cert = _cert()
    assert cert.encode().hex() == CERTIFICATE_HEX


# identity seed 00..1f, static key 20..3f, serial 1, now 1750000000, lifetime 30 days
CERTIFICATE_HEX = (
    "9801b4667a67766b716d6868627a6e3530377031773232c42003a107bff3ce10be1d70dd18e74bc09967e4d630"
    "9ba50d5f1ddc8664125531b8c420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e"
    "3f01ce684ee180ce68766e80c440ab60705b5231e2f6584a9020faa6a8f5010085dc38ea1f707edda61a95c725"
    "ac94008d143f0c8425d4b51257ec6113ee2f7c180255b59efffbd086fdbba08c09"
)


# -- round trips -------------------------------------------------------------------------------


def test_round_trips() -> None:
    node = Node()
    authority = new_identity_seed()
    node.join_authority(authority, "lab")
    link = node.succeed()
    objects = [
        node.cert,
        link,
        issue_revocation(node.seed, peer_id=node.peer_id, kind="static", serial=3, now=NOW),
        issue_revocation(node.seed, peer_id=node.peer_id, kind="identity", now=NOW, reason="é"),
        issue_membership(
            authority,
            network="lab",
            peer_id=node.peer_id,
            identity_public=node.identity_public,
            now=NOW,
            lifetime=DAY,
        ),
        issue_authority_revocation(authority, network="lab", peer_id=node.peer_id, now=NOW),
    ]
    for obj in objects:
        decoded = type(obj).decode(obj.encode())  # type: ignore[attr-defined]
        assert decoded == obj
        assert decoded.encode() == obj.encode()  # type: ignore[attr-defined]
    creds = Credentials.decode(node.credentials())
    assert creds.certificate == node.cert
    assert creds.successions == (link,)
    assert creds.encode() == node.credentials()


# -- strict decoding ---------------------------------------------------------------------------


def _fields(cert: KeyCertificate) -> list[object]:
    return list(msgpack.unpackb(cert.encode(), raw=False))


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [
        (0, 2, "unsupported-version"),
        (0, True, "malformed"),
        (1, PEER.upper(), "malformed"),
        (1, PEER.encode(), "malformed"),
        (2, b"\x00" * 31, "malformed"),
        (2, "x" * 32, "malformed"),
        (3, b"\x00" * 33, "malformed"),
        (4, 0, "malformed"),
        (4, True, "malformed"),
        (4, -1, "malformed"),
        (4, 2**63, "malformed"),
        (4, 1.0, "malformed"),
        (5, int(NOW) + 31 * DAY, "malformed"),  # not_before after not_after
        (6, int(NOW) + 401 * DAY, "malformed"),  # longer than the maximum lifetime
        (7, b"\x00" * 63, "malformed"),
        (7, None, "malformed"),
    ],
)
def test_certificate_field_errors(index: int, value: object, reason: str) -> None:
    fields = _fields(_cert())
    fields[index] = value
    with pytest.raises(MalformedObject) as info:
        KeyCertificate.decode(msgpack.packb(fields, use_bin_type=True))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # truncated
        lambda b: b + b"\x00",  # trailing data
        lambda b: b"\x99" + b[1:] + b"\xc0",  # an extra field
        lambda b: b"\x97" + b[1:-66],  # a missing field
        lambda b: b"\xdc\x00\x08" + b[1:],  # array16 header: same value, not canonical
        lambda b: b"",
        lambda b: b"\x80",  # a map
        lambda b: msgpack.packb({"version": 1}),
        lambda b: b * 8,  # too large
    ],
)
def test_certificate_structural_errors(mutate: object) -> None:
    data = mutate(_cert().encode())  # type: ignore[operator]
    with pytest.raises(MalformedObject):
        KeyCertificate.decode(data)


def test_non_canonical_integer_is_refused() -> None:
    fields = _fields(_cert())
    data = msgpack.packb(fields, use_bin_type=True)
    wide = data.replace(b"\x01\xce", b"\xcf" + (1).to_bytes(8, "big") + b"\xce", 1)
    assert msgpack.unpackb(wide, raw=False) == fields  # the same value ...
    with pytest.raises(MalformedObject) as info:
        KeyCertificate.decode(wide)  # ... in another encoding
    assert info.value.reason == "non-canonical"


def test_not_bytes_is_local_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        KeyCertificate.decode("text")  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_decoders_raise_only_trust_errors(data: bytes) -> None:
    for cls in (
        KeyCertificate,
        Succession,
        Revocation,
        Membership,
        AuthorityRevocation,
        Credentials,
    ):
        try:
            cls.decode(data)  # type: ignore[attr-defined]
        except TrustError:
            pass
    try:
        decode_statement(data)
    except TrustError:
        pass


def test_every_bit_flip_is_detected() -> None:
    cert = _cert()
    data = cert.encode()
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                other = KeyCertificate.decode(bytes(flipped))
                other.verify_signature()
            except TrustError:
                continue
            pytest.fail(f"a flip of bit {bit} of byte {i} went unnoticed")


# -- signatures --------------------------------------------------------------------------------


def test_signature_of_another_context_does_not_verify() -> None:
    cert = _cert()
    forged = KeyCertificate(
        cert.peer_id,
        cert.identity_public,
        cert.static_public,
        cert.serial,
        cert.not_before,
        cert.not_after,
        sign(SEED, REVOCATION_CONTEXT, cert.body()),
    )
    with pytest.raises(BadSignature):
        forged.verify_signature()
    right = sign(SEED, CERT_CONTEXT, cert.body())
    assert right == cert.signature


def test_certificate_signed_by_another_key_fails() -> None:
    cert = _cert()
    other = issue_certificate(
        new_identity_seed(), peer_id=PEER, static_public=STATIC, serial=1, now=NOW, lifetime=DAY
    )
    forged = KeyCertificate(
        cert.peer_id,
        cert.identity_public,
        cert.static_public,
        cert.serial,
        other.not_before,
        other.not_after,
        other.signature,
    )
    with pytest.raises(BadSignature):
        forged.verify_signature()


def test_succession_needs_both_signatures() -> None:
    old, new = new_identity_seed(), new_identity_seed()
    pid = peer_id_for(ed25519_public(old))
    link = issue_succession(old, new, peer_id=pid, index=1, now=NOW)
    link.verify_signatures()
    swapped = Succession(
        link.peer_id,
        link.index,
        link.old_identity,
        link.new_identity,
        link.issued_at,
        link.new_signature,
        link.old_signature,
    )
    with pytest.raises(BadSignature):
        swapped.verify_signatures()
    # An attacker's key cannot claim the succession: the countersignature is the new key's.
    attacker = new_identity_seed()
    hijack = Succession(
        link.peer_id,
        link.index,
        link.old_identity,
        ed25519_public(attacker),
        link.issued_at,
        link.old_signature,
        link.new_signature,
    )
    with pytest.raises(BadSignature):
        hijack.verify_signatures()


# -- validity ----------------------------------------------------------------------------------


def test_validity_window_with_clock_skew() -> None:
    cert = _cert()
    cert.check_validity(cert.not_before)
    cert.check_validity(cert.not_before - CLOCK_SKEW)
    with pytest.raises(NotYetValid):
        cert.check_validity(cert.not_before - CLOCK_SKEW - 1)
    cert.check_validity(cert.not_after - 0.001)
    with pytest.raises(Expired):
        cert.check_validity(cert.not_after)


# -- chains ------------------------------------------------------------------------------------


def _chain(length: int) -> tuple[list[bytes], tuple[Succession, ...]]:
    seeds = [new_identity_seed() for _ in range(length + 1)]
    pid = peer_id_for(ed25519_public(seeds[0]))
    links = tuple(
        issue_succession(seeds[i], seeds[i + 1], peer_id=pid, index=i + 1, now=NOW)
        for i in range(length)
    )
    return seeds, links


def test_chain_verifies_and_yields_keys() -> None:
    seeds, links = _chain(3)
    pid = peer_id_for(ed25519_public(seeds[0]))
    keys = verify_chain(pid, links, ed25519_public(seeds[0]))
    assert keys == tuple(ed25519_public(s) for s in seeds)


def test_chain_errors() -> None:
    seeds, links = _chain(3)
    first = ed25519_public(seeds[0])
    pid = peer_id_for(first)
    with pytest.raises(BadSignature):  # the first key does not hash to the peer id
        verify_chain(pid, links, ed25519_public(seeds[1]))
    with pytest.raises(MalformedObject):  # a link left out
        verify_chain(pid, (links[0], links[2]), first)
    _, other_links = _chain(1)
    with pytest.raises(Conflict):  # a link of another peer
        verify_chain(pid, (links[0], other_links[0]), first)
    # a link from a key that is not the chain's end
    stray = issue_succession(seeds[0], new_identity_seed(), peer_id=pid, index=2, now=NOW)
    with pytest.raises(Conflict):
        verify_chain(pid, (links[0], stray), first)
    back = issue_succession(seeds[1], seeds[0], peer_id=pid, index=2, now=NOW)
    with pytest.raises(MalformedObject):  # returning to an earlier key
        verify_chain(pid, (links[0], back), first)


def test_credentials_size_is_bounded() -> None:
    node = Node()
    node.join_authority(new_identity_seed(), "a" * 32)
    for _ in range(MAX_CHAIN):
        node.succeed()
    node.join_authority(new_identity_seed(), "a" * 32)
    data = node.credentials()
    assert len(data) <= MAX_CREDENTIALS_SIZE < 60_000
    assert Credentials.decode(data).verify(NOW)[-1] == node.identity_public
    too_long = msgpack.unpackb(data, raw=False)
    too_long[1].append(too_long[1][-1])
    with pytest.raises(MalformedObject):
        Credentials.decode(msgpack.packb(too_long, use_bin_type=True))


def test_credentials_certificate_must_be_signed_by_the_chain_end() -> None:
    node = Node()
    old_cert = node.cert
    node.succeed()
    creds = Credentials(node.successions, old_cert).encode()
    with pytest.raises(Conflict):
        Credentials.decode(creds).verify(NOW)


def test_decode_statement_tells_the_kinds_apart() -> None:
    node = Node()
    authority = new_identity_seed()
    own = issue_revocation(node.seed, peer_id=node.peer_id, kind="identity", now=NOW)
    auth = issue_authority_revocation(authority, network="lab", peer_id=node.peer_id, now=NOW)
    assert decode_statement(own.encode()) == own
    assert decode_statement(auth.encode()) == auth
    with pytest.raises(MalformedObject):
        decode_statement(node.cert.encode())


def test_revocation_kind_and_serial_rules() -> None:
    node = Node()
    good = issue_revocation(node.seed, peer_id=node.peer_id, kind="static", serial=2, now=NOW)
    fields = msgpack.unpackb(good.encode(), raw=False)
    for kind, serial in (("identity", 2), ("static", 0), ("everything", 1)):
        bad = list(fields)
        bad[1], bad[4] = kind, serial
        with pytest.raises(MalformedObject):
            Revocation.decode(msgpack.packb(bad, use_bin_type=True))


@pytest.mark.parametrize(
    "call",
    [
        lambda: _cert(serial=0),
        lambda: _cert(lifetime=0),
        lambda: _cert(lifetime=401 * DAY),
        lambda: _cert(peer_id="not-a-peer-id"),
        lambda: _cert(static_public=b"short"),
        lambda: _cert(now=-1),
        lambda: issue_revocation(SEED, peer_id=PEER, kind="static", serial=0, now=NOW),
        lambda: issue_revocation(SEED, peer_id=PEER, kind="identity", serial=1, now=NOW),
        lambda: issue_revocation(
            SEED, peer_id=PEER, kind="static", serial=1, now=NOW, reason="x" * 257
        ),
        lambda: issue_succession(SEED, SEED, peer_id=PEER, index=1, now=NOW),
        lambda: issue_succession(
            SEED, new_identity_seed(), peer_id=PEER, index=MAX_CHAIN + 1, now=NOW
        ),
    ],
)
def test_issuing_misuse_is_local_error(call: object) -> None:
    with pytest.raises(LocalProtocolError):
        call()  # type: ignore[operator]


def test_membership_network_is_validated() -> None:
    with pytest.raises(InvalidText):
        issue_membership(
            SEED, network="Bad/Net", peer_id=PEER, identity_public=STATIC, now=NOW, lifetime=DAY
        )


def test_revocation_vector() -> None:
    statement = issue_revocation(
        SEED, peer_id=PEER, kind="static", serial=3, now=NOW, reason="key lost"
    )
    assert statement.encode().hex() == (
        "9801a6737461746963b4667a67766b716d6868627a6e3530377031773232c42003a107bff3ce10be1d70dd"
        "18e74bc09967e4d6309ba50d5f1ddc8664125531b803ce684ee180a86b6579206c6f7374c44074a0714b0c"
        "a7ec18bcea126db322f131fe3b13fa632d442543a886a88b952aa6626accb0a4c73c4192dbe48bca1f951e"
        "62bd77a92351fe1539399096bfbe2b03"
    )
