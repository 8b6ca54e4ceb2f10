"""The total objective L = L_h + alpha L_aux + beta L_o + gamma L_v and its two presets.

Gradient checks run the whole layer in float64 (x and every parameter): a correct composition gives a
relative error around 1e-9 to 1e-11; the pass mark is 1e-7, and 1e-6 where the span form of L_o (whose
Gram-Schmidt normalises by ||v|| + 1e-6) is involved.
"""
import numpy as np
import pytest

from refmoe import (MoEConfig, Objective, PRESETS, get_objective, init_params, moe_forward,
                    objective_forward_backward)
from refmoe.gradcheck import check_vjp
from refmoe.losses.aux import aux_loss_forward
from refmoe.losses.ortho import ortho_loss_forward
from refmoe.losses.variance import var_loss_forward

from helpers import assert_all_below, host, on

CFG = MoEConfig(d_model=4, d_hidden=3, n_experts=5, top_k=3, n_shared=1)
N = 6
SPAN_TOL = 1e-6      # with the span form of L_o: measured 2e-10 to 3e-9 (max over inputs); pass mark 1e-6
FD_TOL = 1e-7        # otherwise: measured 1e-10 to 2e-9; pass mark 1e-7


def _problem(xp, seed=3, dtype=np.float64):
    """A small layer, a batch, an upstream dy, and a routing margin large enough for h = 1e-6 steps."""
    rng = np.random.default_rng(seed)
    params = init_params(CFG, rng, dtype=dtype, backend="numpy")
    x = rng.standard_normal((N, CFG.d_model))
    dy = 0.3 * rng.standard_normal((N, CFG.d_model))
    _, cache = moe_forward(x.astype(np.float64), {k: v.astype(np.float64) for k, v in params.items()}, CFG)
    srt = -np.sort(-cache.scores, axis=1)
    assert (srt[:, CFG.top_k - 1] - srt[:, CFG.top_k]).min() > 1e-4, "routing too close to a top-k tie"
    params = {k: on(xp, v) for k, v in params.items()}
    return on(xp, x.astype(dtype)), params, on(xp, dy.astype(dtype))


def _weighted(obj, alpha, beta, gamma):
    return obj.replace(alpha=alpha, beta=beta, gamma=gamma)


# the checked configurations: (objective, valid_mask as host bools or None, batch_shape, tolerance)
PADDED = np.array([True, True, True, True, True, False])
CASES = {
    "paper": (PRESETS["paper"], PADDED, None, FD_TOL),
    "paper_eq2_rowtopk": (Objective("paper_eq2", "pairwise", "row_topk", ortho_eps=1e-3), None, None, FD_TOL),
    "authors_code": (PRESETS["authors_code"].replace(beta=1e-4, gamma=0.1), PADDED, (2, 3), SPAN_TOL),
    "authors_code_released_grouping": (
        PRESETS["authors_code"].replace(beta=1e-4, gamma=0.1, ortho_released_grouping=True), None, (3, 2),
        SPAN_TOL),
}


def _phi(obj, names, cfg, dy, mask, batch_shape, terms):
    """Scalar <dy, y> + chosen weighted regularisers, from the forward functions only."""
    def f(inputs):
        params = {k: inputs[k] for k in names}
        y, c = moe_forward(inputs["x"], params, cfg)
        m = mask if obj.padding == "exclude" else None
        bs = batch_shape or (1, inputs["x"].shape[0])
        out = (dy * y).sum() if "task" in terms else 0.0
        if "aux" in terms:
            out = out + obj.alpha * aux_loss_forward(c.scores, c.topk_idx, obj.aux_variant, valid_mask=m,
                                                     batch_shape=bs)[0]
        if "ortho" in terms:
            out = out + obj.beta * ortho_loss_forward(c.expert_out, obj.ortho_loss_variant, eps=obj.ortho_eps,
                                                      topk_idx=c.topk_idx, valid_mask=m)[0]
        if "var" in terms:
            out = out + obj.gamma * var_loss_forward(c.scores, c.topk_idx, obj.var_variant, valid_mask=m)[0]
        return out
    return f


