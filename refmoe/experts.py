"""The routed experts: dispatch by one stable sort, one SwiGLU per expert, outputs back in token order.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k,
A = N*K (token, slot) assignments.

The A assignments are sorted by expert id once (stable, so tokens keep their order within an expert);
expert e runs its SwiGLU on the contiguous block ``sorted[offsets[e]:offsets[e+1]]``; the inverse
permutation (a plain assignment, no scatter-add: it has no duplicates) brings the outputs back to a
token-major [N, K, D] buffer of unweighted expert outputs, which the orthogonality loss reads.

``refmoe.fast`` has a batched implementation with the same two signatures, tested equal to this one.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import ops
from .backend import array_namespace, to_numpy


class Dispatch(NamedTuple):
    order: object       # [A] permutation: sorted position -> flat (token, slot) position
    token: object       # [A] token index of each sorted assignment
    offsets: tuple      # E + 1 host ints: assignments of expert e are sorted[offsets[e]:offsets[e+1]]


class ExpertsCache(NamedTuple):
    dispatch: Dispatch
    swiglu: tuple       # E entries: ops.SwigluCache, or None for an expert with no tokens
    w_gate: object      # [E, D, H]
    w_up: object        # [E, D, H]
    w_down: object      # [E, H, D]


def dispatch(topk_idx, n_experts: int) -> Dispatch:
    """Sort the flat assignments by expert id (stable).  topk_idx: [N, K] -> Dispatch.

    The offsets are E + 1 host integers: one small explicit device->host read on CuPy.
    """
    xp = array_namespace(topk_idx)
    K = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)                                    # [A]
    order = xp.argsort(flat, kind="stable")                        # [A]
    token = order // K                                             # [A]
    counts = to_numpy(xp.bincount(flat, minlength=n_experts))      # [E] on the host
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))
    return Dispatch(order, token, offsets)


def experts_forward(x, w_gate, w_up, w_down, topk_idx):
    """Unweighted outputs of each token's selected experts.

    x: [N, D], w_gate, w_up: [E, D, H], w_down: [E, H, D], topk_idx: [N, K] -> (expert_out [N, K, D], ExpertsCache)
    """
    xp = array_namespace(x)
    (N, D), K, E = x.shape, topk_idx.shape[1], w_gate.shape[0]
    plan = dispatch(topk_idx, E)
    x_sorted = x[plan.token]                                       # [A, D]
    out_sorted = xp.empty_like(x_sorted)                           # [A, D]
    swiglu = []
    for e in range(E):
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        if lo == hi:
            swiglu.append(None)
            continue
        out_sorted[lo:hi], c = ops.swiglu_forward(x_sorted[lo:hi], w_gate[e], w_up[e], w_down[e])
        swiglu.append(c)
    expert_flat = xp.empty_like(out_sorted)                        # [A, D] token-major
    expert_flat[plan.order] = out_sorted                           # a permutation: no duplicates
    return expert_flat.reshape(N, K, D), ExpertsCache(plan, tuple(swiglu), w_gate, w_up, w_down)


def experts_backward(d_expert_out, cache: ExpertsCache):
    """d_expert_out: [N, K, D] -> (dx [N, D] summed over a token's slots, dw_gate, dw_up, dw_down)."""
    xp = array_namespace(d_expert_out)
    N, K, D = d_expert_out.shape
    plan = cache.dispatch
    d_out_sorted = d_expert_out.reshape(N * K, D)[plan.order]      # [A, D]
    dx_sorted = xp.zeros_like(d_out_sorted)                        # [A, D]
    dw_gate, dw_up, dw_down = (xp.zeros_like(w) for w in (cache.w_gate, cache.w_up, cache.w_down))
    for e, c in enumerate(cache.swiglu):
        if c is None:
            continue
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        dx_sorted[lo:hi], dw_gate[e], dw_up[e], dw_down[e] = ops.swiglu_backward(d_out_sorted[lo:hi], c)
    dx_flat = xp.empty_like(dx_sorted)                             # [A, D] token-major
    dx_flat[plan.order] = dx_sorted
    return dx_flat.reshape(N, K, D).sum(axis=1), dw_gate, dw_up, dw_down
