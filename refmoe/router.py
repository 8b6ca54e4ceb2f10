r"""The router: scoring -> selection -> gates, each a forward/backward pair, and their composition.

Dimension letters: N tokens, D model width, E routed experts, K experts selected per token.

.. math::

    z = x W_r^T                                   \quad [N, E]\ \text{logits}
    P = \mathrm{softmax}(z)\ \text{or}\ \sigma(z) \quad [N, E]\ \text{scores, before top-k}
    T_i = \mathrm{top\text{-}k}(z_i)              \quad [N, K]\ \text{ties: lower expert index wins}
    g_{ik} = P_{i,T_{ik}}\ (/ \textstyle\sum_l P_{i,T_{il}} \text{ when norm\_topk_prob})   \quad [N, K]

Ranking the logits selects what ranking the scores would (softmax and sigmoid are increasing), and stays right
where float32 scores underflow to equal values. The selection is piecewise constant: ``topk_idx`` has zero
gradient. Losses that read the scores (L_aux, L_v) inject their gradient ``d_scores`` [N, E] into
:func:`router_backward`, which adds it to the gradient that flows back from the gates. Derivations:
``theory/gradients.md``.

The layer runs :func:`routing_forward` / :func:`routing_backward` on its logits, with the options of
``MoEConfig`` (sigmoid scores, a selection-only bias, group-limited selection, renormalisation only when K > 1,
an eps in the denominator, a scaling factor, Megatron's softmax over the selected logits); capacity dropping
(:mod:`refmoe.router_capacity`) follows it in the layer. With the default config it computes exactly what
:func:`router_forward` (softmax -> top-k -> optional renormalisation, kept as the shortest reading of the paper's
router) computes, bit for bit. docs/spec.md section 7 gives each system's pseudo-code, ``refmoe.systems`` the
presets.
"""
from __future__ import annotations

from typing import NamedTuple

from . import ops
from .backend import array_namespace
from .router_select import check_top_k, select_group_limited

SCORE_FUNCTIONS = ("softmax", "sigmoid")
RENORM_MODES = ("always", "k_gt_1", "never")


class RouterCache(NamedTuple):
    """What :func:`router_backward` needs; the first fields are what a reader wants to see."""
    logits: object          # [N, E]   x W_r^T
    scores: object          # [N, E]   full softmax P
    topk_idx: object        # [N, K]   int64, descending logit
    gates: object           # [N, K]   combine weights (renormalised when norm_topk_prob)
    linear: ops.LinearCache
    gather: ops.GatherCache
    renorm: ops.RenormCache | None   # None when the gates are the raw selected scores


# ----------------------------------------------------------------------------------------------
# scoring:  logits -> scores
# ----------------------------------------------------------------------------------------------

class ScoreCache(NamedTuple):
    scores: object          # [N, E]
    score_function: str     # "softmax" or "sigmoid"


def score_forward(logits, score_function: str = "softmax"):
    r"""Scores P [N, E] from logits z [N, E]; returns (P, ScoreCache).

    .. math:: \text{softmax: } P_{ij} = e^{z_{ij}} / \textstyle\sum_l e^{z_{il}} \qquad
              \text{sigmoid: } P_{ij} = \sigma(z_{ij}) = 1 / (1 + e^{-z_{ij}})

    softmax: Mixtral, Qwen, OLMoE, DeepSeek-V2, Megatron's default; sigmoid: DeepSeek-V3, Megatron
    ``score_function="sigmoid"`` (each score on its own, rows do not sum to 1).
    Numerics: softmax is max-shifted; sigmoid is ``expit`` (no overflow for large |z|).
    """
    if score_function == "softmax":
        scores, _ = ops.softmax_forward(logits)
    elif score_function == "sigmoid":
        scores = ops.sigmoid(logits)
    else:
        raise ValueError(f"score_function={score_function!r}; expected one of {SCORE_FUNCTIONS}")
    return scores, ScoreCache(scores, score_function)


def score_backward(d_scores, cache: ScoreCache):
    r"""d_logits [N, E] from d_scores [N, E].

    .. math:: \text{softmax: } dz_{ij} = P_{ij}(dP_{ij} - \textstyle\sum_l dP_{il} P_{il}) \qquad
              \text{sigmoid: } dz_{ij} = dP_{ij}\, P_{ij} (1 - P_{ij})
    """
    scores, score_function = cache
    if score_function == "softmax":
        return ops.softmax_backward(d_scores, scores)
    return d_scores * scores * (1 - scores)


# ----------------------------------------------------------------------------------------------
# selection (no gradient)
# ----------------------------------------------------------------------------------------------

def select_topk(logits, top_k: int):
    """topk_idx [N, K] int64: the K largest logits of each row, descending; the lower index wins a tie.

    Pass the logits, not the scores: softmax and sigmoid are increasing, so the experts chosen are those of the
    scores wherever the scores differ, and stay right where float32 scores underflow to equal values (logits
    (200, 0, 10, 50), K = 2: softmax scores (1, 0, 0, 0) in float32, the logits select [0, 3]).
    Any other [N, E] array (scores + bias) is ranked the same way; for groups see
    :func:`refmoe.router_select.select_group_limited`. Zero gradient.
    """
    check_top_k(top_k, logits.shape[-1])
    return ops.topk_indices(logits, top_k)


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


