"""Markdown tables from bench_layer.py's JSON files:  python3 benchmarks/make_table.py results/*.json"""
from __future__ import annotations

import json
import sys

NOMINAL_PEAK = {"float32": 67.0, "float64": 67.0}   # H100 SXM datasheet, TFLOP/s (FP32 / FP64 tensor core)


def other_torch_bytes(r):
    """Bytes the other torch implementation held during a torch step's memory run in files written
    before ``step_peak`` existed: its parameter copy and its last gradients (params and x)."""
    size = 4 if r["dtype"] == "float32" else 8
    N, D, H, E, Hs = r["N"], r["D"], r["H"], r["E"], r["n_shared"] * r["H"]
    params = 3 * E * D * H + 3 * D * Hs + E * D
    n_torch = sum(k.startswith("torch") for k in r["median_s"])
    return (n_torch - 1) * size * (2 * params + N * D)


def rows(path, nominal):
    with open(path) as f:
        out = json.load(f)
    env = out["env"]
    print(f"\n{path}: {env['device']}, {env['date']}, numpy {env['numpy']}, torch {env['torch']}"
          + (f", cupy {env['cupy']}" if "cupy" in env else "") + f"; L_o/L_v from {out.get('loss_source')}")
    if out.get("gemm"):
        print("measured GEMM rate (TFLOP/s, n = 8192): "
              + "; ".join(f"{dt}: xp {g['refmoe_xp']:.1f}, torch {g['torch']:.1f}" for dt, g in out["gemm"].items()))
    print("\n| shape | dtype | preset | impl | ms | / torch_authors | / torch_sorted | TFLOP/s"
          + (" | % peak" if nominal else "") + " | peak MiB | aux % | L_o % | L_v % |")
    print("|" + "---|" * (12 + bool(nominal)))
    for r in out["results"]:
        for k, t in r["median_s"].items():
            m = r["memory"][k]
            if "rss_peak_increase" in m:
                peak = m["rss_peak_increase"]
            elif "step_peak" in m:
                peak = m["step_peak"]
            elif k.startswith("refmoe"):
                peak = m["cupy_peak_used"]
            else:   # older files: remove the other torch step's parameters and leftover gradients
                peak = m["torch_max_allocated"] - other_torch_bytes(r)
            sh = r.get("loss_share", {}).get(k)
            shares = " | ".join(f"{100 * sh[n]:.1f}" for n in ("aux", "ortho", "var")) if sh else "- | - | -"
            ra = t / r["median_s"]["torch_authors"]
            rs = t / r["median_s"]["torch_sorted"]
            tf = r["tflops"][k]
            pk = f" | {100 * tf / NOMINAL_PEAK[r['dtype']]:.0f}" if nominal else ""
            print(f"| {r['shape']} | {r['dtype']} | {r['preset']} | {k} | {t * 1e3:.1f} | {ra:.2f} | {rs:.2f} "
                  f"| {tf:.2f}{pk} | {peak / 2**20:.0f} | {shares} |")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        rows(p, nominal="cpu" not in p)
