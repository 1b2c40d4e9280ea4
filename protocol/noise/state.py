"""CipherState, SymmetricState and HandshakeState, as sections 5.1-5.3 of the Noise
specification (revision 34) define them.

The objects and method names follow the specification so that a reader can check the code
against it line by line, and so that any vector file in the standard format runs against it.
A HandshakeState that has raised is dead: every later call raises `LocalProtocolError`, and its
keys are dropped, so a failed handshake can never be continued by mistake.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.noise.patterns import HandshakePattern, Token, resolve_pattern
from protocol.noise.suite import (
    CIPHERS,
    DHLEN,
    HASHES,
    KEMS,
    KEYLEN,
    MAX_NONCE,
    TAGLEN,
    Cipher,
    Hash,
    Kem,
    KemKeyPair,
    KeyPair,
    dh,
)

MAX_MESSAGE_LEN = 65535
PSK_LEN = 32
_ZEROS32 = bytes(32)


class CipherState:
    """A key `k` (or none) and a 64-bit nonce `n`."""

    __slots__ = ("_cipher", "k", "n")

    def __init__(self, cipher: Cipher, key: bytes | None = None) -> None:
        self._cipher = cipher
        self.k: bytes | None = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        if key is not None and len(key) != KEYLEN:
            raise LocalProtocolError(f"a cipher key has {KEYLEN} bytes")
        self.k = key
        self.n = 0

    def has_key(self) -> bool:
        return self.k is not None

    def set_nonce(self, nonce: int) -> None:
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError("a nonce is an unsigned 64-bit integer")
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        k = self.k
        if k is None:
            return plaintext
        n = self.n
        if n >= MAX_NONCE:
            raise LocalProtocolError("nonce exhausted: this cipher state must not encrypt again")
        ciphertext = self._cipher.encrypt(k, n, ad, plaintext)
        self.n = n + 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Raises DecryptError on a bad tag; then `n` is unchanged, as the spec requires."""
        k = self.k
        if k is None:
            return ciphertext
        n = self.n
        if n >= MAX_NONCE:
            raise LocalProtocolError("nonce exhausted: this cipher state must not decrypt again")
        plaintext = self._cipher.decrypt(k, n, ad, ciphertext)
        self.n = n + 1
        return plaintext

    def rekey(self) -> None:
        """REKEY(k): the first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zero bytes). `n` is kept."""
        if self.k is None:
            raise LocalProtocolError("rekey needs a key")
        self.k = self._cipher.encrypt(self.k, MAX_NONCE, b"", _ZEROS32)[:KEYLEN]

    def encrypt_with_nonce(self, nonce: int, ad: bytes, plaintext: bytes) -> bytes:
        """ENCRYPT with an explicit nonce, for transports that carry the counter on the wire."""
        if self.k is None:
            raise LocalProtocolError("encrypt needs a key")
        if not 0 <= nonce < MAX_NONCE:
            raise LocalProtocolError("nonce exhausted")
        return self._cipher.encrypt(self.k, nonce, ad, plaintext)

    def decrypt_with_nonce(self, nonce: int, ad: bytes, ciphertext: bytes) -> bytes:
        if self.k is None:
            raise LocalProtocolError("decrypt needs a key")
        if not 0 <= nonce < MAX_NONCE:
            raise RemoteProtocolError("nonce out of range", reason="bad-nonce")
        return self._cipher.decrypt(self.k, nonce, ad, ciphertext)

    def clear(self) -> None:
        self.k = None
        self.n = 0


class SymmetricState:
    """The chaining key `ck`, the handshake hash `h` and the current CipherState."""

    __slots__ = ("_cipher", "_hash", "cipher_state", "ck", "h")

    def __init__(self, protocol_name: bytes, cipher: Cipher, hash_: Hash) -> None:
        self._cipher = cipher
        self._hash = hash_
        if len(protocol_name) <= hash_.hashlen:
            self.h = protocol_name.ljust(hash_.hashlen, b"\0")
        else:
            self.h = hash_.digest(protocol_name)
        self.ck = self.h
        self.cipher_state = CipherState(cipher)

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = self._hash.hkdf(self.ck, input_key_material, 2)
        self.cipher_state.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = self._hash.new(self.h + data).digest()

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.ck, temp_h, temp_k = self._hash.hkdf(self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k[:KEYLEN])

    def get_handshake_hash(self) -> bytes:
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = self._hash.hkdf(self.ck, b"", 2)
        return (
            CipherState(self._cipher, temp_k1[:KEYLEN]),
            CipherState(self._cipher, temp_k2[:KEYLEN]),
        )


