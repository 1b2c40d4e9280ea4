"""Options, exit codes, output helpers and the ways to reach the node, shared by every command
group.

Importing this module stays cheap: a command group imports what its commands need when they
run (the control client for daemon commands, the store and keys only for offline ones), so that
`peerd status` does not load the trust store.
"""

from __future__ import annotations

import argparse
import json
import sys

from peerd import locate
from peerd.errors import ConfigError, PeerdError, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see check_imports.py)
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence
    from typing import Any, TypeVar

    from peerd.config import Config
    from peerd.control.blocking import ControlLink
    from peerd.store import Store

    T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (the message says why)
EXIT_USAGE = 2  # bad command line or arguments
EXIT_CONFIG = 3  # configuration missing or invalid
EXIT_NOT_RUNNING = 4  # the daemon is not running / the control socket is unreachable
EXIT_DENIED = 5  # refused: not trusted, not allowed, revoked
EXIT_TIMEOUT = 6  # a --timeout or --wait deadline passed
EXIT_RETIRED = 7  # this node's identity is revoked: it can never run again (systemd: no restart)
EXIT_EXPELLED = 8  # the network authority revoked this node: `peerd run` stops (no restart)

# Error class name -> exit code, so modules can add codes without importing each other.
EXIT_CODES: dict[str, int] = {
    "UsageError": EXIT_USAGE,
    "ConfigError": EXIT_CONFIG,
    "DaemonNotRunning": EXIT_NOT_RUNNING,
    "AccessDenied": EXIT_DENIED,
    "TrustError": EXIT_DENIED,
    "Timeout": EXIT_TIMEOUT,
    "BrokerTimeout": EXIT_TIMEOUT,
    "InvalidText": EXIT_USAGE,  # a mistyped peer id, fingerprint or token
    "InvalidParams": EXIT_USAGE,
    "IdentityRevoked": EXIT_RETIRED,
    "NodeExpelled": EXIT_EXPELLED,
}


def exit_code_for(exc: PeerdError) -> int:
    names = [cls.__name__ for cls in type(exc).__mro__]
    # An error from the daemon whose class this process never imported arrives as a stand-in
    # of the same name; its ancestors' names come with it (the CLI loads little, on purpose).
    data = getattr(exc, "data", None)
    if isinstance(data, dict) and isinstance(data.get("bases"), list):
        names[1:1] = [b for b in data["bases"] if isinstance(b, str)]
    for name in names:
        if name in EXIT_CODES:
            return EXIT_CODES[name]
    return EXIT_FAILURE


def add_global_options(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """--debug, --config and --socket. `inherited` adds them to a subcommand: there they default
    to SUPPRESS, so a value given before the subcommand is kept unless repeated after it."""
    default: Any = argparse.SUPPRESS if inherited else None
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if inherited else False,
        help="show tracebacks on errors",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="configuration file (default: $PEERD_CONFIG, else ~/.config/peerd/peerd.toml if "
        f"it exists, else {locate.SYSTEM_CONFIG})",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default,
        help="the daemon's control socket (default: the one the configuration names)",
    )


def add_global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """The global options on every subcommand too, so `peerd status --config F` works as the
    README promises (argparse only takes a parser's options before its subcommand)."""
    # argparse has no public way to list a parser's subparsers: _actions is the stable way in.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                add_global_options(sub, inherited=True)
                add_global_options_everywhere(sub)


def config_path(args: argparse.Namespace) -> str:
    """--config, else $PEERD_CONFIG, else the per-user file if it exists, else the system one."""
    return locate.config_file_name(args.config)


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else the one the configuration names (read cheaply: peerd.locate)."""
    if args.socket:
        return str(args.socket)
    found = locate.socket_from_config(locate.config_file_name(args.config))
    return found if found is not None else str(load(args).node.socket)


def load(args: argparse.Namespace) -> Config:
    """The node's configuration, from --config, $PEERD_CONFIG or the default path."""
    from peerd.config import load_config

    return load_config(config_path(args))


def show_id(peer_id: str) -> str:
    """A canonical peer id (as the daemon sends it) in its display form, groups of five.
    The checksum was checked where the id came from; this only formats, so it needs none of
    the protocol's code."""
    return "-".join(peer_id[i : i + 5] for i in range(0, len(peer_id), 5))


def with_name(peer_id: str, name: str | None) -> str:
    """`abcde-fghjk-... (bob)`: the id, and the name people know the peer by, when there is one."""
    return f"{show_id(peer_id)} ({name})" if name else show_id(peer_id)


def duration(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `7d` -> seconds (an argparse type)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def when(ts: float | None) -> str:
    """A UTC timestamp for tables and messages; `-` for none."""
    if ts is None:
        return "-"
    import time

    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def usage(parser: argparse.ArgumentParser) -> int:
    """What a command group given no action does: its help, and the usage exit code."""
    parser.print_help()
    return EXIT_USAGE


def note(text: str) -> None:
    """A remark for the person at the terminal (stderr: stdout stays the command's output)."""
    print(text, file=sys.stderr)


# -- reaching the node ---------------------------------------------------------------------------


def with_link(
    args: argparse.Namespace, work: Callable[[ControlLink], T], *, connect_within: float = 10.0
) -> T:
    """`work` with a blocking connection to the daemon's control socket."""
    from peerd.control.blocking import ControlLink

    with ControlLink.connect(socket_path(args), timeout=connect_within) as link:
        return work(link)


def call(
    args: argparse.Namespace,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    within: float | None = 60.0,
) -> Any:
    """One control method of the running daemon; its result."""
    return with_link(args, lambda link: link.call(method, params or {}, timeout=within))


def peer_names(link: ControlLink) -> dict[str, str]:
    """The daemon's names for its peers (`peerd name`, an invite's note), for showing them
    next to ids."""
    return {p["peer"]: p["name"] for p in link.call("v1.peers") if p.get("name")}


def daemon_or_offline(
    args: argparse.Namespace,
    method: str,
    params: dict[str, Any],
    offline: Callable[[Config], Coroutine[Any, Any, dict[str, Any]]],
) -> tuple[dict[str, Any], bool]:
    """(result, through the daemon?): the daemon's method when one runs, else `offline` on the
    node's files. Only a daemon that is not there falls back: one that refuses, or hangs up
    mid-call, is an error, never a reason to write its files behind its back."""
    import asyncio

    from peerd.client.errors import ConnectionLost, DaemonNotRunning

    try:
        result: dict[str, Any] = call(args, method, params)
        return result, True
    except ConnectionLost:
        raise
    except DaemonNotRunning:
        pass
    return asyncio.run(offline(load(args))), False


async def with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    """`work` on the node's store, closed afterwards (for commands that run without a daemon)."""
    from peerd.store import open_store

    store = await open_store(config)
    try:
        return await work(store)
    finally:
        await store.close()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain, aligned table; an empty table prints only its headers."""
    cells = [[str(h).upper() for h in headers]] + [
        ["" if c is None else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


__all__ = [
    "EXIT_CODES",
    "ConfigError",
    "UsageError",
    "add_global_options",
    "add_global_options_everywhere",
    "add_json_option",
    "call",
    "config_path",
    "daemon_or_offline",
    "duration",
    "exit_code_for",
    "load",
    "note",
    "peer_names",
    "print_json",
    "print_table",
    "show_id",
    "socket_path",
    "usage",
    "when",
    "with_link",
    "with_name",
    "with_store",
]
