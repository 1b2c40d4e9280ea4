"""Peer ids and fingerprints: derivation vectors, tolerant parsing, typo detection."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.identity import (
    FINGERPRINT_LENGTH,
    PEER_ID_LENGTH,
    InvalidText,
    fingerprint,
    format_peer_id,
    is_peer_id,
    parse_fingerprint,
    parse_peer_id,
    peer_id_for,
)
from protocol.identity._codec import ALPHABET
from protocol.identity.keys import format_authority_key, parse_authority_key

# Vectors (protocol/SPEC.md section 6): the identity key is 32 bytes 00 01 02 .. 1f.
KEY = bytes(range(32))
KEY_PEER_ID = peer_id_for(KEY)
KEY_FINGERPRINT = fingerprint(KEY)


def test_vectors_are_stable() -> None:
    assert KEY_PEER_ID == "x8gbjhzgqjrdsnftppjh"
    assert KEY_FINGERPRINT == "7c16z-v2gq3-ce4n2-eb8pw-vb0j9-kwwdx"


def _gf_mul(a: int, b: int) -> int:
    """GF(32) multiplication the slow way (shift and reduce by x^5 + x^2 + 1)."""
    out = 0
    for _ in range(5):
        if b & 1:
            out ^= a
        b >>= 1
        a <<= 1
        if a & 0b100000:
            a ^= 0b100101
    return out


def _reference_name(context: bytes, key: bytes, data_symbols: int) -> str:
    """The spec's construction, written independently of protocol.identity._codec: hash, take
    5-bit groups, then search the two check symbols that make c(a) = c(a^2) = 0."""
    digest = int.from_bytes(hashlib.blake2b(context + key, digest_size=32).digest(), "big")
    symbols = [(digest >> (256 - 5 * (i + 1))) & 31 for i in range(data_symbols)]

    def syndrome(word: list[int], root: int) -> int:
        acc = 0
        for s in word:
            acc = _gf_mul(acc, root) ^ s
        return acc

    for c1, c0 in itertools.product(range(32), repeat=2):
        word = [*symbols, c1, c0]
        if syndrome(word, 2) == 0 and syndrome(word, 4) == 0:
            return "".join(ALPHABET[s] for s in word)
    raise AssertionError("no codeword")


@given(st.binary(min_size=32, max_size=32))
def test_derivation_matches_an_independent_reference(key: bytes) -> None:
    assert peer_id_for(key) == _reference_name(b"peerd/v1/peer-id\0", key, 18)
    fp = _reference_name(b"peerd/v1/fingerprint\0", key, 28)
    assert fingerprint(key) == "-".join(fp[i : i + 5] for i in range(0, 30, 5))


def test_peer_id_shape() -> None:
    pid = peer_id_for(bytes(32))
    assert len(pid) == PEER_ID_LENGTH <= 23  # an MQTT 3.1.1 client id every broker accepts
    assert pid.isascii()
    assert pid.isalnum()
    assert pid == pid.lower()
    assert is_peer_id(pid)
    assert format_peer_id(pid).count("-") == 3


def test_fingerprint_shape() -> None:
    fp = fingerprint(KEY)
    assert len(fp.replace("-", "")) == FINGERPRINT_LENGTH
    assert parse_fingerprint(fp) == fp
    assert fingerprint(bytes(32)) != fp


@pytest.mark.parametrize(
    "typed",
    [
        KEY_PEER_ID,
        KEY_PEER_ID.upper(),
        format_peer_id(KEY_PEER_ID),
        " ".join(KEY_PEER_ID[i : i + 4] for i in range(0, 20, 4)),
        f"  {format_peer_id(KEY_PEER_ID).upper()}\n",
    ],
)
def test_parse_is_tolerant_of_case_and_separators(typed: str) -> None:
    assert parse_peer_id(typed) == KEY_PEER_ID


def test_lookalike_letters_read_as_digits() -> None:
    # Crockford's rule: o -> 0, i and l -> 1 (the alphabet has neither letter).
    pid = next(
        peer_id_for(bytes([n]) * 32) for n in range(256) if "0" in peer_id_for(bytes([n]) * 32)
    )
    assert parse_peer_id(pid.replace("0", "o")) == pid


def test_every_single_typo_is_a_parse_error() -> None:
    for position, replacement in itertools.product(range(PEER_ID_LENGTH), ALPHABET):
        if KEY_PEER_ID[position] == replacement:
            continue
        typo = KEY_PEER_ID[:position] + replacement + KEY_PEER_ID[position + 1 :]
        with pytest.raises(InvalidText):
            parse_peer_id(typo)


def test_every_adjacent_swap_is_a_parse_error() -> None:
    for i in range(PEER_ID_LENGTH - 1):
        swapped = list(KEY_PEER_ID)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        if swapped == list(KEY_PEER_ID):
            continue
        with pytest.raises(InvalidText):
            parse_peer_id("".join(swapped))


@given(
    key=st.binary(min_size=32, max_size=32),
    positions=st.lists(st.integers(0, PEER_ID_LENGTH - 1), min_size=2, max_size=2, unique=True),
    chars=st.lists(st.sampled_from(ALPHABET), min_size=2, max_size=2),
)
def test_any_two_typos_are_a_parse_error(
    key: bytes, positions: list[int], chars: list[str]
) -> None:
    pid = list(peer_id_for(key))
    for p, c in zip(positions, chars, strict=True):
        pid[p] = c
    text = "".join(pid)
    if text == peer_id_for(key):
        return
    with pytest.raises(InvalidText):
        parse_peer_id(text)


@pytest.mark.parametrize(
    "bad",
    ["", "abc", KEY_PEER_ID[:-1], KEY_PEER_ID + "0", KEY_PEER_ID[:19] + "u", "peer!" * 4],
)
def test_malformed_peer_ids(bad: str) -> None:
    with pytest.raises(InvalidText) as info:
        parse_peer_id(bad)
    assert info.value.hint  # the user is told what a peer id looks like


def test_fingerprint_typo_detected() -> None:
    fp = KEY_FINGERPRINT.replace("-", "")
    for position, replacement in itertools.product(range(FINGERPRINT_LENGTH), ALPHABET):
        if fp[position] == replacement:
            continue
        with pytest.raises(InvalidText):
            parse_fingerprint(fp[:position] + replacement + fp[position + 1 :])
    with pytest.raises(InvalidText):
        parse_fingerprint(KEY_PEER_ID)  # a peer id is not a fingerprint


def test_peer_id_is_not_a_fingerprint_and_vice_versa() -> None:
    with pytest.raises(InvalidText):
        parse_peer_id(KEY_FINGERPRINT)


@given(st.binary(min_size=32, max_size=32))
def test_peer_ids_round_trip(key: bytes) -> None:
    pid = peer_id_for(key)
    assert parse_peer_id(format_peer_id(pid)) == pid
    assert parse_fingerprint(fingerprint(key).upper()) == fingerprint(key)


def test_authority_key_text_round_trip_and_checksum() -> None:
    text = format_authority_key(KEY)
    assert parse_authority_key(text.upper()) == KEY
    broken = text[:-3] + ("0" if text[-3] != "0" else "1") + text[-2:]
    with pytest.raises(InvalidText):
        parse_authority_key(broken)
    with pytest.raises(InvalidText):
        parse_authority_key(text[:-2])
    with pytest.raises(InvalidText):
        parse_authority_key("peerd-invite-1-abc")


def test_authority_key_vector() -> None:
    key = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
    assert format_authority_key(key) == (
        "peerd-authority-1-0eggffzksr8bw7bgvmceejy0k5ky9nhgkejgtqrxvj3684jn66w203j59r"
    )
