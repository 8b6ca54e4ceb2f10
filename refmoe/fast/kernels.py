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
Numerics: kernel dot products sum in a tree, the references pairwise: float32 results differ by a few ulp.
"""
from __future__ import annotations

import os

import numpy as np

from .. import ops
from ..losses.gram_schmidt import gram_schmidt_backward, gram_schmidt_forward
from ..router import GateCache, gate_weights_backward, gate_weights_forward


def kernels_on(xp) -> bool:
    """True when ``xp`` is CuPy and the kernels are not switched off (``REFMOE_FAST_KERNELS=0``)."""
    return xp.__name__ == "cupy" and os.environ.get("REFMOE_FAST_KERNELS", "1") != "0"


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

def ref_swiglu_forward_ew(xp, a, b):
    """h = a sigma(a) b (the product order of ``ops.swiglu_forward``).  a, b: [M, H] -> h [M, H]."""
    return a * ops.sigmoid(a) * b


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
    s = ops.sigmoid(a)
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
    """out [R, D] = src[rows] with zero rows where rows < 0.  src: [M, D], rows: [R] int."""
    out = src[xp.maximum(rows, 0)]
    return out * (rows >= 0)[:, None].astype(src.dtype)


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


# ----------------------------------------------------------------------------------------------
# L_o span: the released Gram-Schmidt on the full vectors, all K runs of a token in one block
# ----------------------------------------------------------------------------------------------

def others_table(K):
    """[K, K-1] int64: row a lists the slots other than a, in slot order (the vectors of run a)."""
    return np.array([[b for b in range(K) if b != a] for a in range(K)], dtype=np.int64).reshape(K, K - 1)


def ref_span_runs(xp, A, eps):
    """The K Gram-Schmidt runs of every token batched into one run over N*K groups (run (n, a)
    orthogonalises the slots of token n other than a, in order).  A: [N, K, D] ->
    (per_token [N], (x_a [N*K, D], us, tape)) with the arithmetic of ``ortho_span.span_per_token``."""
    N, K, D = A.shape
    oth = xp.asarray(others_table(K))
    cols = [A[:, oth[:, j]].reshape(N * K, D) for j in range(K - 1)]       # K-1 of [N*K, D]
    x_a = A.reshape(N * K, D)                                              # [N*K, D] the slot itself
    us, tape = gram_schmidt_forward(cols, eps)
    per_run = xp.zeros(N * K, dtype=A.dtype)
    for u in us:
        p = (u * x_a).sum(axis=-1)                                         # [N*K] <u_l, x_a>
        per_run = per_run + p * p * (u * u).sum(axis=-1)
    return per_run.reshape(N, K).sum(axis=1), (x_a, us, tape)


def ref_span_forward(xp, A, eps):
    """per_token [N] of ``ortho_span.span_per_token(A, eps)``.  A: [N, K, D]."""
    return ref_span_runs(xp, A, eps)[0]


def ref_span_backward(xp, g, A, eps):
    """(per_token [N], dA [N, K, D]): the value and the gradient of sum_n g_n per_token_n
    (``ortho_span.span_per_token`` and ``ortho_span.span_backward``).  g: [N]."""
    N, K, D = A.shape
    per_token, (x_a, us, tape) = ref_span_runs(xp, A, eps)
    gk = xp.repeat(g, K)[:, None]                                          # [N*K, 1]
    dA = xp.zeros_like(x_a)                                                # [N*K, D] run a's own slot
    dus = []
    for u in us:
        p, s = (u * x_a).sum(axis=-1, keepdims=True), (u * u).sum(axis=-1, keepdims=True)
        dp, ds = 2.0 * p * s * gk, p * p * gk
        dA += dp * u
        dus.append(dp * x_a + 2.0 * ds * u)
    dA = dA.reshape(N, K, D)
    oth = others_table(K)
    for j, dcol in enumerate(gram_schmidt_backward(dus, us, tape)):       # run a's j-th other is slot oth[a, j]
        dcol = dcol.reshape(N, K, D)
        for a in range(K):
            dA[:, oth[a, j]] += dcol[:, a]
    return per_token, dA


CPU_CHUNK = 64      # tokens per call of the references on NumPy: the runs' vectors then stay in the CPU caches


def _chunked(fn, n_tokens, *arrays):
    """fn on token chunks of ``arrays`` (NumPy), outputs concatenated along the token axis."""
    parts = [fn(*(a[i:i + CPU_CHUNK] for a in arrays)) for i in range(0, n_tokens, CPU_CHUNK)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


_SPAN_SOURCE = r"""
typedef TYPE T;
#define K KVAL
#define M (K - 1)
#define BS BSVAL
#define PER PERVAL
#define NW (BS / 32)

