"""refmoe against its strongest peers: PyTorch eager with the padded batched-matmul plan, PyTorch with the
per-expert loop, and JAX jit, on one objective step (layer + L_aux + L_o + L_v, gradients of the total).

    python3 benchmarks/bench_peers.py --backend numpy --shapes cpu --dtypes float32 float64 --profile
    python3 benchmarks/bench_peers.py --backend cupy  --shapes small 16b --dtypes float32 --profile --json X.json

A step: layer forward (router softmax, top-k, K of E SwiGLU experts, shared experts), the three
regularisers of a preset, and the gradients of total = <dy, y> + alpha L_aux + beta L_o + gamma L_v (dy fixed
and random) w.r.t. x and every parameter. Implementations (``--impls``):

    refmoe         refmoe.fast.objective_step(..., keep_cache=False): fused kernels, sort-free dispatch, the
                   released Gram-Schmidt L_o in one kernel, inputs checked once, one read of C and one status
    refmoe_graph   refmoe.fast.GraphedStep: the same step replayed from a CUDA graph (eager on NumPy)
    refmoe_objective  refmoe.objective_forward_backward(..., per_term=False, forward=refmoe.fast.moe_forward),
                   the earlier fast path (padded experts, the core's losses with their checks)
    refmoe_core    the same with the core layer refmoe.moe_forward (one expert at a time)
    refmoe_gram    refmoe.fast forward + L_o from refmoe.fast.ortho_gram (the Gram/Cholesky form), composed
                   by hand; the other losses as in refmoe
    torch_batched  PyTorch eager, padded [E, C, D] layout with the static capacity C, torch.bmm, autograd
    torch_loop     PyTorch eager, the authors' per-expert boolean-mask loop, autograd
    jax            jax.jit(jax.value_and_grad(...)), padded plan with static C, jax.lax.top_k

All in one process on the same inputs (drawn once on the host, with clear top-k margins), agreement of every
value and gradient checked against refmoe before any timing (fails beyond 1e-10 in float64, 1e-3 in
float32), then run alternately; each time is the median of ``--reps`` runs after ``--warmup``. TF32 is off
everywhere (CUPY_TF32=0, torch allow_tf32=False, jax_default_matmul_precision="highest").

Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k, C rows per expert.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ["CUPY_TF32"] = "0"                               # before CuPy loads: no TF32 anywhere
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # JAX shares the GPU with CuPy and torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import refmoe  # noqa: E402
import peers_env  # noqa: E402
from peers_env import SHAPES, Preset, make_inputs, presets, rel_err  # noqa: E402
from peers_refmoe import RefmoePeer, profile_fast, profile_refmoe  # noqa: E402

IMPLS = ("refmoe", "refmoe_sorted", "refmoe_graph", "refmoe_objective", "refmoe_core", "refmoe_gram", "torch_batched",
         "torch_loop", "jax")
DEFAULT_IMPLS = ("refmoe", "refmoe_graph", "refmoe_objective", "torch_batched", "torch_loop", "jax")
TOL = {"float64": 1e-10, "float32": 1e-3}


# ----------------------------------------------------------------------------------------------
# the implementations
# ----------------------------------------------------------------------------------------------

def build(name, backend, inp, preset: Preset):
    """One implementation on the inputs ``inp`` (peers_env.Inputs); has step(), sync(), resident_bytes()."""
    if name.startswith("refmoe"):
        return RefmoePeer(inp, preset, backend, variant=name)
    if name.startswith("torch_"):
        import peers_torch
        device = "cpu" if backend == "numpy" else "cuda"
        return peers_torch.TorchPeer(inp.x, inp.params, inp.cfg, inp.dy, preset, inp.batch_shape, device,
                                     name[6:], inp.capacity)
    if name == "jax":
        import jax
        import peers_jax
        device = jax.devices("cpu" if backend == "numpy" else "gpu")[0]
        return peers_jax.JaxPeer(inp.x, inp.params, inp.cfg, inp.dy, preset, inp.batch_shape, device,
                                 inp.capacity)
    raise ValueError(f"implementation {name!r}; expected one of {IMPLS}")


def host(a):
    """Any framework's array -> NumPy in its own dtype (an explicit copy to the host)."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("cupy"):
        return refmoe.to_numpy(a)
    return np.asarray(a)


