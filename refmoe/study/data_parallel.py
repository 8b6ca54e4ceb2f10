r"""The study's training step split over the ranks of a data-parallel group (``refmoe reproduce --data-parallel``
under ``mpiexec -n R``): the same numbers as one process, to round-off.

Dimension letters: N tokens of the global batch, N_r of rank r, D model width, K top-k.

Every rank draws the same global batch from the same generator (the one-process run's batch) and keeps its rows
:func:`rank_rows` (contiguous, sizes differ by at most one). ``refmoe.distributed.data_parallel_step`` gives each
rank's share of the global-batch objective and the parameter gradients summed over the ranks, so every replica
takes the same Adam step. What the study records from a step is then read off the global batch:

* L_h and each regulariser: the all-reduced totals;
* MaxVio_batch and, at logging steps, the per-term gradients of x, the task gradient dy and the expert outputs:
  the ranks' rows put back together by :func:`gather_rows` (each rank's rows at their place in a zero array,
  summed over the ranks: adding zeros is exact, so this is the concatenation bit for bit);
* the per-term parameter gradients of the logging steps: the ranks' slices summed.

One substitution, exact in the mathematics: the study's batch is one sequence (``batch_shape`` None), and a
sequence cannot be cut over ranks in ``deepseek_seq``'s convention (docs/distributed.md). With one sequence,
``deepseek_seq`` is ``deepseek_batch`` on the whole batch (the mean over B = 1 sequences), whose global form
all-reduces the counts; the data-parallel run uses that.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_namespace
from ..objective import TERMS, Objective


def rank_rows(n_tokens: int, comm) -> slice:
    """Rank r's contiguous rows of an N-token batch: the first N mod R ranks get one row more."""
    base, extra = divmod(n_tokens, comm.size)
    start = comm.rank * base + min(comm.rank, extra)
    return slice(start, start + base + (comm.rank < extra))


def gather_rows(comm, part, rows: slice, n_tokens: int):
    """The ranks' row blocks [N_r, ...] put together into [N, ...] on every rank (an all-reduce of zero-padded
    copies: exact). Integer arrays travel as float64 (exact below 2^53) and come back as they were."""
    xp = array_namespace(part)
    dtype = part.dtype
    wire = np.float64 if dtype.kind in "iub" else dtype
    full = xp.zeros((n_tokens,) + tuple(part.shape[1:]), dtype=wire)
    full[rows] = part.astype(wire)
    full = comm.allreduce_sum(full)
    return full.astype(dtype) if wire is not dtype else full


def data_parallel_objective(objective: Objective) -> Objective:
    """The objective each rank runs: ``deepseek_seq`` on the study's single sequence becomes ``deepseek_batch``
    (the same loss; see the module text)."""
    if objective.aux_variant == "deepseek_seq":
        return objective.replace(aux_variant="deepseek_batch")
    return objective


class GlobalCache(NamedTuple):
    topk_idx: object          # [N, K] of the global batch
    expert_out: object        # [N, K, D] at logging steps, else None


class GlobalResult(NamedTuple):
    """The parts of an ``ObjectiveResult`` the study reads, for the global batch."""
    losses: dict              # term -> the global batch's value
    grads: dict               # "total" -> summed parameter gradients; at logging steps each term too, with x
    cache: GlobalCache


def global_step(comm, params: dict, batch, cfg, objective: Objective, *, per_term: bool, check_replicas: bool):
    """One data-parallel step of the study's block on the global ``batch`` (every rank passes the whole batch).
    Returns (GlobalResult, dy [N, D] at logging steps else None)."""
    from ..distributed import data_parallel_step

    n = batch.x.shape[0]
    rows = rank_rows(n, comm)
    mine = batch._replace(x=batch.x[rows], target=batch.target[rows], cluster=batch.cluster[rows])
    step = data_parallel_step(comm, params, mine, cfg, data_parallel_objective(objective), residual=True,
                              per_term=per_term, check_replicas=check_replicas)
    res = step.result
    grads = {"total": step.grads}
    expert_out = dy = None
    if per_term:
        for term in TERMS:
            part = res.grads[term]
            grads[term] = {k: (gather_rows(comm, v, rows, n) if k == "x" else comm.allreduce_sum(v))
                           for k, v in part.items()}
        expert_out = gather_rows(comm, res.cache.expert_out, rows, n)
        r = (mine.x + res.y) - mine.target                                          # [N_r, D] out - t
        dy = gather_rows(comm, r * (2.0 / (n * r.shape[1])), rows, n)               # dL_h/dout, as mse_backward
    topk = gather_rows(comm, res.cache.topk_idx, rows, n)
    losses = {k: step.totals[k] for k in TERMS}
    return GlobalResult(losses, grads, GlobalCache(topk, expert_out)), dy
