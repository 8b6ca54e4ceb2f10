"""The router pieces other systems use: sigmoid scoring, selection on logits, the selection bias and its update,
group-limited selection, the general gates, capacity dropping, and the router z-loss. Float64 central
differences with the routing guard on (pass mark FD_TOL = 1e-7), exact selections on small hand-made cases,
and the errors a bad configuration gets."""
import numpy as np
import pytest

from refmoe import gradcheck as gc
from refmoe import ops
from refmoe.losses.zloss import zloss_backward, zloss_forward
from refmoe.router import (gate_weights_backward, gate_weights_forward, router_forward, routing_backward,
                           routing_forward, score_backward, score_forward, select_topk)
from refmoe.router_capacity import capacity_backward, capacity_forward, capacity_keep, expert_capacity
from refmoe.router_select import expert_bias_update, group_scores, select_group_limited, select_topk_biased

from helpers import assert_all_below, host, on, softmax_rows


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_score_gradient(xp, rng, score_function):
    z = on(xp, 3 * rng.standard_normal((6, 5)))
    p, cache = score_forward(z, score_function)
    dp = on(xp, rng.standard_normal(p.shape))
    dz = score_backward(dp, cache)
    errs = gc.check_vjp(lambda a: score_forward(a["z"], score_function)[0], {"z": z}, {"z": dz}, dp)
    assert_all_below(errs)  # measured 9e-10 (softmax), 1e-9 (sigmoid)


def test_sigmoid_values_and_float32(xp):
    z = on(xp, np.array([[-80.0, -1.0, 0.0, 2.0, 80.0]], np.float32))
    p, _ = score_forward(z, "sigmoid")
    assert p.dtype == np.float32
    assert np.allclose(host(p), 1 / (1 + np.exp(-np.array([[-80.0, -1.0, 0.0, 2.0, 80.0]]))), rtol=1e-6, atol=0)
    with np.errstate(all="raise"):                                        # no overflow in the tails
        assert host(score_forward(on(xp, np.array([[-800.0, 800.0]])), "sigmoid")[0]).tolist() == [[0.0, 1.0]]
    assert score_backward(p, score_forward(z, "sigmoid")[1]).dtype == np.float32


def test_unknown_score_function():
    with pytest.raises(ValueError, match="score_function='tanh'"):
        score_forward(np.zeros((2, 3)), "tanh")


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------

def test_topk_ranks_logits_where_float32_softmax_underflows(xp):
    """Router rows (200, 0, 10, 50) on x = e_0: float32 softmax is (1, 0, 0, 0); the logits still rank 3 > 2 > 1."""
    w = on(xp, np.array([[200.0, 0, 0], [0.0, 0, 0], [10.0, 0, 0], [50.0, 0, 0]], np.float32))   # [E=4, D=3]
    x = on(xp, np.array([[1.0, 0, 0]], np.float32))                                               # e_0
    (idx, gates), cache = router_forward(x, w, 2, True)
    assert host(idx).tolist() == [[0, 3]]
    assert host(cache.scores).tolist() == [[1.0, 0.0, 0.0, 0.0]]           # the underflow is real
    assert host(ops.topk_indices(cache.scores, 2)).tolist() == [[0, 1]]    # ranking the scores would pick 1
    assert gates.dtype == np.float32


def test_topk_tie_rule_on_logits(xp):
    z = on(xp, np.array([[0.5, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0]]))
    assert host(select_topk(z, 3)).tolist() == [[1, 2, 0], [0, 1, 2]]


def test_bias_changes_the_choice_not_the_gates(xp):
    z = on(xp, np.array([[2.0, 1.0, 0.0, -1.0]]))
    b = on(xp, np.array([0.0, 0.0, 0.0, 0.5]))                              # lifts expert 3 above 1 and 2
    (idx, gates), cache = routing_forward(z, 2, score_function="sigmoid", select_on="scores", bias=b,
                                          renorm="never")
    s = 1 / (1 + np.exp(-np.array([2.0, 1.0, 0.0, -1.0])))
    assert host(idx).tolist() == [[0, 3]]
    assert np.allclose(host(gates), [[s[0], s[3]]], rtol=1e-15)            # unbiased scores
    assert np.allclose(host(cache.choice), [s + [0, 0, 0, 0.5]], rtol=1e-15)
    assert host(select_topk_biased(cache.scores, b, 2)).tolist() == [[0, 3]]
    assert host(select_topk(cache.scores, 2)).tolist() == [[0, 1]]               # without the bias


