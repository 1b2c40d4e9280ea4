"""The Noise engine's rules beyond the vectors: tampering, sizes, nonces, REKEY, misuse,
round trips with random keys and payloads, and interoperability with `noiseprotocol`."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair as NPKeypair
from noise.connection import NoiseConnection

from protocol import sodium
from protocol.errors import DecryptError, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    PATTERNS,
    CipherState,
    HandshakeState,
    KeyPair,
    resolve_pattern,
)
from protocol.noise.patterns import Token
from protocol.noise.suite import CIPHERS, HASHES

XX = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
KEY = bytes(range(32))


def _keys_for(pattern_text: str) -> tuple[dict[str, object], dict[str, object]]:
    """Static keys and pre-shared remote keys for both sides of any pattern."""
    pattern = resolve_pattern(pattern_text)
    i_s, r_s = KeyPair.generate(), KeyPair.generate()
    psks = [bytes([i]) * 32 for i in range(pattern.psk_count)]
    init: dict[str, object] = {"s": i_s, "psks": psks}
    resp: dict[str, object] = {"s": r_s, "psks": psks}
    if Token.S in pattern.responder_pre:
        init["rs"] = r_s.public
    if Token.S in pattern.initiator_pre:
        resp["rs"] = i_s.public
    return init, resp


def _pair(name: str, prologue: bytes = b"p") -> tuple[HandshakeState, HandshakeState]:
    pattern_text = name.split("_")[1]
    ik, rk = _keys_for(pattern_text)
    return (
        HandshakeState(name, True, prologue, **ik),  # type: ignore[arg-type]
        HandshakeState(name, False, prologue, **rk),  # type: ignore[arg-type]
    )


def _run(i: HandshakeState, r: HandshakeState, payloads: list[bytes] | None = None) -> list[bytes]:
    """Run a handshake to the end; returns the messages on the wire."""
    wire = []
    for n in itertools.count():
        if i.complete and r.complete:
            return wire
        sender, receiver = (i, r) if i.is_my_turn() else (r, i)
        payload = payloads[n] if payloads and n < len(payloads) else b""
        msg = sender.write_message(payload)
        wire.append(msg)
        assert receiver.read_message(msg) == payload
    raise AssertionError("unreachable")


ALL_PATTERNS = [*sorted(PATTERNS), "XXpsk3", "NNpsk0", "IKpsk2", "NKpsk0+psk2", "XXpsk0+psk3"]


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_every_pattern_completes_with_agreeing_keys(pattern: str) -> None:
    i, r = _pair(f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b")
    _run(i, r)
    assert i.handshake_hash == r.handshake_hash
    ic1, ic2 = i.split()
    rc1, rc2 = r.split()
    assert rc1.decrypt_with_ad(b"ad", ic1.encrypt_with_ad(b"ad", b"to responder")) == (
        b"to responder"
    )
    if not resolve_pattern(pattern).one_way:
        assert ic2.decrypt_with_ad(b"", rc2.encrypt_with_ad(b"", b"back")) == b"back"


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
@pytest.mark.parametrize("hash_name", sorted(HASHES))
def test_every_suite_completes(cipher: str, hash_name: str) -> None:
    i, r = _pair(f"Noise_XX_25519_{cipher}_{hash_name}")
    _run(i, r, [b"a", b"b", b"c"])
    assert i.handshake_hash == r.handshake_hash


# -- tampering -------------------------------------------------------------------------------


def _encrypted_handshake_messages(pattern: str) -> list[int]:
    """Indices of the messages that end in an AEAD tag (a key exists for their payload)."""
    i, r = _pair(f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b")
    out = []
    for n, _ in enumerate(resolve_pattern(pattern).messages):
        sender, receiver = (i, r) if i.is_my_turn() else (r, i)
        msg = sender.write_message(b"x")
        if sender.symmetric.cipher_state.has_key():
            out.append(n)
        receiver.read_message(msg)
    return out


@pytest.mark.parametrize("pattern", ["XX", "IK", "NK", "XXpsk3", "X1X1", "N", "K", "X"])
def test_every_bit_flip_of_every_handshake_message_is_detected(pattern: str) -> None:
    """A flipped bit anywhere is caught: at once when the message carries a tag, else when the
    next message fails to decrypt (the hashes diverged). The handshake never completes with
    both sides agreeing, and the side that raised is dead."""
    name = f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b"
    tagged = _encrypted_handshake_messages(pattern)
    n_messages = len(resolve_pattern(pattern).messages)
    for target in range(n_messages):
        i, r = _pair(name)
        wire: list[bytes] = []
        for _n in range(target):
            sender, receiver = (i, r) if i.is_my_turn() else (r, i)
            msg = sender.write_message(b"payload")
            receiver.read_message(msg)
            wire.append(msg)
        sender, receiver = (i, r) if i.is_my_turn() else (r, i)
        msg = sender.write_message(b"payload")
        # Every bit of this message, each on a fresh copy of the receiver's state.
        for bit in range(len(msg) * 8):
            i2, r2 = _replay(name, i, r, wire)
            s2, rcv2 = (i2, r2) if i2.is_my_turn() else (r2, i2)
            s2.write_message(b"payload")
            bad = bytearray(msg)
            bad[bit // 8] ^= 1 << (bit % 8)
            if target in tagged:
                with pytest.raises(ProtocolError):
                    rcv2.read_message(bytes(bad))
                with pytest.raises(LocalProtocolError):
                    rcv2.read_message(msg)  # dead: not even the genuine message works
            else:
                _assert_detected_later(s2, rcv2, bytes(bad))


def _replay(
    name: str, i: HandshakeState, r: HandshakeState, wire: list[bytes]
) -> tuple[HandshakeState, HandshakeState]:
    """Fresh states with the same keys (incl. ephemerals) that have processed `wire`."""
    assert i.s is not None
    assert r.s is not None
    i2 = HandshakeState(name, True, b"p", s=i.s, e=i.e, rs=_pre(i, name, True), psks=_psks(name))
    r2 = HandshakeState(name, False, b"p", s=r.s, e=r.e, rs=_pre(r, name, False), psks=_psks(name))
    for msg in wire:
        sender, receiver = (i2, r2) if i2.is_my_turn() else (r2, i2)
        assert sender.write_message(b"payload") == msg
        receiver.read_message(msg)
    return i2, r2


def _pre(side: HandshakeState, name: str, initiator: bool) -> bytes | None:
    pattern = resolve_pattern(name.split("_")[1])
    pre = pattern.responder_pre if initiator else pattern.initiator_pre
    return side.rs if Token.S in pre else None


def _psks(name: str) -> list[bytes]:
    return [bytes([i]) * 32 for i in range(resolve_pattern(name.split("_")[1]).psk_count)]


def _assert_detected_later(sender: HandshakeState, receiver: HandshakeState, bad: bytes) -> None:
    try:
        receiver.read_message(bad)
    except ProtocolError:
        return  # e.g. a flipped ephemeral key of low order, or a psk mix: caught at once
    while not (sender.complete and receiver.complete):
        a, b = (sender, receiver) if sender.is_my_turn() else (receiver, sender)
        if a.complete:
            break
        msg = a.write_message(b"next")
        try:
            b.read_message(msg)
        except ProtocolError:
            return
    # One-way or last message unauthenticated: the transport keys must then disagree.
    sc, rc = sender.split(), receiver.split()
    with pytest.raises(DecryptError):
        rc[0].decrypt_with_ad(b"", sc[0].encrypt_with_ad(b"", b"data"))


def test_wrong_prologue_fails_the_handshake() -> None:
    i = HandshakeState(XX, True, b"peerd v1 net-a", s=KeyPair.generate())
    r = HandshakeState(XX, False, b"peerd v1 net-b", s=KeyPair.generate())
    r.read_message(i.write_message())
    with pytest.raises(DecryptError):
        i.read_message(r.write_message())


def test_wrong_psk_fails_the_handshake() -> None:
    name = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
    i = HandshakeState(name, True, s=KeyPair.generate(), psks=[b"a" * 32])
    r = HandshakeState(name, False, s=KeyPair.generate(), psks=[b"b" * 32])
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    with pytest.raises(DecryptError):
        r.read_message(i.write_message())


def test_truncated_message_raises_remote_error() -> None:
    i, r = _pair(XX)
    r.read_message(i.write_message())
    msg2 = r.write_message()
    with pytest.raises(RemoteProtocolError):
        i.read_message(msg2[:40])


def test_low_order_ephemeral_is_rejected() -> None:
    _i, r = _pair(XX)
    r.read_message(bytes(32))  # the all-zero point: every DH with it is zero
    with pytest.raises(RemoteProtocolError) as info:
        r.write_message()
    assert info.value.reason == "low-order-key"


# -- sizes, nonces, rekey ------------------------------------------------------------------


def test_messages_over_65535_bytes_are_refused_on_write_and_read() -> None:
    i, r = _pair(XX)
    with pytest.raises(LocalProtocolError):
        i.write_message(b"x" * (MAX_MESSAGE_LEN - 31))  # 32-byte e + payload > 65535
    i, r = _pair(XX)
    with pytest.raises(RemoteProtocolError) as info:
        r.read_message(b"\x09" * (MAX_MESSAGE_LEN + 1))
    assert info.value.reason == "oversize"
    i, r = _pair(XX)
    ok = i.write_message(b"x" * (MAX_MESSAGE_LEN - 32))
    assert len(ok) == MAX_MESSAGE_LEN
    assert r.read_message(ok) == b"x" * (MAX_MESSAGE_LEN - 32)


def test_nonce_exhaustion_raises() -> None:
    cs = CipherState(CIPHERS["ChaChaPoly"], KEY)
    cs.set_nonce(MAX_NONCE - 1)
    cs.encrypt_with_ad(b"", b"last one")
    assert cs.n == MAX_NONCE
    with pytest.raises(LocalProtocolError):
        cs.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(LocalProtocolError):
        cs.decrypt_with_ad(b"", b"\0" * 16)


def test_decrypt_failure_leaves_nonce_unchanged() -> None:
    a = CipherState(CIPHERS["ChaChaPoly"], KEY)
    b = CipherState(CIPHERS["ChaChaPoly"], KEY)
    ct = a.encrypt_with_ad(b"", b"hello")
    with pytest.raises(DecryptError):
        b.decrypt_with_ad(b"", ct[:-1] + bytes([ct[-1] ^ 1]))
    assert b.n == 0
    assert b.decrypt_with_ad(b"", ct) == b"hello"


def test_rekey_matches_the_specification() -> None:
    """REKEY(k) = first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros(32)); n is unchanged."""
    cs = CipherState(CIPHERS["ChaChaPoly"], KEY)
    cs.set_nonce(7)
    nonce = b"\0\0\0\0" + MAX_NONCE.to_bytes(8, "little")
    expected = sodium.chacha20poly1305_encrypt(KEY, nonce, b"", bytes(32))[:32]
    cs.rekey()
    assert cs.k == expected
    assert cs.n == 7
    # Both directions rekeyed in step keep talking; one side alone cannot read the other.
    a, b = CipherState(CIPHERS["ChaChaPoly"], KEY), CipherState(CIPHERS["ChaChaPoly"], KEY)
    a.rekey()
    b.rekey()
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"m")) == b"m"
    a.rekey()
    with pytest.raises(DecryptError):
        b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"m"))


def test_cipher_state_without_key_passes_through() -> None:
    cs = CipherState(CIPHERS["ChaChaPoly"])
    assert cs.encrypt_with_ad(b"", b"plain") == b"plain"
    assert cs.n == 0


# -- misuse ---------------------------------------------------------------------------------


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        HandshakeState("Noise_ZZ_25519_ChaChaPoly_BLAKE2b", True)
    with pytest.raises(LocalProtocolError):
        resolve_pattern("XX\n")  # the whole name must be a pattern, not a prefix of a line
    with pytest.raises(LocalProtocolError):
        HandshakeState("Noise_XX_448_ChaChaPoly_BLAKE2b", True)
    with pytest.raises(LocalProtocolError):
        HandshakeState("Noise_XX_25519_ChaChaPoly_BLAKE2b", True)  # XX needs s
    with pytest.raises(LocalProtocolError):
        HandshakeState("Noise_IK_25519_ChaChaPoly_BLAKE2b", True, s=KeyPair.generate())  # no rs
    with pytest.raises(LocalProtocolError):
        HandshakeState("Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b", True, s=KeyPair.generate())
    with pytest.raises(LocalProtocolError):
        HandshakeState("Noise_XXpsk4_25519_ChaChaPoly_BLAKE2b", True, s=KeyPair.generate())
    i, r = _pair(XX)
    with pytest.raises(LocalProtocolError):
        r.write_message()  # not the responder's turn
    with pytest.raises(LocalProtocolError):
        i.read_message(b"x" * 32)
    with pytest.raises(LocalProtocolError):
        i.split()  # not complete
    _run(i, r)
    with pytest.raises(LocalProtocolError):
        i.write_message()  # complete


def test_private_keys_never_appear_in_repr() -> None:
    kp = KeyPair.generate()
    assert kp.private.hex() not in repr(kp)


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=2000), min_size=3, max_size=3),
    transport=st.lists(st.binary(max_size=5000), max_size=8),
    prologue=st.binary(max_size=100),
    init_static=st.binary(min_size=32, max_size=32),
    resp_static=st.binary(min_size=32, max_size=32),
)
def test_roundtrip_random_keys_and_payloads(
    payloads: list[bytes],
    transport: list[bytes],
    prologue: bytes,
    init_static: bytes,
    resp_static: bytes,
) -> None:
    i = HandshakeState(XX, True, prologue, s=init_static)
    r = HandshakeState(XX, False, prologue, s=resp_static)
    _run(i, r, payloads)
    assert i.handshake_hash == r.handshake_hash
    assert i.rs == KeyPair.from_private(resp_static).public
    assert r.rs == KeyPair.from_private(init_static).public
    (i1, i2), (r1, r2) = i.split(), r.split()
    for n, data in enumerate(transport):
        if n % 2:
            assert i2.decrypt_with_ad(b"", r2.encrypt_with_ad(b"", data)) == data
        else:
            assert r1.decrypt_with_ad(b"", i1.encrypt_with_ad(b"", data)) == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), ad=st.binary(max_size=64), nonce=st.integers(0, 2**63))
def test_explicit_nonce_roundtrip(data: bytes, ad: bytes, nonce: int) -> None:
    cs = CipherState(CIPHERS["ChaChaPoly"], KEY)
    ct = cs.encrypt_with_nonce(nonce, ad, data)
    assert cs.decrypt_with_nonce(nonce, ad, ct) == data
    with pytest.raises(DecryptError):
        cs.decrypt_with_nonce(nonce + 1, ad, ct)


# -- interoperability with an independent implementation (the `noiseprotocol` package) --------


def _np(name: str, initiator: bool, static: KeyPair, prologue: bytes, psk: bytes | None):  # type: ignore[no-untyped-def]
    conn = NoiseConnection.from_name(name.encode())
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(NPKeypair.STATIC, static.private)
    conn.set_prologue(prologue)
    if psk is not None:
        conn.set_psks(psk)
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("name", [XX, "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"])
@pytest.mark.parametrize("we_initiate", [True, False])
def test_interop_with_noiseprotocol(name: str, we_initiate: bool) -> None:
    psk = b"k" * 32 if "psk" in name else None
    ours_kp, theirs_kp = KeyPair.generate(), KeyPair.generate()
    ours = HandshakeState(name, we_initiate, b"prologue", s=ours_kp, psks=[psk] if psk else [])
    theirs = _np(name, not we_initiate, theirs_kp, b"prologue", psk)
    payloads = [b"one", b"two", b"three"]
    for n in range(3):
        our_turn = (n % 2 == 0) == we_initiate
        if our_turn:
            assert theirs.read_message(ours.write_message(payloads[n])) == payloads[n]
        else:
            assert ours.read_message(theirs.write_message(payloads[n])) == payloads[n]
    assert ours.complete
    assert theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.rs == theirs_kp.public
    c1, c2 = ours.split()
    send, recv = (c1, c2) if we_initiate else (c2, c1)
    assert theirs.decrypt(send.encrypt_with_ad(b"", b"to them")) == b"to them"
    assert recv.decrypt_with_ad(b"", theirs.encrypt(b"to us")) == b"to us"
