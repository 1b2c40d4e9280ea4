"""Test vectors for the hybrid (HFS, X25519 + ML-KEM-768) Noise protocols, in the cacophony JSON
shape, made from fixed seeds by a second, deliberately separate implementation.

Nothing here uses `protocol.noise` or pyca/cryptography: the symmetric state is written out from
protocol/SPEC.md sections 1 and 4.1 with the standard library's `hmac` and `hashlib`, X25519 and
ChaCha20-Poly1305 are libsodium's through PyNaCl's raw bindings, and ML-KEM-768 is `kyber-py`, a
pure-Python FIPS 203 implementation. So the vectors check our engine (and pyca's ML-KEM) against
an independent reading of the specification, not against itself.

Reproducible: every key comes from BLAKE2b of a label, and ML-KEM is derandomised as FIPS 203
allows for testing: key generation from the 64-byte seed d || z (ML-KEM.KeyGen_internal, which
pyca also offers as `from_seed_bytes`) and encapsulation from the 32-byte message m
(ML-KEM.Encaps_internal, Algorithm 17, which pyca does not expose: kyber-py does). Besides
cacophony's fields a vector has `<role>_kem_seed` for the side that writes `e1` and
`<role>_kem_encaps_m` for the side that writes `ekem1`.

Regenerate with `python -m tests.protocol.hfs_vectors` (the test checks the file is what this
module makes).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kyber_py.ml_kem import ML_KEM_768
from nacl import bindings

PATH = Path(__file__).parent / "data" / "hfs-25519+mlkem768-chachapoly-blake2b.json"
SUITE = "25519+MLKEM768_ChaChaPoly_BLAKE2b"
HASHLEN = 64
TAGLEN = 16

# Token lists as SPEC.md sections 4.1 and 4.7 (peerd's XX three and its resumption, KKhfs+psk0)
# and the HFS extension's section 5 write them (NN, IK, KK: one-round-trip patterns).
PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "XXhfs": ((), (), (("e", "e1"), ("e", "ee", "ekem1", "s", "es"), ("s", "se"))),
    "XXhfs+psk0": ((), (), (("psk", "e", "e1"), ("e", "ee", "ekem1", "s", "es"), ("s", "se"))),
    "XXhfs+psk3": ((), (), (("e", "e1"), ("e", "ee", "ekem1", "s", "es"), ("s", "se", "psk"))),
    "NNhfs": ((), (), (("e", "e1"), ("e", "ee", "ekem1"))),
    "IKhfs": ((), ("s",), (("e", "es", "e1", "s", "ss"), ("e", "ee", "ekem1", "se"))),
    "KKhfs": (("s",), ("s",), (("e", "es", "e1", "ss"), ("e", "ee", "ekem1", "se"))),
    # peerd's resumption (SPEC.md 4.7): KKhfs with the ticket's PSK first.
    "KKhfs+psk0": (
        ("s",),
        ("s",),
        (("psk", "e", "es", "e1", "ss"), ("e", "ee", "ekem1", "se")),
    ),
}
# peerd's derivations from the chaining key (SPEC.md 4.7), written out again.
EARLY_LABEL = b"peerd/v1/early-data"
RESUMPTION_LABEL = b"peerd/v1/resumption"
PAYLOADS = [b"Ludwig von Mises", b"Murray Rothbard", b"F. A. Hayek", b"Carl Menger",
            b"Jean-Baptiste Say", b"Eugen B\xf6hm von Bawerk"]  # fmt: skip


def _fixed(label: str, n: int = 32) -> bytes:
    return hashlib.blake2b(label.encode(), person=b"peerd-hfs-vec", digest_size=n).digest()


def peerd_prologue(network: str, protocol_name: str) -> bytes:
    """SPEC.md section 1.1, written out again."""
    net, name = network.encode(), protocol_name.encode()
    return b"peerd\x00\x01" + bytes([len(net)]) + net + bytes([len(name)]) + name


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2b).digest()


def _hkdf(ck: bytes, ikm: bytes, n: int) -> list[bytes]:
    temp = _hmac(ck, ikm)
    out = [_hmac(temp, b"\x01")]
    for i in range(2, n + 1):
        out.append(_hmac(temp, out[-1] + bytes([i])))
    return out


def _x25519_public(private: bytes) -> bytes:
    return bytes(bindings.crypto_scalarmult_base(private))


@dataclass
class _Side:
    initiator: bool
    s: bytes | None
    e: bytes
    psk: bytes | None
    kem_seed: bytes
    kem_m: bytes
    rs: bytes | None = None
    re: bytes | None = None
    re1: bytes | None = None
    dk: bytes | None = None
    ck: bytes = b""
    h: bytes = b""
    k: bytes | None = None
    n: int = 0
    used: set[str] = field(default_factory=set)

    # -- SymmetricState, as in the Noise specification section 5.2 -----------------------------

    def init(self, name: str, prologue: bytes, pre: tuple[tuple[str, ...], tuple[str, ...]]):
        raw = name.encode()
        self.h = raw.ljust(HASHLEN, b"\0") if len(raw) <= HASHLEN else hashlib.blake2b(raw).digest()
        self.ck = self.h
        self.mix_hash(prologue)
        for owner_is_initiator, tokens in ((True, pre[0]), (False, pre[1])):
            for _ in tokens:  # only "s" in these patterns
                mine = owner_is_initiator == self.initiator
                assert self.s is not None
                self.mix_hash(_x25519_public(self.s) if mine else self.rs or b"")

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.blake2b(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, k = _hkdf(self.ck, ikm, 2)
        self.k, self.n = k[:32], 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, th, k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(th)
        self.k, self.n = k[:32], 0

    def _nonce(self) -> bytes:
        return bytes(4) + struct.pack("<Q", self.n)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            out = plaintext
        else:
            out = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
                plaintext, self.h, self._nonce(), self.k
            )
            self.n += 1
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self.k is None:
            out = ciphertext
        else:
            out = bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, self.h, self._nonce(), self.k
            )
            self.n += 1
        self.mix_hash(ciphertext)
        return out

    # -- tokens ------------------------------------------------------------------------------

    def dh(self, token: str) -> bytes:
        mine, theirs = (
            token[0] if self.initiator else token[1],
            token[1] if self.initiator else token[0],
        )
        local = self.e if mine == "e" else self.s
        remote = self.re if theirs == "e" else self.rs
        assert local is not None
        assert remote is not None
        return bytes(bindings.crypto_scalarmult(local, remote))

    def write(self, tokens: tuple[str, ...], payload: bytes, psk_mode: bool) -> bytes:
        out = b""
        for t in tokens:
            if t == "e":
                pub = _x25519_public(self.e)
                out += pub
                self.mix_hash(pub)
                if psk_mode:
                    self.mix_key(pub)
            elif t == "s":
                assert self.s is not None
                out += self.encrypt_and_hash(_x25519_public(self.s))
            elif t == "e1":
                ek, self.dk = ML_KEM_768.key_derive(self.kem_seed)
                out += self.encrypt_and_hash(ek)
            elif t == "ekem1":
                assert self.re1 is not None
                secret, ciphertext = ML_KEM_768._encaps_internal(self.re1, self.kem_m)
                out += self.encrypt_and_hash(ciphertext)
                self.mix_key(secret)
            elif t == "psk":
                assert self.psk is not None
                self.mix_key_and_hash(self.psk)
            else:
                self.mix_key(self.dh(t))
            self.used.add(t)
        return out + self.encrypt_and_hash(payload)

    def read(self, tokens: tuple[str, ...], message: bytes, psk_mode: bool) -> bytes:
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            n += TAGLEN if self.k is not None else 0
            chunk = message[pos : pos + n]
            pos += n
            return self.decrypt_and_hash(chunk)

        for t in tokens:
            if t == "e":
                self.re = message[pos : pos + 32]
                pos += 32
                self.mix_hash(self.re)
                if psk_mode:
                    self.mix_key(self.re)
            elif t == "s":
                self.rs = take(32)
            elif t == "e1":
                self.re1 = take(1184)
            elif t == "ekem1":
                assert self.dk is not None
                self.mix_key(ML_KEM_768.decaps(self.dk, take(1088)))
            elif t == "psk":
                assert self.psk is not None
                self.mix_key_and_hash(self.psk)
            else:
                self.mix_key(self.dh(t))
        return self.decrypt_and_hash(message[pos:])

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1[:32], k2[:32]


def _transport(key: bytes, n: int, payload: bytes) -> bytes:
    nonce = bytes(4) + struct.pack("<Q", n)
    return bytes(bindings.crypto_aead_chacha20poly1305_ietf_encrypt(payload, b"", nonce, key))


def make_vector(pattern: str, prologue: bytes) -> dict[str, Any]:
    name = f"Noise_{pattern}_{SUITE}"
    ipre, rpre, messages = PATTERNS[pattern]
    psk_mode = any("psk" in m for m in messages)
    psk = _fixed(f"{name}/psk") if psk_mode else None
    sides = {
        role: _Side(
            initiator=role == "init",
            s=_fixed(f"{name}/{role}/static"),
            e=_fixed(f"{name}/{role}/ephemeral"),
            psk=psk,
            kem_seed=_fixed(f"{name}/{role}/kem-seed", 64),
            kem_m=_fixed(f"{name}/{role}/kem-encaps-m"),
        )
        for role in ("init", "resp")
    }
    init, resp = sides["init"], sides["resp"]
    # Pre-messages: each side knows the other's static key when the pattern says so.
    if rpre:
        init.rs = _x25519_public(resp.s or b"")
    if ipre:
        resp.rs = _x25519_public(init.s or b"")
    for side in sides.values():
        side.init(name, prologue, (ipre, rpre))
    wire = []
    early_key = b""
    for i, tokens in enumerate(messages):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        payload = PAYLOADS[i]
        ciphertext = writer.write(tokens, payload, psk_mode)
        assert reader.read(tokens, ciphertext, psk_mode) == payload
        wire.append({"payload": payload.hex(), "ciphertext": ciphertext.hex()})
        if i == 0:
            assert init.ck == resp.ck
            early_key = _hkdf(init.ck, EARLY_LABEL, 2)[0][:32]
    assert init.h == resp.h
    assert init.split() == resp.split()
    c1, c2 = init.split()
    counters = [0, 0]
    for i in range(len(messages), len(PAYLOADS)):
        from_initiator = i % 2 == 0
        payload = PAYLOADS[i]
        key = c1 if from_initiator else c2
        ct = _transport(key, counters[not from_initiator], payload)
        counters[not from_initiator] += 1
        wire.append({"payload": payload.hex(), "ciphertext": ct.hex()})

    vector: dict[str, Any] = {"protocol_name": name}
    for role, side in sides.items():
        vector[f"{role}_prologue"] = prologue.hex()
        if psk is not None:
            vector[f"{role}_psks"] = [psk.hex()]
        if "s" in side.used or (ipre if role == "init" else rpre):
            vector[f"{role}_static"] = (side.s or b"").hex()
        vector[f"{role}_ephemeral"] = side.e.hex()
        if side.rs is not None and (rpre if role == "init" else ipre):
            vector[f"{role}_remote_static"] = side.rs.hex()
        if "e1" in side.used:
            vector[f"{role}_kem_seed"] = side.kem_seed.hex()
        if "ekem1" in side.used:
            vector[f"{role}_kem_encaps_m"] = side.kem_m.hex()
    vector["handshake_hash"] = init.h.hex()
    vector["messages"] = wire
    if prologue.startswith(b"peerd\x00"):
        # Every peerd session leaves resumption tickets; a resumption's message 1 an early key.
        vector["peerd_resumption_tickets"] = [
            t[:48].hex() for t in _hkdf(init.ck, RESUMPTION_LABEL, 2)
        ]
        if pattern == "KKhfs+psk0":
            vector["peerd_early_key"] = early_key.hex()
    return vector


def make_vectors() -> dict[str, Any]:
    john_galt = b"John Galt"  # cacophony's prologue
    vectors = [make_vector(p, john_galt) for p in PATTERNS]
    # peerd's own four, with its prologue for a network "vectors" (SPEC.md 1.1).
    for pattern in ("XXhfs", "XXhfs+psk0", "XXhfs+psk3", "KKhfs+psk0"):
        vectors.append(make_vector(pattern, peerd_prologue("vectors", f"Noise_{pattern}_{SUITE}")))
    return {"vectors": vectors}


def render() -> str:
    return json.dumps(make_vectors(), indent=1) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH}")
