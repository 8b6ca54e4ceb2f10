"""The whole layer: finite-difference checks for every input and parameter, dtype, parity, and bad input."""
import numpy as np
import pytest

import refmoe
from refmoe import MoEConfig, init_params, moe_backward, moe_forward

from helpers import assert_all_below, host, layer_fd_errors, on

CONFIGS = {
    "k2_renorm": dict(n_experts=4, top_k=2, n_shared=0, norm_topk_prob=True),
    "k2_no_renorm_shared2": dict(n_experts=4, top_k=2, n_shared=2, norm_topk_prob=False),
    "k1_shared1": dict(n_experts=4, top_k=1, n_shared=1, norm_topk_prob=True),
    "k1_no_renorm": dict(n_experts=3, top_k=1, n_shared=0, norm_topk_prob=False),
    "kE_renorm_shared1": dict(n_experts=4, top_k=4, n_shared=1, norm_topk_prob=True),
    "kE_no_renorm": dict(n_experts=3, top_k=3, n_shared=0, norm_topk_prob=False),
}


def make_case(xp, rng, n_tokens=7, d_model=5, d_hidden=3, dtype=np.float64, **cfg_kw):
    cfg = MoEConfig(d_model=d_model, d_hidden=d_hidden, **cfg_kw)
    params = init_params(cfg, rng, dtype=dtype, backend="cupy" if xp is not np else "numpy")
    x = on(xp, rng.standard_normal((n_tokens, d_model)).astype(dtype))
    return cfg, params, x


def layer_phi(dy, d_scores, d_expert_out):
    """phi(y, cache) = <dy, y> + <d_scores, scores> + <d_expert_out, expert_out>."""
    return lambda y, c: float((y * dy).sum() + (c.scores * d_scores).sum() + (c.expert_out * d_expert_out).sum())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_gradients_all_inputs(xp, rng, name):
    cfg, params, x = make_case(xp, rng, **CONFIGS[name])
    y, cache = moe_forward(x, params, cfg)
    dy = on(xp, rng.standard_normal(y.shape))
    d_scores = on(xp, rng.standard_normal(cache.scores.shape))
    d_eo = on(xp, rng.standard_normal(cache.expert_out.shape))
    grads = moe_backward(dy, cache, d_scores=d_scores, d_expert_out=d_eo)
    inputs = {"x": x, **params}
    assert set(grads) == set(inputs)
    errs = layer_fd_errors(cfg, params, x, layer_phi(dy, d_scores, d_eo), grads)
    assert_all_below(errs)  # measured 1e-11 .. 2e-9


def test_layer_gradient_dy_only_and_injected_only_add_up(xp, rng):
    cfg, params, x = make_case(xp, rng, **CONFIGS["k2_no_renorm_shared2"])
    y, cache = moe_forward(x, params, cfg)
    dy = on(xp, rng.standard_normal(y.shape))
    ds = on(xp, rng.standard_normal(cache.scores.shape))
    de = on(xp, rng.standard_normal(cache.expert_out.shape))
    total = moe_backward(dy, cache, d_scores=ds, d_expert_out=de)
    parts = [moe_backward(dy, cache), moe_backward(None, cache, d_scores=ds), moe_backward(None, cache, d_expert_out=de)]
    for k in total:
        summed = sum(host(p[k]) for p in parts)
        assert np.allclose(host(total[k]), summed, rtol=1e-12, atol=1e-13), k


def test_layer_forward_matches_token_loop(rng):
    """The sorted dispatch equals a plain loop over tokens and their selected experts."""
    cfg, params, x = make_case(np, rng, n_tokens=9, **CONFIGS["k2_no_renorm_shared2"])
    y, cache = moe_forward(x, params, cfg)
    logits = x @ params["w_router"].T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)

    def swiglu(v, wg, wu, wd):
        a = v @ wg
        return (a / (1 + np.exp(-a)) * (v @ wu)) @ wd

    for i in range(x.shape[0]):
        top = np.argsort(-p[i], kind="stable")[:2]
        out = sum(p[i, e] * swiglu(x[i], params["w_gate"][e], params["w_up"][e], params["w_down"][e]) for e in top)
        out = out + swiglu(x[i], params["shared_w_gate"], params["shared_w_up"], params["shared_w_down"])
        assert np.allclose(y[i], out, rtol=1e-13, atol=1e-13)
        assert host(cache.topk_idx[i]).tolist() == top.tolist()


def test_renormalised_gates_sum_to_one(xp, rng):
    cfg, params, x = make_case(xp, rng, **CONFIGS["k2_renorm"])
    _, cache = moe_forward(x, params, cfg)
    assert np.allclose(host(cache.gates).sum(axis=1), 1.0, atol=1e-15)