@functools.lru_cache(maxsize=64)  # every handshake parses its name: the table is constant
def parse_protocol_name(name: str) -> tuple[HandshakePattern, str, Kem | None, Cipher, Hash]:
    """`Noise_XXhfs+psk0_25519+MLKEM768_ChaChaPoly_BLAKE2b` -> (pattern, dh name, KEM or None,
    cipher, hash). A KEM is named (after the DH, with `+`) exactly when the pattern is `hfs`."""
    parts = name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise LocalProtocolError(f"{name!r} is not a Noise protocol name")
    _, pattern_text, dh_text, cipher_name, hash_name = parts
    dh_name, _, kem_name = dh_text.partition("+")
    if dh_name != "25519":
        raise LocalProtocolError(f"DH function {dh_name!r} is not supported (only 25519)")
    if cipher_name not in CIPHERS:
        raise LocalProtocolError(f"cipher {cipher_name!r} is not supported ({', '.join(CIPHERS)})")
    if hash_name not in HASHES:
        raise LocalProtocolError(f"hash {hash_name!r} is not supported ({', '.join(HASHES)})")
    pattern = resolve_pattern(pattern_text)
    kem: Kem | None = None
    if kem_name:
        if kem_name not in KEMS:
            raise LocalProtocolError(f"KEM {kem_name!r} is not supported ({', '.join(KEMS)})")
        kem = KEMS[kem_name]
    if pattern.hfs != (kem is not None):
        raise LocalProtocolError(f"{name}: a KEM is named exactly when the pattern is hfs")
    return pattern, dh_name, kem, CIPHERS[cipher_name], HASHES[hash_name]


@functools.lru_cache(maxsize=64)
def message_overheads(protocol_name: str) -> tuple[int, ...]:
    """The bytes each handshake message of `protocol_name` carries besides its payload's
    plaintext: keys, KEM public keys and ciphertexts, and every AEAD tag (the payload's too).
    A message is exactly this long plus its payload (SPEC.md section 4.1 lists them)."""
    pattern, _dh, kem, _cipher, _hash = parse_protocol_name(protocol_name)
    psk_mode = pattern.psk_count > 0
    has_key = False
    sizes = []
    for tokens in pattern.messages:
        size = 0
        for token in tokens:
            if token is Token.E:
                size += DHLEN
                has_key = has_key or psk_mode
            elif token in (Token.S, Token.E1, Token.EKEM1):
                assert kem is not None or token is Token.S
                size += {
                    Token.S: DHLEN,
                    Token.E1: kem.public_len if kem else 0,
                    Token.EKEM1: kem.ciphertext_len if kem else 0,
                }[token] + (TAGLEN if has_key else 0)
                has_key = has_key or token is Token.EKEM1
            else:  # a DH or a PSK: MixKey
                has_key = True
        sizes.append(size + (TAGLEN if has_key else 0))
    return tuple(sizes)


def _keypair(key: KeyPair | bytes | None) -> KeyPair | None:
    if key is None or isinstance(key, KeyPair):
        return key
    return KeyPair.from_private(key)


