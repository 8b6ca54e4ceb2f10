"""The real third-party implementations against refmoe's system presets, through the golden format.

For each system, ``examples/adapters/<system>.py`` builds the real block / router (transformers 5.24.0,
megatron-core 0.16.1) with the fixture's weights and dumps its forward and autograd backward; the dump must pass
``check_dump`` at the checker's defaults on the ``sys_<S>_f32`` case, and on the ``sys_<S>`` (float64) case the
parts the third-party code computes in float64 must agree with refmoe to 1e-12 (the rest is float32 inside those
packages: docs/golden-format.md, "Real implementations"). Skips without torch, and each system without its
package, transformers (Python >= 3.11) or megatron-core (``pip install -e .[interop]``).

The cases come from ``refmoe.golden.write_golden`` when the default grid has them (``sys_<S>`` cases); until then
the same cases are computed here from ``system_config`` + ``init_params`` + refmoe's own forward / backward.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refmoe import init_params, moe_forward, system_config                   # noqa: E402
from refmoe.golden import check_dump, load_case, load_manifest, save_npz        # noqa: E402
from refmoe.golden import format as fmt                                         # noqa: E402
from refmoe.golden.checker import needed_keys                                   # noqa: E402
from refmoe.golden.grid import default_cases                                    # noqa: E402
from refmoe.losses import term_forward                                          # noqa: E402
from refmoe.objective import compose_backward                                   # noqa: E402
from refmoe.systems import SYSTEMS                                              # noqa: E402

ADAPTERS = os.path.join(os.path.dirname(__file__), "..", "examples", "adapters")
# system preset -> adapter module; authors_code has no third-party package (the released code is checked in
# tests/test_systems.py)
ADAPTER_OF = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
              "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "megatron": "megatron_core",
              "megatron_seq": "megatron_core", "megatron_global": "megatron_core",
              "megatron_capacity": "megatron_core", "megatron_sigmoid": "megatron_core"}
# terms a system's code computes: the HF DeepSeek models have no balancing loss (deepseek_v3's is the paper's)
TERMS = {s: ("task", "aux", "z") if s.startswith("megatron") else ("task", "aux") for s in ADAPTER_OF}
TERMS.update(deepseek_v2=("task",), deepseek_v3=("task",))
# float64 cases: the keys each system computes in float64 end to end, held to 1e-12 (the rest is float32 inside)
SHARED_GRADS = tuple(f"grad/{t}/shared_{w}" for t in ("task", "total") for w in ("w_gate", "w_up", "w_down", "w_score"))
FLOAT64_KEYS = {
    "hf": ("inter/logits", "inter/expert_out", "inter/shared_out") + SHARED_GRADS,
    "deepseek": ("inter/expert_out", "inter/shared_out") + SHARED_GRADS,        # the router casts x to float32
    "megatron": ("inter/logits", "inter/expert_out", "loss/z", "grad/z/x", "grad/z/w_router"),
    "megatron_sigmoid": ("inter/logits", "inter/expert_out", "inter/scores", "loss/z", "grad/z/x",
                         "grad/z/w_router", "loss/aux", "grad/aux/x", "grad/aux/w_router"),
}
MEASURED = {}


def float64_keys(system):
    if system == "megatron_sigmoid":
        return FLOAT64_KEYS["megatron_sigmoid"]
    if system.startswith("megatron"):
        return FLOAT64_KEYS["megatron"]
    return FLOAT64_KEYS["deepseek" if system.startswith("deepseek") else "hf"]


# ----------------------------------------------------------------------------------------------
# the cases: from the golden writer when it has them, else computed here the same way
# ----------------------------------------------------------------------------------------------

SHAPES = dict(d_model=8, d_hidden=6, n_experts=8, top_k=2)
BATCH = (2, 6)
OVERRIDES = {"deepseek_v3": dict(n_group=4, topk_group=2)}


def _coefficients(system):
    s = SYSTEMS[system]
    coef = {}
    if s.balancing is not None:
        coef["alpha"] = 1e-2 if s.balancing_coefficient is None else float(s.balancing_coefficient)
    if system.startswith("megatron"):
        coef["zeta"] = 1e-2
    return coef


def _margin(cache, k):
    """Smallest gap between the K-th and (K+1)-th ranked value and between those of the plain top-k of P."""
    gaps = []
    for v in (cache.router.choice, cache.scores):
        srt = -np.sort(-np.where(np.isfinite(v), v, -1e9), axis=1)
        gaps.append((srt[:, k - 1] - srt[:, k]).min())
    return float(min(gaps))


def _fallback_case(system, dtype, seed):
    cfg = system_config(system, **SHAPES, **OVERRIDES.get(system, {}))
    N = BATCH[0] * BATCH[1]
    for attempt in range(500):
        rng = np.random.default_rng([seed, attempt])
        params = init_params(cfg, rng, dtype=np.float64, backend="numpy")
        x, dy = rng.standard_normal((N, cfg.d_model)), rng.standard_normal((N, cfg.d_model))
        if cfg.expert_bias:
            params["expert_bias"] = 0.1 * rng.standard_normal(cfg.n_experts)
        _, cache = moe_forward(x, params, cfg)
        if _margin(cache, cfg.top_k) >= 1e-3 and (cfg.capacity_factor is None or not cache.keep.all()):
            break
    x, dy = x.astype(dtype), dy.astype(dtype)
    params = {k: v.astype(dtype) for k, v in params.items()}
    y, cache = moe_forward(x, params, cfg)
    coef = _coefficients(system)
    s = SYSTEMS[system]
    caches = {}
    if s.balancing is not None:
        caches["aux"] = term_forward(*s.balancing, cache, batch_shape=BATCH)
    if "zeta" in coef:
        caches["z"] = term_forward("z", "zloss", cache)
    weights = {"aux": coef.get("alpha"), "z": coef.get("zeta")}
    grads = compose_backward(dy, cache, {t: tc for t, (_, tc) in caches.items()}, {t: weights[t] for t in caches})
    arrays = {"input/x": x, "input/dy": dy, "input/valid_mask": np.ones(N, dtype=bool)}
    arrays.update({f"param/{k}": v for k, v in params.items()})
    for name in ("logits", "scores", "topk_idx", "gates", "expert_out", "shared_out"):
        if getattr(cache, name) is not None:
            arrays[f"inter/{name}"] = np.asarray(getattr(cache, name))
    arrays["inter/topk_idx"] = arrays["inter/topk_idx"].astype(np.int64)
    arrays["inter/y"], arrays["loss/task"] = y, (dy * y).sum()
    total = arrays["loss/task"]
    for t, (value, _) in caches.items():
        arrays[f"loss/{t}"] = value
        total = total + weights[t] * value
    arrays["loss/total"] = total
    for t, g in grads.items():
        arrays.update({f"grad/{t}/{k}": v for k, v in g.items() if k != "expert_bias"})
    arrays = {k: (v if np.asarray(v).dtype.kind in "bi" else np.asarray(v, dtype=dtype)) for k, v in arrays.items()}
    entry = {"file": None, "dtype": np.dtype(dtype).name, "tolerance": dict(fmt.TOLERANCES[np.dtype(dtype).name]),
             "system": system, "config": dataclasses.asdict(cfg), "n_tokens": N, "batch_shape": list(BATCH),
             "padding_tokens": [], "regularisers_see_padding": False,
             "variants": {"aux": s.balancing[1] if s.balancing else None, "ortho": None, "var": None,
                          "z": "zloss" if "z" in caches else None},
             "coefficients": coef, "keys": fmt.key_specs(arrays)}
    return entry, arrays


def _write_fallback(directory):
    cases = {}
    for seed, system in enumerate(ADAPTER_OF):
        for name, dtype in ((f"sys_{system}", np.float64), (f"sys_{system}_f32", np.float32)):
            entry, arrays = _fallback_case(system, dtype, seed)
            entry["file"] = f"{name}.npz"
            entry["sha256"] = save_npz(os.path.join(directory, entry["file"]), arrays)
            cases[name] = entry
    fmt.write_manifest(directory, {"format": fmt.FORMAT_NAME, "schema_version": fmt.SCHEMA_VERSION, "cases": cases})


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(directory, manifest) holding sys_<S> and sys_<S>_f32 for every system with an adapter."""
    from refmoe.golden import write_golden

    directory = str(tmp_path_factory.mktemp("golden_sys"))
    names = [c.name for c in default_cases() if c.name.startswith("sys_")
             and c.name.removeprefix("sys_").removesuffix("_f32") in ADAPTER_OF]
    if names:
        write_golden(directory, names)
    else:
        _write_fallback(directory)
    print(f"\nsys cases from {'refmoe.golden.write_golden' if names else 'the fallback of this file'}")
    return directory, load_manifest(directory)


