"""refmoe.distributed on a real MPI engine: ``mpiexec -n 2`` and ``-n 3`` on tests/mpi_worker.py.

Each run checks, on rank 0, every rank's shares and slices and the all-reduced gradients of the data-parallel step
against the one-process run on the concatenated batch (float64 to 1e-12), that every rank holds the same bits
of the gradients, and writes each rank's dump of the golden ``dist_*_r<R>`` cases, which ``check_dump`` compares
here. Skipped, with the reason, without mpi4py or an ``mpiexec`` (``pip install mpi4py mpich``), unless
``REFMOE_REQUIRE_MPI=1`` (set by .ci/run, which installs them), which makes that a failure.

MPICH from the ``mpich`` wheel runs on one host without a network: its ranks talk through shared memory; the
launcher sets ``UCX_TLS=self,sm`` (UCX's shared-memory and self transports only) unless it is set already, so no
network device is looked for. Three ranks on two cores oversubscribe, which MPICH's hydra allows.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from refmoe.golden import check_dump, load_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mpi_worker.py")
TIMEOUT = 300


def mpiexec():
    """The mpiexec beside this Python (the mpich wheel's), else the first on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


MISSING = ("mpi4py is not installed" if importlib.util.find_spec("mpi4py") is None
           else "no mpiexec beside this Python or on PATH" if mpiexec() is None else None)
REQUIRED = os.environ.get("REFMOE_REQUIRE_MPI") == "1"      # .ci/run: a missing MPI fails instead of skipping
pytestmark = pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=f"{MISSING} (pip install mpi4py mpich)")


def mpi_env() -> dict:
    """The environment for an mpiexec child: the repository importable, UCX on shared memory, and (for a
    container's root, which Open MPI refuses unless told; MPICH ignores the variables) root allowed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.setdefault("UCX_TLS", "self,sm")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run_worker(size: int, *args):
    if MISSING is not None:
        pytest.fail(f"REFMOE_REQUIRE_MPI=1 but {MISSING}")
    env = mpi_env()
    start = time.perf_counter()
    proc = subprocess.run([mpiexec(), "-n", str(size), sys.executable, WORKER, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_under_mpiexec_equal_the_one_process_run(size, golden, tmp_path):
    shutil.copytree(golden, tmp_path / "golden")
    proc, seconds = run_worker(size, str(tmp_path))
    assert proc.returncode == 0, f"mpiexec -n {size} failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout                                    # rank 0 reports, the others stay quiet
    report = json.loads(lines[0])
    assert report["size"] == size and report["identical"], report
    assert 0 in report["sizes"] if size == 3 else min(report["sizes"]) > 0  # R = 3: a rank without tokens
    errors = report["errors"]
    assert len(errors) == 5 * 4 + 4                                        # 5 steps x 4 checks, 2 systems x 2
    for name, err in errors.items():
        assert err <= (1e-5 if "_f32" in name else 1e-12), (name, err)    # measured <= 4e-16 (float32: 4e-7)
    assert errors["step_megatron_f32_grads"] > 1e-9                       # float32 is not float64 in disguise

    cases = sorted(n for n, e in load_manifest(golden)["cases"].items() if e.get("world_size") == size)
    assert len(cases) == 3 * size                                          # three groups of R ranks
    dumped = check_dump(golden, str(tmp_path / "dump"), cases=cases, require_all=True)
    assert dumped.ok and len(dumped.checked) == len(cases), dumped.format()
    f64 = max(v for k, v in errors.items() if "_f32" not in k)
    print(f"mpiexec -n {size}: {seconds:.2f} s, worst float64 error {f64:.1e}, float32 "
          f"{max(v for k, v in errors.items() if '_f32' in k):.1e}")
