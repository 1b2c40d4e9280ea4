"""Options, exit codes and output helpers shared by every command group."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from peerd.errors import ConfigError, PeerdError, UsageError
from peerd.store import Store, open_store

if TYPE_CHECKING:
    from peerd.config import Config

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (the message says why)
EXIT_USAGE = 2  # bad command line or arguments
EXIT_CONFIG = 3  # configuration missing or invalid
EXIT_NOT_RUNNING = 4  # the daemon is not running / the control socket is unreachable
EXIT_DENIED = 5  # refused: not trusted, not allowed, revoked
EXIT_TIMEOUT = 6  # a --timeout or --wait deadline passed
EXIT_RETIRED = 7  # this node's identity is revoked: it can never run again (systemd: no restart)

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
}

DEFAULT_CONFIG = "/etc/peerd/peerd.toml"


def exit_code_for(exc: PeerdError) -> int:
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return EXIT_FAILURE


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"configuration file (default: $PEERD_CONFIG, else {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="the daemon's control socket (default: the one the configuration names)",
    )


def config_path(args: argparse.Namespace) -> str:
    path: str = args.config or os.environ.get("PEERD_CONFIG") or DEFAULT_CONFIG
    return path


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def when(ts: float | None) -> str:
    """A UTC timestamp for tables and messages; `-` for none."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def usage(parser: argparse.ArgumentParser) -> int:
    """What a command group given no action does: its help, and the usage exit code."""
    parser.print_help()
    return EXIT_USAGE


async def with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    """`work` on the node's store, closed afterwards (for commands that run without a daemon)."""
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
    "add_json_option",
    "config_path",
    "exit_code_for",
    "print_json",
    "print_table",
    "usage",
    "when",
    "with_store",
]
