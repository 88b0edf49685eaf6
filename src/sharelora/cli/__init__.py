"""The ``sharelora`` command line: one module per command, this module only puts them together.

A command module defines ``register(register_command)``, which calls
``register_command(name, help, add_arguments, run)``: ``add_arguments(parser)`` adds its flags,
``run(args)`` parses nothing more and calls the library (``sharelora.training``, ``sharelora.tasks``,
``sharelora.serve``, ``sharelora.bench``), returning the exit status. Command modules import only
argparse and ``common`` at import time and the library inside ``run``, so ``--help`` is instant.
Adding a command: a module here and its name in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .common import CliError, config_from_args

__all__ = ["COMMANDS", "CliError", "build_parser", "config_from_args", "main", "register_command"]


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}

# In the order ``sharelora --help`` lists them.
COMMAND_MODULES = ("train", "multitask", "compress", "compare", "eval", "export", "merge", "studies", "bench", "serve",
                   "sources")


def register_command(name: str, help: str, add_arguments, run) -> None:
    """Make ``sharelora NAME`` call ``run(args)`` after ``add_arguments(parser)`` built its parser."""
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is registered twice")
    COMMANDS[name] = Command(name, help, add_arguments, run)


_REGISTERED: set[str] = set()


def _register_all() -> None:
    for name in COMMAND_MODULES:
        if name not in _REGISTERED:  # build_parser may run more than once in a process (tests)
            importlib.import_module(f"{__name__}.{name}").register(register_command)
            _REGISTERED.add(name)


def build_parser() -> argparse.ArgumentParser:
    _register_all()
    parser = argparse.ArgumentParser(
        prog="sharelora",
        description="ShareLoRA: LoRA with low-rank matrices shared across layers (arXiv 2406.10785).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this cannot be done as asked": printed as one line, exit status 2.

    ShareLoraError and RunExistsError are ValueErrors; the sources raise SourceError.
    """
    from ..sources.errors import SourceError

    return (CliError, ValueError, FileNotFoundError, SourceError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("SHARELORA_DEBUG"):
            raise
        print(f"sharelora {args._command.name}: error: {e}", file=sys.stderr)
        return 2
