r"""Training an MoE block with refmoe's own gradients: broad pre-training, then narrow fine-tuning.

Dimension letters: N tokens, D model width, E routed experts, K top-k.

The model is one residual MoE block with shared experts, out = x + MoE(x), fitted to the per-cluster teachers
of ``refmoe.study.data`` with the task loss L_h = (1/(N D)) sum_i ||out_i - t_i||^2 (``data.mse_forward``). Its gradient
dy = dL_h/dout is computed by hand and passed, with the regularisers of an ``Objective``, to
``objective_forward`` / ``objective_backward``; the update is the hand-written Adam of ``refmoe.study.optim``.

Phase 1 (pre-training) uses the broad mixture with L_h + alpha L_aux. Phase 2 starts from that checkpoint, with
fresh Adam moments, and fine-tunes on the narrow domain under one loss combination (``COMBOS``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from . import data as D_
from .alignment import GROUPS, cosine_matrix, gradient_norms, routing_discriminativeness
from ..backend import to_numpy
from ..config import MoEConfig
from .evaluate import evaluate
from ..layer import init_params
from .metrics import max_vio
from ..objective import PRESETS, Objective, objective_backward, objective_forward
from .optim import AdamConfig, adam_init, adam_step

# name -> (use L_aux, use L_o, use L_v)
COMBOS = {
    "none": (False, False, False),
    "aux": (True, False, False),
    "aux+ortho": (True, True, False),
    "aux+var": (True, False, True),
    "aux+ortho+var": (True, True, True),
    "ortho+var": (False, True, True),
}


class StepRecord(NamedTuple):
    task: float          # L_h on the batch
    maxvio: float        # MaxVio_batch (Eq. 36)


class LogRecord(NamedTuple):
    step: int
    losses: dict         # term -> unweighted value (Python floats)
    cosines: dict        # group -> [4, 4] cosine matrix (task, aux, ortho, var)
    norms: dict          # group -> term -> gradient norm
    discrim: float       # routing_discriminativeness on the batch


class PhaseResult(NamedTuple):
    params: dict
    steps: list          # StepRecord per step
    logs: list           # LogRecord per logging step


def combo_objective(base: Objective, combo: str) -> Objective:
    """``base`` with the coefficients of the terms that ``combo`` leaves out set to 0."""
    if combo not in COMBOS:
        raise ValueError(f"combo={combo!r}; expected one of {list(COMBOS)}")
    use_aux, use_o, use_v = COMBOS[combo]
    return base.replace(alpha=base.alpha if use_aux else 0.0, beta=base.beta if use_o else 0.0,
                        gamma=base.gamma if use_v else 0.0, name=f"{base.name}:{combo}")


def pretrain_objective(alpha: float = 3e-2) -> Objective:
    """Phase 1: L_h + alpha L_aux (switch form), no L_o, no L_v."""
    return PRESETS["paper"].replace(alpha=alpha, beta=0.0, gamma=0.0, name="pretrain")


def _f(a) -> float:
    return float(to_numpy(a))


def train_step(params: dict, opt_state, batch: D_.Batch, cfg: MoEConfig, objective: Objective,
               adam: AdamConfig, *, per_term: bool = False):
    """One update on one batch.  Returns (params, opt_state, ObjectiveResult, task loss, dy [N, D]).

    The block is out = x + y; the residual passes dy = dL_h/dout to y unchanged.
    """
    y, ocache = objective_forward(batch.x, params, cfg, objective)
    task, r = D_.mse_forward(batch.x + y, batch.target)
    dy = D_.mse_backward(1.0, r)                                                  # [N, D]
    res = objective_backward(dy, ocache, task_loss=task, per_term=per_term)
    params, opt_state = adam_step(params, res.grads["total"], opt_state, adam)
    return params, opt_state, res, _f(task), dy


def train_phase(params: dict, cfg: MoEConfig, objective: Objective, task: D_.ClusterTask, rng, *,
                steps: int, batch_size: int, domain: str, adam: AdamConfig, log_every: int = 0,
                backend: str = "numpy", dtype=np.float32, on_log: Callable | None = None) -> PhaseResult:
    """``steps`` updates on fresh batches of ``domain``; per-term analyses every ``log_every`` steps.

    on_log(LogRecord) is called at each logging step (the status line of the command).
    """
    opt = adam_init(params)
    step_recs, logs = [], []
    for s in range(1, steps + 1):
        batch = D_.sample(task, rng, batch_size, domain=domain, backend=backend, dtype=dtype)
        logging = bool(log_every) and (s % log_every == 0 or s == 1 or s == steps)
        params, opt, res, l_h, dy = train_step(params, opt, batch, cfg, objective, adam, per_term=logging)
        step_recs.append(StepRecord(l_h, max_vio(res.cache.topk_idx, cfg.n_experts)))
        if logging:
            losses = {"task": l_h, "aux": _f(res.losses["aux"]), "ortho": _f(res.losses["ortho"]),
                      "var": _f(res.losses["var"])}
            cos = {g: cosine_matrix(res.grads, g) for g in GROUPS}
            norms = {g: gradient_norms(res.grads, g) for g in GROUPS}
            rec = LogRecord(s, losses, cos, norms, routing_discriminativeness(dy, res.cache.expert_out))
            logs.append(rec)
            if on_log is not None:
                on_log(rec)
    return PhaseResult(params, step_recs, logs)


# ----------------------------------------------------------------------------------------------
# the study: one seed = one pre-training, then every (preset, combo) fine-tuning from it
# ----------------------------------------------------------------------------------------------

class StudyConfig(NamedTuple):
    """Every knob of the study (the flags of ``refmoe reproduce``). The defaults finish in about 3 minutes
    with NumPy on 2 CPU cores. ``alpha`` replaces the presets' L_aux coefficient (1e-3) in phase 2, because at
    1e-3 the balancing loss hardly moves the routing of this small block; ``beta``/``gamma`` None keep the
    presets' values (``authors_code`` calibrates them on the first narrow batch of each seed)."""
    d_model: int = 32
    d_hidden: int = 16
    n_experts: int = 16
    top_k: int = 4
    n_shared: int = 1
    n_clusters: int = 8
    n_narrow: int = 2
    noise: float = 0.6
    batch_size: int = 256
    pretrain_steps: int = 300
    finetune_steps: int = 300
    log_every: int = 50
    lr: float = 1e-2
    pretrain_alpha: float = 3e-2
    alpha: float | None = 3e-2          # None: the preset's coefficient (1e-3); see report.md
    beta: float | None = None
    gamma: float | None = None
    eval_tokens: int = 1024
    overlap_points: int = 600
    seeds: tuple = (0, 1, 2, 3, 4)
    presets: tuple = ("paper", "authors_code")
    combos: tuple = tuple(COMBOS)
    sweep: tuple = (0.01, 0.1, 10.0)   # extra aux+ortho+var runs with beta and gamma times each factor
    backend: str = "numpy"
    dtype: str = "float32"

    def moe_config(self) -> MoEConfig:
        return MoEConfig(self.d_model, self.d_hidden, self.n_experts, self.top_k, n_shared=self.n_shared)


