"""The study trained data-parallel: every batch split over R ranks gives the one-process numbers to round-off and
the same verdicts; on threads (tests/thread_comm.py) and under ``mpiexec -n 2`` through ``refmoe reproduce
--data-parallel``; and the launches the command refuses."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from refmoe.cli import main
from refmoe.objective import PRESETS
from refmoe.study.data_parallel import data_parallel_objective, gather_rows, rank_rows
from refmoe.study.runner import StudyConfig, run_study
from test_distributed_mpi import MISSING, REQUIRED, ROOT, mpi_env, mpiexec
from thread_comm import run_ranks

SMALL = StudyConfig(d_model=8, d_hidden=8, n_experts=4, top_k=2, n_clusters=4, batch_size=33, pretrain_steps=6,
                    finetune_steps=5, log_every=2, eval_tokens=64, overlap_points=40, seeds=(0, 1),
                    combos=("aux", "aux+ortho+var"), sweep=(0.5,), dtype="float64")
# MaxVio, L_h, cosines and norms to round-off; the silhouette's pairwise distances |a|^2 + |b|^2 - 2ab cancel,
# which turns 1e-15 in the parameters into ~4e-8 in it (measured)
METRIC_TOL = {"silhouette": 1e-6}


def differences(a, b, path=""):
    """(relative difference, path) of every float of two nested records (floor 1e-3; NaN = NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in differences(u, v, f"{path}[{i}]")]
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), path
            return []
        return [(abs(a - b) / max(abs(a), 1e-3), path)]
    assert a == b, path
    return []


def verdicts(claims):
    return [(p, r["id"], r["verdict"]) for p in claims for r in claims[p]]


def worst(diffs, tol_by_metric):
    """The largest difference outside the metrics of ``tol_by_metric``, and whether those stay in bounds."""
    plain = max((d for d, p in diffs if not any(f"/{m}" in p for m in tol_by_metric)), default=0.0)
    special = all(d < tol for d, p in diffs for m, tol in tol_by_metric.items() if f"/{m}" in p)
    return plain, special


@pytest.mark.parametrize("ranks", [2, 3])
def test_threads_as_ranks_give_the_one_process_study(ranks):
    one = run_study(SMALL, status=lambda line: None)
    results, _ = run_ranks(ranks, lambda comm: run_study(SMALL, status=lambda line: None, comm=comm))
    assert all(json.dumps(r.per_seed) == json.dumps(results[0].per_seed) for r in results)   # every rank alike
    plain, special = worst(differences(one.per_seed, results[0].per_seed), METRIC_TOL)
    assert plain < 1e-11 and special          # float64: measured 1.4e-13 (a cosine of the input gradients)
    assert verdicts(results[0].claims) == verdicts(one.claims)
    assert results[0].environment["data_parallel_ranks"] == ranks


def test_float32_ranks_stay_at_float32_round_off():
    st = SMALL._replace(dtype="float32")
    one = run_study(st, status=lambda line: None)
    results, _ = run_ranks(2, lambda comm: run_study(st, status=lambda line: None, comm=comm))
    plain, _ = worst(differences(one.per_seed, results[0].per_seed), {})
    assert plain < 1e-3                       # measured 9.7e-5 (a cosine at a logging step)
    assert verdicts(results[0].claims) == verdicts(one.claims)


def test_rank_rows_cover_the_batch_once_and_gather_puts_them_back():
    class Fake:
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

    for n, size in ((33, 2), (33, 3), (5, 4), (2, 3)):
        rows = [rank_rows(n, Fake(r, size)) for r in range(size)]
        assert np.concatenate([np.arange(n)[s] for s in rows]).tolist() == list(range(n))
        assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1
    rng = np.random.default_rng(0)
    full, idx = rng.standard_normal((7, 3)), rng.integers(0, 16, (7, 2))

    def gather(comm):
        rows = rank_rows(7, comm)
        return gather_rows(comm, full[rows], rows, 7), gather_rows(comm, idx[rows], rows, 7)

    for got, got_idx in run_ranks(3, gather)[0]:
        assert np.array_equal(got, full) and np.array_equal(got_idx, idx) and got_idx.dtype == idx.dtype


def test_one_sequence_deepseek_seq_runs_as_the_global_deepseek_batch():
    obj = data_parallel_objective(PRESETS["authors_code"])
    assert obj.aux_variant == "deepseek_batch" and obj.ortho_variant == PRESETS["authors_code"].ortho_variant
    assert data_parallel_objective(PRESETS["paper"]) == PRESETS["paper"]


TINY = ["--quick", "--pretrain-steps", "6", "--finetune-steps", "4", "--log-every", "2", "--combos", "aux",
        "aux+ortho+var", "--sweep", "--eval-tokens", "64", "--no-figures", "--dtype", "float64"]


@pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=f"{MISSING} (pip install mpi4py mpich)")
def test_reproduce_under_mpiexec_gives_the_one_process_report(tmp_path):
    if MISSING is not None:
        pytest.fail(f"REFMOE_REQUIRE_MPI=1 but {MISSING}")
    assert main(["reproduce", *TINY, "--workers", "1", "--quiet", "--out", str(tmp_path / "one")]) == 0
    env = mpi_env()
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "refmoe", "reproduce", *TINY, "--data-parallel",
           "--out", str(tmp_path / "dp")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("refmoe reproduce:") == 1 and "data-parallel over 2 MPI ranks" in proc.stdout
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    dp = json.loads((tmp_path / "dp" / "results.json").read_text())
    plain, special = worst(differences(one["per_seed"], dp["per_seed"]), METRIC_TOL)
    assert plain < 1e-11 and special          # float64, 2 ranks of 64 tokens: measured ~1e-13
    assert verdicts(dp["claims"]) == verdicts(one["claims"])
    assert dp["environment"]["data_parallel_ranks"] == 2
    assert "data-parallel over 2 MPI ranks" in (tmp_path / "dp" / "report.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["dp", "one"]            # one report, no staging folder left


@pytest.mark.parametrize("flags, env, message", [
    ([], {"PMI_SIZE": "2"}, "launched as one of 2 MPI ranks: add --data-parallel"),
    (["--data-parallel", "--backend", "cupy"], {}, "--data-parallel: MPI moves host arrays; use --backend numpy"),
    (["--data-parallel", "--workers", "2"], {}, "--workers 2 with --data-parallel"),
])
def test_launches_the_command_refuses(tmp_path, capsys, monkeypatch, flags, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["reproduce", "--quick", *flags, "--out", str(tmp_path / "rep")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and message in cap.err
    assert os.listdir(tmp_path) == []
