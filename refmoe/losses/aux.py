r"""The auxiliary load-balancing loss L_aux, in every published form, as one forward/backward pair.

Every form is linear in a score tensor Q once the counts are fixed:

.. math:: L = \sum_{i,j} W_{ij}\, Q_{ij}

where Q is the full softmax P ("scores", [N, E]) or the post-top-k matrix S of the paper (rows renormalised
over the K selected experts), and W [N, E] depends only on the routing counts c_j, the padding mask and the
batch layout. The counts come from the hard top-k selection, so f (and W) has zero gradient; the backward is
dQ = dL * W, chained through the renormalisation when Q = S. A variant is therefore just a function that
builds W; ``AUX_VARIANTS`` maps names to those builders.

Variants (docs/spec.md, section 2.1):
    paper_eq2       sum_j f_j p_j,  f_j = c_j / N, p_j = sum_i S_ij           balanced value N K / E
    switch          E sum_j f_j Pbar_j, f_j = c_j / N, Pbar_j = mean_i P_ij   balanced value K
    deepseek_batch  sum_j f_j Pbar_j, f_j = E c_j / (N K)                     balanced value 1
    deepseek_seq    deepseek_batch per sequence ([B, T] layout), mean over B  balanced value 1
    megatron_seq    deepseek_seq on Megatron-Core's sequence-major token order, token i = t*B + b
                    (its activations are [T, B, D]); ``sequence_load_balancing_loss_func``  balanced value 1
    gshard_first_choice  switch with f from each token's FIRST choice only (GShard, DeepSpeed top-1/top-2
                    gating, fairseq, Tutel): E sum_j f1_j Pbar_j               balanced value 1
with c_j the number of (valid) tokens routing to expert j and N the number of valid tokens.

Global batch (data parallelism). The weights read the batch only through a few sums over its tokens, the
form's ``totals`` (:func:`aux_loss_totals`): the counts c_j and N for the batch forms, the number of sequences
holding a valid token for the per-sequence forms. A rank of a data-parallel group that passes the sums over
all ranks (``aux_loss_forward(..., totals=)``) gets its share of the loss of the concatenated batch: the shares
add up to it, and each rank's d_scores is that loss's gradient on the rank's own scores (the counts have zero
gradient). ``refmoe.distributed`` does the all-reduce.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .. import ops
from ..backend import array_namespace
from ..checks import (all_finite, check_dloss, check_mask, check_scores, check_topk, check_totals, mask_weights,
                      not_finite_error, resolve_batch_shape)


class AuxInputs(NamedTuple):
    """What a weight builder sees. ``routed``: [N, E] 0/1 routing map; ``valid``: [N] 0/1 floats."""
    routed: object
    valid: object
    n_experts: int
    top_k: int
    batch_shape: tuple | None
    xp: object
    totals: object = None   # the form's sums over the whole global batch (aux_loss_totals); None: this batch's


# ----------------------------------------------------------------------------------------------
# weight builders:  AuxInputs -> W [N, E]
# ----------------------------------------------------------------------------------------------

def _batch_counts(a: AuxInputs):
    if a.totals is not None:                                    # summed over the ranks: the global batch's
        return a.totals[:-1], a.totals[-1]
    counts = (a.valid[:, None] * a.routed).sum(axis=0)        # [E]  c_j over valid tokens
    n_valid = a.valid.sum()                                     # number of valid tokens
    return counts, n_valid


def _batch_totals(a: AuxInputs):
    """[E + 1]: the counts c_j over valid tokens, then the number of valid tokens."""
    counts, n_valid = _batch_counts(a._replace(totals=None))
    return a.xp.concatenate([counts, n_valid.reshape(1)])


def _seq_totals(a: AuxInputs):
    """[1]: the number of sequences holding a valid token (those the mean over B runs over)."""
    B, T = a.batch_shape
    return (a.valid.reshape(B, T).sum(axis=1) > 0).sum(keepdims=True).astype(a.valid.dtype)


def _w_paper_eq2(a: AuxInputs):
    counts, n = _batch_counts(a)
    f = counts / n                                              # [E] proportion of tokens sent to j
    return a.valid[:, None] * f[None, :]                        # p_j sums S over valid tokens


def _w_switch(a: AuxInputs):
    counts, n = _batch_counts(a)
    f = counts / n                                              # [E] sums to K
    return a.valid[:, None] * (a.n_experts * f / n)[None, :]    # E * f_j * mean_i P_ij


def _w_deepseek_batch(a: AuxInputs):
    counts, n = _batch_counts(a)
    f = a.n_experts * counts / (n * a.top_k)                    # [E] 1 at perfect balance
    return a.valid[:, None] * (f / n)[None, :]


def _w_deepseek_seq(a: AuxInputs):
    B, T = a.batch_shape
    E = a.n_experts
    valid = a.valid.reshape(B, T)                               # [B, T]
    routed = a.routed.reshape(B, T, E)                          # [B, T, E]
    counts = (valid[:, :, None] * routed).sum(axis=1)           # [B, E]
    n_seq = valid.sum(axis=1)                                   # [B] valid tokens per sequence
    has = n_seq > 0
    n_safe = a.xp.where(has, n_seq, a.xp.ones_like(n_seq))      # empty sequences get weight 0 below
    f = E * counts / (n_safe[:, None] * a.top_k)                # [B, E]
    n_used = has.sum().astype(valid.dtype) if a.totals is None else a.totals[0]   # sequences in the mean
    w = valid[:, :, None] * (f / n_safe[:, None])[:, None, :] / n_used   # [B, T, E]
    return w.reshape(B * T, E)


def _w_megatron_seq(a: AuxInputs):
    """deepseek_seq on a sequence-major token order: token i = t*B + b."""
    B, T = a.batch_shape
    E = a.n_experts
    routed_bt = a.routed.reshape(T, B, E).transpose(1, 0, 2).reshape(B * T, E)   # [B*T, E] batch-major
    valid_bt = a.valid.reshape(T, B).T.reshape(B * T)                             # [B*T]
    w_bt = _w_deepseek_seq(a._replace(routed=routed_bt, valid=valid_bt))
    return w_bt.reshape(B, T, E).transpose(1, 0, 2).reshape(B * T, E)             # back to [T*B, E]


class AuxVariant(NamedTuple):
    weights: Callable[[AuxInputs], object]
    on_topk_scores: bool        # True: Q = S (post-top-k, renormalised); False: Q = P (full softmax)
    needs_batch_shape: bool
    balanced_value: Callable[[int, int, int], float]   # (N, E, K) -> value at perfect balance
    first_choice_only: bool = False   # True: the counts see only slot 0 of topk_idx (the first choice)
    totals: Callable[[AuxInputs], object] = _batch_totals   # the batch-wide sums the weights read


AUX_VARIANTS: dict[str, AuxVariant] = {
    "paper_eq2": AuxVariant(_w_paper_eq2, True, False, lambda N, E, K: N * K / E),
    "switch": AuxVariant(_w_switch, False, False, lambda N, E, K: float(K)),
    "deepseek_batch": AuxVariant(_w_deepseek_batch, False, False, lambda N, E, K: 1.0),
    "deepseek_seq": AuxVariant(_w_deepseek_seq, False, True, lambda N, E, K: 1.0, totals=_seq_totals),
    "megatron_seq": AuxVariant(_w_megatron_seq, False, True, lambda N, E, K: 1.0, totals=_seq_totals),
    "gshard_first_choice": AuxVariant(_w_switch, False, False, lambda N, E, K: 1.0, first_choice_only=True),
}


# ----------------------------------------------------------------------------------------------
# forward / backward
# ----------------------------------------------------------------------------------------------

class AuxCache(NamedTuple):
    weights: object         # [N, E] W, constant (zero gradient)
    variant: str
    topk_cache: object      # ops.TopkScoresCache when Q = S, else None
    shape: tuple


def routing_map(topk_idx, n_experts: int, dtype, xp):
    """[N, E] 0/1 matrix with a one where expert j is in token i's top-k set."""
    N = topk_idx.shape[0]
    routed = xp.zeros((N, n_experts), dtype=dtype)
    routed[xp.arange(N)[:, None], topk_idx] = 1
    return routed