def adapter(system):
    """examples/adapters/<module>.py, loaded from its path (its helper _hf.py importable beside it)."""
    pytest.importorskip("megatron.core" if system.startswith("megatron") else "transformers")
    name = f"refmoe_adapter_{ADAPTER_OF[system]}"
    if name not in sys.modules:
        path = os.path.abspath(ADAPTERS)
        if path not in sys.path:
            sys.path.append(path)
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, f"{ADAPTER_OF[system]}.py"))
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def run_adapter(golden, name, tmp_path):
    directory, manifest = golden
    if name not in manifest["cases"]:
        pytest.skip(f"no case {name} in the golden directory")
    entry = manifest["cases"][name]
    arrays = load_case(directory, name, manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = adapter(entry["system"]).dump(entry, arrays)
    dump_dir = tmp_path / "dump"
    dump_dir.mkdir(exist_ok=True)
    save_npz(str(dump_dir / f"{name}.npz"), got)
    return entry, arrays, got, str(dump_dir)


def max_rel(got, want):
    """max|got - want| / max|want| (the checker's measure), 0 for two zero tensors."""
    want = np.asarray(want, dtype=np.float64)
    scale = np.abs(want).max()
    diff = np.abs(np.asarray(got, dtype=np.float64) - want).max()
    return float(diff / scale) if scale > 0 else float(diff)


def worst(got, arrays, keys):
    """(largest max_rel, its key) over the float keys of both."""
    return max((max_rel(got[k], arrays[k]), k) for k in keys if k in got and k in arrays
               and arrays[k].dtype.kind == "f")


def measured_keys(system, arrays):
    """The output keys the system's terms determine (checker.needed_keys: no loss/total or grad/total/* when the
    case holds a term the system's code does not compute, such as deepseek_v3's paper-only balancing loss)."""
    return needed_keys(list(arrays), list(TERMS[system]))


# ----------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("system", list(ADAPTER_OF))
def test_float32_dump_passes_the_checker(golden, system, tmp_path):
    name = f"sys_{system}_f32"
    entry, arrays, got, dump_dir = run_adapter(golden, name, tmp_path)
    report = check_dump(golden[0], dump_dir, cases=[name], terms=list(TERMS[system]))
    err, key = worst(got, arrays, measured_keys(system, arrays))
    MEASURED.setdefault(system, {})["float32"] = (err, key)
    print(f"{system:18s} float32: max rel {err:.1e} ({key})")
    assert report.ok, report.format()
    assert set(TERMS[system]) <= {k.split("/")[1] for k in got if k.startswith("grad/")}


@pytest.mark.parametrize("system", list(ADAPTER_OF))
def test_float64_parts_agree_to_1e12(golden, system, tmp_path):
    name = f"sys_{system}"
    entry, arrays, got, dump_dir = run_adapter(golden, name, tmp_path)
    keys = [k for k in float64_keys(system) if k in measured_keys(system, arrays)]
    assert keys, f"{name}: none of {float64_keys(system)} in the case"
    err64, key64 = worst(got, arrays, keys)
    rest = [k for k in measured_keys(system, arrays) if k not in keys]
    err, key = worst(got, arrays, rest)
    MEASURED.setdefault(system, {})["float64"] = (err64, key64, err, key)
    print(f"{system:18s} float64: float64 parts max rel {err64:.1e} ({key64}); "
          f"float32-inside parts {err:.1e} ({key})")
    assert err64 <= 1e-12, f"{name}: {key64} max rel {err64:.1e}"
    assert np.array_equal(got["inter/topk_idx"], arrays["inter/topk_idx"])
    report = check_dump(golden[0], dump_dir, cases=[name], terms=list(TERMS[system]), rtol=1e-5)
    assert report.ok, report.format()                  # the float32-inside parts: float32 round-off only


@pytest.mark.parametrize("system", [s for s in ADAPTER_OF if s.startswith("megatron")])
def test_megatron_router_run_equals_the_functions_run(golden, system):
    """TopKRouter.routing() (losses attached by MoEAuxLossAutoScaler) gives the probs and y of the moe_utils
    functions called one by one, and its total gradient is the sum of the functions' per-term gradients."""
    directory, manifest = golden
    name = f"sys_{system}_f32"
    if name not in manifest["cases"]:
        pytest.skip(f"no case {name}")
    entry = manifest["cases"][name]
    checks = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = adapter(system).dump(entry, load_case(directory, name, manifest), checks)
    assert checks["probs"] == 0 and checks["y"] == 0, checks
    assert {"tracker_aux", "tracker_z"} <= set(checks) and max(checks.values()) < 1e-6, checks
    for key in [k for k in got if k.startswith("grad/total/")]:
        parts = sum(got[f"grad/{t}/{key.split('/')[2]}"].astype(np.float64) for t in TERMS[system])
        assert max_rel(got[key], parts) < 1e-5, key


def test_summary_table():
    """Prints the table of docs/golden-format.md, "Real implementations" (run with -s to see it)."""
    if not MEASURED:
        pytest.skip("run with the per-system tests")
    for system, m in MEASURED.items():
        f32 = f"{m['float32'][0]:.1e}" if "float32" in m else "-"
        f64 = f"{m['float64'][0]:.1e} / {m['float64'][2]:.1e}" if "float64" in m else "-"
        print(f"| {system} | {f32} | {f64} |")
