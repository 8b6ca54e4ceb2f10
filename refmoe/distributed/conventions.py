r"""The global-batch balancing losses of two systems, over L layers, computed by each rank of a data-parallel group.

Dimension letters: L layers, N_r tokens of this rank, N_g valid tokens of the global batch, E experts, K top-k;
c^g_lj the top-k assignments of valid tokens to expert j in layer l, summed over every rank; s_tj this rank's
scores (softmax of the router logits).

    megatron_global_forward   Megatron-Core 0.16.1 ``global_aux_loss`` across the data-parallel ranks of one step:
                              per layer  E / (K N_g^2) sum_j c^g_lj sum_{t in r} s_tj, summed over the layers
    qwen_global_forward       Qwen's global-batch balancing loss (Qiu et al. 2025), the HF Mixtral-family form of
                              transformers 5.24.0 (``load_balancing_loss_func``: the layers concatenated) with f
                              from the global batch:  E sum_j (sum_l c^g_lj / (L N_g)) (sum_{l, t in r} s_ltj / (L N_g))

Each rank all-reduces (SUMS) its counts and valid token count (:func:`global_counts`, one all-reduce) and keeps its
own scores, so the ranks' values add up to the loss of the concatenated batch and each rank's ``layers_backward``
is that loss's gradient on its own scores. A rank may be all padding or hold no token at all (scores [0, E]): it
then contributes zero counts and gets a zero loss and [0, E] gradients. docs/distributed.md states how Megatron's
and Qwen's own per-rank values relate to these shares.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_namespace
from ..losses import aux_conventions as conv
from ..losses.aux import AuxCache
from .comm import allreduce_parts, check_communicator


def _shape(layers):
    if not isinstance(layers, (list, tuple)) or len(layers) == 0:
        raise ValueError("layers must be a non-empty list of (scores [N_r, E], topk_idx [N_r, K]) pairs")
    (scores, idx) = layers[0]
    return scores.shape[0], scores.shape[1], idx.shape[1], array_namespace(scores, idx)


def global_counts(comm, layers, valid_mask=None) -> conv.GlobalCounts:
    """The counts c^g_lj of every layer and the valid token count N_g of the global batch: this rank's
    (``aux_conventions.part_counts``) summed over the ranks with one all-reduce. ``layers``: this rank's list over
    layers of (scores [N_r, E], topk_idx [N_r, K]); N_r may be 0. Raises when no rank holds a valid token."""
    comm = check_communicator(comm)
    N, E, K, xp = _shape(layers)
    comm.check_library(xp, "the scores")
    if N == 0:
        counts, n = [xp.zeros(E, dtype=layers[0][0].dtype)] * len(layers), xp.zeros((), dtype=np.float64)
    else:
        counts, n, _ = conv.part_counts(layers, valid_mask)
    parts = {f"layer{l}": c for l, c in enumerate(counts)}
    parts["tokens"] = xp.asarray(n, dtype=np.float64).reshape(1)
    summed = allreduce_parts(comm, parts, xp)
    if not float(summed["tokens"][0]) > 0:
        raise ValueError("the global batch has no valid token on any rank; the loss is undefined")
    dtype = layers[0][0].dtype
    return conv.GlobalCounts(tuple(summed[f"layer{l}"].astype(dtype) for l in range(len(layers))),
                             summed["tokens"][0].astype(dtype), K)


def _empty(layers, concatenated: bool):
    """The loss and cache of a rank with no token: 0, and [0, E] gradients from layers_backward."""
    N, E, _, xp = _shape(layers)
    dtype = layers[0][0].dtype
    cache = AuxCache(xp.zeros((0, E), dtype=dtype), "empty", None, (0, E))
    caches = (cache,) if concatenated else (cache,) * len(layers)
    return xp.zeros((), dtype=dtype), conv.LayersCache(caches, len(layers), 0, concatenated)


def megatron_global_forward(comm, layers, *, valid_mask=None):
    r"""This rank's share of Megatron-Core's global-batch balancing loss, summed over the layers.

    .. math:: L^{(r)} = \sum_l \frac{E}{K N_g^2} \sum_j c^g_{lj} \sum_{t \in r} v_t s^{(l)}_{tj}

    layers      this rank's list over layers of (scores [N_r, E], topk_idx [N_r, K]); valid_mask [N_r] bool or None
    Returns (loss, LayersCache); ``refmoe.losses.aux_conventions.layers_backward`` gives d_scores per layer.
    """
    stats = global_counts(comm, layers, valid_mask)
    if layers[0][0].shape[0] == 0:
        return _empty(layers, concatenated=False)
    return conv.megatron_forward(layers, "global", valid_mask=valid_mask, global_counts=stats)


def qwen_global_forward(comm, layers, *, valid_mask=None):
    r"""This rank's share of Qwen's global-batch balancing loss over L layers concatenated along tokens.

    .. math:: L^{(r)} = E \sum_j \frac{\sum_l c^g_{lj}}{L N_g} \cdot \frac{\sum_l \sum_{t \in r} v_t s^{(l)}_{tj}}{L N_g}

    Arguments and return as :func:`megatron_global_forward`; on one rank it is ``hf_mixtral_forward``.
    """
    stats = global_counts(comm, layers, valid_mask)
    if layers[0][0].shape[0] == 0:
        return _empty(layers, concatenated=True)
    return conv.hf_mixtral_forward(layers, valid_mask=valid_mask, global_counts=stats)
