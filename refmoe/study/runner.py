"""The specialisation study: one seed = one pre-training on the broad mixture, then every (preset, loss
combination) fine-tuning on the narrow domain from that checkpoint; over all seeds, the summary and the verdicts.

    result = run_study(study, progress=Progress(count_runs(study), count_steps(study)), workers=2)
    write_report(result, "reproduce_report")     # refmoe.study.report: figures, results.json, report.md

No array is shaped here (parameters and batches are those of ``refmoe.study.train``); the results are nested
dicts of host values (Python floats and lists) on either backend.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import numpy as np

from ..config import MoEConfig
from ..layer import init_params
from ..objective import PRESETS
from . import data as D_
from .environment import environment
from .evaluate import evaluate
from .optim import AdamConfig
from .progress import Progress
from .summary import claim_rows, summarize, sweep_summary
from .train import COMBOS, SWEEP_COMBO, LogRecord, RunId, draw_batches, pretrain_objective, train_phase

# ----------------------------------------------------------------------------------------------
# one seed: pre-training, then every fine-tuning run from that checkpoint
# ----------------------------------------------------------------------------------------------

class StudyConfig(NamedTuple):
    """Every knob of the study (the flags of ``refmoe reproduce``). The defaults (11 seeds, 209 training runs)
    take about 4 minutes with NumPy on 2 CPU cores and two worker processes (220 s measured,
    benchmarks/reproduce_numpy_cpu/). ``alpha`` replaces the presets' L_aux coefficient (1e-3) in phase 2, because at
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
    seeds: tuple = tuple(range(11))    # 11: same sign in all, two-sided p = 2^-10, survives Holm over <= 51 rows
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


def fine_tuning_runs(study: StudyConfig) -> list:
    """The RunIds fine-tuned under each preset: every combination, then the sweep where it can be read
    (it is compared against aux and aux+ortho+var, so both must be among the combinations)."""
    runs = [RunId(combo) for combo in study.combos]
    if SWEEP_COMBO in study.combos and "aux" in study.combos:
        runs += [RunId.sweep(f) for f in study.sweep]
    return runs


def count_runs(study: StudyConfig) -> int:
    """Training runs of the whole study: per seed, one pre-training and every preset's fine-tuning runs."""
    return len(study.seeds) * (1 + len(study.presets) * len(fine_tuning_runs(study)))


def count_steps(study: StudyConfig) -> int:
    """Optimizer steps of the whole study (what the ETA is proportional to)."""
    return len(study.seeds) * (study.pretrain_steps
                               + len(study.presets) * len(fine_tuning_runs(study)) * study.finetune_steps)


class SeedStart(NamedTuple):
    """What every fine-tuning run of a seed starts from (host values and arrays; picklable)."""
    seed: int
    params: dict            # the pre-trained parameters
    objectives: dict        # preset -> the phase-2 Objective (calibrated where the preset is)
    record: dict            # the seed's "pretrain" entry and, per preset, its "objective" entry


@functools.lru_cache(maxsize=2)
def seed_data(study: StudyConfig, seed: int) -> tuple:
    """The seed's task and its two held-out sets (drawn once per process)."""
    dtype = np.dtype(study.dtype)
    task = D_.make_task(np.random.default_rng(seed), d_model=study.d_model, n_clusters=study.n_clusters,
                        n_narrow=study.n_narrow, noise=study.noise)
    held = {dom: D_.sample(task, np.random.default_rng([seed, 7, i]), study.eval_tokens, domain=dom,
                           backend=study.backend, dtype=dtype) for i, dom in enumerate(("narrow", "broad"))}
    return task, held


@functools.lru_cache(maxsize=2)
def seed_batches(study: StudyConfig, seed: int) -> list:
    """The fine-tuning batches every run of the seed shares (drawn once per process; the same arrays as drawing
    them in each run)."""
    task, _ = seed_data(study, seed)
    return draw_batches(task, np.random.default_rng([seed, 13]), steps=study.finetune_steps,
                        batch_size=study.batch_size, domain="narrow", backend=study.backend,
                        dtype=np.dtype(study.dtype))


