"""The layer under every routing option of MoEConfig and every preset of refmoe.systems: float64 central
differences of the whole layer (x and every parameter, routing guard on, pass mark FD_TOL = 1e-7), capacity
dropping exactly 0, the gated shared expert, the z-loss and the paper's L_o / L_v on every router."""
import numpy as np
import pytest

from refmoe import MoEConfig, gradcheck as gc, init_params, moe_backward, moe_forward, param_shapes
from refmoe.losses import term_backward, term_forward
from refmoe.objective import Objective, objective_forward_backward
from refmoe.router import router_forward
from refmoe.systems import SYSTEMS, system_config

from helpers import assert_all_below, host, layer_fd_errors, on, routing_key

N, D, H, E, K = 12, 4, 3, 8, 2

OPTIONS = {
    "sigmoid_always": dict(score_function="sigmoid"),
    "sigmoid_k_gt_1_eps": dict(score_function="sigmoid", renorm="k_gt_1", gate_eps=1e-20),
    "softmax_never_scaled": dict(renorm="never", routed_scaling_factor=2.5),
    "topk_softmax_scaled": dict(gates="topk_softmax", routed_scaling_factor=1.5),
    "groups_max": dict(n_group=4, topk_group=2, group_score="max"),
    "groups_top2_sum_sigmoid": dict(score_function="sigmoid", n_group=4, topk_group=2, group_score="top2_sum"),
    "groups_topm_sum_topk_softmax": dict(gates="topk_softmax", n_group=4, topk_group=2, group_score="topm_sum"),
    "expert_bias_sigmoid": dict(score_function="sigmoid", expert_bias=True),
    "expert_bias_softmax": dict(expert_bias=True),
    "capacity_probs": dict(capacity_factor=0.75),
    "capacity_position_min": dict(capacity_factor=0.5, drop_policy="position", min_capacity=2),
    "shared_gate": dict(n_shared=1, shared_gate=True),
}


def preset_config(name, **kw):
    groups = dict(n_group=4, topk_group=2) if SYSTEMS[name].overrides.get("n_group") else {}
    return system_config(name, D, H, E, K, **groups, **kw)


def make(xp, rng, cfg):
    params = init_params(cfg, rng, backend="numpy")
    if cfg.expert_bias:
        params["expert_bias"] = 0.3 * rng.standard_normal(E)          # a bias that changes the choice
    params = {k: on(xp, v) for k, v in params.items()}
    x = on(xp, rng.standard_normal((N, D)))
    return x, params


def whole_layer_errors(xp, rng, cfg):
    """phi = <dy, y> + <ds, scores> + <de, expert_out> + <dl, logits>, differentiated in x and every parameter."""
    x, params = make(xp, rng, cfg)
    y, cache = moe_forward(x, params, cfg)
    dy, ds = on(xp, rng.standard_normal(y.shape)), on(xp, rng.standard_normal(cache.scores.shape))
    de, dl = on(xp, rng.standard_normal(cache.expert_out.shape)), on(xp, rng.standard_normal(cache.logits.shape))
    grads = moe_backward(dy, cache, d_scores=ds, d_expert_out=de, d_logits=dl)
    assert sorted(grads) == sorted(list(param_shapes(cfg)) + ["x"])

    def phi(yy, c):
        return (dy * yy).sum() + (ds * c.scores).sum() + (de * c.expert_out).sum() + (dl * c.logits).sum()

    return layer_fd_errors(cfg, params, x, phi, grads), cache, grads


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_layer_gradient_each_option(xp, rng, option):
    cfg = MoEConfig(D, H, E, K, **OPTIONS[option])
    errs, cache, grads = whole_layer_errors(xp, rng, cfg)
    assert_all_below(errs)  # measured <= 5e-10 for every option and parameter (2026-12-01)
    if cfg.expert_bias:
        assert not host(grads["expert_bias"]).any()
    if cfg.capacity_factor is not None:
        assert (~host(cache.keep)).any(), "the case must drop something"


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_layer_gradient_each_preset(xp, rng, name):
    errs, _, _ = whole_layer_errors(xp, rng, preset_config(name))
    assert_all_below(errs)  # measured <= 6e-10 for every preset and parameter (qwen2_moe shared_w_gate)


