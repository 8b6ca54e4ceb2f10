"""L_o: finite-difference gradients of every form, geometric properties, the paper's Eq. 8, edge cases."""
import numpy as np
import pytest

from refmoe import gradcheck
from refmoe.losses.ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward, paper_eq8_gradient
from refmoe.losses.ortho_span import span_closed_form_per_token

from torch_oracles import released_span_total
from helpers import assert_all_below, host, on

# pass marks (float64, h = 1e-6): measured ~1e-10 for every form; span's mark is the looser one of the spec
FD_MARK = {"pairwise": 1e-7, "span": 1e-6, "span_code_grouping": 1e-6}


def _topk(rng, N, K, E):
    return np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)


def _loss(A, variant, **kw):
    return float(ortho_loss_forward(A, variant, **kw)[0])


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ORTHO_VARIANTS)
@pytest.mark.parametrize("K,masked", [(2, False), (3, True), (4, False)])
def test_fd_gradient(xp, rng, variant, K, masked):
    N, D, E = 5, 6, 6
    A = on(xp, rng.standard_normal((N, K, D)))
    idx = on(xp, _topk(rng, N, K, E))
    mask = on(xp, np.array([True, False, True, True, False])) if masked else None
    kw = dict(topk_idx=idx, valid_mask=mask)
    loss, cache = ortho_loss_forward(A, variant, **kw)
    grad = ortho_loss_backward(1.0, cache)
    errors = gradcheck.check_vjp(lambda d: ortho_loss_forward(d["A"], variant, **kw)[0], {"A": A}, {"A": grad})
    assert_all_below(errors, FD_MARK[variant])
    assert float(loss) > 0
    if masked:      # padding tokens get exactly zero gradient (for the regrouped form: their rows are dropped)
        assert float(abs(host(grad)[~host(mask)]).max()) == 0.0


@pytest.mark.parametrize("variant", ORTHO_VARIANTS)
def test_fd_gradient_eps_zero_and_large(rng, variant):
    A = rng.standard_normal((4, 3, 5))
    idx = _topk(rng, 4, 3, 5)
    for eps in (0.0, 0.3):          # eps = 0: the exact forms; 0.3: eps terms of the backward matter
        loss, cache = ortho_loss_forward(A, variant, eps=eps, topk_idx=idx)
        grad = ortho_loss_backward(2.5, cache)
        err = gradcheck.check_vjp(lambda d: 2.5 * ortho_loss_forward(d["A"], variant, eps=eps, topk_idx=idx)[0],
                                  {"A": A}, {"A": grad})
        assert_all_below(err, FD_MARK[variant])


def test_pairwise_gradient_is_spec_exact_formula_not_eq8(rng):
    # the spec's exact gradient of Eq. 6 (eps -> 0), written out term by term
    A = rng.standard_normal((3, 3, 4))
    _, cache = ortho_loss_forward(A, "pairwise", eps=0.0)
    grad = ortho_loss_backward(1.0, cache)
    exact = np.zeros_like(A)
    for i in range(3):
        for j in range(3):
            xj = A[i, j]
            for k in range(3):
                if k != j:
                    xk = A[i, k]
                    exact[i, j] += (2 * xk * (xk @ xj) / (xk @ xk) + 2 * xk * (xk @ xj) / (xj @ xj)
                                    - 2 * (xk @ xj) ** 2 / (xj @ xj) ** 2 * xj)
    assert gradcheck.rel_error(grad, exact) < 1e-13
    eq8 = paper_eq8_gradient(A)
    assert gradcheck.rel_error(eq8, exact) > 0.3        # Eq. 8 is a different vector field
    # two unit vectors with cosine c: exact d/dx_1 = 4 c x_2 - 2 c^2 x_1, Eq. 8 gives c x_2
    c = 0.6
    B = np.array([[[1.0, 0.0], [c, np.sqrt(1 - c * c)]]])
    _, cache = ortho_loss_forward(B, "pairwise", eps=0.0)
    g1 = ortho_loss_backward(1.0, cache)[0, 0]
    assert np.allclose(g1, 4 * c * B[0, 1] - 2 * c * c * B[0, 0], rtol=0, atol=1e-15)
    assert np.allclose(paper_eq8_gradient(B)[0, 0], c * B[0, 1], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ORTHO_VARIANTS)
