"""No silent NaN: scale-safe L_o pairwise, float32 L_v paper, the upstream dloss, non-finite inputs of the layer.

Each test is one reproducer of the issue: before the fix it gave NaN / inf or a wrong number without an error.
Tolerances of float32 against float64 are written down next to the measured size.
"""
import numpy as np
import pytest

from refmoe import gradcheck
from refmoe.losses.aux import aux_loss_backward, aux_loss_forward
from refmoe.losses.ortho import ortho_loss_backward, ortho_loss_forward, pairwise_backward, pairwise_per_token
from refmoe.losses.variance import var_loss_backward, var_loss_forward

from helpers import assert_all_below, host, on


def _direct_pairwise(A, eps):
    """The unscaled formula (the previous implementation): value [N] and the gradient for g = 1."""
    K = A.shape[1]
    G = np.einsum("njd,nkd->njk", A, A)
    nrm = np.diagonal(G, axis1=1, axis2=2)
    den = nrm + eps
    den = den + (den <= 0).astype(A.dtype)
    w = nrm / (den * den)
    off = 1.0 - np.eye(K, dtype=A.dtype)
    value = (G * G * w[:, None, :] * off).sum(axis=(1, 2))
    M = G * w[:, None, :] * off
    q = (G * G * off).sum(axis=1)
    dw = (eps - nrm) / (den * den * den)
    dA = 2.0 * np.einsum("njk,nkd->njd", M + np.swapaxes(M, 1, 2), A) + 2.0 * (q * dw)[:, :, None] * A
    return value, dA


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------------------------
# L_o pairwise: scale-safe arithmetic
# ----------------------------------------------------------------------------------------------

def test_pairwise_equals_direct_formula_where_that_is_finite(rng):
    # ordinary scales: the power-of-two rescaling is exact, so value and gradient are bitwise the same
    for _ in range(60):
        N, K, D = rng.integers(1, 5), rng.integers(1, 5), rng.integers(1, 6)
        A = rng.standard_normal((N, K, D)) * 10.0 ** rng.uniform(-3, 3)
        for eps in (0.0, 1e-12, 0.3):
            value, dA = _direct_pairwise(A, eps)
            assert _rel(pairwise_per_token(A, eps), value) <= 1e-13
            assert _rel(pairwise_backward(np.ones(N), A, eps), dA) <= 1e-13


def test_pairwise_large_outputs_float32():
    # before: NaN (w = nrm / den^2 overflowed); true value 2 * (3 * 9e18) = 5.4e19, a float32 number
    loss, cache = ortho_loss_forward(np.full((1, 2, 3), 3e9, np.float32), "pairwise")
    assert loss.dtype == np.float32
    assert float(loss) == pytest.approx(5.4e19, rel=1e-6)
    grad = ortho_loss_backward(1.0, cache)
    assert np.isfinite(grad).all() and grad.dtype == np.float32
    # two equal slots x: L = G_12^2/n_2 + G_12^2/n_1, so dL/dx_1 = 2x + 2x - 2x = 2x
    assert np.allclose(grad, 2 * 3e9, rtol=1e-5)


