"""The Noise engine's rules beyond the vectors: tampering, sizes, nonces, REKEY, misuse,
round trips with random keys and payloads, and interoperability with `noiseprotocol`."""

from __future__ import annotations

import itertools
from collections import Counter

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
    message_overheads,
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


# -- hybrid forward secrecy (HFS: e1 / ekem1 with ML-KEM-768) ----------------------------------

HFS_SUITE = "25519+MLKEM768_ChaChaPoly_BLAKE2b"
PEERD_HFS = ["XXhfs", "XXhfs+psk0", "XXhfs+psk3"]
INTERACTIVE = sorted(p for p, pattern in PATTERNS.items() if not pattern.one_way)


@pytest.mark.parametrize("pattern", [f"{p}hfs" for p in INTERACTIVE] + PEERD_HFS[1:])
def test_every_interactive_pattern_completes_with_hfs(pattern: str) -> None:
    name = f"Noise_{pattern}_{HFS_SUITE}"
    i, r = _pair(name)
    wire = _run(i, r, [b"a", b"bb", b"ccc", b"dddd"])
    assert i.handshake_hash == r.handshake_hash
    ic1, _ = i.split()
    rc1, _ = r.split()
    assert rc1.decrypt_with_ad(b"", ic1.encrypt_with_ad(b"", b"pq")) == b"pq"
    # Each message is exactly its overhead plus its payload, as SPEC.md 4.1 tabulates.
    overheads = message_overheads(name)
    assert [len(m) for m in wire] == [o + n for o, n in zip(overheads, (1, 2, 3, 4), strict=False)]
    tokens = [t for msg in resolve_pattern(pattern).messages for t in msg]
    assert tokens.count(Token.E1) == tokens.count(Token.EKEM1) == 1
    assert tokens.index(Token.E1) < tokens.index(Token.EKEM1)


