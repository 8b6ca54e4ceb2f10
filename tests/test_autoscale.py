"""The released code's power-of-ten calibration of beta (L_o) and gamma (L_v), on cases with known answers."""
import math

import numpy as np
import pytest

from refmoe import MoEConfig, PRESETS, autoscale_weights, init_params, objective_forward_backward
from refmoe.autoscale import power_of_ten, router_ortho_reference, score_variance_reference
from refmoe.losses.ortho import ortho_loss_forward
from refmoe.losses.variance import var_loss_forward
from refmoe.ops import softmax_forward, topk_indices

from helpers import host, on
from torch_oracles import released_span_total


# ----------------------------------------------------------------------------------------------
# the rounding rule
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, reference, weight, exponent", [
    (1e-3, 1e-1, 1e-2, -2),
    (1e-4, 0.5, 1e-4, -4),            # log10(2e-4) = -3.70
    (1e-3, 0.125, 1e-2, -2),          # log10(8e-3) = -2.10
    (1e-3, 3e-3, 1.0, 0),             # log10(1/3)  = -0.48
    (1.0, 10 ** -2.5, 100.0, 2),      # exactly half: round half to even, 2.5 -> 2 (torch.round does the same)
    (1.0, 10 ** 1.5, 0.01, -2),       # -1.5 -> -2
    (1.0, 10 ** -0.5, 1.0, 0),        # 0.5 -> 0
    (0.0, 0.3, 0.0, None),            # a zero target switches the term off
])
def test_power_of_ten(target, reference, weight, exponent):
    w, e = power_of_ten(target, reference)
    assert e == exponent
    assert w == weight


@pytest.mark.parametrize("reference", [0.0, -1.0, float("inf"), float("nan")])
def test_power_of_ten_refuses_an_unusable_reference(reference):
    with pytest.raises(ValueError, match="reference"):
        power_of_ten(1e-3, reference)


# ----------------------------------------------------------------------------------------------
# the references
# ----------------------------------------------------------------------------------------------

