"""L_o and L_v composed with the layer: finite differences through moe_forward for the router, the expert
parameters and x, with the loss gradients injected by moe_backward(d_expert_out=...) / (d_scores=...)."""
import numpy as np
import pytest

from refmoe import MoEConfig, gradcheck, init_params, moe_backward, moe_forward
from refmoe.losses.ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward
from refmoe.losses.variance import VAR_VARIANTS, var_loss_backward, var_loss_forward

from helpers import assert_all_below, host, layer_fd_errors, on

CFG = MoEConfig(d_model=4, d_hidden=3, n_experts=4, top_k=2, n_shared=1)
N = 6
EXPERT_KEYS = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")


def _setup(xp, backend, seed=7, margin=2e-3):
    """float64 parameters and tokens whose top-k sets are clear of ties by ``margin`` in score."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        params = init_params(CFG, rng, np.float64, backend=backend)
        params["w_router"] = params["w_router"] * 3.0           # sharper routing: larger score gaps
        x = on(xp, rng.standard_normal((N, CFG.d_model)))
        _, cache = moe_forward(x, params, CFG)
        srt = np.sort(host(cache.scores), axis=1)[:, ::-1]
        if (srt[:, CFG.top_k - 1] - srt[:, CFG.top_k]).min() > margin:
            return params, x
    raise AssertionError("no tie-free routing found")


def _fd_errors(params, x, loss_of_cache, grads):
    return layer_fd_errors(CFG, params, x, lambda y, cache: loss_of_cache(cache), grads)


@pytest.mark.parametrize("variant", ORTHO_VARIANTS)
def test_ortho_through_layer(xp, backend, variant):
    params, x = _setup(xp, backend)
    mask = on(xp, np.array([True, True, False, True, True, True])) if variant == "span" else None

    def loss_of_cache(c):
        return ortho_loss_forward(c.expert_out, variant, topk_idx=c.topk_idx, valid_mask=mask)[0]

    _, cache = moe_forward(x, params, CFG)
    loss, ocache = ortho_loss_forward(cache.expert_out, variant, topk_idx=cache.topk_idx, valid_mask=mask)
    grads = moe_backward(None, cache, d_expert_out=ortho_loss_backward(1.0, ocache))
    # L_o does not reach the router of its own layer (only through the hard top-k choice)
    assert float(abs(grads["w_router"]).max()) == 0.0
    assert float(abs(grads["shared_w_gate"]).max()) == 0.0
    errors = _fd_errors(params, x, loss_of_cache, grads)
    assert_all_below(errors, 1e-6 if variant.startswith("span") else 1e-7)   # measured ~1e-9 .. 1e-10


@pytest.mark.parametrize("variant", VAR_VARIANTS)
def test_variance_through_layer(xp, backend, variant):
    params, x = _setup(xp, backend)
    mask = on(xp, np.array([True, False, True, True, True, False])) if variant == "paper" else None

    def loss_of_cache(c):
        return var_loss_forward(c.scores, c.topk_idx, variant, valid_mask=mask)[0]

    _, cache = moe_forward(x, params, CFG)
    loss, vcache = var_loss_forward(cache.scores, cache.topk_idx, variant, valid_mask=mask)
    grads = moe_backward(None, cache, d_scores=var_loss_backward(1.0, vcache))
    # L_v gives nothing to the expert parameters of its own layer; it reaches the router and x
    for key in EXPERT_KEYS:
        assert float(abs(grads[key]).max()) == 0.0, key
    assert float(abs(grads["w_router"]).max()) > 1e-6 and float(abs(grads["x"]).max()) > 1e-6
    errors = _fd_errors(params, x, loss_of_cache, grads)
    assert_all_below(errors, 1e-7)                              # measured ~1e-10


def test_injected_gradients_add_to_task_gradient(rng):
    # moe_backward is linear in its upstream gradients: dy and the two loss gradients superpose
    params, x = _setup(np, "numpy")
    _, cache = moe_forward(x, params, CFG)
    dy = rng.standard_normal(x.shape)
    _, oc = ortho_loss_forward(cache.expert_out, "pairwise")
    _, vc = var_loss_forward(cache.scores, cache.topk_idx, "paper")
    d_eo, d_sc = ortho_loss_backward(1e-3, oc), var_loss_backward(1e-3, vc)
    both = moe_backward(dy, cache, d_scores=d_sc, d_expert_out=d_eo)
    parts = [moe_backward(dy, cache), moe_backward(None, cache, d_expert_out=d_eo),
             moe_backward(None, cache, d_scores=d_sc)]
    for key in both:
        assert gradcheck.rel_error(both[key], sum(p[key] for p in parts)) < 1e-14, key