def test_single_token(xp, rng):
    cfg, params, x = make_case(xp, rng, n_tokens=1, **CONFIGS["k2_renorm"])
    y, cache = moe_forward(x, params, cfg)
    dy = on(xp, rng.standard_normal(y.shape))
    grads = moe_backward(dy, cache)
    errs = layer_fd_errors(cfg, params, x, layer_phi(dy, 0 * cache.scores, 0 * cache.expert_out), grads)
    assert_all_below(errs)  # measured ~1e-10; experts with no token get exactly zero gradient
    unused = sorted(set(range(4)) - set(host(cache.topk_idx).ravel().tolist()))
    assert all(float(abs(grads["w_gate"][e]).max()) == 0.0 for e in unused)


def test_float32_in_float32_out(xp, rng):
    cfg, params, x = make_case(xp, rng, dtype=np.float32, **CONFIGS["k2_no_renorm_shared2"])
    y, cache = moe_forward(x, params, cfg)
    grads = moe_backward(on(xp, np.ones(y.shape, np.float32)), cache)
    assert y.dtype == np.float32
    assert all(getattr(cache, f).dtype == np.float32 for f in ("logits", "scores", "gates", "expert_out"))
    assert all(g.dtype == np.float32 for g in grads.values())
    # float32 agrees with float64 to single precision
    cfg64, params64, x64 = make_case(xp, np.random.default_rng(20251123), **CONFIGS["k2_no_renorm_shared2"])
    y64, _ = moe_forward(x64, params64, cfg64)
    assert np.allclose(host(y), host(y64), rtol=1e-4, atol=1e-5)


def test_cupy_matches_numpy_float64(cp, rng):
    cupy = cp
    for name in CONFIGS:
        cfg, params, x = make_case(np, np.random.default_rng(7), **CONFIGS[name])
        y, cache = moe_forward(x, params, cfg)
        dy = rng.standard_normal(y.shape)
        g = moe_backward(dy, cache)
        params_d = {k: cupy.asarray(v) for k, v in params.items()}
        y_d, cache_d = moe_forward(cupy.asarray(x), params_d, cfg)
        g_d = moe_backward(cupy.asarray(dy), cache_d)
        assert (host(cache_d.topk_idx) == cache.topk_idx).all()
        np.testing.assert_allclose(host(y_d), y, rtol=1e-12, atol=1e-14)
        for k in g:
            np.testing.assert_allclose(host(g_d[k]), g[k], rtol=1e-12, atol=1e-13, err_msg=f"{name}:{k}")


# ----------------------------------------------------------------------------------------------
# bad input is refused at the boundary
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise(rng):
    cfg, params, x = make_case(np, rng, **CONFIGS["k2_renorm"])
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        moe_forward(x[0], params, cfg)
    with pytest.raises(ValueError, match="d_model=5"):
        moe_forward(x[:, :4], params, cfg)
    with pytest.raises(ValueError, match="N=0"):
        moe_forward(x[:0], params, cfg)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        moe_forward(bad, params, cfg)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        moe_forward(bad, params, cfg)
    with pytest.raises(TypeError, match="float32"):
        moe_forward(x.astype(np.float32), params, cfg)
    with pytest.raises(TypeError, match="dtype int64"):
        moe_forward(x.astype(np.int64), {k: v.astype(np.int64) for k, v in params.items()}, cfg)
    with pytest.raises(ValueError, match="shape"):
        moe_forward(x, {**params, "w_router": params["w_router"][:3]}, cfg)
    with pytest.raises(ValueError, match="lack"):
        moe_forward(x, {k: v for k, v in params.items() if k != "w_up"}, cfg)
    with pytest.raises(ValueError, match="unexpected keys"):
        moe_forward(x, {**params, "shared_w_up": params["w_up"][0]}, cfg)
    with pytest.raises(TypeError, match="numpy.ndarray or cupy.ndarray"):
        moe_forward(x.tolist(), params, cfg)
    y, cache = moe_forward(x, params, cfg)
    with pytest.raises(ValueError, match="dy has shape"):
        moe_backward(y[:, :2], cache)
    with pytest.raises(ValueError, match="d_scores has shape"):
        moe_backward(y, cache, d_scores=cache.scores[:, :2])


def test_mixing_numpy_and_cupy_raises(cp, rng):
    cupy = cp
    cfg, params, x = make_case(np, rng, **CONFIGS["k2_renorm"])
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        moe_forward(cupy.asarray(x), params, cfg)
    y, cache = moe_forward(x, params, cfg)
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        moe_backward(cupy.asarray(y), cache)


def test_init_params_same_values_on_every_backend_and_dtype(backend):
    cfg = MoEConfig(d_model=6, d_hidden=4, n_experts=3, top_k=2, n_shared=1)
    ref = init_params(cfg, np.random.default_rng(3), backend="numpy")
    got = init_params(cfg, np.random.default_rng(3), dtype=np.float32, backend=backend)
    assert set(got) == set(refmoe.param_shapes(cfg))
    for k in ref:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(host(got[k]), ref[k].astype(np.float32))
    with pytest.raises(ValueError, match="float16"):
        init_params(cfg, 0, dtype=np.float16, backend="numpy")