def test_ortho_reference_hand_cases(xp):
    # E = 2, K = 1: w0 = (1, 0), the only other row w1 = (1, 1). u = w1 / (sqrt2 + eps);
    # the code sums ||<u, w0> u||^2 = <u, w0>^2 ||u||^2 = 2 / (sqrt2 + eps)^4  (1/2 at eps = 0)
    w = on(xp, np.array([[1.0, 0.0], [1.0, 1.0]]))
    eps = 1e-6
    assert router_ortho_reference(w, 1, eps=eps) == pytest.approx(2 / (math.sqrt(2) + eps) ** 4, rel=1e-14)
    # E = 3, K = 2, eps = 0: w0 on span{w1, w2} = span{(1,1,0), e3} has projection (1/2, 1/2, 0): 1/2;
    # w1 on span{e1, e3} has projection (1, 0, 0): 1. Mean over the K = 2 target rows: 3/4.
    w = on(xp, np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert router_ortho_reference(w, 2, eps=0.0) == pytest.approx(0.75, rel=1e-14)
    # only the first K rows are targets: K = 1 keeps the 1/2 of row 0
    assert router_ortho_reference(w, 1, eps=0.0) == pytest.approx(0.5, rel=1e-14)
    # parallel rows: the whole squared norm of the target is in the span
    w = on(xp, np.array([[1.0, 2.0, 2.0], [3.0, 6.0, 6.0]]))
    assert router_ortho_reference(w, 1, eps=0.0) == pytest.approx(9.0, rel=1e-14)
    # orthogonal rows: nothing
    assert router_ortho_reference(on(xp, np.eye(3)), 3) == 0.0


def test_ortho_reference_is_the_span_loss_on_the_router_rows(xp, rng):
    # with K = E every row is a target, which is exactly the span form of L_o on one "token" whose
    # K = E slots are the rows of W_r
    w = rng.standard_normal((4, 7))
    ref = router_ortho_reference(on(xp, w), 4)
    loss, _ = ortho_loss_forward(on(xp, w[None]), "span")
    assert ref == pytest.approx(float(loss), rel=1e-12)


def test_variance_reference_hand_case(xp):
    # D = 1, W_r = [[0], [1]]: logits (0, x). Token 1: x = log 3 -> P = (1/4, 3/4), unbiased variance
    # ((1/4)^2 + (1/4)^2) / (E - 1) = 1/8. Token 2: x = 0 -> uniform, variance 0. Mean 1/16.
    w = on(xp, np.array([[0.0], [1.0]]))
    x = on(xp, np.array([[math.log(3.0)], [0.0]]))
    assert score_variance_reference(x, w) == pytest.approx(1 / 16, rel=1e-14)
    assert score_variance_reference(x, w, valid_mask=on(xp, np.array([True, False]))) == pytest.approx(1 / 8)


def test_variance_reference_is_minus_the_code_form_of_lv(xp, rng):
    x = rng.standard_normal((9, 5))
    w = rng.standard_normal((6, 5))
    p, _ = softmax_forward(on(xp, x) @ on(xp, w).T)
    lv, _ = var_loss_forward(p, topk_indices(p, 2), "code")
    assert score_variance_reference(on(xp, x), on(xp, w)) == pytest.approx(-float(lv), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# the helper end to end
# ----------------------------------------------------------------------------------------------

def test_autoscale_weights_hand_case(xp):
    # D = 2, E = 2, K = 1, W_r = [[1, 0], [1, 1]]: R_o = 2 / (sqrt2 + 1e-6)^4 ~ 1/2 -> 1e-4 / 0.5 = 2e-4,
    # log10 = -3.70 -> beta = 1e-4. Tokens x = (0, log 3) give logits (0, log 3): R_v = 1/8 ->
    # 1e-3 / 0.125 = 8e-3, log10 = -2.10 -> gamma = 1e-2.
    cfg = MoEConfig(d_model=2, d_hidden=2, n_experts=2, top_k=1)
    params = {k: on(xp, v) for k, v in init_params(cfg, 0, backend="numpy").items()}
    params["w_router"] = on(xp, np.array([[1.0, 0.0], [1.0, 1.0]]))
    x = on(xp, np.array([[0.0, math.log(3.0)]] * 3))
    rep = autoscale_weights(x, params, cfg)
    assert rep.ortho_reference == pytest.approx(0.5, rel=1e-5)
    assert rep.var_reference == pytest.approx(0.125, rel=1e-14)
    assert (rep.beta, rep.ortho_exponent, rep.gamma, rep.var_exponent) == (1e-4, -4, 1e-2, -2)
    assert (rep.ortho_target, rep.var_target) == (1e-4, 1e-3)
    assert rep.objective == PRESETS["authors_code"].replace(beta=1e-4, gamma=1e-2)
    # other targets, given explicitly, on the paper preset
    rep = autoscale_weights(x, params, cfg, "paper", ortho_target=1.0, var_target=0.0)
    assert (rep.beta, rep.gamma, rep.var_exponent) == (1.0, 0.0, None)
    assert rep.objective.aux_variant == "switch"


def test_autoscaled_objective_runs(xp):
    cfg = MoEConfig(d_model=6, d_hidden=4, n_experts=6, top_k=2, n_shared=1)
    rng = np.random.default_rng(1)
    params = {k: on(xp, v) for k, v in init_params(cfg, rng, backend="numpy").items()}
    x = on(xp, rng.standard_normal((8, 6)))
    rep = autoscale_weights(x, params, cfg)
    assert math.log10(rep.beta) == rep.ortho_exponent and math.log10(rep.gamma) == rep.var_exponent
    res = objective_forward_backward(x, params, cfg, None, rep.objective, batch_shape=(2, 4))
    assert float(res.losses["var"]) == pytest.approx(-rep.var_reference, rel=1e-12)


def test_autoscale_errors(xp):
    cfg = MoEConfig(d_model=3, d_hidden=2, n_experts=3, top_k=2)
    params = {k: on(xp, v) for k, v in init_params(cfg, 0, backend="numpy").items()}
    x = on(xp, np.ones((2, 3)))
    with pytest.raises(ValueError, match="no calibration targets"):
        autoscale_weights(x, params, cfg, "paper")
    with pytest.raises(ValueError, match="w_router"):
        autoscale_weights(x, {"w_router": params["w_router"][:2]}, cfg)
    with pytest.raises(ValueError, match="reference"):       # mutually orthogonal router rows: R_o = 0
        autoscale_weights(x, {**params, "w_router": on(xp, np.eye(3))}, cfg)


# ----------------------------------------------------------------------------------------------
# against the released computation, re-expressed in PyTorch (optional oracle)
# ----------------------------------------------------------------------------------------------

def test_matches_the_released_rule_in_torch(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install refmoe[oracle]")
    B, T, D, E, K = 2, 5, 16, 8, 3
    w = rng.standard_normal((E, D))
    h = rng.standard_normal((B, T, D))
    # the released computation: W_r tiled over the B sequences as a [B, E, D] "expert output" batch; the
    # span loss loops over the first K slots, Gram-Schmidt over all the other E - 1, divided by K * B
    wt = torch.tensor(w).unsqueeze(0).expand(B, -1, -1)
    total = released_span_total(torch, wt, K)
    r_o = total / (K * B)
    scores = torch.nn.functional.linear(torch.tensor(h).view(-1, D), torch.tensor(w)).softmax(dim=-1)
    r_v = torch.var(scores, dim=-1).mean()
    beta = 10 ** torch.round(torch.log10(1e-4 / r_o))
    gamma = 10 ** torch.round(torch.log10(1e-3 / r_v))

    cfg = MoEConfig(d_model=D, d_hidden=4, n_experts=E, top_k=K)
    params = init_params(cfg, 0)
    params["w_router"] = w
    rep = autoscale_weights(h.reshape(B * T, D), params, cfg)
    assert rep.ortho_reference == pytest.approx(float(r_o), rel=1e-12)
    assert rep.var_reference == pytest.approx(float(r_v), rel=1e-12)
    assert rep.beta == pytest.approx(float(beta), rel=1e-15)
    assert rep.gamma == pytest.approx(float(gamma), rel=1e-15)