def to_host(out):
    y, grads, losses = out
    res = {"y": host(y), **{f"loss_{n}": host(v) for n, v in zip(("aux", "ortho", "var"), losses)}}
    res.update({f"d{k}": host(v) for k, v in grads.items()})
    return res


# ----------------------------------------------------------------------------------------------
# agreement, timing, memory
# ----------------------------------------------------------------------------------------------

def agreement(impls: dict, dtype: str):
    """Per peer, per tensor: max|peer - refmoe| / max|refmoe|. Raises AssertionError beyond TOL[dtype]."""
    ref = to_host(impls["refmoe"].step())
    table, worst = {}, {}
    for name, impl in impls.items():
        if name == "refmoe":
            continue
        got = to_host(impl.step())
        missing = sorted(set(ref) - set(got))
        if missing:
            raise AssertionError(f"{name} returned no {missing}")
        table[name] = {k: rel_err(ref[k], got[k]) for k in ref}
        worst[name] = max(table[name].values())
    for name, errs in table.items():
        print(f"  agreement {name:14s} worst {worst[name]:.1e}  " +
              " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    bad = {n: w for n, w in worst.items() if not w <= TOL[dtype]}
    if bad:
        raise AssertionError(f"peers disagree with refmoe beyond {TOL[dtype]:.0e} ({dtype}): {bad}; "
                             "see the per-tensor numbers above")
    return table


def make_sync(backend, impls):
    if backend == "numpy":
        return lambda: None
    import cupy

    def sync():
        cupy.cuda.Device().synchronize()
        for impl in impls.values():
            impl.sync()
    return sync


def alternate(impls: dict, sync, warmup, reps):
    """Seconds of each step, run in turn (a, b, c, a, b, c, ...); the first ``warmup`` rounds dropped."""
    times = {k: [] for k in impls}
    for r in range(warmup + reps):
        for k, impl in impls.items():
            sync()
            t0 = time.perf_counter()
            out = impl.step()
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
            del out
    return times


def memory_in_child(name, shape, dtype, preset_name):
    """CPU: peak RSS increase of one warmed-up step of one implementation, in a fresh process where every
    large block is mmapped (MALLOC_MMAP_THRESHOLD_), so that RSS follows the live memory."""
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", name, "--shapes", shape, "--dtypes", dtype,
           "--presets", preset_name, "--backend", "numpy"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_child(args):
    from memtrack import RssPeak
    dtype = args.dtypes[0]
    skips = peers_env.configure("numpy", [args.mem_child], x64=dtype == "float64")
    if skips:
        raise RuntimeError(f"{args.mem_child} cannot run here: {skips[args.mem_child]}")
    inp = make_inputs(args.shapes[0], np.dtype(dtype).type)
    impl = build(args.mem_child, "numpy", inp, presets()[args.presets[0]])
    for _ in range(2):                                       # warm-up: JAX compiles, caches fill
        out = impl.step()
        del out
    gc.collect()
    with RssPeak() as rp:
        out = impl.step()
    print(json.dumps({"rss_peak_increase": rp.peak_increase, "resident": impl.resident_bytes()}))


def memory_gpu(impls: dict, sync):
    """GPU: the step's peak of bytes held by live arrays beyond what was live before it (CuPy: a hook on the
    pool; torch: max_memory_allocated), plus its own parameters, x and dy. JAX: XLA's buffer plan."""
    import cupy
    from memtrack import GpuPeak
    try:
        import torch
    except ImportError:
        torch = None
    mem = {}
    for name, impl in impls.items():
        for other in impls.values():       # leftover gradients of earlier steps are not this step's memory
            if hasattr(other, "clear_grads"):
                other.clear_grads()
        gc.collect()
        sync()
        cupy.get_default_memory_pool().free_all_blocks()
        t0 = 0
        if torch is not None:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = torch.cuda.memory_allocated()
        with GpuPeak() as gp:
            c0 = gp.used
            out = impl.step()
            sync()
        del out
        if name.startswith("torch"):
            impl.clear_grads()
            mem[name] = {"step_peak": torch.cuda.max_memory_allocated() - t0 + impl.resident_bytes()}
        elif name == "refmoe_graph" and impl.graph_pool_bytes() is not None:
            # the replay allocates nothing: its buffers are the graph's private pool, held between steps
            mem[name] = {"step_peak": impl.graph_pool_bytes() + impl.resident_bytes(), "graph_pool": True}
        elif name.startswith("refmoe"):
            mem[name] = {"step_peak": gp.peak_used - c0 + impl.resident_bytes(),
                         "pool_total_after": gp.pool_total}
        else:
            plan = impl.memory_analysis()
            mem[name] = {"xla_plan": plan, "step_peak": None if plan is None else
                         plan["argument_bytes"] + plan["output_bytes"] + plan["temp_bytes"]}
    return mem


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------

_INPUTS = {}


def inputs_for(shape, dtype):
    """make_inputs once per (shape, dtype): both presets share the inputs (and the 16b draw takes seconds)."""
    if (shape, dtype) not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[shape, dtype] = make_inputs(shape, np.dtype(dtype).type)
    return _INPUTS[shape, dtype]


def run_config(args, shape, dtype, preset_name, env_skips):
    preset = presets()[preset_name]
    inp = inputs_for(shape, dtype)
    print(f"\n== {args.backend} {shape} {dtype} {preset_name}: C = {inp.capacity} (max load; mean "
          f"{inp.x.shape[0] * inp.cfg.top_k / inp.cfg.n_experts:.0f}), smallest top-{inp.cfg.top_k + 1} logit gap "
          f"{inp.min_gap:.1e}", flush=True)
    names = [n for n in args.impls if n not in env_skips]
    impls = {n: build(n, args.backend, inp, preset) for n in names}
    sync = make_sync(args.backend, impls)
    res = {"backend": args.backend, "shape": shape, "dtype": dtype, "preset": preset._asdict(),
           "dims": dict(zip(("N", "D", "H", "E", "K", "n_shared"), SHAPES[shape][:6])), "capacity": inp.capacity,
           "batch_shape": inp.batch_shape, "min_logit_gap": inp.min_gap, "skipped": env_skips}
    t0 = time.perf_counter()
    res["agreement"] = agreement(impls, dtype)
    print(f"  agreement checked in {time.perf_counter() - t0:.1f} s (JAX compiles here)", flush=True)
    if args.check_only:
        return res
    if args.backend == "numpy":
        res["cpu_gemm_gflops_before"] = peers_env.cpu_gemm_gflops()
    times = alternate(impls, sync, args.warmup, args.reps)
    if args.backend == "numpy":
        res["cpu_gemm_gflops_after"] = peers_env.cpu_gemm_gflops()
        res["loadavg_after"] = os.getloadavg()
        print(f"  CPU share: SGEMM 2048^3 {res['cpu_gemm_gflops_before']:.0f} GFLOP/s before the timing, "
              f"{res['cpu_gemm_gflops_after']:.0f} after; load average {res['loadavg_after'][0]:.2f}", flush=True)
    res["times_s"] = times
    res["median_s"] = {k: float(np.median(v)) for k, v in times.items()}
    res["paired_ratio"] = paired_ratios(times, res["median_s"])
    if args.profile:
        res["profile_s"] = profile_fast(impls["refmoe"], sync, args.reps, jax_peer=impls.get("jax"))
        print("  profile refmoe (ms): " + " ".join(f"{k} {1e3 * v:.1f}" for k, v in res["profile_s"].items()),
              flush=True)
        if "refmoe_objective" in impls:
            res["profile_objective_s"] = profile_refmoe(impls["refmoe_objective"], sync, args.reps)
            print("  profile refmoe_objective (ms): " + " ".join(
                f"{k} {1e3 * v:.1f}" for k, v in res["profile_objective_s"].items()), flush=True)
    if not args.no_memory:
        if args.backend == "numpy":
            res["memory"] = {n: memory_in_child(n, shape, dtype, preset_name) for n in impls}
            if "jax" in impls:
                res["memory"]["jax"]["xla_plan"] = impls["jax"].memory_analysis()
        else:
            res["memory"] = memory_gpu(impls, sync)
    print_config(res)
    return res


def paired_ratios(times, med):
    """Median over the rounds of t_impl / t_peer within a round (the runs of one round are seconds apart, so
    a change of load between rounds cancels): peer = jax, and the torch implementation with the best median."""
    torch_names = [k for k in med if k.startswith("torch")]
    refs = {"jax": "jax" if "jax" in med else None,
            "best_torch": min(torch_names, key=med.get) if torch_names else None}
    return {k: {label: (None if ref is None else float(np.median(np.array(times[k]) / np.array(times[ref]))))
                for label, ref in refs.items()} for k in med}


def print_config(r):
    med = r["median_s"]
    best_torch = min((v for k, v in med.items() if k.startswith("torch")), default=float("nan"))
    jax_t = med.get("jax", float("nan"))
    for k, t in med.items():
        m = r.get("memory", {}).get(k, {})
        peak = m.get("rss_peak_increase", m.get("step_peak"))
        peak = "-" if peak is None else f"{peak / 2**20:.0f}"
        print(f"  {k:14s} {1e3 * t:9.1f} ms  / jax {t / jax_t:5.2f}  / best torch {t / best_torch:5.2f}  "
              f"peak MiB {peak}", flush=True)


def print_table(results):
    """One Markdown row per (configuration, implementation): the table of benchmarks/RESULTS.md."""
    print("\n| shape | dtype | preset | impl | median ms | min-max ms | / jax | / best torch | / jax paired "
          "| / best torch paired | peak MiB |")
    print("|" + "---|" * 11)
    for r in results:
        if "median_s" not in r:
            continue
        med = r["median_s"]
        best_torch = min((v for k, v in med.items() if k.startswith("torch")), default=float("nan"))
        for k, t in med.items():
            m = r.get("memory", {}).get(k, {})
            peak = m.get("rss_peak_increase", m.get("step_peak"))
            peak = "-" if peak is None else f"{peak / 2**20:.0f}"
            lo, hi = min(r["times_s"][k]), max(r["times_s"][k])
            pj, pt = (r["paired_ratio"][k][n] for n in ("jax", "best_torch"))
            pj, pt = ("-" if v is None else f"{v:.2f}" for v in (pj, pt))
            print(f"| {r['shape']} | {r['dtype']} | {r['preset']['name']} | {k} | {1e3 * t:.1f} | "
                  f"{1e3 * lo:.0f}-{1e3 * hi:.0f} | {t / med.get('jax', float('nan')):.2f} | {t / best_torch:.2f} | "
                  f"{pj} | {pt} | {peak} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--shapes", nargs="+", default=["cpu"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    ap.add_argument("--presets", nargs="+", default=["paper", "authors_code"], choices=["paper", "authors_code"])
    ap.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS,
                    help=f"default {' '.join(DEFAULT_IMPLS)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also time refmoe's phases (and JAX's layer alone)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--check-only", action="store_true", help="agreement only, no timing")
    ap.add_argument("--json", default=None)
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 5 and not args.check_only and not args.mem_child:
        print(f"note: --reps {args.reps} < 5; the comparison asks for a median of at least 5", flush=True)
    if "refmoe" not in args.impls:
        args.impls = ["refmoe", *args.impls]                 # the reference of the agreement check
    if args.mem_child:
        return mem_child(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    skips = peers_env.configure(args.backend, args.impls, x64="float64" in args.dtypes)
    out = {"env": peers_env.environment(args.backend), "args": vars(args), "skipped": skips, "results": []}
    print(json.dumps(out["env"]), flush=True)
    for name, why in skips.items():
        print(f"WARNING: {name} skipped: {why}", flush=True)
    failed = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for pname in args.presets:
                try:
                    out["results"].append(run_config(args, shape, dtype, pname, skips))
                except Exception as exc:                       # noqa: BLE001 recorded, the next one runs
                    import traceback
                    traceback.print_exc()
                    failed.append(f"{shape} {dtype} {pname}: {exc!r}")
                    out["results"].append({"shape": shape, "dtype": dtype, "preset": {"name": pname},
                                           "error": repr(exc)})
                out["env"]["loadavg_at_end"] = os.getloadavg()
                if args.backend == "numpy":
                    out["env"]["cpu_gemm_gflops_at_end"] = peers_env.cpu_gemm_gflops()
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(out, f, indent=1)
    print_table(out["results"])
    if failed:
        print("\nFAILED configurations:\n  " + "\n  ".join(failed), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
