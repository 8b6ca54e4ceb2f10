r"""The fused CuPy kernels of the fast path, each beside the NumPy/CuPy reference it must equal.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k, R rows of the
experts' layout (E*C padded rows on a GPU, the N*K sorted rows on a CPU), M rows of one SwiGLU.

Every op is ``op(xp, ...)``: on CuPy (unless ``REFMOE_FAST_KERNELS=0``) it launches the kernel, on NumPy it runs
``ref_op``, the same arithmetic in array operations (``ref_op`` also runs on CuPy: the GPU tests compare the
two on the same device; ``tests/test_fast_kernels.py``).

    swiglu_forward_ew(a, b)          h = silu(a) * b                                   [M, H]
    swiglu_backward_ew(dh, a, b)     (h, da, db), written over (dh, a, b)              [M, H]
    softmax_topk(z, K, ...)          P = softmax(z), top-k of z, gates, denominators  [N, E], [N, K], [N]
    router_backward(dg, ...)         d_logits from d_gates and an injected d_scores   [N, E]
    gather_rows(src, rows)           out[r] = src[rows[r]], 0 where rows[r] < 0        [R, D]
    combine(g, eo, base)             y = base + sum_k g_k eo_k                          [N, D]
    combine_backward_rows(...)       the experts' output gradient in their layout     [R, D]
    slot_sum(rows, slot, base)       dx = base + sum_k rows[slot_k]                     [N, D]
    span_forward(A, eps)             the released Gram-Schmidt L_o per token           [N]
    span_backward(g, A, eps)         (per_token, its gradient): the forward replayed  [N], [N, K, D]

The span kernels give one CUDA block to one token: a thread keeps its D/BS entries of the K slot vectors in
registers, a dot product is one block reduction, and the K runs of the Gram-Schmidt (one per slot) follow
each other inside the block, so one launch covers all N K runs. The backward keeps no tape: it replays the
forward of each run (the same operations in the same order, so the same numbers) and walks it back.
Numerics: kernel dot products sum in a tree, the references as ``span_kernels`` says: float32 results differ by
a few ulp (more on nearly dependent slots, where every implementation is as far from float64 as from the others).
"""
from __future__ import annotations


import numpy as np

from .. import ops
from ..router import GateCache, gate_weights_backward, gate_weights_forward
from .switch import kernels_on  # noqa: F401  (part of this module's names)


_CACHE = {}
SPECS = {}          # name -> (in_params, out_params, body) of every ElementwiseKernel (the tests read them)


def _elementwise(name, in_params, out_params, body):
    SPECS[name] = (in_params, out_params, body)
    if name not in _CACHE:
        import cupy
        _CACHE[name] = cupy.ElementwiseKernel(in_params, out_params, body, "refmoe_" + name)
    return _CACHE[name]


# ----------------------------------------------------------------------------------------------
# SwiGLU elementwise parts
# ----------------------------------------------------------------------------------------------

def ref_sigmoid(xp, a):
    """sigma(a) = 1 / (1 + e^{-a}), the kernels' formula: e^{-a} overflows to inf for a very negative a, and
    1 / (1 + inf) = 0 is then the right value, so the overflow is not warned about. One exp and one
    reciprocal in place: on NumPy float32 30-40% faster than SciPy's ``expit`` (``ops.sigmoid``) at the layer's
    sizes, within 4 ulp of it (3.3 ulp of the exact value, measured)."""
    with np.errstate(over="ignore"):
        e = xp.exp(-a)
    e += 1
    return xp.reciprocal(e, out=e)


def ref_swiglu_forward_ew(xp, a, b):
    """h = a sigma(a) b (the product order of ``ops.swiglu_forward``).  a, b: [M, H] -> h [M, H]."""
    return a * ref_sigmoid(xp, a) * b


