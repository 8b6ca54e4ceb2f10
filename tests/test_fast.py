"""Every fast path against the reading path it replaces: float64 to 1e-12 relative or better, float32 at the
tolerance written beside each assertion.

Fast paths: the one-pass sigmoid (``ops.sigmoid``) against the two-branch ``ops._sigmoid``; the SwiGLU pair
with the in-place elementwise backward against the textbook formulas; the batched SwiGLU over an [E, C, D]
stack against one call per expert; ``refmoe.fast`` (padded expert batching) against the core layer, alone
and inside the objective; the layer on both paths against float64 central differences; and
``refmoe.fast.ortho_gram`` against ``refmoe.losses.ortho``.
"""
import numpy as np
import pytest

import refmoe.fast as fast
from refmoe import MoEConfig, array_namespace, init_params, moe_backward, moe_forward, objective_forward_backward, ops
from refmoe.fast.experts import padded_slots
from refmoe.gradcheck import rel_error

from helpers import assert_all_below, host, layer_fd_errors, on


def _plain_swiglu(x, wg, wu, wd, dout):
    """The textbook SwiGLU forward and backward (the reading reference)."""
    xp = array_namespace(x)
    a, b = x @ wg, x @ wu
    sig = ops._sigmoid(xp, a)
    h = a * sig * b
    dh = dout @ wd.T
    db = dh * (a * sig)
    da = dh * b * (sig * (1 + a * (1 - sig)))
    return h @ wd, (da @ wg.T + db @ wu.T, x.T @ da, x.T @ db, h.T @ dout)


# ----------------------------------------------------------------------------------------------
# elementwise pieces
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_matches_two_branch_form(xp, dtype):
    a = np.concatenate([np.linspace(-800, 800, 4001), [-1e30, -88.7, 0.0, 88.7, 1e30]]).astype(dtype)
    fast, plain = ops.sigmoid(on(xp, a)), ops._sigmoid(xp, on(xp, a))
    assert fast.dtype == dtype
    # measured 0 (float64) and ~6e-8 (float32, one rounding); pass mark 4 ulp of the dtype
    assert rel_error(fast, plain) < 4 * np.finfo(dtype).eps
    assert bool(xp.isfinite(fast).all())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swiglu_pair_matches_textbook_formulas(xp, rng, dtype):
    M, D, H = 23, 12, 9
    x, dout = (on(xp, rng.standard_normal((M, D)).astype(dtype)) for _ in range(2))
    wg, wu = (on(xp, rng.standard_normal((D, H)).astype(dtype)) for _ in range(2))
    wd = on(xp, rng.standard_normal((H, D)).astype(dtype))
    out, cache = ops.swiglu_forward(x, wg, wu, wd)
    grads = ops.swiglu_backward(dout, cache)
    ref_out, ref_grads = _plain_swiglu(x, wg, wu, wd, dout)
    tol = 1e-12 if dtype == np.float64 else 1e-5      # measured ~1e-16 / ~1e-7
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_error(out, ref_out) < tol
    for g, r in zip(grads, ref_grads):
        assert rel_error(g, r) < tol


def test_swiglu_batched_matches_one_call_per_expert(xp, rng):
    E, C, D, H = 4, 7, 10, 6
    x, dout = (on(xp, rng.standard_normal((E, C, D))) for _ in range(2))
    wg, wu = (on(xp, rng.standard_normal((E, D, H))) for _ in range(2))
    wd = on(xp, rng.standard_normal((E, H, D)))
    out, cache = ops.swiglu_forward(x, wg, wu, wd)
    grads = ops.swiglu_backward(dout, cache)
    for e in range(E):
        out_e, cache_e = ops.swiglu_forward(x[e], wg[e], wu[e], wd[e])
        grads_e = ops.swiglu_backward(dout[e], cache_e)
        assert rel_error(out[e], out_e) < 1e-14       # measured 0
        for g, ge in zip(grads, grads_e):
            assert rel_error(g[e], ge) < 1e-14


# ----------------------------------------------------------------------------------------------
# the layer: padded expert batching against the per-expert loop
# ----------------------------------------------------------------------------------------------

