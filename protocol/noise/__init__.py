"""A Noise Protocol Framework engine (revision 34): every pattern, PSK modifiers, 25519 with
ChaChaPoly or AESGCM and BLAKE2b, BLAKE2s, SHA256 or SHA512."""

from protocol.noise.patterns import PATTERNS, HandshakePattern, Token, resolve_pattern
from protocol.noise.state import (
    MAX_MESSAGE_LEN,
    PSK_LEN,
    CipherState,
    HandshakeState,
    SymmetricState,
    parse_protocol_name,
)
from protocol.noise.suite import DHLEN, MAX_NONCE, TAGLEN, KeyPair, dh

__all__ = [
    "DHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "PATTERNS",
    "PSK_LEN",
    "TAGLEN",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "KeyPair",
    "SymmetricState",
    "Token",
    "dh",
    "parse_protocol_name",
    "resolve_pattern",
]
