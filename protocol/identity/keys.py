"""Key material helpers: fresh Ed25519 seeds, and the text form of an authority public key.

An authority public key goes into every member's configuration file, so it has a checksummed
text form like the invite token: `peerd-authority-1-` then Crockford base32 (lowercase) of
`key || check`, `check` being the first 4 bytes of BLAKE2b-256("peerd/v1/authority-key\\0" || key).
"""

from __future__ import annotations

import nacl.utils

from protocol.errors import LocalProtocolError
from protocol.identity._codec import bytes_to_text, decode_symbols, digest, text_to_bytes
from protocol.identity.errors import InvalidText

AUTHORITY_PREFIX = "peerd-authority-1-"
_CHECK_CONTEXT = b"peerd/v1/authority-key\0"
_HINT = "copy the key exactly as `peerd authority init` printed it (peerd-authority-1-...)"


def new_identity_seed() -> bytes:
    """A fresh Ed25519 private key (32-byte seed) from the OS CSPRNG (libsodium)."""
    seed: bytes = nacl.utils.random(32)
    return seed


def format_authority_key(public: bytes) -> str:
    if len(public) != 32:
        raise LocalProtocolError("an authority key is a 32-byte Ed25519 public key")
    return AUTHORITY_PREFIX + bytes_to_text(public + digest(_CHECK_CONTEXT, public)[:4])


def parse_authority_key(text: str) -> bytes:
    cleaned = "".join(text.split()).lower()
    if not cleaned.startswith(AUTHORITY_PREFIX):
        raise InvalidText("this is not a peerd authority key", hint=_HINT)
    raw = text_to_bytes(
        decode_symbols(cleaned[len(AUTHORITY_PREFIX) :], what="authority key", hint=_HINT),
        what="authority key",
        hint=_HINT,
    )
    if len(raw) != 36:
        raise InvalidText("the authority key has the wrong length", hint=_HINT)
    key, check = raw[:32], raw[32:]
    if digest(_CHECK_CONTEXT, key)[:4] != check:
        raise InvalidText("the authority key is damaged (checksum mismatch)", hint=_HINT)
    return key


__all__ = ["AUTHORITY_PREFIX", "format_authority_key", "new_identity_seed", "parse_authority_key"]
