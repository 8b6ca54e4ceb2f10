"""The ``refmoe`` command. Each subcommand is a module in ``refmoe/commands/`` that defines

    HELP: str                      one line for ``refmoe --help``
    add_arguments(parser) -> None  its options
    run(args) -> int               the exit code

so adding a command means adding a file. Bad arguments, whether argparse finds them or a command does (it raises
:class:`UsageError`), are answered with one line on stderr and exit code 2, before any work is done.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


class UsageError(ValueError):
    """A command's arguments are unusable; the command line prints the message as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (``refmoe gradcheck: error: ...``) instead of a usage block."""

    def error(self, message):
        _say(self.prog, message)
        raise SystemExit(2)


def _say(prog: str, message) -> None:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _command_modules():
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return {name: importlib.import_module(f"{commands.__name__}.{name}") for name in names}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(prog="refmoe", description="Reference MoE layer and losses with hand-derived gradients.")
    parser.add_argument("--version", action="version", version=f"refmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, module in _command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        _say(f"refmoe {args.command}", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
