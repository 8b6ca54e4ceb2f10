"""The training loop: the composed gradient against finite differences, loss combinations, determinism,
the evaluation, and the verdict logic of the report on hand-made results."""
import math

import numpy as np
import pytest

from refmoe.losses.task import mse_forward
from refmoe import gradcheck as gc
from refmoe.config import MoEConfig
from refmoe.layer import init_params, moe_forward
from refmoe.objective import PRESETS, objective_forward_backward
from refmoe.study import data as D
from refmoe.study.optim import AdamConfig, adam_init
from refmoe.study.runner import StudyConfig, run_seed
import refmoe.study.train as train_mod
from refmoe.study.train import COMBOS, RunId, combo_objective, train_phase, train_step

from helpers import graphed_mode, host

TINY = MoEConfig(d_model=4, d_hidden=3, n_experts=4, top_k=2, n_shared=1)


def test_combo_objective_switches_terms_off():
    base = PRESETS["paper"].replace(alpha=0.1, beta=0.2, gamma=0.3)
    got = {c: (o.alpha, o.beta, o.gamma) for c in COMBOS for o in [combo_objective(base, c)]}
    assert got["none"] == (0.0, 0.0, 0.0)
    assert got["aux"] == (0.1, 0.0, 0.0)
    assert got["aux+ortho"] == (0.1, 0.2, 0.0) and got["aux+var"] == (0.1, 0.0, 0.3)
    assert got["aux+ortho+var"] == (0.1, 0.2, 0.3) and got["ortho+var"] == (0.0, 0.2, 0.3)
    with pytest.raises(ValueError, match="combo"):
        combo_objective(base, "ortho")


def test_run_id_names_a_combination_or_a_sweep_run():
    base = PRESETS["paper"].replace(alpha=0.1, beta=0.2, gamma=0.3)
    plain = RunId("aux+var")
    assert plain.label == "aux+var" and not plain.is_sweep
    o = plain.objective(base)
    assert (o.alpha, o.beta, o.gamma, o.name) == (0.1, 0.0, 0.3, combo_objective(base, "aux+var").name)
    run = RunId.sweep(0.5)
    assert run == RunId("aux+ortho+var", 0.5) and run.is_sweep and run.label == "sweep:0.5"
    o = run.objective(base)
    assert (o.alpha, o.beta, o.gamma) == (0.1, 0.2 * 0.5, 0.3 * 0.5)
    assert RunId.sweep(10).label == "sweep:10"


def test_run_seed_files_sweep_runs_under_their_label():
    st = StudyConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_clusters=4, batch_size=32, pretrain_steps=4,
                     finetune_steps=3, log_every=0, eval_tokens=64, overlap_points=40, seeds=(0,),
                     presets=("paper",), combos=("aux", "aux+ortho+var"), sweep=(0.5, 2.0))
    ft = run_seed(st, 0, status=lambda line: None)["finetune"]["paper"]
    assert set(ft["sweep"]) == {"sweep:0.5", "sweep:2"}
    assert [r["factor"] for r in ft["sweep"].values()] == [0.5, 2.0]
    assert ft["sweep"]["sweep:2"]["task"][0] == ft["aux+ortho+var"]["task"][0]   # same checkpoint, same batch


def test_total_gradient_of_a_training_step_matches_finite_differences():
    # L = L_h(x + MoE(x), t) + alpha L_aux + beta L_o + gamma L_v, with dy = dL_h/dout computed by hand:
    # the gradient the optimiser receives must be the derivative of that scalar (float64)
    rng = np.random.default_rng(5)
    task = D.make_task(rng, d_model=4, n_clusters=3, n_narrow=1, teacher_rank=3)
    b = D.sample(task, rng, 6, backend="numpy")
    obj = PRESETS["paper"].replace(alpha=0.3, beta=0.05, gamma=0.7)
    for _ in range(100):                                   # parameters whose routing is clear of ties
        params = init_params(TINY, rng, np.float64, backend="numpy")
        params["w_router"] = params["w_router"] * 3.0
        s = np.sort(moe_forward(b.x, params, TINY)[1].scores, axis=1)[:, ::-1]
        if (s[:, 1] - s[:, 2]).min() > 2e-3:
            break
    _, _, res, _, _ = train_step(params, adam_init(params), b, TINY, obj, AdamConfig(lr=0.0))

    def total(p):
        y, _ = moe_forward(b.x, p, TINY)
        l_h, _ = mse_forward(b.x + y, b.target)
        r = objective_forward_backward(b.x, p, TINY, None, obj, per_term=False)
        return l_h + r.losses["regularisers"]

    errs = gc.check_vjp(total, dict(params), {k: res.grads["total"][k] for k in params},
                        guard=lambda p: moe_forward(b.x, p, TINY)[1].topk_idx)
    assert max(errs.values()) < 1e-7, errs     # measured ~1e-9; pass mark 1e-7