def test_zero_for_orthogonal_positive_for_parallel(xp, rng, variant):
    N, K = 3, 3
    Q, _ = np.linalg.qr(rng.standard_normal((N * K, N * K)))   # all N*K rows orthonormal (the regrouped
    A = (Q * rng.uniform(0.5, 2.0, (N * K, 1))).reshape(N, K, N * K)  # form mixes tokens, so orthogonal across them)
    idx = on(xp, _topk(rng, N, K, 4))
    assert abs(_loss(on(xp, A), variant, topk_idx=idx)) < 1e-26
    base = rng.standard_normal(5)
    P = rng.uniform(0.5, 2.0, (N, K, 1)) * base                 # every output parallel to one vector
    assert _loss(on(xp, P), variant, topk_idx=idx) > 0.1


def test_pairwise_value_for_parallel_outputs(rng):
    # x_k = c_k x: each ordered pair gives G_jk^2/||x_k||^2 = ||x_j||^2, so a token gives (K-1) sum_j ||x_j||^2
    P = rng.uniform(0.5, 2.0, (2, 3, 1)) * rng.standard_normal(4)
    expected = 2 * (P ** 2).sum()
    assert _loss(P, "pairwise", eps=0.0) == pytest.approx(expected, rel=1e-14)


def _orthogonal_pairs(rng, N, D):
    """K = 4 slots as two pairs in orthogonal subspaces: every slot's other slots that are not orthogonal
    to it form a single vector, so projecting on the span equals the sum of pairwise projections."""
    out = np.zeros((N, 4, D))
    for i in range(N):
        Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        out[i, :2] = rng.standard_normal((2, 2)) @ Q[:2]        # slots 0, 1 in span(q0, q1)
        out[i, 2:] = rng.standard_normal((2, 2)) @ Q[2:4]       # slots 2, 3 in span(q2, q3)
    return out


def test_pairwise_equals_span_when_others_orthogonal(rng):
    N = 4
    for A in (rng.standard_normal((N, 2, 5)), _orthogonal_pairs(rng, N, 6)):   # K = 2: always the case
        K = A.shape[1]
        pw = _loss(A, "pairwise", eps=0.0)
        assert K * N * _loss(A, "span", eps=0.0) == pytest.approx(pw, rel=1e-13)
        assert K * N * _loss(A, "span") == pytest.approx(pw, rel=1e-5)      # default eps: O(eps/||x||)
        assert _loss(A, "pairwise") == pytest.approx(pw, rel=1e-10)
    A = rng.standard_normal((N, 3, 5))                                        # generic K = 3: they differ
    assert abs(3 * N * _loss(A, "span") - _loss(A, "pairwise")) > 1e-2


def test_span_equals_closed_form_projector(xp, rng):
    A = on(xp, rng.standard_normal((6, 4, 7)))
    closed = float(span_closed_form_per_token(A).sum()) / (4 * 6)
    assert _loss(A, "span", eps=0.0) == pytest.approx(closed, rel=1e-12)
    assert _loss(A, "span") == pytest.approx(closed, rel=1e-5)                # eps = 1e-6 on unit-size outputs


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ORTHO_VARIANTS)
def test_k1_is_zero_with_zero_gradient(xp, rng, variant):
    A = on(xp, rng.standard_normal((4, 1, 3)))
    loss, cache = ortho_loss_forward(A, variant, topk_idx=on(xp, _topk(rng, 4, 1, 3)))
    assert float(loss) == 0.0 and loss.shape == ()
    assert float(abs(ortho_loss_backward(1.0, cache)).max()) == 0.0


