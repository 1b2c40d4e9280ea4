"""`./scripts/evaluate --quick` keeps working: it writes the page, every figure and every CSV,
and its federated runs with one seed are equal to the last bit. Plus the pieces it rests on:
the hand-written safetensors files and the determinism of the federated training."""

from __future__ import annotations

import asyncio
import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest

from protocol.safetensors import parse_header
from scripts.evaluation import fl
from scripts.evaluation import model as st
from scripts.evaluation.report import FIGURES

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("handshakes", "handshake_summary", "handshake_scaling", "transfer", "fanout", "federated")
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
