"""The cacophony vectors for 25519/ChaChaPoly/BLAKE2b, every one in both roles.

Each case plays one side with our engine against the recorded messages: what we write must be
the recorded ciphertext byte for byte, what we read must decrypt to the recorded payload, and the
final handshake hash must match. Transport messages after the handshake are checked the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.noise import CipherState, HandshakeState

VECTORS = json.loads(
    (Path(__file__).parent / "data" / "cacophony-25519-chachapoly-blake2b.json").read_text()
)["vectors"]


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
    )


def _one_way(name: str) -> bool:
    pattern = name.split("_")[1]
    return pattern.rstrip("0123456789").removesuffix("psk") in {"N", "K", "X"}


CASES = [
    pytest.param(v, role, id=f"{v['protocol_name']}-{role}")
    for v in VECTORS
    for role in ("init", "resp")
]


def test_vector_file_is_complete() -> None:
    assert len(VECTORS) == 59
    assert len(CASES) == 118


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
