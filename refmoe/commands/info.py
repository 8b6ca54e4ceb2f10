"""refmoe info: version, backend and device, dtype policy, and which optional pieces are installed.

A diagnostic, so it reports what cannot run here (CuPy missing, no CUDA device) instead of raising, and exits 0.
Only a name that is not a backend (``--backend foo``, ``REFMOE_BACKEND=foo``) is a usage error: one line on
stderr, exit 2. The text form fits WIDTH columns; ``--json`` keeps every value whole.
"""
from __future__ import annotations

import json
import os
import platform
import sys

HELP = "print the version, backend and device, dtype policy, and what is not available here"
WIDTH = 120  # columns of the text form


def add_arguments(parser):
    parser.add_argument("--backend", default=None, metavar="{numpy,cupy}",
                        help="backend to describe (default: $REFMOE_BACKEND, then numpy)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import numpy as np
    import scipy

    from .. import __version__
    from ..backend import ENV_VAR, backend_name, cupy_status

    try:
        name = backend_name(args.backend)
    except ValueError as exc:                     # e.g. backend='foo' is not a backend; expected one of (...)
        print(f"refmoe info: error: {exc}", file=sys.stderr)
        return 2
    cupy_ok, cupy_found = cupy_status()
    info = {
        "refmoe": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "cupy": cupy_found if cupy_ok else f"not available ({cupy_found})",
        "torch": _torch_found(),
        "backend": name,
        "backend_source": "--backend" if args.backend else f"${ENV_VAR}" if os.environ.get(ENV_VAR, "").strip()
                          else "default",
        "device": _device(name, cupy_ok, cupy_found),
        "dtype_policy": "float32 and float64 supported; dtype in = dtype out; gradient checks in float64",
    }
    if args.json:
        print(json.dumps({**info, "cupy_available": cupy_ok}, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(_fit(f"{key:<{width}}  {' '.join(str(value).split())}"))
    return 0


# ----------------------------------------------------------------------------------------------
# what is found, as one line each; nothing here raises
# ----------------------------------------------------------------------------------------------

def _device(name, cupy_ok, cupy_found):
    from ..backend import device_description

    if name == "cupy" and not cupy_ok:
        hint = "" if cupy_found.startswith("no CUDA device") else "; pip install refmoe[cuda12] or refmoe[cuda13]"
        return f"none: CuPy is not available ({cupy_found}){hint}"
    try:
        return device_description(name)
    except Exception as exc:  # a CUDA device that was counted but cannot be queried
        return f"unknown ({type(exc).__name__}: {exc})"


def _torch_found():
    """torch's version, read from the installed metadata (importing torch would take seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{version('torch')} (the oracle of the torch-based tests)"
    except PackageNotFoundError:
        return "not installed (the torch-based tests skip; pip install refmoe[oracle])"


def _fit(line):
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."