def _guard(names, cfg):
    return lambda inputs: moe_forward(inputs["x"], {k: inputs[k] for k in names}, cfg)[1].topk_idx


# ----------------------------------------------------------------------------------------------
# finite-difference checks through the whole layer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_total_gradient_matches_finite_differences(xp, case):
    obj, mask, batch_shape, tol = CASES[case]
    obj = _weighted(obj, 0.5, 0.7, 0.9)          # O(1) weights so the regularisers are visible in the total
    x, params, dy = _problem(xp)
    mask = None if mask is None else on(xp, mask)
    res = objective_forward_backward(x, params, CFG, dy, obj, valid_mask=mask, batch_shape=batch_shape)
    inputs = {"x": x, **params}
    f = _phi(obj, list(params), CFG, dy, mask, batch_shape, ("task", "aux", "ortho", "var"))
    errors = check_vjp(f, inputs, res.grads["total"], guard=_guard(list(params), CFG))
    assert_all_below(errors, tol)


@pytest.mark.parametrize("term", ["aux", "ortho", "var"])
@pytest.mark.parametrize("case", ["paper", "authors_code"])
def test_each_term_alone_matches_finite_differences(xp, case, term):
    obj, mask, batch_shape, tol = CASES[case]
    obj = _weighted(obj, 0.5, 0.7, 0.9)
    x, params, dy = _problem(xp, seed=5)
    mask = None if mask is None else on(xp, mask)
    res = objective_forward_backward(x, params, CFG, dy, obj, valid_mask=mask, batch_shape=batch_shape)
    f = _phi(obj, list(params), CFG, dy, mask, batch_shape, (term,))
    errors = check_vjp(f, {"x": x, **params}, res.grads[term], guard=_guard(list(params), CFG))
    assert_all_below(errors, tol)


# ----------------------------------------------------------------------------------------------
# composition: values and gradients add up
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_total_gradient_is_the_sum_of_the_terms(xp, case):
    obj, mask, batch_shape, _ = CASES[case]
    x, params, dy = _problem(xp)
    mask = None if mask is None else on(xp, mask)
    res = objective_forward_backward(x, params, CFG, dy, obj, valid_mask=mask, batch_shape=batch_shape)
    assert set(res.grads) == {"task", "aux", "ortho", "var", "total"}
    for name in ["x", *params]:
        parts = sum(host(res.grads[t][name]) for t in ("task", "aux", "ortho", "var"))
        total = host(res.grads["total"][name])
        assert np.abs(parts - total).max() <= 1e-13 * max(1.0, np.abs(total).max()), name
    # every regulariser reaches some parameter: none of the parts is identically zero
    for t in ("aux", "ortho", "var"):
        assert max(np.abs(host(g)).max() for g in res.grads[t].values()) > 1e-12, t


def test_loss_values_are_the_weighted_sum(xp):
    obj = _weighted(PRESETS["paper"], 0.25, 0.5, 2.0)
    x, params, dy = _problem(xp)
    res = objective_forward_backward(x, params, CFG, dy, obj, task_loss=1.5)
    c = res.cache
    aux = float(aux_loss_forward(c.scores, c.topk_idx, "switch")[0])
    ortho = float(ortho_loss_forward(c.expert_out, "pairwise")[0])
    var = float(var_loss_forward(c.scores, c.topk_idx, "paper")[0])
    L = res.losses
    assert float(L["aux"]) == pytest.approx(aux, rel=1e-14)
    assert float(L["ortho"]) == pytest.approx(ortho, rel=1e-14)
    assert float(L["var"]) == pytest.approx(var, rel=1e-14)
    assert float(L["regularisers"]) == pytest.approx(0.25 * aux + 0.5 * ortho + 2.0 * var, rel=1e-14)
    assert float(L["total"]) == pytest.approx(1.5 + 0.25 * aux + 0.5 * ortho + 2.0 * var, rel=1e-14)
    assert L["task"] == 1.5
    y, _ = moe_forward(x, params, CFG)
    assert np.array_equal(host(res.y), host(y))