def test_hfs_token_placement_follows_the_hfs_rule() -> None:
    """HFS revision 1, section 5: e1 after the first e, or after that message's first DH;
    ekem1 directly after the first ee. Modifiers apply in the order written."""
    E, E1, EE, EKEM1, S, ES, SE, SS, PSK = (
        Token.E, Token.E1, Token.EE, Token.EKEM1, Token.S, Token.ES, Token.SE, Token.SS, Token.PSK,
    )  # fmt: skip
    assert resolve_pattern("XXhfs").messages == ((E, E1), (E, EE, EKEM1, S, ES), (S, SE))
    assert resolve_pattern("IKhfs").messages == ((E, ES, E1, S, SS), (E, EE, EKEM1, SE))
    assert resolve_pattern("XXhfs+psk0").messages[0] == (PSK, E, E1)
    assert resolve_pattern("XXpsk0+hfs").messages == resolve_pattern("XXhfs+psk0").messages
    assert resolve_pattern("XXhfs+psk3").messages[2] == (S, SE, PSK)


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XXhfs_25519_ChaChaPoly_BLAKE2b",  # hfs without a KEM
        "Noise_XX_25519+MLKEM768_ChaChaPoly_BLAKE2b",  # a KEM without hfs
        "Noise_XXhfs_25519+Kyber1024_ChaChaPoly_BLAKE2b",  # a KEM we do not have
        "Noise_Nhfs_25519+MLKEM768_ChaChaPoly_BLAKE2b",  # one-way: nobody to encapsulate
        "Noise_XXhfs+hfs_25519+MLKEM768_ChaChaPoly_BLAKE2b",
        "Noise_XXhfs+psk9_25519+MLKEM768_ChaChaPoly_BLAKE2b",
        "Noise_XXfoo_25519+MLKEM768_ChaChaPoly_BLAKE2b",
    ],
)
def test_inconsistent_hfs_names_are_refused(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        HandshakeState(name, True, s=KeyPair.generate())


def _kem_regions(name: str) -> list[tuple[int, int, int]]:
    """(message index, start, end) of the e1 and ekem1 fields (with their tags, if any)."""
    pattern = resolve_pattern(name.split("_")[1])
    psk_mode = pattern.psk_count > 0
    out = []
    has_key = False
    for index, tokens in enumerate(pattern.messages):
        pos = 0
        for token in tokens:
            tag = 16 if has_key else 0
            if token is Token.E:
                pos += 32
                has_key = has_key or psk_mode
            elif token is Token.S:
                pos += 32 + tag
            elif token in (Token.E1, Token.EKEM1):
                n = (1184 if token is Token.E1 else 1088) + tag
                out.append((index, pos, pos + n))
                pos += n
                has_key = has_key or token is Token.EKEM1
            else:
                has_key = True
        if index == 1:
            break
    return out


@pytest.mark.parametrize("pattern", PEERD_HFS)
def test_every_byte_of_the_kem_material_is_protected(pattern: str) -> None:
    """Each byte of the KEM public key (message 1) and of the KEM ciphertext (message 2),
    flipped on the wire: the handshake fails with a RemoteProtocolError (a bad tag, or a
    public key ML-KEM refuses), never with another exception and never with both sides done."""
    name = f"Noise_{pattern}_{HFS_SUITE}"
    i_keys, r_keys = _keys_for(pattern)
    e_i, e_r = KeyPair.generate(), KeyPair.generate()
    seed = bytes(range(64))

    def initiator() -> HandshakeState:
        return HandshakeState(name, True, b"p", e=e_i, e1=seed, **i_keys)  # type: ignore[arg-type]

    def responder() -> HandshakeState:
        return HandshakeState(name, False, b"p", e=e_r, **r_keys)  # type: ignore[arg-type]

    hello = initiator().write_message(b"")
    r = responder()
    r.read_message(hello)
    reply = r.write_message(b"credentials")
    reasons: Counter[str] = Counter()
    for index, start, end in _kem_regions(name):
        for at in range(start, end):
            i, r = initiator(), responder()
            sent = i.write_message(b"")
            try:
                if index == 0:
                    bad = bytearray(sent)
                    bad[at] ^= 0x01
                    r.read_message(bytes(bad))
                    i.read_message(r.write_message(b"credentials"))
                else:
                    bad = bytearray(reply)
                    bad[at] ^= 0x80
                    i.read_message(bytes(bad))
            except RemoteProtocolError as exc:
                reasons[exc.reason] += 1
                continue
            raise AssertionError(f"a flipped byte {at} of message {index + 1} went unnoticed")
    assert set(reasons) <= {"decrypt", "bad-key"}
    assert sum(reasons.values()) == sum(e - s for _, s, e in _kem_regions(name))


def test_truncated_kem_fields_are_refused() -> None:
    name = f"Noise_XXhfs_{HFS_SUITE}"
    i, r = _pair(name)
    hello = i.write_message(b"")
    with pytest.raises(RemoteProtocolError) as info:
        r.read_message(hello[:1000])
    assert info.value.reason == "truncated"
    i, r = _pair(name)
    r.read_message(i.write_message(b""))
    reply = r.write_message(b"")
    with pytest.raises(RemoteProtocolError) as info:
        i.read_message(reply[:600])
    assert info.value.reason == "truncated"


def test_either_half_of_the_hybrid_alone_opens_nothing() -> None:
    """A recorded hybrid handshake. Someone who later holds every X25519 private key (the DH
    broken, as a quantum computer would) but not the KEM key cannot read message 2's static key
    or payload; someone with the KEM key but not the X25519 keys cannot either."""
    name = f"Noise_XXhfs_{HFS_SUITE}"
    i_s, r_s, i_e = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    seed = bytes(range(1, 65))
    i = HandshakeState(name, True, b"p", s=i_s, e=i_e, e1=seed)
    r = HandshakeState(name, False, b"p", s=r_s)
    hello = i.write_message(b"")
    r.read_message(hello)
    reply = r.write_message(b"secret credentials")
    assert i.read_message(reply) == b"secret credentials"

    x25519_thief = HandshakeState(name, True, b"p", s=i_s, e=i_e)  # a fresh KEM key
    x25519_thief.write_message(b"")
    with pytest.raises(DecryptError):
        x25519_thief.read_message(reply)
    kem_thief = HandshakeState(name, True, b"p", s=i_s, e1=seed)  # a fresh X25519 ephemeral
    kem_thief.write_message(b"")
    with pytest.raises(DecryptError):
        kem_thief.read_message(reply)


def test_a_failed_hybrid_handshake_drops_its_kem_key() -> None:
    name = f"Noise_XXhfs_{HFS_SUITE}"
    i, r = _pair(name)
    r.read_message(i.write_message(b""))
    reply = bytearray(r.write_message(b""))
    reply[100] ^= 1
    assert i.e1 is not None
    with pytest.raises(DecryptError):
        i.read_message(bytes(reply))
    assert i.e1 is None
