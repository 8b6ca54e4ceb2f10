"""Smoke test of benchmarks/bench_data_parallel.py on the CPU: one rank (SingleProcess), the tiny shape; its
reported task loss is the global MSE of the layer on the whole batch, and its flags are checked."""
import json
import os
import subprocess
import sys

import numpy as np

import refmoe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_data_parallel.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import peers_env  # noqa: E402


def run(*flags):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, SCRIPT, *flags], env=env, capture_output=True, text=True, timeout=300)


def test_one_rank_on_numpy_reports_the_global_batch(tmp_path):
    proc = run("--world", "1", "--shape", "tiny", "--backend", "numpy", "--reps", "2", "--warmup", "0",
               "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert [r["rows"] for r in report["ranks"]] == [64] and report["step_ms"] > 0
    inp = peers_env.make_inputs("tiny", np.float32)
    target = inp.x + np.float32(0.1) * np.roll(inp.x, 1, axis=1)
    y, _ = refmoe.moe_forward(inp.x, inp.params, inp.cfg)
    task = float(((y - target) ** 2).mean())
    assert abs(report["totals"]["task"] - task) <= 1e-5 * task          # float32: measured ~1e-7


def test_numpy_with_several_ranks_is_refused():
    proc = run("--world", "2", "--backend", "numpy")
    assert proc.returncode == 2 and "--backend numpy runs one rank" in proc.stderr
