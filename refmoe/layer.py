"""The MoE layer: router, top-k, SwiGLU experts, optional shared experts. Forward and hand-derived backward.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k,
Hs = n_shared * H the hidden width of the fused shared expert.

The composition, one line per piece (``refmoe.router``, ``refmoe.router_capacity``, ``refmoe.experts``,
``refmoe.ops``); every option is a field of ``MoEConfig``:

    z           = x W_r^T                            [N, E]   logits
    topk_idx, g = routing(z)                         [N, K]   score -> select (+ bias, groups) -> gates
    P           = softmax(z), or s / sum_j s         [N, E]   the scores the losses read (s = sigma(z))
    g, keep     = capacity(topk_idx, g)              [N, K]   dropped pairs get g = 0 (capacity_factor only)
    x~          = experts(x, topk_idx) * keep        [N, K, D] unweighted outputs; a dropped pair's row is 0
    y_i         = sum_k g_ik x~_ik + a_i shared(x_i) [N, D]   a_i = sigma(x_i w_s^T) with shared_gate, else 1

The backward runs the pieces in reverse. Losses inject their gradients on the intermediates they read:
``d_scores`` [N, E] (L_aux, L_v) into the router's scores, ``d_logits`` [N, E] (z-loss) into the logits,
``d_expert_out`` [N, K, D] (L_o) into the experts.
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
from .router import RoutingCache, routing_backward, routing_forward
from .router_capacity import CapacityCache, capacity_backward, capacity_forward, capacity_keep, expert_capacity


def param_shapes(cfg: MoEConfig) -> dict:
    """Name -> shape of every parameter of a layer with this config."""
    D, H, E = cfg.d_model, cfg.d_hidden, cfg.n_experts
    shapes = {"w_router": (E, D), "w_gate": (E, D, H), "w_up": (E, D, H), "w_down": (E, H, D)}
    if cfg.expert_bias:
        shapes["expert_bias"] = (E,)            # selection-only bias, zero gradient
    if cfg.n_shared:
        Hs = cfg.d_shared
        shapes.update(shared_w_gate=(D, Hs), shared_w_up=(D, Hs), shared_w_down=(Hs, D))
    if cfg.shared_gate:
        # "score", not "gate": shared_w_gate is already the SwiGLU's gate projection of the shared expert
        shapes["shared_w_score"] = (1, D)
    return shapes


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------

def init_params(cfg: MoEConfig, rng, dtype=np.float64, backend: str | None = None) -> dict:
    """Random parameters: N(0, 1/fan_in) entries, drawn in float64 on the host from ``rng``, then cast.

    rng      a ``numpy.random.Generator`` (or an int seed); the same seed gives the same values on
             every backend and dtype (up to the cast), which the parity tests rely on
    ``expert_bias`` starts at 0 (as DeepSeek-V3's buffer and Megatron's) and draws nothing from ``rng``, so the
    other parameters are those of the config without it.
    dtype    float32 or float64
    backend  "numpy" or "cupy" (default: $REFMOE_BACKEND, then numpy); the arrays are created there
    """
    dtype = np.dtype(dtype)
    if dtype.type not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; use float32 or float64")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    xp = get_xp(backend)
    fan_in = {"w_router": cfg.d_model, "w_gate": cfg.d_model, "w_up": cfg.d_model, "w_down": cfg.d_hidden,
              "shared_w_gate": cfg.d_model, "shared_w_up": cfg.d_model, "shared_w_down": cfg.d_shared,
              "shared_w_score": cfg.d_model}
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name == "expert_bias":
            params[name] = xp.zeros(shape, dtype=dtype)
            continue
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
    """Everything the backward needs; the first fields are the intermediates a reader wants to see.

    Under every router (``cfg.score_function``, ``cfg.gates``, bias, groups, capacity):
    logits     z = x W_r^T, always; the z-loss reads it
    scores     P [N, E], rows summing to 1 under every router: softmax(z), or under sigmoid scoring the
               NORMALISED affinities s' = s / sum_j s (s = sigma(z) over ALL E experts), the quantity DeepSeek-V3's
               and Megatron's balancing losses read. L_aux and L_v read P and inject d_scores into it. The raw
               sigmoid s, from which the gates are gathered, is ``router.scores``. Under gates="topk_softmax" the
               gates come from the logits and P = softmax(z) is kept for the losses.
    topk_idx   the selection: top-k of the logits or of P + bias, within the kept groups (before any dropping)
    gates      the combine weights actually used: renormalised / scaled as configured, 0 for a dropped pair
    keep       [N, K] bool, False for a pair dropped by capacity; None without capacity_factor
    """
    logits: object          # [N, E]   x W_r^T
    scores: object          # [N, E]   softmax(z), or sigma(z) / sum_j sigma(z)_j under sigmoid scoring
    topk_idx: object        # [N, K]   int64, descending ranked value
    gates: object           # [N, K]   combine weights (0 for a dropped pair)
    expert_out: object      # [N, K, D] unweighted outputs of the selected experts, token-major; 0 rows for drops
    shared_out: object      # [N, D] or None, the shared expert's output before its gate
    x: object               # [N, D]
    cfg: MoEConfig
    params: dict            # a snapshot of the dict passed in (the same arrays): rebinding a key later
                            # does not reach the backward; update arrays in place only after it
    router: RoutingCache    # ``refmoe.router.routing_forward``'s cache (score, selection, gates)
    experts: object         # the experts' cache (``refmoe.experts.ExpertsCache`` on the reading path)
    experts_backward: object   # the backward that matches the forward that made ``experts``
    shared: object          # ops.SwigluCache or None
    keep: object = None         # [N, K] bool or None: False where capacity dropped the pair
    shared_score: object = None  # [N, 1] sigma(x w_s^T) with shared_gate, else None
    linear: object = None       # ops.LinearCache of the router's logits
    shared_linear: object = None  # ops.LinearCache of the shared gate's logit, or None
    normalise: object = None    # ops.RenormCache of P = s / sum_j s under sigmoid scoring, else None


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
        logits, linear = ops.linear_forward(x, params["w_router"])                  # [N, E]
        (topk_idx, gates), router = _route(logits, params, cfg)                      # [N, K]
        scores, normalise = router.scores, None                                      # [N, E]
        if cfg.score_function == "sigmoid":
            scores, normalise = ops.renorm_forward(router.scores)                   # [N, E] s / sum_j s
        keep = None
        if cfg.capacity_factor is not None:
            keep = _capacity_keep(topk_idx, gates, cfg)                              # [N, K] bool
            gates, _ = capacity_forward(gates, keep)                                 # [N, K] 0 where dropped
        expert_out, experts_cache = experts.experts_forward(
            x, params["w_gate"], params["w_up"], params["w_down"], topk_idx)        # [N, K, D]
        if keep is not None:
            expert_out = expert_out * keep[:, :, None].astype(expert_out.dtype)      # [N, K, D] dropped rows 0
        y = _combine(gates, expert_out)                                              # [N, D]
        shared_out = shared = shared_score = shared_linear = None
        if cfg.n_shared:
            shared_out, shared = ops.swiglu_forward(
                x, params["shared_w_gate"], params["shared_w_up"], params["shared_w_down"])   # [N, D]
            if cfg.shared_gate:
                h, shared_linear = ops.linear_forward(x, params["shared_w_score"])   # [N, 1]
                shared_score = ops.sigmoid(h)                                        # [N, 1]
                y = y + shared_score * shared_out
            else:
                y = y + shared_out
    if not all_finite(xp, y):
        raise _not_finite_inputs(xp, "layer output y", {"x": x, **{f"params[{k!r}]": w for k, w in params.items()}},
                                 x.dtype)

    cache = MoECache(logits, scores, topk_idx, gates, expert_out, shared_out, x, cfg, params,
                     router, experts_cache, experts.experts_backward, shared,
                     keep=keep, shared_score=shared_score, linear=linear, shared_linear=shared_linear,
                     normalise=normalise)
    return y, cache


def _route(logits, params, cfg: MoEConfig):
    """The configured router on the logits [N, E] -> ((topk_idx [N, K], gates [N, K]), RoutingCache)."""
    grouped = cfg.n_group is not None
    return routing_forward(
        logits, cfg.top_k, score_function=cfg.score_function, select_on=cfg.select_on,
        bias=params["expert_bias"] if cfg.expert_bias else None,
        n_group=cfg.n_group, topk_group=cfg.topk_group, group_score=cfg.group_rule if grouped else "max",
        renorm="topk_softmax" if cfg.gates == "topk_softmax" else cfg.renorm_mode,
        scale=float(cfg.routed_scaling_factor), eps=float(cfg.gate_eps))


def _capacity_keep(topk_idx, gates, cfg: MoEConfig):
    """keep [N, K] bool: the pairs within each expert's capacity C = max(ceil(N K / E f), min_capacity),
    ranked by the (scaled) gates or by position. Zero gradient."""
    C = expert_capacity(topk_idx.shape[0], cfg.n_experts, cfg.top_k, cfg.capacity_factor, cfg.min_capacity)
    return capacity_keep(topk_idx, gates, cfg.n_experts, C, drop_policy=cfg.drop_policy)


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


def moe_backward(dy, cache: MoECache, d_scores=None, d_expert_out=None, d_logits=None) -> dict:
    """Backward pass.  dy: [N, D] -> dict of gradients for ``x`` and every parameter.

    d_scores      optional [N, E] gradient that a loss puts on the full scores ``cache.scores`` (L_aux, L_v)
    d_expert_out  optional [N, K, D] gradient on the unweighted expert outputs (L_o)
    d_logits      optional [N, E] gradient on the router logits (the z-loss)
    ``dy`` may be None when only the injected gradients are wanted (dy = 0).
    The top-k indices, the capacity keep mask and ``expert_bias`` have zero gradient (the selection is piecewise
    constant; ``grads["expert_bias"]`` is an array of zeros). A dropped pair receives exactly 0.
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
    _check_upstream("d_logits", d_logits, (N, E), c.x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):    # a non-finite gradient raises below
        grads = {}

        dx_shared = 0
        if cfg.shared_gate:                                                  # shared gate a = sigma(x w_s^T)
            d_score = (dy * c.shared_out).sum(axis=1, keepdims=True)        # [N, 1]
            dh = d_score * c.shared_score * (1 - c.shared_score)            # [N, 1]
            dx_shared_gate, grads["shared_w_score"] = ops.linear_backward(dh, c.shared_linear)
            d_shared_out = c.shared_score * dy                              # [N, D]
        else:
            d_shared_out = dy
        if cfg.n_shared:                                                     # shared experts
            dx_shared, grads["shared_w_gate"], grads["shared_w_up"], grads["shared_w_down"] = \
                ops.swiglu_backward(d_shared_out, c.shared)
        d_gates = xp.einsum("nd,nkd->nk", dy, c.expert_out)                 # combine: [N, K]
        d_expert_out_y = c.gates[:, :, None] * dy[:, None, :]                # combine: [N, K, D]
        if d_expert_out is not None:
            d_expert_out_y = d_expert_out_y + d_expert_out                  # fan-in: L_o's injection
        if c.keep is not None:                                               # capacity: dropped pairs get 0
            d_expert_out_y = d_expert_out_y * c.keep[:, :, None].astype(d_expert_out_y.dtype)
            d_gates = capacity_backward(d_gates, CapacityCache(c.keep))      # [N, K]
        dx_experts, grads["w_gate"], grads["w_up"], grads["w_down"] = \
            c.experts_backward(d_expert_out_y, c.experts)                   # routed experts: [N, D]
        if d_scores is not None and c.normalise is not None:
            d_scores = ops.renorm_backward(d_scores, c.normalise)           # P = s / sum s: d on the raw sigmoid
        d_logits_router = routing_backward(d_gates, c.router, d_scores)     # router: [N, E]
        if d_logits is not None:
            d_logits_router = d_logits_router + d_logits                    # fan-in: the z-loss's injection
        dx_router, grads["w_router"] = ops.linear_backward(d_logits_router, c.linear)   # [N, D]
        if cfg.expert_bias:
            grads["expert_bias"] = xp.zeros_like(c.params["expert_bias"])   # selection only: zero gradient

        grads["x"] = dx_router + dx_experts + dx_shared
        if cfg.shared_gate:
            grads["x"] = grads["x"] + dx_shared_gate                         # fan-in: the shared gate's logit
    if not all_finite(xp, *grads.values()):
        bad = next(k for k, g in grads.items() if not bool(xp.isfinite(g).all()))
        upstream = {"dy": dy, "d_scores": d_scores, "d_expert_out": d_expert_out, "d_logits": d_logits, "x": c.x,
                    **{f"params[{k!r}]": w for k, w in c.params.items()}}
        raise _not_finite_inputs(xp, f"gradient grads[{bad!r}]", upstream, c.x.dtype)
    return grads


def describe(cfg: MoEConfig, backend: str | None = None) -> str:
    """Short human-readable summary of a config (used by the CLI)."""
    n = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    return f"{cfg} on {backend_name(backend)}: {n:,} parameters"
