"""The gradient-check toolkit must catch wrong gradients and refuse checks across a routing flip."""
import numpy as np
import pytest

from refmoe import MoEConfig, gradcheck as gc, init_params, moe_backward, moe_forward

from helpers import FD_TOL, on


def test_rel_error_floor_and_shape():
    assert gc.rel_error(np.zeros(3), np.full(3, 1e-12)) == pytest.approx(1e-4)  # floored at 1e-8
    assert gc.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 3e-9])) == pytest.approx(3e-9 / 4, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        gc.rel_error(np.zeros(2), np.zeros(3))


def test_numerical_vjp_of_known_function(xp, rng):
    a = on(xp, rng.standard_normal((3, 4)))
    dout = on(xp, rng.standard_normal((3, 4)))
    num = gc.numerical_vjp(lambda p: p["a"] ** 3, {"a": a}, dout)["a"]
    assert gc.rel_error(num, 3 * a ** 2 * dout) < 1e-9  # measured ~1e-11
    assert float(abs(num - 3 * a ** 2 * dout).max()) < 1e-8


def test_check_catches_a_wrong_gradient(rng):
    a = rng.standard_normal(5)
    err = gc.check_vjp(lambda p: float((p["a"] ** 2).sum()), {"a": a}, {"a": 1.001 * 2.0 * a})["a"]
    assert err > 100 * FD_TOL  # about 5e-4: a 0.1% error is caught by far


def test_inputs_are_restored_exactly(rng):
    a = rng.standard_normal((2, 3))
    keep = a.copy()
    gc.numerical_vjp(lambda p: float(np.sin(p["a"]).sum()), {"a": a})
    assert (a == keep).all()


def test_float32_inputs_are_refused(rng):
    with pytest.raises(TypeError, match="float64"):
        gc.numerical_vjp(lambda p: float(p["a"].sum()), {"a": rng.standard_normal(3).astype(np.float32)})


def test_directional_check(xp, rng):
    a, b = on(xp, rng.standard_normal((4, 3))), on(xp, rng.standard_normal(3))

    def f(p):
        return float(((p["a"] @ p["b"]) ** 2).sum())

    good = {"a": 2 * (a @ b)[:, None] * b[None, :], "b": 2 * a.T @ (a @ b)}
    assert gc.directional_check(f, {"a": a, "b": b}, good, rng) < 1e-8  # measured ~1e-11
    bad = {"a": good["a"], "b": 1.1 * good["b"]}
    assert gc.directional_check(f, {"a": a, "b": b}, bad, rng) > 1e-3


@pytest.mark.parametrize("wrong", [None, "w_up", "w_router", "x"])
def test_directional_check_survives_a_direction_that_cancels_the_gradient(wrong):
    # a 2-token layer where a random direction nearly cancels the gradient (found by tests/test_fuzz.py):
    # measured against <grad, v> alone the correct gradient read 4.3e-4; against the typical directional
    # derivative it reads 1.1e-9, and a gradient 0.1% off in one block still reads 1.1e-4 to 4.0e-4
    cfg = MoEConfig(d_model=6, d_hidden=5, n_experts=4, top_k=2, n_shared=2, norm_topk_prob=True)
    rng = np.random.default_rng(1695753949)
    params = init_params(cfg, rng, backend="numpy")
    x = rng.standard_normal((2, 6))
    y, cache = moe_forward(x, params, cfg)
    dy = rng.standard_normal(y.shape)
    grads = moe_backward(dy, cache)
    if wrong is not None:
        grads = {**grads, wrong: 1.001 * grads[wrong]}

    def f(p):
        return moe_forward(p["x"], {k: p[k] for k in params}, cfg)[0]

    def guard(p):
        return moe_forward(p["x"], {k: p[k] for k in params}, cfg)[1].topk_idx

    err = gc.directional_check(f, {"x": x, **params}, grads, rng, dout=dy, guard=guard, n_directions=2)
    if wrong is None:
        assert err < 1e-7
    else:
        assert err > 5e-5


def test_guard_refuses_a_routing_flip(rng):
    """Put two router logits within h of each other: the check must refuse to run."""
    cfg = MoEConfig(d_model=2, d_hidden=2, n_experts=2, top_k=1)
    params = init_params(cfg, rng, backend="numpy")
    params["w_router"] = np.array([[1.0, 0.0], [1.0, 1e-7]])  # expert scores differ by 1e-7 * x[1]
    x = np.array([[1.0, 1.0]])

    def f(p):
        return float(moe_forward(p["x"], {**params, "w_router": p["w_router"]}, cfg)[0].sum())

    def guard(p):
        return moe_forward(p["x"], {**params, "w_router": p["w_router"]}, cfg)[1].topk_idx

    with pytest.raises(gc.RoutingChanged, match="routing changed"):
        gc.numerical_vjp(f, {"x": x, "w_router": params["w_router"]}, guard=guard)


def test_directional_check_on_the_layer(rng):
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=5, top_k=2, n_shared=1)
    params = init_params(cfg, rng, backend="numpy")
    x = rng.standard_normal((32, 8))
    y, cache = moe_forward(x, params, cfg)
    dy = rng.standard_normal(y.shape)
    grads = moe_backward(dy, cache)

    def f(p):
        return moe_forward(p["x"], {k: p[k] for k in params}, cfg)[0]

    def guard(p):
        return moe_forward(p["x"], {k: p[k] for k in params}, cfg)[1].topk_idx

    err = gc.directional_check(f, {"x": x, **params}, grads, rng, dout=dy, guard=guard)
    assert err < FD_TOL  # measured ~1e-10
