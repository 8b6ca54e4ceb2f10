r"""The three regularisers of an objective on the fast layer's outputs, forward and backward in one call,
without the per-loss input checks (``refmoe.fast.objective_step`` validates once, at its boundary).

Dimension letters: N tokens, D model width, E routed experts, K top-k, B sequences of T tokens.

Each function returns ``(value, gradient, ok)``: the unweighted loss (0-d), the gradient of ``coef * loss``
on the intermediate it reads (d_scores [N, E] or d_expert_out [N, K, D]), and a 0-d bool array (or None)
that is False where this fast form does not reproduce ``refmoe.losses`` and the caller must fall back (read
once per step with the others). The formulas are those of ``refmoe.losses.aux`` / ``variance`` / ``ortho``
(their weight builders and variance forms are called directly); L_o differs in how it is computed:

* ``pairwise`` from one batched Gram matrix G = A A^T [N, K, K], kept for the backward, whose gradient is one
  batched product: dA = 2 g (M + M^T + diag(q w')) A (``refmoe.losses.ortho.pairwise_backward``). It runs the
  formula as written; ``ok`` says every slot's scale is inside ``refmoe.losses.ortho.PLAIN_RANGE`` (checked
  from the norms on the diagonal of G, conservatively), where ``refmoe.losses.ortho`` runs the same formula.
* ``span`` by the kernels of ``refmoe.fast.kernels`` (the released Gram-Schmidt on the full [N, K, D]
  vectors, all K runs of a token in one pass, no Gram matrix).
"""
from __future__ import annotations

from .. import ops
from ..backend import array_namespace
from ..losses.aux import AUX_VARIANTS, AuxInputs, routing_map
from ..losses.ortho import PLAIN_RANGE
from ..losses.variance import VAR_VARIANTS
from . import kernels as kn
from .blas import matmul as mm
from .layer import expert_ranks


def aux(scores, topk_idx, form: str, coef: float, valid, batch_shape):
    """L_aux in form ``form`` (``refmoe.losses.aux``).  scores [N, E], topk_idx [N, K], valid [N] 0/1 floats."""
    xp = array_namespace(scores)
    spec = AUX_VARIANTS[form]
    E = scores.shape[1]
    counted = topk_idx[:, :1] if spec.first_choice_only else topk_idx               # [N, K] or [N, 1]
    routed = routing_map(counted, E, scores.dtype, xp)                              # [N, E]
    w = spec.weights(AuxInputs(routed, valid, E, counted.shape[1], batch_shape, xp))   # [N, E]
    topk_cache = None
    if spec.on_topk_scores:
        (q, _), topk_cache = ops.topk_scores_forward(scores, topk_idx)
    else:
        q = scores
    d_scores = w * scores.dtype.type(coef)                                          # [N, E]
    if topk_cache is not None:
        d_scores = ops.topk_scores_backward(d_scores, topk_cache)
    return (w * q).sum(), d_scores, None


def var(scores, topk_idx, form: str, coef: float, valid):
    """L_v in form ``form`` (``refmoe.losses.variance``)."""
    spec = VAR_VARIANTS[form]
    topk_cache = None
    if spec.reads == "P":
        q = scores
    else:
        (S, s_sel), topk_cache = ops.topk_scores_forward(scores, topk_idx)
        q = S if spec.reads == "S" else s_sel
    loss, dq = spec.loss(q, valid, valid.sum())
    dq = dq * scores.dtype.type(coef)
    if spec.reads == "S":
        dq = ops.topk_scores_backward(dq, topk_cache)
    elif spec.reads == "s_sel":
        dq = ops.topk_scores_backward(None, topk_cache, d_s_sel=dq)
    return loss, dq, None


# ----------------------------------------------------------------------------------------------
# L_o
# ----------------------------------------------------------------------------------------------

