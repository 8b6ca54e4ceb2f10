"""refmoe info: version, backend, device and dtype policy."""
from __future__ import annotations

import json
import platform

HELP = "print the version, the active backend and device, and the dtype policy"


def add_arguments(parser):
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="backend to describe (default: $REFMOE_BACKEND, then numpy)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import numpy as np
    import scipy

    from .. import __version__
    from ..backend import ENV_VAR, backend_name, cupy_available, device_description

    name = backend_name(args.backend)
    info = {
        "refmoe": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "backend": name,
        "backend_source": "--backend" if args.backend else f"${ENV_VAR}" if _env_set(ENV_VAR) else "default",
        "device": device_description(name),
        "cupy_available": cupy_available(),
        "dtype_policy": "float32 and float64 supported; dtype in = dtype out; gradient checks in float64",
    }
    if cupy_available():
        import cupy

        info["cupy"] = cupy.__version__
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _env_set(var):
    import os

    return bool(os.environ.get(var, "").strip())
