"""Where this node's configuration file and control socket are, found cheaply.

Every CLI command that talks to the daemon needs only the socket's path. Reading it through
`peerd.config.load_config` would load the whole configuration machinery (and, through its
checks, the protocol's identity code and PyNaCl): most of a command's start-up. Here only
`[node] socket` / `runtime_dir` are read, with the same rules as `peerd.config` (relative paths
are relative to the file's directory, `~` expands, the socket defaults to
`<runtime_dir>/peerd.sock`); tests/peerd/test_config.py holds the two to the same answers.
Anything unusual in the file is left to `load_config` (None here), whose error message names
the file, the key and the problem.

Even tomllib is too dear here (importing it costs more than a bare interpreter's start: it
loads `typing`, `datetime` and compiles its regular expressions). A file made only of the lines
`peerd init` writes (comments, `[table]` headers, `key = value` with a string free of escapes, a
decimal number, a boolean or a one-line array of those) is read line by line (`_plain_toml`);
such a line means the same to tomllib, and any other line (a multi-line string or array, an
escape, a dotted key, a date...) sends the whole file to tomllib, so the answer is tomllib's
either way (tests/peerd/test_config.py compares the two on generated files).

Nor does the CLI's path import pathlib (~4 ms where nothing else has: an installed peerd, whose
bare interpreter starts in 10 ms): paths are strings here, spelled as `str(Path(...))` spells
them (`_clean`, `_join`, `_expanduser`, held to pathlib by a test). `config_file` still returns
a `Path` for the other callers; the CLI uses `config_file_name`.

The configuration file is the first of: the path given (`--config`), `$PEERD_CONFIG`,
`$XDG_CONFIG_HOME/peerd/peerd.toml` (default `~/.config/peerd/peerd.toml`) if it exists, and
`/etc/peerd/peerd.toml`.
"""

from __future__ import annotations