def test_train_phase_lowers_the_task_loss(backend):
    rng = np.random.default_rng(0)
    cfg = MoEConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_shared=1)
    task = D.make_task(rng, d_model=8, n_clusters=4, n_narrow=2, teacher_rank=4)
    params = init_params(cfg, rng, np.float32, backend=backend)
    logs = []
    res = train_phase(params, cfg, combo_objective(PRESETS["paper"], "aux+ortho+var"), task, rng, steps=40,
                      batch_size=64, domain="broad", adam=AdamConfig(lr=1e-2), log_every=20, backend=backend,
                      dtype=np.float32, on_log=logs.append)
    first, last = np.mean([s.task for s in res.steps[:5]]), np.mean([s.task for s in res.steps[-5:]])
    assert last < 0.6 * first                             # measured ~0.3
    assert [r.step for r in logs] == [1, 20, 40]
    assert res.params["w_gate"].dtype == np.float32
    cos = logs[-1].cosines["router"]
    assert math.isnan(cos[0, 2])                          # L_o never reaches the router
    assert math.isnan(logs[-1].cosines["experts"][0, 1])  # L_aux never reaches the experts


def test_run_seed_same_batches_for_every_combination():
    st = StudyConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_clusters=4, batch_size=32, pretrain_steps=8,
                     finetune_steps=6, log_every=3, eval_tokens=64, overlap_points=40, seeds=(0,),
                     combos=("none", "aux"), sweep=(0.1,))
    lines = []
    out = run_seed(st, 0, status=lines.append)
    ft = out["finetune"]
    # "none" has no regulariser: both presets start from one checkpoint on the same batches -> identical
    assert ft["paper"]["none"]["task"] == ft["authors_code"]["none"]["task"]
    assert ft["paper"]["none"]["task"][0] == ft["paper"]["aux"]["task"][0]      # same first batch and params
    assert ft["authors_code"]["objective"]["calibrated"] is not None
    assert ft["paper"]["sweep"] == {}             # the sweep needs aux and aux+ortho+var in the study
    ev = ft["paper"]["aux"]["eval"]["narrow"]
    assert 0.0 <= ev["overlap"] <= 1.0 and -1.0 <= ev["silhouette"] <= 1.0 and 0.0 <= ev["nmi"] <= 1.0 + 1e-12
    assert sum(ev["loads"]) == st.eval_tokens * st.top_k
    # one status line per logging step: pre-training at steps 1, 3, 6, 8; 2 presets x 2 combos at 1, 3, 6
    assert len(lines) == 4 + 2 * 2 * 3


def test_all_expert_outputs_agree_with_the_layer(backend):
    from refmoe.study.evaluate import all_expert_outputs

    rng = np.random.default_rng(2)
    params = init_params(TINY, rng, np.float64, backend=backend)
    x = D.sample(D.make_task(rng, d_model=4, n_clusters=2, n_narrow=1), rng, 7, backend=backend).x
    _, cache = moe_forward(x, params, TINY)
    every = host(all_expert_outputs(x, params))                       # [N, E, D]
    picked = np.take_along_axis(every, host(cache.topk_idx)[:, :, None], axis=1)
    assert np.abs(picked - host(cache.expert_out)).max() < 1e-12     # the same SwiGLU on the same tokens