def _logger(status, seed, tag):
    def on_log(rec: LogRecord):
        status(f"seed {seed} {tag:<26} step {rec.step:>4}  L_h {rec.losses['task']:.4f}  "
               f"aux {rec.losses['aux']:.3f}  L_o {rec.losses['ortho']:.3g}  L_v {rec.losses['var']:.3g}")
    return on_log


def pretrain_seed(study: StudyConfig, seed: int, *, status: Callable[[str], None] = print,
                  on_run: Callable[[str, int], None] | None = None, comm=None) -> SeedStart:
    """Phase 1 of a seed, its evaluation, and each preset's phase-2 objective (``preset_objective``).
    ``comm``: train data-parallel over its ranks (``refmoe.study.data_parallel``)."""
    cfg, dtype = study.moe_config(), np.dtype(study.dtype)
    rng = np.random.default_rng(seed)
    task = D_.make_task(rng, d_model=study.d_model, n_clusters=study.n_clusters, n_narrow=study.n_narrow,
                        noise=study.noise)                                  # = seed_data's task, same draws
    params0 = init_params(cfg, rng, dtype, backend=study.backend)
    _, held = seed_data(study, seed)
    if on_run is not None:
        on_run(f"seed {seed} pretrain", study.pretrain_steps)
    pre = train_phase(params0, cfg, pretrain_objective(study.pretrain_alpha), task, rng,
                      steps=study.pretrain_steps, batch_size=study.batch_size, domain="broad",
                      adam=AdamConfig(lr=study.lr), log_every=study.log_every, backend=study.backend, dtype=dtype,
                      on_log=_logger(status, seed, "pretrain"), comm=comm)
    record = {"pretrain": {"task": [r.task for r in pre.steps], "maxvio": [r.maxvio for r in pre.steps],
                           "eval": evaluate(pre.params, cfg, held, study.overlap_points, seed)},
              "finetune": {}}
    calib_batch = D_.sample(task, np.random.default_rng([seed, 11]), study.batch_size, domain="narrow",
                            backend=study.backend, dtype=dtype)
    objectives = {}
    for preset in study.presets:
        base, calib = preset_objective(preset, calib_batch.x, pre.params, cfg, alpha=study.alpha,
                                       beta=study.beta, gamma=study.gamma)
        objectives[preset] = base
        record["finetune"][preset] = {"objective": {"alpha": base.alpha, "beta": base.beta, "gamma": base.gamma,
                                                    "calibrated": calib}}
    return SeedStart(seed, pre.params, objectives, record)


def finetune_run(study: StudyConfig, start: SeedStart, preset: str, run: RunId, *,
                 status: Callable[[str], None] = print, on_run: Callable[[str, int], None] | None = None,
                 comm=None) -> dict:
    """One phase-2 run from the seed's checkpoint, on the seed's shared batches, and its evaluation."""
    cfg, seed = study.moe_config(), start.seed
    task, held = seed_data(study, seed)
    batches = seed_batches(study, seed)
    if on_run is not None:
        on_run(f"seed {seed} {preset}:{run.label}", study.finetune_steps)
    ft = train_phase(dict(start.params), cfg, run.objective(start.objectives[preset]), task, None,
                     steps=study.finetune_steps, batch_size=study.batch_size, domain="narrow",
                     adam=AdamConfig(lr=study.lr), log_every=study.log_every, backend=study.backend,
                     dtype=np.dtype(study.dtype), on_log=_logger(status, seed, f"{preset}:{run.label}"),
                     batches=batches, comm=comm)
    rec = {
        "task": [r.task for r in ft.steps], "maxvio": [r.maxvio for r in ft.steps],
        "logs": [{"step": r.step, "losses": r.losses, "discrim": r.discrim,
                  "cosines": {g: m.tolist() for g, m in r.cosines.items()}, "norms": r.norms}
                 for r in ft.logs],
        "eval": evaluate(ft.params, cfg, held, study.overlap_points, seed),
    }
    if run.is_sweep:
        rec["factor"] = run.factor
    return rec


