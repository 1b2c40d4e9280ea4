"""The signed manifest of a transfer, file names a receiver may write, and the whole-file hash.

The manifest says which file a transfer delivers: its name, size, chunk layout, BLAKE3 hash, the
transfer id, the sender's peer id and when it was created, signed with the sender's Ed25519
identity key. It is what makes one content key safe to share among N receivers: any of them can
encrypt chunks under that key, so only the sender-signed hash tells a receiver that the bytes it
assembled are the sender's. A receiver commits a file only if its hash matches this signature.

BLAKE3 was chosen by measurement (protocol/SPEC.md section 7): single-threaded on 256 KiB
updates it runs at ~6.5 GB/s here, against ~1.8 GB/s for SHA-256 with SHA-NI and ~0.9 GB/s for
BLAKE2b; on two shared cores that is ~0.4 s of CPU saved per GiB on each side.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

import blake3
import nacl.exceptions
import nacl.signing

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import valid_peer_id
from protocol.transfer._codec import (
    MalformedTransferObject,
    fields,
    pack,
    unpack,
    want_bytes,
    want_int,
    want_str,
)

VERSION = 1
MANIFEST_CONTEXT = b"peerd/v1/manifest\0"
TRANSFER_ID_BYTES = 16
CONTENT_KEY_BYTES = 32
HASH_BYTES = 32
SIGNATURE_BYTES = 64
VERIFY_KEY_BYTES = 32
NAME_MAX_BYTES = 255
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 512 * 1024  # a frame is this + 64 bytes: well under the 1 MiB brokers accept
DEFAULT_CHUNK_SIZE = 256 * 1024  # measured best (SPEC.md section 7); 1 MiB gained nothing
MAX_FILE_SIZE = 2**46  # 64 TiB: chunk indices stay far below 2^32 at any chunk size
MAX_CHUNK_COUNT = 2**32 - 1  # chunk indices are 32-bit on the wire
MAX_MANIFEST_BYTES = 1024
# Characters that make a name display as something it is not, or break a terminal line.
_BIDI_AND_INVISIBLE = frozenset(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2066\u2067\u2068\u2069\ufeff"
)


def name_problem(name: str) -> str | None:
    """Why `name` is not a safe base name for a received file, or None if it is.

    A receiver writes the file under this name inside its inbox, so the name must not escape
    the directory (no separators, no `..`), hide itself (no leading dot), or deceive whoever
    reads it in a listing (no control, bidi or invisible characters, no edge whitespace, NFC so
    one name has one spelling).
    """
    if not name:
        return "the name is empty"
    try:
        encoded = name.encode()
    except UnicodeEncodeError:
        return "the name is not valid Unicode text"
    if len(encoded) > NAME_MAX_BYTES:
        return f"the name is longer than {NAME_MAX_BYTES} bytes"
    if "/" in name or "\\" in name:
        return "the name contains a path separator"
    if name.startswith("."):
        return "the name starts with a dot (hidden file, '.' or '..')"
    if name != name.strip():
        return "the name starts or ends with whitespace"
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI_AND_INVISIBLE:
            return f"the name contains the control or invisible character U+{ord(ch):04X}"
    if unicodedata.normalize("NFC", name) != name:
        return "the name is not in Unicode normal form C"
    return None


def numbered_name(name: str, n: int, *, name_max: int = NAME_MAX_BYTES) -> str:
    """The n-th name to try for a received file whose `name` is taken: `model.tar.gz`,
    `model-2.tar.gz`, `model-3.tar.gz`... Never longer than `name_max` bytes: the stem is
    shortened (at a character boundary) so that the tag and the extension fit, because a name
    one byte too long would make the receiver lose a file it has already verified. The extension
    is everything after the first dot; if that leaves no room, only the last one is kept."""
    if n == 1:
        return name
    tag = f"-{n}"
    stem, dot, ext = name.partition(".")
    if len((tag + dot + ext).encode()) >= name_max:
        stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
        if len((tag + dot + ext).encode()) >= name_max:
            stem, dot, ext = name, "", ""
    room = name_max - len((tag + dot + ext).encode())
    raw = stem.encode()[: max(room, 0)]
    while True:
        short = raw.decode("utf-8", "ignore").rstrip()
        candidate = f"{short}{tag}{dot}{ext}"
        if name_problem(candidate) is None or not raw:
            return candidate
        raw = raw[:-1]  # a cut that left a combining mark alone: cut one more


def check_peer_id(value: Any, what: str) -> str:
    if type(value) is not str or not valid_peer_id(value):
        raise MalformedTransferObject(f"{what} is not a peer id (1-23 of a-z, 0-9)")
    return value


def check_local_peer_id(value: Any, what: str) -> str:
    """`check_peer_id` for a peer id this node passed in: a bad one is local misuse."""
    try:
        return check_peer_id(value, what)
    except MalformedTransferObject as exc:
        raise LocalProtocolError(str(exc)) from exc


def chunk_count_for(size: int, chunk_size: int) -> int:
    """Chunks in a file of `size` bytes. An empty file still has one (empty, final) chunk, so
    every transfer ends with exactly one chunk flagged last."""
    return max(1, -(-size // chunk_size))


def check_layout(size: int, chunk_size: int, chunk_count: int) -> None:
    """Raise MalformedTransferObject unless size, chunk size and count agree and are in range."""
    if not 0 <= size <= MAX_FILE_SIZE:
        raise MalformedTransferObject(f"file size {size} is out of range")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise MalformedTransferObject(
            f"chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
        )
    if chunk_count_for(size, chunk_size) > MAX_CHUNK_COUNT:
        raise MalformedTransferObject(
            f"{size} bytes in chunks of {chunk_size} is more than {MAX_CHUNK_COUNT} chunks"
        )
    if chunk_count != chunk_count_for(size, chunk_size):
        raise MalformedTransferObject(
            f"chunk count {chunk_count} does not match size {size} and chunk size {chunk_size}"
        )


def chunk_length(index: int, size: int, chunk_size: int, chunk_count: int) -> int:
    """Plaintext length of chunk `index`: `chunk_size` except for the last one."""
    if index < chunk_count - 1:
        return chunk_size
    return size - (chunk_count - 1) * chunk_size


class FileHasher:
    """BLAKE3-256 of a file fed in order, single-threaded: the daemon shares two cores with the
    broker and the peer, so a thread pool would only steal from them."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = blake3.blake3(max_threads=1)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest(HASH_BYTES)


