"""Invite tokens: one copy-pasteable line, checksummed, versioned, expiring, secret."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.identity import (
    MAX_INVITE_TTL,
    Expired,
    InvalidText,
    InviteToken,
    new_invite,
)
from protocol.identity._codec import ALPHABET, bytes_to_text, digest
from tests.protocol.test_identity_helpers import NOW, Node


def _token() -> InviteToken:
    node = Node()
    return new_invite(
        network="lab",
        inviter=node.peer_id,
        inviter_identity=node.identity_public,
        now=NOW,
        ttl=3600,
    )


def test_round_trip_as_one_line() -> None:
    token = _token()
    text = token.to_text()
    assert text.startswith("peerd-invite-1-")
    assert "\n" not in text
    assert " " not in text
    assert len(text) < 260
    assert InviteToken.from_text(text) == token
    assert token.expires_at == int(NOW) + 3600


def test_fresh_randomness() -> None:
    a, b = _token(), _token()
    assert a.psk != b.psk
    assert a.invite_id != b.invite_id
    assert len(a.psk) == 32


def test_parse_tolerates_case_wrapping_and_spaces() -> None:
    token = _token()
    text = token.to_text()
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    assert InviteToken.from_text("  " + wrapped.upper() + "\r\n") == token


def test_repr_never_shows_the_psk() -> None:
    token = _token()
    assert token.psk.hex() not in repr(token)
    assert repr(token.psk) not in repr(token)


def test_every_single_character_change_is_detected() -> None:
    text = _token().to_text()
    body_start = len("peerd-invite-1-")
    for i in range(body_start, len(text)):
        for c in "0z":
            if text[i] == c:
                continue
            with pytest.raises(InvalidText):
                InviteToken.from_text(text[:i] + c + text[i + 1 :])


@pytest.mark.parametrize(
    "cut",
    [lambda t: t[:-1], lambda t: t[:-8], lambda t: t + "0", lambda t: t[:20]],
)
def test_truncated_or_extended(cut: object) -> None:
    with pytest.raises(InvalidText):
        InviteToken.from_text(cut(_token().to_text()))  # type: ignore[operator]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "peerd-invite-",
        "peerd-invite-x-abc",
        "peerd-authority-1-abc",
        "peerd-invite-1-!!!",
    ],
)
def test_not_a_token(text: str) -> None:
    with pytest.raises(InvalidText) as info:
        InviteToken.from_text(text)
    assert info.value.hint


def test_newer_version_is_named() -> None:
    text = _token().to_text().replace("peerd-invite-1-", "peerd-invite-2-")
    with pytest.raises(InvalidText, match="version 2"):
        InviteToken.from_text(text)


def test_valid_checksum_but_bad_payload_is_refused() -> None:
    payload = b"\x93\x01\x02\x03"  # a msgpack array, but not an invite
    check = digest(b"peerd/v1/invite\0", payload)[:4]
    with pytest.raises(InvalidText, match="invalid"):
        InviteToken.from_text("peerd-invite-1-" + bytes_to_text(payload + check))


def test_expiry() -> None:
    token = _token()
    token.check_fresh(token.expires_at - 1)
    with pytest.raises(Expired):
        token.check_fresh(token.expires_at)


def test_an_expired_token_says_when_in_words_not_unix_seconds() -> None:
    token = _token()
    with pytest.raises(Expired) as caught:
        token.check_fresh(token.expires_at + 17 * 60 + 5)
    text = str(caught.value)
    assert datetime.fromtimestamp(token.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ") in text
    assert "17 min ago" in text
    assert str(token.expires_at) not in text


def test_issue_misuse() -> None:
    node = Node()
    for ttl in (0, MAX_INVITE_TTL + 1):
        with pytest.raises(LocalProtocolError):
            new_invite(
                network="lab",
                inviter=node.peer_id,
                inviter_identity=node.identity_public,
                now=NOW,
                ttl=ttl,
            )
    with pytest.raises(LocalProtocolError):
        new_invite(
            network="lab", inviter="nope", inviter_identity=node.identity_public, now=NOW, ttl=60
        )


@given(st.text(alphabet=ALPHABET + "-", max_size=300))
def test_random_text_never_crashes(text: str) -> None:
    try:
        InviteToken.from_text("peerd-invite-1-" + text)
    except InvalidText:
        pass


def test_token_vector() -> None:
    identity = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
    token = InviteToken(
        network="lab",
        inviter="fzgvkqmhhbzn507p1w22",
        inviter_identity=identity,
        invite_id=bytes(range(16)),
        psk=bytes(range(64, 96)),
        expires_at=1750086400,
    )
    text = (
        "peerd-invite-1-jw0t6v31cat6cyk7esnq2vb8d1h7mvhn60vq0cbq68sc8803m43vzwye22z1tw6x33kmqg4"
        "sczjdcc4vmm6ny7ewgsj14n9hq3210001081g81860w40j2gb1g6gw3y441042gj38h2mcht89554pk2d9s7n0"
        "majada5anjqb1cnmptwbnf5zkk8a0sg1dtpk2a0"
    )
    assert token.to_text() == text
    assert InviteToken.from_text(text) == token
