"""Model versions (issue 15): bytes on the wire per version of a series of fine-tuned
checkpoints, sent through peerd with deltas, through peerd without (the whole file), and what
`rsync --stats --no-whole-file` sends for the same pair of files.

The series starts from the evaluation's random-weight Llama-style model (`model.write_model`);
each later version is a copy of the one before in which some tensors (or some rows of one)
were updated in place: every updated value gets N(0, 0.002) added (weights are N(0, 0.02),
norms 1), so nearly every 2-byte value of an updated tensor changes, as in a real fine-tune,
while frozen tensors keep every bit. File size and layout stay the same. `series` says what
each version updates.

The daemons and the rsync run are the delta benchmark's (`scripts.benchmarks.delta`): alice ->
bob with deltas, carol -> dave with `[receive] deltas = false` on both, on a private Mosquitto
configured as shipped. Each receiver keeps every version it received (that is what a delta
reuses). Bytes on the wire are the kernel's TCP counters of the sender's connection to the
broker during the transfer (`lab.Meter`), as everywhere on the evaluation page; the payload
bytes peerd published (its own counter) are recorded next to them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scripts.benchmarks import delta
from scripts.evaluation.lab import Meter, node_pid
from scripts.evaluation.model import NUMPY, write_model

NOISE = 0.002  # standard deviation added to each updated value
NEW_TOKENS = 0.025  # v4: the share of the embedding's rows (at its end) that new tokens train


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    rows: int
    row_bytes: int
    offset: int  # of its first byte in the file


@dataclass(frozen=True)
class Step:
    """One version: what it updates of the version before. `rows` is a part of one tensor
    (the first and last row fraction) instead of whole tensors."""

    version: int
    what: str
    tensors: tuple[str, ...] = ()
    rows: tuple[str, float, float] | None = None


def tensors_of(path: Path) -> list[Tensor]:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        rows = info["shape"][0] if info["shape"] else 1
        out.append(Tensor(name, info["dtype"], rows, (end - begin) // max(rows, 1), 8 + n + begin))
    return out


def series(names: list[str]) -> list[Step]:
    """v1..v8 of a model with these tensor names (Llama-style: model.layers.<i>.*)."""
    layers = 1 + max(int(n.split(".")[2]) for n in names if n.startswith("model.layers."))

    def layer(i: int) -> list[str]:
        return [n for n in names if n.startswith(f"model.layers.{i}.")]

    top = max(1, layers // 4)
    half = max(1, layers // 2)
    return [
        Step(1, "the base model (the receiver holds nothing yet)", tuple(names)),
        Step(
            2,
            f"fine-tune of the top {top} of {layers} layers and the final norm, the rest frozen",
            (*(n for i in range(layers - top, layers) for n in layer(i)), "model.norm.weight"),
        ),
        Step(
            3,
            "a LoRA adapter merged into q_proj and v_proj of every layer",
            tuple(n for n in names if n.endswith(("q_proj.weight", "v_proj.weight"))),
        ),
        Step(
            4,
            f"new tokens: the last {NEW_TOKENS:.1%} of the embedding's rows trained",
            rows=("model.embed_tokens.weight", 1 - NEW_TOKENS, 1.0),
        ),
        Step(
            5,
            "norm-only tuning: every RMSNorm weight (small tensors all through the file)",
            tuple(n for n in names if n.endswith("norm.weight")),
        ),
        Step(6, "the same checkpoint saved again, unchanged"),
        Step(7, "a full fine-tune: every tensor updated", tuple(names)),
        Step(
            8,
            f"continued fine-tune of the top {half} of {layers} layers",
            tuple(n for i in range(layers - half, layers) for n in layer(i)),
        ),
    ]


def derive(previous: Path, path: Path, step: Step, seed: int) -> int:
    """Write version `step` as a copy of `previous` with its updates; the bytes it updated."""
    shutil.copyfile(previous, path)
    by_name = {t.name: t for t in tensors_of(path)}
    parts = [(by_name[n], 0, by_name[n].rows) for n in step.tensors]
    if step.rows is not None:
        t = by_name[step.rows[0]]
        parts.append((t, int(t.rows * step.rows[1]), int(t.rows * step.rows[2])))
    rng = np.random.default_rng(seed)
    updated = 0
    for t, first, last in parts:
        dtype = NUMPY[t.dtype].newbyteorder("<")
        per_row = t.row_bytes // dtype.itemsize
        step_rows = max(1, (4 << 20) // max(per_row, 1))  # ~4 M values at a time
        for row in range(first, last, step_rows):
            count = min(step_rows, last - row) * per_row
            values = np.memmap(
                path, dtype=dtype, mode="r+", offset=t.offset + row * t.row_bytes, shape=(count,)
            )
            noise = rng.standard_normal(count, dtype=np.float32) * NOISE
            values[:] = (values.astype(np.float32) + noise).astype(dtype)
            values.flush()
            del values
        updated += (last - first) * t.row_bytes
    return updated


def run(size_mb: int, work: Path, log: Callable[[str], None] = print) -> tuple[str, list[Any]]:
    """Send v1..v8 through both pairs and rsync each pair of consecutive versions: the
    model's description and one row per version."""
    files = work / "versions"
    files.mkdir(parents=True, exist_ok=True)
    base = files / "ckpt-v1.safetensors"
    made = write_model(base, size_mb * 1_000_000, seed=15)
    steps = series([t.name for t in tensors_of(base)])
    rows: list[dict[str, Any]] = []
    log(f"    {made.description}, {made.size / 1e6:.1f} MB, {len(steps)} versions")
    with delta.delta_pairs() as (broker, (alice, bob, carol, dave)):
        previous: Path | None = None
        for step in steps:
            path = base
            updated = made.size
            if previous is not None:
                path = files / f"ckpt-v{step.version}.safetensors"
                updated = derive(previous, path, step, seed=step.version)
            os.sync()  # no run pays for another's writeback
            on = _metered(broker.port, alice, bob, path)
            off = _metered(broker.port, carol, dave, path)
            literal, rsync_sent = delta.rsync_literal(previous, path, work)
            size = path.stat().st_size
            rows.append(
                {
                    "version": step.version,
                    "what": step.what,
                    "file_bytes": size,
                    "updated_bytes": updated,
                    "deltas_wire_bytes": on["sent"],
                    "deltas_published_bytes": on["wire"],
                    "deltas_held_bytes": on["held"],
                    "deltas_seconds": on["seconds"],
                    "whole_wire_bytes": off["sent"],
                    "whole_published_bytes": off["wire"],
                    "whole_seconds": off["seconds"],
                    "rsync_literal_bytes": literal,
                    "rsync_sent_bytes": rsync_sent,
                }
            )
            log(
                f"    v{step.version}: updated {updated / size:.1%}; on the wire: deltas"
                f" {on['sent'] / size:.2%}, whole file {off['sent'] / size:.2%},"
                f" rsync literal {literal / size:.2%}"
            )
            previous = path
    return made.description, rows


def _metered(port: int, sender: Any, receiver: Any, path: Path) -> dict[str, Any]:
    """One verified transfer (`delta.send`), with the sender's TCP bytes to the broker."""
    meter = Meter(port, {"sender": node_pid(sender)})
    meter.start()
    result = delta.send(sender, path, receiver)
    usage = meter.stop()
    return {**result, "sent": usage.sent["sender"]}