def swiglu_forward_ew(xp, a, b):
    if not kernels_on(xp):
        return ref_swiglu_forward_ew(xp, a, b)
    k = _elementwise("swiglu_fwd", "T a, T b", "T h",
                     "T s = (T)1 / ((T)1 + exp(-a)); h = a * s * b;")
    return k(a, b)


def ref_swiglu_backward_ew(xp, dh, a, b):
    r"""(h, da, db) from dh, a, b [M, H], written over (dh, a, b) (the caller's buffers are consumed).

    .. math:: h = \mathrm{silu}(a) b,\quad db = dh\,\mathrm{silu}(a),\quad da = dh\, b\,((1-\sigma)\mathrm{silu}(a) + \sigma)
    """
    s = ref_sigmoid(xp, a)
    silu = a * s
    h = silu * b
    db = dh * silu
    da = (dh * b) * ((1 - s) * silu + s)
    dh[...], a[...], b[...] = h, da, db
    return dh, a, b


def swiglu_backward_ew(xp, dh, a, b):
    if not kernels_on(xp):
        return ref_swiglu_backward_ew(xp, dh, a, b)
    k = _elementwise("swiglu_bwd", "", "T dh_h, T a_da, T b_db", """
        T a = a_da; T b = b_db; T dh = dh_h;
        T s = (T)1 / ((T)1 + exp(-a));
        T silu = a * s;
        dh_h = silu * b;
        b_db = dh * silu;
        a_da = (dh * b) * (((T)1 - s) * silu + s);
    """)
    k(dh, a, b)
    return dh, a, b


# ----------------------------------------------------------------------------------------------
# router: softmax + top-k + gates, and its backward
# ----------------------------------------------------------------------------------------------

def ref_softmax_topk(xp, z, K, renorm, eps, scale):
    """(P [N, E], topk_idx [N, K] int64, gates [N, K], denom [N]) as ``refmoe.router.routing_forward`` computes
    them for softmax scores selected on the logits (ties: the lower expert index); denom = 1 without renorm."""
    P, _ = ops.softmax_forward(z)
    idx = ops.topk_indices(z, K)
    gates, gc = gate_weights_forward(P, idx, renorm="always" if renorm else "never", scale=scale, eps=eps)
    denom = gc.denom[:, 0] if gc.denom is not None else xp.ones(z.shape[0], dtype=z.dtype)
    return P, idx, gates, denom


_SOFTMAX_TOPK = """
    const long long t = i;
    T m = z[t * E];
    for (long long e = 1; e < E; ++e) { T v = z[t * E + e]; m = v > m ? v : m; }
    T s = 0;
    for (long long e = 0; e < E; ++e) s += exp(z[t * E + e] - m);
    for (long long e = 0; e < E; ++e) p[t * E + e] = exp(z[t * E + e] - m) / s;
    T pv = 0; long long pi = -1; T selsum = 0;
    for (long long k = 0; k < K; ++k) {          // next in the order (logit descending, index ascending)
        long long best = -1; T bv = 0;
        for (long long e = 0; e < E; ++e) {
            T v = z[t * E + e];
            bool after = pi < 0 || v < pv || (v == pv && e > pi);
            if (after && (best < 0 || v > bv)) { best = e; bv = v; }
        }
        if (best < 0) best = k;                  // only with NaN logits (the caller's check catches them)
        idx[t * K + k] = best; pv = z[t * E + best]; pi = best;
        selsum += p[t * E + best];
    }
    T den = renorm ? selsum + eps : (T)1;
    for (long long k = 0; k < K; ++k) {
        T sel = p[t * E + idx[t * K + k]];
        T w = renorm ? sel / den : sel;
        gates[t * K + k] = scale == (T)1 ? w : w * scale;
    }
    denom = den;
"""