CONFIGS = [MoEConfig(16, 8, 6, 2, n_shared=1), MoEConfig(12, 5, 5, 3, norm_topk_prob=False)]


def _layer_inputs(xp, rng, cfg, dtype, N=29):
    params = init_params(cfg, rng, dtype=dtype, backend="numpy" if xp is np else "cupy")
    x, dy = (on(xp, rng.standard_normal((N, cfg.d_model)).astype(dtype)) for _ in range(2))
    d_eo = on(xp, rng.standard_normal((N, cfg.top_k, cfg.d_model)).astype(dtype))
    d_sc = on(xp, rng.standard_normal((N, cfg.n_experts)).astype(dtype))
    return params, x, dy, d_eo, d_sc


FORWARDS = {"core": moe_forward, "fast": fast.moe_forward}


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_layer_equals_core(xp, rng, cfg, dtype):
    params, x, dy, d_eo, d_sc = _layer_inputs(xp, rng, cfg, dtype)
    results = {}
    for name, forward in FORWARDS.items():
        y, cache = forward(x, params, cfg)
        grads = moe_backward(dy, cache, d_scores=d_sc, d_expert_out=d_eo)
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads.values())
        results[name] = (y, cache.expert_out, grads)
    assert isinstance(results["fast"][0], type(x))
    tol = 1e-13 if dtype == np.float64 else 1e-6      # measured 0 (the same products, zero rows added)
    (y0, eo0, g0), (y1, eo1, g1) = results["core"], results["fast"]
    assert rel_error(y0, y1) < tol and rel_error(eo0, eo1) < tol
    assert set(g0) == set(g1)
    for k in g0:
        assert rel_error(g0[k], g1[k]) < tol, k


def test_fast_layer_pads_when_cheap_and_loops_otherwise(xp, rng):
    cfg = MoEConfig(8, 4, 6, 3)
    params, x, _, _, _ = _layer_inputs(xp, rng, cfg, np.float64, N=12)
    balanced = on(xp, (np.arange(12 * 3).reshape(12, 3) % 6).astype(np.int64))   # every count 6: no padding
    _, c = fast.experts.experts_forward(x, params["w_gate"], params["w_up"], params["w_down"], balanced)
    assert isinstance(c, fast.experts.PaddedCache) and c.capacity == 6
    skewed = on(xp, np.tile(np.array([0, 1, 2]), (12, 1)).astype(np.int64))      # C = 12 rows for 3 experts
    _, c = fast.experts.experts_forward(x, params["w_gate"], params["w_up"], params["w_down"], skewed)
    assert not isinstance(c, fast.experts.PaddedCache)                            # 2x padding: the loop ran


def test_fast_layer_with_an_idle_expert(xp, rng):
    cfg = MoEConfig(8, 4, 5, 2)
    params, x, dy, _, _ = _layer_inputs(xp, rng, cfg, np.float64, N=13)
    params["w_router"][3] = -50.0 * abs(params["w_router"][3])     # expert 3 scores ~0 for every token
    x = abs(x)
    y0, c0 = moe_forward(x, params, cfg)
    y1, c1 = fast.moe_forward(x, params, cfg)
    assert not bool((c0.topk_idx == 3).any())
    g0, g1 = moe_backward(dy, c0), moe_backward(dy, c1)
    assert rel_error(y0, y1) < 1e-13
    for k in g0:
        assert rel_error(g0[k], g1[k]) < 1e-13
    assert float(abs(g1["w_gate"][3]).max()) == 0.0               # no tokens, no gradient


