"""The MoE layer: router, top-k, SwiGLU experts, optional shared experts. Forward and hand-derived backward.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k,
Hs = n_shared * H the hidden width of the fused shared expert.

Forward, for token i with top-k set T_i:

    logits = x W_r^T                        [N, E]
    P      = softmax(logits)                [N, E]   full softmax, before top-k ("scores")
    T_i    = top-k of P_i (ties: lower expert index wins)
    g_ik   = P_{i,T_ik} (/ sum_l P_{i,T_il} when norm_topk_prob)
    y_i    = sum_k g_ik E_{T_ik}(x_i) + shared(x_i)

Dispatch sorts the N*K (token, slot) assignments by expert once and runs one SwiGLU per expert on a
contiguous block; outputs go back to a token-major [N, K, D] buffer ("expert_out", unweighted), which
the orthogonality loss reads and whose gradient it injects through ``moe_backward(d_expert_out=...)``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import ops
from .backend import array_namespace, backend_name, get_xp, to_numpy
from .config import MoEConfig

ROUTED_KEYS = ("w_router", "w_gate", "w_up", "w_down")
SHARED_KEYS = ("shared_w_gate", "shared_w_up", "shared_w_down")
FLOAT_DTYPES = (np.float32, np.float64)


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
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if x.shape[1] != cfg.d_model:
        raise ValueError(f"x has D={x.shape[1]}, config has d_model={cfg.d_model}")
    if x.shape[0] == 0:
        raise ValueError("x has N=0 tokens; the layer needs at least one")
    if x.dtype.type not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; use float32 or float64")
    for name, w in params.items():
        if w.dtype != x.dtype:
            raise TypeError(f"params[{name!r}] is {w.dtype} but x is {x.dtype}; cast one explicitly")
    if not bool(xp.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")
    return xp


# ----------------------------------------------------------------------------------------------
# dispatch: group the N*K assignments by expert
# ----------------------------------------------------------------------------------------------

class Dispatch(NamedTuple):
    order: object       # [N*K] permutation: sorted position -> flat (token, slot) position
    token: object       # [N*K] token index of each sorted assignment
    offsets: tuple      # E + 1 host ints: assignments of expert e are sorted[offsets[e]:offsets[e+1]]
    capacity: int = 0   # C rows per expert of the padded [E, C] layout; 0 when experts run one by one
    slot: object = None  # [N*K] row e*C + rank of each flat (token, slot) in the padded layout, or None


EXPERT_BATCHING = ("auto", "loop", "padded")
PAD_LIMIT = 1.25    # "auto" pads only when E * C <= PAD_LIMIT * N * K (at most 25% zero rows)


def dispatch(topk_idx, n_experts: int, batching: str = "loop") -> Dispatch:
    """Sort the flat assignments by expert id (stable, so tokens stay in order within an expert).

    batching  "loop": one SwiGLU per expert on its contiguous block of the sorted rows.
              "padded": also lay the rows out as [E, C] with C = the largest count, zero rows filling
              the rest, so that every expert runs in one batched matmul (fills a GPU far better than
              E small products). "auto": padded on CuPy when the padding stays under PAD_LIMIT, else loop.
    """
    if batching not in EXPERT_BATCHING:
        raise ValueError(f"expert_batching={batching!r} is not a mode; expected one of {EXPERT_BATCHING}")
    xp = array_namespace(topk_idx)
    N, K = topk_idx.shape
    flat = topk_idx.reshape(-1)                                    # [N*K]
    order = xp.argsort(flat, kind="stable")                        # [N*K]
    token = order // K                                             # [N*K]
    counts_dev = xp.bincount(flat, minlength=n_experts)            # [E]
    counts = to_numpy(counts_dev)                                  # [E] small explicit device->host read
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))
    C = int(counts.max())
    if batching == "auto":
        batching = "padded" if xp is not np and n_experts * C <= PAD_LIMIT * N * K else "loop"
    if batching == "loop":
        return Dispatch(order, token, offsets)
    expert_sorted = flat[order]                                    # [N*K] non-decreasing expert ids
    start = xp.cumsum(counts_dev) - counts_dev                     # [E] first sorted row of each expert
    rank = xp.arange(N * K) - start[expert_sorted]                 # [N*K] position within the expert
    slot = xp.empty_like(order)
    slot[order] = expert_sorted * C + rank                         # a permutation into E*C rows
    return Dispatch(order, token, offsets, C, slot)


def _experts_forward(x, params, plan: Dispatch, N: int, K: int, E: int):
    """Unweighted outputs of the selected experts, token-major [N*K, D], and the SwiGLU caches."""
    xp = array_namespace(x)
    D = x.shape[1]
    if plan.slot is not None:                                      # one batched SwiGLU over [E, C, D]
        x_pad = xp.zeros((E * plan.capacity, D), dtype=x.dtype)    # [E*C, D] zero rows give zero outputs
        x_pad[plan.slot.reshape(N, K)] = x[:, None, :]              # token i into its K rows
        out_pad, c = ops.swiglu_forward(x_pad.reshape(E, plan.capacity, D),
                                        params["w_gate"], params["w_up"], params["w_down"])
        return out_pad.reshape(E * plan.capacity, D)[plan.slot], (c,)
    x_sorted = x[plan.token]                                       # [N*K, D]
    out_sorted = xp.empty_like(x_sorted)                           # [N*K, D]
    expert_caches = []
    for e in range(E):
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        if lo == hi:
            expert_caches.append(None)
            continue
        out_sorted[lo:hi], c = ops.swiglu_forward(
            x_sorted[lo:hi], params["w_gate"][e], params["w_up"][e], params["w_down"][e])
        expert_caches.append(c)
    expert_flat = xp.empty_like(out_sorted)                        # [N*K, D]
    expert_flat[plan.order] = out_sorted                           # a permutation: no duplicates
    return expert_flat, tuple(expert_caches)


def _experts_backward(d_flat, params, plan: Dispatch, expert_caches, E: int):
    """d_flat: [N*K, D] gradient on the token-major expert outputs -> (dx_flat [N*K, D], dw_gate, dw_up, dw_down)."""
    xp = array_namespace(d_flat)
    D = d_flat.shape[1]
    if plan.slot is not None:
        d_pad = xp.zeros((E * plan.capacity, D), dtype=d_flat.dtype)   # [E*C, D]
        d_pad[plan.slot] = d_flat
        dx_pad, dw_gate, dw_up, dw_down = ops.swiglu_backward(
            d_pad.reshape(E, plan.capacity, D), expert_caches[0])
        return dx_pad.reshape(E * plan.capacity, D)[plan.slot], dw_gate, dw_up, dw_down
    d_out_sorted = d_flat[plan.order]                              # [N*K, D]
    dx_sorted = xp.zeros_like(d_out_sorted)                        # [N*K, D]
    dw_gate = xp.zeros_like(params["w_gate"])
    dw_up = xp.zeros_like(params["w_up"])
    dw_down = xp.zeros_like(params["w_down"])
    for e in range(E):
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        if lo == hi:
            continue
        dx_sorted[lo:hi], dw_gate[e], dw_up[e], dw_down[e] = ops.swiglu_backward(
            d_out_sorted[lo:hi], expert_caches[e])
    dx_flat = xp.empty_like(dx_sorted)
    dx_flat[plan.order] = dx_sorted
    return dx_flat, dw_gate, dw_up, dw_down


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
    params: dict
    dispatch: Dispatch
    expert_caches: tuple    # loop: E entries (ops.SwigluCache, or None for an expert with no tokens);
                            # padded: one ops.SwigluCache over [E, C, .]
    shared_cache: object    # ops.SwigluCache or None
    gather_cache: tuple
    renorm_cache: tuple     # or None when norm_topk_prob is False


def moe_forward(x, params: dict, cfg: MoEConfig, *, expert_batching: str = "auto"):
    """Forward pass of the layer.  x: [N, D] -> (y [N, D], MoECache).

    expert_batching  how the routed experts run: "loop" (one SwiGLU per expert), "padded" (one batched
                     SwiGLU over an [E, C, D] layout), or "auto" (padded on CuPy when cheap; see
                     :func:`dispatch`). The results agree to rounding; the backward follows the forward's choice.

    Raises ValueError / TypeError for bad shapes, dtypes, non-finite x or a NumPy/CuPy mix.
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    if expert_batching not in EXPERT_BATCHING:
        raise ValueError(f"expert_batching={expert_batching!r} is not a mode; expected one of {EXPERT_BATCHING}")
    _check_params(params, cfg)
    xp = _check_input(x, params, cfg)
    N, D, K, E = x.shape[0], cfg.d_model, cfg.top_k, cfg.n_experts

    logits, _ = ops.linear_forward(x, params["w_router"])           # [N, E]
    scores, _ = ops.softmax_forward(logits)                          # [N, E]
    topk_idx = ops.topk_indices(scores, K)                           # [N, K]
    sel, gather_cache = ops.gather_forward(scores, topk_idx)         # [N, K]
    if cfg.norm_topk_prob:
        gates, renorm_cache = ops.renorm_forward(sel)                # [N, K]
    else:
        gates, renorm_cache = sel, None

    plan = dispatch(topk_idx, E, expert_batching)
    expert_flat, expert_caches = _experts_forward(x, params, plan, N, K, E)   # [N*K, D]
    expert_out = expert_flat.reshape(N, K, D)                        # [N, K, D]

    y = xp.einsum("nk,nkd->nd", gates, expert_out)                   # [N, D]
    shared_out = shared_cache = None
    if cfg.n_shared:
        shared_out, shared_cache = ops.swiglu_forward(
            x, params["shared_w_gate"], params["shared_w_up"], params["shared_w_down"])
        y = y + shared_out

    cache = MoECache(logits, scores, topk_idx, gates, expert_out, shared_out, x, cfg, params, plan,
                     expert_caches, shared_cache, gather_cache, renorm_cache)
    return y, cache


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
    """
    c, cfg = cache, cache.cfg
    N, D, K, E = c.x.shape[0], cfg.d_model, cfg.top_k, cfg.n_experts
    xp = array_namespace(c.x)
    if dy is None:
        dy = xp.zeros_like(c.x)
    _check_upstream("dy", dy, (N, D), c.x)
    _check_upstream("d_scores", d_scores, (N, E), c.x)
    _check_upstream("d_expert_out", d_expert_out, (N, K, D), c.x)
    grads = {}

    # shared experts
    dx_shared = 0
    if cfg.n_shared:
        dx_shared, grads["shared_w_gate"], grads["shared_w_up"], grads["shared_w_down"] = \
            ops.swiglu_backward(dy, c.shared_cache)

    # combine:  y = sum_k g_k expert_out_k
    d_gates = xp.einsum("nd,nkd->nk", dy, c.expert_out)                 # [N, K]
    d_eo = c.gates[:, :, None] * dy[:, None, :]                          # [N, K, D]
    if d_expert_out is not None:
        d_eo = d_eo + d_expert_out

    # routed experts, in the dispatch order
    dx_flat, dw_gate, dw_up, dw_down = _experts_backward(
        d_eo.reshape(N * K, D), c.params, c.dispatch, c.expert_caches, E)     # dx_flat [N*K, D]
    dx_experts = dx_flat.reshape(N, K, D).sum(axis=1)                   # [N, D] sum over a token's slots
    grads.update(w_gate=dw_gate, w_up=dw_up, w_down=dw_down)

    # gates -> scores -> logits -> (x, w_router)
    d_sel = ops.renorm_backward(d_gates, c.renorm_cache) if cfg.norm_topk_prob else d_gates
    dscores = ops.gather_backward(d_sel, c.gather_cache)                # [N, E]
    if d_scores is not None:
        dscores = dscores + d_scores
    dlogits = ops.softmax_backward(dscores, c.scores)                   # [N, E]
    dx_router, grads["w_router"] = ops.linear_backward(dlogits, (c.x, c.params["w_router"]))

    grads["x"] = dx_router + dx_experts + dx_shared
    return grads


def describe(cfg: MoEConfig, backend: str | None = None) -> str:
    """Short human-readable summary of a config (used by the CLI)."""
    n = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    return f"{cfg} on {backend_name(backend)}: {n:,} parameters"