def _aux_inputs(scores, topk_idx, variant, valid_mask, batch_shape, allow_all_padding):
    """The checked AuxInputs of a form on one batch (totals None)."""
    if variant not in AUX_VARIANTS:
        raise ValueError(f"variant={variant!r} is not an L_aux form; expected one of {sorted(AUX_VARIANTS)}")
    spec = AUX_VARIANTS[variant]
    xp = check_scores(scores)
    N, E = scores.shape
    check_topk(topk_idx, N, E, xp)
    mask = check_mask(valid_mask, N, xp, allow_all_padding=allow_all_padding)
    if spec.needs_batch_shape:
        if batch_shape is None:
            raise ValueError(f"variant={variant!r} needs batch_shape=(B, T)")
        batch_shape = resolve_batch_shape(batch_shape, N)
    valid = mask_weights(mask, N, scores.dtype, xp)                                 # [N]
    counted = topk_idx[:, :1] if spec.first_choice_only else topk_idx              # [N, K] or [N, 1]
    routed = routing_map(counted, E, scores.dtype, xp)                              # [N, E]
    return AuxInputs(routed, valid, E, counted.shape[1], batch_shape, xp)


def aux_loss_totals(scores, topk_idx, variant: str = "switch", *, valid_mask=None, batch_shape=None):
    """The sums over this batch that the weights of ``variant`` read: a float64 [S] array on the scores' backend.

    Batch forms: [E + 1], the counts c_j of the valid tokens then their number N; per-sequence forms: [1], the
    sequences holding a valid token. Summed over the ranks of a data-parallel group (every rank's counts, all
    of them integers, so the sum is exact) and passed to ``aux_loss_forward(..., totals=)``. A rank whose
    tokens are all padding has totals of zeros.
    """
    a = _aux_inputs(scores, topk_idx, variant, valid_mask, batch_shape, allow_all_padding=True)
    return AUX_VARIANTS[variant].totals(a).astype(np.float64)


