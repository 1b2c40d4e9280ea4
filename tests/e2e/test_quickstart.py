"""The README's first command, run as a newcomer runs it: `./scripts/quickstart` succeeds, says
what it did, and leaves nothing behind - also when it is interrupted half-way."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short TMPDIR: the daemons' control sockets must fit a Unix socket path (107 bytes),
    which pytest's deep short_tmp under a temporary directory of its own does not leave room for."""
    path = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(tmp: Path) -> dict[str, str]:
    # tempfile.mkdtemp honours TMPDIR: the quickstart's directory lands where we can look.
    return dict(os.environ, TMPDIR=str(tmp), PEERD_QUICKSTART_MB="8")


def _processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention `path` (daemons, brokers left behind)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_quickstart_sends_a_model_and_cleans_up(short_tmp: Path) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "quickstart")],
        capture_output=True,
        text=True,
        env=_env(short_tmp),
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # The summary names the three peers with their ids and fingerprints...
    for name in ("alice", "bob", "carol"):
        assert re.search(rf"{name}\s+peer id [0-9a-z]{{20}}  fingerprint [0-9a-z-]{{35}}", out)
    # ... the invite handshakes, the throughput, and both receivers' verification.
    assert re.search(r"handshakes \d+\.\d ms, \d+\.\d ms", out)
    assert re.search(r"one transfer: \d+\.\d\d s, \d+ MB/s", out)
    sha = re.findall(
        r"(bob|carol)\s+sha256 ([0-9a-f]{16})… = source, \d+ tensors, daemon: verified", out
    )
    assert [name for name, _ in sha] == ["bob", "carol"]
    assert sha[0][1] == sha[1][1]
    assert "quickstart: OK" in out
    assert list(short_tmp.iterdir()) == []
    assert _processes_under(short_tmp) == []


@pytest.mark.slow
def test_interrupted_quickstart_stops_everything(short_tmp: Path) -> None:
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "scripts.quickstart", "--size-mb", "8"],
        cwd=ROOT,
        env=_env(short_tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip().startswith("daemons"):  # broker and three daemons are running
                break
        assert _processes_under(short_tmp), "the daemons should be running now"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "quickstart: interrupted (SIGTERM)" in out
    assert "Traceback" not in out
    # It waited for its daemons and broker to exit before it did.
    assert _processes_under(short_tmp) == []
    assert list(short_tmp.iterdir()) == []
