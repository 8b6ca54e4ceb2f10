"""Ready-made finite-difference checks of the layer and of each loss composed with it.

Used by ``refmoe gradcheck`` (and useful in a notebook): every check builds a small random float64 instance on
the chosen backend, differentiates a scalar by central differences with the routing guard on, and compares with
the hand-derived backward. A check is ``(name, loss_on_cache)`` where ``loss_on_cache(cache) -> (value,
d_scores, d_expert_out)`` is a loss of the layer's intermediates with its gradient on them.
"""
from __future__ import annotations

import numpy as np

from . import gradcheck as gc
from .backend import get_xp
from .config import MoEConfig
from .layer import init_params, moe_backward, moe_forward
from .losses.aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward


LOSS_NAMES = {"aux": "L_aux", "ortho": "L_o", "var": "L_v"}


def cache_loss(loss: str, variant: str):
    """Loss ``loss`` ("aux", "ortho" or "var") in form ``variant`` as a function of the layer's cache:
    ``cache -> (value, d_scores, d_expert_out)`` with the gradient for dloss = 1 on the intermediate the loss
    reads (the other is None). Batch-scoped forms see the whole batch as one sequence."""
    from .losses import ortho, variance

    if loss == "aux":
        def on_cache(cache):
            value, c = aux_loss_forward(cache.scores, cache.topk_idx, variant, batch_shape=(1, cache.scores.shape[0]))
            return value, aux_loss_backward(1.0, c), None
    elif loss == "ortho":
        def on_cache(cache):
            value, c = ortho.ortho_loss_forward(cache.expert_out, variant, topk_idx=cache.topk_idx)
            return value, None, ortho.ortho_loss_backward(1.0, c)
    elif loss == "var":
        def on_cache(cache):
            value, c = variance.var_loss_forward(cache.scores, cache.topk_idx, variant)
            return value, variance.var_loss_backward(1.0, c), None
    else:
        raise ValueError(f"loss={loss!r} is not one of {sorted(LOSS_NAMES)}")
    return on_cache


def loss_checks() -> list:
    """``(name, loss_on_cache)`` for every loss form in this install: L_aux forms, then L_o and L_v forms."""
    from .losses import ortho, variance

    forms = ([("aux", v) for v in sorted(AUX_VARIANTS)] + [("ortho", v) for v in ortho.ORTHO_VARIANTS]
             + [("var", v) for v in variance.VAR_VARIANTS])
    return [(f"{LOSS_NAMES[loss]}[{v}] through the layer", cache_loss(loss, v)) for loss, v in forms]


def run_all_checks(cfg: MoEConfig, n_tokens: int, *, backend: str = "numpy", seed: int = 0) -> list:
    """Rows ``{"check", "wrt", "error", "max_abs_grad", "max_abs_numeric"}``: the layer alone (random upstream gradients on y, scores and
    expert_out), then each loss through the layer, for x and every parameter."""
    xp = get_xp(backend)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng, dtype=np.float64, backend=backend)
    x = xp.asarray(rng.standard_normal((n_tokens, cfg.d_model)))
    y, cache = moe_forward(x, params, cfg)
    dy = xp.asarray(rng.standard_normal(y.shape))
    ds = xp.asarray(rng.standard_normal(cache.scores.shape))
    de = xp.asarray(rng.standard_normal(cache.expert_out.shape))
    inputs = {"x": x, **params}

    def split(a):
        return a["x"], {k: a[k] for k in params}

    def guard(a):
        return moe_forward(*split(a), cfg)[1].topk_idx

    def layer_phi(a):
        y_, c_ = moe_forward(*split(a), cfg)
        return float((y_ * dy).sum() + (c_.scores * ds).sum() + (c_.expert_out * de).sum())

    def table(name, grads, errs, numeric):
        return [{"check": name, "wrt": k, "error": e, "max_abs_grad": float(abs(grads[k]).max()),
                 "max_abs_numeric": float(abs(numeric[k]).max())} for k, e in errs.items()]

    def compare(phi, grads):
        numeric = gc.numerical_vjp(phi, inputs, names=list(grads), guard=guard)
        return {k: gc.rel_error(grads[k], numeric[k]) for k in grads}, numeric

    grads = moe_backward(dy, cache, d_scores=ds, d_expert_out=de)
    rows = table("layer (y, scores, expert_out)", grads, *compare(layer_phi, grads))
    for name, loss_on_cache in loss_checks():
        _, d_scores, d_eo = loss_on_cache(cache)
        grads = moe_backward(None, cache, d_scores=d_scores, d_expert_out=d_eo)
        rows += table(name, grads, *compare(lambda a: float(loss_on_cache(moe_forward(*split(a), cfg)[1])[0]), grads))
    return rows


# A gradient that is zero by construction (no path, or a loss that is constant, e.g. L_aux with K = E) cannot be
# judged by a relative error: central differences of an O(1) scalar carry ~1e-10 of round-off, which the 1e-8
# floor turns into ~1e-2. Such a row passes when the hand-derived gradient is zero to round-off and the
# differences are below this absolute resolution.
FD_ZERO_RESOLUTION = 1e-7


def row_status(row: dict, tol: float) -> str:
    """'ok', 'zero' (zero gradient, confirmed to FD resolution) or 'FAIL'."""
    if row["max_abs_grad"] <= 1e-12 and row["max_abs_numeric"] <= FD_ZERO_RESOLUTION:
        return "zero"
    return "ok" if row["error"] <= tol else "FAIL"
