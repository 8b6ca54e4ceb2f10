r"""The variance loss L_v on routing scores, in its three published forms, as one forward/backward pair.

Dimension letters: N tokens, E routed experts (``n`` in the paper), K selected experts per token.
Every form is returned as a quantity to MINIMISE, i.e. minus a variance, so that gradient descent raises
the variance (the method wants confident, uneven routing).

Variants (``theory/losses.md`` has the derivations and the definitions they follow):

``paper``  (Eq. 7) column-wise over tokens on the post-top-k matrix S (rows renormalised to sum 1):

.. math:: L_v = -\frac{1}{E}\sum_{i}\sum_{j} (s_{ij} - \bar s_j)^2,\qquad \bar s_j = \frac{1}{N}\sum_i s_{ij}

          Identity: :math:`\sum_{ij}(s_{ij}-\bar s_j)^2 = \sum_{ij}s_{ij}^2 - N\sum_j \bar s_j^2`.
          Exact gradient :math:`\partial L_v/\partial s_{ij} = -\frac{2}{E}(s_{ij}-\bar s_j)`; the paper's
          Eq. 9 carries a spurious extra factor (N-1)/N (see :func:`paper_eq9_gradient`).

``code``   the authors' released code: minus the token mean of the unbiased (divisor E - 1) variance across
           all E experts of the full softmax P, before top-k:

.. math:: L_v = -\frac{1}{N}\sum_i \frac{1}{E-1}\sum_j (P_{ij} - \bar P_i)^2,\qquad \bar P_i = \frac1E\sum_j P_{ij}

``row_topk`` (the notion of Lemma 1) minus the token mean of the population variance (divisor K) of the K
           non-zero entries :math:`s_{ik}` of row i of S:

.. math:: L_v = -\frac{1}{N}\sum_i \frac{1}{K}\sum_k (s_{ik} - m_i)^2,\qquad m_i = \frac1K\sum_k s_{ik}

``valid_mask`` (True = real token) drops padding tokens from every sum and mean; N is then the number of
valid tokens. The released code has no mask (it averages over padding too): pass ``valid_mask=None`` to
reproduce it.

Global batch (data parallelism): every form reads the batch through sums over its tokens, the ``totals``
of :func:`var_loss_totals` (the number of valid tokens N; for ``paper`` also the column sums of S, from which
sbar_j comes). Passed summed over the ranks, they make each rank's loss its share of the loss of the
concatenated batch and d_scores that loss's gradient on the rank's scores. For ``paper`` this is not the
gradient of the rank's share alone: sbar_j depends on every rank's scores, and its terms cancel only in the
sum over the whole batch (the global deviations sum to zero), which leaves -(2/E)(s_ij - sbar_j) with the
global sbar_j.

The backward returns ``d_scores`` [N, E] on the full softmax; for ``paper`` and ``row_topk`` it goes through
the renormalisation S(P, T) with the top-k sets T held fixed (they are piecewise constant: zero gradient).

Numerics: ``paper`` accumulates its column sums over the N tokens in float64 before it centres (two-pass);
in float32, 50,000 near-identical tokens (s = 0.6 + 1e-5 noise) then give the float64 value to 3e-4 and
d_scores to 7e-4 relative, the size of S's own float32 rounding (tests/test_numerics.py; it was 555x off).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import ops
from ..backend import array_namespace
from ..checks import (all_finite, check_dloss, check_mask, check_scores, check_topk, check_totals, mask_weights,
                      not_finite_error)

class VarCache(NamedTuple):
    variant: str
    dq: object            # d loss / d Q for dloss = 1: [N, E] on S or P, or [N, K] on the selected s
    topk_cache: object    # ops.TopkScoresCache for ``paper`` / ``row_topk``, None for ``code``


# ----------------------------------------------------------------------------------------------
# the three forms: each returns (loss, dloss/dQ) with Q the tensor the form reads
# ----------------------------------------------------------------------------------------------

def column_sums(S, valid):
    """[E] sum over valid tokens of S [N, E], accumulated in float64."""
    return (valid[:, None] * S).sum(axis=0, dtype=np.float64)


def _paper(S, valid, n_valid, sums=None):
    """Numerics: the column sums over N tokens accumulate in float64 (a float32 axis-0 sum is sequential:
    its error grows like N and, for near-identical tokens, swamps the deviations), then round to S's dtype.
    ``sums`` [E] and ``n_valid``: the global batch's when given (then sbar_j is the global column mean)."""
    E = S.shape[1]
    if sums is None:
        sums = column_sums(S, valid)                            # [E]   float64 accumulation
    sbar = (sums / n_valid.astype(np.float64)).astype(S.dtype)  # [E]   column means over valid tokens
    dev = valid[:, None] * (S - sbar[None, :])                   # [N, E] two-pass: centre first
    loss = -(dev * dev).sum() / E
    return loss, (-2.0 / E) * dev                                # mean-dependence terms sum to zero


