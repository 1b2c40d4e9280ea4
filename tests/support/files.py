"""Files for transfer tests: random content of a given size, its hash, and what a node
received (final files, and partial ones left behind)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tests.support.cluster import Node


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def received_files(node: Node, sender: Node) -> list[Path]:
    """The files `node` committed from `sender` (hidden ones, such as partials, left out)."""
    inbox = node.dir / "inbox" / sender.peer_id
    if not inbox.exists():
        return []
    return sorted(p for p in inbox.iterdir() if not p.name.startswith("."))


def partial_files(node: Node) -> list[Path]:
    inbox = node.dir / "inbox"
    return list(inbox.rglob(".*.part")) if inbox.exists() else []
