"""The named system presets (refmoe.systems) and the balancing losses they name: the table is complete and its
configs build, unknown names are refused, each preset's router does what its source does on hand-made cases,
and the Megatron / DeepSeek-V3 balancing forms match independent NumPy formulas and float64 central differences."""
import numpy as np
import pytest

from refmoe import MoEConfig, gradcheck as gc, init_params, moe_forward, moe_backward
from refmoe.losses import SYSTEM_AUX_FORMS, TERM_FORMS, aux_loss_forward, system_aux_backward, system_aux_forward
from refmoe.losses import term_backward, term_forward
from refmoe.systems import SYSTEMS, System, system_config

from helpers import assert_all_below, host, on, softmax_rows

D, H, E, K = 4, 3, 8, 2


def small(name, **kw):
    groups = dict(n_group=4, topk_group=2) if SYSTEMS[name].overrides.get("n_group") else {}
    return system_config(name, D, H, E, K, **groups, **kw)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------

def test_table_has_every_system_with_a_source():
    expected = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "megatron",
                "megatron_seq", "megatron_global", "megatron_capacity", "megatron_sigmoid", "authors_code"}
    assert set(SYSTEMS) == expected
    for name, s in SYSTEMS.items():
        assert isinstance(s, System)
        assert s.source and ("5.24.0" in s.source or "0.16.1" in s.source or "b1fea9d" in s.source), name
        if s.balancing is not None:
            term, form = s.balancing
            assert form in TERM_FORMS[term], name
        assert isinstance(small(name), MoEConfig)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="megatron_capacity"):
        system_config("switch_transformer", D, H, E, K)


def test_presets_set_what_their_sources_do():
    c = small("deepseek_v3")
    assert (c.score_function, c.renorm_mode, c.gate_eps, c.routed_scaling_factor, c.group_rule, c.expert_bias) == \
        ("sigmoid", "always", 1e-20, 2.5, "top2_sum", True)
    assert small("megatron").gates == "topk_softmax" and small("megatron").capacity_factor is None
    assert small("megatron_capacity").capacity_factor == 1.0
    assert small("megatron_sigmoid").renorm_mode == "k_gt_1"
    assert small("qwen2_moe").shared_gate and small("qwen2_moe").renorm_mode == "never"
    assert small("mixtral").renorm_mode == "always"
    assert small("deepseek_v2").renorm_mode == "never"
    assert system_config("deepseek_v3", D, H, 256, 8).n_group == 8       # the shipped grouping at E = 256
    with pytest.raises(ValueError, match="group_score='top2_sum' sums the top 2"):
        system_config("deepseek_v3", D, H, E, K)                          # E = 8 in 8 groups of 1 cannot sum 2
    assert system_config("megatron", D, H, E, K, capacity_factor=1.25).capacity_factor == 1.25


def test_megatron_topk_softmax_equals_renormalised_softmax(rng):
    """Megatron's softmax over the K selected logits is the renormalised full softmax (to rounding)."""
    x = rng.standard_normal((10, D))
    a, b = small("megatron"), MoEConfig(D, H, E, K)
    params = init_params(a, 0, backend="numpy")
    ya, ca = moe_forward(x, params, a)
    yb, cb = moe_forward(x, params, b)
    assert (ca.topk_idx == cb.topk_idx).all()
    assert np.allclose(ca.gates, cb.gates, rtol=1e-14) and np.allclose(ya, yb, rtol=1e-13, atol=1e-15)


