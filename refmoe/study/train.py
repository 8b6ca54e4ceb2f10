r"""Training an MoE block with refmoe's own gradients: broad pre-training, then narrow fine-tuning.

Dimension letters: N tokens, D model width, E routed experts, K top-k, T objective terms (``refmoe.objective.TERMS``).

The model is one residual MoE block with shared experts, out = x + MoE(x), fitted to the per-cluster teachers
of ``refmoe.study.data`` with the task loss L_h = (1/(N D)) sum_i ||out_i - t_i||^2 (``refmoe.losses.task.mse_forward``). Its
gradient dy = dL_h/dout is computed by hand and passed, with the regularisers of an ``Objective``, to
``objective_forward`` / ``objective_backward``; the update is the hand-written Adam of ``refmoe.study.optim``.
The study around these (seeds, presets, the verdicts) is ``refmoe.study.runner``.

On CuPy (``FAST_BACKENDS``) a step that is not a logging step runs on the fast path instead: the phase's
``refmoe.fast.GraphedStep``, the fused step with the task computed from y inside it, captured once as a CUDA
graph and replayed (the same numbers up to rounding, one host read per step: its status), and the update is
``adam_step_inplace`` on the phase's own copy of the parameters (a graph reads them where they are). Logging
steps need the per-term gradients and stay on the core path; NumPy runs every step on the core path. The
per-step records (L_h, MaxVio) are read to the host once per phase.

Phase 1 (pre-training) uses the broad mixture with L_h + alpha L_aux. Phase 2 starts from that checkpoint, with
fresh Adam moments, and fine-tunes on the narrow domain under one loss combination (``COMBOS``), or, in the
sweep, under aux+ortho+var with beta and gamma scaled by a factor; a ``RunId`` names which.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..backend import array_namespace, to_numpy
from ..config import MoEConfig
from ..fast import GraphedStep, objective_step
from ..losses.task import mse_backward, mse_forward
from ..objective import PRESETS, Objective, objective_backward, objective_forward
from . import data as D_
from .alignment import GROUPS, cosine_matrix, gradient_norms, routing_discriminativeness
from .metrics import max_vio_array
from .optim import AdamConfig, adam_init, adam_step, adam_step_inplace

FAST_BACKENDS = ("cupy",)            # backends whose non-logging steps replay the phase's refmoe.fast.GraphedStep

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
    cosines: dict        # group -> [T, T] cosine matrix (task, aux, ortho, var)
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


SWEEP_COMBO = "aux+ortho+var"        # the combination whose beta and gamma the sweep scales


class RunId(NamedTuple):
    """Which fine-tuning run of a preset: a loss combination as it is (``factor`` None), or one run of the sweep,
    ``SWEEP_COMBO`` with beta and gamma times ``factor`` (made by ``RunId.sweep``)."""
    combo: str                       # a key of COMBOS
    factor: float | None = None      # None: the combination's own coefficients

    @classmethod
    def sweep(cls, factor: float) -> RunId:
        return cls(SWEEP_COMBO, float(factor))

    @property
    def is_sweep(self) -> bool:
        return self.factor is not None

    @property
    def label(self) -> str:
        """The name in status lines and in results.json: the combination, or "sweep:<factor>"."""
        return f"sweep:{self.factor:g}" if self.is_sweep else self.combo

    def objective(self, base: Objective) -> Objective:
        """``base`` restricted to the combination, then beta and gamma scaled for a sweep run."""
        obj = combo_objective(base, self.combo)
        if not self.is_sweep:
            return obj
        f = self.factor
        return obj.replace(beta=obj.beta * f, gamma=obj.gamma * f, name=f"{obj.name}x{f:g}")


def pretrain_objective(alpha: float = 3e-2) -> Objective:
    """Phase 1: L_h + alpha L_aux (switch form), no L_o, no L_v."""
    return PRESETS["paper"].replace(alpha=alpha, beta=0.0, gamma=0.0, name="pretrain")


def _f(a) -> float:
    return float(to_numpy(a))


def residual_task(x, target):
    """The task of the block out = x + y, as a function of y: y [N, D] -> (L_h, dy = dL_h/dy [N, D]).

    The residual passes dL_h/dout to y unchanged."""
    def task(y):
        l_h, r = mse_forward(x + y, target)
        return l_h, mse_backward(1.0, r)                                       # [N, D]
    return task


def _residual(y, x, target):
    """``residual_task(x, target)(y)``, in the argument order of ``GraphedStep``'s task."""
    return residual_task(x, target)(y)


