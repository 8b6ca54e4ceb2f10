r"""Selection pieces of the router beyond plain top-k: group-limited selection and the selection bias with its
auxiliary-loss-free update. Nothing here has a gradient: the outputs are integers, or a bias that is moved by a
rule, not by backpropagation.

Dimension letters: N tokens, E routed experts, K experts selected per token, G expert groups (n_group),
M = E / G experts per group, Kg groups kept per token (topk_group).

Group-limited selection (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3, Megatron ``moe_router_num_groups``):

.. math::

    h_{ig} = \mathrm{rule}(\{c_{ij} : j \in \text{group } g\})      \quad [N, G]
    \mathcal{G}_i = \text{top-}K_g \text{ groups of } h_i            \quad \text{ties: lower group index wins}
    T_i = \text{top-}K \text{ of } c_i \text{ with } c_{ij} = -\infty \text{ for } j \notin \mathcal{G}_i

Groups are M consecutive experts (group g holds experts g M .. g M + M - 1). docs/spec.md sections 6.3, 7.5-7.7.
"""
from __future__ import annotations

from . import ops
from .backend import array_namespace

# group score rule -> how many of a group's largest values are summed (None: K // topk_group, Megatron)
GROUP_SCORES = {
    "max": 1,           # DeepSeek-V2 (HF group_limited_greedy): the largest value in the group
    "top2_sum": 2,      # DeepSeek-V3 (HF): the sum of the two largest
    "topm_sum": None,   # Megatron group_limited_topk: the sum of the top-(K // topk_group)
}


def check_top_k(top_k: int, n_experts: int) -> None:
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k}: need 1 <= top_k <= n_experts={n_experts}")


def select_topk_biased(scores, bias, top_k: int):
    r"""topk_idx [N, K] int64: the top-k of scores + bias, the bias used for the choice only.

    .. math:: T_i = \text{top-k}_j (P_{ij} + b_j)

    scores [N, E] (DeepSeek-V3 and Megatron: sigmoid scores), bias [E] (``e_score_correction_bias`` /
    ``expert_bias``). The gates are then read from the unbiased scores (:func:`refmoe.router.gate_weights_forward`),
    so the bias has no gradient. Ties: the lower expert index. With groups, pass scores + bias to
    :func:`select_group_limited`.
    """
    array_namespace(scores, bias)
    check_top_k(top_k, scores.shape[-1])
    if tuple(bias.shape) != (scores.shape[-1],):
        raise ValueError(f"bias must have shape ({scores.shape[-1]},), got {tuple(bias.shape)}")
    return ops.topk_indices(scores + bias, top_k)                       # [N, K]


def check_groups(n_experts: int, top_k: int, n_group: int, topk_group: int, group_score: str) -> int:
    """Validate a group-limited configuration; returns m, the number of values a group score sums."""
    check_top_k(top_k, n_experts)
    if n_group is None or topk_group is None:
        raise ValueError(f"group-limited selection needs both n_group and topk_group, got n_group={n_group}, "
                         f"topk_group={topk_group}")
    if n_group < 1 or n_experts % n_group:
        raise ValueError(f"n_group={n_group} does not divide n_experts={n_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group}: need 1 <= topk_group <= n_group={n_group}")
    per_group = n_experts // n_group
    if top_k > topk_group * per_group:
        raise ValueError(f"top_k={top_k} > topk_group * (n_experts / n_group) = {topk_group} * {per_group}: "
                         "the kept groups hold too few experts")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score={group_score!r}; expected one of {sorted(GROUP_SCORES)}")
    m = GROUP_SCORES[group_score] or top_k // topk_group
    if not 1 <= m <= per_group:
        raise ValueError(f"group_score={group_score!r} sums the top {m} of each group; need 1 <= {m} <= "
                         f"n_experts / n_group = {per_group}")
    return m


