"""The sans-IO boundary rule catches what it must, and protocol/ obeys it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.lint_boundary import violations

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import socket",
        "from time import monotonic",
        "import os.path",
        "from pathlib import Path",
        "import aiosqlite",
        "from aiomqtt import Client",
        "import sqlite3",
        "data = open('f').read()",
        "print('x')",
        "import datetime\nx = datetime.now()",
        "from datetime import datetime\nx = datetime.utcnow()",
    ],
)
def test_rule_catches_io(source: str) -> None:
    assert violations(Path("protocol/x.py"), source)


def test_rule_allows_pure_code() -> None:
    source = "import hashlib\nimport struct\nfrom nacl.utils import random\nx = random(32)\n"
    assert violations(Path("protocol/x.py"), source) == []


def test_protocol_package_obeys_the_rule() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/lint_boundary.py", "protocol"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
