"""Backend switch: NumPy on the CPU, CuPy on a CUDA GPU.

Two rules, following the array API guidance:

* Computation takes its array namespace from its inputs (``array type in equals array type out``).
  :func:`array_namespace` returns ``numpy`` or ``cupy`` for a set of arrays and raises ``TypeError``
  when they mix libraries.
* Creation (parameter init, synthetic data) takes an explicit backend name, ``"numpy"`` or ``"cupy"``;
  ``None`` means the ``REFMOE_BACKEND`` environment variable, then ``"numpy"``.

Nothing moves between host and device except through :func:`to_numpy` and :func:`to_backend`,
which say so in their names.
"""
from __future__ import annotations

import os

import numpy as np

BACKENDS = ("numpy", "cupy")
ENV_VAR = "REFMOE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot be used on this machine (CuPy missing, or no CUDA device)."""


# ----------------------------------------------------------------------------------------------
# choosing a backend by name
# ----------------------------------------------------------------------------------------------

def backend_name(backend: str | None = None) -> str:
    """Resolve ``backend`` (or ``$REFMOE_BACKEND``, or ``"numpy"``) to a validated name."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "").strip() or "numpy"
    name = name.lower()
    if name not in BACKENDS:
        source = f"{ENV_VAR}={name!r}" if backend is None else f"backend={name!r}"
        raise ValueError(f"{source} is not a backend; expected one of {BACKENDS}")
    return name


def _import_cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        raise BackendUnavailableError(
            f"backend 'cupy' was requested but CuPy cannot be imported ({exc}); "
            "install refmoe[cuda12] or refmoe[cuda13] on a machine with a CUDA GPU"
        ) from exc
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendUnavailableError(f"backend 'cupy' was requested but CUDA is unusable ({exc})") from exc
    if n_devices < 1:
        raise BackendUnavailableError("backend 'cupy' was requested but no CUDA device is visible")
    return cupy


def get_xp(backend: str | None = None):
    """The array module for a backend name: ``numpy`` or ``cupy``."""
    name = backend_name(backend)
    return np if name == "numpy" else _import_cupy()


def cupy_status() -> tuple[bool, str]:
    """Whether the CuPy backend can run here, and what was found; never raises (``refmoe info`` reports it).

    ``(True, "CuPy 13.3.0, 1 CUDA device")``, or ``(False, reason)`` with reason ``"No module named 'cupy'"``
    (or another import failure), ``"no CUDA device: <the CUDA error>"`` or ``"no CUDA device is visible"``.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return False, str(exc) or type(exc).__name__
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA device: {exc}"
    if n_devices < 1:
        return False, "no CUDA device is visible"
    return True, f"CuPy {cupy.__version__}, {n_devices} CUDA device{'s' if n_devices > 1 else ''}"


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return cupy_status()[0]


# ----------------------------------------------------------------------------------------------
# taking the namespace from arrays
# ----------------------------------------------------------------------------------------------

def _is_cupy_array(a) -> bool:
    # Checked by module name so that NumPy-only installs never import CuPy.
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "__cuda_array_interface__")


def array_namespace(*arrays):
    """The namespace (``numpy`` or ``cupy``) shared by ``arrays``; ``None`` entries are skipped.

    Raises ``TypeError`` for a mix of NumPy and CuPy arrays and for anything that is not an array
    of either library (lists, torch tensors ...): refmoe never converts silently.
    """
    kinds = set()
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, np.ndarray):
            kinds.add("numpy")
        elif _is_cupy_array(a):
            kinds.add("cupy")
        else:
            raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(a).__module__}.{type(a).__name__}")
    if len(kinds) > 1:
        raise TypeError("inputs mix NumPy and CuPy arrays; move them explicitly with refmoe.to_backend")
    if not kinds or kinds == {"numpy"}:
        return np
    import cupy

    return cupy


def namespace_name(xp) -> str:
    return "cupy" if xp.__name__ == "cupy" else "numpy"


# ----------------------------------------------------------------------------------------------
# explicit transfers and small helpers
# ----------------------------------------------------------------------------------------------

def to_numpy(a):
    """A NumPy copy of ``a`` (a device-to-host transfer for CuPy arrays; NumPy arrays pass through)."""
    if isinstance(a, np.ndarray):
        return a
    if _is_cupy_array(a):
        return a.get()
    if np.isscalar(a):
        return np.asarray(a)
    raise TypeError(f"to_numpy expects a NumPy or CuPy array, got {type(a).__name__}")


def to_backend(a, backend: str | None = None):
    """``a`` on the named backend: an explicit host/device transfer when the backend differs."""
    xp = get_xp(backend)
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def scatter_add(xp, target, indices, values):
    """``target[indices] += values`` with repeated indices accumulated (in place on ``target``)."""
    if xp is np:
        np.add.at(target, indices, values)
    else:
        import cupyx

        cupyx.scatter_add(target, indices, values)
    return target


def device_description(backend: str | None = None) -> str:
    """A one-line description of where a backend computes."""
    name = backend_name(backend)
    if name == "numpy":
        import platform

        return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    cupy = _import_cupy()
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"CUDA device {dev.id}: {gpu}, {props['totalGlobalMem'] / 2**30:.1f} GiB"
