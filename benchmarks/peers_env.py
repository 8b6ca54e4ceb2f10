"""Shapes, presets, inputs and the environment record of ``bench_peers.py``.

Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k, C rows per expert, B sequences of
T tokens (B * T = N).
"""
from __future__ import annotations

import os
import platform
import time
from typing import NamedTuple

import numpy as np

import refmoe
from refmoe.losses.ortho import ORTHO_VARIANTS

SHAPES = {
    # name: (N, D, H, E, K, n_shared, norm_topk_prob, (B, T))
    "16b": (8192, 2048, 1408, 64, 6, 2, False, (2, 4096)),   # DeepSeek-MoE-16B layer, 2 shared experts
    "small": (4096, 512, 256, 16, 4, 0, True, (1, 4096)),
    "cpu": (2048, 256, 128, 16, 4, 0, True, (2, 1024)),
    "tiny": (64, 16, 8, 8, 3, 1, False, (2, 32)),            # the smoke test: every code path, shared expert too
}


class Preset(NamedTuple):
    """The forms and coefficients every implementation computes (eps resolved to a number)."""
    name: str
    aux: str
    ortho: str
    var: str
    ortho_eps: float
    alpha: float
    beta: float
    gamma: float


def presets() -> dict:
    """``refmoe.objective.PRESETS`` with fixed coefficients: paper 1e-3 each; authors_code alpha 1e-3 and the
    released targets as fixed weights, beta 1e-4, gamma 1e-3 (no calibration inside a timed step)."""
    objs = {"paper": refmoe.PRESETS["paper"],
            "authors_code": refmoe.PRESETS["authors_code"].replace(beta=1e-4, gamma=1e-3)}
    out = {}
    for name, o in objs.items():
        v = o.ortho_loss_variant
        eps = ORTHO_VARIANTS[v].default_eps if o.ortho_eps is None else o.ortho_eps
        out[name] = Preset(name, o.aux_variant, v, o.var_variant, float(eps), o.alpha, o.beta, o.gamma)
    return out


def objective_of(preset: Preset):
    """The refmoe ``Objective`` of a Preset."""
    base = refmoe.PRESETS[preset.name]
    return base.replace(alpha=preset.alpha, beta=preset.beta, gamma=preset.gamma, ortho_eps=preset.ortho_eps)


