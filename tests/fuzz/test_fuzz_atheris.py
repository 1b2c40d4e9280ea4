"""Runs the coverage-guided harness (tests/fuzz/atheris_harness.py) in a subprocess: a short
run in CI (slow), a long one with `-m soak` for `PEERD_FUZZ_SECONDS` (default 1800). Skipped
where atheris is not installed (it ships wheels for CPython on Linux x86_64)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, seconds: int) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.atheris_harness",
            str(tmp_path / "corpus"),
            f"-max_total_time={seconds}",
            "-max_len=4096",
            "-rss_limit_mb=1024",
            "-timeout=10",  # one input that takes 10 s is a hang
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        check=False,
    )
    crashes = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith(("crash", "oom", "timeout"))
    )
    assert result.returncode == 0, f"{crashes}\n{result.stderr[-6000:]}"
    assert "Done" in result.stderr


@pytest.mark.slow
def test_coverage_guided_fuzzing_short(tmp_path: Path) -> None:
    _run(tmp_path, 20)


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_coverage_guided_fuzzing_long(tmp_path: Path) -> None:
    _run(tmp_path, int(os.environ.get("PEERD_FUZZ_SECONDS", "1800")))