def uses_fast_path(backend: str, per_term: bool = False) -> bool:
    """Whether ``train_step`` runs on ``refmoe.fast`` by default: CuPy, and not a logging step."""
    return backend in FAST_BACKENDS and not per_term


def train_step(params: dict, opt_state, batch: D_.Batch, cfg: MoEConfig, objective: Objective,
               adam: AdamConfig, *, per_term: bool = False, fast: bool | None = None):
    """One update on one batch.  Returns (params, opt_state, ObjectiveResult, task loss L_h (0-d, on the
    device), dy [N, D] or None).

    fast   None: ``uses_fast_path`` (CuPy and not ``per_term``); True: ``refmoe.fast.objective_step`` on any
           backend (the tests run it on NumPy), with capacity N (a token picks K distinct experts, so no
           load exceeds N: no host read for C) and dy kept inside the step (returned as None);
           False: the core path, ``objective_forward`` / ``objective_backward``.
    """
    res, task, dy = step_gradients(params, batch, cfg, objective, per_term=per_term, fast=fast)
    params, opt_state = adam_step(params, res.grads["total"], opt_state, adam)
    return params, opt_state, res, task, dy


def step_gradients(params: dict, batch: D_.Batch, cfg: MoEConfig, objective: Objective, *, per_term: bool = False,
                   fast: bool | None = None):
    """The gradients of one ``train_step``, without the update: (ObjectiveResult, L_h, dy or None)."""
    if fast is None:
        fast = uses_fast_path(array_namespace(batch.x).__name__, per_term)
    task_fn = residual_task(batch.x, batch.target)
    if fast:
        if per_term:
            raise ValueError("per_term=True needs the core path (the fast step returns the total gradient only)")
        res = objective_step(batch.x, params, cfg, objective, task_fn, capacity=batch.x.shape[0])
        return res, res.losses["task"], None
    y, ocache = objective_forward(batch.x, params, cfg, objective)
    task, dy = task_fn(y)
    return objective_backward(dy, ocache, task_loss=task, per_term=per_term), task, dy


def draw_batches(task: D_.ClusterTask, rng, *, steps: int, batch_size: int, domain: str, backend: str = "numpy",
                 dtype=np.float32) -> list:
    """The ``steps`` batches ``train_phase`` would draw from ``rng``, drawn once (to be shared by several runs)."""
    return [D_.sample(task, rng, batch_size, domain=domain, backend=backend, dtype=dtype) for _ in range(steps)]


def data_parallel_train_step(comm, params: dict, opt_state, batch: D_.Batch, cfg: MoEConfig, objective: Objective,
                             adam: AdamConfig, *, per_term: bool = False, check_replicas: bool = False):
    """``train_step`` with ``batch`` (the whole global batch, on every rank) split over the ranks of ``comm``
    (``refmoe.study.data_parallel``); the same returns, for the global batch (dy None except at logging steps)."""
    from .data_parallel import global_step

    res, dy = global_step(comm, params, batch, cfg, objective, per_term=per_term, check_replicas=check_replicas)
    params, opt_state = adam_step(params, res.grads["total"], opt_state, adam)
    return params, opt_state, res, res.losses["task"], dy


