"""The data-parallel step on CuPy arrays over NCCL (cupyx.distributed), one GPU per rank.

    python tests/nccl_worker.py WORLD                     # start WORLD ranks (devices 0 .. WORLD-1), check, report
    python tests/nccl_worker.py WORLD RANK PORT OUTDIR    # one rank (what the first form starts)

The ranks run the steps of tests/mpi_worker.py (the same global batch, split as there, float64 and float32) on
their GPU through ``refmoe.distributed.nccl_communicator``, check with MAX all-reduces that they hold the same
gradients bit for bit, and write their results; the launcher compares them with the one-process NumPy run on the
concatenated batch, prints one JSON line {"size", "errors", "identical", "seconds"} and exits 1 when a float64
error passes 1e-12 (float32: 1e-5), the ranks disagree, or a rank fails. WORLD = 1 is the smoke test of
tests/test_distributed_nccl.py; WORLD = 2 needs two GPUs (docs/distributed.md).
"""
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mpi_worker import CFG, OBJECTIVES, RUNS, SIZES, data, one_process, rel, shape  # noqa: E402

TIMEOUT = 300


def rank_main(world: int, rank: int, port: int, outdir: str) -> int:
    import cupy

    from refmoe import to_numpy
    from refmoe.distributed import data_parallel_step, nccl_communicator

    comm = nccl_communicator(world, rank, port=port)
    params, x, t, mask, _ = data()
    ends = np.cumsum(SIZES[world])
    mine = np.arange(ends[rank] - SIZES[world][rank], ends[rank])
    out, same = [], True
    try:
        comm.allreduce_sum(np.ones(1))
        refused = False
    except TypeError:
        refused = True                                   # NumPy arrays are not moved to the GPU behind one's back
    for name, residual, dtype in RUNS:
        p = {k: cupy.asarray(v.astype(dtype)) for k, v in params.items()}
        batch = SimpleNamespace(x=cupy.asarray(x[mine].astype(dtype)), target=cupy.asarray(t[mine].astype(dtype)))
        res = data_parallel_step(comm, p, batch, CFG, OBJECTIVES[name], residual=residual,
                                 valid_mask=cupy.asarray(mask[mine]), batch_shape=shape(name, len(mine)))
        flat = cupy.concatenate([res.grads[k].reshape(-1) for k in sorted(res.grads)]).astype(np.float64)
        same = same and bool((comm.allreduce_max(flat) == flat).all() and (comm.allreduce_max(-flat) == -flat).all())
        out.append(({k: to_numpy(v) for k, v in res.grads.items()}, {k: float(v) for k, v in res.totals.items()},
                    {k: float(v) for k, v in res.losses.items()}, to_numpy(res.dx)))
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump({"runs": out, "identical": same, "refused_numpy": refused}, f)
    return 0


def launch(world: int) -> int:
    start = time.perf_counter()
    with socket.socket() as s:                           # a free port for cupyx.distributed's TCP store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(world), str(r), str(port), outdir])
                 for r in range(world)]
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
        if any(codes):
            print(json.dumps({"size": world, "failed_ranks": [r for r, c in enumerate(codes) if c]}), flush=True)
            return 1
        ranks = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
                ranks.append(pickle.load(f))
    params, x, t, mask, _ = data()
    errors = {}
    for j, (name, residual, dtype) in enumerate(RUNS):
        tag = f"{name}{'_residual' if residual else ''}{'_f32' if dtype == np.float32 else ''}"
        losses, grads, dx = one_process(params, x, t, mask, name, residual)
        grads_r, totals, _, _ = ranks[0]["runs"][j]
        errors[f"step_{tag}_grads"] = max(rel(grads_r[k], grads[k]) for k in grads_r)
        errors[f"step_{tag}_losses"] = max(rel(totals[k], float(losses[k])) for k in totals)
        errors[f"step_{tag}_shares"] = max(rel(sum(g["runs"][j][2][k] for g in ranks), float(losses[k]))
                                           for k in totals)
        errors[f"step_{tag}_dx"] = rel(np.concatenate([g["runs"][j][3] for g in ranks]), dx)
    same = all(g["identical"] for g in ranks)
    refused = all(g["refused_numpy"] for g in ranks)
    ok = same and refused and all(v <= (1e-5 if "_f32" in k else 1e-12) for k, v in errors.items())
    print(json.dumps({"size": world, "sizes": list(SIZES[world]), "errors": errors, "identical": same,
                      "refused_numpy": refused, "seconds": round(time.perf_counter() - start, 3)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 1:
        sys.exit(launch(int(args[0])))
    if len(args) == 4:
        sys.exit(rank_main(int(args[0]), int(args[1]), int(args[2]), args[3]))
    sys.exit(__doc__)