def softmax_topk(xp, z, K, renorm, eps, scale):
    if not kernels_on(xp):
        return ref_softmax_topk(xp, z, K, renorm, eps, scale)
    N, E = z.shape
    k = _elementwise("softmax_topk", "raw T z, int64 E, int64 K, int32 renorm, T eps, T scale",
                     "raw T p, raw int64 idx, raw T gates, T denom", _SOFTMAX_TOPK)
    p, idx = xp.empty_like(z), xp.empty((N, K), dtype=np.int64)
    gates, denom = xp.empty((N, K), dtype=z.dtype), xp.empty(N, dtype=z.dtype)
    k(z, E, K, np.int32(renorm), z.dtype.type(eps), z.dtype.type(scale), p, idx, gates, denom)
    return p, idx, gates, denom


def ref_router_backward(xp, dg, P, idx, denom, renorm, scale, d_inj):
    """d_logits [N, E] from d_gates [N, K] and d_inj [N, E] (or None) on the scores, as
    ``refmoe.router.routing_backward`` does it for softmax scores."""
    sel = xp.take_along_axis(P, idx, axis=1)                                     # [N, K]
    w = sel / denom[:, None] if renorm else sel
    gc = GateCache(None, w, denom[:, None] if renorm else None, scale, ops.GatherCache(idx, tuple(P.shape)))
    d_s = gate_weights_backward(dg, gc)                                          # [N, E]
    if d_inj is not None:
        d_s = d_s + d_inj
    return ops.softmax_backward(d_s, P)


_ROUTER_BACKWARD = """
    const long long t = i;
    T s = 0;
    for (long long k = 0; k < K; ++k) {
        T dw = scale == (T)1 ? dg[t * K + k] : dg[t * K + k] * scale;
        T sel = p[t * E + idx[t * K + k]];
        s += dw * (renorm ? sel / denom : sel);
    }
    T dot = 0;
    for (long long e = 0; e < E; ++e) {
        T ds = 0;
        for (long long k = 0; k < K; ++k) if (idx[t * K + k] == e) {
            T dw = scale == (T)1 ? dg[t * K + k] : dg[t * K + k] * scale;
            ds = renorm ? (dw - s) / denom : dw;
        }
        if (has_inj) ds = ds + dinj[t * E + e];
        dz[t * E + e] = ds;
        dot += ds * p[t * E + e];
    }
    for (long long e = 0; e < E; ++e) dz[t * E + e] = p[t * E + e] * (dz[t * E + e] - dot);
"""


def router_backward(xp, dg, P, idx, denom, renorm, scale, d_inj):
    if not kernels_on(xp):
        return ref_router_backward(xp, dg, P, idx, denom, renorm, scale, d_inj)
    N, E = P.shape
    k = _elementwise("router_bwd", "raw T dg, raw T p, raw int64 idx, T denom, raw T dinj, int64 E, int64 K, "
                     "int32 renorm, int32 has_inj, T scale", "raw T dz", _ROUTER_BACKWARD)
    dz = xp.empty_like(P)
    k(dg, P, idx, denom, P if d_inj is None else d_inj, E, idx.shape[1], np.int32(renorm),
      np.int32(d_inj is not None), P.dtype.type(scale), dz)
    return dz


# ----------------------------------------------------------------------------------------------
# moving rows: into and out of the experts' layout, the combine and its backward
# ----------------------------------------------------------------------------------------------

def ref_gather_rows(xp, src, rows):
    """out [R, D] = src[rows] with zero rows where rows < 0 (set, not multiplied: exactly 0 whatever src holds,
    as the kernel writes them).  src: [M, D], rows: [R] int."""
    out = xp.take(src, xp.maximum(rows, 0), axis=0)
    if xp is np:
        out[rows < 0] = 0
        return out
    return xp.where((rows >= 0)[:, None], out, src.dtype.type(0))          # no host read for a mask


def gather_rows(xp, src, rows):
    if not kernels_on(xp):
        return ref_gather_rows(xp, src, rows)
    D = src.shape[1]
    k = _elementwise("gather_rows", "raw T src, raw int64 rows, int64 D", "T out", """
        const long long r = i / D, d = i - r * D;
        const long long s = rows[r];
        out = s >= 0 ? src[s * D + d] : (T)0;
    """)
    return k(src, rows, D, xp.empty((rows.shape[0], D), dtype=src.dtype))


