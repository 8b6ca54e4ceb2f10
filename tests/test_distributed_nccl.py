"""refmoe.distributed over NCCL (CuPy's cupyx.distributed): one rank on one GPU, the smoke test of the code a
two-GPU run uses (``python tests/nccl_worker.py 2``, docs/distributed.md). Skipped without CuPy, a CUDA device or
NCCL."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "nccl_worker.py")


def test_one_rank_over_nccl_equals_the_one_process_run(cp):
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("CuPy was built without NCCL")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, WORKER, "1"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["size"] == 1 and report["identical"] and report["refused_numpy"]
    assert len(report["errors"]) == 5 * 4
    for name, err in report["errors"].items():
        assert err <= (1e-5 if "_f32" in name else 1e-12), (name, err)
