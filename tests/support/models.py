"""Synthetic safetensors checkpoints for the delta tests and benchmarks: a base model and
versions of it in which some tensors changed (as a fine-tune that freezes most layers does)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path


def tensor_sizes(total: int, count: int, seed: int = 0) -> list[int]:
    """`count` tensor sizes (multiples of 4 bytes, unequal like real layers) adding up to about
    `total` bytes."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.3, 1.7) for _ in range(count)]
    scale = total / sum(weights)
    return [max(4, int(w * scale) // 4 * 4) for w in weights]


def write_model(
    path: Path, sizes: list[int], *, seed: int = 0, changed: dict[int, int] | None = None
) -> Path:
    """A safetensors file with one F32 tensor per size; tensor i's bytes come from
    (seed, i, changed.get(i, 0)), so a version that bumps `changed[i]` rewrites tensor i only."""
    changed = changed or {}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i, n in enumerate(sizes):
        header[f"layer.{i}.weight"] = {
            "dtype": "F32",
            "shape": [n // 4],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, n in enumerate(sizes):
            f.write(random.Random(f"{seed}/{i}/{changed.get(i, 0)}").randbytes(n))
    return path
