#!/usr/bin/env python3
"""Enforce the sans-IO boundary: code under protocol/ must not do I/O or read a clock.

It bans importing modules that reach the outside world (asyncio, socket, time, sqlite, MQTT,
the filesystem, processes, threads) and calling the builtins and attributes that do the same
without an import (open, input, print, datetime.now ...). Randomness is allowed only through
PyNaCl (`nacl.utils.random`), which reads the OS CSPRNG. Exit status 1 lists every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

BANNED_MODULES = {
    "asyncio": "the asyncio shell lives in peerd/",
    "socket": "sockets belong to peerd/",
    "ssl": "TLS belongs to peerd/",
    "selectors": "I/O multiplexing belongs to peerd/",
    "select": "I/O multiplexing belongs to peerd/",
    "time": "take `now` as an argument instead of reading a clock",
    "aiosqlite": "the trust store belongs to peerd/",
    "sqlite3": "the trust store belongs to peerd/",
    "aiomqtt": "the MQTT link belongs to peerd/",
    "paho": "the MQTT link belongs to peerd/",
    "os": "the filesystem and environment belong to peerd/ (randomness: nacl.utils.random)",
    "pathlib": "the filesystem belongs to peerd/",
    "shutil": "the filesystem belongs to peerd/",
    "tempfile": "the filesystem belongs to peerd/",
    "glob": "the filesystem belongs to peerd/",
    "fcntl": "the filesystem belongs to peerd/",
    "mmap": "the filesystem belongs to peerd/",
    "subprocess": "processes belong to peerd/",
    "multiprocessing": "processes belong to peerd/",
    "threading": "threads belong to peerd/",
    "concurrent": "threads belong to peerd/",
    "signal": "signals belong to peerd/",
    "random": "non-cryptographic randomness; use nacl.utils.random or take it as an argument",
    "secrets": "use nacl.utils.random so all key material comes from one CSPRNG path",
    "logging": "return events; the shell logs",
    "importlib": "dynamic imports hide the dependency graph",
}
BANNED_CALLS = {
    "open": "the filesystem belongs to peerd/",
    "input": "terminal I/O belongs to peerd/",
    "print": "terminal I/O belongs to peerd/",
    "exec": "no dynamic code",
    "eval": "no dynamic code",
    "__import__": "no dynamic imports",
    "breakpoint": "no debugger hooks",
}
BANNED_ATTRIBUTES = {
    ("datetime", "now"): "take `now` as an argument",
    ("datetime", "utcnow"): "take `now` as an argument",
    ("datetime", "today"): "take `now` as an argument",
    ("date", "today"): "take `now` as an argument",
}


def violations(path: Path, source: str) -> list[str]:
    tree = ast.parse(source, filename=str(path))
    found: list[str] = []

    def report(node: ast.AST, what: str, why: str) -> None:
        found.append(f"{path}:{getattr(node, 'lineno', 0)}: {what} ({why})")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in BANNED_MODULES:
                    report(node, f"import {alias.name}", BANNED_MODULES[top])
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            if node.level == 0 and top in BANNED_MODULES:
                report(node, f"from {node.module} import ...", BANNED_MODULES[top])
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in BANNED_CALLS:
                report(node, f"call {func.id}()", BANNED_CALLS[func.id])
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in BANNED_ATTRIBUTES
            ):
                report(
                    node,
                    f"call {func.value.id}.{func.attr}()",
                    BANNED_ATTRIBUTES[(func.value.id, func.attr)],
                )
    return found


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("protocol")]
    found: list[str] = []
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            found.extend(violations(path, path.read_text(encoding="utf-8")))
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"lint_boundary: {len(found)} violation(s) of the sans-IO boundary", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
