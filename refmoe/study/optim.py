r"""Adam and AdamW, written out (Kingma & Ba 2015; Loshchilov & Hutter 2019), on dicts of arrays.

For every parameter w with gradient g at step t = 1, 2, ...:

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2

    \hat m_t = m_t / (1-\beta_1^t),\qquad \hat v_t = v_t / (1-\beta_2^t)

    w_t = w_{t-1} - \eta\,\big(\hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda w_{t-1}\big)

``decoupled=True`` (AdamW) applies the weight decay lambda directly as above; ``decoupled=False`` (Adam with
L2) adds lambda w to g before the moments instead. Both follow ``torch.optim.Adam`` / ``AdamW`` exactly,
which the tests use as an oracle. ``adam_step`` is pure: new arrays are returned, the inputs are not modified.
``adam_step_inplace`` writes the same numbers into the parameters and moments themselves (a training loop
replayed from a CUDA graph reads its parameters at fixed addresses); on CuPy it is one fused kernel per
parameter instead of about eight, with every operation rounded as the array form rounds it (``__fmul_rn``
and friends: no fused multiply-add), so the two agree bit for bit.
Numerics: constants enter as Python floats, so float32 parameters stay float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import array_namespace
from ..fast.switch import kernels_on


class AdamState(NamedTuple):
    m: dict        # name -> first moment (same shape and dtype as the parameter)
    v: dict        # name -> second moment
    t: int         # number of updates taken


class AdamConfig(NamedTuple):
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = True


def _check_config(c: AdamConfig):
    if not (c.lr >= 0 and math.isfinite(c.lr)):
        raise ValueError(f"lr={c.lr} must be finite and >= 0")
    for name in ("beta1", "beta2"):
        b = getattr(c, name)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}={b} must be in [0, 1)")
    if not c.eps > 0:
        raise ValueError(f"eps={c.eps} must be > 0")
    if not c.weight_decay >= 0:
        raise ValueError(f"weight_decay={c.weight_decay} must be >= 0")


def _check_step(params: dict, grads: dict, config: AdamConfig):
    """The checks of one update, all before any arithmetic: the config, a gradient of the parameter's library,
    shape and dtype for every parameter."""
    _check_config(config)
    missing = [k for k in params if k not in grads]
    if missing:
        raise ValueError(f"grads lack {missing}")
    for k, w in params.items():
        g = grads[k]
        array_namespace(w, g)
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            raise ValueError(f"grads[{k!r}] is {g.dtype}{tuple(g.shape)}, parameter is {w.dtype}{tuple(w.shape)}")


def _bias_corrections(c: AdamConfig, t: int):
    """(1 - beta1^t, 1 - beta2^t)."""
    return 1.0 - c.beta1 ** t, 1.0 - c.beta2 ** t


def adam_init(params: dict) -> AdamState:
    """Zero moments for every parameter of ``params``."""
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of arrays")
    xp = array_namespace(*params.values())
    return AdamState({k: xp.zeros_like(w) for k, w in params.items()},
                     {k: xp.zeros_like(w) for k, w in params.items()}, 0)


def adam_step(params: dict, grads: dict, state: AdamState, config: AdamConfig = AdamConfig()):
    """One Adam/AdamW update.  Returns (new params, new AdamState).

    ``grads`` must hold a gradient for every key of ``params`` (extra keys, such as 'x', are ignored),
    with the same shape and dtype.
    """
    _check_step(params, grads, config)
    c = config
    t = state.t + 1
    bc1, bc2 = _bias_corrections(c, t)
    new_p, new_m, new_v = {}, {}, {}
    for k, w in params.items():
        g = grads[k]
        xp = array_namespace(w, g)
        if c.weight_decay and not c.decoupled:
            g = g + c.weight_decay * w                                  # L2 penalty inside the moments
        m = c.beta1 * state.m[k] + (1.0 - c.beta1) * g
        v = c.beta2 * state.v[k] + (1.0 - c.beta2) * (g * g)
        step = (m / bc1) / (xp.sqrt(v / bc2) + c.eps)
        if c.weight_decay and c.decoupled:
            step = step + c.weight_decay * w                            # AdamW: decay outside the moments
        new_p[k] = w - c.lr * step
        new_m[k], new_v[k] = m, v
    return new_p, AdamState(new_m, new_v, t)


# the same arithmetic as adam_step, one operation per line, each correctly rounded (so no contraction to an FMA)
_ADAM_PREAMBLE = """
__device__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
"""
_ADAM_BODY = """
T gg = l2 ? add_rn(g, mul_rn(wd, w)) : g;
m = add_rn(mul_rn(b1, m), mul_rn(omb1, gg));
v = add_rn(mul_rn(b2, v), mul_rn(omb2, mul_rn(gg, gg)));
T step = div_rn(div_rn(m, bc1), add_rn(sqrt_rn(div_rn(v, bc2)), eps));
if (decoupled) step = add_rn(step, mul_rn(wd, w));
w = add_rn(w, -mul_rn(lr, step));
"""
_KERNEL = {}


def adam_step_inplace(params: dict, grads: dict, state: AdamState, config: AdamConfig = AdamConfig()) -> AdamState:
    """``adam_step`` written into ``params`` and the moments of ``state`` (same arrays, same numbers).
    Returns the AdamState of the next step (the same moment dicts, t + 1)."""
    xp = array_namespace(*params.values())
    if not kernels_on(xp):
        new_p, new_state = adam_step(params, grads, state, config)
        for k, w in params.items():
            w[...], state.m[k][...], state.v[k][...] = new_p[k], new_state.m[k], new_state.v[k]
        return AdamState(state.m, state.v, new_state.t)
    _check_step(params, grads, config)
    c, t = config, state.t + 1
    bc1, bc2 = _bias_corrections(c, t)
    if "adam" not in _KERNEL:
        _KERNEL["adam"] = xp.ElementwiseKernel(
            "T g, T b1, T omb1, T b2, T omb2, T bc1, T bc2, T eps, T lr, T wd, bool l2, bool decoupled",
            "T w, T m, T v", _ADAM_BODY, "refmoe_adam", preamble=_ADAM_PREAMBLE)
    for k, w in params.items():
        T = w.dtype.type
        _KERNEL["adam"](grads[k], T(c.beta1), T(1.0 - c.beta1), T(c.beta2), T(1.0 - c.beta2), T(bc1), T(bc2),
                        T(c.eps), T(c.lr), T(c.weight_decay), bool(c.weight_decay and not c.decoupled),
                        bool(c.weight_decay and c.decoupled), w, state.m[k], state.v[k])
    return AdamState(state.m, state.v, t)
