"""The MPI adapter: mpi4py's buffer all-reduce on NumPy arrays (host memory).

    comm = MPICommunicator()                  # MPI.COMM_WORLD, or MPICommunicator(some_mpi4py_comm)
    comm.allreduce_sum(a)                     # Comm.Allreduce(a, out, op=MPI.SUM) on a contiguous copy

Run under ``mpiexec -n R python script.py``; ``pip install mpi4py mpich`` gives both from PyPI (docs/distributed.md
has the loopback settings for a sandbox). mpi4py is imported when a communicator is made, never when refmoe is.
CuPy arrays are refused (TypeError): this adapter does not stage device arrays through the host, and refmoe does
not rely on a CUDA-aware MPI.
"""
from __future__ import annotations

import numpy as np

from ..backend import BackendUnavailableError
from .comm import Communicator


def _import_mpi():
    try:
        from mpi4py import MPI
    except Exception as exc:  # ImportError, or the MPI library failing to load
        raise BackendUnavailableError(f"MPICommunicator needs mpi4py and an MPI library ({exc}); "
                                      "install them with: pip install mpi4py mpich") from exc
    return MPI


class MPICommunicator(Communicator):
    """One MPI rank. ``comm``: an mpi4py communicator (default ``MPI.COMM_WORLD``)."""

    library = "numpy"

    def __init__(self, comm=None):
        MPI = _import_mpi()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX}
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self._comm.Get_rank())
        self.size = int(self._comm.Get_size())

    @property
    def mpi_comm(self):
        """The wrapped mpi4py communicator."""
        return self._comm

    def _allreduce(self, flat, op: str):
        out = np.empty_like(flat)                                    # [n]
        self._comm.Allreduce(flat, out, op=self._ops[op])            # datatype from the buffer's dtype
        return out
