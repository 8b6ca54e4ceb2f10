"""The software and hardware a study ran on: Python, NumPy, SciPy, the BLAS and its thread count, the platform,
and on CuPy the CuPy and CUDA runtime versions and the device.

Recorded in every report, because the same seeds give slightly different numbers on another BLAS or another
thread count (a sum of products is rounded in another order). ``refmoe.study.parallel`` runs each worker
with one BLAS thread, so the numbers of a run do not depend on how many workers it had.
"""
from __future__ import annotations

import ctypes
import os
import platform

import numpy as np

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")   # what sets a BLAS's thread count


def _blas_threads():
    """The BLAS thread count: threadpoolctl where installed, else OpenBLAS's own getter in the loaded library,
    else None."""
    try:
        from threadpoolctl import threadpool_info

        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if info:
            return int(info[0]["num_threads"])
    except Exception:                          # not installed, or it fails on this platform
        pass
    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1][:1] == "/"})
        for path in libs:
            lib = ctypes.CDLL(path)
            for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                         "openblas_get_num_threads"):
                fn = getattr(lib, name, None)
                if fn is not None:
                    return int(fn())
    except Exception:
        pass
    return None


def gpu_environment() -> dict:
    """CuPy's version, the CUDA runtime's and the device this process computes on."""
    import cupy

    from ..backend import device_description

    v = cupy.cuda.runtime.runtimeGetVersion()
    return {"cupy": cupy.__version__, "cuda_runtime": f"{v // 1000}.{v % 1000 // 10}",
            "device": device_description("cupy")}


def environment(backend: str = "numpy") -> dict:
    """Python, NumPy, SciPy, the BLAS NumPy was built with and its thread count (None where unknown), platform;
    on CuPy also :func:`gpu_environment` under "gpu"."""
    import scipy

    blas = "unknown"
    try:
        b = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{b.get('name', '?')} {b.get('version', '')}".strip()
    except Exception:                          # older NumPy: no mode="dicts"
        pass
    env = {k: os.environ[k] for k in THREAD_VARS if k in os.environ}
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "blas": blas, "blas_threads": _blas_threads(), "thread_env": env, "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            **({"gpu": gpu_environment()} if backend == "cupy" else {})}


def environment_lines(env: dict | None = None) -> list:
    """``environment()`` (with ``workers`` where the study adds it) as markdown list lines: two, and a third on
    CuPy."""
    e = environment() if env is None else env
    n = e["blas_threads"]
    t = "unknown thread count" if n is None else f"{n} thread{'' if n == 1 else 's'}"
    if e["thread_env"]:
        t += " (" + ", ".join(f"{k}={v}" for k, v in e["thread_env"].items()) + ")"
    w = e.get("workers")
    t += "" if w is None else f" in each of {w} worker processes" if w > 1 else ", one process"
    ranks = e.get("data_parallel_ranks")
    t += "" if ranks is None else f" per rank, data-parallel over {ranks} MPI ranks"
    lines = [f"- Python {e['python']}, NumPy {e['numpy']}, SciPy {e['scipy']}; BLAS {e['blas']}, {t}",
             f"- Platform {e['platform']}, {e['machine']}, {e['cpus']} logical CPU(s)"]
    g = e.get("gpu")
    if g is not None:
        shared = f", shared by {w} worker processes" if w is not None and w > 1 else ""
        lines.append(f"- CuPy {g['cupy']}, CUDA runtime {g['cuda_runtime']}; {g['device']}{shared}")
    return lines