def ref_combine(xp, g, eo, base=None):
    """y [N, D] = sum_k g[:, k] eo[:, k] (+ base), as ``refmoe.layer`` combines.  g: [N, K], eo: [N, K, D]."""
    y = xp.einsum("nk,nkd->nd", g, eo)
    return y if base is None else y + base


def combine(xp, g, eo, base=None):
    if not kernels_on(xp):
        return ref_combine(xp, g, eo, base)
    N, K, D = eo.shape
    k = _elementwise("combine", "raw T g, raw T eo, raw T base, int64 K, int64 D, int32 has_base", "T y", """
        const long long t = i / D, d = i - t * D;
        T acc = 0;
        for (long long k = 0; k < K; ++k) acc += g[t * K + k] * eo[(t * K + k) * D + d];
        y = has_base ? acc + base[i] : acc;
    """)
    return k(g, eo, eo if base is None else base, K, D, np.int32(base is not None),
             xp.empty((N, D), dtype=eo.dtype))


def ref_combine_backward_rows(xp, g, dy, d_inj, src):
    """The gradient of the experts' outputs in their layout: row r holds g_a dy_n (+ d_inj_a) of the
    assignment a = src[r] = n K + k, zero where src[r] < 0.  g: [N, K], dy: [N, D], d_inj: [N, K, D] or None."""
    N, K = g.shape
    d_eo = g[:, :, None] * dy[:, None, :]                                    # [N, K, D]
    if d_inj is not None:
        d_eo = d_eo + d_inj
    return ref_gather_rows(xp, d_eo.reshape(N * K, -1), src)


def combine_backward_rows(xp, g, dy, d_inj, src):
    if not kernels_on(xp):
        return ref_combine_backward_rows(xp, g, dy, d_inj, src)
    K, D = g.shape[1], dy.shape[1]
    k = _elementwise("combine_bwd_rows", "raw T g, raw T dy, raw T dinj, raw int64 src, int64 K, int64 D, "
                     "int32 has_inj", "T out", """
        const long long r = i / D, d = i - r * D;
        const long long a = src[r];
        if (a < 0) { out = 0; }
        else {
            T v = g[a] * dy[(a / K) * D + d];
            out = has_inj ? v + dinj[a * D + d] : v;
        }
    """)
    return k(g, dy, dy if d_inj is None else d_inj, src, K, D, np.int32(d_inj is not None),
             xp.empty((src.shape[0], D), dtype=dy.dtype))


def ref_slot_sum(xp, rows, slot, base):
    """dx [N, D] = base + sum_k rows[slot[:, k]] (0 where slot < 0).  rows: [R, D], slot: [N, K]."""
    N, K = slot.shape
    return base + ref_gather_rows(xp, rows, slot.reshape(-1)).reshape(N, K, -1).sum(axis=1)


def slot_sum(xp, rows, slot, base):
    if not kernels_on(xp):
        return ref_slot_sum(xp, rows, slot, base)
    K, D = slot.shape[1], rows.shape[1]
    k = _elementwise("slot_sum", "raw T rows, raw int64 slot, T base, int64 K, int64 D", "T dx", """
        const long long t = i / D, d = i - t * D;
        T acc = 0;
        for (long long k = 0; k < K; ++k) {
            const long long r = slot[t * K + k];
            if (r >= 0) acc += rows[r * D + d];
        }
        dx = base + acc;
    """)
    return k(rows, slot, base, K, D)


# the span L_o kernels live in their own module; their names are part of this one's
from .span_kernels import (CPU_CHUNK, others_table, ref_span_backward, ref_span_forward, ref_span_runs,  # noqa: E402,F401
                           span_backward, span_forward, span_launch_shape, span_source)
