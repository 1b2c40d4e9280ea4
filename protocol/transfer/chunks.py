"""Chunk frames: a fixed 32-byte header and the chunk's AEGIS-256 ciphertext.

```
offset  size  field
0       1     version      = 1
1       1     type         = 1 (chunk)
2       1     flags        bit 0: LAST (this is the file's final chunk); other bits 0
3       1     reserved     = 0
4       4     index        chunk index, unsigned big-endian
8       16    transfer id
24      8     nonce extension, random per encryption
32      n+32  AEGIS-256(key = content key, nonce = header, ad = header, chunk plaintext)
```

The 32-byte header is the AEGIS-256 nonce and also its associated data, so a frame cannot be
moved to another index, another transfer or another position relative to the end (the STREAM
construction's counter and last flag) without failing authentication. The random extension
makes every encryption use a fresh nonce even when a repaired chunk is re-read from a file that
changed in between: AEGIS, like GCM, must never see one nonce with two plaintexts.

Chunks are encrypted once and the same frame goes to every receiver; the header is parsed
without decrypting so that a receiver drops duplicates and frames outside its window cheaply.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol import sodium
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.transfer.manifest import CONTENT_KEY_BYTES, MAX_CHUNK_SIZE, TRANSFER_ID_BYTES

FRAME_VERSION = 1
FRAME_TYPE_CHUNK = 1
FLAG_LAST = 0x01
HEADER = struct.Struct(">BBBBI16s8s")
HEADER_BYTES = HEADER.size  # 32 = AEGIS-256 nonce length
TAG_BYTES = sodium.AEGIS256_TAG_BYTES
FRAME_OVERHEAD = HEADER_BYTES + TAG_BYTES
NONCE_EXTENSION_BYTES = 8
MAX_FRAME_BYTES = MAX_CHUNK_SIZE + FRAME_OVERHEAD

assert HEADER_BYTES == sodium.AEGIS256_NONCE_BYTES


class BadChunkFrame(RemoteProtocolError):
    """A chunk frame that is malformed or does not belong where it claims to."""

    reason = "bad-chunk"


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    index: int
    last: bool
    transfer_id: bytes


def frame_buffer(chunk_size: int) -> bytearray:
    """A buffer large enough for any frame of a transfer with this chunk size; reuse it (fresh
    256 KiB buffers page-fault and cost more than the cipher)."""
    return bytearray(chunk_size + FRAME_OVERHEAD)


def parse_chunk_header(frame: bytes | bytearray | memoryview) -> ChunkHeader:
    """Parse and check the header only (no decryption)."""
    if len(frame) < FRAME_OVERHEAD:
        raise BadChunkFrame("a chunk frame is shorter than its header and tag", reason="truncated")
    if len(frame) > MAX_FRAME_BYTES:
        raise BadChunkFrame("a chunk frame is longer than the largest chunk", reason="too-large")
    version, kind, flags, reserved, index, transfer_id, _ext = HEADER.unpack_from(frame)
    if version != FRAME_VERSION:
        raise BadChunkFrame(f"chunk frame version {version} is not supported", reason="version")
    if kind != FRAME_TYPE_CHUNK:
        raise BadChunkFrame(f"frame type {kind} is not a chunk", reason="frame-type")
    if flags & ~FLAG_LAST or reserved:
        raise BadChunkFrame("a chunk frame has unknown flags set", reason="bad-flags")
    return ChunkHeader(index, bool(flags & FLAG_LAST), transfer_id)


class ChunkCipher:
    """Encrypts and decrypts the chunk frames of one transfer under its content key."""

    __slots__ = ("_key", "_transfer_id")

    def __init__(self, content_key: bytes, transfer_id: bytes) -> None:
        if type(content_key) is not bytes or len(content_key) != CONTENT_KEY_BYTES:
            raise LocalProtocolError(f"a content key is {CONTENT_KEY_BYTES} bytes")
        if type(transfer_id) is not bytes or len(transfer_id) != TRANSFER_ID_BYTES:
            raise LocalProtocolError(f"a transfer id is {TRANSFER_ID_BYTES} bytes")
        self._key = content_key
        self._transfer_id = transfer_id

    def seal_into(
        self,
        out: bytearray | memoryview,
        index: int,
        last: bool,
        plaintext: bytes | bytearray | memoryview,
        extension: bytes,
    ) -> int:
        """Write the frame of chunk `index` into `out`; return its length."""
        n = len(plaintext) + FRAME_OVERHEAD
        if len(out) < n:
            raise LocalProtocolError(f"frame buffer too small: {len(out)} < {n}")
        if len(plaintext) > MAX_CHUNK_SIZE:
            raise LocalProtocolError("a chunk is larger than the largest chunk size")
        if len(extension) != NONCE_EXTENSION_BYTES:
            raise LocalProtocolError(f"a nonce extension is {NONCE_EXTENSION_BYTES} bytes")
        flags = FLAG_LAST if last else 0
        header = HEADER.pack(
            FRAME_VERSION, FRAME_TYPE_CHUNK, flags, 0, index, self._transfer_id, extension
        )
        out[:HEADER_BYTES] = header
        view = out if isinstance(out, memoryview) else memoryview(out)
        sodium.aegis256_encrypt_into(
            view[HEADER_BYTES:n],
            self._key,
            header,
            header,
            plaintext if not isinstance(plaintext, bytearray) else memoryview(plaintext),
        )
        return n

    def open_into(self, out: bytearray | memoryview, frame: bytes | bytearray | memoryview) -> int:
        """Authenticate and decrypt `frame` into `out`; return the plaintext length.

        The caller has parsed the header (`parse_chunk_header`) and checked that it belongs to
        this transfer and has the expected length; a bad tag raises DecryptError.
        """
        view = frame if isinstance(frame, memoryview) else memoryview(frame)
        header = bytes(view[:HEADER_BYTES])
        return sodium.aegis256_decrypt_into(out, self._key, header, header, view[HEADER_BYTES:])
