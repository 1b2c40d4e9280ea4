"""scripts/install, staged with DESTDIR (what packagers do): the tree it makes, that running it
again changes nothing, and that --uninstall keeps the node's state unless --purge.

One virtualenv is built per session (pip's cache makes it quick, but it is still the slow part):
tests that change a tree work on a copy of it, and the real install and the package reuse it
(scripts/install keeps a virtualenv made from the same sources and interpreter).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install"
UNITS = ("peerd.service", "peerd-rotate.service", "peerd-rotate.timer")
UNITDIR = "usr/local/lib/systemd/system"

pytestmark = pytest.mark.slow


def _python() -> str:
    """The distribution's interpreter when it can make a virtualenv (what a real install
    uses), else the one running the tests."""
    system = "/usr/bin/python3"
    probe = [system, "-c", "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"]
    if Path(system).exists() and subprocess.run(probe, check=False).returncode == 0:
        return system
    return sys.executable


def install(destdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIX", "BINDIR", "UNITDIR")}
    env.update(DESTDIR=str(destdir), PYTHON=_python())
    return subprocess.run(
        [str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under `root`: kind, mode, and content digest or link target."""
    entries: dict[str, tuple[str, int, str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            entries[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return entries


@pytest.fixture(scope="session")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destdir = tmp_path_factory.mktemp("install") / "root"
    result = install(destdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return destdir


@pytest.fixture
def copy(staged: Path, tmp_path: Path) -> Path:
    destdir = tmp_path / "root"
    shutil.copytree(staged, destdir, symlinks=True)
    return destdir


def exec_start(unit: Path) -> list[str]:
    return [
        line.split("=", 1)[1].split()[0]
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]


def test_the_staged_tree_has_units_users_dirs_and_a_working_peerd(staged: Path) -> None:
    for unit in UNITS:
        assert (staged / UNITDIR / unit).is_file()
    sysusers = (staged / "usr/local/lib/sysusers.d/peerd.conf").read_text()
    assert "u     peerd" in sysusers
    tmpfiles = (staged / "usr/local/lib/tmpfiles.d/peerd.conf").read_text()
    assert "/var/lib/peerd" in tmpfiles
    assert os.readlink(staged / "usr/local/bin/peerd") == "/opt/peerd/bin/peerd"
    # Each unit runs what was installed: the staged tree holds the target.
    for unit in ("peerd.service", "peerd-rotate.service"):
        (target,) = exec_start(staged / UNITDIR / unit)
        assert target == "/opt/peerd/bin/peerd"
        staged_target = staged / target.lstrip("/")
        assert os.access(staged_target, os.X_OK)
    # The script's interpreter line names the final place; run it with the staged one.
    peerd = staged / "opt/peerd/bin/peerd"
    assert peerd.read_text().splitlines()[0] == "#!/opt/peerd/bin/python"
    version = subprocess.run(
        [str(staged / "opt/peerd/bin/python"), str(peerd), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert version.stdout.startswith("peerd ")
    assert (staged / "opt/peerd/share/doc/peerd/service.md").is_file()


def test_nothing_staged_names_the_staging_directory(staged: Path) -> None:
    needle = str(staged).encode()
    leaks = [
        str(p.relative_to(staged))
        for p in staged.rglob("*")
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes()
    ]
    assert leaks == []


def test_a_second_run_changes_nothing(copy: Path) -> None:
    before = tree(copy)
    result = install(copy)
    assert result.returncode == 0, result.stderr
    assert "building the virtualenv" not in result.stdout  # nothing to rebuild
    assert tree(copy) == before


def test_uninstall_keeps_the_node_state_unless_purged(copy: Path) -> None:
    state = copy / "var/lib/peerd/keys/identity.key"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"key")
    config = copy / "etc/peerd/peerd.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[node]\n")
    result = install(copy, "--uninstall")
    assert result.returncode == 0, result.stderr
    files = {str(p.relative_to(copy)) for p in copy.rglob("*") if not p.is_dir()}
    assert files == {"var/lib/peerd/keys/identity.key", "etc/peerd/peerd.toml"}
    assert "kept" in result.stdout
    result = install(copy, "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert not (copy / "var/lib/peerd").exists()
    assert not (copy / "etc/peerd").exists()


def test_a_foreign_peerd_on_path_is_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "root/usr/local/bin/peerd"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("#!/bin/sh\necho pip-installed\n")
    result = install(tmp_path / "root")
    assert result.returncode == 1
    assert "not this installation's" in result.stderr
    assert foreign.read_text().endswith("pip-installed\n")
    assert not (tmp_path / "root/opt").exists()  # refused before any work


def test_systemd_accepts_the_staged_units(staged: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks ExecStart= against the running system's files: point the units at the
    # staged tree instead of /opt/peerd.
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS:
        text = (staged / UNITDIR / unit).read_text()
        (units / unit).write_text(text.replace("/opt/peerd/", f"{staged}/opt/peerd/"))
    result = subprocess.run(
        [analyze, "verify", *(str(units / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # Tools of the machine, not of peerd (a container may lack procps' /bin/kill).
        if line.strip() and not _missing_system_command(line)
    ]
    assert problems == []


def _missing_system_command(line: str) -> bool:
    if "is not executable" not in line or "Command " not in line:
        return False
    command = line.split("Command ", 1)[1].split(maxsplit=1)[0]
    return (
        not command.startswith("/opt/") and "/peerd/" not in command and not Path(command).exists()
    )


# A throwaway root: a private mount namespace, an overlay over / whose changes live in a tmpfs,
# a fresh /run (no systemd to talk to), the checkout bound in read-only. Exit 77: not possible
# here.
_THROWAWAY_ROOT = r"""
set -eu
base=$1 checkout=$2
shift 2
mount -t tmpfs tmpfs "$base" || exit 77
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root" \
    || exit 77
for d in proc dev sys; do mount --rbind "/$d" "$base/root/$d"; done
mount -t tmpfs tmpfs "$base/root/run"
mkdir -p "$base/root$checkout"
mount --bind "$checkout" "$base/root$checkout"
mount -o remount,bind,ro "$base/root$checkout"
if [ -n "${SEED_VENV:-}" ]; then cp -a "$SEED_VENV" "$base/root/opt/peerd"; fi
exec chroot "$base/root" "$@"
"""


def in_throwaway_root(tmp_path: Path, *command: str, seed_venv: Path | None = None) -> str:
    """Run `command` as root in a throwaway copy of this machine; its stdout. `seed_venv`: a
    staged /opt/peerd to put in place first (the install then keeps it)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("runuser"):
        pytest.skip("needs root, unshare and runuser")
    if _python() != "/usr/bin/python3":
        pytest.skip("the distribution's python3 cannot make a virtualenv here")
    base = tmp_path / "throwaway"
    base.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "PREFIX", "PEERD_CONFIG")}
    if seed_venv is not None:
        env["SEED_VENV"] = str(seed_venv)
    args = [str(base), str(ROOT), *command]
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", _THROWAWAY_ROOT, "-", *args],
        capture_output=True,
        text=True,
        timeout=800,
        env=env,
        check=False,
    )
    if result.returncode == 77:
        pytest.skip(f"no overlay mount here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.timeout(900)
def test_the_service_guide_line_by_line_as_root_in_a_throwaway_root(
    staged: Path, tmp_path: Path
) -> None:
    """`sudo ./scripts/install` for real (no DESTDIR), then `peerd init`, the daemon as the
    unit runs it, backup and restore, a second install, --uninstall and --purge. The session's
    staged virtualenv is already in /opt/peerd: this install keeps it (no second build)."""
    out = in_throwaway_root(
        tmp_path,
        f"{ROOT}/tests/e2e/install_walkthrough.sh",
        str(ROOT),
        seed_venv=staged / "opt/peerd",
    )
    assert out.rstrip().endswith("walkthrough: ok")
    assert "building the virtualenv" not in out  # the seeded one was kept
    assert '"research"' in out  # `peerd status --json` of the node init made


_DEB_LIFECYCLE = r"""
set -eux
deb=$1
dpkg -i "$deb"
peerd --version
test "$(readlink /usr/bin/peerd)" = /opt/peerd/bin/peerd
grep -qx 'ExecStart=/opt/peerd/bin/peerd run' /usr/lib/systemd/system/peerd.service
id peerd
test "$(stat -c %U:%a /var/lib/peerd)" = peerd:700
mkdir /var/lib/peerd/keys && echo key >/var/lib/peerd/keys/identity.key
dpkg -r peerd
test ! -e /opt/peerd && test ! -e /usr/bin/peerd
test -f /var/lib/peerd/keys/identity.key
dpkg -P peerd
test ! -e /var/lib/peerd
echo "deb: ok"
"""


@pytest.mark.timeout(900)
def test_the_debian_package_installs_removes_and_purges(staged: Path, tmp_path: Path) -> None:
    if not shutil.which("dpkg-deb"):
        pytest.skip("not a Debian system")
    build = subprocess.run(
        [str(ROOT / "scripts" / "package-deb"), str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=800,
        env={**os.environ, "PYTHON": _python(), "PEERD_VENV": str(staged / "opt/peerd")},
        check=False,
    )
    assert build.returncode == 0, build.stderr
    deb = build.stdout.strip()
    info = subprocess.run(
        ["dpkg-deb", "--field", deb, "Package", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Package: peerd" in info
    out = in_throwaway_root(tmp_path, "bash", "-c", _DEB_LIFECYCLE, "-", deb)
    assert out.rstrip().endswith("deb: ok")
