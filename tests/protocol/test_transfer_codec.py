"""Manifests, file names, control messages and chunk frames: encodings, bounds and rejections.

Decoders are fuzzed with Hypothesis: whatever the input, only the documented error
(MalformedTransferObject, a RemoteProtocolError with a reason) comes out, and whatever decodes
re-encodes to the same bytes.
"""

from __future__ import annotations

from typing import Any

import msgpack
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import DecryptError, LocalProtocolError, RemoteProtocolError
from protocol.transfer import (
    FRAME_OVERHEAD,
    MANIFEST_CONTEXT,
    MAX_CONTROL_BYTES,
    Abort,
    Accept,
    Ack,
    BadChunkFrame,
    BadManifestSignature,
    ChunkCipher,
    MalformedTransferObject,
    Manifest,
    Offer,
    Refuse,
    Request,
    Seal,
    SignedManifest,
    Verified,
    chunk_count_for,
    decode_message,
    file_hash,
    frame_buffer,
    name_problem,
    numbered_name,
    parse_chunk_header,
)
from protocol.transfer.messages import ranges_of, sack_bitmap

TID = bytes(range(16))
KEY = bytes(range(32, 64))
SK = nacl.signing.SigningKey(bytes(range(1, 33)))


def manifest(**kw: object) -> Manifest:
    fields: dict[str, object] = {
        "transfer_id": TID,
        "sender": "alice",
        "name": "model.safetensors",
        "size": 5000,
        "chunk_size": 1024,
        "chunk_count": 5,
        "created": 1_700_000_000,
        "file_hash": bytes(32),
    }
    fields.update(kw)
    return Manifest(**fields)  # type: ignore[arg-type]


def _attempt(decode: Any, data: bytes) -> tuple[Any, str | None]:
    """(decoded, None), or (None, reason) if it raised the documented error (only that may
    escape: anything else fails the test)."""
    try:
        return decode(data), None
    except (MalformedTransferObject, BadChunkFrame) as exc:
        reason = exc.reason
    assert reason
    return None, reason


def _accept(cipher: ChunkCipher, frame: bytes | bytearray, out: bytearray) -> int:
    """What a receiver does with a frame of transfer TID."""
    header = parse_chunk_header(frame)
    if header.transfer_id != TID:
        raise BadChunkFrame("a chunk of another transfer", reason="wrong-transfer")
    return cipher.open_into(out, frame)


# -- names -----------------------------------------------------------------------------------