class GateCache(NamedTuple):
    gates: object                   # [N, K]  scale * w
    w: object                       # [N, K]  the (renormalised) selected scores, before the scale
    denom: object | None            # [N, 1]  sum_l sel_il + eps, None when not renormalised
    scale: float
    gather: ops.GatherCache


def gate_weights_forward(scores, topk_idx, *, renorm: str = "always", scale: float = 1.0, eps: float = 0.0):
    r"""Gates g [N, K] from scores P [N, E] and topk_idx [N, K] (the general form of :func:`gates_forward`).

    .. math:: s_{ik} = P_{i,T_{ik}}, \qquad
              w_{ik} = s_{ik} / (\textstyle\sum_l s_{il} + \epsilon) \text{ if renormalised, else } s_{ik},
              \qquad g_{ik} = \text{scale}\cdot w_{ik}

    renorm  "always"; "k_gt_1" (renormalise only when K > 1: at K = 1 the raw score is kept, as the DeepSeek
            MoEGate and Megatron's sigmoid path do); "never" (DeepSeek-V2, pre-softmax Megatron)
    scale   routed_scaling_factor / moe_router_topk_scaling_factor, applied after the normalisation
    eps     added to the denominator: 1e-20 in DeepSeek-V3 (HF) and Megatron's sigmoid path, 0 elsewhere
    Numerics: eps is cast to the scores' dtype (1e-20 is a float32 normal number).
    """
    if renorm not in RENORM_MODES:
        raise ValueError(f"renorm={renorm!r}; expected one of {RENORM_MODES}")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")
    sel, gather = ops.gather_forward(scores, topk_idx)                     # [N, K]
    denom = None
    if renorm == "always" or (renorm == "k_gt_1" and topk_idx.shape[1] > 1):
        denom = sel.sum(axis=1, keepdims=True) + sel.dtype.type(eps)      # [N, 1]
        w = sel / denom                                                    # [N, K]
    else:
        w = sel
    gates = w * scale if scale != 1.0 else w                               # [N, K]
    return gates, GateCache(gates, w, denom, scale, gather)


def gate_weights_backward(d_gates, cache: GateCache):
    r"""d_scores [N, E] from d_gates [N, K]; zero off the selected experts.

    .. math:: dw = \text{scale}\cdot dg, \qquad
              ds_{ik} = (dw_{ik} - \textstyle\sum_l dw_{il} w_{il}) / (\sum_l s_{il} + \epsilon)
              \text{ if renormalised, else } dw_{ik}
    """
    dw = d_gates * cache.scale if cache.scale != 1.0 else d_gates           # [N, K]
    if cache.denom is None:
        d_sel = dw
    else:
        d_sel = (dw - (dw * cache.w).sum(axis=1, keepdims=True)) / cache.denom   # [N, K]
    return ops.gather_backward(d_sel, cache.gather)                          # [N, E]


class TopkSoftmaxCache(NamedTuple):
    w: object                       # [N, K]  softmax of the selected logits, before the scale
    scale: float
    gather: ops.GatherCache


def topk_softmax_gates_forward(logits, topk_idx, *, scale: float = 1.0):
    r"""Gates g [N, K] as Megatron's default softmax path has them: a softmax over the K selected LOGITS.

    .. math:: g_{ik} = \text{scale}\cdot e^{z_{i,T_{ik}}} / \textstyle\sum_l e^{z_{i,T_{il}}}

    Equal to ``gate_weights_forward(softmax(z), T, renorm="always", scale=scale)`` up to rounding (the full
    softmax's denominator cancels). logits [N, E], topk_idx [N, K] -> (g [N, K], TopkSoftmaxCache).
    Numerics: max-shifted over the K selected logits.
    """
    sel, gather = ops.gather_forward(logits, topk_idx)                     # [N, K]
    w, _ = ops.softmax_forward(sel)                                        # [N, K]
    gates = w * scale if scale != 1.0 else w                               # [N, K]
    return gates, TopkSoftmaxCache(w, scale, gather)


def topk_softmax_gates_backward(d_gates, cache: TopkSoftmaxCache):
    r"""d_logits [N, E] from d_gates [N, K]: dz_{i,T_{ik}} = w_{ik}(dw_{ik} - \sum_l dw_{il} w_{il}), dw = scale dg;
    zero off the selected experts."""
    dw = d_gates * cache.scale if cache.scale != 1.0 else d_gates           # [N, K]
    return ops.gather_backward(ops.softmax_backward(dw, cache.w), cache.gather)   # [N, E]


# ----------------------------------------------------------------------------------------------
# the paper's router: the three pieces in order (equal to routing_forward with the default config)
# ----------------------------------------------------------------------------------------------