def test_the_study_configuration_is_on_the_fast_path():
    # a layer or objective the fast step does not cover would send every CuPy step to the core path
    from refmoe.fast.step import unsupported
    from refmoe.study.train import pretrain_objective

    cfg = StudyConfig().moe_config()
    for obj in (pretrain_objective(), PRESETS["paper"], PRESETS["authors_code"].replace(beta=0.1, gamma=0.01)):
        assert unsupported(None, cfg, obj, None) is None, obj.name


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])   # measured 1e-16, 5e-8
def test_train_phase_on_the_fast_path_equals_the_core_path(xp, dtype, tol, monkeypatch):
    # the path the study takes on CuPy (the phase's GraphedStep with the residual task inside, replayed from a
    # CUDA graph, and Adam in place), and the same forced on NumPy (the step eager): the same losses, MaxVio and
    # parameters as the core path, step by step
    import refmoe.fast.step as fast_step
    from refmoe.gradcheck import rel_error
    from refmoe.study.train import uses_fast_path

    reruns = []
    core_step = fast_step.core_step
    monkeypatch.setattr(fast_step, "core_step", lambda *a: reruns.append(1) or core_step(*a))
    graphs = []
    real_graphed = train_mod.GraphedStep
    monkeypatch.setattr(train_mod, "GraphedStep", lambda *a, **k: graphs.append(real_graphed(*a, **k)) or graphs[-1])

    assert uses_fast_path("cupy") and not uses_fast_path("cupy", per_term=True) and not uses_fast_path("numpy")
    st = StudyConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_clusters=4, batch_size=32)
    cfg = st.moe_config()
    obj = combo_objective(PRESETS["paper"].replace(alpha=3e-2, beta=0.1, gamma=0.05), "aux+ortho+var")
    backend = xp.__name__
    runs = {}
    for fast in (False, True):
        rng = np.random.default_rng(3)
        task = D.make_task(rng, d_model=8, n_clusters=4, n_narrow=2, teacher_rank=4)
        params = init_params(cfg, rng, dtype, backend=backend)
        before = {k: host(v).copy() for k, v in params.items()}
        logs = []
        runs[fast] = (train_phase(params, cfg, obj, task, rng, steps=12, batch_size=32, domain="broad",
                                  adam=AdamConfig(lr=1e-2), log_every=5, dtype=dtype, on_log=logs.append,
                                  fast=fast, backend=backend), logs)
        assert all(np.array_equal(host(params[k]), before[k]) for k in params)   # the phase updated a copy
    assert reruns == []                                                # the fast numbers, not the core's
    assert len(graphs) == 1 and graphs[0].mode == graphed_mode(xp)   # one capture serves
    (core, core_logs), (fast_, fast_logs) = runs[False], runs[True]
    assert [r.step for r in fast_logs] == [1, 5, 10, 12]              # logging steps: the core path, per term
    assert [s.maxvio for s in fast_.steps] == [s.maxvio for s in core.steps]       # the same routing
    assert rel_error(np.array([s.task for s in core.steps]), np.array([s.task for s in fast_.steps])) <= tol
    for k in core.params:
        assert fast_.params[k].dtype == dtype and rel_error(host(core.params[k]), host(fast_.params[k])) <= tol, k
    assert rel_error(fast_logs[-1].norms["experts"]["task"], core_logs[-1].norms["experts"]["task"]) <= tol


def test_train_phase_on_cupy_takes_the_fast_path_and_equals_numpy(cp, monkeypatch):
    # on CuPy the non-logging steps replay the phase's GraphedStep (its calls counted here), and the phase
    # gives NumPy's core-path numbers (float64)
    import refmoe.study.train as T
    from refmoe.gradcheck import rel_error

    built, calls = [], []

    class Counted(T.GraphedStep):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            built.append(self)

        def __call__(self, *args, **kw):
            calls.append(self.capacity)
            return super().__call__(*args, **kw)

    monkeypatch.setattr(T, "GraphedStep", Counted)
    cfg = MoEConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_shared=1)
    obj = combo_objective(PRESETS["paper"].replace(alpha=3e-2, beta=0.1, gamma=0.05), "aux+ortho+var")
    runs = {}
    for backend in ("numpy", "cupy"):
        rng = np.random.default_rng(3)
        task = D.make_task(rng, d_model=8, n_clusters=4, n_narrow=2, teacher_rank=4)
        params = init_params(cfg, rng, np.float64, backend=backend)
        runs[backend] = train_phase(params, cfg, obj, task, rng, steps=12, batch_size=32, domain="broad",
                                    adam=AdamConfig(lr=1e-2), log_every=5, backend=backend, dtype=np.float64)
    assert calls == [32] * 8                                           # 12 steps, 4 of them logging steps
    assert len(built) == 1 and built[0].mode == graphed_mode(cp) and built[0].captures == 1, built[0].reason
    a, b = runs["numpy"], runs["cupy"]
    assert [s.maxvio for s in a.steps] == [s.maxvio for s in b.steps]
    assert rel_error(np.array([s.task for s in a.steps]), np.array([s.task for s in b.steps])) <= 1e-10
    for k in a.params:
        assert rel_error(a.params[k], host(b.params[k])) <= 1e-10, k  # float64 on two libraries: not yet run