def test_pairwise_k1_large_outputs_is_zero():
    # before: NaN (G*G = inf times the j != k mask 0); the docstring says K = 1 gives 0
    A = np.full((3, 1, 4), 1e10, np.float32)
    loss, cache = ortho_loss_forward(A, "pairwise")
    assert float(loss) == 0.0
    assert float(np.abs(ortho_loss_backward(1.0, cache)).max()) == 0.0


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e-8), (np.float64, 1e-60)])
def test_pairwise_eps0_tiny_outputs_finite_and_exact(rng, dtype, scale):
    # before: -inf / NaN gradients (w' = -n / n^3 underflowed to -inf); after: the true, scaled values
    U = rng.standard_normal((4, 3, 5))
    A = (U * scale).astype(dtype)
    loss, cache = ortho_loss_forward(A, "pairwise", eps=0.0)
    grad = ortho_loss_backward(1.0, cache)
    assert np.isfinite(grad).all() and grad.dtype == dtype
    ref = A.astype(np.float64) / scale                          # the same directions at unit size
    ref_loss, ref_cache = ortho_loss_forward(ref, "pairwise", eps=0.0)
    ref_grad = ortho_loss_backward(1.0, ref_cache)
    tol = 1e-5 if dtype == np.float32 else 1e-13                # measured 1.5e-7 (float32), 3e-16 (float64)
    assert float(loss) == pytest.approx(float(ref_loss) * scale * scale, rel=tol)
    assert _rel(grad / scale, ref_grad) < tol


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-8, 1.0, 1e8, 1e15])
@pytest.mark.parametrize("eps", [0.0, None])
def test_pairwise_float32_matches_float64_at_every_scale(rng, scale, eps):
    A64 = rng.standard_normal((6, 4, 8)) * scale
    A32 = A64.astype(np.float32)
    l32, c32 = ortho_loss_forward(A32, "pairwise", eps=eps)
    l64, c64 = ortho_loss_forward(A32.astype(np.float64), "pairwise", eps=eps)
    g32, g64 = ortho_loss_backward(1.0, c32), ortho_loss_backward(1.0, c64)
    assert np.isfinite(float(l32)) and np.isfinite(g32).all()
    # float32 rounding of sums over D = 8 and K = 4: measured <= 2e-6 (value), 3e-6 (gradient). With the
    # default eps and outputs below ~1e-12 the true numbers (|x|^6 / eps^2) lie under float32's range:
    # there the comparison is absolute, at float32's smallest normal number
    tiny = float(np.finfo(np.float32).tiny)
    assert abs(float(l32) - float(l64)) <= 1e-4 * abs(float(l64)) + tiny
    assert float(np.abs(g32 - g64).max()) <= 1e-4 * float(np.abs(g64).max()) + tiny


def test_pairwise_tiny_slot_next_to_a_large_one_float32(rng):
    # eps = 0: a slot 1e-25 times shorter than another still gives its true, finite projection terms
    A = rng.standard_normal((2, 2, 4))
    A[:, 1] *= 1e-25
    l32, c32 = ortho_loss_forward(A.astype(np.float32), "pairwise", eps=0.0)
    l64, c64 = ortho_loss_forward(A.astype(np.float32).astype(np.float64), "pairwise", eps=0.0)
    g32, g64 = ortho_loss_backward(1.0, c32), ortho_loss_backward(1.0, c64)
    assert float(l32) == pytest.approx(float(l64), rel=1e-5)
    assert np.isfinite(g32).all()
    assert _rel(g32, g64) < 1e-4


def test_pairwise_fd_at_small_scale():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((3, 3, 4)) * 1e-3
    for eps in (0.0, 1e-12):
        _, cache = ortho_loss_forward(A, "pairwise", eps=eps)
        grad = ortho_loss_backward(1.0, cache)
        # FD in the unit-size variable u = A / 1e-3:  L(A) = 1e-6 L(u) for eps = 0
        f = lambda d: ortho_loss_forward(d["A"] * 1e-3, "pairwise", eps=eps)[0] * 1e6
        err = gradcheck.check_vjp(f, {"A": A / 1e-3}, {"A": grad * 1e3})
        assert_all_below(err, 1e-7)


def test_pairwise_value_overflow_raises_naming_expert_out():
    with pytest.raises(ValueError, match=r"expert_out is finite but too large .*float32"):
        ortho_loss_forward(np.full((1, 2, 3), 1e19, np.float32), "pairwise")


# ----------------------------------------------------------------------------------------------
# L_v paper in float32
# ----------------------------------------------------------------------------------------------

def _near_identical_tokens(N=50_000, seed=0):
    """N tokens routed to experts 0, 1 with s = 0.6 + 1e-5 noise after renormalisation (E = 4, K = 2)."""
    rng = np.random.default_rng(seed)
    a = 0.6 + 1e-5 * rng.standard_normal(N)
    P = np.stack([a * 0.999, (1 - a) * 0.999, np.full(N, 5e-4), np.full(N, 5e-4)], axis=1)   # [N, 4]
    return P, np.tile(np.array([0, 1]), (N, 1))


