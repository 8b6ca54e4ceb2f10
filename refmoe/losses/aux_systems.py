r"""Megatron-Core's balancing losses, which count a fresh plain top-k of the scores instead of the layer's
selection. One forward/backward pair.

Dimension letters: N tokens, E routed experts, K top-k, B sequences of T tokens.

Megatron computes its aux losses on scores of its own (``compute_routing_scores_for_aux_loss``, moe_utils.py
l. 750-797): q = softmax(z) (float32), or q = sigmoid(z) / (sum_j sigmoid(z)_j + 1e-20) under sigmoid scoring, and
a routing map r = one_hot(topk(q, K)): a plain top-k with no expert bias, no groups and no capacity. refmoe's
``MoECache.scores`` is exactly that q (under sigmoid scoring the layer normalises over all E experts; the 1e-20
changes no float32 or float64 sum of E sigmoids, each in (0, 1), unless every one underflows), so the forms read
P = ``cache.scores`` and take the counts from ``ops.topk_indices(P, K)``, not from ``topk_idx``. The layer's
``topk_idx`` is itself taken before any capacity dropping, and Megatron's aux map never sees the drop: with
capacity on, the counts are those BEFORE dropping (the expert-bias counts, in contrast, use the map after it).

Every form is linear in P once the counts are fixed, :math:`L = \sum_{t,j} W_{tj} P_{tj}`, with W from the weight
builders of ``refmoe.losses.aux`` (zero gradient): dP = dL W.

Forms (``SYSTEM_AUX_FORMS``), balanced value 1 each:
    megatron_aux      ``aux_loss`` (one micro-batch): E/(K N^2) sum_j c_j sum_t P_tj (= ``deepseek_batch`` with the
                      plain top-k's counts); ``global_aux_loss`` on one forward is the same with the counts of the
                      whole data-parallel group (``refmoe.losses.aux_conventions.megatron_forward(scope="global")``)
    megatron_seq_aux  ``seq_aux_loss``: per sequence, mean over B, tokens i = t*B + b (= ``megatron_seq`` with the
                      plain top-k's counts)
DeepSeek-V3's sequence-wise loss needs no form of its own: it is ``aux`` form ``deepseek_seq`` on P = s / sum_j s with
f from the layer's selection (bias and groups included), which is what ``cache.scores`` and ``cache.topk_idx`` hold
under the ``deepseek_v3`` preset.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import ops
from ..checks import all_finite, check_scores, check_topk, not_finite_error
from .aux import AuxCache, aux_loss_backward, aux_loss_forward, aux_loss_totals


# each system form is a form of refmoe.losses.aux applied with the counts of a plain top-k of the scores
SYSTEM_AUX_FORMS: dict[str, str] = {
    "megatron_aux": "deepseek_batch",
    "megatron_seq_aux": "megatron_seq",
}


class SystemAuxCache(NamedTuple):
    aux: AuxCache           # the cache of aux_loss_forward on the plain top-k (weights W: zero gradient)
    plain_idx: object       # [N, K] the plain top-k of P that gave the counts
    form: str


def system_aux_totals(scores, topk_idx, form: str, *, valid_mask=None, batch_shape=None):
    """The sums over this batch that the form's weights read (``aux_loss_totals`` of its aux form, with the counts
    of the plain top-k of P); summed over a data-parallel group they give ``system_aux_forward(..., totals=)``:
    ``megatron_aux`` then is Megatron-Core's ``global_aux_loss`` share of one rank in one step."""
    if form not in SYSTEM_AUX_FORMS:
        raise ValueError(f"form={form!r}; expected one of {sorted(SYSTEM_AUX_FORMS)}")
    xp = check_scores(scores)
    check_topk(topk_idx, scores.shape[0], scores.shape[1], xp)
    plain_idx = ops.topk_indices(scores, topk_idx.shape[1])                        # [N, K]
    return aux_loss_totals(scores, plain_idx, SYSTEM_AUX_FORMS[form], valid_mask=valid_mask,
                           batch_shape=batch_shape)


def system_aux_forward(scores, topk_idx, form: str, *, valid_mask=None, batch_shape=None, totals=None):
    """L from the layer's scores P [N, E] (``MoECache.scores``, rows summing to 1) and its top-k [N, K] (only K
    is read from it: the counts come from a plain top-k of P).

    form         one of SYSTEM_AUX_FORMS (module docstring)
    valid_mask   optional [N] bool, True = real token; padding leaves counts and means
    batch_shape  (B, T), needed by megatron_seq_aux (tokens i = t*B + b)
    totals       None, or :func:`system_aux_totals` summed over the ranks of a data-parallel group
    Returns (loss, SystemAuxCache); loss is a 0-d array in the scores' dtype.
    """
    if form not in SYSTEM_AUX_FORMS:
        raise ValueError(f"form={form!r}; expected one of {sorted(SYSTEM_AUX_FORMS)}")
    xp = check_scores(scores)
    N, E = scores.shape
    check_topk(topk_idx, N, E, xp)
    if form == "megatron_seq_aux" and batch_shape is None:
        raise ValueError(f"form={form!r} needs batch_shape=(B, T)")
    plain_idx = ops.topk_indices(scores, topk_idx.shape[1])                        # [N, K] no bias/groups/drops
    loss, aux = aux_loss_forward(scores, plain_idx, SYSTEM_AUX_FORMS[form], valid_mask=valid_mask,
                                 batch_shape=batch_shape, totals=totals)
    if not all_finite(xp, loss):
        raise not_finite_error(f"balancing loss {form} = {float(loss)}", {"scores": scores}, scores.dtype)
    return loss, SystemAuxCache(aux, plain_idx, form)


def system_aux_backward(dloss, cache: SystemAuxCache):
    """d_scores [N, E] = dloss W. The counts (and the plain top-k) have zero gradient."""
    return aux_loss_backward(dloss, cache.aux)
