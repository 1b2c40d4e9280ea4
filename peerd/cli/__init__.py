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
from collections.abc import Sequence

from peerd import __version__
from peerd.cli import common
from peerd.errors import PeerdError

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
# imported and registered (argparse builds every subparser it is given, and each group imports
# what its commands share): that is most of what `peerd status` costs before it runs. A command
# missing here still works, by building them all; tests/peerd/test_cli_startup.py keeps the
# table complete.
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only its group's commands (all of them otherwise)."""
    parser = argparse.ArgumentParser(
        prog="peerd",
        description="Exchange AI model files securely, end to end encrypted through MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    common.add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    group = COMMANDS.get(command or "")
    for name in [group] if group else _GROUPS:
        module = __import__(f"peerd.cli.{name}", fromlist=["register"])
        module.register(subparsers)
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
