"""Finite-difference gradient checks (float64), public so that users can check their own code.

The check is a numerical vector-Jacobian product: for a function ``f`` of named arrays and a random
upstream gradient ``dout``, the scalar ``phi = <dout, f(inputs)>`` is differentiated by central differences

    d phi / d a_i  ~  (phi(a + h e_i) - phi(a - h e_i)) / (2 h)

and compared with the hand-derived backward via :func:`rel_error`. In float64 with h = 1e-6 the
truncation error is O(h^2) and the round-off O(eps |phi| / h), so a correct backward gives a relative
error around 1e-9 to 1e-11; 1e-7 is the pass mark used throughout the tests.

For tensors too large to perturb entry by entry, :func:`directional_check` compares one directional
derivative along a random unit direction with ``<grad, direction>``.

MoE routing is piecewise: the top-k set can flip between ``a + h`` and ``a - h``, where the function is
not differentiable and the check means nothing. Pass ``guard`` (a function of the inputs returning the
routing, e.g. the top-k indices) and every perturbation is verified to keep it identical;
:class:`RoutingChanged` is raised otherwise.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .backend import array_namespace, get_xp, to_numpy
from .config import MoEConfig
from .layer import init_params, moe_backward, moe_forward
from .losses.terms import TERM_FORMS, term_backward, term_forward

__all__ = [
    "RoutingChanged",
    "rel_error",
    "numerical_vjp",
    "directional_check",
    "check_vjp",
    "run_all_checks",
    "row_status",
]


class RoutingChanged(RuntimeError):
    """A finite-difference step changed the discrete routing, so the check would be meaningless."""


def rel_error(a, b, floor: float = 1e-8) -> float:
    """max|a - b| / max(floor, max|a| + max|b|): a relative error that is safe for near-zero gradients."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    num = float(np.max(np.abs(a - b)))
    den = max(floor, float(np.max(np.abs(a)) + np.max(np.abs(b))))
    return num / den


def _phi(f, inputs, dout) -> float:
    out = f(inputs)
    if dout is None:
        return float(out)
    xp = array_namespace(out, dout)
    return float(xp.sum(out * dout))


def _routing_key(guard, inputs):
    return None if guard is None else to_numpy(guard(inputs)).tobytes()


def numerical_vjp(
    f: Callable[[Mapping], object],
    inputs: Mapping,
    dout=None,
    *,
    names=None,
    h: float = 1e-6,
    guard: Callable[[Mapping], object] | None = None,
) -> dict:
    """Central-difference gradient of ``<dout, f(inputs)>`` for each named input.

    f       function of a dict of arrays, returning an array (or a scalar when ``dout`` is None)
    inputs  dict name -> float64 array; perturbed one entry at a time and restored exactly
    dout    upstream gradient, same shape as f's output (None for scalar f)
    names   which inputs to differentiate (default: all)
    guard   optional function of the inputs whose value (e.g. top-k indices) must not change
    """
    inputs = dict(inputs)
    names = list(inputs) if names is None else list(names)
    base_key = _routing_key(guard, inputs)
    grads = {}
    for name in names:
        a = inputs[name]
        if a.dtype != np.float64:
            raise TypeError(f"numerical_vjp needs float64 inputs; {name!r} is {a.dtype}")
        xp = array_namespace(a)
        work = a.copy()
        inputs[name] = work
        flat = work.reshape(-1)  # a view: writes reach ``work``
        grad = np.zeros(a.size, dtype=np.float64)
        for i in range(a.size):
            old = flat[i].item()
            values = []
            for step in (h, -h):
                flat[i] = old + step
                if guard is not None and _routing_key(guard, inputs) != base_key:
                    flat[i] = old
                    raise RoutingChanged(f"routing changed when {name}[{i}] moved by {step:+g}")
                values.append(_phi(f, inputs, dout))
            flat[i] = old
            grad[i] = (values[0] - values[1]) / (2.0 * h)
        inputs[name] = a
        grads[name] = xp.asarray(grad.reshape(a.shape)) if xp is not np else grad.reshape(a.shape)
    return grads