def test_float32_in_float32_out(xp, rng):
    z = on(xp, rng.standard_normal((6, 8)).astype(np.float32))
    b = on(xp, (0.1 * rng.standard_normal(8)).astype(np.float32))
    for kw in (dict(score_function="sigmoid", select_on="scores", bias=b, n_group=4, topk_group=2,
                    group_score="top2_sum", eps=1e-20, scale=2.5), dict(renorm="topk_softmax", scale=2.0)):
        (idx, g), cache = routing_forward(z, 2, **kw)
        assert g.dtype == np.float32 and cache.scores.dtype == np.float32
        dz = routing_backward(on(xp, np.ones(g.shape, np.float32)), cache)
        assert dz.dtype == np.float32
        keep = capacity_keep(idx, g, 8, 1)
        assert capacity_forward(g, keep)[0].dtype == np.float32


# 8 experts in 4 groups of 2: group scores by "max" and by "top2_sum" disagree.
GROUP_CHOICE = np.array([[0.90, 0.00,   0.50, 0.45,   0.60, 0.55,   0.10, 0.20]])


def test_group_scores_rules(xp):
    c = on(xp, GROUP_CHOICE)
    assert np.allclose(host(group_scores(c, 4, 1)), [[0.90, 0.50, 0.60, 0.20]], rtol=0, atol=0)
    assert np.allclose(host(group_scores(c, 4, 2)), [[0.90, 0.95, 1.15, 0.30]], rtol=1e-15, atol=0)


@pytest.mark.parametrize("rule, expect", [("max", [[0, 4, 5]]),          # groups 0 (0.90) and 2 (0.60)
                                          ("top2_sum", [[4, 5, 2]])])     # groups 2 (1.15) and 1 (0.95)
def test_group_limited_selection(xp, rule, expect):
    idx = select_group_limited(on(xp, GROUP_CHOICE), 3, n_group=4, topk_group=2, group_score=rule)
    assert host(idx).tolist() == expect


def test_masked_groups_are_minus_inf_not_zero(xp):
    """Negative values in the kept groups: a 0 fill would let the masked experts win."""
    c = on(xp, -1 - np.arange(8.0)[None, :])                             # group 0 (-1, -2) and 1 (-3, -4) kept
    idx = host(select_group_limited(c, 4, n_group=4, topk_group=2, group_score="max"))
    assert idx.tolist() == [[0, 1, 2, 3]]


def test_group_ties_lower_group_wins(xp):
    c = on(xp, np.array([[0.3, 0.1, 0.1, 0.3, 0.2, 0.2]]))               # max per group 0.3, 0.3, 0.2
    assert host(select_group_limited(c, 2, n_group=3, topk_group=1)).tolist() == [[0, 1]]


def test_megatron_group_rule_sums_top_k_over_topk_group(xp):
    c = on(xp, np.array([[0.5, 0.0, 0.0, 0.3, 0.3, 0.3]]))               # 2 groups of 3, K = 4, Kg = 1: top-4 sums
    idx = select_group_limited(c, 3, n_group=2, topk_group=1, group_score="topm_sum")   # m = 3: 0.5 vs 0.9
    assert host(idx).tolist() == [[3, 4, 5]]


@pytest.mark.parametrize("kw, field", [
    (dict(top_k=2, n_group=3, topk_group=1), "n_group=3 does not divide n_experts=8"),
    (dict(top_k=2, n_group=4, topk_group=5), "topk_group=5"),
    (dict(top_k=5, n_group=4, topk_group=2), "top_k=5 > topk_group"),
    (dict(top_k=2, n_group=4, topk_group=2, group_score="median"), "group_score='median'"),
    (dict(top_k=1, n_group=4, topk_group=2, group_score="topm_sum"), "sums the top 0"),
    (dict(top_k=9, n_group=4, topk_group=2), "top_k=9"),
    (dict(top_k=2, n_group=None, topk_group=2), "needs both n_group and topk_group"),
])
def test_bad_group_configuration(kw, field):
    with pytest.raises(ValueError, match=field):
        select_group_limited(GROUP_CHOICE, kw.pop("top_k"), **kw)


def test_bad_routing_modes():
    z = np.zeros((2, 4))
    with pytest.raises(ValueError, match="renorm='sometimes'"):
        routing_forward(z, 2, renorm="sometimes")
    with pytest.raises(ValueError, match="select_on='probs'"):
        routing_forward(z, 2, select_on="probs")
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        routing_forward(z, 2, bias=np.zeros(3))
    with pytest.raises(ValueError, match="top_k=0"):
        select_topk(z, 0)


