"""Forward + backward of the refmoe layer with its three regularisers, side by side with PyTorch eager.

    python3 benchmarks/bench_layer.py --backend numpy --shapes small --dtypes float32 float64
    python3 benchmarks/bench_layer.py --backend cupy  --shapes small 16b --json results/gpu.json

One process, same inputs, the implementations run alternately (refmoe, torch, refmoe, ...); each time is
the median of ``--reps`` runs after ``--warmup`` runs. A step is: layer forward, L_aux + L_o + L_v forward,
their gradients injected into one layer backward (task upstream gradient ``dy`` fixed and random).
TF32 is off on both sides (CUPY_TF32=0 before CuPy loads; torch's allow_tf32 flags False).

Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k, Hs shared hidden.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("CUPY_TF32", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import refmoe  # noqa: E402
from refmoe import MoEConfig, init_params, moe_backward, moe_forward  # noqa: E402
from memtrack import GpuPeak, RssPeak  # noqa: E402
from steps import RefmoeStep, TorchStep, loss_source  # noqa: E402

SHAPES = {
    # name: (N, D, H, E, K, n_shared, norm_topk_prob, batch_shape (B, T))
    "small": (4096, 512, 256, 16, 4, 0, True, (1, 4096)),
    "16b": (8192, 2048, 1408, 64, 6, 2, False, (2, 4096)),   # DeepSeek-MoE-16B layer, 2 shared experts
}
# (aux, ortho, var, ortho eps); taken from refmoe.objective.PRESETS when that module exists
FALLBACK_PRESETS = {"paper": ("switch", "pairwise", "paper", None),
                    "authors_code": ("deepseek_seq", "span", "code", 1e-6)}


def presets():
    try:
        from refmoe.objective import PRESETS
    except ImportError:
        return FALLBACK_PRESETS, "fallback"
    return {k: (o.aux_variant, o.ortho_loss_variant, o.var_variant, o.ortho_eps) for k, o in PRESETS.items()}, \
        "refmoe.objective.PRESETS"


def flop_floor(N, D, H, E, K, Hs):
    """Matrix-product FLOPs of one forward+backward (3 products forward, 6 backward per SwiGLU)."""
    return 6 * N * D * E + 18 * N * K * D * H + 18 * N * D * Hs


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def make_sync(backend):
    if backend == "numpy":
        return lambda: None
    import cupy
    import torch

    def sync():
        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()
    return sync


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def alternate(fns: dict, sync, warmup, reps):
    """Median seconds of each callable, run in turn (a, b, c, a, b, c, ...)."""
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            t, _ = timed(fn, sync)
            if r >= warmup:
                times[k].append(t)
    return {k: float(np.median(v)) for k, v in times.items()}, times


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1e-30, np.abs(a).max() + np.abs(b).max()))


def host(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return refmoe.to_numpy(a)


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------

def build(backend, shape_name, dtype, preset, args, only=None):
    """Same inputs for every implementation: parameters and x drawn once on the host from one seed."""
    N, D, H, E, K, n_shared, norm, batch_shape = SHAPES[shape_name]
    cfg = MoEConfig(D, H, E, K, n_shared=n_shared, norm_topk_prob=norm)
    rng = np.random.default_rng(1234)
    params = init_params(cfg, rng, dtype=dtype, backend=backend)
    xh = rng.standard_normal((N, D)).astype(dtype)
    dyh = (rng.standard_normal((N, D)) / np.sqrt(N * D)).astype(dtype)
    xp = refmoe.get_xp(backend)
    x, dy = xp.asarray(xh), xp.asarray(dyh)
    host_params = {k: refmoe.to_numpy(v) for k, v in params.items()}
    device = "cpu" if backend == "numpy" else "cuda"
    names = ["refmoe"] + [f"refmoe_{m}" for m in args.refmoe_extra] + [f"torch_{d}" for d in args.torch_dispatch]
    impls = {}
    for name in names if only is None else [only]:
        if name.startswith("torch_"):
            impls[name] = TorchStep(xh, host_params, cfg, dyh, preset, batch_shape, device, name[6:])
        elif name == "refmoe_proposed":
            impls[name] = RefmoeStep(x, params, cfg, dy, preset, batch_shape, proposed=True)
        elif name == "refmoe":
            impls[name] = RefmoeStep(x, params, cfg, dy, preset, batch_shape)
        else:
            impls[name] = RefmoeStep(x, params, cfg, dy, preset, batch_shape, name[7:])
    return impls, x, params, cfg, dy, batch_shape, xh, dyh


def host_peak_in_child(name, shape_name, dtype, preset_name):
    """Peak RSS increase of one step of one implementation, measured in a fresh process where every
    large block is mmapped (MALLOC_MMAP_THRESHOLD_), so that RSS follows the live memory."""
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", name, "--shapes", shape_name,
           "--dtypes", np.dtype(dtype).name, "--presets", preset_name]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mem_child(args):
    import gc
    table, _ = presets()
    impls, *_ = build("numpy", args.shapes[0], np.dtype(args.dtypes[0]).type, table[args.presets[0]], args,
                      only=args.mem_child)
    impl = impls[args.mem_child]
    gc.collect()
    with RssPeak() as rp:
        impl()
    print(json.dumps({"rss_peak_increase": rp.peak_increase}))

def run_config(backend, shape_name, dtype, preset_name, preset, args, sync):
    import torch
    impls, x, params, cfg, dy, batch_shape, xh, dyh = build(backend, shape_name, dtype, preset, args)
    N, D, H, E, K = xh.shape[0], cfg.d_model, cfg.d_hidden, cfg.n_experts, cfg.top_k
    n_shared = cfg.n_shared

    # agreement of the gradients (same inputs, same function)
    ref_y, ref_g, ref_l = impls["refmoe"]()
    check = {}
    for name, impl in impls.items():
        if name == "refmoe":
            continue
        y, g, l = impl()
        if name.startswith("refmoe"):
            g = {k: g[k] for k in ref_g}
        check[name] = {"y": rel_err(host(ref_y), host(y)),
                       "grads": max(rel_err(host(ref_g[k]), host(g[k])) for k in ref_g),
                       "losses": [rel_err(host(a), host(b)) for a, b in zip(ref_l, l)]}
    del ref_y, ref_g, ref_l

    med, all_times = alternate(impls, sync, args.warmup, args.reps)

    # refmoe's phases: forward, each loss (forward + backward), backward
    r = impls["refmoe"]
    ph = {}
    for rep in range(args.reps + 1):
        t_f, (y, cache) = timed(r.forward, sync)
        t_a, (_, d_aux) = timed(lambda: r.aux(cache), sync)
        t_o, (_, d_eo) = timed(lambda: r.ortho(cache), sync)
        t_v, (_, d_var) = timed(lambda: r.var(cache), sync)
        t_b, _ = timed(lambda: moe_backward(dy, cache, d_scores=d_aux + d_var, d_expert_out=d_eo), sync)
        if rep:
            for k, t in zip(("forward", "aux", "ortho", "var", "backward"), (t_f, t_a, t_o, t_v, t_b)):
                ph.setdefault(k, []).append(t)
    phases = {k: float(np.median(v)) for k, v in ph.items()}
    del y, cache, d_aux, d_eo, d_var

    # each loss's forward+backward alone (share of the step)
    _, cache = moe_forward(x, params, cfg)
    loss_fns = {}
    for name, impl in impls.items():
        if name in ("refmoe", "refmoe_proposed"):
            loss_fns[name] = {"aux": lambda impl=impl: impl.aux(cache), "ortho": lambda impl=impl: impl.ortho(cache),
                              "var": lambda impl=impl: impl.var(cache)}
    for name, impl in impls.items():
        if name.startswith("refmoe"):
            continue
        scores, idx, eo, em = impl.loss_parts()
        tm, bs = impl.tm, batch_shape

        def lf(f, *leaves, impl=impl):
            def go():
                ls = [t.clone().requires_grad_(True) for t in leaves]
                f(*ls).backward()
            return go
        loss_fns[name] = {
            "aux": lf(lambda s, impl=impl: tm.aux_loss(s, idx, impl.aux_v, bs), scores),
            "ortho": lf(lambda a, b, impl=impl: tm.ortho_loss(a, b, impl.ortho_v, impl.eps), eo, em),
            "var": lf(lambda s, impl=impl: tm.var_loss(s, idx, impl.var_v), scores)}
    loss_times = {}
    for name, fns in loss_fns.items():
        m, _ = alternate(fns, sync, 1, args.reps)
        loss_times[name] = m
    del cache

    # peak memory of one step, each implementation alone
    mem = {}
    for name, impl in impls.items():
        if backend == "numpy":
            mem[name] = host_peak_in_child(name, shape_name, dtype, preset_name)
        else:
            import cupy
            for other in impls.values():            # leftover gradients of earlier runs: not this step's
                if isinstance(other, TorchStep):
                    other.clear_grads()
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch_start = torch.cuda.memory_allocated()
            with GpuPeak() as gp:
                cupy_start = gp.used
                impl()
                sync()
            # the step's own peak: its parameters, x and dy, plus everything the step allocated
            own = impl.resident_bytes()
            if isinstance(impl, TorchStep):
                step_peak = torch.cuda.max_memory_allocated() - torch_start + own
            else:
                step_peak = gp.peak_used - cupy_start + own
            mem[name] = {"step_peak": step_peak, "cupy_peak_used": gp.peak_used, "cupy_pool_total": gp.pool_total,
                         "torch_max_allocated": torch.cuda.max_memory_allocated(),
                         "torch_max_reserved": torch.cuda.max_memory_reserved()}

    flops = flop_floor(N, D, H, E, K, cfg.d_shared)
    res = {"backend": backend, "shape": shape_name, "dtype": np.dtype(dtype).name, "preset": preset_name,
           "variants": list(preset), "N": N, "D": D, "H": H, "E": E, "K": K, "n_shared": n_shared,
           "flop_floor": flops, "median_s": med, "times_s": all_times, "loss_s": loss_times,
           "memory": mem, "agreement": check,
           "refmoe_phases_s": phases}
    for name in impls:
        res.setdefault("tflops", {})[name] = flops / med[name] / 1e12
        if name in loss_times:
            res.setdefault("loss_share", {})[name] = {k: v / med[name] for k, v in loss_times[name].items()}
    del impls, params, x, dy
    if backend == "cupy":
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    return res


def gemm_ceiling(backend, dtype, sync, n=8192):
    """Measured matrix-product rate (TFLOP/s) through CuPy and torch, TF32 off."""
    import torch
    out = {}
    xp = refmoe.get_xp(backend)
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(dtype))
    ta = torch.as_tensor(refmoe.to_numpy(a)).to("cpu" if backend == "numpy" else "cuda")
    for name, f in {"refmoe_xp": lambda: a @ a, "torch": lambda: ta @ ta}.items():
        f()
        m, _ = alternate({name: f}, sync, 1, 5)
        out[name] = 2 * n ** 3 / m[name] / 1e12
    return out


def environment(backend):
    import torch
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
           "numpy": np.__version__, "torch": torch.__version__, "refmoe": refmoe.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg_at_start": os.getloadavg()}
    if backend == "cupy":
        import cupy
        env.update(cupy=cupy.__version__, device=refmoe.backend.device_description("cupy"),
                   cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(), CUPY_TF32=os.environ.get("CUPY_TF32"),
                   torch_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device"] = refmoe.backend.device_description("numpy")
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--shapes", nargs="+", default=["small"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--presets", nargs="+", default=["paper", "authors_code"])
    ap.add_argument("--torch-dispatch", nargs="+", default=["authors", "sorted"], choices=["authors", "sorted"])
    ap.add_argument("--refmoe-extra", nargs="*", default=[], choices=["loop", "padded", "proposed"],
                    help="also time refmoe with this expert batching forced, or with the proposed L_o")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gemm", action="store_true", help="also measure a large GEMM's rate")
    ap.add_argument("--json", default=None)
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        return mem_child(args)

    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    sync = make_sync(args.backend)
    table, source = presets()
    out = {"env": environment(args.backend), "preset_source": source, "loss_source": loss_source(), "results": [], "gemm": {}}
    print(json.dumps(out["env"]), source, out["loss_source"], flush=True)
    if args.gemm:
        for dt in args.dtypes:
            out["gemm"][dt] = gemm_ceiling(args.backend, np.dtype(dt).type, sync)
            print("gemm", dt, out["gemm"][dt], flush=True)
    for shape in args.shapes:
        for dt in args.dtypes:
            for pname in args.presets:
                try:
                    res = run_config(args.backend, shape, np.dtype(dt).type, pname, table[pname], args, sync)
                except Exception:  # keep the other configurations' numbers
                    import traceback
                    traceback.print_exc()
                    continue
                out["results"].append(res)
                print(summary_line(res), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(out, f, indent=1)
    print_table(out["results"])
    return out


def summary_line(r):
    parts = [f"{r['backend']} {r['shape']} {r['dtype']} {r['preset']}:"]
    for k, t in r["median_s"].items():
        parts.append(f"{k} {t * 1e3:.1f} ms ({r['tflops'][k]:.2f} TF/s)")
    parts.append(f"agree {json.dumps(r['agreement'])}")
    parts.append("phases " + " ".join(f"{k} {v * 1e3:.1f}" for k, v in r["refmoe_phases_s"].items()))
    return "  ".join(parts)


def print_table(results):
    print("\n| backend | shape | dtype | preset | impl | ms | vs torch_authors | vs torch_sorted | TFLOP/s "
          "| peak MiB | aux % | ortho % | var % |")
    print("|" + "---|" * 13)
    for r in results:
        for k, t in r["median_s"].items():
            m = r["memory"][k]
            peak = m.get("rss_peak_increase", m.get("step_peak"))
            sh = r["loss_share"].get(k, {"aux": float("nan"), "ortho": float("nan"), "var": float("nan")})
            ra = t / r["median_s"].get("torch_authors", float("nan"))
            rs = t / r["median_s"].get("torch_sorted", float("nan"))
            print(f"| {r['backend']} | {r['shape']} | {r['dtype']} | {r['preset']} | {k} | {t * 1e3:.1f} | {ra:.2f} "
                  f"| {rs:.2f} | {r['tflops'][k]:.2f} | {peak / 2**20:.0f} | {100 * sh['aux']:.1f} "
                  f"| {100 * sh['ortho']:.1f} | {100 * sh['var']:.1f} |")


if __name__ == "__main__":
    main()
