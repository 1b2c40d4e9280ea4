"""Memory stays bounded whatever a decoder is given: inputs that *claim* huge sizes (msgpack
headers announcing 4 GiB strings, arrays of 2^32 elements, deep nesting, frame and safetensors
length fields at their maximum) cost at most a small, fixed amount of memory, never what they
claim. Measured with tracemalloc (every Python-level allocation, msgpack's objects included).
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import frames
from protocol.errors import PeerdError
from protocol.identity import (
    Credentials,
    InviteToken,
    KeyCertificate,
    TrustView,
    decode_statement,
    parse_authority_key,
    parse_fingerprint,
    parse_peer_id,
)
from protocol.messaging import decode_app
from protocol.safetensors import parse_header
from protocol.transfer import Manifest, decode_message, parse_chunk_header
from tests.fuzz.corpus import NETWORK, NOW, fuzz_settings

FUZZ = fuzz_settings(deadline=None, share=3)

KIB = 1024
# Everything a binary decoder may hold at once: its input (at most a frame, 64 KiB) a few times.
BINARY_BOUND = 1024 * KIB


def _peak(fn: Callable[[bytes], Any], data: Any) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn(data)
    except PeerdError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def _plan_revocation(data: bytes) -> None:
    TrustView(self_peer_id=None, network=NETWORK, overlap=0.0).plan_revocation(data, NOW)


def _safetensors(data: bytes) -> None:
    parse_header(data, len(data) + (1 << 40))


BINARY_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "frame": frames.decode,
    "app": decode_app,
    "control": decode_message,
    "manifest": Manifest.decode,
    "chunk": parse_chunk_header,
    "certificate": KeyCertificate.decode,
    "statement": decode_statement,
    "revocation": _plan_revocation,
    "credentials": Credentials.decode,
    "safetensors": _safetensors,
}

# msgpack markers that announce a length: bin8/16/32, str8/16/32, array16/32, map16/32, ext.
_LENGTH_MARKERS = [0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xC7, 0xC8, 0xC9]


@st.composite
def size_claims(draw: st.DrawFn) -> bytes:
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        marker = draw(st.sampled_from([*_LENGTH_MARKERS, 0x91, 0x9F, 0xDC]))
        width = {0xC4: 1, 0xD9: 1, 0xC7: 1, 0xC5: 2, 0xDA: 2, 0xDC: 2, 0xDE: 2, 0xC8: 2}.get(
            marker, 4 if marker in _LENGTH_MARKERS else 0
        )
        claim = draw(
            st.sampled_from([2 ** (8 * width) - 1, 2 ** (8 * width - 1)]) if width else st.just(0)
        )
        out.append(marker)
        out += claim.to_bytes(width, "big") if width else b""
    out += draw(st.binary(max_size=64))
    repeat = draw(st.sampled_from([1, 2, 100, 1000]))
    return bytes(out) * repeat


@FUZZ
@given(size_claims())
def test_size_claims_cost_no_memory(data: bytes) -> None:
    for name, decode in BINARY_DECODERS.items():
        peak = _peak(decode, data)
        assert peak < BINARY_BOUND, f"{name}: {peak} bytes for an input of {len(data)}"


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 65000,  # nesting far beyond any stack
        b"\xdd\xff\xff\xff\xff" + b"\xc0" * 60000,  # 2^32 - 1 elements announced
        b"\x01\x05" + bytes(frames.MAX_FRAME_LEN - 2),  # the largest frame
        struct.pack("<Q", 16 << 20) + b"{" * 60000,  # a 16 MiB safetensors header announced
        struct.pack("<Q", 2**63) + b"{}",
    ],
    ids=["nesting", "array32", "largest-frame", "safetensors-16MiB", "safetensors-2^63"],
)
def test_extreme_inputs(data: bytes) -> None:
    for name, decode in BINARY_DECODERS.items():
        peak = _peak(decode, data)
        assert peak < BINARY_BOUND + 4 * len(data), f"{name}: {peak} bytes"


TEXT_PARSERS: dict[str, Callable[[str], Any]] = {
    "invite": InviteToken.from_text,
    "authority-key": parse_authority_key,
    "peer-id": parse_peer_id,
    "fingerprint": parse_fingerprint,
}


@pytest.mark.parametrize("name", sorted(TEXT_PARSERS))
def test_pasted_text_costs_memory_linear_in_its_length(name: str) -> None:
    """Text arrives from the CLI, the config file or a control request line. Its memory is
    linear in its length; this pins the constant so a regression to something worse shows.
    (64 KiB: the base32 decoder is quadratic in time, so the daemon bounds a token's length
    before parsing it - tests/attacks/test_local.py.)"""
    text = "peerd-invite-1-" + "a" * (64 << 10)
    peak = _peak(TEXT_PARSERS[name], text)  # type: ignore[arg-type]
    assert peak < 16 * len(text), f"{name}: {peak} bytes for {len(text)} characters"