def seed_units(study: StudyConfig) -> list:
    """The (preset, RunId) pairs fine-tuned from each seed's checkpoint, in report order."""
    return [(preset, run) for preset in study.presets for run in fine_tuning_runs(study)]


def collect_seed(study: StudyConfig, start: SeedStart, runs: dict) -> dict:
    """The seed's nested dict: ``finetune[preset][combo]`` per loss combination and
    ``finetune[preset]["sweep"][run.label]`` per sweep run; ``runs`` maps (preset, RunId) to its record."""
    out = {"pretrain": start.record["pretrain"],
           "finetune": {p: {**start.record["finetune"][p], "sweep": {}} for p in study.presets}}
    for preset, run in seed_units(study):
        if run.is_sweep:
            out["finetune"][preset]["sweep"][run.label] = runs[preset, run]
        else:
            out["finetune"][preset][run.combo] = runs[preset, run]
    return out


def run_seed(study: StudyConfig, seed: int, *, status: Callable[[str], None] = print,
             on_run: Callable[[str, int], None] | None = None, comm=None) -> dict:
    """Pre-train once, then fine-tune under every (preset, run), in this process. Returns a nested dict of
    host values (``collect_seed``). ``status`` gets one line per logging step; ``on_run(name, steps)`` is
    called before each training run."""
    start = pretrain_seed(study, seed, status=status, on_run=on_run, comm=comm)
    runs = {unit: finetune_run(study, start, *unit, status=status, on_run=on_run, comm=comm)
            for unit in seed_units(study)}
    return collect_seed(study, start, runs)


# ----------------------------------------------------------------------------------------------
# every seed, then the summary and the verdicts
# ----------------------------------------------------------------------------------------------

class StudyResult(NamedTuple):
    study: StudyConfig
    per_seed: list           # run_seed output per seed
    summary: dict            # preset -> combo -> metric -> [mean, sd]
    claims: dict             # preset -> list of claim rows
    sweep: dict              # preset -> aux+ortho+var at scaled beta, gamma (summary.sweep_summary)
    seconds: float           # wall time of the training and evaluation
    environment: dict        # refmoe.study.environment of the process(es) that trained, and "workers"


def run_study(study: StudyConfig, *, status: Callable[[str], None] = print,
              progress: Progress | None = None, workers: int = 1, comm=None) -> StudyResult:
    """Every seed, then the summary and the verdicts. ``status`` gets the per-logging-step lines; ``progress``
    (a Progress) is told when each training run starts and closed at the end. ``workers`` > 1 trains on that
    many processes (``refmoe.study.parallel``, on either backend); 1 trains in this process. ``comm`` (a
    ``refmoe.distributed`` communicator, every rank calling run_study) splits every batch over its ranks:
    the same numbers, to round-off (``refmoe.study.data_parallel``)."""
    from .parallel import check_workers, run_parallel

    problem = check_workers(workers)
    if problem:
        raise ValueError(problem.replace("--workers ", "workers="))
    if comm is not None and workers > 1:
        raise ValueError(f"workers={workers} with a communicator: each rank trains in its own process")
    t0 = time.perf_counter()
    on_run = progress.start if progress is not None else None
    try:
        if workers > 1:
            per_seed, env = run_parallel(study, workers, status=status, on_run=on_run)
        else:
            per_seed = [run_seed(study, seed, status=status, on_run=on_run, comm=comm) for seed in study.seeds]
            env = {**environment(study.backend), "workers": 1}
            if comm is not None:
                env["data_parallel_ranks"] = comm.size
    finally:
        if progress is not None:
            progress.close()
    summary = summarize(per_seed, study.presets, study.combos)
    claims = {p: claim_rows(per_seed, p, study.combos) for p in study.presets}
    sweep = sweep_summary(per_seed, study.presets)
    return StudyResult(study, per_seed, summary, claims, sweep, time.perf_counter() - t0, env)
