"""Fuzzing every decoder of outside input: only the documented errors may come out.

Inputs are the seed corpus (tests/fuzz/corpus.py) as it is, mutated (bit flips, interesting
bytes, cuts, duplicated and spliced slices, truncation) and random bytes. For each decoder the
test states what is documented: which `PeerdError` subclass (with which reason labels) may be
raised, and what a successful decode promises (canonical objects re-encode to the very bytes,
frames to their own layout). Anything else escaping - a `LocalProtocolError`, a `ValueError`
from msgpack, an `IndexError` - is a bug.

`PEERD_FUZZ_EXAMPLES` raises the number of examples per test (the long run is marked `soak`).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.authority import (
    MembershipRequest,
    membership_from_text,
    membership_to_text,
    statement_from_text,
    statement_to_text,
)
from protocol import frames
from protocol.errors import RemoteProtocolError
from protocol.identity import (
    AuthorityRevocation,
    Credentials,
    InvalidText,
    InviteToken,
    KeyCertificate,
    Membership,
    Revocation,
    Succession,
    TrustError,
    TrustView,
    decode_statement,
    parse_authority_key,
    parse_fingerprint,
    parse_peer_id,
)
from protocol.identity.errors import MalformedObject
from protocol.messaging import decode_app
from protocol.safetensors import SafetensorsError, header_length, parse_header
from protocol.transfer import (
    BadChunkFrame,
    MalformedTransferObject,
    Manifest,
    Offer,
    ReceiverTransfer,
    SignedManifest,
    decode_message,
    parse_chunk_header,
)
from tests.fuzz.corpus import (
    CONTENT_KEY,
    NETWORK,
    NOW,
    TID,
    attempt,
    fuzz_settings,
    inputs,
    seeds,
    texts,
)
from tests.protocol.test_identity_helpers import Node

# Generous: a decoder that takes seconds on a few KiB is a hang; CI load is not.
FUZZ = fuzz_settings(deadline=2000)

FRAME_REASONS = {"malformed", "oversize", "version"}
IDENTITY_REASONS = {
    "malformed",
    "non-canonical",
    "too-large",
    "unsupported-version",
    "bad-signature",
    "conflict",
    "expired",
    "not-yet-valid",
}


# -- inbox frames -------------------------------------------------------------------------------


@FUZZ
@given(inputs("frame", max_random=2048))
def test_frame_decoder(data: bytes) -> None:
    frame, exc = attempt(frames.decode, data, errors=RemoteProtocolError)
    if frame is None:
        assert exc is not None
        assert exc.reason in FRAME_REASONS, exc.reason
        return
    # A frame that decodes re-encodes to its own bytes (no field is silently reinterpreted).
    if isinstance(frame, frames.Hello) and frame.ticket_id is not None:
        again = frames.encode_resume(
            frame.sender_index, frame.reply_to, frame.ticket_id, frame.noise
        )
    elif isinstance(frame, frames.Hello):
        again = frames.encode_hello(
            frame.sender_index, frame.reply_to, frame.noise, frame.invite_id
        )
    elif isinstance(frame, frames.Reply):
        again = frames.encode_reply(frame.receiver_index, frame.sender_index, frame.noise)
    elif isinstance(frame, frames.Finish):
        again = frames.encode_finish(frame.receiver_index, frame.noise)
    elif isinstance(frame, frames.Refused):
        again = frames.encode_refused(frame.receiver_index, frame.reason)
    elif isinstance(frame, frames.Early):
        assert frame.header == frames.early_header(frame.sender_index, frame.counter)
        again = frame.header + frame.ciphertext
    else:
        assert frame.header == frames.data_header(frame.receiver_index, frame.counter)
        again = frame.header + frame.ciphertext
    assert again == data


def test_frame_decoder_bounds() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        frames.decode(b"\x01\x05" + bytes(frames.MAX_FRAME_LEN))
    assert info.value.reason == "oversize"
    for short in (b"", b"\x01", b"\x01\x01" + bytes(37), b"\x01\x05" + bytes(27)):
        with pytest.raises(RemoteProtocolError) as info:
            frames.decode(short)
        assert info.value.reason == "malformed"


# -- application messages and transfer control ---------------------------------------------------


@FUZZ
@given(inputs("app", "control", max_random=1024))
def test_application_message_decoder(data: bytes) -> None:
    _, exc = attempt(decode_app, data, errors=RemoteProtocolError)
    assert exc is None or exc.reason == "malformed", exc


@FUZZ
@given(inputs("control", "app"))
def test_transfer_control_decoder(data: bytes) -> None:
    message, exc = attempt(decode_message, data, errors=MalformedTransferObject)
    if message is None:
        assert exc is not None
        assert exc.reason in {"malformed", "too-large", "non-canonical", "bad-name", "unknown-type"}
        return
    assert message.encode() == data  # canonical: one message, one encoding


@FUZZ
@given(inputs("manifest", "control"), st.sampled_from([b"", bytes(64)]) | inputs("signature"))
def test_manifest_and_seal(body: bytes, signature: bytes) -> None:
    signer = Node(bytes(range(32)))
    manifest, exc = attempt(Manifest.decode, body, errors=MalformedTransferObject)
    if manifest is None:
        assert exc is not None
        assert exc.reason in {"malformed", "too-large", "non-canonical", "bad-name", "version"}
    else:
        assert manifest.body() == body
    opened, refusal = attempt(
        SignedManifest.open, body, signature, signer.identity_public, errors=RemoteProtocolError
    )
    if opened is None:
        assert refusal is not None
        assert refusal.reason in {
            "malformed",
            "too-large",
            "non-canonical",
            "bad-name",
            "version",
            "bad-signature",
        }
    else:
        assert body == seeds()["manifest"][0]  # only the real one verifies


@FUZZ
@given(inputs("chunk", max_random=2048))
def test_chunk_frames(data: bytes) -> None:
    _, exc = attempt(parse_chunk_header, data, errors=BadChunkFrame)
    assert exc is None or exc.reason in {
        "truncated",
        "too-large",
        "version",
        "frame-type",
        "bad-flags",
    }
    offer = Offer(TID, "model.bin", 1400, 1024, 2, 1_750_000_000, CONTENT_KEY)
    receiver = ReceiverTransfer(offer, sender="x" * 20, sender_key=bytes(32), now=NOW)
    out = bytearray(1024)
    write, refusal = attempt(receiver.on_frame, data, out, NOW, errors=RemoteProtocolError)
    if refusal is not None:
        assert refusal.reason in {
            "truncated",
            "too-large",
            "version",
            "frame-type",
            "bad-flags",
            "wrong-transfer",
            "bad-index",
            "bad-length",
            "decrypt",
        }
        return
    if write is not None:  # only a genuine frame decrypts: its plaintext is the seed's (zeros)
        assert bytes(write.data) == bytes(len(write.data))


# -- identity objects ---------------------------------------------------------------------------


@FUZZ
@given(inputs("certificate", "succession", "membership", "statement"))
def test_signed_objects(data: bytes) -> None:
    classes: list[Any] = [KeyCertificate, Succession, Membership, Revocation, AuthorityRevocation]
    for cls in classes:
        obj, exc = attempt(cls.decode, data, errors=TrustError)
        if obj is None:
            assert exc is not None
            assert exc.reason in IDENTITY_REASONS, exc.reason
            continue
        assert obj.encode() == data
        verify = getattr(obj, "verify_signatures", None) or obj.verify_signature
        _, exc = attempt(verify, errors=TrustError)
        assert exc is None or exc.reason == "bad-signature", exc
    statement, _ = attempt(decode_statement, data, errors=MalformedObject)
    assert statement is None or statement.encode() == data


@FUZZ
@given(inputs("statement", "certificate"))
def test_revocation_statements_against_a_trust_view(data: bytes) -> None:
    view = TrustView(self_peer_id=None, network=NETWORK, overlap=0.0, authority_key=None)
    _, exc = attempt(view.plan_revocation, data, NOW, errors=TrustError)
    assert exc is None or exc.reason in IDENTITY_REASONS | {"unknown-signer", "no-authority"}, exc


def _trusting_view() -> tuple[TrustView, Node]:
    from tests.fuzz.corpus import trusting_view  # noqa: PLC0415

    me, peer = Node(bytes(range(40, 72))), Node(bytes(range(3, 35)))
    return trusting_view(me, peer), peer


@FUZZ
@given(inputs("credentials", "certificate"), st.booleans())
def test_credentials_against_a_trust_view(data: bytes, allow_unknown: bool) -> None:
    view, peer = _trusting_view()
    creds, exc = attempt(Credentials.decode, data, errors=TrustError)
    if creds is None:
        assert exc is not None
        assert exc.reason in IDENTITY_REASONS, exc.reason
    else:
        assert creds.encode() == data

    def authenticate() -> object:
        return view.authenticate(data, peer.static.public, NOW, allow_unknown=allow_unknown)

    auth, exc = attempt(authenticate, errors=TrustError)
    if auth is None:
        assert exc is not None
        assert exc.reason in IDENTITY_REASONS | {
            "static-mismatch",
            "unknown-peer",
            "rollback",
            "revoked",
            "self",
            "superseded-identity",
            "no-membership",
            "wrong-authority",
            "wrong-network",
            "membership-mismatch",
        }, exc.reason
    else:
        # Only the peer's own certificate carries its static key.
        assert getattr(auth, "peer_id", None) == peer.peer_id


# -- text a person pastes -------------------------------------------------------------------------


@FUZZ
@given(texts("invite", "authority_key", "peer_id", "fingerprint", "authority_text"))
def test_pasted_text(text: str) -> None:
    token, _ = attempt(InviteToken.from_text, text, errors=InvalidText)
    if token is not None:
        assert token.to_text() == InviteToken.from_text(token.to_text()).to_text()
        assert InviteToken.decode(token.encode()) == token
    for parse in (parse_authority_key, parse_peer_id, parse_fingerprint):
        attempt(parse, text, errors=InvalidText)
    # The authority's text forms (membership request, membership, revocation statement).
    request, _ = attempt(MembershipRequest.from_text, text, errors=InvalidText)
    if request is not None:
        assert MembershipRequest.from_text(request.to_text()) == request
    membership, _ = attempt(membership_from_text, text, errors=InvalidText)
    if membership is not None:
        assert membership_from_text(membership_to_text(membership)) == membership
    statement, _ = attempt(statement_from_text, text, errors=InvalidText)
    if statement is not None:
        assert statement_from_text(statement_to_text(statement)) == statement


# -- safetensors headers ------------------------------------------------------------------------


@FUZZ
@given(inputs("safetensors", max_random=256), st.integers(0, 4096))
def test_safetensors_header(data: bytes, extra: int) -> None:
    for size in (len(data), len(data) + extra):
        header, exc = attempt(parse_header, data, size, errors=SafetensorsError)
        if header is None:
            assert exc is not None
            assert exc.reason.startswith("safetensors-"), exc.reason
            continue
        assert header.header_bytes == header_length(data[:8], size)
        assert header.data_start + sum(t.end - t.begin for t in header.tensors) == size


@pytest.mark.parametrize("version", ["\u00b2", "1" * 5000, "9" * 7])
def test_invite_token_with_a_strange_version(version: str) -> None:
    """Found by atheris: str.isdigit() accepts Unicode digits ('²') that int() refuses, and
    int() refuses more than 4300 digits; a ValueError escaped instead of InvalidText."""
    with pytest.raises(InvalidText):
        InviteToken.from_text(f"peerd-invite-{version}-jw0t6v31cat6")
