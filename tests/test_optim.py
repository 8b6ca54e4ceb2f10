"""The hand-written Adam / AdamW: a first step worked out by hand, and torch.optim as an oracle."""
import numpy as np
import pytest

from refmoe.study.optim import AdamConfig, adam_init, adam_step, adam_step_inplace

from helpers import host, on


def test_first_step_is_lr_times_sign(xp, rng):
    # t = 1: m_hat = g and v_hat = g^2 exactly, so the step is lr * g / (|g| + eps)
    w = {"a": on(xp, rng.standard_normal((3, 4))), "b": on(xp, rng.standard_normal(5))}
    g = {"a": on(xp, rng.standard_normal((3, 4))), "b": on(xp, rng.standard_normal(5))}
    cfg = AdamConfig(lr=0.1, eps=1e-8)
    new, state = adam_step(w, g, adam_init(w), cfg)
    for k in w:
        gk = host(g[k])
        assert np.allclose(host(new[k]), host(w[k]) - 0.1 * gk / (np.abs(gk) + 1e-8), rtol=0, atol=1e-14)
    assert state.t == 1


def test_inputs_not_modified_and_dtype_kept(xp, rng):
    w = {"a": on(xp, rng.standard_normal(4).astype(np.float32))}
    g = {"a": on(xp, rng.standard_normal(4).astype(np.float32)), "x": on(xp, np.zeros(2, np.float32))}
    before = host(w["a"]).copy()
    new, state = adam_step(w, g, adam_init(w), AdamConfig(lr=1e-2, weight_decay=0.1))
    assert np.array_equal(host(w["a"]), before)          # pure update
    assert new["a"].dtype == np.float32 and state.m["a"].dtype == np.float32 and state.v["a"].dtype == np.float32


@pytest.mark.parametrize("decoupled,wd", [(True, 0.0), (True, 0.05), (False, 0.05)])
def test_matches_torch(decoupled, wd, rng):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install refmoe[oracle]")
    w0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(6)]
    cfg = AdamConfig(lr=0.03, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=wd, decoupled=decoupled)
    params, state = {"w": w0.copy()}, adam_init({"w": w0})
    for g in grads:
        params, state = adam_step(params, {"w": g}, state, cfg)
    tw = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    Opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = Opt([tw], lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for g in grads:
        tw.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    # measured ~1e-16; pass mark 1e-12
    assert np.abs(params["w"] - tw.detach().numpy()).max() < 1e-12


def test_bad_config_and_grads():
    w = {"a": np.zeros(3)}
    with pytest.raises(ValueError, match="beta1"):
        adam_step(w, {"a": np.ones(3)}, adam_init(w), AdamConfig(beta1=1.0))
    with pytest.raises(ValueError, match="lack"):
        adam_step(w, {}, adam_init(w))
    with pytest.raises(ValueError, match="parameter is"):
        adam_step(w, {"a": np.ones(4)}, adam_init(w))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decoupled,wd", [(True, 0.0), (True, 0.05), (False, 0.05)])
def test_inplace_equals_the_pure_step_bit_for_bit(xp, rng, dtype, decoupled, wd):
    """Eight steps of each: the same arrays come out, to the last bit (on CuPy: the fused kernel against the
    array form; on NumPy the in-place form is the array form copied in)."""
    cfg = AdamConfig(lr=0.03, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=wd, decoupled=decoupled)
    shapes = {"a": (33, 7), "b": (5,)}
    w0 = {k: on(xp, rng.standard_normal(s).astype(dtype)) for k, s in shapes.items()}
    grads = [{k: on(xp, rng.standard_normal(s).astype(dtype)) for k, s in shapes.items()} for _ in range(8)]
    pure, s_pure = dict(w0), adam_init(w0)
    inplace = {k: v.copy() for k, v in w0.items()}
    s_in = adam_init(inplace)
    held = {k: v for k, v in inplace.items()}
    for g in grads:
        pure, s_pure = adam_step(pure, g, s_pure, cfg)
        s_in = adam_step_inplace(inplace, g, s_in, cfg)
    assert s_in.t == s_pure.t == 8
    for k in shapes:
        assert inplace[k] is held[k]                                          # written where it was
        for got, want in ((inplace[k], pure[k]), (s_in.m[k], s_pure.m[k]), (s_in.v[k], s_pure.v[k])):
            assert got.dtype == dtype and np.array_equal(host(got), host(want)), k
    with pytest.raises(ValueError, match="parameter is"):
        adam_step_inplace(inplace, {"a": grads[0]["b"], "b": grads[0]["b"]}, s_in, cfg)
