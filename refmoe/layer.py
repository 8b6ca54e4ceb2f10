"""The MoE layer: router, top-k, SwiGLU experts, optional shared experts. Forward and hand-derived backward.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k,
Hs = n_shared * H the hidden width of the fused shared expert.

The composition, one line per piece (``refmoe.router``, ``refmoe.experts``, ``refmoe.ops``):

    topk_idx, g = router(x)                 [N, K]   logits, scores [N, E] in the router's cache
    x~          = experts(x, topk_idx)      [N, K, D] unweighted outputs of each token's selected experts
    y_i         = sum_k g_ik x~_ik + shared(x_i)     [N, D]

The backward runs the pieces in reverse. Losses inject their gradients on the intermediates they read:
``d_scores`` [N, E] (L_aux, L_v) into the router, ``d_expert_out`` [N, K, D] (L_o) into the experts.
``refmoe.fast`` runs the same composition with batched experts (:func:`forward_with`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import experts as routed_experts
from . import ops
from .backend import array_namespace, backend_name, get_xp
from .checks import FLOAT_DTYPES, all_finite, check_float_array, first_not_finite, max_abs, not_finite_error
from .config import MoEConfig
from .router import RouterCache, router_backward, router_forward


def param_shapes(cfg: MoEConfig) -> dict:
    """Name -> shape of every parameter of a layer with this config."""
    D, H, E = cfg.d_model, cfg.d_hidden, cfg.n_experts
    shapes = {"w_router": (E, D), "w_gate": (E, D, H), "w_up": (E, D, H), "w_down": (E, H, D)}
    if cfg.n_shared:
        Hs = cfg.d_shared
        shapes.update(shared_w_gate=(D, Hs), shared_w_up=(D, Hs), shared_w_down=(Hs, D))
    return shapes


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------

def init_params(cfg: MoEConfig, rng, dtype=np.float64, backend: str | None = None) -> dict:
    """Random parameters: N(0, 1/fan_in) entries, drawn in float64 on the host from ``rng``, then cast.

    rng      a ``numpy.random.Generator`` (or an int seed); the same seed gives the same values on
             every backend and dtype (up to the cast), which the parity tests rely on
    dtype    float32 or float64
    backend  "numpy" or "cupy" (default: $REFMOE_BACKEND, then numpy); the arrays are created there
    """
    dtype = np.dtype(dtype)
    if dtype.type not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; use float32 or float64")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    xp = get_xp(backend)
    fan_in = {"w_router": cfg.d_model, "w_gate": cfg.d_model, "w_up": cfg.d_model, "w_down": cfg.d_hidden,
              "shared_w_gate": cfg.d_model, "shared_w_up": cfg.d_model, "shared_w_down": cfg.d_shared}
    params = {}
    for name, shape in param_shapes(cfg).items():
        host = rng.standard_normal(shape) / np.sqrt(fan_in[name])
        params[name] = xp.asarray(host.astype(dtype))
    return params


def _check_params(params, cfg: MoEConfig):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in params]
    if missing:
        raise ValueError(f"params lack {missing} for {cfg}")
    extra = [k for k in params if k not in expected]
    if extra:
        raise ValueError(f"params have unexpected keys {extra} for {cfg} (shared keys need n_shared > 0)")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {shape}")


def _check_input(x, params, cfg: MoEConfig):
    xp = array_namespace(x, *params.values())
    if getattr(x, "ndim", None) == 2 and x.shape[0] == 0:
        raise ValueError("x has N=0 tokens; the layer needs at least one")
    if getattr(x, "ndim", None) == 2 and x.shape[1] != cfg.d_model:
        raise ValueError(f"x has D={x.shape[1]}, config has d_model={cfg.d_model}")
    if getattr(x, "dtype", None) is not None and x.dtype.type not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; use float32 or float64")
    for name, w in params.items():
        if w.dtype != x.dtype:
            raise TypeError(f"params[{name!r}] is {w.dtype} but x is {x.dtype}; cast one explicitly")
    check_float_array(x, "x", "[N, D]", finite=False)          # finiteness: checked on y (one reduction)
    return xp


def _not_finite_inputs(xp, what, named: dict, dtype) -> ValueError:
    """The error for a non-finite result ``what``: the first input (name -> array) with a NaN or inf, or else
    the inputs with the largest magnitudes, which are then finite but too large for ``dtype``."""
    bad = first_not_finite(xp, named)
    if bad is not None:
        return ValueError(f"{bad} contains NaN or inf")
    present = {k: v for k, v in named.items() if v is not None}
    first = next(iter(present))                              # x or dy: always named
    largest = max((k for k in present if k != first), key=lambda k: max_abs(present[k]), default=None)
    shown = {first: present[first]} if largest is None else {first: present[first], largest: present[largest]}
    return not_finite_error(what, shown, dtype)


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------

class MoECache(NamedTuple):
    """Everything the backward needs; the first fields are the intermediates a reader wants to see."""
    logits: object          # [N, E]   x W_r^T
    scores: object          # [N, E]   full softmax
    topk_idx: object        # [N, K]   int64, descending score
    gates: object           # [N, K]   combine weights (renormalised when norm_topk_prob)
    expert_out: object      # [N, K, D] unweighted outputs of the selected experts, token-major
    shared_out: object      # [N, D] or None
    x: object               # [N, D]
    cfg: MoEConfig
    params: dict            # a snapshot of the dict passed in (the same arrays): rebinding a key later
                            # does not reach the backward; update arrays in place only after it
    router: RouterCache
    experts: object         # the experts' cache (``refmoe.experts.ExpertsCache`` on the reading path)
    experts_backward: object   # the backward that matches the forward that made ``experts``
    shared: object          # ops.SwigluCache or None


def moe_forward(x, params: dict, cfg: MoEConfig):
    """Forward pass of the layer.  x: [N, D] -> (y [N, D], MoECache).

    Raises ValueError / TypeError for bad shapes, dtypes or a NumPy/CuPy mix, and ValueError when y is not
    finite, naming the input that holds a NaN or inf ("params['w_up'] contains NaN or inf"), or, when every
    input is finite, the ones too large for the dtype ("layer output y is not finite: x and
    params['w_router'] are finite but too large (max |x| = 1e+30, ...) for float32").
    The cache keeps a snapshot of the ``params`` dict (the same arrays): rebinding a key afterwards does not
    reach the backward, but the arrays are not copied, so update them in place only after ``moe_backward``.
    Numerics: one sum of y and one host sync check it (``refmoe.checks.all_finite``); the inputs are searched
    only when it fails.
    A non-finite weight that no token reads (an expert nobody routes to) leaves y finite and is not reported.
    """
    return forward_with(routed_experts, x, params, cfg)


def forward_with(experts, x, params: dict, cfg: MoEConfig):
    """:func:`moe_forward` with another implementation of the routed experts.

    experts  a module (or object) with ``experts_forward(x, w_gate, w_up, w_down, topk_idx) ->
             (expert_out [N, K, D], cache)`` and ``experts_backward(d_expert_out, cache) ->
             (dx [N, D], dw_gate, dw_up, dw_down)``, equal to ``refmoe.experts`` (``refmoe.fast`` has one)
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    _check_params(params, cfg)
    xp = _check_input(x, params, cfg)
    params = dict(params)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):    # a non-finite y raises below
        (topk_idx, gates), router = router_forward(x, params["w_router"], cfg.top_k, cfg.norm_topk_prob)
        expert_out, experts_cache = experts.experts_forward(
            x, params["w_gate"], params["w_up"], params["w_down"], topk_idx)    # [N, K, D]
        y = _combine(gates, expert_out)                                          # [N, D]
        shared_out = shared = None
        if cfg.n_shared:
            shared_out, shared = ops.swiglu_forward(
                x, params["shared_w_gate"], params["shared_w_up"], params["shared_w_down"])   # [N, D]
            y = y + shared_out
    if not all_finite(xp, y):
        raise _not_finite_inputs(xp, "layer output y", {"x": x, **{f"params[{k!r}]": w for k, w in params.items()}},
                                 x.dtype)

    cache = MoECache(router.logits, router.scores, topk_idx, gates, expert_out, shared_out, x, cfg, params,
                     router, experts_cache, experts.experts_backward, shared)
    return y, cache


