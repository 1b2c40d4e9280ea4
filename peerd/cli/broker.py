"""`peerd broker-login`: change the broker credentials of an existing node.

The password never appears on a command line (where `ps` and shell history would show it): it
comes from a file the node then reads at each connect, or from a prompt / stdin, in which case
it is written to `broker-password` next to the configuration, mode 0600 (0640 with the
directory's group when root writes into a directory of another group, as /etc/peerd is
root:peerd: the daemon's user must be able to read it, and the README's layout says so).

The configuration is edited in place, line by line, inside `[broker]` only: comments and every
other key stay as the administrator left them. The edited text is validated as a whole before
it replaces the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from peerd.cli import common
from peerd.errors import UsageError

SECRET_FILE = "broker-password"  # noqa: S105 - a file name, not a password
_MAX_PASSWORD = 65535  # MQTT's binary data limit


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "broker-login",
        help="set the user name and password this node logs in to the broker with",
        description="Set [broker] username and password_file of this node's configuration. "
        "The password comes from --password-file (kept where it is), from --password-stdin, or "
        "from a prompt; the last two write it to broker-password next to the configuration "
        "(mode 0600). Never give a password on the command line. Restart the daemon afterwards.",
    )
    p.add_argument("--user", metavar="NAME", help="the user name (default: keep the current one)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--password-file", metavar="FILE", help="a file holding the password (read at connect)"
    )
    source.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    common.add_json_option(p)
    p.set_defaults(func=cmd_broker_login)


def _read_password(args: argparse.Namespace) -> bytes:
    if args.password_stdin or not sys.stdin.isatty():
        data = sys.stdin.buffer.read(_MAX_PASSWORD + 2)
        password = data.rstrip(b"\r\n")
    else:
        import getpass

        first = getpass.getpass("broker password: ")
        if getpass.getpass("again: ") != first:
            raise UsageError("the two passwords differ; nothing changed")
        password = first.encode("utf-8")
    if not password:
        raise UsageError("no password given; nothing changed")
    if len(password) > _MAX_PASSWORD or b"\n" in password:
        raise UsageError("a broker password is one line of at most 65535 bytes")
    return password


def _toml_string(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


_SECTION = re.compile(r"^\s*\[([^\]]*)\]\s*(#.*)?$")


def set_broker_keys(text: str, values: dict[str, str]) -> str:
    """`text` with each key of `values` set in its [broker] section: an existing line for the
    key (or its commented-out example) is replaced, else one is added after the header."""
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if (m := _SECTION.match(line)) and m[1] == "broker"),
        None,
    )
    if start is None:
        lines += ["", "[broker]"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if _SECTION.match(lines[i])), len(lines))
    for key, value in values.items():
        line = f"{key} = {_toml_string(value)}"
        live = re.compile(rf"^\s*{key}\s*=")
        example = re.compile(rf"^\s*#\s*{key}\s*=")
        spots = [i for i in range(start + 1, end) if live.match(lines[i])]
        spots = spots or [i for i in range(start + 1, end) if example.match(lines[i])]
        if spots:
            lines[spots[0]] = line
        else:
            lines.insert(start + 1, line)
            end += 1
    return "\n".join(lines) + "\n"


def _write_password(directory: Path, password: bytes) -> Path:
    from peerd.keystore import write_file_atomic

    path = directory / SECRET_FILE
    st = directory.stat()
    mode, group = 0o600, -1
    if os.geteuid() == 0 and st.st_gid != os.getegid():
        mode, group = 0o640, st.st_gid
    try:
        write_file_atomic(path, password + b"\n", mode=mode)
        if group != -1:
            os.chown(path, -1, group)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    return path


def cmd_broker_login(args: argparse.Namespace) -> int:
    from peerd.config import config_from_mapping, load_config
    from peerd.keystore import write_file_atomic

    config = common.load(args)
    path = config.path
    assert path is not None  # loaded from a file
    values: dict[str, str] = {}
    user = args.user if args.user is not None else config.broker.username
    if not user:
        raise UsageError("the broker needs a user name with a password", hint="add --user NAME")
    values["username"] = user
    if args.password_file:
        secret = Path(args.password_file).expanduser().absolute()
        if not os.access(secret, os.R_OK):
            raise UsageError(f"cannot read {secret}")
        if secret.stat().st_mode & 0o004:
            common.note(f"warning: {secret} is readable by every user; chmod o-r it")
    else:
        secret = _write_password(path.parent, _read_password(args))
    values["password_file"] = str(secret)
    text = set_broker_keys(path.read_text(encoding="utf-8"), values)
    import tomllib

    # The whole edited file must still be a valid configuration before it replaces the old one.
    config_from_mapping(tomllib.loads(text), origin=str(path), base=path.parent)
    st = path.stat()
    try:
        write_file_atomic(path, text.encode("utf-8"), mode=st.st_mode & 0o777)
        if os.geteuid() == 0:  # keep /etc/peerd/peerd.toml root:peerd
            os.chown(path, st.st_uid, st.st_gid)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    new = load_config(path)
    result = {
        "config": str(path),
        "username": new.broker.username,
        "password_file": str(new.broker.password_file),
    }
    if args.json:
        common.print_json(result)
        return common.EXIT_OK
    print(f"broker login set in {path}: user {new.broker.username!r}, password in {secret}")
    common.note(
        "Restart the daemon to use it (systemctl restart peerd, or stop and start `peerd run`); "
        "`peerd doctor` checks the login."
    )
    return common.EXIT_OK


__all__ = ["register", "set_broker_keys"]
