"""``refmoe.fast.objective_step`` and ``GraphedStep`` against ``refmoe.objective_forward_backward(per_term=False)``:
float64 to 1e-12 relative, float32 at the tolerance beside each assertion, both presets, both layouts, masks,
the released grouping, the fallbacks; the fast layer's backward against float64 central differences.
"""
import numpy as np
import pytest

import refmoe
import refmoe.fast as fast
from refmoe import MoEConfig, autoscale_weights, gradcheck, init_params, objective_forward_backward
from refmoe.fast import layer as fl
from refmoe.gradcheck import rel_error

from helpers import graphed_mode, host, on, routing_key

CONFIGS = [MoEConfig(16, 8, 6, 2, n_shared=1), MoEConfig(12, 5, 5, 3, norm_topk_prob=False),
           MoEConfig(10, 6, 8, 4, routed_scaling_factor=2.5, n_shared=2)]


def _inputs(xp, rng, cfg, dtype=np.float64, N=29):
    params = init_params(cfg, rng, dtype=dtype, backend="numpy" if xp is np else "cupy")
    x, dy = (on(xp, rng.standard_normal((N, cfg.d_model)).astype(dtype)) for _ in range(2))
    return params, x, dy


def _objective(preset, x, params, cfg):
    if preset == "authors_code":
        return autoscale_weights(x, params, cfg, preset).objective
    return refmoe.PRESETS[preset].replace(beta=0.1)          # a large L_o share: its gradient shows


def _assert_equal(r0, r1, tol):
    for k in ("aux", "ortho", "var", "regularisers", "total"):
        assert rel_error(r0.losses[k], r1.losses[k]) <= tol, k
    assert rel_error(r0.y, r1.y) <= tol
    g0, g1 = r0.grads["total"], r1.grads["total"]
    assert set(g0) == set(g1)
    for k in g0:
        assert g1[k].dtype == g0[k].dtype and rel_error(g0[k], g1[k]) <= tol, k


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("preset", ["paper", "authors_code"])
@pytest.mark.parametrize("layout", ["sorted", "padded"])
def test_step_equals_core(xp, rng, cfg, preset, layout):
    params, x, dy = _inputs(xp, rng, cfg)
    obj = _objective(preset, x, params, cfg)
    r0 = objective_forward_backward(x, params, cfg, dy, obj, per_term=False, batch_shape=(1, 29))
    r1 = fast.objective_step(x, params, cfg, obj, dy, batch_shape=(1, 29), layout=layout, check=False)
    assert bool(refmoe.to_numpy(r1.losses["status"]).all())          # the fast numbers themselves
    _assert_equal(r0, r1, 1e-12)                                       # measured ~2e-16


@pytest.mark.parametrize("preset", ["paper", "authors_code"])
def test_step_float32_equals_core(xp, rng, preset):
    cfg = CONFIGS[0]
    params, x, dy = _inputs(xp, rng, cfg, np.float32)
    obj = _objective(preset, x, params, cfg)
    r0 = objective_forward_backward(x, params, cfg, dy, obj, per_term=False)
    r1 = fast.objective_step(x, params, cfg, obj, dy)
    _assert_equal(r0, r1, 1e-5)                                        # measured ~3e-7
    assert r1.y.dtype == np.float32 and r1.losses["total"].dtype == np.float32


@pytest.mark.parametrize("obj", [
    refmoe.PRESETS["paper"],
    refmoe.PRESETS["paper"].replace(aux_variant="paper_eq2", var_variant="row_topk", ortho_variant="span"),
    refmoe.PRESETS["paper"].replace(aux_variant="gshard_first_choice", var_variant="code"),
    refmoe.PRESETS["authors_code"].replace(beta=0.2, gamma=0.01, padding="exclude"),
    refmoe.PRESETS["authors_code"].replace(beta=0.2, gamma=0.01, ortho_released_grouping=True)])
