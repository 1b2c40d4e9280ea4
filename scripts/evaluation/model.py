"""Safetensors files written by hand, and a plausible model to fill one.

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of a
UTF-8 JSON object mapping each tensor name to {"dtype", "shape", "data_offsets"} (offsets into
the data section, in data order, no gaps) plus an optional "__metadata__" str -> str map, then
the data section, little-endian. The header is padded with spaces to a multiple of 8 bytes, as
the reference writer does, so every tensor starts aligned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DTYPES: dict[np.dtype[Any], str] = {
    np.dtype("float16"): "F16",
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
}
NUMPY: dict[str, np.dtype[Any]] = {v: k for k, v in DTYPES.items()}


def header_bytes(
    specs: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]
) -> bytes:
    """The 8-byte length and the padded JSON header for tensors (name, dtype, shape) in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = int(np.prod(shape, dtype=np.int64)) * NUMPY[dtype].itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """A whole safetensors file in memory (small models: federated-learning updates)."""
    specs = [(name, DTYPES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    parts = [header_bytes(specs, metadata or {})]
    parts += [
        np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<")).tobytes() for t in tensors.values()
    ]
    return b"".join(parts)


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (copies) and metadata of a safetensors file in memory."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    metadata = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = NUMPY[info["dtype"]].newbyteorder("<")
        tensors[name] = (
            np.frombuffer(data[base + begin : base + end], dtype=dtype)
            .reshape(info["shape"])
            .copy()
        )
    return tensors, metadata


@dataclass(frozen=True)
class ModelFile:
    path: Path
    size: int
    tensors: int
    parameters: int
    sha256: str
    description: str


def _llama_like(target: int) -> tuple[str, list[tuple[str, str, tuple[int, ...]]]]:
    """Tensor names, dtypes and shapes of a small Llama-style decoder whose weights (F16, norms
    in F32) come close to `target` bytes: the width shrinks for small targets, then layers are
    added until the next one would overshoot."""
    vocab = 32000 if target >= 100_000_000 else 8000
    for width in (1024, 768, 512, 256, 128, 64):
        if vocab * width * 2 + 4 * 16 * width * width * 2 <= target or width == 64:
            break
    hidden = 4 * width
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", "F16", (vocab, width))
    ]
    used = vocab * width * 2 + width * 4
    layer = 4 * width * width * 2 + 3 * width * hidden * 2 + 2 * width * 4
    layers = max(1, round((target - used) / layer))
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", "F32", (width,)),
            (p + "self_attn.q_proj.weight", "F16", (width, width)),
            (p + "self_attn.k_proj.weight", "F16", (width, width)),
            (p + "self_attn.v_proj.weight", "F16", (width, width)),
            (p + "self_attn.o_proj.weight", "F16", (width, width)),
            (p + "post_attention_layernorm.weight", "F32", (width,)),
            (p + "mlp.gate_proj.weight", "F16", (hidden, width)),
            (p + "mlp.up_proj.weight", "F16", (hidden, width)),
            (p + "mlp.down_proj.weight", "F16", (width, hidden)),
        ]
    specs.append(("model.norm.weight", "F32", (width,)))
    return f"Llama-style decoder, {layers} layers, width {width}, vocabulary {vocab}", specs


def _values(
    rng: np.random.Generator, name: str, dtype: str, shape: tuple[int, ...]
) -> Iterator[bytes]:
    """The tensor's bytes in slices of at most ~16 MB: weights ~ N(0, 0.02), norms 1."""
    rows = shape[0]
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, (4 << 20) // per_row)
    for start in range(0, rows, step):
        n = min(step, rows - start) * per_row
        if name.endswith("norm.weight"):
            block = np.ones(n, dtype=np.float32)
        else:
            block = rng.standard_normal(n, dtype=np.float32)
            block *= 0.02
        yield block.astype(NUMPY[dtype].newbyteorder("<"), copy=False).tobytes()


def write_model(path: Path, target_bytes: int, *, seed: int = 0) -> ModelFile:
    """Write a random-weight model of about `target_bytes` and return what it is."""
    description, specs = _llama_like(target_bytes)
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    head = header_bytes(specs, {"format": "pt", "generator": "peerd quickstart (random weights)"})
    size = 0
    with path.open("wb") as f:
        for chunk in (head, *(b for spec in specs for b in _values(rng, *spec))):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    parameters = sum(int(np.prod(shape, dtype=np.int64)) for _, _, shape in specs)
    return ModelFile(path, size, len(specs), parameters, digest.hexdigest(), description)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