def _code(P, valid, n_valid, sums=None):
    E = P.shape[1]
    pbar = P.mean(axis=1, keepdims=True)                         # [N, 1] row means
    dev = P - pbar                                               # [N, E]
    var_i = (dev * dev).sum(axis=1) / (E - 1)                    # [N]   unbiased row variance
    loss = -(valid * var_i).sum() / n_valid
    return loss, (-2.0 / (E - 1)) * (valid / n_valid)[:, None] * dev


def _row_topk(s_sel, valid, n_valid, sums=None):
    K = s_sel.shape[1]
    m = s_sel.mean(axis=1, keepdims=True)                        # [N, 1]
    dev = s_sel - m                                              # [N, K]
    var_i = (dev * dev).sum(axis=1) / K                          # [N]   population variance of the K entries
    loss = -(valid * var_i).sum() / n_valid
    return loss, (-2.0 / K) * (valid / n_valid)[:, None] * dev


class VarVariant(NamedTuple):
    loss: object            # (Q, valid [N], n_valid, sums [E] or None) -> (loss, dloss/dQ)
    reads: str              # Q: "P" the full softmax [N, E], "S" the post-top-k matrix [N, E], "s_sel" its [N, K]


VAR_VARIANTS: dict[str, VarVariant] = {
    "paper": VarVariant(_paper, "S"),
    "code": VarVariant(_code, "P"),
    "row_topk": VarVariant(_row_topk, "s_sel"),
}


# ----------------------------------------------------------------------------------------------
# forward / backward
# ----------------------------------------------------------------------------------------------

def _var_inputs(scores, topk_idx, variant, valid_mask, allow_all_padding):
    """(valid [N], q, topk_cache) of a form on one batch, after the checks."""
    if variant not in VAR_VARIANTS:
        raise ValueError(f"variant={variant!r} is not an L_v form; expected one of {list(VAR_VARIANTS)}")
    xp = check_scores(scores)
    N, E = scores.shape
    check_topk(topk_idx, N, E, xp)
    mask = check_mask(valid_mask, N, xp, allow_all_padding=allow_all_padding)
    if variant == "code" and E < 2:
        raise ValueError(f"variant='code' needs n_experts >= 2 for an unbiased variance, got E={E}")
    valid = mask_weights(mask, N, scores.dtype, xp)                            # [N]
    form = VAR_VARIANTS[variant]
    topk_cache = None
    if form.reads == "P":
        q = scores                                                           # [N, E]
    else:
        (S, s_sel), topk_cache = ops.topk_scores_forward(scores, topk_idx)   # [N, E], [N, K]
        q = S if form.reads == "S" else s_sel
    return valid, q, topk_cache


