"""Whether the fast path runs its CuPy kernels or their references: the kernels on CuPy, unless the environment
says ``REFMOE_FAST_KERNELS=0`` (the references then run on CuPy too, to tell a kernel's fault from the rest)."""
import os


def kernels_on(xp) -> bool:
    """True when ``xp`` is CuPy and the kernels are not switched off (``REFMOE_FAST_KERNELS=0``)."""
    return xp.__name__ == "cupy" and os.environ.get("REFMOE_FAST_KERNELS", "1") != "0"