GOOD_NAMES = [
    "model.safetensors",
    "llama-3-8b.Q4_K_M.gguf",
    "a b.bin",
    "模型权重.safetensors",
    "x" * 255,
    "é" * 127,  # 254 bytes
    "a..b",
    "-starts-with-dash",
]
BAD_NAMES = [
    "",
    ".",
    "..",
    ".hidden",
    "../etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "line\nbreak",
    "tab\there",
    "del\x7f",
    "c1\x85",
    " leading",
    "trailing ",
    "trailing\u3000",
    "gpj.\u202eexe",
    "zero\u200bwidth",
    "bom\ufeff",
    "sep\u2028",
    "e\u0301",  # NFD: one name, one spelling
    "x" * 256,
    "é" * 128,  # 256 bytes
    "lone\udcff",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_safe_names_are_accepted(name: str) -> None:
    assert name_problem(name) is None
    m = manifest(name=name)
    assert Manifest.decode(m.body()) == m


@pytest.mark.parametrize("name", [*GOOD_NAMES, "w" * 251 + ".bin", "é" * 125 + ".safetensors"])
def test_numbered_names_fit_the_name_limit_and_keep_the_extension(name: str) -> None:
    """A second copy of a name at the 255-byte limit got `-2` appended, was too long for the
    file system, and the verified file was lost (issue 18). Every numbered name is a safe name
    of at most 255 bytes; the tag and, where there is room, the extension are kept."""
    assert numbered_name(name, 1) == name
    seen = {name}
    for n in (2, 3, 10, 9999):
        numbered = numbered_name(name, n)
        assert name_problem(numbered) is None, numbered
        assert len(numbered.encode()) <= 255
        assert f"-{n}" in numbered
        _, dot, ext = name.rpartition(".")
        if dot and len(ext.encode()) < 200:
            assert numbered.endswith(f"{dot}{ext}")
        seen.add(numbered)
    assert len(seen) == 5
    assert numbered_name("model.tar.gz", 2) == "model-2.tar.gz"
    assert numbered_name("w" * 251 + ".bin", 2) == "w" * 249 + "-2.bin"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_rejected_everywhere(name: str) -> None:
    assert name_problem(name) is not None
    with pytest.raises(LocalProtocolError):
        manifest(name=name)
    if "\udcff" in name:
        return  # not encodable: cannot reach the wire at all
    body = msgpack.packb(
        [1, TID, "alice", name, 5000, 1024, 5, 1_700_000_000, bytes(32)], use_bin_type=True
    )
    with pytest.raises(MalformedTransferObject) as err:
        Manifest.decode(body)
    assert err.value.reason in ("bad-name", "malformed")
    offer = msgpack.packb([32, TID, name, 5000, 1024, 5, 1_700_000_000, KEY], use_bin_type=True)
    with pytest.raises(MalformedTransferObject):
        decode_message(offer)


# -- manifest --------------------------------------------------------------------------------


def test_manifest_signs_and_opens() -> None:
    m = manifest(file_hash=file_hash(b"x" * 5000))
    signed = m.sign(SK)
    opened = SignedManifest.open(signed.body, signed.signature, bytes(SK.verify_key))
    assert opened.manifest == m
    assert opened.body == m.body()
    # The signature covers the context label: without it, it does not verify.
    SK.verify_key.verify(MANIFEST_CONTEXT + signed.body, signed.signature)
    with pytest.raises(nacl.exceptions.BadSignatureError):
        SK.verify_key.verify(signed.body, signed.signature)


def test_manifest_signature_under_another_key_is_rejected() -> None:
    signed = manifest().sign(SK)
    other = nacl.signing.SigningKey(bytes(32))
    with pytest.raises(BadManifestSignature) as err:
        SignedManifest.open(signed.body, signed.signature, bytes(other.verify_key))
    assert err.value.reason == "bad-signature"


def test_every_bit_of_a_signed_manifest_matters() -> None:
    signed = manifest().sign(SK)
    for pos in range(len(signed.body)):
        for bit in (0x01, 0x80):
            body = bytearray(signed.body)
            body[pos] ^= bit
            with pytest.raises(RemoteProtocolError):
                SignedManifest.open(bytes(body), signed.signature, SK.verify_key)
    for pos in range(64):
        sig = bytearray(signed.signature)
        sig[pos] ^= 1
        with pytest.raises(BadManifestSignature):
            SignedManifest.open(signed.body, bytes(sig), SK.verify_key)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([2, TID, "alice", "m", 1, 1024, 1, 0, bytes(32)], "version"),
        ([1, TID, "alice", "m", 1, 1024, 2, 0, bytes(32)], "malformed"),  # count
        ([1, TID, "alice", "m", 0, 1024, 0, 0, bytes(32)], "malformed"),  # empty: 1 chunk
        ([1, TID, "alice", "m", 1, 1000, 1, 0, bytes(32)], "malformed"),  # not a power of 2
        ([1, TID, "alice", "m", 1, 512, 1, 0, bytes(32)], "malformed"),  # too small
        ([1, TID, "alice", "m", 1, 2**20, 1, 0, bytes(32)], "malformed"),  # too large
        ([1, TID, "alice", "m", 2**47, 2**19, 2**28, 0, bytes(32)], "malformed"),
        ([1, TID, "Alice", "m", 1, 1024, 1, 0, bytes(32)], "malformed"),  # peer id
        ([1, TID[:15], "alice", "m", 1, 1024, 1, 0, bytes(32)], "malformed"),
        ([1, TID, "alice", "m", 1, 1024, 1, 0, bytes(31)], "malformed"),
        ([1, TID, "alice", "m", True, 1024, 1, 0, bytes(32)], "malformed"),  # bool is no int
        ([1, TID, "alice", "m", 1, 1024, 1, -1, bytes(32)], "malformed"),
        ([1, TID, "alice", "m", 1, 1024, 1, 0], "malformed"),
        ([1, TID, "alice", "m", 1, 1024, 1, 0, bytes(32), 0], "malformed"),
        ([1, TID, "alice", b"m", 1, 1024, 1, 0, bytes(32)], "malformed"),  # bin is no str
        ([1, TID.hex(), "alice", "m", 1, 1024, 1, 0, bytes(32)], "malformed"),  # str is no bin
    ],
)
def test_malformed_manifests(fields: list[object], reason: str) -> None:
    with pytest.raises(MalformedTransferObject) as err:
        Manifest.decode(msgpack.packb(fields, use_bin_type=True))
    assert err.value.reason == reason