def test_step_forms_and_masks_equal_core(xp, rng, obj):
    cfg = CONFIGS[1]
    params, x, dy = _inputs(xp, rng, cfg, N=24)
    mask = on(xp, rng.random(24) > 0.3)
    for valid_mask in (None, mask):
        r0 = objective_forward_backward(x, params, cfg, dy, obj, per_term=False, valid_mask=valid_mask,
                                        batch_shape=(2, 12))
        r1 = fast.objective_step(x, params, cfg, obj, dy, valid_mask=valid_mask, batch_shape=(2, 12))
        _assert_equal(r0, r1, 1e-12)


def test_step_falls_back_where_the_fast_forms_do_not_apply(xp, rng):
    cfg = CONFIGS[0]
    params, x, dy = _inputs(xp, rng, cfg, np.float32)
    obj = refmoe.PRESETS["paper"]
    r1 = fast.objective_step(1e6 * x, params, cfg, obj, dy, check=False)   # outputs ~1e6: outside PLAIN_RANGE
    assert not bool(refmoe.to_numpy(r1.losses["status"]).all())
    r0 = objective_forward_backward(1e6 * x, params, cfg, dy, obj, per_term=False)
    _assert_equal(r0, fast.objective_step(1e6 * x, params, cfg, obj, dy), 0.0)   # the core's numbers exactly
    sig = MoEConfig(16, 8, 6, 2, score_function="sigmoid")
    p2, x2, dy2 = _inputs(xp, rng, sig)
    assert fl.unsupported(sig) is not None
    _assert_equal(objective_forward_backward(x2, p2, sig, dy2, obj, per_term=False),
                  fast.objective_step(x2, p2, sig, obj, dy2), 0.0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="contains NaN or inf"):      # the core's message
        fast.objective_step(bad, params, cfg, obj, dy)
    with pytest.raises(ValueError, match="dy has shape"):
        fast.objective_step(x, params, cfg, obj, dy[:3])


def test_step_capacity_and_cache(xp, rng):
    cfg = CONFIGS[0]
    params, x, dy = _inputs(xp, rng, cfg)
    obj = refmoe.PRESETS["paper"]
    r0 = fast.objective_step(x, params, cfg, obj, dy)
    r1 = fast.objective_step(x, params, cfg, obj, dy, layout="padded", capacity=40, keep_cache=False)
    assert r1.cache is None and r0.cache.expert_out.shape == (29, 2, 16)
    _assert_equal(r0, r1, 1e-13)                                       # zero rows added: measured 0
    r2 = fast.objective_step(x, params, cfg, obj, dy, layout="padded", capacity=2, check=False)
    assert not bool(refmoe.to_numpy(r2.losses["status"])[fast.STATUS.index("capacity_fits")])
    _assert_equal(r0, fast.objective_step(x, params, cfg, obj, dy, layout="padded", capacity=2), 1e-12)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
def test_fast_layer_finite_differences(xp, rng, layout):
    cfg = MoEConfig(6, 4, 4, 2, n_shared=1, routed_scaling_factor=1.5)
    params, x, dy = _inputs(xp, rng, cfg, N=8)
    d_sc = on(xp, rng.standard_normal((8, 4)))
    d_eo = on(xp, rng.standard_normal((8, 2, 6)))

    def run(inp):
        return fl.layer_forward(inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg, layout=layout)

    def phi(inp):
        y, eo, tape = run(inp)
        return (y * dy).sum() + (tape.scores * d_sc).sum() + (eo * d_eo).sum()

    y, eo, tape = run(dict(params, x=x))
    grads = fl.layer_backward(dy, tape, d_scores=d_sc, d_expert_out=d_eo)
    errors = gradcheck.check_vjp(phi, dict(params, x=x), grads, guard=lambda inp: run(inp)[2].topk_idx)
    assert max(errors.values()) < 1e-7, errors                         # measured ~1e-10


