"""A Noise Protocol Framework engine (revision 34): every pattern, PSK modifiers, the HFS
modifier (KEM-based hybrid forward secrecy, ML-KEM-768), 25519 with ChaChaPoly or AESGCM and
BLAKE2b, BLAKE2s, SHA256 or SHA512."""

from protocol.noise.patterns import PATTERNS, HandshakePattern, Token, resolve_pattern
from protocol.noise.state import (
    MAX_MESSAGE_LEN,
    PSK_LEN,
    CipherState,
    HandshakeState,
    SymmetricState,
    message_overheads,
    parse_protocol_name,
)
from protocol.noise.suite import (
    DHLEN,
    KEMS,
    MAX_NONCE,
    MLKEM768,
    TAGLEN,
    Kem,
    KemKeyPair,
    KeyPair,
    dh,
)

__all__ = [
    "DHLEN",
    "KEMS",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "MLKEM768",
    "PATTERNS",
    "PSK_LEN",
    "TAGLEN",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "Kem",
    "KemKeyPair",
    "KeyPair",
    "SymmetricState",
    "Token",
    "dh",
    "message_overheads",
    "parse_protocol_name",
    "resolve_pattern",
]
