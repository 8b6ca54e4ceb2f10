"""Writing a golden directory: one ``<case>.npz`` per case and ``manifest.json``."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..backend import backend_name
from . import format as fmt
from . import trust
from .cases import CaseSpec, compute_case, resolve_preset
from .dist_cases import dist_entry
from .grid import select
from .systems_cases import system_terms, system_tolerance


def case_entry(spec: CaseSpec, arrays: dict, digest: str) -> dict:
    """The manifest entry of one case (everything an implementer needs besides the arrays)."""
    if spec.system is not None:
        return system_entry(spec, arrays, digest)
    spec_dict = dataclasses.asdict(spec)
    config_fields = ("d_model", "d_hidden", "n_experts", "top_k", "n_shared", "norm_topk_prob")
    if spec.kind == "aux_layers":
        config_fields = ("n_experts", "top_k", "n_layers")
    entry = {
        "kind": spec.kind,
        "micro_batches": list(spec.micro_batches),
        "file": f"{spec.name}.npz",
        "sha256": digest,
        "description": spec.description,
        "dtype": spec.dtype,
        "tolerance": dict(fmt.TOLERANCES[spec.dtype]),
        "config": {k: spec_dict[k] for k in config_fields},
        "n_tokens": spec.n_tokens,
        "batch_shape": list(spec.batch_shape),
        "padding_tokens": list(spec.padding),
        "regularisers_see_padding": bool(spec.padding) and not spec.mask_in_losses,
        "variants": {"aux": spec.aux, "ortho": spec.ortho, "var": spec.var},
        "coefficients": (None if spec.kind == "aux_layers"
                         else {"alpha": spec.alpha, "beta": spec.beta, "gamma": spec.gamma}),
        "ortho_eps": spec.ortho_eps,
        "preset": spec.preset,
        "ties": spec.ties,
        "seed": spec.seed,
        "system": None,
        "terms": sorted({k.split("/")[1] for k in arrays if k.startswith("grad/")}),
        "keys": fmt.key_specs(arrays),
    }
    return entry if spec.rank is None else dist_entry(spec, entry)


def system_entry(spec: CaseSpec, arrays: dict, digest: str) -> dict:
    """The manifest entry of a ``sys_<S>`` case: every MoEConfig field, the terms' forms and coefficients."""
    terms = system_terms(spec.system)
    names = {"aux": "alpha", "z": "zeta"}
    return {
        "kind": spec.kind,
        "micro_batches": [],
        "file": f"{spec.name}.npz",
        "sha256": digest,
        "description": spec.description,
        "dtype": spec.dtype,
        "tolerance": dict(system_tolerance(spec.system, spec.dtype)),
        "system": spec.system,
        "config": dataclasses.asdict(spec.config()),
        "n_tokens": spec.n_tokens,
        "batch_shape": list(spec.batch_shape),
        "token_order": "t*B + b" if spec.system.startswith("megatron") else "b*T + t",
        "padding_tokens": [],
        "regularisers_see_padding": False,
        "variants": {"aux": terms["aux"][1] if "aux" in terms else None, "ortho": None, "var": None,
                     "z": terms["z"][1] if "z" in terms else None},
        "balancing": list(terms["aux"][:2]) if "aux" in terms else None,
        "coefficients": {names[t]: c for t, (_, _, c, _) in terms.items()},
        "coefficient_source": {names[t]: why for t, (_, _, _, why) in terms.items()},
        "ortho_eps": None,
        "preset": None,
        "ties": False,
        "seed": spec.seed,
        "terms": sorted({k.split("/")[1] for k in arrays if k.startswith("grad/")}),
        "keys": fmt.key_specs(arrays),
    }


def write_golden(directory, cases=None, *, backend: str | None = "numpy") -> dict:
    """Compute the cases and write them under ``directory`` (created if needed); returns the manifest.

    cases    None (the default grid), a list of case names from it, or a list of ``CaseSpec``
    backend  where to compute ("numpy" or "cupy"); the files are the same format either way
    Same refmoe and NumPy versions on NumPy give byte-identical files. Case names must be plain names
    (letters, digits, '_', '-'); ``directory`` and the files written in it may not be symlinks
    (GoldenFormatError), and each file is written under a temporary name and renamed into place.
    """
    from .. import __version__

    if cases is None or all(isinstance(c, str) for c in cases):
        specs = select(cases)
    elif all(isinstance(c, CaseSpec) for c in cases):
        specs = list(cases)
    else:
        raise TypeError("cases must be None, a list of case names, or a list of CaseSpec")
    names = [trust.check_name(s.name, "write_golden") for s in specs]   # <name>.npz stays inside directory
    if len(set(names)) != len(names):
        raise ValueError(f"case names repeat: {names}")
    specs = [resolve_preset(s) for s in specs]          # the manifest records the calibrated coefficients
    name = backend_name(backend)
    if os.path.lexists(directory):
        directory = trust.check_directory(directory, "golden directory")     # not a symlink to elsewhere
    os.makedirs(directory, exist_ok=True)
    entries = {}
    for spec in specs:
        arrays = compute_case(spec, backend=name)
        digest = fmt.save_npz(os.path.join(directory, f"{spec.name}.npz"), arrays)
        entries[spec.name] = case_entry(spec, arrays, digest)
    manifest = {
        "format": fmt.FORMAT_NAME,
        "schema_version": fmt.SCHEMA_VERSION,
        "refmoe_version": __version__,
        "numpy_version": np.__version__,
        "backend": name,
        "tie_rule": fmt.TIE_RULE,
        "task_loss": "L_h = <dy, y>; its gradient is the layer's vector-Jacobian product with dy",
        "total": "total = L_h + alpha L_aux + beta L_o + gamma L_v (+ zeta L_z: system cases)",
        "grad_terms": ("grad/<term>/* is the term's contribution to grad/total: the gradient of loss/<term> times "
                       "its coefficient (1 for task); grad/total/* is their sum"),
        "tolerances": fmt.TOLERANCES,
        "tolerance_rule": "max|got - want| <= atol + rtol * max|want| per tensor; integers and bools exact",
        "cases": entries,
    }
    fmt.write_manifest(directory, manifest)
    return manifest