def test_padded_slots(xp, rng):
    idx = on(xp, np.stack([rng.permutation(6)[:3] for _ in range(11)]).astype(np.int64))
    slot, C = padded_slots(idx, 6)
    counts = np.bincount(host(idx).ravel(), minlength=6)
    assert C == counts.max()
    slot = host(slot)
    assert len(set(slot.tolist())) == slot.size                    # distinct rows
    assert ((slot // C) == host(idx).ravel()).all()                # row block = the expert


@pytest.mark.parametrize("preset", ["paper", "authors_code"])
def test_objective_on_the_fast_path_equals_core(xp, rng, preset):
    from refmoe import autoscale_weights
    cfg = MoEConfig(8, 5, 4, 2, n_shared=1)
    params, x, dy, _, _ = _layer_inputs(xp, rng, cfg, np.float64, N=16)
    obj = autoscale_weights(x, params, cfg, preset).objective if preset == "authors_code" else preset
    r0 = objective_forward_backward(x, params, cfg, dy, obj)
    r1 = objective_forward_backward(x, params, cfg, dy, obj, forward=fast.moe_forward)
    for term in r0.losses:
        if r0.losses[term] is not None:
            assert rel_error(r0.losses[term], r1.losses[term]) < 1e-12, term     # measured 0
    for term in r0.grads:
        for k in r0.grads[term]:
            assert rel_error(r0.grads[term][k], r1.grads[term][k]) < 1e-12, (term, k)


# ----------------------------------------------------------------------------------------------
# whole layer against central differences, both paths (float64)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(FORWARDS))
def test_layer_finite_differences_both_paths(xp, rng, path):
    cfg = MoEConfig(6, 4, 4, 2, n_shared=1)
    params, x, dy, d_eo, d_sc = _layer_inputs(xp, rng, cfg, np.float64, N=8)
    forward = FORWARDS[path]

    def phi(y, cache):
        # the injected gradients enter as <d_sc, scores> + <d_eo, expert_out>
        return (y * dy).sum() + (cache.scores * d_sc).sum() + (cache.expert_out * d_eo).sum()

    y, cache = forward(x, params, cfg)
    grads = moe_backward(dy, cache, d_scores=d_sc, d_expert_out=d_eo)
    errors = layer_fd_errors(cfg, params, x, phi, grads, forward=forward)
    assert_all_below(errors)                                        # measured ~1e-10; pass mark 1e-7


# ----------------------------------------------------------------------------------------------
# the Gram / Cholesky form of L_o (refmoe.fast.ortho_gram) against refmoe.losses.ortho
# ----------------------------------------------------------------------------------------------

def _proposed_ortho():
    return fast.ortho_gram


@pytest.mark.parametrize("variant", ["pairwise", "span", "span_code_grouping"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_proposed_ortho_equals_refmoe_ortho(xp, rng, variant, masked, dtype):
    from refmoe.losses import ortho
    po = _proposed_ortho()
    N, K, D, E = 9, 4, 11, 7
    A = on(xp, rng.standard_normal((N, K, D)).astype(dtype))
    idx = on(xp, np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64))
    mask = on(xp, rng.random(N) > 0.3) if masked else None
    l0, c0 = ortho.ortho_loss_forward(A, variant, topk_idx=idx, valid_mask=mask)
    l1, c1 = po.ortho_loss_forward(A, variant, topk_idx=idx, valid_mask=mask)
    d0, d1 = ortho.ortho_loss_backward(0.7, c0), po.ortho_loss_backward(0.7, c1)
    assert l1.dtype == dtype and d1.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5          # measured ~5e-16 / ~3e-7
    assert rel_error(l0, l1) < tol and rel_error(d0, d1) < tol


def test_proposed_span_falls_back_on_dependent_slots(xp, rng):
    from refmoe.losses import ortho
    po = _proposed_ortho()
    A = rng.standard_normal((5, 3, 8))
    A[:, 2] = A[:, 1]                                     # G singular: no Cholesky factor
    A = on(xp, A)
    l1, c1 = po.ortho_loss_forward(A, "span")
    l0, c0 = ortho.ortho_loss_forward(A, "span")
    assert c1[4] is None                                  # the Gram-Schmidt on A ran
    assert rel_error(l0, l1) < 1e-14
    assert rel_error(ortho.ortho_loss_backward(1.0, c0), po.ortho_loss_backward(1.0, c1)) < 1e-14


def test_proposed_ortho_single_slot_is_zero(xp, rng):
    po = _proposed_ortho()
    A = on(xp, rng.standard_normal((5, 1, 8)))
    for variant in ("pairwise", "span"):
        loss, cache = po.ortho_loss_forward(A, variant)
        assert float(loss) == 0.0
        assert float(abs(po.ortho_loss_backward(1.0, cache)).max()) == 0.0
