"""The data-parallel step of ``refmoe.distributed`` timed on R GPUs over NCCL, beside the same global batch on one.

    python3 benchmarks/bench_data_parallel.py --world 2 --shape 16b --preset paper --json OUT.json   # 2 GPUs
    python3 benchmarks/bench_data_parallel.py --world 1 --shape 16b                                  # 1 GPU
    python3 benchmarks/bench_data_parallel.py --world 1 --shape tiny --backend numpy                 # CPU smoke

One global batch (``peers_env.make_inputs``: the shapes and presets of bench_peers.py, float32) is split into R
contiguous row blocks; rank r runs ``data_parallel_step(comm, params, its rows, cfg, objective,
forward=refmoe.fast.moe_forward)`` with a target made from the inputs (the task is the global MSE), on GPU r, the
ranks started by this script with a free port for cupyx.distributed's TCP store. Each rank times ``--reps`` steps
after ``--warmup`` (device synchronised around each step; the replica check off inside the timed steps, run once
before them), and the launcher prints one JSON line: per rank the median and min-max step time in ms, the
slowest rank's median (the step time of the group) and the totals of the global batch's losses. With
``--backend numpy`` the single rank runs on the CPU through ``SingleProcess`` (the smoke test of this script).
Keep NVLink multicast off on a multi-GPU host (``NCCL_NVLS_ENABLE=0``, the default this script sets).
"""
from __future__ import annotations

import argparse
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def _rank(args, rank: int, port: int, outdir: str) -> None:
    from peers_env import SHAPES, make_inputs, objective_of, presets
    from refmoe.distributed import SingleProcess, data_parallel_step, nccl_communicator
    from refmoe.fast import moe_forward
    from refmoe.study.data_parallel import rank_rows

    inp = make_inputs(args.shape, np.float32)
    obj = objective_of(presets()[args.preset])
    B, T = SHAPES[args.shape][7]
    if B % args.world == 0:
        batch_shape = (B // args.world, T)                       # whole sequences per rank: N = B T
    elif obj.aux_variant == "deepseek_seq":
        raise SystemExit(f"--world {args.world} must divide the {B} sequences of shape {args.shape} "
                         "(deepseek_seq keeps a sequence on one rank)")
    else:
        batch_shape = None
    target = (inp.x + np.float32(0.1) * np.roll(inp.x, 1, axis=1)).astype(np.float32)        # [N, D]
    if args.backend == "cupy":
        import cupy as xp

        comm = nccl_communicator(args.world, rank, port=port)

        def sync():
            xp.cuda.get_current_stream().synchronize()
    else:
        xp, comm = np, SingleProcess()

        def sync():
            pass
    rows = rank_rows(inp.x.shape[0], comm)                        # contiguous, sizes differ by at most one
    params = {k: xp.asarray(v) for k, v in inp.params.items()}
    batch = SimpleNamespace(x=xp.asarray(inp.x[rows]), target=xp.asarray(target[rows]))
    fwd = moe_forward

    def step(check):
        return data_parallel_step(comm, params, batch, inp.cfg, obj, batch_shape=batch_shape, forward=fwd,
                                  check_replicas=check)

    res = step(True)                                                           # the replicas checked once
    for _ in range(args.warmup):
        step(False)
    times = []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        res = step(False)
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    out = {"rank": rank, "rows": rows.stop - rows.start, "ms": times,
           "totals": {k: float(v) for k, v in res.totals.items()}}
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--shape", default="16b", choices=["16b", "small", "cpu", "tiny"])
    ap.add_argument("--preset", default="paper", choices=["paper", "authors_code"])
    ap.add_argument("--backend", default="cupy", choices=["cupy", "numpy"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)       # set by the launcher
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--outdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.world < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--world and --reps must be >= 1, --warmup >= 0")
    if args.backend == "numpy" and args.world != 1:
        ap.error("--backend numpy runs one rank (SingleProcess); use --backend cupy for NCCL ranks")
    if args.rank is not None:
        _rank(args, args.rank, args.port, args.outdir)
        return 0
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        base = [sys.executable, os.path.abspath(__file__), "--world", str(args.world), "--shape", args.shape,
                "--preset", args.preset, "--backend", args.backend, "--reps", str(args.reps),
                "--warmup", str(args.warmup), "--port", str(port), "--outdir", outdir]
        procs = [subprocess.Popen(base + ["--rank", str(r)], env=env) for r in range(args.world)]
        codes = [p.wait(timeout=900) for p in procs]
        if any(codes):
            print(json.dumps({"error": f"rank exit codes {codes}"}))
            return 1
        ranks = []
        for r in range(args.world):
            with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
                ranks.append(pickle.load(f))
    report = {"world": args.world, "shape": args.shape, "preset": args.preset, "backend": args.backend,
              "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "ranks": [{"rank": d["rank"], "rows": d["rows"], "median_ms": float(np.median(d["ms"])),
                         "min_ms": min(d["ms"]), "max_ms": max(d["ms"])} for d in ranks],
              "totals": ranks[0]["totals"]}
    report["step_ms"] = max(r["median_ms"] for r in report["ranks"])
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
