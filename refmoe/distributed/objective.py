r"""The objective of a global batch spread over the ranks of a data-parallel group: each rank's share.

Dimension letters: N_r tokens of this rank, N_g valid tokens of the global batch (all ranks), D model width,
E routed experts, K top-k.

Rank r holds N_r tokens (any number, 0 included, some of them padding) and a replica of the parameters. Every
regulariser reads its batch through a few sums over the tokens (``refmoe.losses.term_totals``: the counts c_j
and N for L_aux, the column sums of S for L_v ``paper``, N for the per-token means, the number of sequences for
the per-sequence forms). One all-reduce (a SUM, never a mean) adds them over the ranks, and each rank computes

.. math:: L^{(r)}_t = \text{term } t \text{ on rank r's tokens, normalised by the global sums},\qquad
          \sum_r L^{(r)}_t = L_t(\text{the concatenated batch})

with its own scores: for L_aux, :math:`L^{(r)} = \sum_{i \in r} \sum_j W_j(c^g, N_g) Q_{ij}`; for L_v ``paper``,
:math:`-\frac{1}{E}\sum_{i \in r}\sum_j (s_{ij} - \bar s^g_j)^2` with the global column means. Rank r's gradient is
the gradient of the global-batch objective with respect to rank r's inputs and its replica of the parameters
(its slice): summed over the ranks, the parameter slices are the gradient of the one-process objective on the
concatenated batch (``refmoe.distributed.step.data_parallel_step`` does that sum). L_o ``pairwise`` is a plain
sum over tokens and needs no communication; ``span_code_grouping`` regroups a batch's own rows and has no share
per rank (refused when size > 1). docs/distributed.md states each term's convention with its formula.

The task loss is the caller's, through ``dy`` as in ``refmoe.objective_backward``: it must be the gradient of the
rank's share of the GLOBAL task loss (a mean over the N_g tokens of the global batch, not over the rank's N_r).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_namespace
from ..checks import check_mask
from ..config import MoEConfig
from ..layer import moe_forward
from ..losses.terms import term_totals
from ..objective import (Objective, ObjectiveCache, ObjectiveResult, get_objective, objective_backward,
                         regularisers_forward)
from .comm import Communicator, allreduce_parts, check_communicator

# the one form whose value on a concatenated batch is not a sum of per-rank shares
NO_SHARE = {("ortho", "span_code_grouping")}


class GlobalObjectiveCache(NamedTuple):
    """What :func:`global_objective_backward` needs from :func:`global_objective_forward`.

    ocache    the rank's ``ObjectiveCache`` (its terms built with the global sums), None on a rank with no token
    totals    dict: "tokens" -> [1] valid tokens of the global batch (padding never counted, whatever
              ``Objective.padding``), and term -> that term's global sums (float64 arrays, as all-reduced)
    obj       the Objective
    x         [N_r, D] the rank's input
    params    the rank's replica of the parameters
    """
    ocache: ObjectiveCache | None
    totals: dict
    obj: Objective
    x: object
    params: dict

    @property
    def n_tokens(self) -> int:
        """Valid tokens of the global batch."""
        return int(round(float(self.totals["tokens"][0])))


def _check_rank_input(comm, x, params, cfg):
    comm = check_communicator(comm)
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    xp = array_namespace(x, *params.values())
    comm.check_library(xp, "x and the parameters")
    if getattr(x, "ndim", None) != 2 or x.shape[1] != cfg.d_model:
        raise ValueError(f"x must be [N_r, D={cfg.d_model}] (N_r may be 0 on a rank), got shape {tuple(x.shape)}")
    return comm, xp


def _shares(obj: Objective, comm: Communicator) -> dict:
    """term -> form of the terms that have a share per rank (``NO_SHARE`` forms run locally at size 1)."""
    forms = dict(obj.forms)
    for term, form in forms.items():
        if (term, form) in NO_SHARE and comm.size > 1:
            raise ValueError(f"{term} form {form!r} has no share per rank: it groups the rows of one batch "
                             "(Objective(ortho_released_grouping=True)); use 'span' or 'pairwise' across ranks")
    return {t: f for t, f in forms.items() if (t, f) not in NO_SHARE}


def global_objective_forward(comm, x, params: dict, cfg: MoEConfig, objective="paper", *, valid_mask=None,
                             batch_shape=None, forward=None):
    """Rank r's layer forward and its shares of the regularisers of the global batch.  -> (y [N_r, D], cache).

    comm        a ``refmoe.distributed`` Communicator (the data-parallel group); its library must be x's
    x           [N_r, D] this rank's tokens (N_r = 0 is allowed: the rank then only joins the all-reduce)
    params      this rank's replica of the parameters (identical on every rank)
    objective   a preset name or an ``Objective`` with numeric coefficients, the same on every rank
    valid_mask  optional [N_r] bool (True = real token); a rank may be all padding
    batch_shape (B_r, T_r) of this rank's tokens for ``deepseek_seq``; sequences do not cross ranks
    forward     the layer's forward (default ``refmoe.moe_forward``)
    One all-reduce (a sum of float64 counts); every rank must call this with the same cfg and objective.
    """
    comm, xp = _check_rank_input(comm, x, params, cfg)
    obj = get_objective(objective)
    if not obj.is_calibrated:
        raise ValueError(f"objective {obj.name!r} has pending auto-scaled weights (beta={obj.beta}, "
                         f"gamma={obj.gamma}); give every rank the same numbers with objective.replace(...)")
    forms = _shares(obj, comm)
    N = x.shape[0]
    mask = check_mask(valid_mask, N, xp, allow_all_padding=True) if N else None
    if N == 0:                      # no token: the same layout of sums, from one padding row, all zeros
        rows, mask = xp.zeros((1, cfg.d_model), dtype=x.dtype), xp.zeros(1, dtype=bool)
        regmask = mask
    else:
        rows = x
        regmask = mask if obj.padding == "exclude" else None       # "include": the regularisers see padding
    y, cache = (moe_forward if forward is None else forward)(rows, params, cfg)   # [N_r, D]
    shape = (1, 1) if N == 0 else batch_shape
    valid = xp.ones(N, dtype=np.float64) if mask is None else mask.astype(np.float64)
    local = {"tokens": valid.sum().reshape(1)}
    local.update({t: term_totals(t, f, cache, valid_mask=regmask, batch_shape=shape) for t, f in forms.items()})
    totals = allreduce_parts(comm, local, xp)
    if not totals["tokens"][0] > 0:
        raise ValueError("the global batch has no valid token on any rank; the loss is undefined")
    if N == 0:
        return y[:0], GlobalObjectiveCache(None, totals, obj, x, params)
    terms = regularisers_forward(cache, obj.forms, valid_mask=regmask, batch_shape=batch_shape,
                                 ortho_eps=obj.ortho_eps, totals={t: totals[t] for t in forms})
    values = {t: v for t, (v, _) in terms.items()}
    ocache = ObjectiveCache(obj, y, cache, values, {t: c for t, (_, c) in terms.items()})
    return y, GlobalObjectiveCache(ocache, totals, obj, x, params)


def global_objective_backward(dy, gcache: GlobalObjectiveCache, *, task_loss=None,
                              per_term: bool = True) -> ObjectiveResult:
    """Rank r's slice of the gradients of the global-batch objective, from dy [N_r, D] (the gradient of the rank's
    share of the global task loss, or None) and the forward's cache. No communication.

    Returns ``ObjectiveResult(y, cache, losses, grads)`` as ``refmoe.objective_backward`` does: ``losses`` are
    the rank's shares (adding up over the ranks to the global batch's values), ``grads[term][name]`` the
    gradient of the global objective's term on this rank's x and its replica of each parameter. On a rank with
    no token: y [0, D], cache None, shares 0, every gradient 0 (x's [0, D]).
    """
    if not isinstance(gcache, GlobalObjectiveCache):
        raise TypeError(f"gcache must be what global_objective_forward returned, got {type(gcache).__name__}")
    if gcache.ocache is not None:
        return objective_backward(dy, gcache.ocache, task_loss=task_loss, per_term=per_term)
    x, params, obj = gcache.x, gcache.params, gcache.obj
    xp = array_namespace(x)
    zero = xp.zeros((), dtype=x.dtype)
    losses = {t: zero.copy() for t in obj.forms}
    losses.update(task=task_loss, regularisers=zero.copy(), total=zero.copy() if task_loss is None else task_loss)
    names = ["task", *obj.forms, "total"] if per_term else ["total"]
    grads = {t: {"x": xp.zeros_like(x), **{k: xp.zeros_like(v) for k, v in params.items()}} for t in names}
    return ObjectiveResult(xp.zeros_like(x), None, losses, grads)                # y [0, D]


def global_objective_forward_backward(comm, x, params: dict, cfg: MoEConfig, dy=None, objective="paper", *,
                                      task_loss=None, valid_mask=None, batch_shape=None, per_term: bool = True,
                                      forward=None) -> ObjectiveResult:
    """:func:`global_objective_forward` then :func:`global_objective_backward`; arguments as there."""
    _, gcache = global_objective_forward(comm, x, params, cfg, objective, valid_mask=valid_mask,
                                         batch_shape=batch_shape, forward=forward)
    return global_objective_backward(dy, gcache, task_loss=task_loss, per_term=per_term)