def router_forward(x, w_router, top_k: int, norm_topk_prob: bool):
    """x: [N, D], w_router: [E, D] -> ((topk_idx [N, K], gates [N, K]), RouterCache)."""
    logits, linear = ops.linear_forward(x, w_router)               # [N, E]
    scores, _ = score_forward(logits)                               # [N, E]
    topk_idx = select_topk(logits, top_k)                           # [N, K]
    gates, (gather, renorm) = gates_forward(scores, topk_idx, norm_topk_prob)   # [N, K]
    return (topk_idx, gates), RouterCache(logits, scores, topk_idx, gates, linear, gather, renorm)


def router_backward(d_gates, cache: RouterCache, d_scores=None):
    """(dx [N, D], dw_router [E, D]) from d_gates [N, K] and an optional injected d_scores [N, E]."""
    d_scores_gates = gates_backward(d_gates, (cache.gather, cache.renorm))          # [N, E]
    d_scores = d_scores_gates if d_scores is None else d_scores_gates + d_scores    # fan-in of the scores
    d_logits = score_backward(d_scores, ScoreCache(cache.scores, "softmax"))        # [N, E]
    return ops.linear_backward(d_logits, cache.linear)


# ----------------------------------------------------------------------------------------------
# the general routing step on logits, the layer's router: score -> select -> gates
# ----------------------------------------------------------------------------------------------

class RoutingCache(NamedTuple):
    logits: object          # [N, E]
    scores: object          # [N, E]  softmax or sigmoid
    choice: object          # [N, E]  what the selection ranked (logits or scores, + bias)
    topk_idx: object        # [N, K]  int64
    gates: object           # [N, K]
    score: ScoreCache
    gate: GateCache | TopkSoftmaxCache


def routing_forward(logits, top_k: int, *, score_function: str = "softmax", select_on: str = "logits",
                    bias=None, n_group: int | None = None, topk_group: int | None = None,
                    group_score: str = "max", renorm: str = "always", scale: float = 1.0, eps: float = 0.0):
    r"""((topk_idx [N, K], gates [N, K]), RoutingCache) from logits [N, E].

    .. math:: P = \mathrm{score}(z), \quad c = (z \text{ or } P) + b, \quad
              T = \text{top-k of } c \text{ (within the kept groups)}, \quad g = \text{gates}(P, T)

    select_on    "logits" (ranks z; the choice of every softmax router without a bias, and Megatron's
                 default softmax path) or "scores" (ranks P: DeepSeek-V2/V3, Megatron sigmoid)
    bias         optional [E] selection-only bias added to the ranked values (DeepSeek-V3
                 ``e_score_correction_bias``, Megatron ``expert_bias``, both on sigmoid scores, select_on="scores");
                 it never enters the gates and has no gradient here
    n_group, topk_group, group_score   group-limited selection (:func:`refmoe.router_select.select_group_limited`)
    renorm, scale, eps                 the gates (:func:`gate_weights_forward`); renorm="topk_softmax" takes
                                       them from the logits instead (:func:`topk_softmax_gates_forward`,
                                       Megatron's default; softmax scoring, eps = 0)
    """
    if select_on not in ("logits", "scores"):
        raise ValueError(f"select_on={select_on!r}; expected 'logits' or 'scores'")
    scores, score = score_forward(logits, score_function)                   # [N, E]
    choice = logits if select_on == "logits" else scores                    # [N, E]
    if bias is not None:
        array_namespace(logits, bias)
        if tuple(bias.shape) != (logits.shape[-1],):
            raise ValueError(f"bias must have shape ({logits.shape[-1]},), got {tuple(bias.shape)}")
        choice = choice + bias                                               # [N, E]
    if n_group is None and topk_group is None:
        topk_idx = select_topk(choice, top_k)                                # [N, K]
    else:
        topk_idx = select_group_limited(choice, top_k, n_group=n_group, topk_group=topk_group,
                                        group_score=group_score)            # [N, K]
    if renorm == "topk_softmax":
        if score_function != "softmax" or eps != 0:
            raise ValueError(f"renorm='topk_softmax' needs score_function='softmax' and eps=0, got "
                             f"score_function={score_function!r}, eps={eps}")
        gates, gate = topk_softmax_gates_forward(logits, topk_idx, scale=scale)                  # [N, K]
    else:
        gates, gate = gate_weights_forward(scores, topk_idx, renorm=renorm, scale=scale, eps=eps)   # [N, K]
    return (topk_idx, gates), RoutingCache(logits, scores, choice, topk_idx, gates, score, gate)


def routing_backward(d_gates, cache: RoutingCache, d_scores=None):
    """d_logits [N, E] from d_gates [N, K] and an optional injected d_scores [N, E] (the bias and the selection
    have zero gradient)."""
    if isinstance(cache.gate, TopkSoftmaxCache):                                     # gates read the logits
        d_logits_gates = topk_softmax_gates_backward(d_gates, cache.gate)            # [N, E]
        if d_scores is None:
            return d_logits_gates
        return d_logits_gates + score_backward(d_scores, cache.score)                # fan-in of the logits
    d_scores_gates = gate_weights_backward(d_gates, cache.gate)                      # [N, E]
    d_scores = d_scores_gates if d_scores is None else d_scores_gates + d_scores     # fan-in of the scores
    return score_backward(d_scores, cache.score)                                     # [N, E]
