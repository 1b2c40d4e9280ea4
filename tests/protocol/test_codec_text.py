"""The base32 text codec against a reference (the one-big-integer definition of SPEC 6.5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.identity import InvalidText
from protocol.identity._codec import ALPHABET, bytes_to_text, decode_symbols, text_to_bytes


def reference(data: bytes) -> str:
    count = (len(data) * 8 + 4) // 5
    value = int.from_bytes(data, "big") << (count * 5 - len(data) * 8)
    return "".join(ALPHABET[(value >> (5 * (count - 1 - i))) & 31] for i in range(count))


@given(st.binary(max_size=300))
def test_encoding_matches_the_definition_and_round_trips(data: bytes) -> None:
    text = bytes_to_text(data)
    assert text == reference(data)
    assert text_to_bytes(decode_symbols(text, what="t", hint="h"), what="t", hint="h") == data


@given(st.binary(min_size=1, max_size=40), st.integers(1, 4))
def test_non_canonical_padding_is_refused(data: bytes, bit: int) -> None:
    symbols = decode_symbols(bytes_to_text(data), what="t", hint="h")
    pad = len(symbols) * 5 - (len(symbols) * 5 // 8) * 8
    if pad < bit:
        return
    symbols[-1] ^= 1 << (bit - 1)
    with pytest.raises(InvalidText):
        text_to_bytes(symbols, what="t", hint="h")


def test_a_megabyte_round_trips() -> None:
    """Across many five-byte blocks (the codec works block by block since a 1 MiB paste took a
    minute with one big integer)."""
    data = bytes(range(256)) * 4096
    text = bytes_to_text(data)
    assert text_to_bytes(decode_symbols(text, what="t", hint="h"), what="t", hint="h") == data