# ----------------------------------------------------------------------------------------------
# gates
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("renorm", ["always", "k_gt_1", "never"])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("scale, eps", [(1.0, 0.0), (2.5, 1e-20), (16.0, 1e-2)])
def test_gate_gradient(xp, rng, renorm, top_k, scale, eps):
    s = on(xp, softmax_rows(2 * rng.standard_normal((6, 5))))

    def pick(a):
        return ops.topk_indices(a["s"], top_k)
    idx = pick({"s": s})
    g, cache = gate_weights_forward(s, idx, renorm=renorm, scale=scale, eps=eps)
    dg = on(xp, rng.standard_normal(g.shape))
    ds = gate_weights_backward(dg, cache)
    f = lambda a: gate_weights_forward(a["s"], pick(a), renorm=renorm, scale=scale, eps=eps)[0]
    # measured <= 1e-10; 5e-9 at K=1 renormalised with eps=1e-2, scale 16 (a small gradient under an O(16) phi);
    # exactly 0 at K=1 renormalised with eps=0 (g = 1, zero gradient on both sides)
    assert_all_below(gc.check_vjp(f, {"s": s}, {"s": ds}, dg, guard=pick))


def test_gate_modes_values(xp):
    s = on(xp, np.array([[0.2, 0.5, 0.3]]))
    one = ops.topk_indices(s, 1)
    two = ops.topk_indices(s, 2)
    assert host(gate_weights_forward(s, one, renorm="k_gt_1")[0]).tolist() == [[0.5]]      # DeepSeek: raw at K = 1
    assert host(gate_weights_forward(s, one, renorm="always")[0]).tolist() == [[1.0]]
    assert np.allclose(host(gate_weights_forward(s, two, renorm="k_gt_1", scale=2.5)[0]), [[2.5 * 5 / 8, 2.5 * 3 / 8]],
                       rtol=1e-15)
    assert np.allclose(host(gate_weights_forward(s, two, renorm="never", scale=2.0)[0]), [[1.0, 0.6]], rtol=1e-15)
    g32, _ = gate_weights_forward(on(xp, np.array([[0.2, 0.5, 0.3]], np.float32)), two, scale=2.5, eps=1e-20)
    assert g32.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# the composed routing step, every system's combination, with the routing guard
# ----------------------------------------------------------------------------------------------

