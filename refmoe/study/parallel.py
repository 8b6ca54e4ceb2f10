"""The study's training runs spread over worker processes, one BLAS thread each.

A seed's pre-training must finish before its fine-tuning runs start; the runs themselves are independent. The
parent submits every pre-training, and each seed's runs as soon as its checkpoint is back, to a pool of
``workers`` processes (``multiprocessing`` "spawn": no state is inherited but the arguments). The records come
back as host values and are put together in seed order, so the result does not depend on the order the runs
finished in.

Every worker runs with one BLAS thread (``OPENBLAS_NUM_THREADS`` and friends set to 1 before the worker imports
NumPy), and so does the parent when it trains itself (``workers=1``) only if it was started that way. The
study's matrices are small (a batch of 256 tokens against widths of 16 to 32), far below the size at which a
BLAS splits a product over threads, so in practice the numbers do not change with the worker count;
``tests/test_parallel.py`` checks that on a small study.

On CuPy every worker opens its own CUDA context on the default GPU (device 0 of those CUDA_VISIBLE_DEVICES
shows). The study's steps are far too small to fill the GPU (a batch of 256 tokens at D = 32), so one process
leaves it idle most of the time, waiting on Python and on launches; several processes take turns on it. A
seed's checkpoint travels between processes as NumPy arrays (an explicit copy to the host in the worker that
pre-trained, and back to the device in each worker that fine-tunes), so the parent never computes on the GPU
(it only asks CuPy whether a device is there, before, and for the device's name, after). Each run computes the
same operations on the same device whichever process runs it, so its numbers do not depend on the worker count
either (tested on the GPU).

Progress and ``--verbose`` lines come back through a queue and are printed by the parent.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_mod
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from .environment import THREAD_VARS, environment

_events = None                      # in a worker: the queue back to the parent


CUPY_WORKERS = 4       # processes sharing one GPU by default (1 to 8 timed: benchmarks/bench_study_workers.py)


def default_workers(backend: str) -> int:
    """One worker per CPU, at most 2, on NumPy; on CuPy one per CPU, at most CUPY_WORKERS, on the one GPU."""
    cap = 2 if backend == "numpy" else CUPY_WORKERS
    return max(1, min(cap, os.cpu_count() or 1))


def check_workers(workers: int) -> str | None:
    """What is wrong with ``workers`` (on either backend), in one line, or None."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        return f"--workers {workers}: must be an integer >= 1"
    return None


def _init_worker(events):
    global _events
    _events = events


def _status(line: str):
    _events.put(("note", None, line, 0))


def _on_run(name: str, steps: int):
    _events.put(("run", os.getpid(), name, steps))


def _pretrain(study, seed):
    from ..backend import to_numpy
    from .runner import pretrain_seed

    start = pretrain_seed(study, seed, status=_status, on_run=_on_run)
    host = {k: to_numpy(w) for k, w in start.params.items()}          # the checkpoint leaves as NumPy arrays
    return start._replace(params=host), environment(study.backend)


def _finetune(study, start, preset, run):
    from ..backend import to_backend
    from .runner import finetune_run

    params = {k: to_backend(w, study.backend) for k, w in start.params.items()}
    return finetune_run(study, start._replace(params=params), preset, run, status=_status, on_run=_on_run)


@contextlib.contextmanager
def _one_blas_thread():
    """The BLAS thread variables at 1 while the pool starts its workers (they read them at import)."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: "1" for k in THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_parallel(study, workers: int, *, status, on_run) -> tuple:
    """Every seed's pre-training and fine-tuning runs on ``workers`` processes.
    Returns (per-seed dicts in seed order, the workers' environment)."""
    from .runner import collect_seed, seed_units

    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    starts, runs, env = {}, {seed: {} for seed in study.seeds}, None

    def relay(block=False):
        while True:
            try:
                kind, worker, text, steps = events.get(timeout=0.2) if block else events.get_nowait()
            except queue_mod.Empty:
                return
            block = False
            if kind == "run":
                if on_run is not None:
                    on_run(text, steps, worker)
            else:
                status(text)

    with _one_blas_thread(), ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                 initargs=(events,)) as pool:
        pending = {pool.submit(_pretrain, study, seed): (seed, None) for seed in study.seeds}
        try:
            while pending:
                relay(block=True)
                done, _ = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                for fut in done:
                    seed, unit = pending.pop(fut)
                    if unit is None:
                        starts[seed], env = fut.result()
                        for u in seed_units(study):
                            pending[pool.submit(_finetune, study, starts[seed], *u)] = (seed, u)
                    else:
                        runs[seed][unit] = fut.result()
            relay()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)      # the runs under way finish; none starts
            raise
    per_seed = [collect_seed(study, starts[seed], runs[seed]) for seed in study.seeds]
    return per_seed, {**env, "workers": workers}