def pairwise(A, coef: float, eps: float, valid):
    r"""L_o ``pairwise``: sum_i valid_i sum_{j != k} G_jk^2 w_k, w_k = G_kk / (G_kk + eps)^2.  A: [N, K, D].

    .. math:: \frac{\partial}{\partial A} = 2 g\,(M + M^T + \mathrm{diag}(q\, w'))\, A,\quad
              M_{jk} = [j \ne k] G_{jk} w_k,\ q_k = \sum_{j \ne k} G_{jk}^2,\ w'_k = (\epsilon - G_{kk}) / (G_{kk} + \epsilon)^3
    """
    xp = array_namespace(A)
    N, K, D = A.shape
    G = mm(xp, A, A.swapaxes(1, 2))                                                 # [N, K, K]
    nrm = xp.diagonal(G, axis1=1, axis2=2)                                          # [N, K] ||x_k||^2
    den = nrm + eps
    den = den + (den <= 0).astype(A.dtype)
    w = nrm / (den * den)                                                           # [N, K]
    off = 1.0 - xp.eye(K, dtype=A.dtype)                                            # [K, K]
    loss = (valid * (G * G * w[:, None, :] * off).sum(axis=(1, 2))).sum()
    M = G * w[:, None, :] * off                                                     # [N, K, K]
    q = (G * G * off).sum(axis=1)                                                   # [N, K]
    dw = (eps - nrm) / (den * den * den)                                            # [N, K]
    Cm = M + M.swapaxes(1, 2) + xp.eye(K, dtype=A.dtype) * (q * dw)[:, :, None]     # [N, K, K]
    g = valid * A.dtype.type(coef)                                                  # [N]
    dA = mm(xp, (2.0 * g)[:, None, None] * Cm, A)                                   # [N, K, D]
    # max|x| lies in [||x|| / sqrt(D), ||x||]: inside PLAIN_RANGE for sure when these bounds are
    lo, hi = PLAIN_RANGE[A.dtype.name]
    ok = ((nrm >= lo * lo * D) & (nrm <= hi * hi)).all()
    return loss, dA, ok


def span(A, coef: float, eps: float, weights):
    """L_o ``span`` = sum_i weights_i span_i(A) by the kernels.  A: [N, K, D], weights [N]."""
    xp = array_namespace(A)
    if A.shape[1] == 1:                                                             # no other slot
        return xp.zeros((), dtype=A.dtype), xp.zeros_like(A), None
    per_token, dA = kn.span_backward(xp, weights * A.dtype.type(coef), A, eps)     # [N], [N, K, D]
    return (weights * per_token).sum(), dA, None


def code_grouping_order(topk_idx, n_experts: int):
    """``refmoe.losses.ortho.code_grouping_order`` without a mask, a sort or a host read: flat row r sits at
    position start_e + rank_r of the expert-major stack; the inverse permutation.  topk_idx [N, K] -> [N*K]."""
    xp = array_namespace(topk_idx)
    flat, rank, counts = expert_ranks(topk_idx, n_experts)                          # [A], [A], [E]
    position = (xp.cumsum(counts) - counts)[flat] + rank                            # [A]
    order = xp.empty_like(position)
    order[position] = xp.arange(flat.shape[0], dtype=position.dtype)                # a permutation: exact
    return order


def ortho(A, form: str, coef: float, eps: float, valid, topk_idx, n_experts: int):
    """L_o in form ``form``; ``span_code_grouping`` only with every token valid (the caller sees to it)."""
    xp = array_namespace(A)
    N, K, D = A.shape
    if form == "pairwise":
        return pairwise(A, coef, eps, valid)
    if form == "span":
        return span(A, coef, eps, valid / (K * valid.sum()))
    order = code_grouping_order(topk_idx, n_experts)                                         # [N*K]
    grouped = A.reshape(-1, D)[order].reshape(N, K, D)
    loss, d_grouped, ok = span(grouped, coef, eps, xp.full(N, 1.0 / (K * N), dtype=A.dtype))
    dA = xp.empty((N * K, D), dtype=A.dtype)
    dA[order] = d_grouped.reshape(-1, D)                                            # a permutation: exact
    return loss, dA.reshape(N, K, D), ok

