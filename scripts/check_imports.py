"""The CLI's daemon commands import only what talking to the daemon needs (issue 16 item 0).

A command such as `peerd status` is a few lines over the control socket; its start-up is what
the user waits for. The control client (`peerd.control.blocking`), the socket's path from the
config file (`peerd.locate`) and the error classes are all it may load: asyncio, the trust
store (aiosqlite), the keys (PyNaCl, cryptography), the wire protocol (msgpack, `protocol.*`
beyond its error classes) and the full configuration code are for the daemon and the offline
commands. Nor may it load the standard modules that each cost a tenth or more of a bare
interpreter's start and that it does without: `typing` (annotations only, under
`TYPE_CHECKING = False`), `tomllib` (a config file as `peerd init` writes it is read line by
line), `socket` (the C module `_socket` does), `shutil` (argparse's help width, found without
it), `pathlib` (`peerd.locate` spells paths as strings). `scripts/bench cli` measures what
this buys; this check keeps it, without a clock: each command runs with `python -S -X
importtime` (-S: no `.pth` file, such as the editable install's, which loads pathlib and re
before the command starts) against a socket nobody listens on (it exits "not running") and the
modules it imported are compared with the forbidden ones.

Usage: python scripts/check_imports.py   (exit 1 and the import chain of each offender)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Module names (and their submodules) a daemon command must not import.
FORBIDDEN = (
    "asyncio",
    "aiosqlite",
    "sqlite3",
    "nacl",
    "cryptography",
    "msgpack",
    "peerd.client.aio",
    "peerd.config",
    "peerd.store",
    "peerd.keystore",
    "peerd.daemon",
    "prometheus_client",
    "typing",
    "tomllib",
    "socket",
    "shutil",
    "pathlib",
)
# protocol.* is forbidden except its error classes, which peerd.errors builds on.
ALLOWED_PROTOCOL = ("protocol", "protocol.errors")

COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["peers"],
    ["transfers"],
    ["invite"],
    ["join", "peerd-invite-1-x"],
    ["cancel", "00"],
    ["receive", "--timeout", "1s"],
    ["send", "{file}", "--to", "x", "--wait"],
    ["msg", "outbox"],
    ["msg", "listen", "ch", "--count", "1"],
    ["msg", "send", "x", "ch", "hello"],
    ["connect", "x"],
    ["metrics"],
]


def imported(argv: list[str], env: dict[str, str]) -> tuple[int, list[tuple[int, str]]]:
    """The exit status and the (depth, name) of every module the command imported."""
    result = subprocess.run(
        # -S: no site-packages (a daemon command needs none) and, above all, no `.pth` files,
        # whose imports (the editable install's loads pathlib, re...) would hide the command's.
        [sys.executable, "-S", "-X", "importtime", "-m", "peerd", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    modules = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        name = line.rsplit("|", 1)[1]
        depth = (len(name) - len(name.lstrip(" "))) // 2
        modules.append((depth, name.strip()))
    return result.returncode, modules


def forbidden(name: str) -> bool:
    if name.startswith("protocol.") or name == "protocol":
        return name not in ALLOWED_PROTOCOL
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def chain(modules: list[tuple[int, str]], index: int) -> str:
    """Who imported modules[index]: -X importtime lists a module after those it imported, one
    indentation level deeper, so its importer is the next line with a smaller depth."""
    depth, name = modules[index]
    path = [name]
    for d, n in modules[index + 1 :]:
        if d < depth:
            path.append(n)
            depth = d
    return " <- ".join(path)


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "peerd.toml"
        config.write_text(f'[node]\nsocket = "{tmp}/nobody.sock"\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PEERD_CONFIG", None)
        for command in COMMANDS:
            argv = [a.replace("{file}", str(config)) for a in command]
            code, modules = imported(["--config", str(config), *argv], env)
            if code != 4:  # "the daemon is not running": the command got as far as connecting
                print(f"peerd {' '.join(argv)}: exit {code}, expected 4 (not running)")
                failures += 1
                continue
            bad = [i for i, (_, name) in enumerate(modules) if forbidden(name)]
            if bad:
                names = sorted({modules[i][1].split(".")[0] for i in bad})
                print(
                    f"peerd {' '.join(argv)} imports {', '.join(names)}: {chain(modules, bad[0])}"
                )
                failures += 1
    if failures:
        print("check_imports: daemon commands must load only the control client (see above)")
        return 1
    print(f"check_imports: {len(COMMANDS)} daemon commands load only the control client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