def test_non_canonical_manifest_encoding_is_rejected() -> None:
    body = manifest().body()
    # 5000 as a uint32 (0xce) instead of the shortest uint16 (0xcd): same value, other bytes.
    canonical = b"\xcd" + (5000).to_bytes(2, "big")
    assert canonical in body
    wide = body.replace(canonical, b"\xce" + (5000).to_bytes(4, "big"))
    with pytest.raises(MalformedTransferObject) as err:
        Manifest.decode(wide)
    assert err.value.reason == "non-canonical"
    with pytest.raises(MalformedTransferObject):
        Manifest.decode(body + b"\x00")  # trailing bytes


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_manifest_decoder_fuzz(data: bytes) -> None:
    m, reason = _attempt(Manifest.decode, data)
    assert reason or m.body() == data


def test_chunk_count_for() -> None:
    assert chunk_count_for(0, 1024) == 1
    assert chunk_count_for(1, 1024) == 1
    assert chunk_count_for(1024, 1024) == 1
    assert chunk_count_for(1025, 1024) == 2
    assert chunk_count_for(2**30, 2**18) == 4096


def test_blake3_test_vector() -> None:
    # From the BLAKE3 reference test vectors: input of length 0 and 1 (byte 0x00).
    assert file_hash(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert file_hash(b"\x00").hex() == (
        "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213"
    )


# -- control messages ------------------------------------------------------------------------

INC = 1
SAMPLES = [
    Offer(TID, "model.safetensors", 5000, 1024, 5, 1_700_000_000, KEY),
    Offer(TID, "empty", 0, 2**18, 1, 0, KEY),
    Accept(TID, INC, 0, 64),
    Accept(TID, INC, 3, 67, sack_bitmap(3, [5, 9])),
    Ack(TID, INC, 2**32 - 1, 2**32 - 1),
    Ack(TID, INC, 10, 1034, sack_bitmap(10, [1032])),
    Request(TID, INC, ((0, 1),)),
    Request(TID, INC, ranges_of([1, 2, 3, 7, 9, 10])),
    Seal(TID, manifest().sign(SK).body, manifest().sign(SK).signature),
    Verified(TID, bytes(32)),
    Refuse(TID, "too-large", "5000 bytes is more than the limit of 4000"),
    Abort(TID, "cancelled"),
    Abort(TID, "some-future-reason", "ünïcödé is fine"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_control_messages_round_trip(message: object) -> None:
    data = message.encode()  # type: ignore[attr-defined]
    assert len(data) <= MAX_CONTROL_BYTES
    decoded = decode_message(data)
    assert decoded == message
    assert type(decoded).decode(data) == message
    assert 32 <= data[1] <= 63  # fixarray header, then the tag as a positive fixint


def test_offer_repr_hides_the_content_key() -> None:
    assert KEY.hex() not in repr(SAMPLES[0])
    assert repr(KEY) not in repr(SAMPLES[0])


def test_decode_as_the_wrong_type() -> None:
    with pytest.raises(MalformedTransferObject):
        Ack.decode(SAMPLES[2].encode())


def test_largest_messages_fit_the_bound() -> None:
    longest = Offer(TID, "é" * 127, 2**46, 2**19, 2**27, 2**63 - 1, KEY)
    with pytest.raises(LocalProtocolError):
        Offer(TID, "m", 2**46, 2**10, 2**36, 0, KEY)  # more than 2^32 - 1 chunks
    assert len(longest.encode()) <= MAX_CONTROL_BYTES
    worst_request = Request(TID, INC, tuple((2**32 - 200 + 2 * i, 1) for i in range(64)))
    assert len(worst_request.encode()) <= MAX_CONTROL_BYTES
    worst_ack = Ack(TID, INC, 2**32 - 1025, 2**32 - 1, b"\xff" * 127 + b"\x7f")
    assert len(worst_ack.encode()) <= MAX_CONTROL_BYTES
    detail = Abort(TID, "a" * 32, "é" * 100)
    assert len(detail.encode()) <= MAX_CONTROL_BYTES


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [32],
        [31, TID],
        [64, TID],
        [40, TID],
        [True, TID],
        [35, TID, INC, 0, 64],  # a field short
        [35, TID, INC, 0, 64, b"", 0],  # a field long
        [35, TID, INC, 5, 4, b""],  # limit below cum
        [35, TID, INC, 0, 1025, b""],  # window beyond MAX_WINDOW
        [35, TID, INC, 0, 64, b"\x01\x00"],  # trailing zero byte in the bitmap
        [35, TID, INC, 0, 8, b"\x80"],  # a bit beyond the credit
        [35, TID, 0, 0, 64, b""],  # incarnations count from 1
        [35, TID, b"\x01" * 8, 0, 64, b""],
        [36, TID, INC, []],
        [36, TID, INC, [[5, 1], [3, 1]]],  # unsorted
        [36, TID, INC, [[3, 2], [5, 1]]],  # adjacent: not canonical
        [36, TID, INC, [[3, 0]]],  # empty range
        [36, TID, INC, [[0, 1025]]],
        [36, TID, INC, [[i * 2, 1] for i in range(65)]],
        [36, TID, INC, [[0, 1, 2]]],
        [34, TID, "Too-Large", ""],
        [34, TID, "too-large", "bell\x07"],
        [34, TID, "too-large", "x" * 201],
        [39, TID, "", ""],
        [38, TID, bytes(31)],
        [37, TID, b"x" * 1025, bytes(64)],
        [32, TID, "m", 1, 1024, 1, 0, KEY[:31]],
        [32, TID, "m", 1, 1024, 1, 0.5, KEY],
    ],
)
def test_malformed_control_messages(fields: list[object]) -> None:
    with pytest.raises(MalformedTransferObject):
        decode_message(msgpack.packb(fields, use_bin_type=True))


def test_oversized_and_non_array_control_messages() -> None:
    with pytest.raises(MalformedTransferObject) as err:
        decode_message(b"\x00" * (MAX_CONTROL_BYTES + 1))
    assert err.value.reason == "too-large"
    for data in (b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb(35), b"\x92\x23"):
        with pytest.raises(MalformedTransferObject):
            decode_message(data)


def test_building_an_invalid_message_is_local_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        Ack(TID, INC, 5, 4)
    with pytest.raises(LocalProtocolError):
        Request(TID, INC, ((3, 1), (1, 1)))
    with pytest.raises(LocalProtocolError):
        Abort(TID, "Bad Reason")
    with pytest.raises(LocalProtocolError):
        Offer(TID, "../x", 1, 1024, 1, 0, KEY)


@settings(max_examples=1000)
@given(st.binary(max_size=300))
def test_control_decoder_fuzz_bytes(data: bytes) -> None:
    message, reason = _attempt(decode_message, data)
    assert reason or message.encode() == data


_leaf = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.none(),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.floats(allow_nan=False),
    st.sampled_from([TID, INC, KEY, bytes(32), bytes(64)]),
)
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=5), max_leaves=12)