def _combine(gates, expert_out):
    """y_i = sum_k g_ik x~_ik.  gates [N, K], expert_out [N, K, D] -> [N, D]."""
    return array_namespace(gates).einsum("nk,nkd->nd", gates, expert_out)


def _check_upstream(name, g, shape, ref):
    if g is None:
        return
    array_namespace(g, ref)
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(g.shape)}, expected {tuple(shape)}")
    if g.dtype != ref.dtype:
        raise TypeError(f"{name} is {g.dtype} but the layer ran in {ref.dtype}")


def moe_backward(dy, cache: MoECache, d_scores=None, d_expert_out=None) -> dict:
    """Backward pass.  dy: [N, D] -> dict of gradients for ``x`` and every parameter.

    d_scores      optional [N, E] gradient that a loss puts on the full softmax scores (L_aux, L_v)
    d_expert_out  optional [N, K, D] gradient on the unweighted expert outputs (L_o)
    ``dy`` may be None when only the injected gradients are wanted (dy = 0).
    The top-k indices have zero gradient (the selection is piecewise constant).
    Raises ValueError when a gradient is not finite, naming the upstream array that holds a NaN or inf
    ("d_scores contains NaN or inf"), or, when all are finite, the ones too large for the dtype.
    Numerics: one sum per gradient and a single host sync for all of them (``refmoe.checks.all_finite``).
    """
    c, cfg = cache, cache.cfg
    N, D, K, E = c.x.shape[0], cfg.d_model, cfg.top_k, cfg.n_experts
    xp = array_namespace(c.x)
    if dy is None:
        dy = xp.zeros_like(c.x)
    _check_upstream("dy", dy, (N, D), c.x)
    _check_upstream("d_scores", d_scores, (N, E), c.x)
    _check_upstream("d_expert_out", d_expert_out, (N, K, D), c.x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):    # a non-finite gradient raises below
        grads = {}
        dx_shared = 0
        if cfg.n_shared:                                                 # shared experts
            dx_shared, grads["shared_w_gate"], grads["shared_w_up"], grads["shared_w_down"] = \
                ops.swiglu_backward(dy, c.shared)
        d_gates = xp.einsum("nd,nkd->nk", dy, c.expert_out)             # combine: [N, K]
        d_expert_out_y = c.gates[:, :, None] * dy[:, None, :]            # combine: [N, K, D]
        if d_expert_out is not None:
            d_expert_out_y = d_expert_out_y + d_expert_out              # fan-in: L_o's injection
        dx_experts, grads["w_gate"], grads["w_up"], grads["w_down"] = \
            c.experts_backward(d_expert_out_y, c.experts)               # routed experts: [N, D]
        dx_router, grads["w_router"] = router_backward(d_gates, c.router, d_scores)   # router: [N, D]

        grads["x"] = dx_router + dx_experts + dx_shared
    if not all_finite(xp, *grads.values()):
        bad = next(k for k, g in grads.items() if not bool(xp.isfinite(g).all()))
        upstream = {"dy": dy, "d_scores": d_scores, "d_expert_out": d_expert_out, "x": c.x,
                    **{f"params[{k!r}]": w for k, w in c.params.items()}}
        raise _not_finite_inputs(xp, f"gradient grads[{bad!r}]", upstream, c.x.dtype)
    return grads


def describe(cfg: MoEConfig, backend: str | None = None) -> str:
    """Short human-readable summary of a config (used by the CLI)."""
    n = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    return f"{cfg} on {backend_name(backend)}: {n:,} parameters"