def aux_loss_forward(scores, topk_idx, variant: str = "switch", *, valid_mask=None, batch_shape=None,
                     totals=None):
    """L_aux from the layer's softmax scores [N, E] and top-k indices [N, K] (both from ``MoECache``).

    variant      one of AUX_VARIANTS (see the module docstring)
    valid_mask   optional [N] bool, True = real token; padding is excluded from counts and means
    batch_shape  (B, T) with B*T = N, token i = b*T + t (``megatron_seq``: i = t*B + b); required by the
                 per-sequence forms
    totals       None, or the form's sums over a whole global batch (:func:`aux_loss_totals` summed over the
                 ranks, [S]); the loss is then this batch's share of the global batch's, and this batch may be
                 all padding
    Returns (loss, cache); loss is a 0-d array on the scores' backend and dtype.
    """
    a = _aux_inputs(scores, topk_idx, variant, valid_mask, batch_shape, allow_all_padding=totals is not None)
    spec, xp = AUX_VARIANTS[variant], a.xp
    if totals is not None:
        totals = check_totals(totals, spec.totals(a).shape, xp, "aux_loss_totals")
        a = a._replace(totals=totals.astype(scores.dtype))
    w = spec.weights(a)
    if spec.on_topk_scores:
        (q, _), topk_cache = ops.topk_scores_forward(scores, topk_idx)
    else:
        q, topk_cache = scores, None
    loss = (w * q).sum()
    return loss, AuxCache(w, variant, topk_cache, scores.shape)


def aux_loss_backward(dloss, cache: AuxCache):
    """d_scores [N, E] = dloss * W (through the top-k renormalisation for ``paper_eq2``).

    dloss  a finite real number or 0-d array (cast to the cache's dtype); anything else raises
    The counts f are piecewise constant in the scores: their gradient is zero and is not returned.
    Numerics: ValueError naming ``dloss`` when dloss * W overflows.
    """
    dloss = check_dloss(dloss, cache.weights)
    dq = cache.weights * dloss                                   # [N, E]
    if cache.topk_cache is not None:
        dq = ops.topk_scores_backward(dq, cache.topk_cache)
    if not all_finite(array_namespace(dq), dq):
        raise not_finite_error("d_scores of L_aux", {"dloss": dloss}, dq.dtype)
    return dq
