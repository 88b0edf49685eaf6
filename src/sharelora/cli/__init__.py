"""The ``sharelora`` command line: one module per command, this module only puts them together.

A command module defines ``register(register_command)``, which calls
``register_command(name, help, add_arguments, run)``: ``add_arguments(parser)`` adds its flags,
``run(args)`` parses nothing more and calls the library (``sharelora.training``, ``sharelora.tasks``,
``sharelora.serve``, ``sharelora.bench``), returning the exit status. Command modules import only
argparse and ``common`` at import time and the library inside ``run``, so ``--help`` is instant.
Adding a command: a module here and its name in ``COMMAND_MODULES``. A command whose extra is not
installed (its flags or its run import a module of it, see ``sharelora.extras``) stops with one
line that names the extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..extras import MissingExtraError, as_missing_extra
from .common import CliError, config_from_args

__all__ = ["COMMANDS", "UNAVAILABLE", "CliError", "build_parser", "config_from_args", "main", "register_command"]


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


# Commands whose extra is not installed here: {name: the error naming the extra} (set by build_parser).
UNAVAILABLE: dict[str, MissingExtraError] = {}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a command whose extra is missing gets no flags (see ``UNAVAILABLE``)."""
    from .. import __version__

    _register_all()
    parser = argparse.ArgumentParser(
        prog="sharelora",
        description="ShareLoRA: LoRA with low-rank matrices shared across layers (arXiv 2406.10785).",
    )
    parser.add_argument("--version", action="version", version=f"sharelora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    UNAVAILABLE.clear()
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        try:
            cmd.add_arguments(p)
        except ImportError as e:  # its flags come from a module of an extra that is not installed
            missing = _missing_extra(e, f"sharelora {cmd.name}")
            if missing is None:
                raise
            UNAVAILABLE[cmd.name] = missing
        p.set_defaults(_command=cmd)
    if UNAVAILABLE:
        by_extra: dict[str, list[str]] = {}
        for name, missing in UNAVAILABLE.items():
            by_extra.setdefault(missing.extra, []).append(name)
        parser.epilog = "commands whose extra is not installed here:\n" + "\n".join(
            f"  {', '.join(names)}: pip install 'sharelora[{extra}]'" for extra, names in by_extra.items())
        parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's lines as they are
    return parser


def _missing_extra(error: ImportError, feature: str) -> MissingExtraError | None:
    """``error`` as the one-line MissingExtraError naming the extra to install; None if it is not one."""
    if isinstance(error, MissingExtraError):
        return error
    if isinstance(error, ModuleNotFoundError):
        return as_missing_extra(error, feature)
    return None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this cannot be done as asked": printed as one line, exit status 2.

    ShareLoraError and RunExistsError are ValueErrors; the sources raise SourceError.
    """
    from ..sources.errors import SourceError

    return (CliError, ValueError, FileNotFoundError, SourceError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    named = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    if named in UNAVAILABLE:  # before parsing: its flags (--help too) are not there to parse
        print(f"sharelora {named}: error: {UNAVAILABLE[named]}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ImportError as e:  # an optional package that this run needs: name its extra, in one line
        missing = _missing_extra(e, f"sharelora {args._command.name}")
        if missing is None or os.environ.get("SHARELORA_DEBUG"):
            raise
        print(f"sharelora {args._command.name}: error: {missing}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        if os.environ.get("SHARELORA_DEBUG"):
            raise
        print(f"sharelora {args._command.name}: error: {e}", file=sys.stderr)
        return 2
