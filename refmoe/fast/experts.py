"""The routed experts in one batched SwiGLU over a padded [E, C, D] layout: the signatures of
``refmoe.experts``, the same numbers up to rounding, far fewer kernel launches on a GPU.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k,
A = N*K assignments, C rows per expert (the largest expert count).

Every expert gets C rows, its own assignments first (in token order) and zero rows after them; a zero row
gives a zero output and receives no gradient, so one batched matmul per projection replaces E small ones.
When the padding would exceed ``PAD_LIMIT`` (E * C > PAD_LIMIT * A, a very uneven routing) the experts run
one by one with ``refmoe.experts``, whose backward then follows.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import experts as loop
from .. import ops
from ..backend import array_namespace, to_numpy

PAD_LIMIT = 1.25    # pad only when E * C <= PAD_LIMIT * N * K (at most 25% zero rows)


class PaddedCache(NamedTuple):
    slot: object        # [A] row e*C + rank of each flat (token, slot) in the padded layout
    capacity: int       # C
    swiglu: ops.SwigluCache   # over [E, C, .]


def padded_slots(topk_idx, n_experts: int):
    """(slot [A], C): the padded row of every flat assignment, and the rows per expert.

    C is a host integer (one small device->host read of the E counts on CuPy).
    """
    xp = array_namespace(topk_idx)
    N, K = topk_idx.shape
    flat = topk_idx.reshape(-1)                                    # [A]
    order = xp.argsort(flat, kind="stable")                        # [A]
    counts = xp.bincount(flat, minlength=n_experts)                # [E]
    C = int(to_numpy(counts).max())
    expert_sorted = flat[order]                                    # [A] non-decreasing expert ids
    start = xp.cumsum(counts) - counts                             # [E] first sorted row of each expert
    rank = xp.arange(N * K) - start[expert_sorted]                 # [A] position within the expert
    slot = xp.empty_like(order)
    slot[order] = expert_sorted * C + rank                         # a permutation into E*C rows
    return slot, C


def experts_forward(x, w_gate, w_up, w_down, topk_idx):
    """As ``refmoe.experts.experts_forward``: -> (expert_out [N, K, D], cache)."""
    xp = array_namespace(x)
    (N, D), K, E = x.shape, topk_idx.shape[1], w_gate.shape[0]
    slot, C = padded_slots(topk_idx, E)
    if E * C > PAD_LIMIT * N * K:
        return loop.experts_forward(x, w_gate, w_up, w_down, topk_idx)
    x_pad = xp.zeros((E * C, D), dtype=x.dtype)                    # [E*C, D] zero rows give zero outputs
    x_pad[slot.reshape(N, K)] = x[:, None, :]                      # token i into its K rows
    out_pad, c = ops.swiglu_forward(x_pad.reshape(E, C, D), w_gate, w_up, w_down)   # [E, C, D]
    return out_pad.reshape(E * C, D)[slot].reshape(N, K, D), PaddedCache(slot, C, c)


def experts_backward(d_expert_out, cache):
    """As ``refmoe.experts.experts_backward``: -> (dx [N, D], dw_gate, dw_up, dw_down)."""
    if isinstance(cache, loop.ExpertsCache):
        return loop.experts_backward(d_expert_out, cache)
    xp = array_namespace(d_expert_out)
    N, K, D = d_expert_out.shape
    E, C = cache.swiglu.w_gate.shape[0], cache.capacity
    d_pad = xp.zeros((E * C, D), dtype=d_expert_out.dtype)         # [E*C, D]
    d_pad[cache.slot] = d_expert_out.reshape(N * K, D)
    dx_pad, dw_gate, dw_up, dw_down = ops.swiglu_backward(d_pad.reshape(E, C, D), cache.swiglu)
    dx = dx_pad.reshape(E * C, D)[cache.slot].reshape(N, K, D).sum(axis=1)   # [N, D]
    return dx, dw_gate, dw_up, dw_down
