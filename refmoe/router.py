r"""The router: scoring -> selection -> gates, each a forward/backward pair, and their composition.

Dimension letters: N tokens, D model width, E routed experts, K experts selected per token.

.. math::

    z = x W_r^T                                   \quad [N, E]\ \text{logits}
    P = \mathrm{softmax}(z)                       \quad [N, E]\ \text{scores, before top-k}
    T_i = \mathrm{top\text{-}k}(P_i)              \quad [N, K]\ \text{ties: lower expert index wins}
    g_{ik} = P_{i,T_{ik}}\ (/ \textstyle\sum_l P_{i,T_{il}} \text{ when norm\_topk\_prob})   \quad [N, K]

The selection is piecewise constant: ``topk_idx`` has zero gradient. Losses that read the scores (L_aux, L_v)
inject their gradient ``d_scores`` [N, E] into :func:`router_backward`, which adds it to the gradient that flows
back from the gates. Derivations: ``theory/gradients.md``.
"""
from __future__ import annotations

from typing import NamedTuple

from . import ops


class RouterCache(NamedTuple):
    """What :func:`router_backward` needs; the first fields are what a reader wants to see."""
    logits: object          # [N, E]   x W_r^T
    scores: object          # [N, E]   full softmax P
    topk_idx: object        # [N, K]   int64, descending score
    gates: object           # [N, K]   combine weights (renormalised when norm_topk_prob)
    linear: ops.LinearCache
    gather: ops.GatherCache
    renorm: ops.RenormCache | None   # None when the gates are the raw selected scores


# ----------------------------------------------------------------------------------------------
# scoring:  logits -> scores
# ----------------------------------------------------------------------------------------------

def score_forward(logits):
    """P = softmax(logits) over the experts.  logits: [N, E] -> (scores [N, E], cache)."""
    return ops.softmax_forward(logits)


def score_backward(d_scores, scores):
    """d_logits [N, E] from d_scores [N, E] (the softmax Jacobian-vector product)."""
    return ops.softmax_backward(d_scores, scores)


# ----------------------------------------------------------------------------------------------
# selection (no gradient)
# ----------------------------------------------------------------------------------------------

def select_topk(scores, top_k: int):
    """topk_idx [N, K] int64: the K largest scores of each row, descending; the lower index wins a tie."""
    return ops.topk_indices(scores, top_k)


# ----------------------------------------------------------------------------------------------
# gates:  scores, topk_idx -> g
# ----------------------------------------------------------------------------------------------

def gates_forward(scores, topk_idx, norm_topk_prob: bool):
    """g [N, K]: the selected scores, renormalised to sum 1 per token when ``norm_topk_prob``."""
    sel, gather = ops.gather_forward(scores, topk_idx)             # [N, K]
    if not norm_topk_prob:
        return sel, (gather, None)
    gates, renorm = ops.renorm_forward(sel)                        # [N, K]
    return gates, (gather, renorm)


def gates_backward(d_gates, cache):
    """d_scores [N, E] from d_gates [N, K] (zero off the selected experts)."""
    gather, renorm = cache
    d_sel = d_gates if renorm is None else ops.renorm_backward(d_gates, renorm)   # [N, K]
    return ops.gather_backward(d_sel, gather)


# ----------------------------------------------------------------------------------------------
# the router: the three pieces in order
# ----------------------------------------------------------------------------------------------

def router_forward(x, w_router, top_k: int, norm_topk_prob: bool):
    """x: [N, D], w_router: [E, D] -> ((topk_idx [N, K], gates [N, K]), RouterCache)."""
    logits, linear = ops.linear_forward(x, w_router)               # [N, E]
    scores, _ = score_forward(logits)                               # [N, E]
    topk_idx = select_topk(scores, top_k)                           # [N, K]
    gates, (gather, renorm) = gates_forward(scores, topk_idx, norm_topk_prob)   # [N, K]
    return (topk_idx, gates), RouterCache(logits, scores, topk_idx, gates, linear, gather, renorm)


def router_backward(d_gates, cache: RouterCache, d_scores=None):
    """(dx [N, D], dw_router [E, D]) from d_gates [N, K] and an optional injected d_scores [N, E]."""
    d_scores_gates = gates_backward(d_gates, (cache.gather, cache.renorm))          # [N, E]
    d_scores = d_scores_gates if d_scores is None else d_scores_gates + d_scores    # fan-in of the scores
    d_logits = score_backward(d_scores, cache.scores)                               # [N, E]
    return ops.linear_backward(d_logits, cache.linear)