def test_var_paper_float32_near_identical_tokens():
    # before: value 555x the float64 value, d_scores 494% off (sequential float32 column sum)
    P, idx = _near_identical_tokens()
    l64, c64 = var_loss_forward(P, idx, "paper")
    l32, c32 = var_loss_forward(P.astype(np.float32), idx, "paper")
    d64, d32 = var_loss_backward(1.0, c64), var_loss_backward(1.0, c32)
    assert l32.dtype == np.float32 and d32.dtype == np.float32
    # what is left is S's own float32 rounding (1 ulp of 0.6 = 6e-8 against deviations of 1e-5):
    # measured 3.1e-4 (value) and 7.2e-4 (d_scores, relative to its largest entry)
    assert float(l32) == pytest.approx(float(l64), rel=2e-3)
    assert _rel(d32, d64) < 5e-3


def test_var_paper_float64_unchanged_by_float64_accumulation(rng):
    from helpers import softmax_rows
    P = softmax_rows(rng.standard_normal((40, 6)))
    idx = np.argsort(-P, axis=1, kind="stable")[:, :2]
    loss, cache = var_loss_forward(P, idx, "paper")
    (S, _), _ = __import__("refmoe").ops.topk_scores_forward(P, idx)
    sbar = S.sum(axis=0) / 40.0
    dev = S - sbar
    assert float(loss) == -(dev * dev).sum() / 6                # bitwise: the old two-pass formula


# ----------------------------------------------------------------------------------------------
# dloss: one check for every loss backward
# ----------------------------------------------------------------------------------------------

def _caches(xp, rng, dtype):
    from helpers import softmax_rows
    P = on(xp, softmax_rows(rng.standard_normal((6, 5))).astype(dtype))
    idx = on(xp, np.argsort(-host(P), axis=1, kind="stable")[:, :2])
    A = on(xp, rng.standard_normal((6, 2, 3)).astype(dtype))
    return {"aux": (aux_loss_forward(P, idx)[1], aux_loss_backward),
            "ortho": (ortho_loss_forward(A)[1], ortho_loss_backward),
            "var": (var_loss_forward(P, idx)[1], var_loss_backward)}


@pytest.mark.parametrize("term", ["aux", "ortho", "var"])
def test_dloss_refused_when_not_a_finite_real_scalar(xp, rng, term):
    cache, backward = _caches(xp, rng, np.float64)[term]
    with pytest.raises(ValueError, match="dloss must be a scalar"):
        backward(xp.arange(4.0), cache)                          # before: broadcast silently
    for bad in (float("nan"), float("inf"), np.float64("nan"), xp.asarray(float("nan"))):
        with pytest.raises(ValueError, match="dloss"):
            backward(bad, cache)
    for bad in (1 + 2j, xp.asarray(1 + 0j), True, "1.0", [1.0]):
        with pytest.raises(TypeError, match="dloss"):
            backward(bad, cache)


@pytest.mark.parametrize("term", ["aux", "ortho", "var"])
def test_dloss_cast_to_the_cache_dtype(xp, rng, term):
    cache, backward = _caches(xp, rng, np.float32)[term]
    ref = backward(1.0, cache)
    for d in (2, 2.0, np.float64(2.0), np.int64(2), xp.asarray(2.0), xp.asarray([2.0]), xp.asarray(2)):
        grad = backward(d, cache)
        assert grad.dtype == np.float32                          # before: a NumPy float64 promoted it
        assert float(abs(grad - 2 * ref).max()) <= 1e-6 * float(abs(ref).max())


def test_dloss_namespace_mixing_is_refused(cp, rng):
    cache, backward = _caches(cp, rng, np.float64)["aux"]
    with pytest.raises(TypeError, match="dloss"):
        backward(np.asarray(1.0), cache)


def test_dloss_overflow_raises_naming_dloss(rng):
    A = (rng.standard_normal((6, 2, 3)) * 1e10).astype(np.float32)
    _, cache = ortho_loss_forward(A)
    with pytest.raises(ValueError, match=r"d_expert_out of L_o .*dloss and expert_out are finite but too large"):
        ortho_loss_backward(3e38, cache)


# ----------------------------------------------------------------------------------------------
# the layer: non-finite inputs and overflow are named, never returned
# ----------------------------------------------------------------------------------------------

