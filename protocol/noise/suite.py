"""The cryptographic functions a Noise protocol name selects: DH, KEM, cipher and hash.

All primitives come from libsodium (through `protocol.sodium`), except the hash functions, which are
hashlib's (OpenSSL/HACL*: the same BLAKE2b and SHA-2, without a round trip through cffi), and the
KEM, ML-KEM-768 (FIPS 203), which libsodium does not have: it is pyca/cryptography's.
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
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import mlkem

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


# --- KEM: ML-KEM-768 (FIPS 203), for the HFS tokens e1 / ekem1 ----------------------------


@dataclass(frozen=True, slots=True)
class KemKeyPair:
    """A KEM key pair: the library's private key object and the encoded public key. `repr`
    never shows the private key."""

    private: Any
    public: bytes

    def __repr__(self) -> str:
        return f"KemKeyPair(public={self.public[:16].hex()}...)"


@dataclass(frozen=True, slots=True)
class Kem:
    """The KEM functions of the HFS extension (section 3). `encapsulate(public)` returns
    (ciphertext, shared secret); `decapsulate(pair, ciphertext)` the shared secret. A malformed
    peer public key or ciphertext raises RemoteProtocolError; a well-formed but altered
    ciphertext yields another secret (ML-KEM's implicit rejection), so the next AEAD fails."""

    name: str
    public_len: int
    ciphertext_len: int
    generate: Callable[[], KemKeyPair]
    from_seed: Callable[[bytes], KemKeyPair]
    encapsulate: Callable[[bytes], tuple[bytes, bytes]]
    decapsulate: Callable[[KemKeyPair, bytes], bytes]


MLKEM768_SEED_LEN = 64  # d || z of FIPS 203 ML-KEM.KeyGen_internal


def _unavailable(exc: UnsupportedAlgorithm) -> LocalProtocolError:
    return LocalProtocolError(
        "ML-KEM-768 is not available: pyca/cryptography >= 47 built with an OpenSSL/AWS-LC that "
        f"has ML-KEM is required ({exc})"
    )


def _mlkem768_pair(private: mlkem.MLKEM768PrivateKey) -> KemKeyPair:
    return KemKeyPair(private, private.public_key().public_bytes_raw())


def _mlkem768_generate() -> KemKeyPair:
    try:
        return _mlkem768_pair(mlkem.MLKEM768PrivateKey.generate())
    except UnsupportedAlgorithm as exc:
        raise _unavailable(exc) from exc


def _mlkem768_from_seed(seed: bytes) -> KemKeyPair:
    if len(seed) != MLKEM768_SEED_LEN:
        raise LocalProtocolError(f"an ML-KEM-768 seed has {MLKEM768_SEED_LEN} bytes")
    try:
        return _mlkem768_pair(mlkem.MLKEM768PrivateKey.from_seed_bytes(seed))
    except UnsupportedAlgorithm as exc:
        raise _unavailable(exc) from exc


def _mlkem768_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    try:
        secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(public).encapsulate()
    except ValueError as exc:  # wrong length, or coefficients not reduced (FIPS 203 7.2)
        raise RemoteProtocolError(
            "an invalid ML-KEM-768 encapsulation key", reason="bad-key"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise _unavailable(exc) from exc
    return ciphertext, secret


def _mlkem768_decapsulate(pair: KemKeyPair, ciphertext: bytes) -> bytes:
    try:
        secret: bytes = pair.private.decapsulate(ciphertext)
    except ValueError as exc:  # only a wrong length; the reader always slices the right one
        raise RemoteProtocolError("an invalid ML-KEM-768 ciphertext", reason="bad-key") from exc
    return secret


MLKEM768 = Kem(
    "MLKEM768",
    public_len=1184,
    ciphertext_len=1088,
    generate=_mlkem768_generate,
    from_seed=_mlkem768_from_seed,
    encapsulate=_mlkem768_encapsulate,
    decapsulate=_mlkem768_decapsulate,
)
KEMS = {"MLKEM768": MLKEM768}


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
