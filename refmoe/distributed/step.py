r"""One data-parallel step: every rank's share of the global-batch loss, and the parameter gradients summed.

Dimension letters: N_r tokens of this rank, N_g valid tokens of the global batch, D model width.

The model is the layer (out = y) or the study's residual block (out = x + y, ``residual=True``), with the task
loss of ``refmoe.study``, a mean squared error over the valid tokens of the WHOLE global batch:

.. math:: L_h = \frac{1}{N_g D} \sum_r \sum_{i \in r,\ valid} \lVert out_i - t_i \rVert^2,\qquad
          L = L_h + \alpha L_{aux} + \beta L_o + \gamma L_v\ (+ \zeta L_z)

each term taken on the concatenated batch (``refmoe.distributed.objective``). A rank computes its share of every
term and the gradient of L on its own tokens; the all-reduced SUM of the parameter gradients is then exactly the
gradient of the one-process run on the concatenated batch (float64: to ~1e-15 relative), on every rank, so every
replica takes the same optimiser step. Dividing the task by each rank's own N_r (a per-rank mean) and averaging
the gradients over R ranks equals this only when every rank holds the same number of valid tokens.

Collectives per step, in this order on every rank: one MAX (``check_replicas=True``: the ranks hold the same
parameters, config and objective), one SUM of the global sums (counts, token counts), one SUM of the gradients and
the loss shares together.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

from ..backend import array_namespace
from ..checks import check_dloss, check_mask
from ..config import MoEConfig
from ..objective import ObjectiveResult, get_objective
from .comm import check_communicator
from .objective import global_objective_backward, global_objective_forward


# ----------------------------------------------------------------------------------------------
# the task loss of the global batch
# ----------------------------------------------------------------------------------------------

class GlobalMSECache(NamedTuple):
    r: object           # [N_r, D] (out - t) on valid tokens, 0 on padding
    scale: float        # 1 / (N_g D)


def global_mse_forward(out, target, n_tokens, valid_mask=None):
    r"""Rank r's share of the mean squared error of a global batch.  out, target: [N_r, D] -> (0-d, cache).

    .. math:: L_h^{(r)} = \frac{1}{N_g D} \sum_{i \in r,\ valid} \lVert out_i - t_i \rVert^2

    n_tokens    N_g, the valid tokens of the global batch (> 0; ``GlobalObjectiveCache.n_tokens``)
    valid_mask  optional [N_r] bool; padding rows add nothing (and get zero gradient)
    The shares add up to ``refmoe.losses.task.mse_forward`` of the concatenated valid rows.
    """
    xp = array_namespace(out, target)
    if tuple(out.shape) != tuple(target.shape) or out.ndim != 2:
        raise ValueError(f"out {tuple(out.shape)} and target {tuple(target.shape)} must be the same [N_r, D]")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be the global batch's valid token count, an int >= 1")
    mask = check_mask(valid_mask, out.shape[0], xp, allow_all_padding=True)
    r = out - target                                                            # [N_r, D]
    if mask is not None:
        r = r * mask.astype(out.dtype)[:, None]
    scale = 1.0 / (int(n_tokens) * out.shape[1])
    return (r * r).sum() * out.dtype.type(scale), GlobalMSECache(r, scale)


def global_mse_backward(dloss, cache: GlobalMSECache):
    r"""d_out [N_r, D] = dloss * 2 (out - t) / (N_g D), zero on padding rows."""
    dloss = check_dloss(dloss, cache.r)
    return cache.r * (2 * cache.r.dtype.type(cache.scale) * dloss)


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------

class StepResult(NamedTuple):
    """What :func:`data_parallel_step` returns.

    losses    this rank's shares (0-d arrays): 'task', each regulariser ('aux', 'ortho', 'var', 'z' if any),
              'regularisers', 'total'; summed over the ranks they are the global batch's
    totals    the same keys summed over the ranks (all-reduced): the losses of the global batch, on every rank
    grads     parameter name -> gradient of the global-batch total, summed over the ranks (all-reduced; the
              same on every rank): what the optimiser takes
    dx        [N_r, D] gradient of the global-batch total on this rank's own input (through the residual
              path too when ``residual``); not all-reduced
    n_tokens  N_g, valid tokens of the global batch
    result    this rank's ``ObjectiveResult`` (cache, per-term slices when ``per_term``); its cache is None on a
              rank with no token
    """
    losses: dict
    totals: dict
    grads: dict
    dx: object
    n_tokens: int
    result: ObjectiveResult


def _fingerprint(params: dict, cfg: MoEConfig, obj) -> float:
    """A number naming the config, the objective and the parameter names and shapes (a CRC32, exact in float64)."""
    layout = repr((cfg, obj, sorted((k, tuple(v.shape), str(v.dtype)) for k, v in params.items())))
    return float(zlib.crc32(layout.encode("utf-8")))


def assert_same_replicas(comm, params: dict, cfg: MoEConfig, obj) -> None:
    """ValueError unless every rank holds the same config, objective and parameter values: one MAX all-reduce of
    (fingerprint, parameters) and of their negatives; a rank's values equal the maximum and minus the maximum of
    the negatives only when every rank has them."""
    xp = array_namespace(*params.values())
    names = sorted(params)
    flat = xp.concatenate([xp.asarray([_fingerprint(params, cfg, obj)], dtype=np.float64)]
                          + [params[k].reshape(-1).astype(np.float64) for k in names])
    both = xp.concatenate([flat, -flat])
    top = comm.allreduce_max(both)
    if not bool((top == both).all()):
        differs = "config or objective" if not bool((top[[0, flat.size]] == both[[0, flat.size]]).all()) \
            else "parameter values"
        raise ValueError(f"rank {comm.rank}: the ranks hold different {differs}; a data-parallel step needs "
                         "identical replicas (broadcast the parameters from one rank first)")


def data_parallel_step(comm, params: dict, batch, cfg: MoEConfig, objective="paper", *, residual: bool = False,
                       valid_mask=None, batch_shape=None, per_term: bool = False, forward=None,
                       check_replicas: bool = True) -> StepResult:
    """Forward and backward of the global-batch objective on rank r's batch, and the all-reduced gradients.

    comm         a ``refmoe.distributed`` Communicator: the data-parallel group (SingleProcess: one rank)
    params       this rank's replica of the parameters (the same on every rank; checked by ``check_replicas``)
    batch        this rank's tokens: any object with ``x`` [N_r, D] and ``target`` [N_r, D] (a
                 ``refmoe.study.data.Batch`` is one); N_r may differ between ranks and may be 0
    cfg          the layer's MoEConfig; objective  a preset name or a calibrated ``Objective``
    residual     False: out = y (the layer); True: out = x + y (the study's block)
    valid_mask   optional [N_r] bool, True = real token; padding leaves the task loss and, under
                 ``padding="exclude"``, the regularisers; a rank may be all padding
    batch_shape  (B_r, T_r) of this rank's tokens, for ``deepseek_seq`` (sequences do not cross ranks)
    per_term     also each term's slices in ``result.grads`` (the all-reduce sums the total only)
    forward      the layer's forward (default ``refmoe.moe_forward``)
    check_replicas  run :func:`assert_same_replicas` first (one MAX all-reduce of the parameters)
    Returns StepResult(losses, totals, grads, dx, n_tokens, result). The caller applies the optimiser to
    ``grads``; since they are identical on every rank, so are the updated replicas.
    """
    comm = check_communicator(comm)
    obj = get_objective(objective)
    x, target = batch.x, batch.target
    if check_replicas:
        assert_same_replicas(comm, params, cfg, obj)
    y, gcache = global_objective_forward(comm, x, params, cfg, obj, valid_mask=valid_mask,
                                         batch_shape=batch_shape, forward=forward)
    out = x + y if residual else y                                              # [N_r, D]
    mask = valid_mask if x.shape[0] else None
    task, mse = global_mse_forward(out, target, gcache.n_tokens, mask) if x.shape[0] \
        else (array_namespace(x).zeros((), dtype=x.dtype), None)
    dy = None if mse is None else global_mse_backward(1.0, mse)                 # [N_r, D] = d task / d out
    res = global_objective_backward(dy, gcache, task_loss=task, per_term=per_term)
    dx = res.grads["total"]["x"] + dy if residual and dy is not None else res.grads["total"]["x"]

    xp = array_namespace(x)
    names = sorted(k for k in res.grads["total"] if k != "x")
    keys = ["task", *obj.forms, "regularisers", "total"]
    shares = xp.stack([xp.asarray(res.losses[k], dtype=x.dtype).reshape(()) for k in keys])     # [len(keys)]
    flat = xp.concatenate([res.grads["total"][k].reshape(-1) for k in names] + [shares])
    summed = comm.allreduce_sum(flat)
    grads, start = {}, 0
    for k in names:
        size = res.grads["total"][k].size
        grads[k] = summed[start:start + size].reshape(res.grads["total"][k].shape)
        start += size
    totals = {k: summed[start + i] for i, k in enumerate(keys)}
    losses = {k: shares[i] for i, k in enumerate(keys)}
    return StepResult(losses, totals, grads, dx, gcache.n_tokens, res)
