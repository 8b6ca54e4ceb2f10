r"""Expert capacity and token dropping (Megatron ``moe_expert_capacity_factor``, ``apply_router_token_dropping``).

Dimension letters: N tokens, E routed experts, K experts selected per token, C the capacity of one expert.

.. math::

    C = \max(\lceil (N K / E)\, f \rceil,\ C_{\min})                       \quad f = \text{capacity factor}
    \text{keep}_{ik} = [\,\text{rank of token } i \text{ among the tokens routed to } T_{ik}\ <\ C\,]
    \tilde g_{ik} = g_{ik}\, \text{keep}_{ik}                                \quad [N, K]

The rank orders an expert's tokens by gate, descending ("probs"), or by position, earliest first
("position"); ties go to the lower token index. A dropped (token, expert) pair contributes exactly 0 to the
output and receives exactly 0 gradient; the keep mask itself is piecewise constant (zero gradient).
Megatron ranks with ``torch.topk`` over each expert's column, whose order among equal values is unspecified,
and ``position`` ranks the 0/1 map (intended: earliest first); refmoe fixes both orders. ``pad_to_capacity``
(Megatron's padded map) is not implemented. docs/spec.md section 7.7.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .backend import array_namespace

DROP_POLICIES = ("probs", "position")


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int | None = None) -> int:
    """C = ceil((N K / E) * capacity_factor), raised to ``min_capacity`` when given (Megatron ``get_capacity``
    called with num_tokens = N K)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
    if min_capacity is not None and min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity} must be >= 0")
    capacity = math.ceil((n_tokens * top_k / n_experts) * capacity_factor)
    if min_capacity is not None and capacity < min_capacity:
        capacity = min_capacity
    return capacity


def capacity_keep(topk_idx, gates, n_experts: int, capacity: int, *, drop_policy: str = "probs"):
    """keep [N, K] bool: True where pair (i, k) is within expert topk_idx[i, k]'s capacity.

    topk_idx [N, K] int, gates [N, K] (the routing probabilities, after normalisation and scaling, as Megatron
    ranks them). Zero gradient.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r}; expected one of {DROP_POLICIES}")
    if capacity < 0:
        raise ValueError(f"capacity={capacity} must be >= 0")
    xp = array_namespace(topk_idx, gates)
    N, K = topk_idx.shape
    expert = topk_idx.reshape(-1).astype(xp.int64)                       # [N K] pair p = i K + k
    if drop_policy == "probs":
        order = xp.argsort(-gates.reshape(-1), kind="stable")            # gate descending, then token
    else:
        order = xp.arange(N * K)                                          # token ascending
    order = order[xp.argsort(expert[order], kind="stable")]               # by expert, keeping that order
    counts = xp.bincount(expert, minlength=n_experts)                    # [E]
    starts = xp.cumsum(counts) - counts                                   # [E] first slot of each expert
    rank = xp.empty(N * K, dtype=xp.int64)
    rank[order] = xp.arange(N * K) - starts[expert[order]]                # position within its expert
    return (rank < capacity).reshape(N, K)


class CapacityCache(NamedTuple):
    keep: object        # [N, K] bool


def capacity_forward(gates, keep):
    r"""Dropped pairs get gate 0: \tilde g = g \odot keep.  gates [N, K], keep [N, K] bool -> ([N, K], cache)."""
    return gates * keep.astype(gates.dtype), CapacityCache(keep)


def capacity_backward(d_gates, cache: CapacityCache):
    r"""dg = d\tilde g \odot keep: exactly 0 for a dropped pair.  Returns [N, K]."""
    return d_gates * cache.keep.astype(d_gates.dtype)


def kept_counts(topk_idx, keep, n_experts: int):
    """counts [E]: (token, slot) pairs each expert actually processes, the final routing map after dropping
    (``keep`` None: nothing dropped). Megatron's expert-bias update counts this map
    (:func:`refmoe.router_select.expert_bias_update`). Integer output, no gradient."""
    xp = array_namespace(topk_idx)
    expert = topk_idx.reshape(-1).astype(xp.int64)
    if keep is not None:
        expert = expert[keep.reshape(-1)]
    return xp.bincount(expert, minlength=n_experts)