import os
import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (this is the CLI's path)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Final

# Strings: peerd.config has them as Paths (DEFAULT_CONFIG_PATH, DEFAULT_RUNTIME_DIR).
SYSTEM_CONFIG: Final = "/etc/peerd/peerd.toml"
CONFIG_NAME: Final = "peerd.toml"
SOCKET_NAME: Final = "peerd.sock"
SYSTEM_RUNTIME_DIR: Final = "/run/peerd"
DEFAULT_SOCKET_PATH: Final = f"{SYSTEM_RUNTIME_DIR}/{SOCKET_NAME}"
_MAX_CONFIG_SIZE: Final = 1 << 20
# The fast path reads a file whose sections and [node] keys are all among these; anything else
# (a typo, a section added since) goes through load_config, which names the problem.
# tests/peerd/test_config.py checks these against peerd.config.
KNOWN_SECTIONS: Final = frozenset(
    {"node", "broker", "control", "keys", "network", "receive", "limits", "log", "metrics"}
)
NODE_KEYS: Final = frozenset(
    {"name", "network", "state_dir", "runtime_dir", "socket", "inbox_dir", "store"}
)

# One line of the TOML subset `_plain_toml` reads (TOML 1.0's rules for these forms: bare keys,
# basic strings without escapes, literal strings, decimal integers and floats without exponent,
# booleans, one-line arrays of those; no control character but tab in strings and comments).
_CTRL = r"\x00-\x08\x0a-\x1f\x7f"
_BARE = r"[A-Za-z0-9_-]+"
_INT = r"[+-]?(?:0|[1-9](?:_?[0-9])*)"
_SCALAR = rf'"[^"\\{_CTRL}]*"|\'[^\'{_CTRL}]*\'|{_INT}(?:\.[0-9](?:_?[0-9])*)?|true|false'
_ARRAY = rf"\[[ \t]*(?:(?:{_SCALAR})[ \t]*,[ \t]*)*(?:(?:{_SCALAR})[ \t]*)?\]"
_LINE: Final = (
    rf"[ \t]*(?:\[[ \t]*(?P<table>{_BARE})[ \t]*\]"
    rf'|(?P<key>{_BARE})[ \t]*=[ \t]*(?:"(?P<basic>[^"\\{_CTRL}]*)"'
    rf"|\'(?P<literal>[^\'{_CTRL}]*)\'|{_SCALAR}|{_ARRAY}))?[ \t]*(?:#[^{_CTRL}]*)?"
)
_NOT_A_STRING: Final = object()  # a value of another type (only strings matter here)


def user_config_file() -> str:
    """The per-user configuration file (`peerd init --config` it for a node of your own)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return _join(_clean(base), f"peerd/{CONFIG_NAME}")


def config_file_name(given: str | os.PathLike[str] | None = None) -> str:
    """The configuration file to use (see the module's docstring for the order), as
    `str(config_file(given))`."""
    if given:
        return _expanduser(_clean(os.fspath(given)))
    env = os.environ.get("PEERD_CONFIG")
    if env:
        return _expanduser(_clean(env))
    user = user_config_file()
    if os.path.isfile(user):
        return user
    return SYSTEM_CONFIG


def config_file(given: str | os.PathLike[str] | None = None) -> Path:
    """The configuration file to use (see the module's docstring for the order)."""
    from pathlib import Path  # noqa: PLC0415 - kept off the CLI's path (see above)

    return Path(config_file_name(given))


def socket_from_config(path: str | os.PathLike[str]) -> str | None:
    """The control socket the configuration file at `path` names, or None when only
    `load_config` can tell (and name what is wrong). At the default location, a file that does
    not exist or that this user may not read means the default socket (the system daemon's)."""
    name = _clean(os.fspath(path))
    if not name.startswith("/"):
        name = _join(_clean(os.getcwd()), name)
    try:
        with open(name, "rb") as f:
            raw = f.read(_MAX_CONFIG_SIZE + 1)
        text = raw.decode("utf-8")
    except (PermissionError, FileNotFoundError):
        return DEFAULT_SOCKET_PATH if name == SYSTEM_CONFIG else None
    except (OSError, UnicodeDecodeError):
        return None
    data = _plain_toml(text)
    if data is None:
        import tomllib  # noqa: PLC0415 - only for a file beyond _plain_toml's lines

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return None
    node = data.get("node", {})
    if (
        len(raw) > _MAX_CONFIG_SIZE
        or not isinstance(node, dict)
        or not KNOWN_SECTIONS.issuperset(data)
        or not NODE_KEYS.issuperset(node)
    ):
        return None
    socket, runtime_dir = node.get("socket"), node.get("runtime_dir")
    for value in (socket, runtime_dir):
        if value is not None and (not isinstance(value, str) or not value or "\0" in value):
            return None
    here = _parent(name)
    if socket is not None:
        return _join(here, _expanduser(_clean(socket)))
    if runtime_dir is not None:
        return _join(_join(here, _expanduser(_clean(runtime_dir))), SOCKET_NAME)
    return DEFAULT_SOCKET_PATH


# -- paths as pathlib spells them (PurePosixPath), without importing it ------------------------


def _clean(path: str) -> str:
    """`str(Path(path))`: no empty or `.` components, no trailing slash; a leading `//` kept
    (POSIX leaves its meaning to the system), three or more leading slashes are one."""
    rest = path.lstrip("/")
    slashes = len(path) - len(rest)
    root = "//" if slashes == 2 else "/" if slashes else ""
    return root + "/".join(p for p in rest.split("/") if p and p != ".") or "."


def _join(base: str, path: str) -> str:
    """`str(Path(base) / path)` of two clean paths."""
    if path.startswith("/"):
        return path
    if path == ".":
        return base
    if base == ".":
        return path
    return base + path if base.endswith("/") else base + "/" + path  # base: "/" or "//" ends so


def _parent(path: str) -> str:
    """`str(Path(path).parent)` of a clean absolute path."""
    root = "//" if path.startswith("//") else "/"
    head, slash, _ = path[len(root) :].rpartition("/")
    return root + head if slash else root


def _expanduser(path: str) -> str:
    """`str(Path(path).expanduser())` of a clean path."""
    if not path.startswith("~"):
        return path
    first, _, rest = path.partition("/")
    home = os.path.expanduser(first)
    if home.startswith("~"):
        raise RuntimeError("Could not determine home directory.")
    return _join(_clean(home), rest) if rest else _clean(home)


def _plain_toml(text: str) -> dict[str, Any] | None:
    """The tables of a file made only of `_LINE`s, with their keys; a string value as itself,
    any other as a placeholder. None for anything else (tomllib then reads it), including what
    TOML forbids that a line alone cannot show: a table or a key defined twice, a key before
    the first table."""
    data: dict[str, dict[str, object]] = {}
    table: dict[str, object] | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        m = re.fullmatch(_LINE, line)
        if m is None:
            return None
        if m["table"] is not None:
            if m["table"] in data:
                return None
            table = data[m["table"]] = {}
        elif m["key"] is not None:
            if table is None or m["key"] in table:
                return None
            string = m["basic"] if m["basic"] is not None else m["literal"]
            table[m["key"]] = string if string is not None else _NOT_A_STRING
    return data


__all__ = [
    "CONFIG_NAME",
    "DEFAULT_SOCKET_PATH",
    "KNOWN_SECTIONS",
    "NODE_KEYS",
    "SOCKET_NAME",
    "SYSTEM_CONFIG",
    "SYSTEM_RUNTIME_DIR",
    "config_file",
    "config_file_name",
    "socket_from_config",
    "user_config_file",
]
