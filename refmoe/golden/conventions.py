"""Golden cases of the multi-layer balancing-loss conventions (``kind = "aux_layers"``).

Dimension letters: L layers, N tokens, E experts, K top-k, M micro-batches.

Such a case has no MoE layer: its input is the router logits of L layers, as HF's
``load_balancing_loss_func`` takes them. Keys:

    input/logits [L, N, E]   input/valid_mask [N] bool (the same for every layer)
    input/micro_batch [N] int64 (megatron_global*: the micro-batch of each token, contiguous)
    inter/scores [L, N, E]   inter/topk_idx [L, N, K]
    loss/aux []              loss/aux_pieces [M] (megatron_global*: each micro-batch's loss; aux is their sum)
    grad/aux/logits [L, N, E]
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_xp, to_numpy
from ..losses import aux_conventions as conv

CONVENTION_FORMS = ("hf_mixtral", "megatron_micro_batch", "megatron_seq", "megatron_global",
                    "megatron_seq_valid_over_b", "megatron_global_accumulated")


def _inputs(spec):
    L, N, E, K = spec.n_layers, spec.n_tokens, spec.n_experts, spec.top_k
    for attempt in range(200):
        rng = np.random.default_rng([spec.seed, attempt])
        logits = rng.standard_normal((L, N, E)) * 1.5
        p, _ = ops.softmax_forward(logits)
        srt = np.sort(p, axis=2)[:, :, ::-1]
        if K == E or (srt[:, :, K - 1] - srt[:, :, K]).min() >= 1e-3:
            break
    valid = np.ones(N, dtype=bool)
    valid[list(spec.padding)] = False
    return logits, valid


def _micro_batch_ids(spec):
    sizes = spec.micro_batches or (spec.n_tokens,)
    if sum(sizes) != spec.n_tokens or min(sizes) < 1:
        raise ValueError(f"case {spec.name!r}: micro_batches={sizes} must be positive sizes summing to N")
    return np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)


def compute_convention_case(spec, backend: str = "numpy") -> dict:
    """Arrays of an ``aux_layers`` case (host NumPy, the case's dtype), computed on ``backend``."""
    if spec.aux not in CONVENTION_FORMS:
        raise ValueError(f"case {spec.name!r}: aux={spec.aux!r}; expected one of {CONVENTION_FORMS}")
    dtype = np.dtype(spec.dtype)
    xp = get_xp(backend)
    logits_h, valid_h = _inputs(spec)
    logits, valid = xp.asarray(logits_h.astype(dtype)), xp.asarray(valid_h)
    scores = xp.stack([ops.softmax_forward(z)[0] for z in logits])                # [L, N, E]
    idx = xp.stack([ops.topk_indices(s, spec.top_k) for s in scores])             # [L, N, K]
    mask = valid if spec.padding else None
    out = {"input/logits": logits, "input/valid_mask": valid, "inter/scores": scores, "inter/topk_idx": idx}

    if spec.aux in ("megatron_global", "megatron_global_accumulated"):
        mb = _micro_batch_ids(spec)
        parts = [xp.asarray(np.nonzero(mb == m)[0]) for m in range(mb.max() + 1)]
        micro = [[(scores[l][r], idx[l][r]) for l in range(spec.n_layers)] for r in parts]
        masks = [None if mask is None else mask[r] for r in parts]
        if spec.aux == "megatron_global":                 # data-parallel parts of one step: summed counts
            stats = conv.megatron_global_counts(micro, masks)
            results = [conv.megatron_forward(layers, "global", valid_mask=m, global_counts=stats)
                       for layers, m in zip(micro, masks)]
        else:                                             # gradient accumulation: running mean of the counts
            results = conv.megatron_global_accumulated_forward(micro, masks)
        pieces, d_scores = [], xp.zeros_like(scores)
        for r, (loss, cache) in zip(parts, results):
            pieces.append(loss)
            for l, d in enumerate(conv.layers_backward(1.0, cache)):
                d_scores[l][r] = d
        out["input/micro_batch"] = mb
        out["loss/aux_pieces"] = xp.stack(pieces)
        out["loss/aux"] = sum(pieces)
    else:
        layers = [(scores[l], idx[l]) for l in range(spec.n_layers)]
        if spec.aux == "hf_mixtral":
            loss, cache = conv.hf_mixtral_forward(layers, valid_mask=mask)
        else:
            scope = spec.aux[len("megatron_"):]
            loss, cache = conv.megatron_forward(layers, scope, valid_mask=mask, batch_shape=spec.batch_shape)
        d_scores = xp.stack(conv.layers_backward(1.0, cache))
        out["loss/aux"] = loss
    out["grad/aux/logits"] = xp.stack([ops.softmax_backward(d, s) for d, s in zip(d_scores, scores)])
    host = {k: to_numpy(v) for k, v in out.items()}
    return {k: (v if v.dtype.kind in "biu" else v.astype(dtype, copy=False)) for k, v in host.items()}
