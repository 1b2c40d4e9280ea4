"""The cryptographic functions a Noise protocol name selects: DH, cipher and hash.

All primitives come from libsodium (through `protocol.sodium`), except the hash functions, which are
hashlib's (OpenSSL/HACL*: the same BLAKE2b and SHA-2, without a round trip through cffi).
HMAC and HKDF are written out here as the specification defines them (section 4.3), with the
padded-key hash states precomputed, because they are the hot path of a handshake.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.utils

from protocol import sodium
from protocol.errors import LocalProtocolError, RemoteProtocolError

DHLEN = 32
KEYLEN = 32
TAGLEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the specification: never used to encrypt a message


# --- DH: Curve25519 -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair. `repr` never shows the private key."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()})"

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        if len(private) != DHLEN:
            raise LocalProtocolError(f"an X25519 private key has {DHLEN} bytes, not {len(private)}")
        return cls(private, sodium.x25519_base(private))

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS CSPRNG (libsodium's randombytes)."""
        return cls.from_private(nacl.utils.random(DHLEN))


def dh(private: bytes, public: bytes) -> bytes:
    """X25519. A low-order public key (all-zero result) is the peer's misbehaviour."""
    if len(public) != DHLEN:
        raise RemoteProtocolError("an X25519 public key has 32 bytes", reason="bad-key")
    return sodium.x25519(private, public)


# --- Ciphers --------------------------------------------------------------------------------

Encrypt = Callable[[bytes, int, bytes, bytes], bytes]
Decrypt = Callable[[bytes, int, bytes, bytes], bytes]

_le_nonce = struct.Struct("<4xQ").pack  # ChaChaPoly: 32 zero bits, then n little-endian
_be_nonce = struct.Struct(">4xQ").pack  # AESGCM: 32 zero bits, then n big-endian


def _chacha_encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return sodium.chacha20poly1305_encrypt(k, _le_nonce(n), ad, plaintext)


def _chacha_decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    return sodium.chacha20poly1305_decrypt(k, _le_nonce(n), ad, ciphertext)


def _aesgcm_encrypt(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return sodium.aes256gcm_encrypt(k, _be_nonce(n), ad, plaintext)


def _aesgcm_decrypt(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    return sodium.aes256gcm_decrypt(k, _be_nonce(n), ad, ciphertext)


@dataclass(frozen=True, slots=True)
class Cipher:
    name: str
    encrypt: Encrypt
    decrypt: Decrypt


CIPHERS = {"ChaChaPoly": Cipher("ChaChaPoly", _chacha_encrypt, _chacha_decrypt)}
if sodium.HAVE_AESGCM:  # libsodium's AES-GCM needs AES-NI and CLMUL
    CIPHERS["AESGCM"] = Cipher("AESGCM", _aesgcm_encrypt, _aesgcm_decrypt)


# --- Hashes, HMAC, HKDF ---------------------------------------------------------------------

_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


@dataclass(frozen=True, slots=True)
class Hash:
    name: str
    hashlen: int
    blocklen: int
    new: Callable[..., Any]

    def digest(self, data: bytes) -> bytes:
        result: bytes = self.new(data).digest()
        return result

    def hmac(self, key: bytes, data: bytes) -> bytes:
        # Keys are at most HASHLEN <= BLOCKLEN here, so the key is only padded, never hashed.
        key = key.ljust(self.blocklen, b"\0")
        inner: bytes = self.new(key.translate(_IPAD) + data).digest()
        result: bytes = self.new(key.translate(_OPAD) + inner).digest()
        return result

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
        """HKDF as the specification's section 4.3 defines it: 2 or 3 outputs of HASHLEN."""
        temp_key = self.hmac(chaining_key, ikm)
        padded = temp_key.ljust(self.blocklen, b"\0")
        ipad, opad = padded.translate(_IPAD), padded.translate(_OPAD)
        new = self.new
        out1: bytes = new(opad + new(ipad + b"\x01").digest()).digest()
        out2: bytes = new(opad + new(ipad + out1 + b"\x02").digest()).digest()
        if outputs == 2:
            return out1, out2
        out3: bytes = new(opad + new(ipad + out2 + b"\x03").digest()).digest()
        return out1, out2, out3


HASHES = {
    "BLAKE2b": Hash("BLAKE2b", 64, 128, hashlib.blake2b),
    "BLAKE2s": Hash("BLAKE2s", 32, 64, hashlib.blake2s),
    "SHA256": Hash("SHA256", 32, 64, hashlib.sha256),
    "SHA512": Hash("SHA512", 64, 128, hashlib.sha512),
}
