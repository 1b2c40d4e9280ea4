"""Direct, typed calls into libsodium through PyNaCl's compiled cffi module.

`nacl.bindings` checks every argument in Python and formats its error messages eagerly; on the
handshake path that costs more than the AEAD itself (measured: ~13 us of ~31 us wrapper time per
handshake). The callers here pass fixed-size keys and nonces that they built themselves, so
those checks are done once, by the caller's types and lengths. Failures still raise: a bad tag
is `DecryptError`, a low-order point is `RemoteProtocolError`.

PyNaCl's `_sodium` module is private API; the dependency is pinned below 2 and the test suite
exercises every function here against the public bindings.
"""

from __future__ import annotations

from nacl._sodium import ffi, lib  # type: ignore[import-not-found]

from protocol.errors import DecryptError, RemoteProtocolError

if lib.sodium_init() < 0:  # pragma: no cover - libsodium cannot fail here on any real system
    raise ImportError("libsodium failed to initialise")

_new = ffi.new
_buffer = ffi.buffer
_from_buffer = ffi.from_buffer
_NULL = ffi.NULL

X25519_BYTES = 32
AEAD_TAG_BYTES = 16
AEGIS256_TAG_BYTES = 32
AEGIS256_KEY_BYTES = 32
AEGIS256_NONCE_BYTES = 32
HAVE_AESGCM = bool(lib.crypto_aead_aes256gcm_is_available())


def x25519_base(private: bytes) -> bytes:
    q = _new("unsigned char[32]")
    lib.crypto_scalarmult_base(q, private)
    result: bytes = _buffer(q, 32)[:]
    return result


def x25519(private: bytes, public: bytes) -> bytes:
    q = _new("unsigned char[32]")
    if lib.crypto_scalarmult(q, private, public) != 0:
        raise RemoteProtocolError("the peer's X25519 key is of low order", reason="low-order-key")
    result: bytes = _buffer(q, 32)[:]
    return result


def _aead_encrypt(func: object, plaintext: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes:
    n = len(plaintext) + AEAD_TAG_BYTES
    out = _new("unsigned char[]", n)
    clen = _new("unsigned long long *")
    func(out, clen, plaintext, len(plaintext), ad, len(ad), _NULL, nonce, key)  # type: ignore[operator]
    result: bytes = _buffer(out, n)[:]
    return result


def _aead_decrypt(func: object, ciphertext: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes:
    n = len(ciphertext) - AEAD_TAG_BYTES
    if n < 0:
        raise DecryptError("ciphertext shorter than its tag", reason="truncated")
    out = _new("unsigned char[]", max(n, 1))
    mlen = _new("unsigned long long *")
    rc = func(out, mlen, _NULL, ciphertext, len(ciphertext), ad, len(ad), nonce, key)  # type: ignore[operator]
    if rc != 0:
        raise DecryptError("a message failed authentication")
    result: bytes = _buffer(out, n)[:]
    return result


def chacha20poly1305_encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    """IETF ChaCha20-Poly1305 (12-byte nonce)."""
    return _aead_encrypt(lib.crypto_aead_chacha20poly1305_ietf_encrypt, plaintext, ad, nonce, key)


def chacha20poly1305_decrypt(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes:
    return _aead_decrypt(lib.crypto_aead_chacha20poly1305_ietf_decrypt, ciphertext, ad, nonce, key)


def aes256gcm_encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    return _aead_encrypt(lib.crypto_aead_aes256gcm_encrypt, plaintext, ad, nonce, key)


def aes256gcm_decrypt(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes:
    return _aead_decrypt(lib.crypto_aead_aes256gcm_decrypt, ciphertext, ad, nonce, key)


def aegis256_encrypt_into(
    out: bytearray | memoryview, key: bytes, nonce: bytes, ad: bytes, plaintext: bytes | memoryview
) -> int:
    """AEGIS-256 into a caller-owned buffer (reused: large fresh buffers page-fault).

    Returns the ciphertext length (plaintext + 32-byte tag); `out` must be at least that long.
    """
    n = len(plaintext) + AEGIS256_TAG_BYTES
    if len(out) < n:
        raise ValueError("output buffer too small")
    clen = _new("unsigned long long *")
    lib.crypto_aead_aegis256_encrypt(
        _from_buffer(out, require_writable=True),
        clen,
        _from_buffer(plaintext),
        len(plaintext),
        ad,
        len(ad),
        _NULL,
        nonce,
        key,
    )
    return n


def aegis256_decrypt_into(
    out: bytearray | memoryview, key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes | memoryview
) -> int:
    """AEGIS-256 decryption into a caller-owned buffer; returns the plaintext length."""
    n = len(ciphertext) - AEGIS256_TAG_BYTES
    if n < 0:
        raise DecryptError("ciphertext shorter than its tag", reason="truncated")
    if len(out) < n:
        raise ValueError("output buffer too small")
    mlen = _new("unsigned long long *")
    rc = lib.crypto_aead_aegis256_decrypt(
        _from_buffer(out, require_writable=True),
        mlen,
        _NULL,
        _from_buffer(ciphertext),
        len(ciphertext),
        ad,
        len(ad),
        nonce,
        key,
    )
    if rc != 0:
        raise DecryptError("a chunk failed authentication")
    return n


def aegis256_encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    out = bytearray(len(plaintext) + AEGIS256_TAG_BYTES)
    aegis256_encrypt_into(out, key, nonce, ad, plaintext)
    return bytes(out)


def aegis256_decrypt(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes:
    out = bytearray(max(len(ciphertext) - AEGIS256_TAG_BYTES, 0))
    n = aegis256_decrypt_into(out, key, nonce, ad, ciphertext)
    return bytes(out[:n])