def test_step_finite_differences_of_the_total(xp, rng):
    cfg = MoEConfig(6, 4, 4, 2, n_shared=1)
    params, x, dy = _inputs(xp, rng, cfg, N=8)
    for obj in (refmoe.PRESETS["paper"].replace(beta=0.3, alpha=0.2, gamma=0.4),
                refmoe.PRESETS["authors_code"].replace(beta=0.3, gamma=0.4)):
        r = fast.objective_step(x, params, cfg, obj, dy, check=False)

        def phi(inp, obj=obj):
            rr = fast.objective_step(inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg, obj, dy)
            return (rr.y * dy).sum() + rr.losses["regularisers"]

        guard = lambda inp: routing_key(fast.objective_step(                 # noqa: E731
            inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg, obj, dy).cache)
        errors = gradcheck.check_vjp(phi, dict(params, x=x), r.grads["total"], guard=guard)
        assert max(errors.values()) < 1e-7, errors                     # measured ~1e-9


def test_graphed_step_equals_the_eager_step(xp, rng):
    cfg = CONFIGS[0]
    params, x, dy = _inputs(xp, rng, cfg, np.float32, N=64)
    obj = refmoe.PRESETS["authors_code"].replace(beta=0.1, gamma=0.01)
    step = fast.GraphedStep(x, params, cfg, obj, dy, batch_shape=(2, 32))
    if xp is np:
        assert step.mode == "eager" and "CuPy" in step.reason
    else:                                      # the products go through refmoe.fast.blas: capturable
        assert step.mode == graphed_mode(xp), step.reason
    for scale in (1.0, 0.5, 3.0):                                      # new inputs into the same graph
        x2 = (scale * x).astype(np.float32)
        r0 = fast.objective_step(x2, params, cfg, obj, dy, batch_shape=(2, 32))
        r1 = step(x=x2)
        _assert_equal(r0, r1, 1e-5)                                    # float32: measured ~1e-7 (CuPy: 0)
    skewed = x.copy()
    skewed[:] = x[0]                                                   # every token to the same experts
    r0 = fast.objective_step(skewed, params, cfg, obj, dy, batch_shape=(2, 32))
    _assert_equal(r0, step(x=skewed), 1e-5)                            # C too small: redone eagerly
    if step.mode == "graph":
        assert step.captures == 2 and step.capacity >= 64


def _residual_mse(x, target, calls=None):
    """The study's task: L_h = mse(x + y, target), dy = dL_h/dy (a function of y)."""
    from refmoe.losses.task import mse_backward, mse_forward

    def task(y):
        if calls is not None:
            calls.append(y)
        l_h, r = mse_forward(x + y, target)
        return l_h, mse_backward(1.0, r)
    return task


def _core_task_step(x, params, cfg, obj, task):
    y, ocache = refmoe.objective_forward(x, params, cfg, obj)
    l_h, dy = task(y)
    return refmoe.objective_backward(dy, ocache, task_loss=l_h, per_term=False)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("layout", ["sorted", "padded"])
def test_step_with_a_task_function_equals_core(xp, rng, dtype, tol, layout):
    cfg = CONFIGS[0]
    params, x, target = _inputs(xp, rng, cfg, dtype)
    obj = refmoe.PRESETS["paper"].replace(beta=0.1, gamma=0.05)
    calls = []
    r0 = _core_task_step(x, params, cfg, obj, _residual_mse(x, target))
    r1 = fast.objective_step(x, params, cfg, obj, _residual_mse(x, target, calls), layout=layout, capacity=29)
    assert len(calls) == 1 and calls[0] is r1.y                        # called once, on the fast y
    _assert_equal(r0, r1, tol)                                         # float64 measured ~2e-16, float32 ~2e-7
    assert rel_error(r0.losses["task"], r1.losses["task"]) <= tol
    assert r1.losses["task"].dtype == dtype
    t, _ = _residual_mse(x, target)(r1.y)
    assert rel_error(r1.losses["total"], t + r1.losses["regularisers"]) <= tol