def rel_err(ref, got):
    """max |got - ref| / max |ref| over one tensor, in the tensors' dtype (a float32 difference is exact to
    one rounding, ample against 1e-3; the 16b gradients stay 2 GB, not 4). The floor 1e-300 only guards an
    all-zero reference."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return float("inf")
    return float(np.abs(got - ref).max()) / max(1e-300, float(np.abs(ref).max()))


# ----------------------------------------------------------------------------------------------
# inputs with clear top-k margins
# ----------------------------------------------------------------------------------------------

class Inputs(NamedTuple):
    x: np.ndarray           # [N, D] host, in the dtype
    params: dict            # host arrays, in the dtype
    dy: np.ndarray          # [N, D] task gradient
    cfg: refmoe.MoEConfig
    batch_shape: tuple      # (B, T)
    capacity: int           # C = the largest expert load of this routing
    min_gap: float          # the smallest gap between adjacent logits among each token's top K+1


def make_inputs(shape: str, dtype, seed: int = 1234, margin: float = 1e-3) -> Inputs:
    """Parameters (refmoe.init_params on the host) and x redrawn token by token until every token's top K+1
    router logits (float64 of the cast values) are at least ``margin`` apart: all implementations then pick
    the same experts in the same slot order, in float32 too (its logit error is ~1e-5 at D = 2048)."""
    N, D, H, E, K, n_shared, norm, batch_shape = SHAPES[shape]
    cfg = refmoe.MoEConfig(D, H, E, K, n_shared=n_shared, norm_topk_prob=norm)
    rng = np.random.default_rng(seed)
    params = refmoe.init_params(cfg, rng, dtype=dtype, backend="numpy")
    w_r = params["w_router"].astype(np.float64)                         # [E, D]
    x = rng.standard_normal((N, D)).astype(dtype)
    kk = min(K + 1, E)
    for _ in range(100):
        top = -np.sort(-(x.astype(np.float64) @ w_r.T), axis=1)[:, :kk]   # [N, K+1] descending logits
        gap = (top[:, :-1] - top[:, 1:]).min(axis=1)                      # [N]
        bad = np.nonzero(gap < margin)[0]
        if bad.size == 0:
            break
        x[bad] = rng.standard_normal((bad.size, D)).astype(dtype)
    else:
        raise RuntimeError(f"could not draw inputs with top-k margins >= {margin}")
    dy = (rng.standard_normal((N, D)) / np.sqrt(N * D)).astype(dtype)
    topk = np.argsort(-(x.astype(np.float64) @ w_r.T), axis=1, kind="stable")[:, :K]
    capacity = int(np.bincount(topk.reshape(-1), minlength=E).max())
    return Inputs(x, params, dy, cfg, batch_shape, capacity, float(gap.min()))


# ----------------------------------------------------------------------------------------------
# frameworks: settings and versions
# ----------------------------------------------------------------------------------------------

def configure(backend: str, impls, x64: bool) -> dict:
    """TF32 off, thread counts, JAX's precision and x64; returns {impl: why it cannot run here}."""
    skips = {}
    if any(n.startswith("torch") for n in impls):
        try:
            import torch
        except ImportError as exc:
            skips.update({n: f"torch: {exc}" for n in impls if n.startswith("torch")})
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
            if backend == "numpy":       # all cores, or OMP_NUM_THREADS (set it with OPENBLAS_NUM_THREADS and
                # XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for one thread)
                torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
            elif not torch.cuda.is_available():
                skips.update({n: "torch has no CUDA device" for n in impls if n.startswith("torch")})
    if "jax" in impls:
        try:
            import jax
        except ImportError as exc:
            skips["jax"] = f"jax: {exc}"
        else:
            jax.config.update("jax_enable_x64", bool(x64))
            jax.config.update("jax_default_matmul_precision", "highest")
            try:
                jax.devices("cpu" if backend == "numpy" else "gpu")
            except RuntimeError as exc:
                skips["jax"] = f"no JAX device for {backend}: {exc} (install jax[cuda12] or jax[cuda13])"
    return skips


def cpu_gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best of ``reps`` float32 n^3 NumPy products, GFLOP/s: how much of the CPU this process is getting
    (on a shared machine a low number means other processes were running)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _blas():
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version')}"
    except Exception as exc:  # the layout of show_config changed across NumPy versions
        return f"unknown ({exc})"


def environment(backend: str) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
           "numpy": np.__version__, "numpy_blas": _blas(), "refmoe": refmoe.__version__,
           "machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)), "loadavg_at_start": os.getloadavg(),
           "device": refmoe.backend.device_description(backend), "CUPY_TF32": os.environ.get("CUPY_TF32"),
           "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                         "XLA_FLAGS")}}
    try:
        import scipy
        env["scipy"] = scipy.__version__
    except ImportError:
        pass
    if backend == "numpy":
        env["cpu_gemm_gflops_at_start"] = cpu_gemm_gflops()
    if backend == "cupy":
        import cupy
        env.update(cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion())
    try:
        import torch
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   torch_blas=_torch_blas(torch), torch_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    except ImportError:
        pass
    try:
        import jax
        import jaxlib
        env.update(jax=jax.__version__, jaxlib=jaxlib.__version__, jax_x64=bool(jax.config.jax_enable_x64),
                   jax_matmul_precision=str(jax.config.jax_default_matmul_precision),
                   jax_devices=[str(d) for d in jax.devices()])
    except ImportError:
        pass
    return env


def _torch_blas(torch):
    """BLAS_INFO and LAPACK_INFO of torch's build settings ("mkl mkl" for the CPU wheels)."""
    text = torch.__config__.show()
    found = [part.split("=", 1)[1] for part in text.replace("\n", ",").split(",")
             if part.strip().startswith(("BLAS_INFO=", "LAPACK_INFO="))]
    return " ".join(found) or "unknown"
