"""Strict msgpack decoding, signatures with context labels, and the checksummed text alphabet.

Every identity object is a msgpack array with a fixed field order. Decoding is strict so that one
object has exactly one encoding: exact types (a msgpack bool is not an int, a str is not a bin),
exact lengths, bounded sizes, and the decoded value must re-encode to the very bytes received.
That makes "the same object" and "the same bytes" one notion, which the trust store relies on
when it compares a replayed statement or certificate with the one it holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import nacl.exceptions
import nacl.signing

from protocol import _msgpack
from protocol._msgpack import unpack_canonical
from protocol.errors import LocalProtocolError
from protocol.identity.errors import BadSignature, InvalidText, MalformedObject

ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
X25519_PUBLIC_BYTES = 32
# Shared with the transfer codec (protocol/_msgpack.py); re-exported for this package.
MAX_INT_FIELD = _msgpack.MAX_INT_FIELD
pack = _msgpack.pack

# -- msgpack ---------------------------------------------------------------------------------


def unpack(data: bytes, *, what: str, max_size: int, length: int) -> list[Any]:
    """Decode one msgpack array of exactly `length` fields, canonically encoded."""
    return unpack_canonical(
        data, what=what, max_size=max_size, error=MalformedObject, length=length
    )


def want_int(value: Any, what: str, *, lo: int = 0, hi: int = MAX_INT_FIELD) -> int:
    if type(value) is not int:
        raise MalformedObject(f"{what} must be an integer")
    if not lo <= value <= hi:
        raise MalformedObject(f"{what} is out of range ({value} not in {lo}..{hi})")
    return value


def want_bytes(value: Any, what: str, length: int) -> bytes:
    if type(value) is not bytes:
        raise MalformedObject(f"{what} must be a byte string")
    if len(value) != length:
        raise MalformedObject(f"{what} must be {length} bytes, not {len(value)}")
    return value


def want_blob(value: Any, what: str, max_length: int) -> bytes:
    if type(value) is not bytes:
        raise MalformedObject(f"{what} must be a byte string")
    if len(value) > max_length:
        raise MalformedObject(f"{what} is longer than {max_length} bytes")
    return value


def want_str(value: Any, what: str, max_bytes: int) -> str:
    if type(value) is not str:
        raise MalformedObject(f"{what} must be a string")
    if len(value.encode("utf-8")) > max_bytes:
        raise MalformedObject(f"{what} is longer than {max_bytes} bytes")
    return value


def want_version(value: Any, what: str, supported: int) -> None:
    version = want_int(value, f"{what} version")
    if version != supported:
        raise MalformedObject(
            f"{what} has version {version}; this peerd understands version {supported}",
            reason="unsupported-version",
        )


# -- signatures ------------------------------------------------------------------------------


def sign(seed: bytes, context: bytes, body: bytes) -> bytes:
    """Ed25519 over `context || body`; `seed` is the 32-byte private key."""
    assert context.endswith(b"\0")
    if len(seed) != 32:
        raise LocalProtocolError("an Ed25519 private key (seed) has 32 bytes")
    signature: bytes = nacl.signing.SigningKey(seed).sign(context + body).signature
    return signature


def verify(public: bytes, context: bytes, body: bytes, signature: bytes, *, what: str) -> None:
    try:
        nacl.signing.VerifyKey(public).verify(context + body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise BadSignature(f"{what}: the signature does not verify") from exc


def ed25519_public(seed: bytes) -> bytes:
    if len(seed) != 32:
        raise LocalProtocolError("an Ed25519 private key (seed) has 32 bytes")
    public: bytes = bytes(nacl.signing.SigningKey(seed).verify_key)
    return public


def digest(context: bytes, data: bytes) -> bytes:
    """BLAKE2b-256 of `context || data`."""
    return hashlib.blake2b(context + data, digest_size=32).digest()


# -- text: Crockford's base32 alphabet, lowercase, with a Reed-Solomon check -------------------

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
# Crockford's rule: letters that look like digits read as those digits.
_VALUE.update({"o": 0, "i": 1, "l": 1})
SEPARATORS = frozenset("- \t\r\n")

# GF(32) with the primitive polynomial x^5 + x^2 + 1; alpha = x = 2.
_EXP = [0] * 62
_LOG = [0] * 32
_x = 1
for _i in range(31):
    _EXP[_i] = _EXP[_i + 31] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x20:
        _x ^= 0x25
del _x, _i


def _gmul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


# g(x) = (x - a)(x - a^2) = x^2 + (a + a^2) x + a^3 over GF(2^5)
_G1 = 2 ^ 4
_G0 = 8


def check_symbols(symbols: Sequence[int]) -> tuple[int, int]:
    """The two Reed-Solomon check symbols: remainder of m(x) * x^2 divided by g(x).

    With them appended, any one or two wrong symbols (a typo, two typos, or two swapped
    characters) are always detected; a random string passes with probability 1/1024.
    """
    r1 = r0 = 0
    for s in symbols:
        feedback = s ^ r1
        r1 = r0 ^ _gmul(feedback, _G1)
        r0 = _gmul(feedback, _G0)
    return r1, r0


def has_valid_check(symbols: Sequence[int]) -> bool:
    """c(a) == 0 and c(a^2) == 0 for the codeword, first symbol the highest coefficient."""
    for root in (2, 4):
        acc = 0
        for s in symbols:
            acc = _gmul(acc, root) ^ s
        if acc:
            return False
    return True


def bits_to_symbols(data: bytes, count: int) -> list[int]:
    """The first `count` 5-bit groups of `data`, most significant bit first."""
    value = int.from_bytes(data, "big")
    total = len(data) * 8
    assert count * 5 <= total
    return [(value >> (total - 5 * (i + 1))) & 31 for i in range(count)]


def encode_symbols(symbols: Sequence[int]) -> str:
    return "".join(ALPHABET[s] for s in symbols)


def decode_symbols(text: str, *, what: str, hint: str) -> list[int]:
    """Symbols of `text`, ignoring case and separators; any other character is an error."""
    out: list[int] = []
    for ch in text.lower():
        if ch in SEPARATORS:
            continue
        value = _VALUE.get(ch)
        if value is None:
            raise InvalidText(f"{what}: {ch!r} is not a valid character", hint=hint)
        out.append(value)
    return out


def bytes_to_text(data: bytes) -> str:
    """All of `data` in base32 (zero bits pad the last symbol).

    Five bytes at a time (40 bits, 8 symbols): linear in the length, where one big integer
    for the whole text made encoding and decoding quadratic (a 1 MiB paste took a minute)."""
    out: list[str] = []
    for i in range(0, len(data), 5):
        block = data[i : i + 5]
        value = int.from_bytes(block.ljust(5, b"\0"), "big")
        symbols = (len(block) * 8 + 4) // 5
        out.extend(ALPHABET[(value >> (35 - 5 * j)) & 31] for j in range(symbols))
    return "".join(out)


def text_to_bytes(symbols: Sequence[int], *, what: str, hint: str) -> bytes:
    """Inverse of `bytes_to_text`; the length and the padding bits must be canonical."""
    nbytes = len(symbols) * 5 // 8
    if (nbytes * 8 + 4) // 5 != len(symbols):
        raise InvalidText(f"{what}: wrong length (truncated or extended)", hint=hint)
    out = bytearray()
    for i in range(0, len(symbols), 8):
        group = symbols[i : i + 8]
        value = 0
        for s in group:
            value = (value << 5) | s
        size = len(group) * 5 // 8
        pad = len(group) * 5 - size * 8
        if value & ((1 << pad) - 1):
            raise InvalidText(f"{what}: not a canonical encoding", hint=hint)
        out += (value >> pad).to_bytes(size, "big")
    return bytes(out)
