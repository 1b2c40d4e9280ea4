"""Peer ids and fingerprints: the names people type, read aloud and compare.

A peer id is 20 characters of Crockford's base32 alphabet in lowercase: 18 characters (90 bits)
of BLAKE2b-256 over the node's first identity key, then two Reed-Solomon check characters over
GF(32). Any one or two wrong characters, including two swapped ones, make it fail to parse; it
can never turn into another valid id. 20 lowercase alphanumerics fit the 23-character MQTT 3.1.1
client id every broker must accept, so a peer id is also the node's client id and topic level.

A fingerprint names the node's current identity key for comparing out of band: 30 characters
(28 of hash, 140 bits, plus two check characters), shown in six groups of five.
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError
from protocol.identity._codec import (
    ED25519_PUBLIC_BYTES,
    bits_to_symbols,
    check_symbols,
    decode_symbols,
    digest,
    encode_symbols,
    has_valid_check,
)
from protocol.identity.errors import InvalidText

PEER_ID_LENGTH = 20
FINGERPRINT_LENGTH = 30
_PEER_ID_CONTEXT = b"peerd/v1/peer-id\0"
_FINGERPRINT_CONTEXT = b"peerd/v1/fingerprint\0"
_PEER_ID_HINT = "a peer id has 20 letters and digits, e.g. from `peerd id` on that node"
_FINGERPRINT_HINT = "a fingerprint has 30 letters and digits, from `peerd id` on that node"


def _checked(context: bytes, identity_public: bytes, data_symbols: int) -> list[int]:
    if type(identity_public) is not bytes or len(identity_public) != ED25519_PUBLIC_BYTES:
        raise LocalProtocolError("an identity public key is 32 bytes")
    symbols = bits_to_symbols(digest(context, identity_public), data_symbols)
    return symbols + list(check_symbols(symbols))


def _grouped(text: str) -> str:
    return "-".join(text[i : i + 5] for i in range(0, len(text), 5))


def peer_id_for(identity_public: bytes) -> str:
    """The canonical peer id (20 characters, no separators) of a node's FIRST identity key."""
    return encode_symbols(_checked(_PEER_ID_CONTEXT, identity_public, PEER_ID_LENGTH - 2))


def parse_peer_id(text: str) -> str:
    """The canonical peer id from what a person typed: any case, dashes or spaces allowed.

    Raises `InvalidText` if the length or the check characters are wrong.
    """
    symbols = decode_symbols(text, what="peer id", hint=_PEER_ID_HINT)
    if len(symbols) != PEER_ID_LENGTH:
        raise InvalidText(
            f"a peer id has {PEER_ID_LENGTH} characters, this one has {len(symbols)}",
            hint=_PEER_ID_HINT,
        )
    if not has_valid_check(symbols):
        raise InvalidText(f"{text.strip()!r} is not a valid peer id (typo?)", hint=_PEER_ID_HINT)
    return encode_symbols(symbols)


def is_peer_id(text: str) -> bool:
    """Whether `text` is a peer id in canonical form (as on the wire and in topics)."""
    try:
        return parse_peer_id(text) == text
    except InvalidText:
        return False


def format_peer_id(peer_id: str) -> str:
    """The display form, in groups of five: `abcde-fghjk-mnpqr-stvwx`."""
    return _grouped(parse_peer_id(peer_id))


def fingerprint(identity_public: bytes) -> str:
    """The fingerprint of an identity key, in its display (and canonical) form."""
    return _grouped(
        encode_symbols(_checked(_FINGERPRINT_CONTEXT, identity_public, FINGERPRINT_LENGTH - 2))
    )


def parse_fingerprint(text: str) -> str:
    """The canonical fingerprint from what a person typed (any case and separators)."""
    symbols = decode_symbols(text, what="fingerprint", hint=_FINGERPRINT_HINT)
    if len(symbols) != FINGERPRINT_LENGTH:
        raise InvalidText(
            f"a fingerprint has {FINGERPRINT_LENGTH} characters, this one has {len(symbols)}",
            hint=_FINGERPRINT_HINT,
        )
    if not has_valid_check(symbols):
        raise InvalidText("not a valid fingerprint (typo?)", hint=_FINGERPRINT_HINT)
    return _grouped(encode_symbols(symbols))


__all__ = [
    "FINGERPRINT_LENGTH",
    "PEER_ID_LENGTH",
    "fingerprint",
    "format_peer_id",
    "is_peer_id",
    "parse_fingerprint",
    "parse_peer_id",
    "peer_id_for",
]
