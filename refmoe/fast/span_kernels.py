r"""The span L_o kernels of ``refmoe.fast.kernels`` (re-exported there): the released Gram-Schmidt on the full
[N, K, D] vectors, all K runs of a token in one CUDA block, and the batched reference they must equal.

Dimension letters: N tokens, K slots, D model width, BS threads per block, PER entries of a vector per thread.

A thread keeps its PER = D / BS entries of the K slot vectors in registers, a dot product is one block
reduction, and the K runs (one per slot: the other K-1 slots orthogonalised in order) follow each other in
the block, so one launch covers all N K runs. The backward keeps no tape: it replays each run's forward (the
same operations in the same order, so the same numbers), walks it back, and also returns the value.
Numerics: the kernels sum dot products in a tree, the reference the core's way in the Gram-Schmidt and by
:func:`row_dot` in the scores and the backward. float32 differs by a few ulp where the slots are well apart;
where they are nearly dependent, the basis amplifies rounding, and every implementation (the core included)
is as far from the float64 result as from each other (tests/test_fast_kernels.py checks both).

The reference is also the NumPy fast path, on chunks of CPU_CHUNK tokens. Its runs' vectors are built by
broadcast copies, the scores p and ||u||^2 of the forward are kept for the backward, and the runs' gradients go
back to their slots as two sums per vector: at the ``cpu`` shape of benchmarks/ (N 2048, K 4, D 256, float32,
one thread) value and gradient take about 52 ms, against 75 ms with gathers, recomputed scores and
multiply-then-sum dots everywhere.
"""
from __future__ import annotations

import numpy as np

from ..losses.gram_schmidt import dot, gram_schmidt_backward, gram_schmidt_forward
from .switch import kernels_on

_CACHE = {}


# ----------------------------------------------------------------------------------------------
# L_o span: the released Gram-Schmidt on the full vectors, all K runs of a token in one block
# ----------------------------------------------------------------------------------------------

def others_table(K):
    """[K, K-1] int64: row a lists the slots other than a, in slot order (the vectors of run a)."""
    return np.array([[b for b in range(K) if b != a] for a in range(K)], dtype=np.int64).reshape(K, K - 1)


def row_dot(xp):
    """The row dot product ``dot(a, b) -> [R, 1]`` of the references' scores and backward: on NumPy one
    batched product ([R, 1, D] x [R, D, 1], a single pass without a temporary: about 3x faster than
    multiply-then-sum at these sizes), on CuPy the core's multiply-sum (one fused reduction). The forward
    Gram-Schmidt keeps the core's sums: on a token whose slots are nearly dependent the basis amplifies any
    change in how its dots are rounded (to 4e-3 relative in float32 with this dot there), while a change in
    the scores or the backward stays at rounding."""
    if xp is np:
        return lambda a, b: np.matmul(a[:, None, :], b[:, :, None])[:, 0]
    return dot


def run_columns(xp, A):
    """The K-1 vectors of every run as K-1 arrays [N*K, D]: run (n, a)'s j-th vector is slot j of token n
    where j < a, else slot j + 1 (``others_table``), written by two broadcast copies per array."""
    N, K, D = A.shape
    cols = []
    for j in range(K - 1):
        c = xp.empty_like(A)                                               # [N, K, D], runs along axis 1
        c[:, :j + 1] = A[:, j + 1:j + 2]
        c[:, j + 1:] = A[:, j:j + 1]
        cols.append(c.reshape(N * K, D))
    return cols


def ref_span_runs(xp, A, eps):
    """The K Gram-Schmidt runs of every token batched into one run over N*K groups (run (n, a)
    orthogonalises the slots of token n other than a, in order).  A: [N, K, D] ->
    (per_token [N], (x_a [N*K, D], us, tape, scores)) with the arithmetic of ``ortho_span.span_per_token``
    (the basis exactly; the scores' dot products summed by :func:`row_dot`)."""
    N, K, D = A.shape
    dot_ = row_dot(xp)
    x_a = A.reshape(N * K, D)                                              # [N*K, D] the slot itself
    us, tape = gram_schmidt_forward(run_columns(xp, A), eps)               # the core's sums: the same basis
    per_run = xp.zeros((N * K, 1), dtype=A.dtype)
    scores = []
    for u in us:
        p, s = dot_(u, x_a), dot_(u, u)                                    # [N*K, 1] <u_l, x_a>, ||u_l||^2
        per_run = per_run + p * p * s
        scores.append((p, s))
    return per_run.reshape(N, K).sum(axis=1), (x_a, us, tape, scores)


def ref_span_forward(xp, A, eps):
    """per_token [N] of ``ortho_span.span_per_token(A, eps)``.  A: [N, K, D]."""
    return ref_span_runs(xp, A, eps)[0]


def ref_span_backward(xp, g, A, eps):
    """(per_token [N], dA [N, K, D]): the value and the gradient of sum_n g_n per_token_n
    (``ortho_span.span_per_token`` and ``ortho_span.span_backward``).  g: [N]."""
    per_token, runs = ref_span_runs(xp, A, eps)
    return per_token, ref_span_runs_backward(xp, g, runs, A.shape[1])


def ref_span_runs_backward(xp, g, runs, K):
    """dA [N, K, D] of sum_n g_n per_token_n from the tape ``runs`` of :func:`ref_span_runs`.  g: [N]."""
    x_a, us, tape, scores = runs
    N, D = g.shape[0], x_a.shape[1]
    gk = xp.repeat(g, K)[:, None]                                          # [N*K, 1]
    own = xp.zeros_like(x_a)                                               # [N*K, D] run a's own slot
    dus = []
    for u, (p, s) in zip(us, scores):
        dp, ds = 2.0 * p * s * gk, p * p * gk                              # d(p^2 s) = 2 p s dp + p^2 ds
        own += dp * u
        dus.append(dp * x_a + (2.0 * ds) * u)
    dA = own.reshape(N, K, D)
    for j, dcol in enumerate(gram_schmidt_backward(dus, us, tape, dot=row_dot(xp))):
        dcol = dcol.reshape(N, K, D)                                       # run a's j-th vector, back to its slot
        dA[:, j + 1] += dcol[:, :j + 1].sum(axis=1)
        dA[:, j] += dcol[:, j + 1:].sum(axis=1)
    return dA


CPU_CHUNK = 64      # tokens per call of the references on NumPy: the runs' vectors then stay in the CPU caches


def _chunked(fn, n_tokens, *arrays):
    """fn on token chunks of ``arrays`` (NumPy), outputs concatenated along the token axis."""
    parts = [fn(*(a[i:i + CPU_CHUNK] for a in arrays)) for i in range(0, max(n_tokens, 1), CPU_CHUNK)]
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