ROUTINGS = {
    "mixtral":          dict(top_k=2),
    "qwen_no_renorm":   dict(top_k=3, renorm="never"),
    "deepseek_v2_group": dict(top_k=3, select_on="scores", n_group=4, topk_group=2, group_score="max",
                              renorm="never", scale=16.0),
    "deepseek_v3":      dict(top_k=3, score_function="sigmoid", select_on="scores", bias=True, n_group=4,
                             topk_group=2, group_score="top2_sum", renorm="always", eps=1e-20, scale=2.5),
    "megatron_sigmoid_k1": dict(top_k=1, score_function="sigmoid", select_on="scores", renorm="k_gt_1",
                                eps=1e-20, scale=3.0),
    "megatron_groups":  dict(top_k=4, n_group=4, topk_group=2, group_score="topm_sum", scale=2.0),
    "deepseek_moegate_k1": dict(top_k=1, select_on="scores", renorm="k_gt_1", eps=1e-20),
    "megatron_default": dict(top_k=3, renorm="topk_softmax", scale=2.0),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routing_gradient(xp, rng, name):
    kw = dict(ROUTINGS[name])
    top_k = kw.pop("top_k")
    if kw.pop("bias", False):
        kw["bias"] = on(xp, 0.3 * rng.standard_normal(8))
    z = on(xp, 2 * rng.standard_normal((7, 8)))
    (idx, g), cache = routing_forward(z, top_k, **kw)
    dg = on(xp, rng.standard_normal(g.shape))
    ds = on(xp, rng.standard_normal(z.shape))                              # a loss reading the scores
    dz = routing_backward(dg, cache, d_scores=ds)

    def phi(a):
        (_, g_), c_ = routing_forward(a["z"], top_k, **kw)
        return float((g_ * dg).sum() + (c_.scores * ds).sum())

    guard = lambda a: routing_forward(a["z"], top_k, **kw)[0][0]
    assert_all_below(gc.check_vjp(phi, {"z": z}, {"z": dz}, guard=guard))  # measured 2e-10 to 1.4e-9


def test_router_through_linear(xp, rng):
    x, w = on(xp, rng.standard_normal((5, 4))), on(xp, rng.standard_normal((8, 4)))
    kw = dict(score_function="sigmoid", select_on="scores", bias=on(xp, 0.2 * rng.standard_normal(8)),
              n_group=4, topk_group=2, group_score="top2_sum", eps=1e-20, scale=2.5)
    z, lin = ops.linear_forward(x, w)
    (idx, g), cache = routing_forward(z, 2, **kw)
    dg = on(xp, rng.standard_normal(g.shape))
    dx, dw = ops.linear_backward(routing_backward(dg, cache), lin)
    f = lambda a: routing_forward(ops.linear_forward(a["x"], a["w"])[0], 2, **kw)[0][1]
    guard = lambda a: routing_forward(ops.linear_forward(a["x"], a["w"])[0], 2, **kw)[0][0]
    assert_all_below(gc.check_vjp(f, {"x": x, "w": w}, {"x": dx, "w": dw}, dg, guard=guard))  # measured 4e-10


def test_topk_softmax_gates_equal_renormalised_softmax(xp, rng):
    z = on(xp, 3 * rng.standard_normal((6, 8)))
    (idx, g), _ = routing_forward(z, 3, renorm="topk_softmax", scale=2.0)
    (idx2, g2), _ = routing_forward(z, 3, renorm="always", scale=2.0)
    assert (host(idx) == host(idx2)).all()
    assert np.allclose(host(g), host(g2), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="renorm='topk_softmax' needs score_function='softmax'"):
        routing_forward(z, 3, renorm="topk_softmax", score_function="sigmoid")


def test_layer_router_unchanged_by_logit_ranking(xp, rng):
    """The layer's router selects from logits and gates from softmax scores, as routing_forward does."""
    x, w = on(xp, rng.standard_normal((6, 4))), on(xp, rng.standard_normal((5, 4)))
    (idx, g), cache = router_forward(x, w, 2, True)
    (idx2, g2), _ = routing_forward(cache.logits, 2)
    assert (host(idx) == host(idx2)).all() and (host(idx) == host(ops.topk_indices(cache.scores, 2))).all()
    assert np.array_equal(host(g), host(g2))


# ----------------------------------------------------------------------------------------------
# the auxiliary-loss-free bias update
# ----------------------------------------------------------------------------------------------

def test_expert_bias_update(xp):
    b = on(xp, np.array([0.0, 0.1, -0.2, 0.0], np.float32))
    c = on(xp, np.array([5, 1, 3, 3]))                                    # mean 3
    new = expert_bias_update(b, c, 0.01)
    assert np.allclose(host(new), [-0.01, 0.11, -0.2, 0.0], rtol=1e-6, atol=0)
    assert new.dtype == np.float32
    assert host(b).tolist() == host(on(xp, np.array([0.0, 0.1, -0.2, 0.0], np.float32))).tolist()  # not mutated
    per_layer = expert_bias_update(on(xp, np.zeros((2, 3))), on(xp, np.array([[1, 2, 3], [2, 2, 2]])), 1e-3)
    assert host(per_layer).tolist() == [[1e-3, 0.0, -1e-3], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="same shape"):
        expert_bias_update(b, on(xp, np.ones(3)), 0.01)


def test_bias_update_moves_load_toward_balance(rng):
    """A few hundred steps of the rule on a skewed sigmoid router bring the max load close to the mean."""
    z = rng.standard_normal((256, 8)) + np.linspace(-1.5, 1.5, 8)
    b = np.zeros(8)
    def load(b):
        idx = routing_forward(z, 2, score_function="sigmoid", select_on="scores", bias=b)[0][0]
        return np.bincount(idx.ravel(), minlength=8)
    before = load(b).max()
    for _ in range(300):
        b = expert_bias_update(b, load(b), 1e-2)
    assert before > 150 and load(b).max() < 90                              # mean load 64


# ----------------------------------------------------------------------------------------------
# capacity and token dropping
# ----------------------------------------------------------------------------------------------

def test_expert_capacity():
    assert expert_capacity(10, 4, 2, 1.0) == 5
    assert expert_capacity(10, 4, 2, 1.1) == 6                            # ceil(5.5)
    assert expert_capacity(10, 4, 2, 0.1, min_capacity=3) == 3
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="capacity_factor"):
            expert_capacity(10, 4, 2, bad)


