"""`./scripts/evaluate --quick` keeps working: it writes the page, every figure and every CSV,
and its federated runs with one seed are equal to the last bit; `--only versions` rewrites only
the model-versions section. Plus the pieces it rests on: the hand-written safetensors files, the
determinism of the federated training and the checkpoint series."""

from __future__ import annotations

import asyncio
import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest

from protocol.safetensors import parse_header
from scripts.evaluation import fl, versions
from scripts.evaluation import model as st
from scripts.evaluation.experiments import Plan
from scripts.evaluation.report import (
    FIGURES,
    VERSIONS_BEGIN,
    VERSIONS_END,
    Results,
    write_versions,
)

ROOT = Path(__file__).resolve().parents[2]
TABLES = (
    "handshakes",
    "handshake_summary",
    "handshake_scaling",
    "transfer",
    "fanout",
    "federated",
    "versions",
)
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_quick_evaluation_writes_page_figures_and_data(tmp_path: Path) -> None:
    out = tmp_path / "docs"
    result = subprocess.run(
        [str(ROOT / "scripts" / "evaluate"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "evaluation: OK" in result.stdout

    page = (out / "evaluation.md").read_text()
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG)
        assert len(data) < 100_000, f"{png.name} is {len(data)} bytes"
        assert f"(figures/{name}.png)" in page
    for table in TABLES:
        assert _rows(out / "data" / f"{table}.csv"), f"{table}.csv is empty"
        assert f"(data/{table}.csv)" in page
    assert "identical curves, bit for bit" in page

    # Both sides of every comparison were measured.
    handshakes = _rows(out / "data" / "handshakes.csv")
    assert {r["mode"] for r in handshakes} == {"peerd", "plaintext"}
    assert all(float(r["ms"]) > 0 for r in handshakes)
    for table in ("transfer", "fanout", "handshake_scaling"):
        assert {r["mode"] for r in _rows(out / "data" / f"{table}.csv")} == {"peerd", "plaintext"}
    for row in _rows(out / "data" / "transfer.csv"):
        # Each side received the whole model (bytes on the wire are at least the file).
        assert int(row["receivers_received_bytes"]) >= int(row["bytes"])

    # Two peerd runs and a plaintext run with one seed: the same curve, to the last bit, and
    # the same global model at every round.
    curves: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for r in _rows(out / "data" / "federated.csv"):
        curves.setdefault((r["mode"], r["run"]), []).append(
            (r["accuracy"], r["loss"], r["model_sha256"])
        )
    assert set(curves) == {("peerd", "1"), ("peerd", "2"), ("plaintext", "1")}
    assert curves["peerd", "1"] == curves["peerd", "2"] == curves["plaintext", "1"]
    assert len({c[2] for c in curves["peerd", "1"]}) == len(curves["peerd", "1"])  # it trained
    _check_versions(_rows(out / "data" / "versions.csv"))
    assert page.count(VERSIONS_BEGIN) == page.count(VERSIONS_END) == 1


def _check_versions(rows: list[dict[str, str]]) -> None:
    """What the checkpoint series must show whatever the load and timing: deltas off sends
    every version whole; with deltas the receiver holds every byte a version did not update
    (what the sender then publishes of them depends on timing: docs/benchmarks.md, delta), and
    an identical resend is far from the whole file."""
    assert [int(r["version"]) for r in rows] == list(range(1, 9))
    for r in rows:
        size, updated = int(r["file_bytes"]), int(r["updated_bytes"])
        assert int(r["whole_wire_bytes"]) >= size
        assert int(r["deltas_wire_bytes"]) >= int(r["deltas_published_bytes"]) > 0
        # Held: whole transfer chunks no updated byte touches, never more than was not updated.
        held = int(r["deltas_held_bytes"])
        assert held <= size - updated, r
        if updated < size // 2:
            assert held > 0, r
    v1, v6 = rows[0], rows[5]
    assert int(v1["deltas_held_bytes"]) == 0
    assert int(v1["deltas_wire_bytes"]) >= int(v1["file_bytes"])
    assert int(v1["rsync_literal_bytes"]) == int(v1["file_bytes"])
    assert int(v6["updated_bytes"]) == int(v6["rsync_literal_bytes"]) == 0
    assert int(v6["deltas_held_bytes"]) == int(v6["file_bytes"])
    assert int(v6["deltas_wire_bytes"]) < int(v6["whole_wire_bytes"]) // 2


@pytest.mark.slow
def test_only_versions_rewrites_its_section_alone(tmp_path: Path) -> None:
    page = tmp_path / "evaluation.md"
    page.write_text("# Evaluation\n\n## Fan-out\n\nkept\n\n## Data\n\n- kept too\n")
    for _ in range(2):  # inserted before "## Data" once, then replaced between its markers
        result = subprocess.run(
            [
                str(ROOT / "scripts" / "evaluate"),
                *("--only", "versions", "--versions-mb", "4", "--out", str(tmp_path)),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = page.read_text()
    assert text.startswith("# Evaluation\n\n## Fan-out\n\nkept\n")
    assert text.endswith("## Data\n\n- kept too\n")
    assert text.count(VERSIONS_BEGIN) == text.count(VERSIONS_END) == 1
    assert text.index(VERSIONS_END) < text.index("## Data")
    assert "(figures/versions.png)" in text
    assert "(data/versions.csv)" in text
    assert (tmp_path / "figures" / "versions.png").read_bytes().startswith(PNG)
    _check_versions(_rows(tmp_path / "data" / "versions.csv"))


def test_write_versions_needs_a_page(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        write_versions(Results(Plan(), {}), tmp_path)


def test_checkpoint_series_updates_what_it_says_and_nothing_else(tmp_path: Path) -> None:
    previous = st.write_model(tmp_path / "v1.safetensors", 3_000_000, seed=2).path
    tensors = versions.tensors_of(previous)
    steps = versions.series([t.name for t in tensors])
    assert [s.version for s in steps] == list(range(1, 9))
    for step in steps[1:]:
        path = tmp_path / f"v{step.version}.safetensors"
        updated = versions.derive(previous, path, step, seed=step.version)
        old, new = previous.read_bytes(), path.read_bytes()
        assert len(old) == len(new)
        assert old[: tensors[0].offset] == new[: tensors[0].offset]  # the header
        changed = 0
        for t in tensors:
            size = t.rows * t.row_bytes
            a, b = old[t.offset : t.offset + size], new[t.offset : t.offset + size]
            if t.name in step.tensors:
                # Nearly every value of an updated tensor changes, as in a real fine-tune.
                width = 2 if t.dtype == "F16" else 4
                values = [a[i : i + width] != b[i : i + width] for i in range(0, size, width)]
                assert sum(values) >= 0.9 * len(values), (step.version, t.name)
                changed += size
            elif step.rows is not None and t.name == step.rows[0]:
                first = int(t.rows * step.rows[1]) * t.row_bytes
                assert a[:first] == b[:first]
                assert a[first:] != b[first:]
                changed += size - first
            else:
                assert a == b, (step.version, t.name)  # frozen: every bit kept
        assert updated == changed
        assert (updated == 0) == (step.version == 6)
        previous = path


def test_federated_training_is_a_function_of_the_seed() -> None:
    def run(seed: int) -> list[tuple[float, float, str]]:
        results = asyncio.run(fl.run(fl.LocalTransport(), seed=seed, rounds=3))
        return [(r.accuracy, r.loss, r.model_sha256) for r in results]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_federated_round_refuses_an_update_of_another_round() -> None:
    class Stale(fl.LocalTransport):
        async def send(self, src: int, dst: int, channel: str, data: bytes) -> None:
            tensors, meta = st.decode(data)
            meta["round"] = "0"
            await super().send(src, dst, channel, st.encode(tensors, meta))

    with pytest.raises(RuntimeError, match="stray update"):
        asyncio.run(fl.run(Stale(), seed=1, rounds=1))


def test_safetensors_round_trip_and_reference_rules() -> None:
    tensors: dict[str, np.ndarray] = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.0], dtype=np.float16),
        "x": np.zeros((0,), dtype=np.float64),
    }
    blob = st.encode(tensors, {"round": "3"})
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0  # the header is padded so every tensor starts aligned
    header = parse_header(blob, len(blob))
    assert [(t.name, t.dtype, t.shape) for t in header.tensors] == [
        ("w", "F32", (3, 4)),
        ("b", "F16", (2,)),
        ("x", "F64", (0,)),
    ]
    decoded, meta = st.decode(blob)
    assert meta == {"round": "3"}
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype
        assert np.array_equal(decoded[name], value)


def test_generated_model_file_is_valid_and_as_described(tmp_path: Path) -> None:
    made = st.write_model(tmp_path / "m.safetensors", 3_000_000, seed=4)
    data = made.path.read_bytes()
    assert len(data) == made.size
    assert abs(made.size - 3_000_000) < 1_500_000
    header = parse_header(data, len(data))
    assert len(header.tensors) == made.tensors
    assert sum(int(np.prod(t.shape)) for t in header.tensors) == made.parameters
    assert st.sha256_file(made.path) == made.sha256
    again = st.write_model(tmp_path / "n.safetensors", 3_000_000, seed=4)
    assert again.sha256 == made.sha256  # the same seed writes the same model
