"""Validation of a .safetensors header, before a received model is offered to the user.

A safetensors file is an 8-byte little-endian header length N, N bytes of a UTF-8 JSON object,
then the data section. The object maps tensor names to `{"dtype", "shape", "data_offsets"}`
(offsets relative to the data section) and may hold `"__metadata__"`, a str -> str map. The
transfer has already proved the file is the sender's; this proves it is a well-formed model
file, so that a loader given it reads no out-of-range offsets and meets no surprises. The rules
are those of the reference implementation (huggingface/safetensors), slightly stricter where it
is lenient: duplicate keys, unknown tensor fields and non-finite JSON numbers are refused.

The shell reads the first 8 bytes, asks `header_length` how many more to read, and passes them
to `parse_header` with the file's size. Nothing here reads a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from protocol.errors import RemoteProtocolError

# Bits per element. Sub-byte types (F4, F6_*) pack; a tensor must fill whole bytes.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# The reference implementation refuses headers above 100 MB. A real model's header is a few
# hundred KiB even with thousands of tensors; parsing 100 MB of JSON would cost the daemon far
# more memory than its whole budget, so the default is lower (the caller may raise it).
DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 100_000_000
# Tensors in one file. Checking costs time and memory per tensor, whatever their size: 300k
# zero-size tensors in a 16 MiB header took 3.3 s and 195 MB. Real checkpoints hold a few
# hundred to a few thousand tensors per file (large models are sharded); 65536 leaves a wide
# margin and bounds the check to a fraction of a second. Counted in the raw header before it is
# decoded, so a header over the cap costs one scan of its bytes, not a JSON parse.
DEFAULT_MAX_TENSORS = 65536
SUFFIX = ".safetensors"
MAX_RANK = 64
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


class SafetensorsError(RemoteProtocolError):
    """The file is not a well-formed safetensors file; `reason` says which rule it breaks."""

    reason = "safetensors-malformed"
    hint = "ask the sender to check the file: it is not a valid .safetensors model"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets within the data section
    end: int


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    header_bytes: int  # N: the JSON header's length, padding included
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]  # in data order

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def is_safetensors_name(name: str) -> bool:
    """Whether a file of this name is a safetensors model: the extension in any case, as
    loaders and file managers that ignore case treat `model.SAFETENSORS`."""
    return name.casefold().endswith(SUFFIX)


def _fail(reason: str, message: str) -> SafetensorsError:
    return SafetensorsError(message, reason=f"safetensors-{reason}")


def header_length(
    prefix: bytes | bytearray | memoryview,
    file_size: int,
    *,
    max_header: int = DEFAULT_MAX_HEADER_BYTES,
) -> int:
    """N from the file's first 8 bytes, checked against the bound and the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise _fail("truncated", "the file is shorter than the 8-byte header length")
    n = int.from_bytes(bytes(prefix[:8]), "little")
    if n > min(max_header, MAX_HEADER_BYTES):
        raise _fail("header-too-large", f"the header claims {n} bytes, more than {max_header}")
    if n < 2:
        raise _fail("bad-json", "the header is too short to be a JSON object")
    if 8 + n > file_size:
        raise _fail("truncated", f"the header claims {n} bytes; the file is {file_size} bytes")
    return n


def parse_header(
    data: bytes | bytearray | memoryview,
    file_size: int,
    *,
    max_header: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> SafetensorsHeader:
    """Validate the header in `data` (the file's first 8 + N bytes, or more) for a file of
    `file_size` bytes. Raises SafetensorsError.

    Costs O(N) time and memory, bounded by `max_header` and `max_tensors`; a shell with an
    event loop runs it off the loop."""
    n = header_length(data, file_size, max_header=max_header)
    if len(data) < 8 + n:
        raise _fail("truncated", f"{8 + n} header bytes are needed, {len(data)} were given")
    raw = bytes(data[8 : 8 + n])
    # Every tensor is a JSON object and an object's "{" cannot be escaped, so this count bounds
    # the tensors from above (braces inside strings only make it larger): a scan of the bytes
    # refuses a header with too many before the JSON parse, which is what costs memory.
    if raw.count(b"{") - 1 > max_tensors:
        raise _fail("too-many-tensors", f"the header describes more than {max_tensors} tensors")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail("bad-json", f"the header is not UTF-8: {exc}") from exc
    if not text.startswith("{"):
        raise _fail("bad-json", "the header does not start with a JSON object")
    try:
        root = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _fail("bad-json", f"the header is not valid JSON: {exc}") from exc
    if not isinstance(root, dict):
        raise _fail("bad-json", "the header is not a JSON object")

    metadata = root.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail("bad-metadata", "__metadata__ must map strings to strings")

    if len(root) > max_tensors:
        raise _fail("too-many-tensors", f"the header describes more than {max_tensors} tensors")
    tensors = [_tensor(name, value) for name, value in root.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    data_len = file_size - 8 - n
    position = 0
    for t in tensors:
        if t.begin < position:
            raise _fail("overlap", f"tensor {t.name!r} overlaps the tensor before it")
        if t.begin > position:
            raise _fail("gap", f"{t.begin - position} bytes before tensor {t.name!r} are unused")
        position = t.end
    if position != data_len:
        raise _fail(
            "size-mismatch",
            f"the tensors cover {position} bytes; the data section has {data_len}",
        )
    return SafetensorsHeader(n, metadata, tuple(tensors))


def _tensor(name: str, value: Any) -> TensorInfo:
    if not isinstance(value, dict) or set(value) != _TENSOR_KEYS:
        raise _fail(
            "bad-tensor", f"tensor {name!r} must have exactly dtype, shape and data_offsets"
        )
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail("bad-dtype", f"tensor {name!r} has an unknown dtype {dtype!r}")
    shape = value["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise _fail("bad-shape", f"tensor {name!r}: a shape is a list of non-negative integers")
    offsets = value["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail("bad-offsets", f"tensor {name!r}: data_offsets is [begin, end], begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise _fail("bad-shape", f"tensor {name!r} does not fill a whole number of bytes")
    begin, end = offsets
    if end - begin != bits // 8:
        raise _fail(
            "size-mismatch",
            f"tensor {name!r} is {end - begin} bytes; {dtype} {shape} needs {bits // 8}",
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _fail("duplicate-key", f"the header names {key!r} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _fail("bad-json", f"the header contains {name}, which is not JSON")