def file_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The manifest hash of a whole in-memory file (tests, small files)."""
    h = FileHasher()
    h.update(data)
    return h.digest()


@dataclass(frozen=True, slots=True)
class Manifest:
    transfer_id: bytes
    sender: str
    name: str
    size: int
    chunk_size: int
    chunk_count: int
    created: int  # Unix seconds
    file_hash: bytes

    def __post_init__(self) -> None:
        # Our own manifests are checked as strictly as a peer's: a bad one is a local bug.
        try:
            _check_manifest_fields(self)
        except MalformedTransferObject as exc:
            raise LocalProtocolError(f"invalid manifest: {exc}") from exc

    def body(self) -> bytes:
        return pack(
            [
                VERSION,
                self.transfer_id,
                self.sender,
                self.name,
                self.size,
                self.chunk_size,
                self.chunk_count,
                self.created,
                self.file_hash,
            ]
        )

    def sign(self, signing_key: nacl.signing.SigningKey) -> SignedManifest:
        body = self.body()
        signature = signing_key.sign(MANIFEST_CONTEXT + body).signature
        return SignedManifest(self, body, bytes(signature))

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> Manifest:
        value = fields(unpack(body, what="manifest", max_size=MAX_MANIFEST_BYTES), "manifest", 9)
        version = want_int(value[0], "manifest version")
        if version != VERSION:
            raise MalformedTransferObject(
                f"manifest version {version} is not supported", reason="version"
            )
        name = want_str(value[3], "file name", max_len=NAME_MAX_BYTES)
        problem = name_problem(name)
        if problem is not None:
            raise MalformedTransferObject(f"unsafe file name: {problem}", reason="bad-name")
        transfer_id = want_bytes(value[1], "transfer id", TRANSFER_ID_BYTES)
        sender = check_peer_id(value[2], "manifest sender")
        size = want_int(value[4], "file size", hi=MAX_FILE_SIZE)
        chunk_size = want_int(value[5], "chunk size", hi=MAX_CHUNK_SIZE)
        chunk_count = want_int(value[6], "chunk count", hi=MAX_CHUNK_COUNT)
        check_layout(size, chunk_size, chunk_count)
        created = want_int(value[7], "creation time")
        digest = want_bytes(value[8], "file hash", HASH_BYTES)
        return cls(transfer_id, sender, name, size, chunk_size, chunk_count, created, digest)


def _check_manifest_fields(m: Manifest) -> None:
    want_bytes(m.transfer_id, "transfer id", TRANSFER_ID_BYTES)
    check_peer_id(m.sender, "manifest sender")
    if type(m.name) is not str:
        raise MalformedTransferObject("file name must be a string")
    problem = name_problem(m.name)
    if problem is not None:
        raise MalformedTransferObject(f"unsafe file name: {problem}", reason="bad-name")
    want_int(m.size, "file size", hi=MAX_FILE_SIZE)
    want_int(m.chunk_size, "chunk size", hi=MAX_CHUNK_SIZE)
    want_int(m.chunk_count, "chunk count", hi=MAX_CHUNK_COUNT)
    check_layout(m.size, m.chunk_size, m.chunk_count)
    want_int(m.created, "creation time")
    want_bytes(m.file_hash, "file hash", HASH_BYTES)


class BadManifestSignature(RemoteProtocolError):
    reason = "bad-signature"


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest with its exact encoded body and the sender's signature over it."""

    manifest: Manifest
    body: bytes
    signature: bytes

    @classmethod
    def open(
        cls,
        body: bytes | bytearray | memoryview,
        signature: bytes,
        verify_key: bytes | nacl.signing.VerifyKey,
    ) -> SignedManifest:
        """Decode `body` strictly and check `signature` under the sender's identity key.

        Raises MalformedTransferObject or BadManifestSignature; a VerifyKey of the wrong length
        is local misuse (LocalProtocolError).
        """
        body = bytes(body)
        manifest = Manifest.decode(body)
        if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
            raise MalformedTransferObject(f"a manifest signature is {SIGNATURE_BYTES} bytes")
        key = _verify_key(verify_key)
        try:
            key.verify(MANIFEST_CONTEXT + body, signature)
        except nacl.exceptions.BadSignatureError as exc:
            raise BadManifestSignature(
                "the manifest's signature does not verify under the sender's identity key"
            ) from exc
        return cls(manifest, body, signature)


def _verify_key(key: bytes | nacl.signing.VerifyKey) -> nacl.signing.VerifyKey:
    if isinstance(key, nacl.signing.VerifyKey):
        return key
    if type(key) is not bytes or len(key) != VERIFY_KEY_BYTES:
        raise LocalProtocolError(f"a verify key is {VERIFY_KEY_BYTES} bytes")
    try:
        return nacl.signing.VerifyKey(key)
    except (TypeError, ValueError, nacl.exceptions.CryptoError) as exc:
        raise LocalProtocolError(f"unusable verify key: {exc}") from exc
