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

from .backend import array_namespace, to_numpy

__all__ = [
    "RoutingChanged",
    "rel_error",
    "numerical_vjp",
    "directional_check",
    "check_vjp",
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

    All named inputs move together along one joint direction. Returns the largest relative error
    over ``n_directions`` directions (floored as in :func:`rel_error`).
    """
    names = list(inputs) if names is None else list(names)
    base_key = _routing_key(guard, inputs)
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
        worst = max(worst, abs(numeric - analytic) / max(1e-8, abs(numeric) + abs(analytic)))
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
