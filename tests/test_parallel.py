"""The study on several worker processes: the same numbers as in one process, every run announced once, and
the flags it refuses."""
import io
import json

import pytest

from refmoe.study.parallel import check_workers, default_workers
from refmoe.study.progress import Progress
from refmoe.study.runner import StudyConfig, count_runs, count_steps, run_study

SMALL = StudyConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_clusters=4, batch_size=32, pretrain_steps=6,
                    finetune_steps=4, log_every=2, eval_tokens=64, overlap_points=40, seeds=(0, 1, 2),
                    combos=("aux", "aux+ortho+var"), sweep=(0.5,))


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)     # repr of a float: every bit


def test_two_workers_give_the_numbers_of_one_process(backend):
    study = SMALL._replace(backend=backend)
    one = run_study(study, status=lambda line: None, workers=1)
    notes, stream = [], io.StringIO()
    progress = Progress(count_runs(study), count_steps(study), stream=stream, tty=False)
    two = run_study(study, status=notes.append, progress=progress, workers=2)
    for part in ("per_seed", "claims", "summary", "sweep"):    # every record, bit for bit (NaN where NaN)
        assert same(getattr(two, part), getattr(one, part)), part
    assert two.environment["workers"] == 2 and one.environment["workers"] == 1
    assert ("gpu" in two.environment) == (backend == "cupy") == ("gpu" in one.environment)
    assert two.environment["thread_env"] == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                             "MKL_NUM_THREADS": "1"}
    runs = [ln for ln in stream.getvalue().splitlines() if ln.startswith("run ")]
    # 3 seeds x (pre-training + 2 presets x (2 combos + 1 sweep run)) = 21 runs, each announced once
    assert [ln.split()[1] for ln in runs] == [f"{i}/21" for i in range(1, 22)]
    assert sorted(ln.split(" ... ")[0].split(" ", 2)[2] for ln in runs) == sorted(
        [f"seed {s} pretrain" for s in range(3)]
        + [f"seed {s} {p}:{r}" for s in range(3) for p in ("paper", "authors_code")
           for r in ("aux", "aux+ortho+var", "sweep:0.5")])
    # the --verbose lines come back from the workers: per seed 4 in pre-training (1, 2, 4, 6), 3 per run (1, 2, 4)
    assert len(notes) == 3 * (4 + 6 * 3)


def test_an_error_in_a_worker_reaches_the_caller():
    bad = SMALL._replace(top_k=9)                      # refused by init_params inside the worker
    with pytest.raises(ValueError, match="top_k=9 exceeds n_experts=4"):
        run_study(bad, status=lambda line: None, workers=2)


def test_progress_counts_a_run_done_when_its_worker_starts_the_next():
    clock = iter([0.0, 10.0, 12.0]).__next__      # read at the first start and by every ETA after a run is done
    stream = io.StringIO()
    p = Progress(4, 40, stream=stream, tty=False, clock=clock)
    p.start("a", 10, worker=1)                  # t = 0
    p.start("b", 10, worker=2)                  # nothing done yet: no ETA
    p.start("c", 10, worker=1)                  # t = 10: a done (10 steps, 1 s/step), 30 left
    p.start("d", 10, worker=1)                  # t = 12: c done too (20 steps, 0.6 s/step), 20 left
    lines = stream.getvalue().splitlines()
    assert lines == ["run 1/4 a ... ETA --:--", "run 2/4 b ... ETA --:--", "run 3/4 c ... ETA 00:30",
                     "run 4/4 d ... ETA 00:12"]


@pytest.mark.parametrize("workers, backend, message", [
    (0, "numpy", "--workers 0: must be an integer >= 1"),
    (-2, "cupy", "--workers -2: must be an integer >= 1"),
    (True, "numpy", "--workers True: must be an integer >= 1"),
    (2.0, "numpy", "--workers 2.0: must be an integer >= 1"),
])
def test_bad_worker_counts_are_named(workers, backend, message):
    assert message in check_workers(workers)
    with pytest.raises(ValueError, match="workers="):
        run_study(SMALL._replace(backend=backend), workers=workers)


def test_default_workers(monkeypatch):
    import refmoe.study.parallel as par

    assert 1 <= default_workers("numpy") <= 2 and 1 <= default_workers("cupy") <= par.CUPY_WORKERS == 4
    for backend in ("numpy", "cupy"):
        assert check_workers(default_workers(backend)) is None
    assert check_workers(3) is None
    monkeypatch.setattr(par.os, "cpu_count", lambda: 16)
    assert (default_workers("numpy"), default_workers("cupy")) == (2, 4)
    monkeypatch.setattr(par.os, "cpu_count", lambda: None)
    assert (default_workers("numpy"), default_workers("cupy")) == (1, 1)


def test_the_command_trains_on_workers(backend, tmp_path, capsys):
    from refmoe.cli import main

    tiny = ["--quick", "--pretrain-steps", "3", "--finetune-steps", "2", "--presets", "paper", "--combos", "aux",
            "--sweep", "--eval-tokens", "32", "--no-figures", "--backend", backend]
    assert main(["reproduce", *tiny, "--workers", "2", "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert f"= 4 training runs on {backend}, 2 worker processes" in printed
    report = (tmp_path / "rep" / "report.md").read_text()
    assert ", 1 thread (OPENBLAS_NUM_THREADS=1, OMP_NUM_THREADS=1, MKL_NUM_THREADS=1) in each of 2 worker processes" \
        in report
    gpu = [ln for ln in report.splitlines() if ln.startswith("- CuPy ")]
    if backend == "cupy":
        assert len(gpu) == 1 and "CUDA device 0: " in gpu[0] and gpu[0].endswith(", shared by 2 worker processes")
    else:
        assert gpu == []
    assert main(["reproduce", *tiny, "--workers", "0", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --workers 0: must be an integer >= 1"]
    assert not (tmp_path / "b").exists()


def test_the_worker_benchmark_times_each_count_and_compares_the_records(tmp_path, capsys, monkeypatch):
    import importlib
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    bench_study_workers = importlib.import_module("bench_study_workers")

    out = tmp_path / "w.json"
    assert bench_study_workers.main(["--backend", "numpy", "--quick", "--seeds", "2", "--workers", "1", "2",
                                     "--json", str(out)]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["workers"] for r in rows] == [1, 2] and all(r["same_as_first"] for r in rows)
    assert all(r["seconds"] > 0 and r["gpu"] is None for r in rows)
    saved = json.loads(out.read_text())
    assert saved["backend"] == "numpy" and saved["seeds"] == 2 and saved["rows"] == rows
    with pytest.raises(SystemExit):
        bench_study_workers.main(["--workers", "0"])
