"""Golden cases of the router presets (sys_<S>, sys_<S>_f32): the manifest contract, the layer rebuilt from
the manifest alone, the routing conditions of the inputs, and the stored gradients by central differences."""
import dataclasses

import numpy as np
import pytest

import refmoe
from refmoe.config import MoEConfig
from refmoe.golden import default_cases, load_case, load_manifest
from refmoe.golden.format import TOLERANCES
from refmoe.golden.systems_cases import evaluate_system, make_system_inputs, routing_margin, system_terms
from refmoe.gradcheck import directional_check
from refmoe.systems import SYSTEMS, system_config

SYSTEM_CASES = [c for c in default_cases() if c.system is not None]


def _f64(name):
    return [c for c in SYSTEM_CASES if c.name == name][0]


def test_every_preset_has_a_float64_and_a_float32_case():
    names = {c.name for c in SYSTEM_CASES}
    assert names == {f"sys_{s}" for s in SYSTEMS} | {f"sys_{s}_f32" for s in SYSTEMS}
    for c in SYSTEM_CASES:
        assert (c.dtype == "float32") == c.name.endswith("_f32")
        assert c.batch_shape == (2, 6) and (c.d_model, c.d_hidden, c.n_experts, c.top_k) == (8, 6, 8, 2)


def test_manifest_entries_follow_the_contract(golden):
    m = load_manifest(golden)
    for spec in SYSTEM_CASES:
        e = m["cases"][spec.name]
        S = spec.system
        assert e["system"] == S and e["kind"] == "layer"
        cfg = MoEConfig(**e["config"])                          # a reader rebuilds the layer from it
        assert set(e["config"]) == {f.name for f in dataclasses.fields(MoEConfig)}
        assert cfg == system_config(S, 8, 6, 8, 2, **dict(spec.system_overrides))
        bal = SYSTEMS[S].balancing
        assert e["variants"]["aux"] == (bal[1] if bal else None) and e["balancing"] == (list(bal) if bal else None)
        assert e["variants"]["ortho"] is None and e["variants"]["var"] is None
        assert e["variants"]["z"] == ("zloss" if S.startswith("megatron") else None)
        want = {"alpha": SYSTEMS[S].balancing_coefficient or 1e-2} if bal else {}
        if S.startswith("megatron"):
            want["zeta"] = 1e-2
        assert e["coefficients"] == pytest.approx(want) and set(e["coefficient_source"]) == set(want)
        assert all(e["tolerance"][f] <= TOLERANCES[e["dtype"]][f] for f in ("rtol", "atol"))
        keys = set(e["keys"])
        terms = ["task", "total"] + (["aux"] if bal else []) + (["z"] if S.startswith("megatron") else [])
        assert sorted(e["terms"]) == sorted(terms)
        params = {f"param/{k}" for k in refmoe.layer.param_shapes(cfg)}
        assert params <= keys and "grad/total/expert_bias" not in keys
        for t in terms:
            assert {f"grad/{t}/{p[len('param/'):]}" for p in params if p != "param/expert_bias"} <= keys
            assert f"grad/{t}/x" in keys and (t in ("task", "total") or f"loss/{t}" in keys)
        assert ("inter/shared_out" in keys) == bool(cfg.n_shared)


def test_arrays_rebuild_from_the_manifest_alone(golden):
    m = load_manifest(golden)
    for spec in SYSTEM_CASES:
        e = m["cases"][spec.name]
        a = load_case(golden, spec.name, m)
        cfg = MoEConfig(**e["config"])
        params = {k[len("param/"):]: v for k, v in a.items() if k.startswith("param/")}
        y, cache = refmoe.moe_forward(a["input/x"], params, cfg)
        np.testing.assert_array_equal(cache.topk_idx, a["inter/topk_idx"])
        np.testing.assert_array_equal(y, a["inter/y"])
        np.testing.assert_array_equal(cache.gates, a["inter/gates"])
        total = a["loss/task"] + sum(e["coefficients"][c] * a[f"loss/{t}"]
                                     for t, c in (("aux", "alpha"), ("z", "zeta")) if c in e["coefficients"])
        tol = 1e-12 if e["dtype"] == "float64" else 1e-5
        assert float(a["loss/total"]) == pytest.approx(float(total), rel=tol)
        for k in params:
            if k == "expert_bias":
                continue
            parts = sum(a[f"grad/{t}/{k}"] for t in e["terms"] if t != "total")
            np.testing.assert_allclose(parts, a[f"grad/total/{k}"], rtol=tol, atol=tol * np.abs(parts).max())


