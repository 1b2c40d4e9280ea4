"""The long fuzz run: every fuzz test of this package with many more examples (minutes).
Only with `scripts/test --soak` (or `-m soak`); `PEERD_FUZZ_EXAMPLES` sets the count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.soak
@pytest.mark.timeout(6 * 3600)
def test_long_fuzz_run() -> None:
    env = dict(os.environ)
    env.setdefault("PEERD_FUZZ_EXAMPLES", "20000")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "fuzz"), "-m", "not soak", "-q",
         "-p", "no:cacheprovider", "-o", "timeout=0"],
        cwd=ROOT,
        env=env,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0
