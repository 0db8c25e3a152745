"""What every ``gpt2-accel`` command shares: its parser, both option spellings, the one-line error, console logs.

A command module builds its parser with :func:`command_parser`, reads ``argv`` with :func:`parse`, and reports a
user error in one line on stderr, without a traceback: :func:`fail` exits 2 as argparse does for a bad argument,
:func:`error` returns the exit status for the command to return.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from ..logs import demote_routine_lines


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``gpt2-accel <command>`` (its usage line names the command as users type it)."""
    return argparse.ArgumentParser(prog=f"gpt2-accel {command}", description=description)


def accept_both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let every ``--long_option`` also be written ``--long-option`` (and the reverse).

    The recipe keys and transformers use underscores, while many CLIs use dashes; users type both.
    """
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            if not opt.startswith("--"):
                continue
            body = opt[2:]
            alt = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
            if alt != opt and alt not in parser._option_string_actions:
                parser._option_string_actions[alt] = action
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed with both spellings of every option accepted; argparse exits 2 on a bad one. Third-party
    routine lines are demoted to debug from here on (:func:`gpt2_accel.logs.demote_routine_lines`)."""
    demote_routine_lines()
    return accept_both_spellings(parser).parse_args(argv)


def parse_known(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """As :func:`parse`, returning the arguments the parser does not know (recipe overrides ``--key=value``)."""
    demote_routine_lines()
    return accept_both_spellings(parser).parse_known_args(argv)


def error(message: object, code: int = 2) -> int:
    """Print ``error: <message>`` on stderr and return ``code`` (2: the user's input, 1: the operation failed)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def fail(parser: argparse.ArgumentParser, message: object) -> NoReturn:
    """Exit 2 with ``gpt2-accel <command>: error: <message>``, as argparse reports a bad argument: for inputs
    that only turn out wrong once read (a model that is not an adapter, an output that is not empty)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def console_logging(level: int = logging.INFO) -> None:
    """Show this toolkit's log lines as plain messages, unless the caller configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(message)s")
