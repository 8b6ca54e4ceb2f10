"""The matrix products of one 16B-shape step, alone: how fast cuBLAS runs each, and what the step's products
cost at best (the floor any implementation of the padded or the exact plan stands on).

Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k, C rows per expert (padded), Hs the
shared experts' hidden width.

    python3 benchmarks/bench_gemm.py [--dtype float32] [--reps 5] [--json out.json]

Each product is timed by CUDA events, median of ``--reps`` after one warm-up, through ``cupy.matmul`` and through
``refmoe.fast.blas.matmul`` (the step's own products). Plans compared for the routed experts:
padded  one strided-batched product over [E, C, .], C = the largest load of a random top-k routing;
exact   the same products over each expert's own rows, one call per expert, on 1 or 4 streams.
TF32 is off (cuBLAS's default math mode; CuPy without CUPY_TF32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(cp, fn, reps):
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import cupy as cp
    from refmoe.fast import blas
    dt = np.dtype(args.dtype)
    N, D, H, E, K, Hs = 8192, 2048, 1408, 64, 6, 2 * 1408
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((N, E))
    top = np.argsort(-logits, axis=1)[:, :K]
    loads = np.bincount(top.reshape(-1), minlength=E)
    C = int(loads.max())
    print(f"blas mode: {blas.mode()}; loads mean {loads.mean():.0f}, max C = {C}", flush=True)
    g = cp.random.default_rng(0)
    r = lambda *s: g.standard_normal(s, dtype=dt)                                # noqa: E731
    xr, wg, wd, hr = r(E, C, D), r(E, D, H), r(E, H, D), r(E, C, H)
    xs, wgs, wds, hs = r(N, D), r(D, Hs), r(Hs, D), r(N, Hs)
    wg2 = r(E, D, 2 * H)
    rows = {}

    def row(name, flop, fn):
        ms = timed(cp, fn, args.reps)
        rows[name] = {"ms": ms, "tflops": flop / ms / 1e9}
        print(f"  {name:46s} {ms:8.3f} ms  {flop / ms / 1e9:6.1f} TFLOP/s", flush=True)

    mm = lambda a, b: blas.matmul(cp, a, b)                                      # noqa: E731
    f_routed = 2.0 * E * C * D * H
    print("routed experts, padded [E, C, .]:")
    for lib, f in (("cupy", cp.matmul), ("blas", mm)):
        row(f"{lib}  x Wg          [E,C,D]x[E,D,H]", f_routed, lambda f=f: f(xr, wg))
        row(f"{lib}  h Wd          [E,C,H]x[E,H,D]", f_routed, lambda f=f: f(hr, wd))
        row(f"{lib}  dout Wd^T     [E,C,D]x[E,D,H]^T", f_routed, lambda f=f: f(xr, wd.swapaxes(1, 2)))
        row(f"{lib}  h^T dout      [E,H,C]x[E,C,D]", f_routed, lambda f=f: f(hr.swapaxes(1, 2), xr))
        row(f"{lib}  x^T da        [E,D,C]x[E,C,H]", f_routed, lambda f=f: f(xr.swapaxes(1, 2), hr))
        row(f"{lib}  da Wg^T       [E,C,H]x[E,H,D]^T", f_routed, lambda f=f: f(hr, wg.swapaxes(1, 2)))
    row("blas  x [Wg|Wu]   [E,C,D]x[E,D,2H]", 2 * f_routed, lambda: mm(xr, wg2))
    f_exact = 2.0 * N * K * D * H
    starts = np.concatenate([[0], np.cumsum(loads)])
    xe, he = r(N * K, D), r(N * K, H)
    for n_streams in (1, 4):
        streams = [cp.cuda.Stream(non_blocking=True) for _ in range(n_streams)]

        def loop(a=xe, w=wg, streams=streams):
            done = cp.cuda.get_current_stream().record()
            for s in streams:
                s.wait_event(done)
            for e in range(E):
                with streams[e % len(streams)]:
                    mm(a[starts[e]:starts[e + 1]], w[e])
            for s in streams:
                cp.cuda.get_current_stream().wait_event(s.record())
        row(f"blas  exact rows, x Wg, {n_streams} stream(s)", f_exact, loop)
    print("shared experts [N, .]:")
    f_shared = 2.0 * N * D * Hs
    row("blas  x Wg_s      [N,D]x[D,Hs]", f_shared, lambda: mm(xs, wgs))
    row("blas  x^T da_s    [D,N]x[N,Hs]", f_shared, lambda: mm(xs.T, hs))
    row("blas  da_s Wg_s^T [N,Hs]x[Hs,D]", f_shared, lambda: mm(hs, wgs.T))
    big = r(8192, 8192)
    row("blas  8192^3 square", 2.0 * 8192 ** 3, lambda: mm(big, big))
    best = max(v["tflops"] for k, v in rows.items() if "square" not in k)
    flops = {"padded": 9 * f_routed + 9 * f_shared, "exact": 9 * f_exact + 9 * f_shared}
    floor = {k: v / best / 1e9 for k, v in flops.items()}
    print(f"step products: padded {flops['padded'] / 1e12:.3f} TFLOP, exact {flops['exact'] / 1e12:.3f} TFLOP; "
          f"at the best rate above ({best:.1f} TFLOP/s): {floor['padded']:.1f} / {floor['exact']:.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dtype": args.dtype, "C": C, "loads_mean": float(loads.mean()), "rows": rows,
                       "flops": flops, "floor_ms": floor, "best_tflops": best}, fh, indent=1)


if __name__ == "__main__":
    main()
