r"""Load-balancing losses as other MoE systems compute them, as named conventions with hand-derived gradients.

Dimension letters: N tokens of one layer, E experts, K top-k, L layers, B sequences of T tokens.
s = softmax scores [N, E], c_j = top-k assignments of (valid) tokens to expert j, Pbar_j = mean_t s_tj.

Every form is linear in the scores once the routing is fixed, :math:`L = \sum_{t,j} W_{tj} s_{tj}`, with W
built from counts only (zero gradient), so each backward is ``d_scores = dloss * W`` (as in ``aux.py``).

Single layer
    megatron_seq          (a form of ``aux_loss_forward``, in ``aux.py``) Megatron-Core
                          ``sequence_load_balancing_loss_func``: per sequence E/(K T) sum_j c_bj Pbar_bj, mean
                          over B. Megatron activations are [T, B, D], so flattened token i = t*B + b
                          (sequence-major), unlike ``deepseek_seq`` (i = b*T + t). Balanced value 1.
    gshard_first_choice   (a form of ``aux_loss_forward``) GShard / DeepSpeed top-1 and top-2 gating / fairseq
                          / Tutel: E sum_j f1_j Pbar_j with f1_j the fraction of tokens whose FIRST choice is j
                          (the second choice never enters f). Balanced value 1.
Several layers: a function of a list of per-layer ``(scores, topk_idx)``
    hf_mixtral            HF ``load_balancing_loss_func`` (Mixtral, Qwen2/3-MoE, OLMoE): the layers are
                          concatenated along tokens FIRST, then E sum_{k,j} f_kj Pbar_j over the L*N rows,
                          f_kj = fraction of rows with expert j in slot k. Balanced value K (the "xK").
                          With ``global_counts`` (counts and token count of a whole global batch, each part's
                          own scores): Qwen's global-batch balancing loss, whose parts add up to the
                          concatenated batch's loss.
    megatron              per layer, summed over layers; ``scope`` is "micro_batch" (E/(K T^2) sum_j
                          (sum_t s_tj) c_j, balanced 1 per layer), "seq" (megatron_seq per layer) or
                          "global" (counts c_j and token count taken over the whole global batch, scores
                          summed over this micro-batch only, so the per-micro-batch pieces add up exactly
                          to the global-batch loss; see :func:`megatron_global_counts`, and
                          :func:`part_counts` for one part's counts, which a data-parallel group sums), or
                          "seq_valid_over_b" (megatron_seq normalised as megatron-core 0.16.1 does with a
                          padding mask: every sequence by (valid tokens of the micro-batch) / B, not by its
                          own valid length; without a mask the same as "seq"; docs/spec.md 6.4 item 1).
    megatron_global_accumulated   Megatron-Core 0.16.1 ``global_aux_loss`` under gradient accumulation
                          (:func:`megatron_global_accumulated_forward`): micro-batch m uses the running mean of
                          the counts of micro-batches 1..m and its own token count (docs/spec.md 6.4 item 2);
                          the pieces do not add up to a global-batch loss.

Padding: ``valid_mask`` [N] bool, True = real token, is the same for every layer; padding is dropped from
counts, means and token counts, so a masked batch equals the truncated batch. (With a mask megatron-core
normalises a sequence by (valid tokens) / B: scope "seq_valid_over_b"; scope "seq" uses the sequence's own
valid length.)

Single-layer identities (tested): hf_mixtral on one layer = ``switch``; megatron micro_batch on one
layer = ``deepseek_batch``; gshard_first_choice = ``switch`` on the first top-k column.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import array_namespace
from ..checks import check_mask, check_scores, check_topk, mask_weights, resolve_batch_shape
from .aux import AuxCache, aux_loss_backward, aux_loss_forward, routing_map

MEGATRON_SCOPES = ("micro_batch", "seq", "global", "seq_valid_over_b")
CONVENTIONS = ("megatron_seq", "gshard_first_choice", "hf_mixtral", "megatron", "megatron_global_accumulated")


# ----------------------------------------------------------------------------------------------
# several layers
# ----------------------------------------------------------------------------------------------

class LayersCache(NamedTuple):
    caches: tuple       # one AuxCache per layer, or a single one over the concatenation (hf_mixtral)
    n_layers: int
    n_tokens: int       # N per layer
    concatenated: bool


def _check_layers(layers):
    if not isinstance(layers, (list, tuple)) or len(layers) == 0:
        raise ValueError("layers must be a non-empty list of (scores [N, E], topk_idx [N, K]) pairs, one per layer")
    shape = None
    for l, pair in enumerate(layers):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"layers[{l}] must be a pair (scores, topk_idx)")
        scores, topk_idx = pair
        xp = check_scores(scores, name=f"layers[{l}] scores")
        check_topk(topk_idx, scores.shape[0], scores.shape[1], xp)
        here = (tuple(scores.shape), topk_idx.shape[1])
        if shape is not None and here != shape:
            raise ValueError(f"layers[{l}] has (scores shape, K) = {here}, layer 0 has {shape}; all layers must match")
        shape = here
    return shape


def hf_mixtral_forward(layers, *, valid_mask=None, global_counts=None):
    r"""HF Mixtral-family balancing loss over L layers concatenated along tokens.

    .. math:: L = E \sum_{k,j} f_{kj} \bar P_j,\quad f_{kj} = \frac{1}{L N}\sum_{l,t}[T_{lt,k} = j],\quad
              \bar P_j = \frac{1}{L N}\sum_{l,t} s^{(l)}_{tj}

    Summing f over the K slots gives c_j / (L N): this is ``switch`` on the concatenated [L*N, E] scores.
    layers         list of L pairs (scores [N, E], topk_idx [N, K])
    valid_mask     optional [N] bool (True = real token), applied to every layer
    global_counts  None, or the counts and token count of a whole global batch (:func:`megatron_global_counts`
                   over its parts, or summed over data-parallel ranks): c_j = sum_l c^g_lj and N = N_g in f and
                   Pbar, scores of this part only (Qwen's global-batch balancing loss); the parts' values add up
                   to the loss of the concatenated batch, and this part may be all padding
    Balanced value K. Returns (loss, LayersCache).
    """
    (N, E), K = _check_layers(layers)
    xp = array_namespace(*[s for s, _ in layers])
    scores = xp.concatenate([s for s, _ in layers], axis=0)                  # [L*N, E]
    topk_idx = xp.concatenate([i for _, i in layers], axis=0)                # [L*N, K]
    mask = check_mask(valid_mask, N, xp, allow_all_padding=global_counts is not None)
    tiled = None if mask is None else xp.concatenate([mask] * len(layers))   # [L*N]
    totals = None
    if global_counts is not None:                                            # [E + 1] sums over the global batch
        _check_global_counts(global_counts, len(layers), E, K)
        counts = sum(global_counts.counts[1:], global_counts.counts[0])      # [E] summed over the layers
        rows = len(layers) * xp.asarray(global_counts.n_tokens).reshape(1)   # L N_g rows
        totals = xp.concatenate([counts, rows]).astype(xp.float64)
    loss, cache = aux_loss_forward(scores, topk_idx, "switch", valid_mask=tiled, totals=totals)
    return loss, LayersCache((cache._replace(variant="hf_mixtral"),), len(layers), N, True)


class GlobalCounts(NamedTuple):
    counts: tuple       # L arrays [E]: top-k assignments of valid tokens over the whole global batch
    n_tokens: object    # valid tokens in the global batch (a 0-d array)
    top_k: int


def part_counts(layers, valid_mask=None) -> GlobalCounts:
    """The counts c_j per layer and the valid token count of ONE part of a global batch (a micro-batch, or a
    data-parallel rank's batch), which may be all padding (then every count is 0).

    layers      list over layers of (scores [N, E], topk_idx [N, K])
    valid_mask  optional [N] bool (True = real token)
    """
    (N, E), K = _check_layers(layers)
    xp = array_namespace(layers[0][0])
    mask = check_mask(valid_mask, N, xp, allow_all_padding=True)
    valid = mask_weights(mask, N, layers[0][0].dtype, xp)
    counts = [(valid[:, None] * routing_map(idx, E, s.dtype, xp)).sum(axis=0) for s, idx in layers]   # L x [E]
    return GlobalCounts(tuple(counts), valid.sum(), K)


def megatron_global_counts(micro_batches, valid_masks=None) -> GlobalCounts:
    """Counts c_j per layer and the token count over a global batch made of several micro-batches.

    micro_batches  list over micro-batches of lists over layers of (scores, topk_idx)
    valid_masks    optional list (one per micro-batch) of [N_m] bool masks or None
    A micro-batch may be all padding; the global batch may not.
    """
    if not isinstance(micro_batches, (list, tuple)) or len(micro_batches) == 0:
        raise ValueError("micro_batches must be a non-empty list of per-layer lists")
    if valid_masks is None:
        valid_masks = [None] * len(micro_batches)
    if len(valid_masks) != len(micro_batches):
        raise ValueError(f"{len(valid_masks)} masks for {len(micro_batches)} micro-batches")
    counts, n_tokens, ref = None, 0, None
    for m, (layers, mask) in enumerate(zip(micro_batches, valid_masks)):
        here = part_counts(layers, mask)
        shape = (here.counts[0].shape[0], here.top_k, len(layers))
        if ref is not None and shape != ref:
            raise ValueError(f"micro-batch {m} has (E, K, L) = {shape}, micro-batch 0 has {ref}")
        ref = shape
        counts = here.counts if counts is None else [a + b for a, b in zip(counts, here.counts)]
        n_tokens = n_tokens + here.n_tokens
    if not float(n_tokens) > 0:
        raise ValueError("valid_masks mark every token of every micro-batch as padding; the loss is undefined")
    return GlobalCounts(tuple(counts), n_tokens, ref[1])


def _check_global_counts(stats: GlobalCounts, n_layers: int, n_experts: int, top_k: int):
    if len(stats.counts) != n_layers or stats.top_k != top_k or \
            any(tuple(c.shape) != (n_experts,) for c in stats.counts):
        raise ValueError(f"global counts are for L = {len(stats.counts)} layers of (E, K) = "
                         f"{(stats.counts[0].shape[0], stats.top_k)}, the layers are {n_layers} of {(n_experts, top_k)}")
    if not float(stats.n_tokens) > 0:
        raise ValueError("global counts hold no valid token; the loss is undefined")


def _global_layer(scores, topk_idx, mask, stats: GlobalCounts, layer: int):
    r"""E/(K T_g^2) \sum_j c^g_j \sum_{t in this micro-batch} s_tj  (one layer, one micro-batch)."""
    xp = array_namespace(scores)
    N, E = scores.shape
    valid = mask_weights(mask, N, scores.dtype, xp)
    c = stats.counts[layer]
    if tuple(c.shape) != (E,) or stats.top_k != topk_idx.shape[1]:
        raise ValueError(f"global counts are for (E, K) = {(c.shape[0], stats.top_k)}, "
                         f"the layer has {(E, topk_idx.shape[1])}")
    n = stats.n_tokens
    w = valid[:, None] * (E * c / (stats.top_k * n * n))[None, :]            # [N, E]
    return (w * scores).sum(), AuxCache(w, "megatron_global", None, scores.shape)


def _seq_valid_over_b_layer(scores, topk_idx, mask, batch_shape):
    r"""One layer of megatron-core's ``seq_aux_loss`` with a padding mask; tokens i = t*B + b.

    .. math:: L = \frac{1}{B} \sum_b \frac{E}{K \bar T^2} \sum_j c_{bj} \sum_t v_{tb} s_{tbj},\qquad
              \bar T = \frac{1}{B} \sum_{t,b} v_{tb}

    c_bj counts the valid tokens of sequence b routed to j; the one token count T-bar (megatron-core's
    ``total_num_tokens = sum(c) / (K B)``) is shared by every sequence. Without padding T-bar = T.
    """
    xp = array_namespace(scores)
    N, E = scores.shape
    B, T = resolve_batch_shape(batch_shape, N)
    K = topk_idx.shape[1]
    valid = mask_weights(mask, N, scores.dtype, xp)                                  # [N]
    routed = valid[:, None] * routing_map(topk_idx, E, scores.dtype, xp)             # [N, E]
    counts = routed.reshape(T, B, E).sum(axis=0)                                     # [B, E] c_bj
    t_bar = valid.sum() / B                                                          # 0-d
    w = valid.reshape(T, B)[:, :, None] * (E * counts / (K * t_bar * t_bar * B))[None, :, :]   # [T, B, E]
    w = w.reshape(N, E)                                                              # [N, E] token t*B + b
    return (w * scores).sum(), AuxCache(w, "megatron_seq_valid_over_b", None, scores.shape)


def megatron_forward(layers, scope: str = "micro_batch", *, valid_mask=None, batch_shape=None,
                     global_counts: GlobalCounts | None = None):
    r"""Megatron-Core switch balancing loss, computed per layer and summed over the L layers.

    scope "micro_batch"  E/(K T^2) sum_j (sum_t s_tj) c_j over this micro-batch (= ``deepseek_batch``)
          "seq"          ``megatron_seq`` per layer; needs batch_shape=(B, T), tokens ordered i = t*B + b
          "global"       counts and token count from ``global_counts`` (default: this micro-batch alone);
                         summing the result over the micro-batches of the global batch gives the
                         global-batch loss, and each micro-batch's gradient is its slice of that loss's.
          "seq_valid_over_b"  as "seq" with megatron-core's normalisation under a padding mask: every
                         sequence by (valid tokens) / B (:func:`_seq_valid_over_b_layer`); needs batch_shape
    Balanced value 1 per layer (L in total). Returns (loss, LayersCache).
    """
    if scope not in MEGATRON_SCOPES:
        raise ValueError(f"scope={scope!r}; expected one of {MEGATRON_SCOPES}")
    (N, E), K = _check_layers(layers)
    xp = array_namespace(layers[0][0])
    mask = check_mask(valid_mask, N, xp, allow_all_padding=scope == "global" and global_counts is not None)
    if scope == "global" and global_counts is None:
        global_counts = megatron_global_counts([layers], [valid_mask])
    if scope == "global":
        _check_global_counts(global_counts, len(layers), E, K)
    total, caches = 0, []
    for l, (scores, topk_idx) in enumerate(layers):
        if scope == "global":
            loss, cache = _global_layer(scores, topk_idx, mask, global_counts, l)
        elif scope == "seq_valid_over_b":
            if batch_shape is None:
                raise ValueError("scope='seq_valid_over_b' needs batch_shape=(B, T) (tokens i = t*B + b)")
            loss, cache = _seq_valid_over_b_layer(scores, topk_idx, mask, batch_shape)
        else:
            variant = "deepseek_batch" if scope == "micro_batch" else "megatron_seq"
            loss, cache = aux_loss_forward(scores, topk_idx, variant, valid_mask=valid_mask, batch_shape=batch_shape)
        total = total + loss
        caches.append(cache)
    return total, LayersCache(tuple(caches), len(layers), N, False)


def megatron_global_accumulated_forward(micro_batches, valid_masks=None) -> list:
    r"""Megatron-Core 0.16.1 ``global_aux_loss`` over M micro-batches of one step, in order (one rank).

    .. math:: L^{(m)} = \sum_l \frac{E}{K N_m^2} \sum_j \bar c^{(l,m)}_j \sum_{t \in m} v_t s^{(l)}_{tj},\qquad
              \bar c^{(l,m)} = \frac{1}{m} \sum_{m' \le m} c^{(l,m')}

    (router.py l. 384-394: ``global_tokens_per_expert += c; ga_steps += 1``, the counts divided by ``ga_steps``;
    ``total_num_tokens`` N_m is the CURRENT micro-batch's valid token count.) The running sums start at zero
    for every step (``finalize_model_grads``). Micro-batch m never sees later counts, so the pieces do not add
    up to the global-batch loss of scope "global"; with one micro-batch both equal the micro_batch scope.

    micro_batches  list over micro-batches of lists over layers of (scores [N_m, E], topk_idx [N_m, K])
    valid_masks    optional list of [N_m] bool (True = real token) or None, one per micro-batch
    Returns a list of M pairs (loss_m, LayersCache); :func:`layers_backward` of a cache gives that micro-batch's
    d_scores (the counts have zero gradient).
    """
    if not isinstance(micro_batches, (list, tuple)) or len(micro_batches) == 0:
        raise ValueError("micro_batches must be a non-empty list of per-layer lists")
    valid_masks = [None] * len(micro_batches) if valid_masks is None else valid_masks
    if len(valid_masks) != len(micro_batches):
        raise ValueError(f"{len(valid_masks)} masks for {len(micro_batches)} micro-batches")
    running, out = None, []
    for m, (layers, mask) in enumerate(zip(micro_batches, valid_masks)):
        here = megatron_global_counts([layers], [mask])                  # this micro-batch's counts and N_m
        running = here.counts if running is None else tuple(a + b for a, b in zip(running, here.counts))
        stats = GlobalCounts(tuple(c / (m + 1) for c in running), here.n_tokens, here.top_k)   # mean over 1..m
        out.append(megatron_forward(layers, "global", valid_mask=mask, global_counts=stats))
    return out


def layers_backward(dloss, cache: LayersCache) -> list:
    """d_scores for each layer (a list of L arrays [N, E]) for ``hf_mixtral_forward`` / ``megatron_forward``.

    The counts, f and the top-k selection have zero gradient.
    """
    if cache.concatenated:
        d = aux_loss_backward(dloss, cache.caches[0])                         # [L*N, E]
        return [d[l * cache.n_tokens:(l + 1) * cache.n_tokens] for l in range(cache.n_layers)]
    return [aux_loss_backward(dloss, c) for c in cache.caches]


def balanced_value(name: str, n_experts: int, top_k: int, n_layers: int = 1) -> float:
    """Value of a convention at perfect balance (equal counts, every Pbar_j = 1/E): K for hf_mixtral,
    1 per layer for the others (summed over ``n_layers`` for megatron)."""
    if name == "hf_mixtral":
        return float(top_k)
    if name in ("megatron", "megatron_global_accumulated"):
        return float(n_layers)
    if name in ("megatron_seq", "gshard_first_choice"):
        return 1.0
    raise ValueError(f"{name!r} is not a convention; expected one of {CONVENTIONS}")
