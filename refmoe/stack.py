r"""A stack of residual MoE blocks, and where each layer's regularisers reach the layers below.

Dimension letters: N tokens, D model width, L layers.

    h_0 = x,   h_{l+1} = h_l + MoE_l(h_l),   out = h_L,   L_h = (1/(N D)) ||out - t||^2

Every layer adds its own alpha L_aux + beta L_o + gamma L_v (one ``Objective`` for all layers). The backward
runs the layers in reverse: layer l receives dh_{l+1}, the gradient on its output, and passes on

    dh_l = dh_{l+1} + dx_l          (residual path + the layer's own input gradient, regularisers included)

The paper's "compatibility" (L_aux and L_v never touch the experts, L_o never the router) holds inside one
layer only: a top layer's L_aux reaches the experts *and* the router of the layers below through h.
:func:`upstream_term_grads` measures exactly that.
"""
from __future__ import annotations

from typing import NamedTuple

from .layer import moe_backward, moe_forward
from .losses.task import mse_backward, mse_forward
from .objective import objective_forward_backward

TERMS = ("task", "aux", "ortho", "var")


class StackResult(NamedTuple):
    task: object        # 0-d L_h
    dy: object          # [N, D] dL_h/dout
    hidden: list        # L+1 arrays [N, D]: h_0 = x, ..., h_L = out
    results: list       # per layer, its ObjectiveResult (run with dy = dh_{l+1})
    grads: list         # per layer, the gradient of the whole stacked objective on its parameters


def stack_forward_backward(x, params_list: list, cfg, target, objective, *, per_term: bool = False) -> StackResult:
    """Forward and backward of L_h(h_L, t) + sum_l (alpha L_aux^l + beta L_o^l + gamma L_v^l)."""
    if not params_list:
        raise ValueError("params_list must hold at least one layer")
    hidden = [x]
    for p in params_list:
        y, _ = moe_forward(hidden[-1], p, cfg)
        hidden.append(hidden[-1] + y)
    task, r = mse_forward(hidden[-1], target)
    dy = mse_backward(1.0, r)
    dh = dy                                                        # gradient on h_{l+1}
    results, grads = [None] * len(params_list), [None] * len(params_list)
    for l in reversed(range(len(params_list))):
        res = objective_forward_backward(hidden[l], params_list[l], cfg, dh, objective, per_term=per_term)
        results[l] = res
        grads[l] = res.grads["total"]
        dh = dh + res.grads["total"]["x"]                          # residual path + through the layer
    return StackResult(task, dy, hidden, results, grads)


def upstream_term_grads(stack: StackResult, top: int, below: int) -> dict:
    """term -> gradient on the parameters of layer ``below`` caused by layer ``top``'s term alone.

    Needs ``per_term=True``. For 'task' it is the task gradient that reaches layer ``top``'s input (the
    residual path plus the path through layer ``top``); for 'aux', 'ortho', 'var' it is that term of layer
    ``top`` only. Between the two layers the gradient is carried by the residual identity and, for layers
    strictly in between, by their backward without regularisers.
    """
    if not 0 <= below < top < len(stack.results):
        raise ValueError(f"need 0 <= below < top < L, got below={below}, top={top}, L={len(stack.results)}")
    res = stack.results[top]
    if "task" not in res.grads:
        raise ValueError("run stack_forward_backward with per_term=True")
    out = {}
    for term in TERMS:
        g = res.grads[term]["x"]
        if term == "task":
            g = g + _task_grad_on_output(stack, top)
        for l in range(top - 1, below, -1):                         # through the layers in between
            g = g + moe_backward(g, stack.results[l].cache)["x"]
        out[term] = moe_backward(g, stack.results[below].cache)
    return out


def _task_grad_on_output(stack: StackResult, layer: int):
    """dL_h/dh_{layer+1}, the task-only gradient on the output of ``layer`` (no regulariser above it)."""
    g = stack.dy
    for l in range(len(stack.results) - 1, layer, -1):
        g = g + moe_backward(g, stack.results[l].cache)["x"]
    return g