def test_step_with_a_task_function_falls_back_on_the_core_y(xp, rng):
    cfg = CONFIGS[0]
    params, x, target = _inputs(xp, rng, cfg, np.float32)
    obj = refmoe.PRESETS["paper"]
    big = 1e6 * x                                                      # outside PLAIN_RANGE: the core reruns
    r_unchecked = fast.objective_step(big, params, cfg, obj, _residual_mse(big, target), check=False)
    assert not bool(refmoe.to_numpy(r_unchecked.losses["status"]).all())
    calls = []
    r1 = fast.objective_step(big, params, cfg, obj, _residual_mse(big, target, calls))
    r0 = _core_task_step(big, params, cfg, obj, _residual_mse(big, target))
    assert len(calls) == 2 and calls[1] is r1.y                        # again, on the core's y
    _assert_equal(r0, r1, 0.0)                                         # the core's numbers exactly
    assert rel_error(r0.losses["task"], r1.losses["task"]) == 0.0


def test_step_with_a_task_function_checks_what_it_returns(xp, rng):
    cfg = CONFIGS[0]
    params, x, target = _inputs(xp, rng, cfg)
    obj = refmoe.PRESETS["paper"]
    with pytest.raises(ValueError, match="dy has shape"):
        fast.objective_step(x, params, cfg, obj, lambda y: (0.0, y[:3]))
    with pytest.raises(ValueError, match="task_loss was given"):
        fast.objective_step(x, params, cfg, obj, _residual_mse(x, target), task_loss=1.0)
    nan_loss = lambda y: (xp.full((), np.nan, dtype=y.dtype), y)      # noqa: E731 a NaN task loss (array)
    status = refmoe.to_numpy(fast.objective_step(x, params, cfg, obj, nan_loss, check=False).losses["status"])
    assert list(status) == [k != "losses_finite" for k in fast.STATUS]
    with pytest.raises(ValueError, match="task_loss contains NaN"):    # status -> core -> the core's message
        fast.objective_step(x, params, cfg, obj, nan_loss)
    with pytest.raises(TypeError, match="task function as task="):
        fast.GraphedStep(x, params, cfg, obj, _residual_mse(x, target))


def test_graphed_step_with_a_task_equals_the_eager_step(xp, rng):
    """The task computed inside the graph from the step's buffers: new x and targets into the same graph give
    the eager step's numbers (CuPy: a captured graph; NumPy: the eager step)."""
    cfg = CONFIGS[0]
    params, x, target = _inputs(xp, rng, cfg, np.float32, N=64)
    obj = refmoe.PRESETS["paper"].replace(beta=0.1, gamma=0.01)
    task = lambda y, x_, t_: _residual_mse(x_, t_)(y)                 # noqa: E731
    step = fast.GraphedStep(x, params, cfg, obj, task=task, task_inputs=(target,), capacity=64, keep_cache=True)
    assert step.mode == graphed_mode(xp), step.reason
    for scale in (1.0, 0.5, 3.0):
        x2, t2 = (scale * x).astype(np.float32), (target[::-1] * scale).astype(np.float32)
        r0 = fast.objective_step(x2, params, cfg, obj, _residual_mse(x2, t2), capacity=64)
        r1 = step(x=x2, task_inputs=(t2,))
        _assert_equal(r0, r1, 1e-5)                                    # float32: measured 0 (same kernels)
        assert float(host(r1.losses["task"])) == pytest.approx(float(host(r0.losses["task"])), rel=1e-6)
        assert np.array_equal(host(r1.cache.topk_idx), host(r0.cache.topk_idx))
    with pytest.raises(ValueError, match="task_inputs given"):
        step(x=x, task_inputs=())
    with pytest.raises(ValueError, match=r"x must be float32\(64, 16\)"):     # no broadcast of one row
        step(x=x[:1])
    with pytest.raises(ValueError, match=r"task_inputs\[0\] must be float32"):   # no silent cast
        step(task_inputs=(target.astype(np.float64),))
    with pytest.raises(ValueError, match="computes dy with its task"):
        step(dy=x)
    with pytest.raises(ValueError, match="not both"):
        fast.GraphedStep(x, params, cfg, obj, x, task=task, task_inputs=(target,))