def preset_objective(name: str, x, params, cfg: MoEConfig, *, alpha=None, beta=None, gamma=None) -> tuple:
    """The preset as used in phase 2: its auto-scaled weights calibrated on batch ``x`` where it has any,
    then any coefficient given here (not None) put in place of the preset's.
    Returns (Objective, calibration dict or None)."""
    base = PRESETS[name]
    calib = None
    if not base.is_calibrated:
        from ..autoscale import autoscale_weights

        rep = autoscale_weights(x, params, cfg, base)
        base = rep.objective
        calib = {"beta": base.beta, "gamma": base.gamma}
    changes = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)) if v is not None}
    return (base.replace(**changes) if changes else base), calib


def run_seed(study: StudyConfig, seed: int, *, status: Callable[[str], None] = print) -> dict:
    """Pre-train once, then fine-tune under every (preset, combo). Returns a nested dict of host values."""
    cfg = study.moe_config()
    dtype = np.dtype(study.dtype)
    rng = np.random.default_rng(seed)
    task = D_.make_task(rng, d_model=study.d_model, n_clusters=study.n_clusters, n_narrow=study.n_narrow,
                        noise=study.noise)
    params0 = init_params(cfg, rng, dtype, backend=study.backend)
    held = {dom: D_.sample(task, np.random.default_rng([seed, 7, i]), study.eval_tokens, domain=dom,
                           backend=study.backend, dtype=dtype) for i, dom in enumerate(("narrow", "broad"))}
    adam = AdamConfig(lr=study.lr)

    def logger(tag):
        def on_log(rec: LogRecord):
            status(f"seed {seed} {tag:<26} step {rec.step:>4}  L_h {rec.losses['task']:.4f}  "
                   f"aux {rec.losses['aux']:.3f}  L_o {rec.losses['ortho']:.3g}  L_v {rec.losses['var']:.3g}")
        return on_log

    pre = train_phase(params0, cfg, pretrain_objective(study.pretrain_alpha), task, rng,
                      steps=study.pretrain_steps, batch_size=study.batch_size, domain="broad", adam=adam,
                      log_every=study.log_every, backend=study.backend, dtype=dtype, on_log=logger("pretrain"))
    out = {"pretrain": {"task": [r.task for r in pre.steps], "maxvio": [r.maxvio for r in pre.steps],
                        "eval": evaluate(pre.params, cfg, held, study.overlap_points, seed)},
           "finetune": {}}
    calib_batch = D_.sample(task, np.random.default_rng([seed, 11]), study.batch_size, domain="narrow",
                            backend=study.backend, dtype=dtype)
    for preset in study.presets:
        base, calib = preset_objective(preset, calib_batch.x, pre.params, cfg, alpha=study.alpha,
                                       beta=study.beta, gamma=study.gamma)
        out["finetune"][preset] = {"objective": {"alpha": base.alpha, "beta": base.beta, "gamma": base.gamma,
                                                 "calibrated": calib}}
        runs = [(combo, combo_objective(base, combo)) for combo in study.combos]
        full = combo_objective(base, "aux+ortho+var")
        if "aux+ortho+var" in study.combos and "aux" in study.combos:     # the sweep is read against these
            runs += [(f"sweep:{f:g}", full.replace(beta=full.beta * f, gamma=full.gamma * f,
                                                   name=f"{full.name}x{f:g}")) for f in study.sweep]
        out["finetune"][preset]["sweep"] = {}
        for name, obj in runs:
            ft_rng = np.random.default_rng([seed, 13])               # same batches for every run
            ft = train_phase(dict(pre.params), cfg, obj, task, ft_rng, steps=study.finetune_steps,
                             batch_size=study.batch_size, domain="narrow", adam=adam,
                             log_every=study.log_every, backend=study.backend, dtype=dtype,
                             on_log=logger(f"{preset}:{name}"))
            rec = {
                "task": [r.task for r in ft.steps], "maxvio": [r.maxvio for r in ft.steps],
                "logs": [{"step": r.step, "losses": r.losses, "discrim": r.discrim,
                          "cosines": {g: m.tolist() for g, m in r.cosines.items()}, "norms": r.norms}
                         for r in ft.logs],
                "eval": evaluate(ft.params, cfg, held, study.overlap_points, seed),
            }
            if name.startswith("sweep:"):
                rec["factor"] = float(name.split(":")[1])
                out["finetune"][preset]["sweep"][name] = rec
            else:
                out["finetune"][preset][name] = rec
    return out