def test_deepseek_v3_gates_and_scores(rng):
    """Gates: the raw sigmoid of the selected experts, / (sum + 1e-20), x 2.5; selection on s + bias in the two
    best groups (sum of the top-2 of s + b); cache.scores: s / sum_j s over all experts."""
    cfg = small("deepseek_v3")
    params = init_params(cfg, 1, backend="numpy")
    params["expert_bias"] = 0.5 * rng.standard_normal(E)
    x = rng.standard_normal((16, D))
    _, cache = moe_forward(x, params, cfg)
    z = x @ params["w_router"].T
    s = 1 / (1 + np.exp(-z))
    c = s + params["expert_bias"]
    gs = np.sort(c.reshape(16, 4, 2), axis=-1)[..., ::-1][..., :2].sum(-1)      # [N, G]
    for i in range(16):
        kept = np.argsort(-gs[i], kind="stable")[:2]
        allowed = np.concatenate([np.arange(2 * g, 2 * g + 2) for g in kept])
        idx = allowed[np.argsort(-c[i, allowed], kind="stable")[:K]]
        assert sorted(host(cache.topk_idx)[i]) == sorted(idx)
    sel = np.take_along_axis(s, cache.topk_idx, 1)
    assert np.allclose(cache.gates, 2.5 * sel / (sel.sum(1, keepdims=True) + 1e-20), rtol=1e-14)
    assert np.allclose(cache.scores, s / s.sum(1, keepdims=True), rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# the balancing forms
# ----------------------------------------------------------------------------------------------

def test_deepseek_v3_sequence_loss_matches_the_paper(rng):
    """L = mean_b sum_j f_bj P_bj, f_bj = E/(K T) #{t: j in selection(b, t)} (bias included),
    P_bj = mean_t s'_btj with s' = s / sum_j s."""
    cfg = small("deepseek_v3")
    params = init_params(cfg, 2, backend="numpy")
    params["expert_bias"] = 0.5 * rng.standard_normal(E)
    B, T = 3, 5
    x = rng.standard_normal((B * T, D))
    _, cache = moe_forward(x, params, cfg)
    loss, _ = term_forward(*SYSTEMS["deepseek_v3"].balancing, cache, batch_shape=(B, T))
    s = 1 / (1 + np.exp(-(x @ params["w_router"].T)))
    sp = (s / s.sum(1, keepdims=True)).reshape(B, T, E)
    idx = host(cache.topk_idx).reshape(B, T, K)
    ref = 0.0
    for b in range(B):
        f = np.array([E / (K * T) * (idx[b] == j).any(-1).sum() for j in range(E)])
        ref += (f * sp[b].mean(0)).sum() / B
    assert abs(float(loss) - ref) < 1e-14


@pytest.mark.parametrize("form", sorted(SYSTEM_AUX_FORMS))
def test_megatron_forms_match_the_formula_and_fd(xp, rng, form):
    B, T = 2, 6
    N = B * T
    P = on(xp, softmax_rows(2 * rng.standard_normal((N, E))))
    sel = on(xp, np.argsort(-rng.standard_normal((N, E)), axis=1)[:, :K])      # a selection Megatron ignores
    mask = rng.random(N) > 0.2
    loss, cache = system_aux_forward(P, sel, form, valid_mask=on(xp, mask), batch_shape=(B, T))
    Ph = host(P)
    plain = np.argsort(-Ph, axis=1, kind="stable")[:, :K]
    r = np.zeros((N, E)); np.put_along_axis(r, plain, 1.0, 1); r *= mask[:, None]
    q = Ph * mask[:, None]
    if form == "megatron_aux":
        n = mask.sum()
        ref = E / (K * n * n) * (q.sum(0) * r.sum(0)).sum()
    else:                                                         # tokens i = t*B + b
        rs, qs, ms = r.reshape(T, B, E), q.reshape(T, B, E), mask.reshape(T, B)
        ref = np.mean([E / (K * ms[:, b].sum() ** 2) * (qs[:, b].sum(0) * rs[:, b].sum(0)).sum() for b in range(B)])
    assert abs(float(loss) - ref) < 1e-14
    dP = system_aux_backward(1.0, cache)
    errs = gc.check_vjp(lambda a: system_aux_forward(a["P"], sel, form, valid_mask=on(xp, mask),
                                                     batch_shape=(B, T))[0], {"P": P}, {"P": dP},
                        guard=lambda a: np.argsort(-host(a["P"]), axis=1, kind="stable")[:, :K])
    assert_all_below(errs)  # measured 1e-10


def test_megatron_aux_counts_before_dropping(rng):
    """With capacity on, megatron_aux counts the full top-k (before dropping): the same value as without capacity."""
    x = rng.standard_normal((16, D))
    on_, off = small("megatron_capacity", capacity_factor=0.5), small("megatron")
    params = init_params(on_, 3, backend="numpy")
    _, c_on = moe_forward(x, params, on_)
    _, c_off = moe_forward(x, params, off)
    assert (~c_on.keep).any()
    v_on = term_forward("sys_aux", "megatron_aux", c_on)[0]
    v_off = term_forward("sys_aux", "megatron_aux", c_off)[0]
    assert float(v_on) == float(v_off)
    assert abs(float(v_on) - float(aux_loss_forward(c_off.scores, c_off.topk_idx, "deepseek_batch")[0])) < 1e-14


def test_megatron_sigmoid_aux_reads_normalised_scores(rng):
    cfg = small("megatron_sigmoid")
    params = init_params(cfg, 4, backend="numpy")
    params["expert_bias"] = 0.5 * rng.standard_normal(E)             # moves the selection, not the aux map
    x = rng.standard_normal((12, D))
    _, cache = moe_forward(x, params, cfg)
    s = 1 / (1 + np.exp(-(x @ params["w_router"].T)))
    q = s / (s.sum(1, keepdims=True) + 1e-20)
    r = np.zeros_like(q); np.put_along_axis(r, np.argsort(-q, 1, kind="stable")[:, :K], 1.0, 1)
    ref = E / (K * 12 ** 2) * (q.sum(0) * r.sum(0)).sum()
    assert abs(float(term_forward("sys_aux", "megatron_aux", cache)[0]) - ref) < 1e-14


@pytest.mark.parametrize("name", sorted(n for n in SYSTEMS if SYSTEMS[n].balancing is not None))
def test_preset_balancing_loss_through_the_layer(rng, name):
    """Each preset's balancing loss, differentiated through the whole layer (x and every parameter)."""
    cfg = small(name)
    params = init_params(cfg, 5, backend="numpy")
    if cfg.expert_bias:
        params["expert_bias"] = 0.3 * rng.standard_normal(E)
    B, T = 2, 6
    x = rng.standard_normal((B * T, D))
    term, form = SYSTEMS[name].balancing
    _, cache = moe_forward(x, params, cfg)
    _, tc = term_forward(term, form, cache, batch_shape=(B, T))
    inj = term_backward(1.0, tc)
    grads = moe_backward(None, cache, d_scores=inj.d_scores)

    def phi(inp):
        c = moe_forward(inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg)[1]
        return term_forward(term, form, c, batch_shape=(B, T))[0]

    def guard(inp):
        c = moe_forward(inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg)[1]
        return np.concatenate([c.topk_idx, np.argsort(-c.scores, 1, kind="stable")[:, :K]], axis=1)

    assert_all_below(gc.check_vjp(phi, dict(params, x=x), grads, guard=guard))  # measured <= 1e-8


@pytest.mark.parametrize("name", ["megatron_sigmoid", "deepseek_v3", "megatron_capacity"])
def test_preset_float32_in_float32_out(rng, name):
    cfg = small(name)
    params = init_params(cfg, 6, dtype=np.float32, backend="numpy")
    x = rng.standard_normal((12, D)).astype(np.float32)
    y, cache = moe_forward(x, params, cfg)
    term, form = SYSTEMS[name].balancing
    v, tc = term_forward(term, form, cache, batch_shape=(2, 6))
    vz, tz = term_forward("z", "zloss", cache)
    grads = moe_backward(np.ones_like(y), cache, d_scores=term_backward(1.0, tc).d_scores,
                         d_logits=term_backward(1.0, tz).d_logits)
    assert cache.scores.dtype == np.float32 and v.dtype == np.float32 and vz.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