# ----------------------------------------------------------------------------------------------
# the default router: one mechanism, the old numbers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False])
def test_default_router_bitwise_router_forward(rng, norm):
    cfg = MoEConfig(D, H, E, K, norm_topk_prob=norm)
    x, params = make(np, rng, cfg)
    _, cache = moe_forward(x, params, cfg)
    (idx, gates), rc = router_forward(x, params["w_router"], K, norm)
    assert (cache.topk_idx == idx).all()
    assert cache.gates.tobytes() == gates.tobytes() and cache.scores.tobytes() == rc.scores.tobytes()


# ----------------------------------------------------------------------------------------------
# capacity: a dropped pair is exactly 0 everywhere
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["probs", "position"])
def test_dropped_pairs_are_exactly_zero(xp, rng, policy):
    cfg = MoEConfig(D, H, E, K, capacity_factor=0.5, drop_policy=policy)
    x, params = make(xp, rng, cfg)
    y, cache = moe_forward(x, params, cfg)
    dropped = ~host(cache.keep)
    assert dropped.any()
    assert (host(cache.gates)[dropped] == 0).all() and (host(cache.expert_out)[dropped] == 0).all()
    # y equals the sum over the kept pairs only
    full = MoEConfig(D, H, E, K)
    _, c_full = moe_forward(x, params, full)
    keep = host(cache.keep)
    y_kept = np.einsum("nk,nkd->nd", host(c_full.gates) * keep, host(c_full.expert_out))
    assert np.allclose(host(y), y_kept, rtol=1e-14, atol=1e-15)
    # an upstream gradient living only on the dropped pairs' expert outputs reaches nothing
    de = np.zeros(cache.expert_out.shape)
    de[dropped] = rng.standard_normal((int(dropped.sum()), D))
    grads = moe_backward(None, cache, d_expert_out=on(xp, de))
    assert all(not host(g).any() for g in grads.values())
    # a token whose every pair is dropped gets no routed gradient on its gate
    dy = on(xp, rng.standard_normal(y.shape))
    d_gates = np.einsum("nd,nkd->nk", host(dy), host(cache.expert_out))
    assert (d_gates[dropped] == 0).all()


def test_capacity_keeps_the_largest_gates():
    """Five tokens all choosing expert 0 (E = 4, K = 1, capacity 1 x 5/4 -> C = 2; raw gates, since renormalised
    gates at K = 1 are all 1): expert 0 keeps its two largest gates (probs) or its two earliest tokens (position)."""
    w = np.zeros((4, 2)); w[0] = [1.0, 0.0]
    x = np.array([[3.0, 0], [5.0, 0], [1.0, 0], [4.0, 0], [2.0, 0]])
    for policy, kept in (("probs", [1, 3]), ("position", [0, 1])):
        cfg = MoEConfig(2, 2, 4, 1, renorm="never", capacity_factor=1.0, drop_policy=policy)
        params = init_params(cfg, 0, backend="numpy")
        params["w_router"] = w
        _, cache = moe_forward(x, params, cfg)
        assert host(cache.topk_idx)[:, 0].tolist() == [0] * 5
        assert np.flatnonzero(host(cache.keep)[:, 0]).tolist() == kept


# ----------------------------------------------------------------------------------------------
# shared gate
# ----------------------------------------------------------------------------------------------

def test_shared_gate_values(rng):
    cfg = MoEConfig(D, H, E, K, n_shared=1, shared_gate=True)
    x, params = make(np, rng, cfg)
    y, cache = moe_forward(x, params, cfg)
    a = 1 / (1 + np.exp(-(x @ params["shared_w_score"].T)))                # [N, 1]
    routed = np.einsum("nk,nkd->nd", cache.gates, cache.expert_out)
    assert np.allclose(y, routed + a * cache.shared_out, rtol=1e-14, atol=1e-15)
    assert param_shapes(cfg)["shared_w_score"] == (1, D)