@settings(max_examples=1000)
@given(st.integers(30, 65), _value, st.lists(_value, max_size=8))
def test_control_decoder_fuzz_structured(tag: int, tid: object, rest: list[object]) -> None:
    data = msgpack.packb([tag, tid, *rest], use_bin_type=True)
    message, reason = _attempt(decode_message, data)
    assert reason or message.encode() == data


@settings(max_examples=300)
@given(st.sampled_from(SAMPLES), st.data())
def test_control_decoder_fuzz_mutations(message: object, data: st.DataObject) -> None:
    raw = bytearray(message.encode())  # type: ignore[attr-defined]
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_message(bytes(raw))
    except MalformedTransferObject:
        return
    assert decoded.encode() == bytes(raw)


# -- chunk frames ----------------------------------------------------------------------------


def seal_frame(
    cipher: ChunkCipher, index: int, last: bool, plaintext: bytes, ext: bytes = b"\x00" * 8
) -> bytes:
    out = frame_buffer(max(len(plaintext), 1024))
    n = cipher.seal_into(out, index, last, plaintext, ext)
    return bytes(out[:n])


def test_chunk_frame_round_trip_and_layout() -> None:
    cipher = ChunkCipher(KEY, TID)
    frame = seal_frame(cipher, 7, True, b"hello world", b"ABCDEFGH")
    assert len(frame) == 11 + FRAME_OVERHEAD
    assert frame[:4] == b"\x01\x01\x01\x00"
    assert frame[4:8] == (7).to_bytes(4, "big")
    assert frame[8:24] == TID
    assert frame[24:32] == b"ABCDEFGH"
    header = parse_chunk_header(frame)
    assert (header.index, header.last, header.transfer_id) == (7, True, TID)
    out = bytearray(1024)
    n = cipher.open_into(out, frame)
    assert bytes(out[:n]) == b"hello world"
    # An empty final chunk (the empty file) is a frame of header and tag only.
    empty = seal_frame(cipher, 0, True, b"")
    assert len(empty) == FRAME_OVERHEAD
    assert cipher.open_into(out, memoryview(empty)) == 0


