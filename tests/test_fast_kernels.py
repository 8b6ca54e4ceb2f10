"""Every op of ``refmoe.fast.kernels`` against the core code it replaces, on both backends.

On NumPy the ops run their references, so these tests check the references against the core; on CuPy they
launch the kernels, and each is also compared with its own reference on the same device (``test_*_kernel``).
float64: 1e-12 relative or better; float32: the tolerance beside each assertion. New backwards (span, router,
SwiGLU elementwise) are checked against float64 central differences as well.
"""
import warnings

import numpy as np
import pytest

from refmoe import gradcheck, ops
from refmoe.fast import kernels as kn
from refmoe.gradcheck import rel_error
from refmoe.losses.ortho_span import span_backward, span_per_token
from refmoe.router import routing_backward, routing_forward

from helpers import host, on

TOL = {np.float64: 1e-12, np.float32: 2e-5}      # measured ~1e-16 / ~3e-7 (references), kernels see below


def _rand(xp, rng, shape, dtype=np.float64, scale=1.0):
    return on(xp, (scale * rng.standard_normal(shape)).astype(dtype))


# ----------------------------------------------------------------------------------------------
# SwiGLU elementwise parts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swiglu_elementwise_equal_core(xp, rng, dtype):
    M, D, H = 37, 10, 13
    x, dout = _rand(xp, rng, (M, D), dtype), _rand(xp, rng, (M, D), dtype)
    wg, wu, wd = _rand(xp, rng, (D, H), dtype, 2), _rand(xp, rng, (D, H), dtype), _rand(xp, rng, (H, D), dtype)
    out, c = ops.swiglu_forward(x, wg, wu, wd)
    dx, dwg, dwu, dwd = ops.swiglu_backward(dout, c)
    a, b = x @ wg, x @ wu
    h = kn.swiglu_forward_ew(xp, a, b)
    assert h.dtype == dtype
    assert rel_error(h @ wd, out) < TOL[dtype]
    dh = dout @ wd.T
    h2, da, db = kn.swiglu_backward_ew(xp, dh, a.copy(), b.copy())
    assert rel_error(h2, c.h) < TOL[dtype]
    assert rel_error(h2.T @ dout, dwd) < TOL[dtype]
    assert rel_error(x.T @ da, dwg) < TOL[dtype] and rel_error(x.T @ db, dwu) < TOL[dtype]
    assert rel_error(da @ wg.T + db @ wu.T, dx) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swiglu_elementwise_extreme_inputs(xp, dtype):
    a = on(xp, np.array([-1e4, -800.0, -88.0, -1.0, 0.0, 1.0, 88.0, 800.0, 1e4], dtype=dtype))
    b = on(xp, np.full(9, 2.0, dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # e^{-a} overflows to inf: no warning
        h = kn.swiglu_forward_ew(xp, a, b)
        h2, da, db = kn.swiglu_backward_ew(xp, xp.ones(9, dtype=dtype), a.copy(), b.copy())
    assert h.dtype == dtype and bool(xp.isfinite(h).all())
    assert float(h[0]) == 0.0 and float(h[-1]) == 2e4               # silu(-inf) = 0, silu(a) = a for large a
    assert bool(xp.isfinite(da).all()) and rel_error(h2, h) < 1e-15
    assert float(da[0]) == 0.0 and float(da[-1]) == 2.0             # d silu: 0 far left, 1 far right


# ----------------------------------------------------------------------------------------------
# router: softmax + top-k + gates, and the backward
# ----------------------------------------------------------------------------------------------

ROUTERS = [("always", 1.0, 0.0), ("never", 1.0, 0.0), ("always", 2.5, 1e-20), ("never", 16.0, 0.0)]


@pytest.mark.parametrize("renorm, scale, eps", ROUTERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_topk_and_backward_equal_core(xp, rng, renorm, scale, eps, dtype):
    N, E, K = 41, 9, 3
    z = rng.standard_normal((N, E))
    z[0] = 0.5                                      # a row of ties: the lower index wins
    z[1, [2, 5, 7]] = 3.0
    z = on(xp, z.astype(dtype))
    (idx0, g0), rc = routing_forward(z, K, renorm=renorm, scale=scale, eps=eps)
    P, idx, gates, denom = kn.softmax_topk(xp, z, K, renorm == "always", eps, scale)
    assert (host(idx) == host(idx0)).all()
    assert host(idx)[0].tolist() == [0, 1, 2] and host(idx)[1].tolist() == [2, 5, 7]
    assert P.dtype == dtype and gates.dtype == dtype
    assert rel_error(P, rc.scores) < TOL[dtype] and rel_error(gates, g0) < TOL[dtype]
    dg, d_inj = _rand(xp, rng, (N, K), dtype), _rand(xp, rng, (N, E), dtype)
    for inj in (None, d_inj):
        ref = routing_backward(dg, rc, inj)
        got = kn.router_backward(xp, dg, P, idx, denom, renorm == "always", scale, inj)
        assert got.dtype == dtype and rel_error(got, ref) < TOL[dtype]


def test_router_backward_finite_differences(xp, rng):
    N, E, K = 6, 5, 2
    z = _rand(xp, rng, (N, E))
    dg, d_inj = _rand(xp, rng, (N, K)), _rand(xp, rng, (N, E))
    _, idx0, _, _ = kn.softmax_topk(xp, z, K, True, 0.0, 1.5)

    def phi(inp):
        P, idx, gates, _ = kn.softmax_topk(xp, inp["z"], K, True, 0.0, 1.5)
        return (gates * dg).sum() + (P * d_inj).sum()

    P, idx, _, denom = kn.softmax_topk(xp, z, K, True, 0.0, 1.5)
    analytic = {"z": kn.router_backward(xp, dg, P, idx, denom, True, 1.5, d_inj)}
    guard = lambda inp: kn.softmax_topk(xp, inp["z"], K, True, 0.0, 1.5)[1]        # noqa: E731
    err = gradcheck.check_vjp(phi, {"z": z}, analytic, guard=guard)["z"]
    assert err < 1e-8                                # measured ~1e-10


# ----------------------------------------------------------------------------------------------
# rows: gathers, combine, combine backward, slot sums
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_ops_equal_plain_formulas(xp, rng, dtype):
    N, K, D, R = 7, 3, 5, 26
    src_rows = rng.permutation(R)[: N * K]
    src = np.full(R, -1, dtype=np.int64)
    src[src_rows] = np.arange(N * K)                 # row -> assignment, -1 padding
    slot = src_rows.reshape(N, K).astype(np.int64)   # assignment -> row
    src_d, slot_d = on(xp, src), on(xp, slot)
    table = rng.standard_normal((R, D)).astype(dtype)
    g, dy = rng.standard_normal((N, K)).astype(dtype), rng.standard_normal((N, D)).astype(dtype)
    inj, base = rng.standard_normal((N, K, D)).astype(dtype), rng.standard_normal((N, D)).astype(dtype)

    got = host(kn.gather_rows(xp, on(xp, table), src_d))
    want = np.where(src[:, None] >= 0, table[np.maximum(src, 0)], 0)
    assert got.dtype == dtype and np.array_equal(got, want.astype(dtype))
    eo = table[slot]                                                               # [N, K, D]
    y = kn.combine(xp, on(xp, g), on(xp, eo), on(xp, base))
    assert rel_error(y, (g[:, :, None] * eo).sum(axis=1) + base) < TOL[dtype]
    assert rel_error(kn.combine(xp, on(xp, g), on(xp, eo)), (g[:, :, None] * eo).sum(axis=1)) < TOL[dtype]
    for d_inj in (None, inj):
        rows = host(kn.combine_backward_rows(xp, on(xp, g), on(xp, dy), None if d_inj is None else on(xp, d_inj),
                                             src_d))
        d_eo = g[:, :, None] * dy[:, None, :] + (0 if d_inj is None else d_inj)
        assert rel_error(rows[slot], d_eo) < TOL[dtype]
        assert (rows[src < 0] == 0).all()
    dx = kn.slot_sum(xp, on(xp, table), slot_d, on(xp, base))
    assert rel_error(dx, base + table[slot].sum(axis=1)) < TOL[dtype]


# ----------------------------------------------------------------------------------------------
# L_o span: the released Gram-Schmidt on the full vectors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K, D", [(2, 7), (3, 40), (4, 256), (6, 130), (6, 600)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_span_equals_core(xp, rng, K, D, dtype):
    N = 9
    A = _rand(xp, rng, (N, K, D), dtype)
    A[2, 1] = A[2, 0] * 0.5 + 1e-3 * A[2, 1]          # nearly dependent slots
    g = _rand(xp, rng, (N,), dtype)
    ref_v, ref_d = span_per_token(A, 1e-6), span_backward(g, A, 1e-6)
    v = kn.span_forward(xp, A, 1e-6)
    v2, d = kn.span_backward(xp, g, A, 1e-6)
    assert v.dtype == dtype and d.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-4     # float32: the nearly dependent token; NumPy <= 1.1e-7
    assert rel_error(v, ref_v) < tol and rel_error(v2, ref_v) < tol
    assert rel_error(d, ref_d) < tol


def test_span_on_nearly_dependent_slots_is_as_accurate_as_the_core(xp):
    """float32 against the float64 result of the same inputs, over 40 draws of a token whose slot 1 is
    0.5 x_0 + 1e-3 noise, where rounding is amplified: the fast path's worst error may not exceed twice the
    core's (NumPy measured: value 7.0e-7 against 6.6e-7, gradient 2.8e-4 against 2.8e-4). On NumPy the
    basis is summed as the core sums it, so fast and core also agree closely (gradient 8.6e-7 measured; the
    Gram-Schmidt's dots as batched products instead give 2.1e-4, as accurate but no longer the core's)."""
    errs = {"fast_v": [], "fast_d": [], "core_v": [], "core_d": [], "fast_core_d": []}
    for seed in range(40):
        r = np.random.default_rng(seed)
        A64 = r.standard_normal((9, 4, 256))
        A64[2, 1] = A64[2, 0] * 0.5 + 1e-3 * A64[2, 1]
        g64 = r.standard_normal(9)
        A, g = on(xp, A64.astype(np.float32)), on(xp, g64.astype(np.float32))
        A_hi, g_hi = (on(xp, a.astype(np.float32).astype(np.float64)) for a in (A64, g64))   # the same inputs
        v_hi, d_hi = span_per_token(A_hi, 1e-6), span_backward(g_hi, A_hi, 1e-6)
        v, d = kn.span_backward(xp, g, A, 1e-6)
        v_core, d_core = span_per_token(A, 1e-6), span_backward(g, A, 1e-6)
        errs["fast_v"].append(rel_error(v, v_hi))
        errs["fast_d"].append(rel_error(d, d_hi))
        errs["core_v"].append(rel_error(v_core, v_hi))
        errs["core_d"].append(rel_error(d_core, d_hi))
        errs["fast_core_d"].append(rel_error(d, d_core))
    worst = {k: max(e) for k, e in errs.items()}
    assert worst["fast_v"] <= 2 * worst["core_v"] + 1e-6
    assert worst["fast_d"] <= 2 * worst["core_d"] + 1e-6
    if xp is np:                                        # the same basis as the core: only the scores differ
        assert worst["fast_core_d"] < 1e-5


def test_span_dependent_slots_and_zero_eps(xp, rng):
    A = rng.standard_normal((4, 3, 8))
    A[0, 2] = A[0, 1]                                 # exactly dependent: residual 0
    A[1, 0] = 0.0                                     # a zero slot
    A = on(xp, A)
    g = on(xp, np.ones(4))
    for eps in (1e-6, 0.0):
        v = kn.span_forward(xp, A, eps)
        _, d = kn.span_backward(xp, g, A, eps)
        assert bool(xp.isfinite(v).all()) and bool(xp.isfinite(d).all())
        # eps = 1e-6: the dependent slot's residual (rounding noise) is held down by eps; the summation order
        # still shows (H200: 4.1e-12). eps = 0: that noise is normalised to a unit vector whose direction is
        # the rounding's, so token 0's value is arbitrary (H200: 23.1 against NumPy's 18.8); the others agree
        tokens = slice(None) if eps else slice(1, None)
        assert rel_error(v[tokens], span_per_token(A, eps)[tokens]) < 1e-10
        assert rel_error(d[tokens], span_backward(g, A, eps)[tokens]) < 1e-10


def test_span_backward_finite_differences(xp, rng):
    N, K, D = 3, 4, 5
    A, g = _rand(xp, rng, (N, K, D)), _rand(xp, rng, (N,))
    phi = lambda inp: (g * kn.span_forward(xp, inp["A"], 1e-6)).sum()             # noqa: E731
    err = gradcheck.check_vjp(phi, {"A": A}, {"A": kn.span_backward(xp, g, A, 1e-6)[1]})["A"]
    assert err < 1e-8                                 # measured ~1e-10


# ----------------------------------------------------------------------------------------------
# GPU only: each kernel against its reference on the device
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_equal_their_references_on_the_gpu(cp, rng, dtype):
    if not kn.kernels_on(cp):
        pytest.skip("REFMOE_FAST_KERNELS=0: the references run in the kernels' place")
    N, K, D, E, H = 50, 6, 300, 10, 17
    A, g = _rand(cp, rng, (N, K, D), dtype), _rand(cp, rng, (N,), dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_error(kn.span_forward(cp, A, 1e-6), kn.ref_span_forward(cp, A, 1e-6)) < tol
    for got, want in zip(kn.span_backward(cp, g, A, 1e-6), kn.ref_span_backward(cp, g, A, 1e-6)):
        assert rel_error(got, want) < tol
    a, b, dh = (_rand(cp, rng, (N, H), dtype, 3) for _ in range(3))
    assert rel_error(kn.swiglu_forward_ew(cp, a, b), kn.ref_swiglu_forward_ew(cp, a, b)) < tol
    for got, want in zip(kn.swiglu_backward_ew(cp, dh.copy(), a.copy(), b.copy()),
                         kn.ref_swiglu_backward_ew(cp, dh.copy(), a.copy(), b.copy())):
        assert rel_error(got, want) < tol
    z = _rand(cp, rng, (N, E), dtype)
    got, want = kn.softmax_topk(cp, z, K, True, 0.0, 1.0), kn.ref_softmax_topk(cp, z, K, True, 0.0, 1.0)
    assert (host(got[1]) == host(want[1])).all()
    for x, y in zip(got, want):
        assert rel_error(x, y) < tol
    P, idx, _, denom = got
    dg, inj = _rand(cp, rng, (N, K), dtype), _rand(cp, rng, (N, E), dtype)
    assert rel_error(kn.router_backward(cp, dg, P, idx, denom, True, 1.0, inj),
                     kn.ref_router_backward(cp, dg, P, idx, denom, True, 1.0, inj)) < tol
    rows = cp.asarray(np.where(rng.random(N * K) < 0.2, -1, rng.integers(0, N, N * K)).astype(np.int64))
    src = _rand(cp, rng, (N, D), dtype)
    assert rel_error(kn.gather_rows(cp, src, rows), kn.ref_gather_rows(cp, src, rows)) == 0.0