def test_zero_output(rng):
    x, y = rng.standard_normal((2, 1, 5))
    with_zero = np.stack([x, np.zeros_like(x), y], axis=1)      # [1, 3, 5]
    without = np.stack([x, y], axis=1)
    # pairwise: a zero slot adds no term; the gradient at it is exactly 0 (every term is O(||x||^2) there)
    assert _loss(with_zero, "pairwise") == pytest.approx(_loss(without, "pairwise"), rel=1e-14)
    _, cache = ortho_loss_forward(with_zero, "pairwise")
    grad = ortho_loss_backward(1.0, cache)
    assert np.all(grad[:, 1] == 0) and np.isfinite(grad).all()
    err = gradcheck.check_vjp(lambda d: ortho_loss_forward(d["A"], "pairwise")[0], {"A": with_zero}, {"A": grad})
    assert_all_below(err, 1e-7)
    # span: the zero slot gives u = 0, so the per-token sum is that of the two others (normalised by K N)
    assert 3 * _loss(with_zero, "span") == pytest.approx(2 * _loss(without, "span"), rel=1e-14)
    _, cache = ortho_loss_forward(with_zero, "span")
    assert np.isfinite(ortho_loss_backward(1.0, cache)).all()


def test_identical_outputs(rng):
    x, y = rng.standard_normal((2, 4))
    r = np.linalg.norm(x)
    A = np.stack([x, x, y])[None]                               # [1, 3, 4] slots x, x, y
    # pairwise: pairs (x, x) give ||x||^2 each; (x, y) and (y, x) pairs as usual
    cxy = x @ y
    expected = 2 * r ** 2 + 2 * (cxy ** 2 / r ** 2 + cxy ** 2 / (y @ y))
    assert _loss(A, "pairwise", eps=0.0) == pytest.approx(expected, rel=1e-13)
    # span (eps = 1e-6): x's projection on span{x, y} is ||x||^2, twice; for y the second x leaves a
    # residual of length ~2 eps that normalises to ~(2/3) x/||x||: the direction counts 1 + (2/3)^4 times
    loss = 3 * _loss(A, "span")
    assert loss == pytest.approx(2 * r ** 2 + (cxy / r) ** 2 * (1 + 16 / 81), rel=1e-4)
    _, cache = ortho_loss_forward(A, "span")
    assert np.isfinite(ortho_loss_backward(1.0, cache)).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linearly_dependent_slots_stay_finite(rng, dtype):
    x, y = rng.standard_normal((2, 6))
    A = np.stack([x, y, x - 2 * y, rng.standard_normal(6)])[None].astype(dtype)   # slot 2 in span(0, 1)
    for variant in ("pairwise", "span"):
        loss, cache = ortho_loss_forward(A, variant)
        grad = ortho_loss_backward(1.0, cache)
        assert np.isfinite(float(loss)) and np.isfinite(grad).all(), variant
        assert grad.dtype == dtype


@pytest.mark.parametrize("variant", ORTHO_VARIANTS)
def test_float32_stays_float32(xp, rng, variant):
    A = rng.standard_normal((5, 3, 4))
    idx = on(xp, _topk(rng, 5, 3, 4))
    loss, cache = ortho_loss_forward(on(xp, A.astype(np.float32)), variant, topk_idx=idx)
    grad = ortho_loss_backward(1.0, cache)
    assert loss.dtype == np.float32 and loss.shape == () and grad.dtype == np.float32
    assert float(loss) == pytest.approx(_loss(on(xp, A), variant, topk_idx=idx), rel=1e-4)


def test_mask_equals_dropping_tokens(rng):
    A = rng.standard_normal((6, 3, 4))
    idx = _topk(rng, 6, 3, 5)
    mask = np.array([True, False, True, True, False, True])
    for v in ORTHO_VARIANTS:
        a = _loss(A, v, topk_idx=idx, valid_mask=mask)
        b = _loss(A[mask], v, topk_idx=idx[mask])
        assert a == pytest.approx(b, rel=1e-14), v