def test_without_task_loss_the_total_is_the_regularisers(xp):
    x, params, _ = _problem(xp)
    res = objective_forward_backward(x, params, CFG)
    assert res.losses["task"] is None
    assert float(res.losses["total"]) == float(res.losses["regularisers"])
    assert all(float(np.abs(host(g)).max()) == 0.0 for g in res.grads["task"].values())


def test_zero_weight_removes_a_term(xp):
    x, params, dy = _problem(xp)
    res = objective_forward_backward(x, params, CFG, dy, PRESETS["paper"].replace(beta=0.0))
    assert all(float(np.abs(host(g)).max()) == 0.0 for g in res.grads["ortho"].values())
    assert float(res.losses["ortho"]) > 0          # the value is still reported, unweighted


def test_per_term_false_gives_the_same_total(xp):
    x, params, dy = _problem(xp)
    a = objective_forward_backward(x, params, CFG, dy, "paper")
    b = objective_forward_backward(x, params, CFG, dy, "paper", per_term=False)
    assert set(b.grads) == {"total"}
    for name, g in a.grads["total"].items():
        assert np.array_equal(host(g), host(b.grads["total"][name]))


# ----------------------------------------------------------------------------------------------
# batch layout and padding
# ----------------------------------------------------------------------------------------------

def test_default_batch_shape_is_one_sequence(xp):
    obj = PRESETS["authors_code"].replace(beta=1e-4, gamma=0.1)
    x, params, dy = _problem(xp)
    a = objective_forward_backward(x, params, CFG, dy, obj)
    b = objective_forward_backward(x, params, CFG, dy, obj, batch_shape=(1, N))
    c = objective_forward_backward(x, params, CFG, dy, obj, batch_shape=(2, 3))
    assert float(a.losses["aux"]) == float(b.losses["aux"])
    assert abs(float(a.losses["aux"]) - float(c.losses["aux"])) > 1e-6   # per-sequence counts differ


@pytest.mark.parametrize("bad", [(4, 2), (0, 6), (6,), "ab"])
def test_bad_batch_shape_raises(xp, bad):
    x, params, dy = _problem(xp)
    with pytest.raises(ValueError, match="batch_shape"):
        objective_forward_backward(x, params, CFG, dy, "paper", batch_shape=bad)


def test_padding_modes(xp):
    x, params, dy = _problem(xp)
    mask = on(xp, PADDED)
    all_valid = on(xp, np.ones(N, dtype=bool))
    paper = PRESETS["paper"]
    code = PRESETS["authors_code"].replace(beta=1e-4, gamma=0.1)
    plain = objective_forward_backward(x, params, CFG, dy, paper)
    excl = objective_forward_backward(x, params, CFG, dy, paper, valid_mask=mask)
    ones = objective_forward_backward(x, params, CFG, dy, paper, valid_mask=all_valid)
    for t in ("aux", "ortho", "var"):
        assert float(ones.losses[t]) == pytest.approx(float(plain.losses[t]), rel=1e-14)
        assert abs(float(excl.losses[t]) - float(plain.losses[t])) > 1e-8, t
    # "include" (the released code) keeps padding in every regulariser
    incl = objective_forward_backward(x, params, CFG, dy, code, valid_mask=mask)
    ref = objective_forward_backward(x, params, CFG, dy, code)
    for t in ("aux", "ortho", "var"):
        assert float(incl.losses[t]) == float(ref.losses[t])
    with pytest.raises(TypeError, match="bool"):
        objective_forward_backward(x, params, CFG, dy, code, valid_mask=on(xp, PADDED.astype(np.int64)))


