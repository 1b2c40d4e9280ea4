"""The `peerd` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from peerd import __version__
from peerd.errors import PeerdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerd",
        description="Exchange AI model files securely, end to end encrypted through MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return 0
    except PeerdError as exc:
        if args.debug:
            raise
        print(f"peerd: {exc.one_line()}", file=sys.stderr)
        return 1
