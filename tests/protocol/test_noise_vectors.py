"""The cacophony vectors for 25519/ChaChaPoly/BLAKE2b and the hybrid (HFS, 25519+MLKEM768)
vectors of tests/protocol/hfs_vectors.py, every one in both roles.

Each case plays one side with our engine against the recorded messages: what we write must be
the recorded ciphertext byte for byte, what we read must decrypt to the recorded payload, and the
final handshake hash must match. Transport messages after the handshake are checked the same way.

For the hybrid vectors the side that writes `e1` makes its ML-KEM key pair with pyca (from the
vector's seed); the side that writes `ekem1` encapsulates with the vector's message m, which
needs FIPS 203's internal, derandomised encapsulation: pyca does not expose it, so that one call
is kyber-py's (the engine's `kem=` hook). Everything else, decapsulation included, is the
production code path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem
from kyber_py.ml_kem import ML_KEM_768

from protocol.noise import MLKEM768, CipherState, HandshakeState, Kem
from protocol.resumption import derive_tickets, early_key
from tests.protocol import hfs_vectors

VECTORS = json.loads(
    (Path(__file__).parent / "data" / "cacophony-25519-chachapoly-blake2b.json").read_text()
)["vectors"]
HFS_VECTORS = json.loads(hfs_vectors.PATH.read_text())["vectors"]


def _derandomised(m: bytes) -> Kem:
    """ML-KEM-768 whose encapsulation uses the message m (FIPS 203 ML-KEM.Encaps_internal)."""

    def encapsulate(public: bytes) -> tuple[bytes, bytes]:
        secret, ciphertext = ML_KEM_768._encaps_internal(public, m)
        return ciphertext, secret

    return dataclasses.replace(MLKEM768, encapsulate=encapsulate)


def _opt(v: dict[str, Any], key: str) -> bytes | None:
    return bytes.fromhex(v[key]) if key in v else None


def _side(v: dict[str, Any], role: str) -> HandshakeState:
    return HandshakeState(
        v["protocol_name"],
        initiator=role == "init",
        prologue=bytes.fromhex(v[f"{role}_prologue"]),
        s=_opt(v, f"{role}_static"),
        e=_opt(v, f"{role}_ephemeral"),
        rs=_opt(v, f"{role}_remote_static"),
        re=_opt(v, f"{role}_remote_ephemeral"),
        psks=[bytes.fromhex(p) for p in v.get(f"{role}_psks", [])],
        e1=_opt(v, f"{role}_kem_seed"),
        kem=_derandomised(bytes.fromhex(v[f"{role}_kem_encaps_m"]))
        if f"{role}_kem_encaps_m" in v
        else None,
    )


def _one_way(name: str) -> bool:
    pattern = name.split("_")[1]
    return pattern.rstrip("0123456789").removesuffix("psk") in {"N", "K", "X"}


CASES = [
    pytest.param(v, role, id=f"{v['protocol_name']}-{v['init_prologue'][:8]}-{role}")
    for v in VECTORS + HFS_VECTORS
    for role in ("init", "resp")
]


def test_vector_files_are_complete() -> None:
    assert len(VECTORS) == 59
    assert len(HFS_VECTORS) == 11
    assert len(CASES) == 2 * (59 + 11)


def test_hfs_vectors_are_reproducible_from_their_seeds() -> None:
    assert hfs_vectors.PATH.read_text() == hfs_vectors.render()


@pytest.mark.parametrize("vector", HFS_VECTORS[:1], ids=["XXhfs"])
def test_pyca_and_kyber_py_agree_on_the_vectors_ml_kem(vector: dict[str, Any]) -> None:
    """The two ML-KEM-768 implementations the vectors join: the same key from the same seed,
    and pyca decapsulates kyber-py's derandomised ciphertext to kyber-py's secret."""
    seed = bytes.fromhex(vector["init_kem_seed"])
    ek, _dk = ML_KEM_768.key_derive(seed)
    ours = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    assert ours.public_key().public_bytes_raw() == ek
    secret, ciphertext = ML_KEM_768._encaps_internal(ek, bytes.fromhex(vector["resp_kem_encaps_m"]))
    assert ours.decapsulate(ciphertext) == secret


@pytest.mark.parametrize(("vector", "role"), CASES)
def test_vector(vector: dict[str, Any], role: str) -> None:
    me = _side(vector, role)
    # The other side is played by the recorded messages alone: we only ever check our own.
    i_am_initiator = role == "init"
    messages = vector["messages"]
    index = 0
    while not me.complete:
        msg = messages[index]
        payload, ciphertext = bytes.fromhex(msg["payload"]), bytes.fromhex(msg["ciphertext"])
        if me.is_my_turn():
            assert me.write_message(payload) == ciphertext
        else:
            assert me.read_message(ciphertext) == payload
        index += 1
    assert me.get_handshake_hash() == bytes.fromhex(vector["handshake_hash"])

    c1, c2 = me.split()
    one_way = _one_way(vector["protocol_name"])
    for i, msg in enumerate(messages[index:], start=index):
        payload, ciphertext = bytes.fromhex(msg["payload"]), bytes.fromhex(msg["ciphertext"])
        from_initiator = one_way or i % 2 == 0
        cs: CipherState = c1 if from_initiator else c2
        if from_initiator == i_am_initiator:
            assert cs.encrypt_with_ad(b"", payload) == ciphertext
        else:
            assert cs.decrypt_with_ad(b"", ciphertext) == payload


PEERD_VECTORS = [v for v in HFS_VECTORS if "peerd_resumption_tickets" in v]


@pytest.mark.parametrize(
    ("vector", "role"),
    [(v, r) for v in PEERD_VECTORS for r in ("init", "resp")],
    ids=[f"{v['protocol_name']}-{r}" for v in PEERD_VECTORS for r in ("init", "resp")],
)
def test_resumption_tickets_and_early_key_match_the_vectors(
    vector: dict[str, Any], role: str
) -> None:
    """SPEC.md 4.7's derivations from the chaining key, against the separate implementation:
    the tickets every session leaves, and a resumption's early-data key after message 1."""
    me = _side(vector, role)
    for msg in vector["messages"]:
        payload, ciphertext = bytes.fromhex(msg["payload"]), bytes.fromhex(msg["ciphertext"])
        if me.is_my_turn():
            me.write_message(payload)
        else:
            me.read_message(ciphertext)
        if me.message_index == 1 and "peerd_early_key" in vector:
            assert early_key(me.symmetric.ck).hex() == vector["peerd_early_key"]
        if me.complete:
            break
    tickets = derive_tickets(vector["protocol_name"], me.symmetric.ck)
    assert [t.hex() for t in tickets] == vector["peerd_resumption_tickets"]
