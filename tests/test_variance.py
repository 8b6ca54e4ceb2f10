"""L_v: values against independent closed forms, finite-difference gradients, the paper's Eq. 9 factor, edge cases."""
import numpy as np
import pytest

from refmoe import gradcheck
from refmoe.losses.variance import VAR_VARIANTS, paper_eq9_gradient, var_loss_backward, var_loss_forward
from refmoe.ops import topk_indices

from helpers import assert_all_below, host, on, softmax_rows


def _routing(rng, N=7, E=5, K=2, scale=1.5):
    """Random scores with a clear top-k margin (no near-ties, so finite differences keep the routing)."""
    for _ in range(100):
        P = softmax_rows(scale * rng.standard_normal((N, E)))
        srt = np.sort(P, axis=1)[:, ::-1]
        if K == E or (srt[:, K - 1] - srt[:, K]).min() > 1e-3:
            return P, topk_indices(P, K)
    raise AssertionError("no well-separated routing found")


def _dense_S(P, idx):
    S = np.zeros_like(P)
    rows = np.arange(P.shape[0])[:, None]
    S[rows, idx] = P[rows, idx] / P[rows, idx].sum(axis=1, keepdims=True)
    return S


# ----------------------------------------------------------------------------------------------
# values against closed forms written independently of the library
# ----------------------------------------------------------------------------------------------

def test_code_equals_numpy_unbiased_variance(xp, rng):
    P, idx = _routing(rng, N=9, E=6, K=2)
    loss, _ = var_loss_forward(on(xp, P), on(xp, idx), "code")
    expected = -np.var(P, axis=1, ddof=1).mean()
    assert abs(float(loss) - expected) <= 1e-15 + 1e-13 * abs(expected)


def test_paper_equals_definition_and_identity(xp, rng):
    P, idx = _routing(rng, N=7, E=5, K=2)
    S = _dense_S(P, idx)
    N, E = S.shape
    loss, _ = var_loss_forward(on(xp, P), on(xp, idx), "paper")
    definition = -sum((S[i, j] - S[:, j].mean()) ** 2 for i in range(N) for j in range(E)) / E
    sbar = S.mean(axis=0)
    identity = -((S ** 2).sum() - N * (sbar ** 2).sum()) / E      # -(1/n)(sum s^2 - N sum sbar^2)
    assert abs(float(loss) - definition) <= 1e-14
    assert abs(float(loss) - identity) <= 1e-14


def test_row_topk_equals_population_variance_of_selected(xp, rng):
    P, idx = _routing(rng, N=6, E=5, K=3)
    S = _dense_S(P, idx)
    sel = np.take_along_axis(S, idx, axis=1)
    loss, _ = var_loss_forward(on(xp, P), on(xp, idx), "row_topk")
    assert abs(float(loss) - (-np.var(sel, axis=1, ddof=0).mean())) <= 1e-15


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VAR_VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_fd_gradient(xp, rng, variant, masked):
    P, idx = _routing(rng, N=7, E=5, K=2)
    mask = on(xp, np.array([True, True, False, True, True, False, True])) if masked else None
    idx_x = on(xp, idx)

    def f(inp):
        return var_loss_forward(inp["scores"], idx_x, variant, valid_mask=mask)[0]

    loss, cache = var_loss_forward(on(xp, P), idx_x, variant, valid_mask=mask)
    grad = var_loss_backward(1.0, cache)
    errors = gradcheck.check_vjp(f, {"scores": on(xp, P)}, {"scores": grad})
    assert_all_below(errors, 1e-7)      # measured ~1e-10; pass mark 1e-7
    if masked:                          # padding rows get exactly zero gradient
        assert float(abs(host(grad)[~host(mask)]).max()) == 0.0


def test_backward_scales_with_dloss(rng):
    P, idx = _routing(rng)
    _, cache = var_loss_forward(P, idx, "paper")
    assert np.allclose(var_loss_backward(-3.0, cache), -3.0 * var_loss_backward(1.0, cache), rtol=0, atol=1e-15)


def test_paper_eq9_differs_from_exact_by_factor(rng):
    P, idx = _routing(rng, N=7, E=5, K=2)
    S = _dense_S(P, idx)
    N, E = S.shape
    exact = -(2.0 / E) * (S - S.mean(axis=0))                    # d(Eq. 7)/dS, hand-written
    numeric = gradcheck.numerical_vjp(                           # FD of Eq. 7 as a function of S itself
        lambda d: -((d["S"] - d["S"].mean(axis=0)) ** 2).sum() / E, {"S": S.copy()})["S"]
    assert gradcheck.rel_error(exact, numeric) < 1e-8            # measured ~1e-10
    eq9 = paper_eq9_gradient(S)
    nz = np.abs(exact) > 1e-12
    ratio = eq9[nz] / exact[nz]
    assert np.allclose(ratio, (N - 1) / N, rtol=1e-13, atol=0)   # exactly (N-1)/N = 6/7 everywhere


def test_paper_eq9_spec_numbers():
    # spec example: N = 7, n = 5 gives -0.02229 (exact) vs -0.01911 (Eq. 9); an entry with s_ij - sbar_j = 0.05573
    # reproduces both rounded numbers (each form is linear in the deviation, so only the ratio is structural)
    N, E, dev = 7, 5, 0.05573
    exact = -(2.0 / E) * dev
    eq9 = -2.0 * (N - 1) / (E * N) * dev
    assert round(exact, 5) == -0.02229 and round(eq9, 5) == -0.01911
    assert eq9 / exact == pytest.approx((N - 1) / N, rel=1e-15)


# ----------------------------------------------------------------------------------------------
# edge cases, dtype, errors
# ----------------------------------------------------------------------------------------------

def test_row_topk_k1_is_zero_with_zero_gradient(rng):
    P, idx = _routing(rng, K=1)
    loss, cache = var_loss_forward(P, idx, "row_topk")
    assert float(loss) == 0.0
    assert float(np.abs(var_loss_backward(1.0, cache)).max()) == 0.0


@pytest.mark.parametrize("variant", VAR_VARIANTS)
def test_float32_stays_float32(xp, rng, variant):
    P, idx = _routing(rng)
    loss, cache = var_loss_forward(on(xp, P.astype(np.float32)), on(xp, idx), variant)
    grad = var_loss_backward(1.0, cache)
    assert loss.dtype == np.float32 and loss.shape == () and grad.dtype == np.float32
    ref, _ = var_loss_forward(on(xp, P), on(xp, idx), variant)
    assert abs(float(loss) - float(ref)) <= 1e-6 * max(1e-3, abs(float(ref)))


def test_mask_equals_dropping_tokens(rng):
    P, idx = _routing(rng, N=8)
    mask = np.array([True, False, True, True, False, True, True, True])
    for v in VAR_VARIANTS:
        a, _ = var_loss_forward(P, idx, v, valid_mask=mask)
        b, _ = var_loss_forward(P[mask], idx[mask], v)
        assert abs(float(a) - float(b)) <= 1e-15, v


def test_bad_inputs(rng):
    P, idx = _routing(rng)
    with pytest.raises(ValueError, match="not an L_v form"):
        var_loss_forward(P, idx, "paper_eq7")
    with pytest.raises(ValueError, match="logits"):
        var_loss_forward(np.log(P), idx, "paper")
    with pytest.raises(ValueError, match="n_experts >= 2"):
        var_loss_forward(np.ones((3, 1)), np.zeros((3, 1), dtype=np.int64), "code")
    with pytest.raises(ValueError, match="valid_mask"):
        var_loss_forward(P, idx, "paper", valid_mask=np.zeros(P.shape[0], dtype=bool))