def test_float32_in_float32_out(rng):
    cfg = MoEConfig(D, H, E, K, score_function="sigmoid", renorm="k_gt_1", gate_eps=1e-20, expert_bias=True,
                    n_group=4, topk_group=2, group_score="top2_sum", capacity_factor=1.0, n_shared=1,
                    shared_gate=True, routed_scaling_factor=2.5)
    params = init_params(cfg, rng, dtype=np.float32, backend="numpy")
    x = rng.standard_normal((N, D)).astype(np.float32)
    y, cache = moe_forward(x, params, cfg)
    grads = moe_backward(np.ones_like(y), cache, d_logits=np.ones_like(cache.logits))
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())


# ----------------------------------------------------------------------------------------------
# the z-loss and the paper's L_o / L_v on every router
# ----------------------------------------------------------------------------------------------

def term_errors(xp, rng, cfg, term, form):
    x, params = make(xp, rng, cfg)
    _, cache = moe_forward(x, params, cfg)
    _, tc = term_forward(term, form, cache)
    inj = term_backward(1.0, tc)
    grads = moe_backward(None, cache, d_scores=inj.d_scores, d_expert_out=inj.d_expert_out, d_logits=inj.d_logits)

    return layer_fd_errors(cfg, params, x, lambda y, c: term_forward(term, form, c)[0], grads)


@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("term,form", [("z", "zloss"), ("ortho", "pairwise"), ("var", "paper"), ("var", "code")])
def test_losses_compose_on_every_router(rng, name, term, form):
    assert_all_below(term_errors(np, rng, preset_config(name), term, form))  # measured <= 2e-8


def test_objective_with_z_term(rng):
    cfg = preset_config("megatron_capacity")
    x, params = make(np, rng, cfg)
    obj = Objective(aux_variant="switch", alpha=1e-2, beta=1e-2, gamma=1e-2, zeta=0.5)
    dy = rng.standard_normal((N, D))
    res = objective_forward_backward(x, params, cfg, dy, obj)
    assert set(res.grads) == {"task", "aux", "ortho", "var", "z", "total"}
    for name in res.grads["total"]:
        parts = sum(res.grads[t][name] for t in ("task", "aux", "ortho", "var", "z"))
        assert np.allclose(res.grads["total"][name], parts, rtol=1e-12, atol=1e-14)

    def phi(inp):
        p = {k: inp.get(k, v) for k, v in params.items()}
        r = objective_forward_backward(inp["x"], p, cfg, None, obj, per_term=False)
        y, _ = moe_forward(inp["x"], p, cfg)
        return (dy * y).sum() + r.losses["regularisers"]

    def guard(inp):
        return routing_key(moe_forward(inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg)[1])

    errs = gc.check_vjp(phi, dict(params, x=x), res.grads["total"], guard=guard)
    assert_all_below(errs)
    no_z = objective_forward_backward(x, params, cfg, dy, obj.replace(zeta=0.0))
    assert "z" not in no_z.losses and "z" not in no_z.grads


# ----------------------------------------------------------------------------------------------
# configuration errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(n_group=3, topk_group=1), "n_group=3"),
    (dict(n_group=4, topk_group=5), "topk_group=5"),
    (dict(n_group=4, topk_group=1, top_k=3), "top_k=3"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(score_function="relu"), "score_function"),
    (dict(renorm="sometimes"), "renorm"),
    (dict(gates="dense"), "gates"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(n_group=4, topk_group=2, group_score="mean"), "group_score"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(min_capacity=-1), "min_capacity"),
    (dict(gates="topk_softmax", score_function="sigmoid"), "gates='topk_softmax'"),
    (dict(shared_gate=True), "shared_gate"),
    (dict(n_group=4), "topk_group"),
    (dict(norm_topk_prob=False, renorm="always"), "renorm='always'"),
])
def test_bad_configs_name_the_field(kw, field):
    kw = dict(kw)
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        MoEConfig(D, H, E, kw.pop("top_k", K), **kw)


def test_unknown_field_and_norm_topk_prob_mapping():
    with pytest.raises(TypeError):
        MoEConfig(D, H, E, K, unknown_field=1)
    assert MoEConfig(D, H, E, K).renorm_mode == "always"
    assert MoEConfig(D, H, E, K, norm_topk_prob=False).renorm_mode == "never"
    assert MoEConfig(D, H, E, K, renorm="k_gt_1").renorm_mode == "k_gt_1"