def test_float32_cases_are_the_float64_inputs_cast(golden):
    m = load_manifest(golden)
    for s in SYSTEMS:
        a64, a32 = load_case(golden, f"sys_{s}", m), load_case(golden, f"sys_{s}_f32", m)
        for k in a64:
            if k.startswith(("input/", "param/")):
                assert a32[k].dtype == (a64[k].dtype if a64[k].dtype == bool else np.float32)
                np.testing.assert_array_equal(a32[k], a64[k].astype(a32[k].dtype))
        np.testing.assert_array_equal(a32["inter/topk_idx"], a64["inter/topk_idx"])   # clear margins


def test_routing_conditions_of_the_inputs():
    for spec in SYSTEM_CASES:
        if spec.dtype != "float64":
            continue
        x, params, _, _ = make_system_inputs(spec)
        cfg = spec.config()
        assert routing_margin(x, params, cfg) >= 1e-3
        _, cache = refmoe.moe_forward(x, params, cfg)
        if cfg.expert_bias:                                   # deepseek_v3, megatron_sigmoid
            assert np.abs(params["expert_bias"]).min() > 0
            unbiased = refmoe.moe_forward(x, {**params, "expert_bias": 0 * params["expert_bias"]}, cfg)[1]
            assert (np.sort(unbiased.topk_idx, 1) != np.sort(cache.topk_idx, 1)).any()
        if cfg.n_group is not None:                           # the groups change some token's experts
            plain = refmoe.ops.topk_indices(cache.router.choice, cfg.top_k)
            assert (np.sort(plain, 1) != np.sort(cache.topk_idx, 1)).any()
        if cfg.capacity_factor is not None:                   # some pairs are dropped: their gates are 0
            assert (~cache.keep).any() and (cache.gates[~cache.keep] == 0).all()


def test_deepseek_v2_has_no_balancing_term_and_megatron_has_the_z_loss():
    assert set(system_terms("deepseek_v2")) == set()
    assert system_terms("megatron")["z"][:2] == ("z", "zloss")
    assert system_terms("megatron_seq")["aux"][:2] == ("sys_aux", "megatron_seq_aux")
    assert system_terms("deepseek_v3")["aux"][2] == 1e-4 and system_terms("mixtral")["aux"][2] == 1e-3


@pytest.mark.parametrize("name", [f"sys_{s}" for s in SYSTEMS])
def test_stored_gradients_by_central_differences(golden, name, rng):
    spec = _f64(name)
    a = load_case(golden, name)
    params = {k[len("param/"):]: v for k, v in a.items() if k.startswith("param/")}
    moving = {"x": a["input/x"], **{k: v for k, v in params.items() if k != "expert_bias"}}
    grads = {k: a[f"grad/total/{k}"] for k in moving}

    def full(inp):
        return {**params, **{k: inp[k] for k in params if k != "expert_bias"}}

    f = lambda inp: evaluate_system(spec, inp["x"], full(inp), a["input/dy"], a["input/valid_mask"])["loss/total"]
    guard = lambda inp: refmoe.moe_forward(inp["x"], full(inp), spec.config())[1].topk_idx
    # h = 1e-5: at 1e-6 round-off of the O(10) totals gave up to 7e-8; the routing margins are >= 1e-3
    err = directional_check(f, moving, grads, rng, guard=guard, h=1e-5)
    assert err < 1e-7, (name, err)                              # measured <= 5e-9; pass mark 1e-7
