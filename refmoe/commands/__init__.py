"""Subcommands of the ``refmoe`` CLI, one module each (see refmoe/cli.py)."""