class HandshakeState:
    """One side of a Noise handshake.

    `s` and `e` are this side's static and ephemeral key pairs (or their private keys); `e` is
    only given to reproduce test vectors, otherwise it is generated fresh when the pattern needs
    it. `rs` and `re` are the remote public keys known in advance (pre-messages). `psks` are the
    pre-shared keys, consumed in the order the pattern's psk tokens appear.

    HFS patterns (`e1`, `ekem1`) use the KEM their protocol name selects. `e1` (a KEM key pair,
    or the 64-byte ML-KEM seed d || z) and `kem` (another implementation of the same KEM, e.g.
    one whose encapsulation is derandomised) exist only to reproduce test vectors.
    """

    __slots__ = (
        "_dead",
        "_index",
        "_initiator",
        "_kem",
        "_pattern",
        "_psk_mode",
        "_psks",
        "_result",
        "e",
        "e1",
        "protocol_name",
        "re",
        "re1",
        "rs",
        "s",
        "symmetric",
    )

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        *,
        s: KeyPair | bytes | None = None,
        e: KeyPair | bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
        e1: KemKeyPair | bytes | None = None,
        kem: Kem | None = None,
    ) -> None:
        pattern, _dh, named_kem, cipher, hash_ = parse_protocol_name(protocol_name)
        if kem is not None and (named_kem is None or kem.name != named_kem.name):
            raise LocalProtocolError(f"{protocol_name} does not use the KEM {kem.name}")
        self._kem = kem or named_kem
        self.protocol_name = protocol_name
        self._pattern = pattern
        self._initiator = initiator
        self.s = _keypair(s)
        self.e = _keypair(e)
        self.rs = rs
        self.re = re
        if isinstance(e1, bytes):
            if self._kem is None:
                raise LocalProtocolError(f"{protocol_name} uses no KEM")
            e1 = self._kem.from_seed(e1)
        self.e1: KemKeyPair | None = e1
        self.re1: bytes | None = None
        if len(psks) != pattern.psk_count:
            raise LocalProtocolError(
                f"{protocol_name} needs {pattern.psk_count} PSK(s), {len(psks)} given"
            )
        if any(len(p) != PSK_LEN for p in psks):
            raise LocalProtocolError(f"a PSK has {PSK_LEN} bytes")
        self._psks = list(psks)
        self._psk_mode = pattern.psk_count > 0
        self._index = 0
        self._dead = False
        self._result: tuple[CipherState, CipherState] | None = None

        self._check_keys()
        self.symmetric = SymmetricState(protocol_name.encode("ascii"), cipher, hash_)
        self.symmetric.mix_hash(prologue)
        # Pre-messages: the initiator's keys first, then the responder's (section 7.1).
        for tokens, mine in (
            (pattern.initiator_pre, initiator),
            (pattern.responder_pre, not initiator),
        ):
            for token in tokens:
                self.symmetric.mix_hash(self._pre_key(token, mine))

    def _pre_key(self, token: Token, mine: bool) -> bytes:
        if token is Token.S:
            key = self.s.public if mine and self.s else (None if mine else self.rs)
        else:
            key = self.e.public if mine and self.e else (None if mine else self.re)
        assert key is not None  # _check_keys guarantees it
        return key

    def _check_keys(self) -> None:
        p = self._pattern
        mine, theirs = (
            (p.initiator_pre, p.responder_pre)
            if self._initiator
            else (p.responder_pre, p.initiator_pre)
        )
        if Token.S in mine and self.s is None:
            raise LocalProtocolError(f"{self.protocol_name}: this side's static key is needed")
        if Token.S in theirs and self.rs is None:
            raise LocalProtocolError(f"{self.protocol_name}: the remote static key is needed")
        if Token.E in theirs and self.re is None:
            raise LocalProtocolError(f"{self.protocol_name}: the remote ephemeral key is needed")
        my_turns = range(0 if self._initiator else 1, len(p.messages), 2)
        if self.s is None and any(Token.S in p.messages[i] for i in my_turns):
            raise LocalProtocolError(f"{self.protocol_name}: this side's static key is needed")

    # -- state ---------------------------------------------------------------------------------

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def complete(self) -> bool:
        return self._result is not None

    @property
    def message_index(self) -> int:
        return self._index

    def is_my_turn(self) -> bool:
        return not self.complete and (self._index % 2 == 0) == self._initiator

    def get_handshake_hash(self) -> bytes:
        return self.symmetric.get_handshake_hash()

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.get_handshake_hash()

    def split(self) -> tuple[CipherState, CipherState]:
        """(c1, c2): c1 encrypts initiator to responder, c2 responder to initiator."""
        if self._result is None:
            raise LocalProtocolError("the handshake is not complete")
        return self._result

    def _die(self) -> None:
        self._dead = True
        self.symmetric.cipher_state.clear()
        self.symmetric.ck = b""
        self.e = None
        self.e1 = None
        self._psks = []

    def _begin(self, writing: bool) -> tuple[Token, ...]:
        if self._dead:
            raise LocalProtocolError("this handshake failed earlier; start a new one")
        if self._result is not None:
            raise LocalProtocolError("the handshake is already complete; use split()")
        if self.is_my_turn() != writing:
            verb = "write" if writing else "read"
            raise LocalProtocolError(f"it is not this side's turn to {verb} a handshake message")
        return self._pattern.messages[self._index]

    def _end(self) -> None:
        self._index += 1
        if self._index == len(self._pattern.messages):
            self._result = self.symmetric.split()

    def _dh_for(self, token: Token) -> bytes:
        s, e = self.s, self.e
        if token is Token.EE:
            local, remote = e, self.re
        elif token is Token.SS:
            local, remote = s, self.rs
        elif (token is Token.ES) == self._initiator:
            local, remote = e, self.rs
        else:
            local, remote = s, self.re
        if local is None or remote is None:
            raise LocalProtocolError(f"{self.protocol_name}: a key for {token.name} is missing")
        return dh(local.private, remote)

    # -- messages ------------------------------------------------------------------------------

    def write_message(self, payload: bytes = b"") -> bytes:
        tokens = self._begin(writing=True)
        try:
            out = self._write(tokens, payload)
        except ProtocolError:
            self._die()
            raise
        self._end()
        return out

    def _write(self, tokens: tuple[Token, ...], payload: bytes) -> bytes:
        sym = self.symmetric
        parts: list[bytes] = []
        for token in tokens:
            if token is Token.E:
                if self.e is None:
                    self.e = KeyPair.generate()
                parts.append(self.e.public)
                sym.mix_hash(self.e.public)
                if self._psk_mode:
                    sym.mix_key(self.e.public)
            elif token is Token.S:
                assert self.s is not None
                parts.append(sym.encrypt_and_hash(self.s.public))
            elif token is Token.PSK:
                sym.mix_key_and_hash(self._psks.pop(0))
            elif token is Token.E1:
                assert self._kem is not None  # parse_protocol_name: hfs names a KEM
                if self.e1 is None:
                    self.e1 = self._kem.generate()
                parts.append(sym.encrypt_and_hash(self.e1.public))
            elif token is Token.EKEM1:
                assert self._kem is not None  # parse_protocol_name: hfs names a KEM
                assert self.re1 is not None  # the pattern puts e1 before ekem1
                ciphertext, secret = self._kem.encapsulate(self.re1)
                parts.append(sym.encrypt_and_hash(ciphertext))
                sym.mix_key(secret)
            else:
                sym.mix_key(self._dh_for(token))
        parts.append(sym.encrypt_and_hash(payload))
        out = b"".join(parts)
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalProtocolError(
                f"a Noise message is at most {MAX_MESSAGE_LEN} bytes; this one would be {len(out)}"
            )
        return out

    def read_message(self, message: bytes) -> bytes:
        tokens = self._begin(writing=False)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise RemoteProtocolError(
                    f"a Noise message is at most {MAX_MESSAGE_LEN} bytes", reason="oversize"
                )
            payload = self._read(tokens, message)
        except ProtocolError:
            self._die()
            raise
        self._end()
        return payload

    def _read(self, tokens: tuple[Token, ...], message: bytes) -> bytes:
        sym = self.symmetric
        view = memoryview(message)
        pos = 0
        for token in tokens:
            if token is Token.E:
                if len(message) - pos < DHLEN:
                    raise RemoteProtocolError("handshake message too short", reason="truncated")
                self.re = bytes(view[pos : pos + DHLEN])
                pos += DHLEN
                sym.mix_hash(self.re)
                if self._psk_mode:
                    sym.mix_key(self.re)
            elif token is Token.S:
                n = DHLEN + TAGLEN if sym.cipher_state.has_key() else DHLEN
                if len(message) - pos < n:
                    raise RemoteProtocolError("handshake message too short", reason="truncated")
                self.rs = sym.decrypt_and_hash(bytes(view[pos : pos + n]))
                pos += n
            elif token is Token.PSK:
                sym.mix_key_and_hash(self._psks.pop(0))
            elif token is Token.E1 or token is Token.EKEM1:
                kem = self._kem
                assert kem is not None  # parse_protocol_name: hfs names a KEM
                n = kem.public_len if token is Token.E1 else kem.ciphertext_len
                if sym.cipher_state.has_key():
                    n += TAGLEN
                if len(message) - pos < n:
                    raise RemoteProtocolError("handshake message too short", reason="truncated")
                value = sym.decrypt_and_hash(bytes(view[pos : pos + n]))
                pos += n
                if token is Token.E1:
                    self.re1 = value
                else:
                    assert self.e1 is not None  # this side wrote e1 before
                    secret = kem.decapsulate(self.e1, value)
                    self.e1 = None  # used once: forward secrecy needs it gone
                    sym.mix_key(secret)
            else:
                sym.mix_key(self._dh_for(token))
        rest = bytes(view[pos:])
        if sym.cipher_state.has_key() and len(rest) < TAGLEN:
            raise RemoteProtocolError("handshake message too short", reason="truncated")
        return sym.decrypt_and_hash(rest)