// every thread gets the block's sums of its NV values (the same sum in every thread)
template <int NV>
__device__ __forceinline__ void block_sum(T (&v)[NV], T* sh) {
    #pragma unroll
    for (int q = 0; q < NV; ++q)
        for (int off = 16; off > 0; off >>= 1) v[q] += __shfl_xor_sync(0xffffffffu, v[q], off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();                                  // the partials of the previous call are read
    if (lane == 0) {
        #pragma unroll
        for (int q = 0; q < NV; ++q) sh[q * NW + warp] = v[q];
    }
    __syncthreads();
    #pragma unroll
    for (int q = 0; q < NV; ++q) {
        T s = 0;
        for (int w = 0; w < NW; ++w) s += sh[q * NW + w];
        v[q] = s;
    }
}

__device__ __forceinline__ T dot(const T (&a)[PER], const T (&b)[PER], T* sh) {
    T v[1] = {0};
    #pragma unroll
    for (int p = 0; p < PER; ++p) v[0] += a[p] * b[p];
    block_sum<1>(v, sh);
    return v[0];
}

__device__ __forceinline__ T safe_inv(T r) { return r > (T)0 ? (T)1 / r : (T)0; }

__device__ __forceinline__ int other(int a, int j) { return j < a ? j : j + 1; }

// run a of one token: u[j] = (v_j) / (||v_j|| + eps), v_j = x_{o_j} minus its projections (modified G-S)
__device__ __forceinline__ void run_forward(const T (&x)[K][PER], int a, T eps, T (&u)[M][PER],
                                            T (&c)[M][M], T (&r)[M], T (&den)[M], T* sh) {
    #pragma unroll
    for (int j = 0; j < M; ++j) {
        const int b = other(a, j);
        T v[PER];
        #pragma unroll
        for (int p = 0; p < PER; ++p) v[p] = x[b][p];
        #pragma unroll
        for (int l = 0; l < j; ++l) {
            const T cc = dot(u[l], v, sh);
            c[j][l] = cc;
            #pragma unroll
            for (int p = 0; p < PER; ++p) v[p] = v[p] - cc * u[l][p];
        }
        r[j] = sqrt(dot(v, v, sh));
        den[j] = r[j] + eps;
        const T inv = safe_inv(den[j]);
        #pragma unroll
        for (int p = 0; p < PER; ++p) u[j][p] = v[p] * inv;
    }
}

__device__ __forceinline__ void load(const T* An, int D, T (&x)[K][PER]) {
    #pragma unroll
    for (int b = 0; b < K; ++b) {
        #pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int d = threadIdx.x + p * BS;
            x[b][p] = d < D ? An[(long long)b * D + d] : (T)0;
        }
    }
}

__device__ __forceinline__ void ps_sums(const T (&x)[PER], const T (&u)[M][PER], T (&ps)[2 * M], T* sh) {
    #pragma unroll
    for (int l = 0; l < M; ++l) {
        T pp = 0, ss = 0;
        #pragma unroll
        for (int p = 0; p < PER; ++p) { pp += u[l][p] * x[p]; ss += u[l][p] * u[l][p]; }
        ps[2 * l] = pp; ps[2 * l + 1] = ss;
    }
    block_sum<2 * M>(ps, sh);
}

extern "C" __global__ void __launch_bounds__(BS) span_forward(const T* A, T* out, int N, int D, T eps) {
    __shared__ T sh[2 * M * NW];
    const int n = blockIdx.x;
    if (n >= N) return;
    T x[K][PER];
    load(A + (long long)n * K * D, D, x);
    T total = 0;
    #pragma unroll
    for (int a = 0; a < K; ++a) {
        T u[M][PER], c[M][M], r[M], den[M], ps[2 * M];
        run_forward(x, a, eps, u, c, r, den, sh);
        ps_sums(x[a], u, ps, sh);
        T run = 0;
        #pragma unroll
        for (int l = 0; l < M; ++l) run = run + ps[2 * l] * ps[2 * l] * ps[2 * l + 1];
        total = total + run;
    }
    if (threadIdx.x == 0) out[n] = total;
}