def var_loss_totals(scores, topk_idx, variant: str = "paper", *, valid_mask=None):
    """The sums over this batch that ``variant`` reads, a float64 array on the scores' backend: ``paper`` [E + 1],
    the column sums of S over valid tokens then their number N; ``code`` and ``row_topk`` [1], N. Summed over
    the ranks of a data-parallel group and passed to ``var_loss_forward(..., totals=)``."""
    valid, q, _ = _var_inputs(scores, topk_idx, variant, valid_mask, allow_all_padding=True)
    n_valid = valid.sum(dtype=np.float64).reshape(1)
    if variant == "paper":
        return array_namespace(q).concatenate([column_sums(q, valid), n_valid])
    return n_valid


def var_loss_forward(scores, topk_idx, variant: str = "paper", *, valid_mask=None, totals=None):
    """L_v from the layer's softmax scores [N, E] and top-k indices [N, K] (both from ``MoECache``).

    variant     one of VAR_VARIANTS (see the module docstring)
    valid_mask  optional [N] bool, True = real token; padding is excluded from every sum and mean
    totals      None, or the form's sums over a whole global batch (:func:`var_loss_totals` summed over the
                ranks); the loss is then this batch's share of the global batch's (this batch may be all padding)
    Returns (loss, cache); loss is a 0-d array on the scores' backend and dtype (minus a variance).
    ``topk_idx`` is checked for every variant, though ``code`` does not read it.
    """
    valid, q, topk_cache = _var_inputs(scores, topk_idx, variant, valid_mask, totals is not None)
    n_valid, sums = valid.sum(), None
    if totals is not None:
        xp = array_namespace(scores)
        totals = check_totals(totals, (scores.shape[1] + 1,) if variant == "paper" else (1,), xp,
                              "var_loss_totals")
        n_valid = totals[-1].astype(scores.dtype)
        sums = totals[:-1] if variant == "paper" else None
    loss, dq = VAR_VARIANTS[variant].loss(q, valid, n_valid, sums)
    return loss, VarCache(variant, dq, topk_cache)


def var_loss_backward(dloss, cache: VarCache):
    """d_scores [N, E]: the gradient of ``dloss * L_v`` with respect to the full softmax scores.

    dloss  a finite real number or 0-d array (cast to the cache's dtype); anything else raises
    The top-k indices are piecewise constant in the scores: their gradient is zero and is not returned.
    Numerics: ValueError naming ``dloss`` when dloss times the gradient overflows.
    """
    dloss = check_dloss(dloss, cache.dq)
    dq = cache.dq * dloss
    reads = VAR_VARIANTS[cache.variant].reads
    if reads == "P":
        d_scores = dq                                            # Q = P itself
    elif reads == "S":
        d_scores = ops.topk_scores_backward(dq, cache.topk_cache)    # dS [N, E] -> d_scores
    else:
        d_scores = ops.topk_scores_backward(None, cache.topk_cache, d_s_sel=dq)   # d_s_sel [N, K] -> d_scores
    if not all_finite(array_namespace(d_scores), d_scores):
        raise not_finite_error(f"d_scores of L_v ({cache.variant})", {"dloss": dloss}, d_scores.dtype)
    return d_scores


# ----------------------------------------------------------------------------------------------
# the gradient the paper prints (Eq. 9/10), for comparison only
# ----------------------------------------------------------------------------------------------

def paper_eq9_gradient(S, valid_mask=None):
    r"""The derivative of Eq. 7 as the paper states it (Eq. 9/10, with gamma = 1), on S [N, E]:

    .. math:: -\frac{2(N-1)}{E N}(s_{ij} - \bar s_j)

    Not used by any backward: the exact derivative is :math:`-\frac{2}{E}(s_{ij}-\bar s_j)` (what
    ``var_loss_backward`` returns before the chain through S); the two differ by the factor (N-1)/N exactly.
    """
    xp = check_scores(S, name="S")
    N, E = S.shape
    mask = check_mask(valid_mask, N, xp)
    valid = mask_weights(mask, N, S.dtype, xp)
    n = valid.sum()
    sbar = (valid[:, None] * S).sum(axis=0) / n
    return (-2.0 / E) * ((n - 1) / n) * valid[:, None] * (S - sbar[None, :])
