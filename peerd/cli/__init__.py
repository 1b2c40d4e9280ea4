"""The `peerd` command line.

Each command group lives in its own module with a `register(subparsers)` function that adds its
subcommands and sets `func` (a callable taking the parsed arguments and returning an exit
code). `main` turns every `PeerdError` into one line on stderr (the traceback only with
`--debug`) and maps it to an exit code scripts can rely on (see `peerd.cli.common.EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import os
import sys

from peerd import __version__
from peerd.cli import common
from peerd.errors import PeerdError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see check_imports.py)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

# Command-group modules; each has register(subparsers). Order is the order of `peerd --help`.
_GROUPS: list[str] = [
    "keys",
    "daemon",
    "messages",
    "transfer",
    "authority",
    "identity",
    "backup",
    "broker",
    "doctor",
]


# Which group registers each command: a command line names one, and only that group is
# imported, and only that command's parser built (argparse builds every subparser it is given,
# and each group imports what its commands share): that is most of what `peerd status` costs
# before it runs. A command missing here still works, by building them all;
# tests/peerd/test_cli_startup.py keeps the table complete.
COMMANDS: dict[str, str] = {
    "init": "keys",
    "id": "keys",
    "audit": "keys",
    "run": "daemon",
    "metrics": "daemon",
    "status": "daemon",
    "peers": "daemon",
    "invite": "daemon",
    "join": "daemon",
    "name": "daemon",
    "trust": "daemon",
    "block": "daemon",
    "rotate": "daemon",
    "revoke": "daemon",
    "connect": "daemon",
    "msg": "messages",
    "send": "transfer",
    "transfers": "transfer",
    "cancel": "transfer",
    "receive": "transfer",
    "authority": "authority",
    "membership": "identity",
    "revocation": "identity",
    "succeed-identity": "identity",
    "backup": "backup",
    "restore": "backup",
    "broker-login": "broker",
    "doctor": "doctor",
}
_VALUED = {"--config", "--socket"}  # global options that take a separate value


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list names (its first word that is no option or option value)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _columns() -> int:
    """The terminal's width, as `shutil.get_terminal_size` finds it ($COLUMNS, else the
    terminal on stdout, else 80)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, but the width found without importing `shutil` (which loads
    bz2, lzma and zlib: ~2.5 ms of every command's start, for a width only --help uses)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(
            prog, indent_increment, max_help_position, _columns() - 2 if width is None else width
        )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser using `_Formatter`; the subcommands' parsers are of this class too."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)


class _Ignored:
    """A stand-in for the parser of a command that is not being run: it takes whatever a
    group's `register` adds to it (arguments, defaults, nested commands) and forgets it."""

    def __getattr__(self, name: str) -> Any:
        return self._take

    def _take(self, *args: Any, **kwargs: Any) -> _Ignored:
        return self


class _OnlyCommand:
    """The subcommands as a group's `register` sees them when one command is run: only that
    command's parser is built (a group registers up to a dozen, each with its options)."""

    def __init__(self, subparsers: Any, command: str) -> None:
        self._subparsers = subparsers
        self._command = command

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if name == self._command:
            return self._subparsers.add_parser(name, **kwargs)
        return _Ignored()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that command's (all of them otherwise)."""
    parser = _Parser(
        prog="peerd",
        description="Exchange AI model files securely, end to end encrypted through MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    common.add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    group = COMMANDS.get(command or "")
    for name in [group] if group else _GROUPS:
        module = __import__(f"peerd.cli.{name}", fromlist=["register"])
        module.register(_OnlyCommand(subparsers, command) if group and command else subparsers)
    common.add_global_options_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return common.EXIT_USAGE
    try:
        code: int = args.func(args)
        # Flush here, inside the handler below, not in the interpreter's exit where a closed
        # pipe would print "Exception ignored ... BrokenPipeError".
        sys.stdout.flush()
        return code
    except PeerdError as exc:
        if args.debug:
            raise
        print(f"peerd: {exc.one_line()}", file=sys.stderr)
        return common.exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`peerd status --json | head -1`): what it wanted was written.
        # Point stdout at /dev/null so the interpreter's final flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
