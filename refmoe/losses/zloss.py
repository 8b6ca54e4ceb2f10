r"""The router z-loss (ST-MoE; Megatron ``z_loss_func``; OLMoE's training code), a forward/backward pair.

Dimension letters: N tokens, E routed experts.

.. math::

    \ell_t = \log \textstyle\sum_j e^{z_{tj}}, \qquad
    L_z = \frac{1}{\sum_t v_t} \sum_t v_t\, \ell_t^2, \qquad
    \frac{\partial L_z}{\partial z_{tj}} = \frac{2\, v_t\, \ell_t}{\sum_s v_s}\, \mathrm{softmax}(z_t)_j

with v_t = 1 for a real token and 0 for padding (all ones without a mask: the plain mean over tokens). It reads
the router LOGITS [N, E], not the scores. The coefficient (``moe_z_loss_coeff``, ST-MoE 1e-3) multiplies it
outside; Megatron also divides by the tensor x context parallel size. docs/spec.md section 7.7.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import ops
from ..backend import array_namespace
from ..checks import (all_finite, check_dloss, check_float_array, check_mask, check_totals, mask_weights,
                      not_finite_error)


class ZLossCache(NamedTuple):
    lse: object         # [N]     logsumexp of each row
    probs: object       # [N, E]  softmax(z)
    valid: object       # [N]     1 real token, 0 padding
    n_valid: object     # 0-d     sum of valid


def zloss_totals(logits, valid_mask=None):
    """[1] float64: the number of valid tokens of this batch, the one sum L_z normalises by; summed over the
    ranks of a data-parallel group and passed to ``zloss_forward(..., totals=)``."""
    xp = check_float_array(logits, "logits", "[N, E]")
    mask = check_mask(valid_mask, logits.shape[0], xp, allow_all_padding=True)
    return mask_weights(mask, logits.shape[0], np.float64, xp).sum().reshape(1)


def zloss_forward(logits, valid_mask=None, *, totals=None):
    """L_z from logits [N, E]; valid_mask optional [N] bool (True = real token).

    totals  None, or :func:`zloss_totals` summed over the ranks of a data-parallel group: the loss is then this
            batch's share of the concatenated batch's (sum over the batch / the global number of valid tokens)
    Returns (loss, ZLossCache); loss is a 0-d array on the logits' backend and dtype.
    Numerics: logsumexp max-shifted, lse = m + log sum exp(z - m); a loss that overflows the dtype (logits near
    sqrt(max) of it, ~1e19 in float32) raises, naming the logits.
    """
    xp = check_float_array(logits, "logits", "[N, E]")
    N = logits.shape[0]
    mask = check_mask(valid_mask, N, xp, allow_all_padding=totals is not None)
    valid = mask_weights(mask, N, logits.dtype, xp)                  # [N]
    m = logits.max(axis=1, keepdims=True)                            # [N, 1]
    probs, _ = ops.softmax_forward(logits)                           # [N, E]
    lse = (m + xp.log(xp.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]   # [N]
    n_valid = valid.sum()
    if totals is not None:
        n_valid = check_totals(totals, (1,), xp, "zloss_totals")[0].astype(logits.dtype)   # the global count
    with np.errstate(over="ignore", invalid="ignore"):
        loss = (valid * lse * lse).sum() / n_valid
    if not all_finite(xp, loss):
        raise not_finite_error(f"L_z = {float(loss)}", {"logits": logits}, logits.dtype)
    return loss, ZLossCache(lse, probs, valid, n_valid)


def zloss_backward(dloss, cache: ZLossCache):
    r"""d_logits [N, E] = dloss * 2 v_t \ell_t softmax(z_t) / \sum_s v_s."""
    dloss = check_dloss(dloss, cache.lse)
    with np.errstate(over="ignore", invalid="ignore"):
        coef = (2 * dloss) * cache.valid * cache.lse / cache.n_valid  # [N]
        d_logits = coef[:, None] * cache.probs                        # [N, E]
    if not all_finite(array_namespace(d_logits), d_logits):
        raise not_finite_error("d_logits of L_z", {"dloss": dloss}, d_logits.dtype)
    return d_logits
