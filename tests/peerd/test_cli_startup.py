"""The CLI builds only the parser of the command it is given (peerd/cli/__init__.py)."""

from __future__ import annotations

import argparse

import pytest

from peerd.cli import COMMANDS, build_parser, command_of


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_is_in_the_table_with_the_group_that_registers_it() -> None:
    everything = _commands(build_parser())
    assert set(everything) == set(COMMANDS)
    for command in COMMANDS:
        assert command in _commands(build_parser(command))


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["status"], "status"),
        (["--config", "status", "peers"], "peers"),  # a file named "status"
        (["--config=x", "--debug", "send", "f", "--to", "p"], "send"),
        (["--socket", "/s", "msg", "listen", "ch"], "msg"),
        (["--help"], None),
        ([], None),
    ],
)
def test_the_command_is_found_past_the_global_options(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "c.toml", "status", "--json"],
        ["send", "f", "--to", "a,b", "--wait", "--config", "c.toml"],
        ["msg", "listen", "ch", "--count", "2"],
        ["join", "tok", "--name", "bob"],
    ],
)
def test_the_lean_parser_reads_a_command_line_as_the_full_one(argv: list[str]) -> None:
    lean = vars(build_parser(command_of(argv)).parse_args(argv))
    full = vars(build_parser().parse_args(argv))
    assert lean.pop("func").__name__ == full.pop("func").__name__
    assert lean == full
