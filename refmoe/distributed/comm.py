"""The communicator interface refmoe's data-parallel code needs, and the single-process one.

A communicator is one rank of a group of ``size`` processes. refmoe asks it for two collectives only:

    allreduce_sum(a)   the elementwise sum of ``a`` over the ranks        (counts, token counts, gradients)
    allreduce_max(a)   the elementwise maximum of ``a`` over the ranks    (checking that replicas agree)

Each returns a new array of ``a``'s shape and dtype on every rank and leaves ``a`` as it is. ``a`` is a float32 or
float64 NumPy or CuPy array; an adapter that moves only one library's arrays (``library``: "numpy" for MPI,
"cupy" for NCCL) refuses the other with a TypeError, because refmoe never copies between host and device behind
the caller's back. Every rank must call the same collectives in the same order with arrays of the same shape.

Adapters on real engines: :class:`refmoe.distributed.mpi.MPICommunicator` (mpi4py), and
:class:`refmoe.distributed.nccl.NCCLCommunicator` (CuPy's ``cupyx.distributed``). :class:`SingleProcess` is the
group of one (size 1): every collective returns a copy, so the distributed code runs, and equals the
one-process code, without any engine installed. A new adapter subclasses :class:`Communicator` and implements
``_allreduce(a, op)`` on a contiguous array.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_namespace, namespace_name

OPS = ("sum", "max")
DTYPES = (np.float32, np.float64)


class Communicator:
    """One rank of a group: ``rank`` (0 <= rank < size), ``size``, ``library`` ("numpy", "cupy", or None for
    either), and the two all-reduces. Subclasses set the three attributes and implement ``_allreduce``."""

    rank: int = 0
    size: int = 1
    library: str | None = None

    def allreduce_sum(self, a):
        """The elementwise sum of ``a`` over the ranks: a new array, same shape and dtype, on every rank."""
        return self._reduce(a, "sum")

    def allreduce_max(self, a):
        """The elementwise maximum of ``a`` over the ranks: a new array, same shape and dtype, on every rank."""
        return self._reduce(a, "max")

    def check_library(self, xp, what: str = "the arrays"):
        """TypeError when ``xp`` (numpy or cupy) is not the library this communicator moves."""
        name = namespace_name(xp)
        if self.library is not None and name != self.library:
            other = {"numpy": "MPICommunicator", "cupy": "NCCLCommunicator"}[name]
            move = "refmoe.to_numpy" if self.library == "numpy" else "refmoe.to_backend(a, 'cupy')"
            raise TypeError(f"{what} are {name} arrays, but {type(self).__name__} all-reduces {self.library} "
                            f"arrays only; move them explicitly ({move}) or use {other}")

    def _reduce(self, a, op: str):
        xp = array_namespace(a)
        self.check_library(xp, "the arrays to all-reduce")
        if a.dtype.type not in DTYPES:
            raise TypeError(f"all-reduce of dtype {a.dtype}; refmoe reduces float32 or float64 arrays")
        flat = xp.ascontiguousarray(a).reshape(-1)                  # [a.size]
        if flat.size == 0:                                           # the same (empty) shape on every rank
            return flat.reshape(a.shape).copy()
        return self._allreduce(flat, op).reshape(a.shape)

    def _allreduce(self, flat, op: str):
        """The collective itself on a contiguous 1-D array; returns a new array."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _allreduce")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """The group of one process (rank 0, size 1), for NumPy and CuPy arrays alike: a sum or a maximum over
    one rank is the array itself, returned as a copy."""

    rank, size, library = 0, 1, None

    def _allreduce(self, flat, op: str):
        return flat.copy()


def check_communicator(comm) -> Communicator:
    """``comm`` if it is a Communicator with a consistent rank and size; TypeError / ValueError otherwise."""
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm must be a refmoe.distributed Communicator (SingleProcess, MPICommunicator, "
                        f"NCCLCommunicator), got {type(comm).__name__}")
    if not (isinstance(comm.size, int) and isinstance(comm.rank, int) and 0 <= comm.rank < comm.size):
        raise ValueError(f"communicator has rank={comm.rank!r}, size={comm.size!r}; need 0 <= rank < size")
    return comm


def allreduce_parts(comm: Communicator, parts: dict, xp) -> dict:
    """Sum every array of ``parts`` (name -> float64 1-D array on ``xp``) over the ranks with ONE all-reduce.

    The arrays are laid end to end in the order of ``parts``, which must be the same on every rank (it is
    fixed by the objective and the config, which the ranks share). Returns name -> summed array.
    """
    names = list(parts)
    sizes = [int(parts[n].size) for n in names]
    flat = xp.concatenate([parts[n].reshape(-1).astype(np.float64) for n in names]) if names \
        else xp.zeros(0, dtype=np.float64)
    total = comm.allreduce_sum(flat)
    ends = np.cumsum(sizes).tolist()
    return {n: total[end - size:end] for n, size, end in zip(names, sizes, ends)}
