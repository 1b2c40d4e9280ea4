"""Safetensors header validation: valid files (the reference implementation's own serialized
bytes, and generated ones) are accepted; each malformation is rejected with its reason.

numpy is not a dependency, so files are built by hand exactly as the reference writer does:
tensors laid out back to back, the JSON header padded with spaces to a multiple of 8.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.safetensors import (
    DEFAULT_MAX_TENSORS,
    DTYPE_BITS,
    SafetensorsError,
    header_length,
    is_safetensors_name,
    parse_header,
)


def build(
    tensors: dict[str, Any],
    data: bytes,
    metadata: dict[str, str] | None = None,
    *,
    pad: bool = True,
) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(tensors)
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def check(file: bytes) -> Any:
    n = header_length(file[:8], len(file))
    return parse_header(file[: 8 + n], len(file))


def _outcome(file: bytes) -> str:
    """ "ok", or the reason of the SafetensorsError (anything else fails the test)."""
    try:
        check(file)
    except SafetensorsError as exc:
        return exc.reason
    return "ok"


def reason_of(file: bytes) -> str:
    with pytest.raises(SafetensorsError) as err:
        check(file)
    assert isinstance(err.value, RemoteProtocolError)
    return err.value.reason


# -- valid files -----------------------------------------------------------------------------

# Byte-for-byte outputs of the reference implementation's serializer (its own unit tests).
REFERENCE_F32 = (
    bytes([64, 0, 0, 0, 0, 0, 0, 0])
    + b'{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}'
    + struct.pack("<6f", 0, 1, 2, 3, 4, 5)
)
REFERENCE_EMPTY = bytes([8, 0, 0, 0, 0, 0, 0, 0]) + b"{}      "
REFERENCE_METADATA = bytes([40, 0, 0, 0, 0, 0, 0, 0]) + b'{"__metadata__":{"framework":"pt"}}     '


def test_reference_files() -> None:
    h = check(REFERENCE_F32)
    assert h.header_bytes == 64
    assert h.data_start == 72
    [t] = h.tensors
    assert (t.name, t.dtype, t.shape, t.begin, t.end) == ("attn.0", "F32", (1, 2, 3), 0, 24)
    assert check(REFERENCE_EMPTY).tensors == ()
    assert check(REFERENCE_METADATA).metadata == {"framework": "pt"}


tensor_spec = st.tuples(
    st.sampled_from(sorted(DTYPE_BITS)),
    st.lists(st.integers(0, 6), max_size=4),
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
        tensor_spec,
        max_size=8,
    ),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_generated_valid_files_are_accepted(
    specs: dict[str, tuple[str, list[int]]],
    metadata: dict[str, str] | None,
    rnd: Any,
    pad: bool,
) -> None:
    tensors: dict[str, Any] = {}
    order = list(specs)
    rnd.shuffle(order)  # the data order need not follow the header's key order
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        elements = 1
        for d in shape:
            elements *= d
        bits = elements * DTYPE_BITS[dtype]
        if bits % 8:
            shape = [*shape, 2]  # sub-byte types: make the tensor fill whole bytes
            bits *= 2
            if bits % 8:
                shape = [*shape, 4]
                bits *= 4
        size = bits // 8
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    file = build(tensors, rnd.randbytes(offset), metadata, pad=pad)
    h = check(file)
    assert len(h.tensors) == len(specs)
    assert [t.name for t in h.tensors] == order
    assert h.metadata == (metadata or {})


def test_zero_sized_tensors_share_an_offset() -> None:
    tensors = {
        "a": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
        "b": {"dtype": "U8", "shape": [], "data_offsets": [0, 1]},  # a scalar is one element
        "c": {"dtype": "I64", "shape": [0], "data_offsets": [1, 1]},
    }
    h = check(build(tensors, b"\x07"))
    assert [t.name for t in h.tensors] == ["a", "b", "c"]


# -- malformations ---------------------------------------------------------------------------

T = {"t": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}


def test_header_length_bounds() -> None:
    assert reason_of(b"\x01\x02") == "safetensors-truncated"
    huge = (200_000_000).to_bytes(8, "little") + b"{}"
    assert reason_of(huge) == "safetensors-header-too-large"
    over_default = (17 * 1024 * 1024).to_bytes(8, "little") + b"{}"
    assert reason_of(over_default) == "safetensors-header-too-large"
    past_end = (100).to_bytes(8, "little") + b"{}      "
    assert reason_of(past_end) == "safetensors-truncated"
    assert reason_of((2**64 - 1).to_bytes(8, "little") + b"{}") == "safetensors-header-too-large"
    file = build(T, bytes(8))
    with pytest.raises(SafetensorsError) as err:
        parse_header(file[:20], len(file))  # fewer header bytes than N
    assert err.value.reason == "safetensors-truncated"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"[1,2]   ", "bad-json"),
        (b'"text"  ', "bad-json"),
        (b"{\xff}    ", "bad-json"),
        (b"{" + b'"a":' * 5 + b"   ", "bad-json"),
        (b" {}     ", "bad-json"),  # must start with the object itself
        (b'{"x":NaN}', "bad-json"),
        (b"{" + b'"a":[' * 200_000 + b"]" * 200_000 + b"}", "bad-json"),  # deep nesting
        (b'{"__metadata__":{"a":1}}', "bad-metadata"),
        (b'{"__metadata__":["a"]}', "bad-metadata"),
        (
            b'{"t":{"dtype":"F16","shape":[],"data_offsets":[0,2]},'
            b'"t":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}',
            "duplicate-key",
        ),
        (b'{"t":[1]}', "bad-tensor"),
        (b'{"t":{"dtype":"F16","shape":[]}}', "bad-tensor"),
        (b'{"t":{"dtype":"F16","shape":[],"data_offsets":[0,2],"extra":1}}', "bad-tensor"),
        (b'{"t":{"dtype":"F17","shape":[],"data_offsets":[0,2]}}', "bad-dtype"),
        (b'{"t":{"dtype":"f16","shape":[],"data_offsets":[0,2]}}', "bad-dtype"),
        (b'{"t":{"dtype":"F16","shape":[-1],"data_offsets":[0,2]}}', "bad-shape"),
        (b'{"t":{"dtype":"F16","shape":[1.0],"data_offsets":[0,2]}}', "bad-shape"),
        (b'{"t":{"dtype":"F16","shape":[true],"data_offsets":[0,2]}}', "bad-shape"),
        (b'{"t":{"dtype":"F16","shape":2,"data_offsets":[0,2]}}', "bad-shape"),
        (b'{"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', "bad-shape"),
        (b'{"t":{"dtype":"F16","shape":[],"data_offsets":[2,0]}}', "bad-offsets"),
        (b'{"t":{"dtype":"F16","shape":[],"data_offsets":[-2,0]}}', "bad-offsets"),
        (b'{"t":{"dtype":"F16","shape":[],"data_offsets":[0]}}', "bad-offsets"),
        (b'{"t":{"dtype":"F16","shape":[],"data_offsets":[0,2.0]}}', "bad-offsets"),
        (b'{"t":{"dtype":"F16","shape":[2],"data_offsets":[0,2]}}', "size-mismatch"),
    ],
)
def test_malformed_headers(header: bytes, reason: str) -> None:
    header += b" " * (-len(header) % 8)
    file = len(header).to_bytes(8, "little") + header + bytes(2)
    assert reason_of(file) == f"safetensors-{reason}"


def test_layout_errors() -> None:
    two = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
    }
    assert check(build(two, bytes(8)))
    assert reason_of(build(two, bytes(9))) == "safetensors-size-mismatch"  # trailing bytes
    assert reason_of(build(two, bytes(7))) == "safetensors-size-mismatch"  # file too short
    overlap = {**two, "b": {"dtype": "U8", "shape": [4], "data_offsets": [3, 7]}}
    assert reason_of(build(overlap, bytes(7))) == "safetensors-overlap"
    gap = {**two, "b": {"dtype": "U8", "shape": [4], "data_offsets": [5, 9]}}
    assert reason_of(build(gap, bytes(9))) == "safetensors-gap"
    late = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}
    assert reason_of(build(late, bytes(6))) == "safetensors-gap"
    huge = {"a": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 2**83]}}
    assert reason_of(build(huge, bytes(8))) == "safetensors-size-mismatch"


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(0, 400))
def test_fuzzed_files_raise_only_safetensors_errors(data: bytes, extra: int) -> None:
    assert _outcome(data + bytes(extra)).startswith(("ok", "safetensors-"))


@settings(max_examples=300)
@given(st.data())
def test_mutated_valid_files_raise_only_safetensors_errors(data: st.DataObject) -> None:
    file = bytearray(REFERENCE_F32)
    for _ in range(data.draw(st.integers(1, 3))):
        file[data.draw(st.integers(0, 71))] = data.draw(st.integers(0, 255))
    assert _outcome(bytes(file)).startswith(("ok", "safetensors-"))


# -- bounds on the cost of a check (issue 18) -------------------------------------------------


def test_a_header_of_too_many_tensors_is_refused_before_it_is_parsed() -> None:
    """300k zero-size tensors in a 16 MiB header took 3.3 s and 195 MB to check. The tensor
    count is bounded; a header over it is refused from a scan of its bytes."""
    tensors = {
        f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        for i in range(DEFAULT_MAX_TENSORS + 1)
    }
    assert reason_of(build(tensors, b"")) == "safetensors-too-many-tensors"
    fewer = dict(list(tensors.items())[:100])
    assert check(build(fewer, b"")).tensors[0].end == 0
    # A lower cap of the caller's, and braces inside names only count against the file.
    file = build(fewer, b"")
    n = header_length(file[:8], len(file))
    with pytest.raises(SafetensorsError) as err:
        parse_header(file[: 8 + n], len(file), max_tensors=99)
    assert err.value.reason == "safetensors-too-many-tensors"
    assert parse_header(file[: 8 + n], len(file), max_tensors=100).tensors


def test_the_extension_is_recognised_in_any_case() -> None:
    for name in ("m.safetensors", "m.SAFETENSORS", "m.SafeTensors"):
        assert is_safetensors_name(name)
    for name in ("m.safetensors.bak", "safetensors", "m.bin"):
        assert not is_safetensors_name(name)