def group_scores(choice, n_group: int, m: int):
    r"""h [N, G]: the sum of the m largest entries of ``choice`` [N, E] in each group of E / G consecutive experts.

    .. math:: h_{ig} = \textstyle\sum_{r=1}^{m} c_{i,(r)}^{(g)}  \quad (c^{(g)}_{(1)} \ge c^{(g)}_{(2)} \ge \dots)

    m = 1 is the group maximum. The largest value is added first, as ``topk(...).values.sum()`` does.
    """
    xp = array_namespace(choice)
    N, E = choice.shape
    grouped = choice.reshape(N, n_group, E // n_group)                 # [N, G, M]
    top = -xp.sort(-grouped, axis=-1)[..., :m]                          # [N, G, m] descending
    h = top[..., 0]
    for r in range(1, m):
        h = h + top[..., r]
    return h                                                            # [N, G]


def select_group_limited(choice, top_k: int, *, n_group: int, topk_group: int, group_score: str = "max"):
    """topk_idx [N, K] int64 from the values the router ranks, ``choice`` [N, E] (scores, scores + bias, or
    logits), keeping only the ``topk_group`` best of ``n_group`` groups per token.

    group_score  "max" (DeepSeek-V2), "top2_sum" (DeepSeek-V3), "topm_sum" (Megatron: top-(K // topk_group));
                 see ``GROUP_SCORES``
    Experts of the other groups are set to -inf before the top-k (DeepSeek-V3, Megatron). DeepSeek-V2 (HF) sets
    them to 0 instead; that selects the same experts when the kept groups hold K positive scores.
    "max" ranks the same under any increasing map, so the logits may be passed for softmax scores; the sums
    do not: pass what the system sums. Ties: the lower group index, then the lower expert index. Zero gradient.
    """
    xp = array_namespace(choice)
    N, E = choice.shape
    m = check_groups(E, top_k, n_group, topk_group, group_score)
    h = group_scores(choice, n_group, m)                                # [N, G]
    kept = ops.topk_indices(h, topk_group)                              # [N, Kg]
    group_mask = xp.zeros((N, n_group), dtype=bool)                     # [N, G]
    group_mask[xp.arange(N)[:, None], kept] = True                      # distinct per row: assignment is exact
    expert_mask = xp.repeat(group_mask, E // n_group, axis=1)           # [N, E]
    masked = xp.where(expert_mask, choice, choice.dtype.type(-xp.inf))  # [N, E]
    return ops.topk_indices(masked, top_k)                              # [N, K]


# ----------------------------------------------------------------------------------------------
# the auxiliary-loss-free bias update (DeepSeek-V3; Megatron moe_router_enable_expert_bias)
# ----------------------------------------------------------------------------------------------

def expert_bias_update(bias, counts, rate: float = 1e-3):
    r"""The new selection bias [..., E] after one step of the auxiliary-loss-free rule (not a gradient step).

    .. math:: b_j \leftarrow b_j + u\, \mathrm{sign}(\bar c - c_j), \qquad \bar c = \tfrac{1}{E} \textstyle\sum_l c_l

    bias    [E] (or [L, E], one row per layer), the bias the selection adds to the scores
    counts  same shape: tokens routed to each expert since the last update (Megatron: of the final routing map,
            after capacity, summed over the data-parallel group)
    rate    u, ``moe_router_bias_update_rate`` (Megatron default 1e-3)
    An under-loaded expert (c_j < mean) gains u, an over-loaded one loses u, one at the mean keeps its bias.
    Pure: returns a new array in the bias's dtype, ``bias`` is not modified. No gradient flows through it.
    """
    xp = array_namespace(bias, counts)
    if tuple(bias.shape) != tuple(counts.shape):
        raise ValueError(f"bias and counts must have the same shape, got {tuple(bias.shape)} and "
                         f"{tuple(counts.shape)}")
    c = counts.astype(bias.dtype)
    mean = c.sum(axis=-1, keepdims=True) / c.shape[-1]                  # [..., 1]
    return bias + xp.sign(mean - c) * bias.dtype.type(rate)