def train_phase(params: dict, cfg: MoEConfig, objective: Objective, task: D_.ClusterTask, rng, *,
                steps: int, batch_size: int, domain: str, adam: AdamConfig, log_every: int = 0,
                backend: str = "numpy", dtype=np.float32, on_log: Callable | None = None,
                batches: Sequence[D_.Batch] | None = None, comm=None, fast: bool | None = None) -> PhaseResult:
    """``steps`` updates on fresh batches of ``domain``; per-term analyses every ``log_every`` steps.

    on_log(LogRecord) is called at each logging step (the status line of the command). ``batches``, when
    given, are the ``steps`` batches to use in order instead of drawing them from ``rng`` (the batches
    :func:`draw_batches` draws from the same ``rng``: the runs of a seed share them). ``comm``, a
    ``refmoe.distributed`` communicator, splits every batch over its ranks (:func:`data_parallel_train_step`).
    ``fast`` (None: CuPy; not used with ``comm``) runs the non-logging steps on the phase's
    ``refmoe.fast.GraphedStep`` (a CUDA graph on CuPy, the eager fast step elsewhere) and updates a copy of
    ``params`` in place (``adam_step_inplace``); otherwise every step is ``train_step`` on the core path.
    """
    if batches is not None and len(batches) != steps:
        raise ValueError(f"{len(batches)} batches given for steps={steps}")
    graphed = comm is None and (uses_fast_path(backend) if fast is None else fast)
    if graphed:
        params = {k: w.copy() for k, w in params.items()}  # the phase's own: updated in place, read by the graph
    opt, replay = adam_init(params), None
    tasks, vios, logs = [], [], []                  # per step: L_h, MaxVio_batch (0-d, read after the loop)
    for s in range(1, steps + 1):
        batch = (batches[s - 1] if batches is not None else
                 D_.sample(task, rng, batch_size, domain=domain, backend=backend, dtype=dtype))
        logging = bool(log_every) and (s % log_every == 0 or s == 1 or s == steps)
        if comm is not None:
            params, opt, res, l_h, dy = data_parallel_train_step(comm, params, opt, batch, cfg, objective, adam,
                                                                 per_term=logging, check_replicas=s == 1)
        elif not graphed:
            params, opt, res, l_h, dy = train_step(params, opt, batch, cfg, objective, adam, per_term=logging,
                                                   fast=False)
        else:
            if logging:
                res, l_h, dy = step_gradients(params, batch, cfg, objective, per_term=True, fast=False)
            else:
                if replay is None:                  # capacity N: no load exceeds it, so one capture serves
                    replay = GraphedStep(batch.x, params, cfg, objective, task=_residual,
                                         task_inputs=(batch.target,), capacity=batch.x.shape[0], keep_cache=True)
                res = replay(x=batch.x, task_inputs=(batch.target,))
                l_h, dy = res.losses["task"].copy(), None    # the next replay overwrites the step's arrays
            opt = adam_step_inplace(params, res.grads["total"], opt, adam)
        tasks.append(l_h)
        vios.append(max_vio_array(res.cache.topk_idx, cfg.n_experts))
        if logging:
            losses = {"task": _f(l_h), "aux": _f(res.losses["aux"]), "ortho": _f(res.losses["ortho"]),
                      "var": _f(res.losses["var"])}
            cos = {g: cosine_matrix(res.grads, g) for g in GROUPS}
            norms = {g: gradient_norms(res.grads, g) for g in GROUPS}
            rec = LogRecord(s, losses, cos, norms, routing_discriminativeness(dy, res.cache.expert_out))
            logs.append(rec)
            if on_log is not None:
                on_log(rec)
    xp = array_namespace(*params.values())
    step_recs = [StepRecord(float(t), float(v)) for t, v in zip(_host(xp, tasks), _host(xp, vios))]
    return PhaseResult(params, step_recs, logs)


def _host(xp, values: list) -> np.ndarray:
    """0-d values (arrays of the backend ``xp``, NumPy scalars or Python floats), read to the host in one copy.
    -> [T]"""
    return to_numpy(xp.stack([xp.asarray(v) for v in values])) if values else np.zeros(0)