@pytest.mark.parametrize("case", ["paper", "authors_code"])
def test_float32_stays_float32(xp, case):
    x, params, dy = _problem(xp, dtype=np.float32)
    obj = get_objective(case)
    obj = obj if obj.is_calibrated else obj.replace(beta=1e-4, gamma=0.1)
    res = objective_forward_backward(x, params, CFG, dy, obj, batch_shape=(2, 3), task_loss=np.float32(2.0))
    assert res.y.dtype == np.float32
    for k in ("aux", "ortho", "var", "regularisers", "total"):
        assert res.losses[k].dtype == np.float32, k
    for term, grads in res.grads.items():
        for name, g in grads.items():
            assert g.dtype == np.float32, (term, name)


# ----------------------------------------------------------------------------------------------
# the Objective and the presets
# ----------------------------------------------------------------------------------------------

def test_presets_are_the_documented_sets():
    p, c = PRESETS["paper"], PRESETS["authors_code"]
    assert (p.aux_variant, p.ortho_loss_variant, p.var_variant) == ("switch", "pairwise", "paper")
    assert (p.alpha, p.beta, p.gamma, p.padding) == (1e-3, 1e-3, 1e-3, "exclude")
    assert (c.aux_variant, c.ortho_loss_variant, c.var_variant) == ("deepseek_seq", "span", "code")
    assert (c.alpha, c.beta, c.gamma, c.padding) == (1e-3, None, None, "include")
    assert (c.ortho_target, c.var_target, c.ortho_eps) == (1e-4, 1e-3, 1e-6)
    assert c.replace(ortho_released_grouping=True).ortho_loss_variant == "span_code_grouping"
    assert get_objective("paper") is p and get_objective(c) is c


def test_uncalibrated_authors_code_is_refused(xp):
    x, params, dy = _problem(xp)
    with pytest.raises(ValueError, match="autoscale_weights"):
        objective_forward_backward(x, params, CFG, dy, "authors_code")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(aux_variant="gshard"), ValueError, "aux_variant"),
    (dict(ortho_variant="cosine"), ValueError, "ortho_variant"),
    (dict(ortho_variant="span_code_grouping"), ValueError, "ortho_released_grouping=True"),
    (dict(var_variant="row"), ValueError, "var_variant"),
    (dict(ortho_released_grouping=True), ValueError, "needs ortho_variant='span'"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(gamma="0.1"), TypeError, "gamma"),
    (dict(beta=None), ValueError, "beta"),
    (dict(padding="drop"), ValueError, "padding"),
    (dict(ortho_eps=-1e-6), ValueError, "ortho_eps"),
])
def test_objective_validates_on_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Objective(**kwargs)


def test_get_objective_errors():
    with pytest.raises(ValueError, match="not a preset"):
        get_objective("authors")
    with pytest.raises(TypeError, match="preset name or an Objective"):
        get_objective(3)


@pytest.mark.parametrize("case", ["paper", "authors_code"])
def test_forward_backward_pair_equals_the_one_call(xp, case):
    """objective_forward + objective_backward (for a dy that depends on y) is objective_forward_backward."""
    from refmoe import objective_backward, objective_forward

    x, params, dy = _problem(xp)
    obj = get_objective(case)
    obj = obj if obj.is_calibrated else obj.replace(beta=1e-4, gamma=0.1)
    y, ocache = objective_forward(x, params, CFG, obj, batch_shape=(2, 3))
    split = objective_backward(dy, ocache, task_loss=2.0)
    whole = objective_forward_backward(x, params, CFG, dy, obj, batch_shape=(2, 3), task_loss=2.0)
    assert (host(split.y) == host(whole.y)).all() and split.y is y
    for k in whole.losses:
        assert float(split.losses[k]) == float(whole.losses[k]), k
    for term, grads in whole.grads.items():
        for name, g in grads.items():
            np.testing.assert_array_equal(host(split.grads[term][name]), host(g), err_msg=f"{term}:{name}")
    with pytest.raises(TypeError, match="per_term"):
        objective_backward(dy, ocache, per_term=1)
