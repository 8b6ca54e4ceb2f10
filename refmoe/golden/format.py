"""The on-disk format of golden fixtures: one ``.npz`` per case and a ``manifest.json`` (docs/golden-format.md).

Arrays are stored under slash-separated keys:

    input/x [N, D]   input/dy [N, D]   input/valid_mask [N] bool   param/<name> (every parameter)
    inter/logits [N, E]  inter/scores [N, E]  inter/topk_idx [N, K] int64  inter/gates [N, K]
    inter/expert_out [N, K, D]  inter/y [N, D]  (inter/shared_out [N, D] with shared experts)
    loss/<term> []                     term in task, aux, ortho, var, total
    grad/<term>/<name>                 the term's contribution to grad/total: the gradient of its value times
                                       its coefficient (task: 1), for name = x and every parameter, same shape
                                       and dtype as the input (schema 2; schema 1 stored them unweighted)

Files are written deterministically (sorted keys, fixed zip timestamps, no compression, no pickles), so the
same refmoe and NumPy versions regenerate them bit for bit. They load with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np

SCHEMA_VERSION = 2
FORMAT_NAME = "refmoe-golden"
MANIFEST = "manifest.json"
GROUPS = ("input", "param", "inter", "loss", "grad")
OUTPUT_GROUPS = ("inter", "loss", "grad")           # what an implementation must reproduce
TIE_RULE = ("top-k keeps the K largest scores in descending order; among exactly equal scores the lower "
            "expert index wins and comes first (a stable sort of -scores)")
# max |got - want| <= atol + rtol * max |want| per tensor (scaled by the tensor's largest entry)
TOLERANCES = {"float64": {"rtol": 1e-10, "atol": 1e-13}, "float32": {"rtol": 1e-4, "atol": 1e-6}}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class GoldenFormatError(ValueError):
    """A fixture or a dump is missing, malformed, tampered with or holds pickled objects."""


# ----------------------------------------------------------------------------------------------
# npz files, written byte-for-byte reproducibly
# ----------------------------------------------------------------------------------------------

def save_npz(path, arrays: dict) -> str:
    """Write ``arrays`` (name -> NumPy array) as an uncompressed ``.npz``; returns its sha256.

    Keys are sorted and every zip entry gets the same timestamp, so equal arrays give equal bytes.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            arr = np.asarray(arrays[key])
            if arr.dtype.hasobject:
                raise GoldenFormatError(f"array {key!r} has dtype object; fixtures hold plain numbers only")
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(arr, order="C", copy=True), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_npz(path) -> dict:
    """All arrays of an ``.npz`` as a dict, read with ``allow_pickle=False``.

    Raises GoldenFormatError for a missing or unreadable file and for pickled (object) arrays.
    """
    if not os.path.isfile(path):
        raise GoldenFormatError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {}
            for key in data.files:
                try:
                    out[key] = data[key]
                except ValueError as exc:
                    if "pickle" in str(exc).lower():
                        raise GoldenFormatError(
                            f"{path}: array {key!r} holds pickled Python objects; refusing to load it "
                            "(fixtures and dumps must hold numeric arrays only)") from None
                    raise GoldenFormatError(f"{path}: array {key!r} cannot be read ({exc})") from None
            return out
    except GoldenFormatError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, a truncated .npy header ...
        raise GoldenFormatError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------

def write_manifest(directory, manifest: dict) -> str:
    path = os.path.join(directory, MANIFEST)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_manifest(directory) -> dict:
    """Read and check ``manifest.json`` of a golden directory."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise GoldenFormatError(f"{directory}: no {MANIFEST}; is this a directory written by `refmoe golden write`?")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise GoldenFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise GoldenFormatError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise GoldenFormatError(f"{path}: schema_version {version!r}; this refmoe reads version {SCHEMA_VERSION}")
    cases = manifest.get("cases")
    if not isinstance(cases, dict) or not cases:
        raise GoldenFormatError(f"{path}: 'cases' must be a non-empty object")
    for name, entry in cases.items():
        for field in ("file", "sha256", "keys", "dtype", "tolerance"):
            if field not in entry:
                raise GoldenFormatError(f"{path}: case {name!r} lacks the field {field!r}")
    return manifest


# ----------------------------------------------------------------------------------------------
# checking a case's arrays against its manifest entry
# ----------------------------------------------------------------------------------------------

def key_specs(arrays: dict) -> dict:
    """key -> {"shape": [...], "dtype": "..."} as recorded in the manifest."""
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in sorted(arrays.items())}


def validate_arrays(arrays: dict, entry: dict, source: str, *, groups=GROUPS, exact_dtype=True):
    """Every manifest key of ``groups`` is present with its shape (and dtype); raises GoldenFormatError."""
    want = {k: v for k, v in entry["keys"].items() if k.split("/")[0] in groups}
    missing = sorted(k for k in want if k not in arrays)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise GoldenFormatError(f"{source}: missing keys {shown}")
    for key, spec in want.items():
        got = arrays[key]
        if list(got.shape) != list(spec["shape"]):
            raise GoldenFormatError(
                f"{source}: {key} has shape {tuple(got.shape)}, expected {tuple(spec['shape'])}")
        if exact_dtype and str(got.dtype) != spec["dtype"]:
            raise GoldenFormatError(f"{source}: {key} has dtype {got.dtype}, expected {spec['dtype']}")


def load_case(directory, name: str, manifest: dict | None = None, *, verify: bool = True) -> dict:
    """The arrays of golden case ``name``, after checking its sha256, keys, shapes and dtypes."""
    manifest = load_manifest(directory) if manifest is None else manifest
    if name not in manifest["cases"]:
        raise GoldenFormatError(f"{directory}: no case {name!r}; cases are {sorted(manifest['cases'])}")
    entry = manifest["cases"][name]
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise GoldenFormatError(f"{path}: file of case {name!r} not found")
    if verify:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise GoldenFormatError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest ({entry['sha256'][:16]}...); "
                "the file was modified or belongs to another fixture set")
    arrays = load_npz(path)
    validate_arrays(arrays, entry, f"golden case {name!r}")
    return arrays