def test_capacity_keep_policies(xp):
    idx = on(xp, np.array([[0, 1], [0, 2], [1, 0], [0, 1]]))              # expert 0: tokens 0, 1, 2, 3
    g = on(xp, np.array([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.8, 0.2]]))
    by_pos = host(capacity_keep(idx, g, 3, 2, drop_policy="position"))
    assert by_pos.tolist() == [[True, True], [True, True], [True, False], [False, False]]   # expert 1: tokens 0, 2
    by_prob = host(capacity_keep(idx, g, 3, 2, drop_policy="probs"))      # expert 0 keeps 0.8, 0.6; expert 1 0.7, 0.4
    assert by_prob.tolist() == [[True, True], [False, True], [True, False], [True, False]]
    with pytest.raises(ValueError, match="drop_policy='random'"):
        capacity_keep(idx, g, 3, 2, drop_policy="random")


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_gradient_and_exact_zeros(xp, rng, policy):
    z = on(xp, 2 * rng.standard_normal((9, 4)))
    K = 2
    C = expert_capacity(9, 4, K, 0.75)                                     # 4 of each expert's tokens

    def route(a):
        (idx, g), cache = routing_forward(a["z"], K)
        keep = capacity_keep(idx, g, 4, C, drop_policy=policy)
        return idx, g, cache, keep

    idx, g, cache, keep = route({"z": z})
    assert not bool(host(keep).all())                                     # something is dropped
    gk, ccache = capacity_forward(g, keep)
    dgk = on(xp, rng.standard_normal(gk.shape))
    dg = capacity_backward(dgk, ccache)
    assert (host(gk)[~host(keep)] == 0).all() and (host(dg)[~host(keep)] == 0).all()
    dz = routing_backward(dg, cache)
    f = lambda a: capacity_forward(route(a)[1], route(a)[3])[0]
    guard = lambda a: xp.concatenate([route(a)[0], route(a)[3].astype(xp.int64)], axis=1)
    assert_all_below(gc.check_vjp(f, {"z": z}, {"z": dz}, dgk, guard=guard))  # measured 2e-10


# ----------------------------------------------------------------------------------------------
# the router z-loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_zloss_gradient_and_value(xp, rng, masked):
    z = on(xp, 3 * rng.standard_normal((7, 5)))
    mask = on(xp, np.array([1, 0, 1, 1, 0, 1, 1], bool)) if masked else None
    loss, cache = zloss_forward(z, mask)
    zh = host(z)
    lse = np.log(np.exp(zh).sum(axis=1))
    v = host(mask) if masked else np.ones(7, bool)
    assert np.isclose(float(loss), (lse[v] ** 2).mean(), rtol=1e-14)
    dz = zloss_backward(1.0, cache)
    errs = gc.check_vjp(lambda a: zloss_forward(a["z"], mask)[0], {"z": z}, {"z": dz})
    assert_all_below(errs)  # measured 9e-10, 5e-10 masked
    if masked:
        assert (host(dz)[~v] == 0).all()


def test_zloss_large_logits_and_float32(xp):
    z = on(xp, np.array([[1000.0, 999.0, -1000.0]], np.float32))
    loss, cache = zloss_forward(z)
    assert loss.dtype == np.float32 and zloss_backward(1.0, cache).dtype == np.float32
    assert np.isclose(float(loss), (1000 + np.log1p(np.exp(-1.0))) ** 2, rtol=1e-6)
    with pytest.raises(ValueError, match="logits must be"):
        zloss_forward(on(xp, np.zeros(3)))


def test_kept_counts_and_bias_update_through_the_layer(rng):
    """The expert-bias loop of DeepSeek-V3 / Megatron: counts of the final map (after capacity), one update step,
    and the new bias moves the layer's selection towards the under-loaded experts."""
    from refmoe import MoEConfig, init_params, moe_forward
    from refmoe.router_capacity import kept_counts
    cfg = MoEConfig(4, 3, 8, 2, score_function="sigmoid", expert_bias=True, capacity_factor=0.75)
    params = init_params(cfg, 0, backend="numpy")
    x = rng.standard_normal((32, 4))
    _, cache = moe_forward(x, params, cfg)
    counts = kept_counts(cache.topk_idx, cache.keep, 8)
    assert counts.sum() == cache.keep.sum() and (counts <= 6).all()            # C = ceil(32 * 2 / 8 * 0.75) = 6
    full = kept_counts(cache.topk_idx, None, 8)
    assert full.sum() == 64
    bias = expert_bias_update(params["expert_bias"], full, rate=0.05)
    under = full < full.mean()
    assert (bias[under] == 0.05).all() and (bias[full > full.mean()] == -0.05).all()
    _, after = moe_forward(x, dict(params, expert_bias=bias), cfg)
    assert kept_counts(after.topk_idx, None, 8)[under].sum() >= full[under].sum()
