"""Past one process: the global-batch losses and a data-parallel step over a group of ranks (docs/distributed.md).

    Communicator, SingleProcess        the interface (rank, size, allreduce_sum, allreduce_max) and the group of one
    MPICommunicator                    mpi4py (NumPy arrays on CPUs), ``refmoe.distributed.mpi``
    NCCLCommunicator, nccl_communicator   CuPy's cupyx.distributed NCCL backend (CuPy arrays on GPUs)
    global_objective_forward / _backward  one rank's share of the objective of the global batch, and its gradients
    data_parallel_step                 the shares, the global task loss and the all-reduced parameter gradients
    megatron_global_forward, qwen_global_forward   the two systems' global-batch balancing losses over L layers

Nothing here imports mpi4py or CuPy until a communicator on them is made.
"""
from .comm import Communicator, SingleProcess, allreduce_parts
from .conventions import global_counts, megatron_global_forward, qwen_global_forward
from .mpi import MPICommunicator
from .nccl import NCCLCommunicator, nccl_communicator
from .objective import (GlobalObjectiveCache, global_objective_backward, global_objective_forward,
                        global_objective_forward_backward)
from .step import StepResult, assert_same_replicas, data_parallel_step, global_mse_backward, global_mse_forward

__all__ = ["Communicator", "SingleProcess", "MPICommunicator", "NCCLCommunicator", "nccl_communicator",
           "allreduce_parts", "global_counts", "megatron_global_forward", "qwen_global_forward",
           "GlobalObjectiveCache", "global_objective_forward", "global_objective_backward",
           "global_objective_forward_backward", "StepResult", "assert_same_replicas", "data_parallel_step",
           "global_mse_forward", "global_mse_backward"]