def directional_check(
    f: Callable[[Mapping], object],
    inputs: Mapping,
    grads: Mapping,
    rng: np.random.Generator,
    dout=None,
    *,
    names=None,
    h: float = 1e-6,
    n_directions: int = 3,
    guard: Callable[[Mapping], object] | None = None,
) -> float:
    """Compare ``<grad, v>`` with a central difference of ``<dout, f>`` along random unit directions ``v``.

    All named inputs move together along one joint direction. Returns the largest error over ``n_directions``
    directions, relative to ``|numeric| + |analytic|`` or, where that is smaller, to the typical size of a
    directional derivative, ``||grad|| / sqrt(n)`` for n entries in all (floor 1e-8). A random direction can
    nearly cancel the gradient (``<grad, v>`` 1e-4 times its typical size, seen on a 2-token layer); measured
    against ``<grad, v>`` alone, the central difference's rounding (about 1e-16 / h times the function's size)
    would then read as an error of 1e-4. An error in the gradient keeps its size relative to the typical one.
    """
    names = list(inputs) if names is None else list(names)
    base_key = _routing_key(guard, inputs)
    n_entries = sum(int(np.prod(inputs[name].shape)) for name in names)
    typical = np.sqrt(sum(float((to_numpy(grads[name]) ** 2).sum()) for name in names) / max(1, n_entries))
    worst = 0.0
    for _ in range(n_directions):
        dirs = {}
        for name in names:
            v = rng.standard_normal(inputs[name].shape)
            xp = array_namespace(inputs[name])
            dirs[name] = xp.asarray(v) if xp is not np else v
        norm = np.sqrt(sum(float((to_numpy(v) ** 2).sum()) for v in dirs.values()))
        values = []
        for step in (h, -h):
            moved = dict(inputs)
            for name in names:
                moved[name] = inputs[name] + (step / norm) * dirs[name]
            if guard is not None and _routing_key(guard, moved) != base_key:
                raise RoutingChanged(f"routing changed along a random direction at step {step:+g}")
            values.append(_phi(f, moved, dout))
        numeric = (values[0] - values[1]) / (2.0 * h)
        analytic = sum(float(to_numpy(grads[name] * dirs[name]).sum()) for name in names) / norm
        scale = max(1e-8, abs(numeric) + abs(analytic), typical)
        worst = max(worst, abs(numeric - analytic) / scale)
    return worst


def check_vjp(
    f: Callable[[Mapping], object],
    inputs: Mapping,
    analytic: Mapping,
    dout=None,
    *,
    names=None,
    h: float = 1e-6,
    guard: Callable[[Mapping], object] | None = None,
) -> dict:
    """Relative error of each analytic gradient against :func:`numerical_vjp`; a dict name -> float."""
    names = list(analytic) if names is None else list(names)
    numeric = numerical_vjp(f, inputs, dout, names=names, h=h, guard=guard)
    return {name: rel_error(analytic[name], numeric[name]) for name in names}


# ----------------------------------------------------------------------------------------------
# ready-made checks of the layer and of each loss form through it (``refmoe gradcheck``)
# ----------------------------------------------------------------------------------------------
# Every check builds a small random float64 instance on the chosen backend, differentiates a scalar by
# central differences with the routing guard on, and compares with the hand-derived backward. A check is
# ``(name, loss_on_cache)`` where ``loss_on_cache(cache) -> (value, d_scores, d_expert_out)``.

LOSS_NAMES = {"aux": "L_aux", "ortho": "L_o", "var": "L_v"}


def cache_loss(term: str, form: str):
    """Regulariser ``term`` in form ``form`` as a function of the layer's cache: ``cache -> (value, d_scores,
    d_expert_out)`` with the gradient for dloss = 1 on the intermediate it reads (the other is None), through
    :func:`refmoe.losses.term_forward` / :func:`~refmoe.losses.term_backward`. Batch-scoped forms see the
    whole batch as one sequence."""
    if term not in LOSS_NAMES:
        raise ValueError(f"term={term!r} is not one of {sorted(LOSS_NAMES)}")

    def on_cache(cache):
        value, tc = term_forward(term, form, cache)
        inj = term_backward(1.0, tc)
        d_scores, d_expert_out = inj.d_scores, inj.d_expert_out
        return value, d_scores, d_expert_out
    return on_cache


def loss_checks() -> list:
    """``(name, loss_on_cache)`` for every loss form in this install: L_aux forms, then L_o and L_v forms."""
    forms = [(term, v) for term in LOSS_NAMES for v in (sorted if term == "aux" else list)(TERM_FORMS[term])]
    return [(f"{LOSS_NAMES[term]}[{v}] through the layer", cache_loss(term, v)) for term, v in forms]


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
        numeric = numerical_vjp(phi, inputs, names=list(grads), guard=guard)
        return {k: rel_error(grads[k], numeric[k]) for k in grads}, numeric

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
