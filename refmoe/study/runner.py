"""The specialisation study: one seed = one pre-training on the broad mixture, then every (preset, loss
combination) fine-tuning on the narrow domain from that checkpoint; over all seeds, the summary and the verdicts.

    result = run_study(study, progress=Progress(count_runs(study), count_steps(study)))  # "run i/N ... ETA"
    write_report(result, "reproduce_report")     # refmoe.study.report: figures, results.json, report.md

No array is shaped here (parameters and batches are those of ``refmoe.study.train``); the results are nested
dicts of host values (Python floats and lists) on either backend.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, NamedTuple, TextIO

import numpy as np

from ..config import MoEConfig
from ..layer import init_params
from ..objective import PRESETS
from . import data as D_
from .evaluate import evaluate
from .optim import AdamConfig
from .summary import claim_rows, summarize, sweep_summary
from .train import COMBOS, SWEEP_COMBO, LogRecord, RunId, pretrain_objective, train_phase

# ----------------------------------------------------------------------------------------------
# one seed: pre-training, then every fine-tuning run from that checkpoint
# ----------------------------------------------------------------------------------------------

class StudyConfig(NamedTuple):
    """Every knob of the study (the flags of ``refmoe reproduce``). The defaults (11 seeds) take about 9 minutes
    with NumPy on 2 CPU cores (555 s measured, benchmarks/reproduce_numpy_cpu/). ``alpha`` replaces the presets' L_aux coefficient (1e-3) in phase 2, because at
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


def run_seed(study: StudyConfig, seed: int, *, status: Callable[[str], None] = print,
             on_run: Callable[[str, int], None] | None = None) -> dict:
    """Pre-train once, then fine-tune under every (preset, run). Returns a nested dict of host values:
    ``finetune[preset][combo]`` per loss combination, ``finetune[preset]["sweep"][run.label]`` per sweep run.
    ``status`` gets one line per logging step; ``on_run(name, steps)`` is called before each training run."""
    on_run = on_run or (lambda name, steps: None)
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

    on_run(f"seed {seed} pretrain", study.pretrain_steps)
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
        out["finetune"][preset]["sweep"] = {}
        for run in fine_tuning_runs(study):
            on_run(f"seed {seed} {preset}:{run.label}", study.finetune_steps)
            ft_rng = np.random.default_rng([seed, 13])               # same batches for every run
            ft = train_phase(dict(pre.params), cfg, run.objective(base), task, ft_rng, steps=study.finetune_steps,
                             batch_size=study.batch_size, domain="narrow", adam=adam,
                             log_every=study.log_every, backend=study.backend, dtype=dtype,
                             on_log=logger(f"{preset}:{run.label}"))
            rec = {
                "task": [r.task for r in ft.steps], "maxvio": [r.maxvio for r in ft.steps],
                "logs": [{"step": r.step, "losses": r.losses, "discrim": r.discrim,
                          "cosines": {g: m.tolist() for g, m in r.cosines.items()}, "norms": r.norms}
                         for r in ft.logs],
                "eval": evaluate(ft.params, cfg, held, study.overlap_points, seed),
            }
            if run.is_sweep:
                rec["factor"] = run.factor
                out["finetune"][preset]["sweep"][run.label] = rec
            else:
                out["finetune"][preset][run.combo] = rec
    return out


# ----------------------------------------------------------------------------------------------
# progress: run i/N <name> ... ETA mm:ss
# ----------------------------------------------------------------------------------------------

def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 6000:                                   # 100 minutes and more: hours and minutes
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class Progress:
    """``run i/N <name> ... ETA mm:ss`` before each training run: on a terminal one line rewritten in place,
    otherwise (piped, a log file) one plain line per run. The ETA is the elapsed time per optimizer step so far
    times the steps left (pre-training and fine-tuning runs differ in length); ``--:--`` before the first run ends.

        progress = Progress(count_runs(study), count_steps(study))
        run_study(study, status=progress.note, progress=progress)
    """

    def __init__(self, total_runs: int, total_steps: int, *, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total_runs, self.total_steps = total_runs, max(1, total_steps)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.clock = clock
        self.i, self.done_steps, self.current_steps = 0, 0, 0
        self.t0 = None
        self.line = ""

    def eta(self) -> str:
        if self.done_steps == 0 or self.t0 is None:
            return "--:--"
        rate = (self.clock() - self.t0) / self.done_steps
        return _mmss(rate * (self.total_steps - self.done_steps))

    def start(self, name: str, steps: int):
        """A training run of ``steps`` steps begins (the previous one, if any, has finished)."""
        if self.t0 is None:
            self.t0 = self.clock()
        self.done_steps += self.current_steps
        self.current_steps = steps
        self.i += 1
        self.line = f"run {self.i}/{self.total_runs} {name} ... ETA {self.eta()}"
        self._show()

    def note(self, text: str):
        """A line of detail (a logging step's losses) printed above the progress line."""
        if self.tty:
            self.stream.write("\r\x1b[K" + text + "\n")
            self._show()
        else:
            print(text, file=self.stream, flush=True)

    def _show(self):
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line)
            self.stream.flush()
        else:
            print(self.line, file=self.stream, flush=True)

    def close(self):
        """Ends the updating line on a terminal (the last run has finished or the study was interrupted)."""
        if self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""


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


def run_study(study: StudyConfig, *, status: Callable[[str], None] = print,
              progress: Progress | None = None) -> StudyResult:
    """Every seed, then the summary and the verdicts. ``status`` gets the per-logging-step lines; ``progress``
    (a Progress) is told when each training run starts and closed at the end."""
    t0 = time.perf_counter()
    per_seed = []
    on_run = progress.start if progress is not None else None
    try:
        for seed in study.seeds:
            per_seed.append(run_seed(study, seed, status=status, on_run=on_run))
    finally:
        if progress is not None:
            progress.close()
    summary = summarize(per_seed, study.presets, study.combos)
    claims = {p: claim_rows(per_seed, p, study.combos) for p in study.presets}
    sweep = sweep_summary(per_seed, study.presets)
    return StudyResult(study, per_seed, summary, claims, sweep, time.perf_counter() - t0)