from refmoe import MoEConfig, init_params, moe_backward, moe_forward  # noqa: E402

CFG = MoEConfig(d_model=5, d_hidden=3, n_experts=4, top_k=2, n_shared=1)
PARAM_NAMES = ["w_router", "w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down"]


def _layer(xp, rng, dtype=np.float64, n=7):
    params = init_params(CFG, rng, dtype=dtype, backend="cupy" if xp is not np else "numpy")
    x = on(xp, rng.standard_normal((n, CFG.d_model)).astype(dtype))
    return params, x


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_nan_in_a_parameter_is_named(xp, rng, name):
    params, x = _layer(xp, rng)
    bad = params[name].copy()
    bad[...] = np.nan                        # every entry: whichever expert a token reads, it meets the NaN
    with pytest.raises(ValueError, match=rf"params\['{name}'\] contains NaN or inf"):
        moe_forward(x, {**params, name: bad}, CFG)


def test_nan_in_x_is_named(xp, rng):
    params, x = _layer(xp, rng)
    x[3, 2] = np.inf
    with pytest.raises(ValueError, match=r"^x contains NaN or inf"):
        moe_forward(x, params, CFG)


def test_large_finite_x_overflow_is_named(xp, rng):
    params, x = _layer(xp, rng, np.float32)
    with pytest.raises(ValueError, match=r"layer output y is not finite: x and params\['\w+'\] are finite but "
                                         r"too large \(max \|x\| = 1e\+30.*float32"):
        moe_forward(x * np.float32(1e30) / abs(x).max(), params, CFG)


@pytest.mark.parametrize("upstream", ["dy", "d_scores", "d_expert_out"])
def test_nan_upstream_gradient_is_named(xp, rng, upstream):
    params, x = _layer(xp, rng)
    y, cache = moe_forward(x, params, CFG)
    arrays = {"dy": xp.ones_like(y), "d_scores": xp.ones_like(cache.scores),
              "d_expert_out": xp.ones_like(cache.expert_out)}
    arrays[upstream][0, 1] = np.nan
    with pytest.raises(ValueError, match=rf"^{upstream} contains NaN or inf"):
        moe_backward(arrays["dy"], cache, d_scores=arrays["d_scores"], d_expert_out=arrays["d_expert_out"])


def test_backward_overflow_is_named(xp, rng):
    params, x = _layer(xp, rng, np.float32)
    y, cache = moe_forward(x, params, CFG)
    with pytest.raises(ValueError, match=r"gradient grads\['\w+'\] is not finite: dy .*finite but too large"):
        moe_backward(xp.full_like(y, 3e38), cache)


def test_objective_refuses_non_finite_task_loss(rng):
    from refmoe.objective import objective_forward_backward
    params, x = _layer(np, rng)
    for bad in (float("nan"), np.asarray(np.inf)):
        with pytest.raises(ValueError, match="task_loss"):
            objective_forward_backward(x, params, CFG, dy=np.ones_like(x), task_loss=bad)


# ----------------------------------------------------------------------------------------------
# the cache keeps a snapshot of the params dict
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PARAM_NAMES)
def test_rebinding_a_param_after_forward_does_not_change_backward(rng, name):
    params, x = _layer(np, rng)
    y, cache = moe_forward(x, params, CFG)
    dy = rng.standard_normal(y.shape)
    before = moe_backward(dy, cache)
    params[name] = params[name] * 3.0 + 1.0           # rebinding the key: a new array
    after = moe_backward(dy, cache)
    for k in before:
        assert np.array_equal(before[k], after[k]), k


def test_all_finite_sum_shortcut(xp):
    from refmoe.checks import all_finite
    big = on(xp, np.full((4, 3), 3e38, np.float32))             # finite entries whose sum overflows
    ok = on(xp, np.ones(5))
    assert all_finite(xp, big) and all_finite(xp, ok, big, None)
    for bad in (np.nan, np.inf, -np.inf):
        a = on(xp, np.ones((2, 3)))
        a[1, 2] = bad
        assert not all_finite(xp, ok, a)
    pm = on(xp, np.array([np.inf, -np.inf]))                    # inf - inf: the sum is NaN, also caught
    assert not all_finite(xp, pm)