def test_bad_inputs(rng):
    A = rng.standard_normal((3, 2, 4))
    with pytest.raises(ValueError, match="not an L_o form"):
        ortho_loss_forward(A, "gram")
    with pytest.raises(ValueError, match="needs topk_idx"):
        ortho_loss_forward(A, "span_code_grouping")
    with pytest.raises(ValueError, match=r"\[N, K, D\]"):
        ortho_loss_forward(A[0], "span")
    with pytest.raises(ValueError, match="eps"):
        ortho_loss_forward(A, "span", eps=-1e-6)
    with pytest.raises(ValueError, match="topk_idx"):
        ortho_loss_forward(A, "span_code_grouping", topk_idx=np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="repeats"):
        ortho_loss_forward(A, "span_code_grouping", topk_idx=np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        ortho_loss_forward(A.astype(np.int64), "pairwise")


# ----------------------------------------------------------------------------------------------
# the released grouping (compatibility mode)
# ----------------------------------------------------------------------------------------------

WORKED_TOPK = np.array([[0, 1], [2, 0], [1, 3], [0, 2]])     # N = 4, E = 4, K = 2 (docstring and theory/losses.md)


def test_code_grouping_worked_example(xp, rng):
    from refmoe.losses.ortho import code_grouping_order
    idx = on(xp, WORKED_TOPK)
    order = host(code_grouping_order(idx))
    # flat row i*K + k holds E_{topk[i, k]}(x_i); expert-major stacking: E0(x0) E0(x1) E0(x3) E1(x0) E1(x2)
    # E2(x1) E2(x3) E3(x2), i.e. flat rows 0 3 6 1 4 2 7 5, grouped in consecutive pairs
    assert order.tolist() == [0, 3, 6, 1, 4, 2, 7, 5]
    groups = [[(int(r) // 2, int(WORKED_TOPK.reshape(-1)[r])) for r in order[g:g + 2]] for g in (0, 2, 4, 6)]
    assert groups == [[(0, 0), (1, 0)], [(3, 0), (0, 1)], [(2, 1), (1, 2)], [(3, 2), (2, 3)]]   # (token, expert)
    A = rng.standard_normal((4, 2, 5))
    regrouped = A.reshape(8, 5)[order].reshape(4, 2, 5)
    code = _loss(on(xp, A), "span_code_grouping", topk_idx=idx)
    assert code == pytest.approx(_loss(on(xp, regrouped), "span"), rel=1e-14)
    assert abs(code - _loss(on(xp, A), "span")) > 1e-2 * abs(code)   # not the paper's grouping


def _released_grouping_torch(torch, expert_out, topk_idx, n_experts):
    """The released training path, transcribed with torch: per-expert blocks in expert order, concatenated,
    viewed as [-1, K, D]."""
    N, K, D = expert_out.shape
    flat_idx = topk_idx.reshape(-1)
    rows = expert_out.reshape(N * K, D)            # row p is expert flat_idx[p] applied to token p // K
    blocks = [rows[flat_idx == e] for e in range(n_experts) if bool((flat_idx == e).any())]
    return torch.cat(blocks, dim=0).view(-1, K, D)


def _released_span_torch(torch, grouped):
    """The released per-slot Gram-Schmidt projection loss on [rows, K, D], divided by K * rows."""
    K = grouped.size(1)
    return released_span_total(torch, grouped, K) / (K * grouped.size(0))


@pytest.mark.parametrize("variant", ["span", "span_code_grouping"])
def test_span_forms_match_released_code_with_torch_oracle(rng, variant):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install refmoe[oracle]")
    N, K, D, E = 9, 3, 6, 5
    A = rng.standard_normal((N, K, D))
    idx = _topk(rng, N, K, E)
    t = torch.tensor(A, requires_grad=True)
    grouped = _released_grouping_torch(torch, t, torch.tensor(idx), E) if variant == "span_code_grouping" else t
    ref = _released_span_torch(torch, grouped)
    ref.backward()
    loss, cache = ortho_loss_forward(A, variant, topk_idx=idx)
    assert float(loss) == pytest.approx(ref.item(), rel=1e-13)
    assert gradcheck.rel_error(ortho_loss_backward(1.0, cache), t.grad.numpy()) < 1e-12   # measured ~1e-16
    other = "span" if variant == "span_code_grouping" else "span_code_grouping"
    assert abs(float(loss) - _loss(A, other, topk_idx=idx)) > 1e-3     # the two groupings give different numbers
