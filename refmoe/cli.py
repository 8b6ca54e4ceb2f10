"""The ``refmoe`` command. Each subcommand is a module in ``refmoe/commands/`` that defines

    HELP: str                      one line for ``refmoe --help``
    add_arguments(parser) -> None  its options
    run(args) -> int               the exit code

so adding a command means adding a file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def _command_modules():
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return {name: importlib.import_module(f"{commands.__name__}.{name}") for name in names}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="refmoe", description="Reference MoE layer and losses with hand-derived gradients.")
    parser.add_argument("--version", action="version", version=f"refmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
