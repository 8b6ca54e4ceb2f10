"""The NCCL adapter: CuPy's ``cupyx.distributed`` NCCL backend on CuPy arrays (one GPU per process).

    comm = nccl_communicator(n_devices, rank)          # cupyx.distributed.init_process_group(n_devices, rank)
    comm.allreduce_sum(a)                              # backend.all_reduce(a, out, op="sum") on the current stream

``cupyx.distributed.init_process_group`` starts a TCP store on rank 0 (host and port from the arguments, else
``$CUPYX_DISTRIBUTED_HOST`` / ``$CUPYX_DISTRIBUTED_PORT``, default 127.0.0.1:13333) and returns an
``NCCLBackend`` whose ``all_reduce(in_array, out_array, op, stream=None)`` runs NCCL's allReduce on the current
stream; the CuPy operations that follow on that stream see the result. Every process must be started by hand
(or by ``mpiexec``) with its own rank; docs/distributed.md has the two-GPU command. NumPy arrays are refused
(TypeError). CuPy is imported when a communicator is made, never when refmoe is.
"""
from __future__ import annotations

from ..backend import BackendUnavailableError, array_namespace
from .comm import Communicator


class NCCLCommunicator(Communicator):
    """One rank of an NCCL group. ``backend``: what ``cupyx.distributed.init_process_group`` returned (it has
    ``rank`` and ``all_reduce``); ``size``: the number of devices it was started with (the backend does not
    expose it publicly)."""

    library = "cupy"

    def __init__(self, backend, size: int):
        if not hasattr(backend, "all_reduce"):
            raise TypeError(f"backend must be a cupyx.distributed backend (with all_reduce), got "
                            f"{type(backend).__name__}")
        self._backend = backend
        self.rank = int(backend.rank)
        self.size = int(size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank={self.rank} is outside a group of size={self.size}")

    @property
    def backend(self):
        """The wrapped ``cupyx.distributed`` backend."""
        return self._backend

    def _allreduce(self, flat, op: str):
        out = array_namespace(flat).empty_like(flat)                 # [n] on the same device
        self._backend.all_reduce(flat, out, op)
        return out


def nccl_communicator(n_devices: int, rank: int, *, host: str | None = None, port: int | None = None,
                      device: int | None = None) -> NCCLCommunicator:
    """Start ``cupyx.distributed`` for this process and wrap it.

    n_devices  processes (one GPU each) in the group; rank  this process's, 0 <= rank < n_devices
    host, port the rendezvous of rank 0's TCP store (None: cupyx's environment variables, then its defaults)
    device     the CUDA device this process uses (default: rank modulo the visible devices), made current
               before NCCL starts, as cupyx.distributed requires
    """
    try:
        import cupy
        import cupyx.distributed
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        raise BackendUnavailableError(f"nccl_communicator needs CuPy with NCCL ({exc}); install refmoe[cuda12] "
                                      "or refmoe[cuda13] on a machine with CUDA GPUs") from exc
    n_visible = cupy.cuda.runtime.getDeviceCount()
    if n_visible < 1:
        raise BackendUnavailableError("nccl_communicator: no CUDA device is visible")
    cupy.cuda.Device(rank % n_visible if device is None else device).use()
    backend = cupyx.distributed.init_process_group(n_devices, rank, host=host, port=port)
    return NCCLCommunicator(backend, n_devices)
