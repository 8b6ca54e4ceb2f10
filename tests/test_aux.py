"""L_aux, all four forms: gradients, balanced values with non-uniform scores, masking, scopes, misuse."""
import numpy as np
import pytest

from refmoe import AUX_VARIANTS, MoEConfig, aux_loss_backward, aux_loss_forward, gradcheck as gc
from refmoe import init_params, moe_backward, moe_forward, ops

from helpers import assert_all_below, host, layer_fd_errors, on, softmax_rows

VARIANTS = ["deepseek_batch", "deepseek_seq", "paper_eq2", "switch"]  # the spec's four forms; other systems' conventions: test_aux_conventions.py


def random_scores(rng, n=9, e=5, scale=2.0):
    return softmax_rows(scale * rng.standard_normal((n, e)))


def loss_fn(variant, idx, **kw):
    return lambda a: aux_loss_forward(a["s"], idx, variant, **kw)[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradient(xp, rng, variant, masked):
    s = on(xp, random_scores(rng, n=8))
    idx = ops.topk_indices(s, 2)
    kw = dict(batch_shape=(2, 4))
    if masked:
        kw["valid_mask"] = on(xp, np.array([1, 1, 0, 1, 1, 1, 0, 1], bool))
    loss, cache = aux_loss_forward(s, idx, variant, **kw)
    d = aux_loss_backward(1.0, cache)
    assert float(abs(d).max()) > 1e-3  # a real, non-degenerate gradient
    assert_all_below(gc.check_vjp(loss_fn(variant, idx, **kw), {"s": s}, {"s": d}))  # measured ~2e-10


def test_gradient_scales_with_upstream(rng):
    s = random_scores(rng)
    idx = ops.topk_indices(s, 2)
    _, cache = aux_loss_forward(s, idx, "switch")
    assert np.allclose(aux_loss_backward(0.37, cache), 0.37 * aux_loss_backward(1.0, cache), rtol=1e-15)


def balanced_case(n_tokens=8, n_experts=4, k=2, seed=0):
    """Scores whose top-k routing is exactly balanced (each expert gets N K / E tokens) but far from uniform."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n_tokens, n_experts))
    for i in range(n_tokens):
        for r in range(k):
            logits[i, (i + r) % n_experts] += 6.0 - r  # token i prefers experts i, i+1, ... (mod E)
    s = softmax_rows(logits)
    idx = ops.topk_indices(s, k)
    assert (np.bincount(idx.ravel(), minlength=n_experts) == n_tokens * k // n_experts).all()
    assert s.std(axis=0).max() > 0.1  # decidedly non-uniform
    return s, idx


@pytest.mark.parametrize("variant", VARIANTS)
def test_balanced_value_with_nonuniform_scores(xp, variant):
    N, E, K = 8, 4, 2
    s, idx = balanced_case(N, E, K)
    loss, _ = aux_loss_forward(on(xp, s), on(xp, idx), variant, batch_shape=(2, 4))
    expected = AUX_VARIANTS[variant].balanced_value(N, E, K)
    assert expected == {"paper_eq2": 4.0, "switch": 2.0, "deepseek_batch": 1.0, "deepseek_seq": 1.0}[variant]
    assert float(loss) == pytest.approx(expected, rel=1e-14)


def test_hand_computed_values(rng):
    s = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.2, 0.6]])
    idx = ops.topk_indices(s, 1)  # experts 0, 0, 2 -> counts (2, 0, 1), N = 3, K = 1, E = 3
    pbar = s.mean(axis=0)
    f = np.array([2, 0, 1]) / 3
    assert float(aux_loss_forward(s, idx, "switch")[0]) == pytest.approx(3 * (f * pbar).sum(), rel=1e-15)
    assert float(aux_loss_forward(s, idx, "deepseek_batch")[0]) == pytest.approx((3 * f * pbar).sum(), rel=1e-15)
    # paper Eq. 2 on the post-top-k S: with K = 1 each row of S is one-hot, p = (2, 0, 1)
    assert float(aux_loss_forward(s, idx, "paper_eq2")[0]) == pytest.approx((f * [2, 0, 1]).sum(), rel=1e-15)


def test_deepseek_seq_equals_batch_for_one_sequence(xp, rng):
    s = on(xp, random_scores(rng))
    idx = ops.topk_indices(s, 2)
    lb, cb = aux_loss_forward(s, idx, "deepseek_batch")
    ls, cs = aux_loss_forward(s, idx, "deepseek_seq", batch_shape=(1, 9))
    assert float(ls) == pytest.approx(float(lb), rel=1e-14)
    np.testing.assert_allclose(host(aux_loss_backward(1.0, cs)), host(aux_loss_backward(1.0, cb)), rtol=1e-13)


def test_deepseek_seq_is_mean_of_sequences(rng):
    s = random_scores(rng, n=8)
    idx = ops.topk_indices(s, 2)
    whole, _ = aux_loss_forward(s, idx, "deepseek_seq", batch_shape=(2, 4))
    parts = [float(aux_loss_forward(s[b * 4:(b + 1) * 4], idx[b * 4:(b + 1) * 4], "deepseek_batch")[0]) for b in (0, 1)]
    assert float(whole) == pytest.approx(np.mean(parts), rel=1e-14)
    assert float(whole) != pytest.approx(float(aux_loss_forward(s, idx, "deepseek_batch")[0]), rel=1e-6)


@pytest.mark.parametrize("variant", ["paper_eq2", "switch", "deepseek_batch"])
def test_masked_batch_equals_truncated_batch(xp, rng, variant):
    s = on(xp, random_scores(rng, n=10))
    idx = ops.topk_indices(s, 2)
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], bool)
    lm, cm = aux_loss_forward(s, idx, variant, valid_mask=on(xp, keep))
    lt, ct = aux_loss_forward(s[on(xp, keep)], idx[on(xp, keep)], variant)
    assert float(lm) == pytest.approx(float(lt), rel=1e-14)
    dm, dt = host(aux_loss_backward(1.0, cm)), host(aux_loss_backward(1.0, ct))
    np.testing.assert_allclose(dm[keep], dt, rtol=1e-13)
    assert (dm[~keep] == 0).all()


def test_masked_sequences_equal_truncated_sequences(rng):
    s = random_scores(rng, n=8)
    idx = ops.topk_indices(s, 2)
    keep = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)  # sequence 0 keeps 3 tokens, sequence 1 keeps 2
    lm, _ = aux_loss_forward(s, idx, "deepseek_seq", valid_mask=keep, batch_shape=(2, 4))
    per_seq = [float(aux_loss_forward(s[r], idx[r], "deepseek_batch")[0]) for r in ([0, 1, 2], [4, 5])]
    assert float(lm) == pytest.approx(np.mean(per_seq), rel=1e-14)
    # a sequence that is all padding leaves the mean
    keep2 = np.array([0, 0, 0, 0, 1, 1, 0, 0], bool)
    l2, _ = aux_loss_forward(s, idx, "deepseek_seq", valid_mask=keep2, batch_shape=(2, 4))
    assert float(l2) == pytest.approx(per_seq[1], rel=1e-14)


def test_probabilities_fed_twice_change_the_answer(rng):
    logits = 2 * rng.standard_normal((9, 5))
    s = softmax_rows(logits)
    idx = ops.topk_indices(s, 2)
    twice = softmax_rows(s)  # the shipped bug: probabilities passed through softmax again
    for v in ("switch", "deepseek_batch"):
        right = float(aux_loss_forward(s, idx, v)[0])
        wrong = float(aux_loss_forward(twice, idx, v)[0])
        assert abs(right - wrong) > 1e-2 * abs(right)
    with pytest.raises(ValueError, match="not logits"):
        aux_loss_forward(logits, idx, "switch")


def test_counts_have_zero_gradient(rng):
    """Moving scores without changing the top-k set leaves f fixed: the loss is exactly linear in P."""
    s = random_scores(rng)
    idx = ops.topk_indices(s, 2)
    loss, cache = aux_loss_forward(s, idx, "switch")
    t = 1e-5 * rng.standard_normal(s.shape)
    t -= t.mean(axis=1, keepdims=True)
    moved, _ = aux_loss_forward(s + t, idx, "switch")
    assert float(moved) - float(loss) == pytest.approx(float((aux_loss_backward(1.0, cache) * t).sum()), rel=1e-8)


def test_aux_through_the_layer(xp, rng):
    cfg = MoEConfig(d_model=5, d_hidden=3, n_experts=4, top_k=2, n_shared=1)
    params = init_params(cfg, rng, backend="cupy" if xp is not np else "numpy")
    x = on(xp, rng.standard_normal((8, 5)))
    _, cache = moe_forward(x, params, cfg)
    loss, ac = aux_loss_forward(cache.scores, cache.topk_idx, "deepseek_seq", batch_shape=(2, 4))
    grads = moe_backward(None, cache, d_scores=aux_loss_backward(1.0, ac))

    def phi(y, c):
        return aux_loss_forward(c.scores, c.topk_idx, "deepseek_seq", batch_shape=(2, 4))[0]

    errs = layer_fd_errors(cfg, params, x, phi, grads, names=["x", "w_router"])
    assert_all_below(errs)  # measured ~1e-10
    assert float(abs(grads["w_gate"]).max()) == 0.0  # L_aux never reaches the experts


def test_float32_preserved(xp, rng):
    s = on(xp, random_scores(rng).astype(np.float32))
    idx = ops.topk_indices(s, 2)
    for v in VARIANTS:
        loss, cache = aux_loss_forward(s, idx, v, batch_shape=(3, 3))
        assert loss.dtype == np.float32 and aux_loss_backward(1.0, cache).dtype == np.float32


def test_bad_inputs(rng):
    s = random_scores(rng)
    idx = ops.topk_indices(s, 2)
    with pytest.raises(ValueError, match="not an L_aux form"):
        aux_loss_forward(s, idx, "mixtral?")
    with pytest.raises(ValueError, match="needs batch_shape"):
        aux_loss_forward(s, idx, "deepseek_seq")
    with pytest.raises(ValueError, match="does not tile"):
        aux_loss_forward(s, idx, "deepseek_seq", batch_shape=(2, 4))
    with pytest.raises(ValueError, match="outside"):
        aux_loss_forward(s, idx + 4, "switch")
    with pytest.raises(ValueError, match="repeats an expert"):
        aux_loss_forward(s, np.zeros_like(idx), "switch")
    with pytest.raises(TypeError, match="integers"):
        aux_loss_forward(s, idx.astype(float), "switch")
    with pytest.raises(TypeError, match="must be bool"):
        aux_loss_forward(s, idx, "switch", valid_mask=np.ones(9))
    with pytest.raises(ValueError, match="every token as padding"):
        aux_loss_forward(s, idx, "switch", valid_mask=np.zeros(9, bool))
    with pytest.raises(ValueError, match="shape"):
        aux_loss_forward(s, idx, "switch", valid_mask=np.ones(8, bool))
    with pytest.raises(ValueError, match="NaN or inf"):
        aux_loss_forward(np.full_like(s, np.nan), idx, "switch")
