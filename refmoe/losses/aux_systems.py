r"""Balancing losses of the routers in ``refmoe.systems`` that differ from the paper's forms in what they read:
DeepSeek-V3's sequence-wise loss on the NORMALISED sigmoid affinities, and Megatron-Core's losses, which count a
fresh plain top-k instead of the layer's selection. One forward/backward pair for all of them.

Dimension letters: N tokens, E routed experts, K top-k, B sequences of T tokens.

Every form is linear in a score matrix Q once the counts are fixed, :math:`L = \sum_{t,j} W_{tj} Q_{tj}`, with W
built by the weight builders of ``refmoe.losses.aux`` (zero gradient). Q is the layer's scores P, or, for the
sigmoid forms, the scores normalised over ALL E experts of each token:

.. math:: Q_{tj} = s'_{tj} = \frac{P_{tj}}{\sum_l P_{tl} + \epsilon}, \qquad
          dP_{tj} = \frac{dQ_{tj} - \sum_l dQ_{tl} Q_{tl}}{\sum_l P_{tl} + \epsilon}

Which routing map gives the counts:
    "selection"  the layer's ``topk_idx``: top-k of P + bias within the kept groups (DeepSeek-V3: f from the
                 top-k selection, bias included)
    "plain"      a fresh top-k of Q, no bias, no groups, no capacity (Megatron ``compute_routing_scores_for_aux_loss``,
                 moe_utils.py l. 750-797). The layer keeps ``topk_idx`` from before any capacity dropping, and
                 Megatron's aux map never sees the drop either: with capacity on, the counts are those BEFORE dropping.

Forms (``SYSTEM_AUX_FORMS``), balanced value 1 each:
    deepseek_v3_seq        per sequence E/(K T) sum_j c_bj mean_t s'_btj, mean over B; counts: selection;
                           eps 0 (the DeepSeek-V3 paper's s' has none); tokens i = b*T + t
    megatron_aux           Megatron ``aux_loss`` (one micro-batch): E/(K N^2) sum_j c_j sum_t Q_tj, softmax Q = P;
                           counts: plain top-k of P
    megatron_aux_sigmoid   the same with Q = s' (eps 1e-20), counts: plain top-k of s'
    megatron_seq_aux       Megatron ``seq_aux_loss``: per sequence, mean over B, on tokens i = t*B + b; Q = P; plain
    megatron_seq_aux_sigmoid  the same on s'
Megatron's ``global_aux_loss`` on one forward is ``megatron_aux`` with the counts of the whole data-parallel group
(``refmoe.losses.aux_conventions.megatron_forward(scope="global")`` for several parts).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import ops
from ..checks import check_mask, check_scores, check_topk, mask_weights, resolve_batch_shape
from .aux import AuxInputs, _w_deepseek_batch, _w_deepseek_seq, _w_megatron_seq, routing_map


class SystemAuxForm(NamedTuple):
    weights: object             # AuxInputs -> W [N, E] (a builder of refmoe.losses.aux)
    normalise: bool             # Q = P / (sum_l P_l + eps) instead of P
    eps: float                  # the normalisation's eps
    counts_from: str            # "selection" (the layer's topk_idx) or "plain" (a fresh top-k of Q)
    needs_batch_shape: bool


SYSTEM_AUX_FORMS: dict[str, SystemAuxForm] = {
    "deepseek_v3_seq": SystemAuxForm(_w_deepseek_seq, True, 0.0, "selection", True),
    "megatron_aux": SystemAuxForm(_w_deepseek_batch, False, 0.0, "plain", False),
    "megatron_aux_sigmoid": SystemAuxForm(_w_deepseek_batch, True, 1e-20, "plain", False),
    "megatron_seq_aux": SystemAuxForm(_w_megatron_seq, False, 0.0, "plain", True),
    "megatron_seq_aux_sigmoid": SystemAuxForm(_w_megatron_seq, True, 1e-20, "plain", True),
}


class SystemAuxCache(NamedTuple):
    weights: object         # [N, E] W, constant (zero gradient)
    q: object               # [N, E] the scores the loss read (normalised or P)
    denom: object           # [N, 1] sum_l P_tl + eps, None when not normalised
    form: str


def system_aux_forward(scores, topk_idx, form: str, *, valid_mask=None, batch_shape=None):
    """L from the layer's scores P [N, E] (``MoECache.scores``: raw sigmoid or softmax) and its top-k [N, K].

    form         one of SYSTEM_AUX_FORMS (module docstring)
    valid_mask   optional [N] bool, True = real token; padding leaves counts and means
    batch_shape  (B, T), needed by the per-sequence forms
    Returns (loss, SystemAuxCache); loss is a 0-d array in the scores' dtype.
    Numerics: eps is cast to the scores' dtype; a row of P sums to > 0 for softmax and sigmoid.
    """
    if form not in SYSTEM_AUX_FORMS:
        raise ValueError(f"form={form!r}; expected one of {sorted(SYSTEM_AUX_FORMS)}")
    spec = SYSTEM_AUX_FORMS[form]
    xp = check_scores(scores)
    N, E = scores.shape
    check_topk(topk_idx, N, E, xp)
    K = topk_idx.shape[1]
    mask = check_mask(valid_mask, N, xp)
    if spec.needs_batch_shape:
        if batch_shape is None:
            raise ValueError(f"form={form!r} needs batch_shape=(B, T)")
        batch_shape = resolve_batch_shape(batch_shape, N)
    valid = mask_weights(mask, N, scores.dtype, xp)                                 # [N]
    denom = None
    if spec.normalise:
        denom = scores.sum(axis=1, keepdims=True) + scores.dtype.type(spec.eps)     # [N, 1]
        q = scores / denom                                                           # [N, E]
    else:
        q = scores
    counted = topk_idx if spec.counts_from == "selection" else ops.topk_indices(q, K)   # [N, K]
    routed = routing_map(counted, E, scores.dtype, xp)                              # [N, E]
    w = spec.weights(AuxInputs(routed, valid, E, K, batch_shape, xp))               # [N, E]
    return (w * q).sum(), SystemAuxCache(w, q, denom, form)


def system_aux_backward(dloss, cache: SystemAuxCache):
    """d_scores [N, E] = dloss W, chained through the normalisation for the sigmoid forms. Counts: zero gradient."""
    dq = cache.weights * dloss                                                       # [N, E]
    if cache.denom is None:
        return dq
    return (dq - (dq * cache.q).sum(axis=1, keepdims=True)) / cache.denom            # [N, E]
