#!/usr/bin/env python3
"""Run notebooks top to bottom and save them with their outputs (the form they are committed in).

    python3 notebooks/execute.py                  # all of notebooks/*.ipynb
    python3 notebooks/execute.py notebooks/02_lemmas.ipynb

Needs nbclient, nbformat and ipykernel (``pip install -e ".[notebooks]"``). The notebooks import refmoe from this
checkout. Timing metadata is dropped, so a re-run only changes what the cells print.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path) -> None:
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.pop("MPLBACKEND", None)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        print(f"executing {path}", flush=True)
        execute(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