extern "C" __global__ void __launch_bounds__(BS) span_backward(const T* A, const T* g, T* out, T* dA, int N,
                                                               int D, T eps) {
    __shared__ T sh[2 * M * NW];
    const int n = blockIdx.x;
    if (n >= N) return;
    const T gn = g[n];
    T x[K][PER], dx[K][PER];
    load(A + (long long)n * K * D, D, x);
    #pragma unroll
    for (int b = 0; b < K; ++b) {
        #pragma unroll
        for (int p = 0; p < PER; ++p) dx[b][p] = 0;
    }
    T total = 0;
    #pragma unroll
    for (int a = 0; a < K; ++a) {
        T u[M][PER], c[M][M], r[M], den[M], ps[2 * M], du[M][PER];
        run_forward(x, a, eps, u, c, r, den, sh);        // the forward replayed: the same numbers
        ps_sums(x[a], u, ps, sh);
        T run = 0;
        #pragma unroll
        for (int l = 0; l < M; ++l) run = run + ps[2 * l] * ps[2 * l] * ps[2 * l + 1];
        total = total + run;
        #pragma unroll
        for (int l = 0; l < M; ++l) {                    // d(p^2 s) = 2 p s dp + p^2 ds
            const T pl = ps[2 * l], sl = ps[2 * l + 1];
            const T dp = (T)2 * pl * sl * gn, ds = pl * pl * gn;
            #pragma unroll
            for (int p = 0; p < PER; ++p) {
                dx[a][p] += dp * u[l][p];
                du[l][p] = dp * x[a][p] + (T)2 * ds * u[l][p];
            }
        }
        #pragma unroll
        for (int j = M - 1; j >= 0; --j) {               // the Gram-Schmidt in reverse
            const int b = other(a, j);
            T w[PER], dw[PER];
            #pragma unroll
            for (int p = 0; p < PER; ++p) w[p] = x[b][p];
            #pragma unroll
            for (int l = 0; l < j; ++l) {
                #pragma unroll
                for (int p = 0; p < PER; ++p) w[p] = w[p] - c[j][l] * u[l][p];
            }
            const T inv_den = safe_inv(den[j]), inv_r = safe_inv(r[j]);
            const T t = dot(du[j], w, sh);
            #pragma unroll
            for (int p = 0; p < PER; ++p) dw[p] = du[j][p] * inv_den - t * inv_den * inv_den * (w[p] * inv_r);
            #pragma unroll
            for (int l = j - 1; l >= 0; --l) {
                T vl[PER];                               // v_j before step l, rebuilt in the forward's order
                #pragma unroll
                for (int p = 0; p < PER; ++p) vl[p] = x[b][p];
                #pragma unroll
                for (int q = 0; q < l; ++q) {
                    #pragma unroll
                    for (int p = 0; p < PER; ++p) vl[p] = vl[p] - c[j][q] * u[q][p];
                }
                const T dc = -dot(dw, u[l], sh);
                #pragma unroll
                for (int p = 0; p < PER; ++p) {
                    du[l][p] = du[l][p] - c[j][l] * dw[p] + dc * vl[p];
                    dw[p] = dw[p] + dc * u[l][p];
                }
            }
            #pragma unroll
            for (int p = 0; p < PER; ++p) dx[b][p] += dw[p];
        }
    }
    if (threadIdx.x == 0) out[n] = total;
    T* dAn = dA + (long long)n * K * D;
    #pragma unroll
    for (int b = 0; b < K; ++b) {
        #pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int d = threadIdx.x + p * BS;
            if (d < D) dAn[(long long)b * D + d] = dx[b][p];
        }
    }
}
"""

PER_TARGET = 4      # entries of each vector per thread (registers); the block is ceil(D / 4) threads, <= 512


def span_launch_shape(D):
    """(BS threads per block, PER entries per thread) for vectors of length D."""
    threads = -(-D // PER_TARGET)                                      # ceil(D / PER_TARGET)
    bs = min(512, max(32, -(-threads // 32) * 32))                     # a multiple of the warp size
    return bs, -(-D // bs)


def span_source(dtype, K, D):
    """The CUDA source of the span kernels for one (dtype, K, D); see ``_SPAN_SOURCE``."""
    bs, per = span_launch_shape(D)
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    src = _SPAN_SOURCE.replace("TYPE", ctype).replace("KVAL", str(K)).replace("BSVAL", str(bs))
    return src.replace("PERVAL", str(per)), bs


def _span_module(dtype, K, D):
    key = ("span", np.dtype(dtype).name, K, span_launch_shape(D))
    if key not in _CACHE:
        import cupy
        src, bs = span_source(dtype, K, D)
        _CACHE[key] = (cupy.RawModule(code=src), bs)
    return _CACHE[key]


def span_forward(xp, A, eps):
    N, K, D = A.shape
    if xp is np:
        return _chunked(lambda a: ref_span_forward(xp, a, eps), N, A)
    if not kernels_on(xp):
        return ref_span_forward(xp, A, eps)
    mod, bs = _span_module(A.dtype, K, D)
    A = xp.ascontiguousarray(A)
    out = xp.empty(N, dtype=A.dtype)
    mod.get_function("span_forward")((N,), (bs,), (A, out, np.int32(N), np.int32(D), A.dtype.type(eps)))
    return out


def span_backward(xp, g, A, eps):
    N, K, D = A.shape
    if xp is np:
        return _chunked(lambda gg, a: ref_span_backward(xp, gg, a, eps), N, g, A)
    if not kernels_on(xp):
        return ref_span_backward(xp, g, A, eps)
    mod, bs = _span_module(A.dtype, K, D)
    A, g = xp.ascontiguousarray(A), xp.ascontiguousarray(g.astype(A.dtype, copy=False))
    out, dA = xp.empty(N, dtype=A.dtype), xp.empty_like(A)
    mod.get_function("span_backward")((N,), (bs,), (A, g, out, dA, np.int32(N), np.int32(D), A.dtype.type(eps)))
    return out, dA