def test_reencryption_uses_a_fresh_nonce() -> None:
    cipher = ChunkCipher(KEY, TID)
    a = seal_frame(cipher, 1, False, b"same plaintext", b"\x00" * 8)
    b = seal_frame(cipher, 1, False, b"same plaintext", b"\x01" * 8)
    assert a[32:] != b[32:]


def test_every_bit_flip_of_a_frame_is_rejected() -> None:
    cipher = ChunkCipher(KEY, TID)
    frame = seal_frame(cipher, 3, False, bytes(range(200)))
    out = bytearray(1024)
    for pos in range(len(frame)):
        for bit in range(8):
            bad = bytearray(frame)
            bad[pos] ^= 1 << bit
            with pytest.raises(RemoteProtocolError):
                _accept(cipher, bad, out)


def test_frames_do_not_move_between_transfers_or_positions() -> None:
    cipher = ChunkCipher(KEY, TID)
    frame = bytearray(seal_frame(cipher, 3, False, b"chunk three"))
    out = bytearray(1024)
    other_tid = ChunkCipher(KEY, bytes(16))
    # Same key, other transfer id: the header (nonce and AD) differs, the tag fails.
    moved = bytearray(frame)
    moved[8:24] = bytes(16)
    with pytest.raises(DecryptError):
        other_tid.open_into(out, moved)
    # Other index, or the last flag set: fails.
    for patch in ((4, (4).to_bytes(4, "big")), (2, b"\x01")):
        bad = bytearray(frame)
        pos, value = patch
        bad[pos : pos + len(value)] = value
        with pytest.raises(DecryptError):
            cipher.open_into(out, bad)
    # Another key entirely.
    with pytest.raises(DecryptError):
        ChunkCipher(bytes(32), TID).open_into(out, frame)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:63], "truncated"),
        (lambda f: b"\x02" + f[1:], "version"),
        (lambda f: f[:1] + b"\x02" + f[2:], "frame-type"),
        (lambda f: f[:2] + b"\x02" + f[3:], "bad-flags"),
        (lambda f: f[:3] + b"\x01" + f[4:], "bad-flags"),
        (lambda f: f + bytes(600 * 1024), "too-large"),
    ],
)
def test_malformed_frame_headers(mutate: object, reason: str) -> None:
    frame = seal_frame(ChunkCipher(KEY, TID), 0, False, b"x" * 100)
    with pytest.raises(BadChunkFrame) as err:
        parse_chunk_header(mutate(frame))  # type: ignore[operator]
    assert err.value.reason == reason


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_frame_header_fuzz(data: bytes) -> None:
    _, reason = _attempt(parse_chunk_header, data)
    assert reason is None or reason


def test_cipher_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        ChunkCipher(KEY[:31], TID)
    with pytest.raises(LocalProtocolError):
        ChunkCipher(KEY, TID[:15])
    cipher = ChunkCipher(KEY, TID)
    with pytest.raises(LocalProtocolError):
        cipher.seal_into(bytearray(10), 0, True, b"x" * 100, bytes(8))
    with pytest.raises(LocalProtocolError):
        cipher.seal_into(bytearray(1000), 0, True, b"x", bytes(7))
