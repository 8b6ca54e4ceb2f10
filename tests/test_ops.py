"""Finite-difference checks of every elementary op in refmoe.ops (float64), and their dtype behaviour."""
import numpy as np
import pytest

from refmoe import gradcheck as gc
from refmoe import ops

from helpers import FD_TOL, assert_all_below, host, on, softmax_rows


def test_linear(xp, rng):
    x, w = on(xp, rng.standard_normal((5, 4))), on(xp, rng.standard_normal((3, 4)))
    z, cache = ops.linear_forward(x, w)
    dz = on(xp, rng.standard_normal(z.shape))
    dx, dw = ops.linear_backward(dz, cache)
    errs = gc.check_vjp(lambda p: ops.linear_forward(p["x"], p["w"])[0], {"x": x, "w": w}, {"x": dx, "w": dw}, dz)
    assert_all_below(errs)  # measured ~1e-10


def test_softmax(xp, rng):
    z = on(xp, 3 * rng.standard_normal((6, 5)))
    p, cache = ops.softmax_forward(z)
    assert float(abs(p.sum(axis=1) - 1).max()) < 1e-15 * 10
    dp = on(xp, rng.standard_normal(p.shape))
    dz = ops.softmax_backward(dp, cache)
    errs = gc.check_vjp(lambda a: ops.softmax_forward(a["z"])[0], {"z": z}, {"z": dz}, dp)
    assert_all_below(errs)  # measured ~1e-10


def test_softmax_large_logits_do_not_overflow(xp):
    p, _ = ops.softmax_forward(on(xp, np.array([[1000.0, 999.0, -1000.0]])))
    expect = softmax_rows(np.array([[1.0, 0.0, -2000.0]]))
    assert np.allclose(host(p), expect, rtol=0, atol=1e-15)


def test_topk_order_and_tie_rule(xp):
    scores = on(xp, np.array([[0.1, 0.3, 0.3, 0.3], [0.4, 0.1, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    idx = host(ops.topk_indices(scores, 3))
    # descending score; among equal scores the lower expert index first
    assert idx.tolist() == [[1, 2, 3], [0, 2, 1], [0, 1, 2]]
    assert idx.dtype == np.int64


def test_gather_and_renorm(xp, rng):
    scores = on(xp, softmax_rows(rng.standard_normal((5, 6))))
    idx = ops.topk_indices(scores, 3)
    sel, gcache = ops.gather_forward(scores, idx)
    g, rcache = ops.renorm_forward(sel)
    assert np.allclose(host(g.sum(axis=1)), 1.0, atol=1e-15)
    dg = on(xp, rng.standard_normal(g.shape))
    dscores = ops.gather_backward(ops.renorm_backward(dg, rcache), gcache)

    def f(a):
        return ops.renorm_forward(ops.gather_forward(a["s"], idx)[0])[0]

    assert_all_below(gc.check_vjp(f, {"s": scores}, {"s": dscores}, dg))  # measured ~1e-10
    # entries outside the top-k get exactly zero gradient
    off = np.ones((5, 6), bool)
    off[np.arange(5)[:, None], host(idx)] = False
    assert np.all(host(dscores)[off] == 0.0)


def test_topk_scores_matrix(xp, rng):
    scores = on(xp, softmax_rows(rng.standard_normal((4, 5))))
    idx = ops.topk_indices(scores, 2)
    (S, s_sel), cache = ops.topk_scores_forward(scores, idx)
    S_h = host(S)
    assert np.allclose(S_h.sum(axis=1), 1.0, atol=1e-15)
    assert ((S_h != 0).sum(axis=1) == 2).all()
    dS = on(xp, rng.standard_normal(S.shape))
    ds_sel = on(xp, rng.standard_normal(s_sel.shape))
    grad = ops.topk_scores_backward(dS, cache, ds_sel)

    def f(a):
        (S_, s_) = ops.topk_scores_forward(a["s"], idx)[0]
        return float((S_ * dS).sum() + (s_ * ds_sel).sum())

    assert_all_below(gc.check_vjp(f, {"s": scores}, {"s": grad}))  # measured ~1e-10


@pytest.mark.parametrize("scale", [1.0, 8.0])  # 8: silu in its saturated tails on both sides
def test_swiglu(xp, rng, scale):
    x = on(xp, scale * rng.standard_normal((5, 4)))
    wg, wu, wd = (on(xp, rng.standard_normal(s)) for s in [(4, 3), (4, 3), (3, 4)])
    out, cache = ops.swiglu_forward(x, wg, wu, wd)
    dout = on(xp, rng.standard_normal(out.shape))
    dx, dwg, dwu, dwd = ops.swiglu_backward(dout, cache)
    inputs = {"x": x, "wg": wg, "wu": wu, "wd": wd}
    errs = gc.check_vjp(lambda p: ops.swiglu_forward(p["x"], p["wg"], p["wu"], p["wd"])[0], inputs,
                        {"x": dx, "wg": dwg, "wu": dwu, "wd": dwd}, dout)
    assert_all_below(errs)  # measured ~1e-10


def test_swiglu_matches_closed_form(rng):
    x, wg, wu, wd = rng.standard_normal((3, 2)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4)), rng.standard_normal((4, 2))
    a = x @ wg
    expect = (a / (1 + np.exp(-a)) * (x @ wu)) @ wd
    assert np.allclose(ops.swiglu_forward(x, wg, wu, wd)[0], expect, rtol=1e-14, atol=1e-14)


def test_ops_keep_float32(xp, rng):
    x = on(xp, rng.standard_normal((5, 4)).astype(np.float32))
    w = [on(xp, rng.standard_normal(s).astype(np.float32)) for s in [(4, 3), (4, 3), (3, 4)]]
    out, cache = ops.swiglu_forward(x, *w)
    grads = ops.swiglu_backward(out, cache)
    p, pc = ops.softmax_forward(x)
    assert out.dtype == np.float32 and p.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)
    assert ops.softmax_backward(p, pc).dtype == np.float32


def test_fd_tolerance_is_meaningful(rng):
    """A backward that is wrong by a small factor fails the pass mark by orders of magnitude."""
    z = rng.standard_normal((4, 3))
    p, cache = ops.softmax_forward(z)
    dp = rng.standard_normal(p.shape)
    wrong = 1.01 * ops.softmax_backward(dp, cache)
    err = gc.check_vjp(lambda a: ops.softmax_forward(a["z"])[0], {"z": z}, {"z": wrong}, dp)["z"]
    assert err > 1e3 * FD_TOL
