"""The on-disk format of golden fixtures: one ``.npz`` per case and a ``manifest.json`` (docs/golden-format.md).

Arrays are stored under slash-separated keys:

    input/x [N, D]   input/dy [N, D]   input/valid_mask [N] bool   param/<name> (every parameter)
    inter/logits [N, E]  inter/scores [N, E]  inter/topk_idx [N, K] int64  inter/gates [N, K]
    inter/expert_out [N, K, D]  inter/y [N, D]  (inter/shared_out [N, D] with shared experts)
    loss/<term> []                     term in task, aux, ortho, var, z (sys_megatron* cases), total
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
import math
import os
import re
import zipfile

import numpy as np

from . import trust
from .trust import GoldenFormatError

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


# ----------------------------------------------------------------------------------------------
# npz files, written byte-for-byte reproducibly
# ----------------------------------------------------------------------------------------------

def save_npz(path, arrays: dict) -> str:
    """Write ``arrays`` (name -> NumPy array) as an uncompressed ``.npz``; returns its sha256.

    Keys are sorted and every zip entry gets the same timestamp, so equal arrays give equal bytes.
    A symlink at ``path`` is refused (trust.write_bytes).
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
    trust.write_bytes(os.fspath(path), data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with trust.open_regular(path, "file") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_npz(path) -> dict:
    """All arrays of an ``.npz`` as a dict, read without pickles (trust.NpzArchive).

    Raises GoldenFormatError for a missing, symlinked or unreadable file and for pickled (object) arrays.
    """
    with trust.NpzArchive(path, "file") as archive:
        return {key: archive[key] for key in archive}


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------

def write_manifest(directory, manifest: dict) -> str:
    path = os.path.join(directory, MANIFEST)
    trust.write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


MAX_MANIFEST_BYTES = 16 << 20            # the default grid's manifest is ~100 kB
MAX_CASE_BYTES = 256 << 20               # the arrays of one case (the default grid's are < 40 kB each)
ITEMSIZE = {"bool": 1, "float32": 4, "float64": 8, "int64": 8}
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY = re.compile(r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)+")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_entry(name, entry, source: str) -> None:
    """The fields of a case entry that reading and checking rely on; GoldenFormatError naming the field."""
    trust.check_name(name, source)
    where = f"{source}: case {name!r}"                  # a plain name, so short
    if not isinstance(entry, dict):
        raise GoldenFormatError(f"{where} is a {type(entry).__name__}, expected an object")
    for field in ("file", "sha256", "keys", "dtype", "tolerance"):
        if field not in entry:
            raise GoldenFormatError(f"{where} lacks the field {field!r}")
    if entry["file"] != f"{name}.npz":
        raise GoldenFormatError(f"{where}: file {trust.short(entry['file'])} must be {name + '.npz'!r} "
                                "(a plain name inside the golden directory)")
    if not isinstance(entry["sha256"], str) or not SHA256.fullmatch(entry["sha256"]):
        raise GoldenFormatError(f"{where}: sha256 {trust.short(entry['sha256'])} is not 64 lowercase hex digits")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in TOLERANCES:
        raise GoldenFormatError(f"{where}: dtype {trust.short(entry['dtype'])}, expected one of {sorted(TOLERANCES)}")
    tol = entry["tolerance"]
    if not isinstance(tol, dict) or set(tol) != {"rtol", "atol"}:
        raise GoldenFormatError(f"{where}: tolerance must be an object with rtol and atol, got {trust.short(tol)}")
    for field, value in tol.items():
        if not _finite_number(value) or value < 0:
            raise GoldenFormatError(f"{where}: tolerance {field} {trust.short(value)} is not a finite number >= 0")
    keys = entry["keys"]
    if not isinstance(keys, dict) or not keys:
        raise GoldenFormatError(f"{where}: keys must be a non-empty object")
    for key, spec in keys.items():
        if not KEY.fullmatch(key) or key.split("/")[0] not in GROUPS:
            raise GoldenFormatError(f"{where}: key {trust.short(key)} is not <group>/<name> with group in {GROUPS}")
        if (not isinstance(spec, dict) or not isinstance(spec.get("shape"), list)
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2 ** 31
                           for n in spec["shape"])
                or not isinstance(spec.get("dtype"), str) or spec["dtype"] not in ITEMSIZE):
            raise GoldenFormatError(f"{where}: key {trust.short(key)} must be "
                                    f"{{\"shape\": [ints >= 0], \"dtype\": one of {sorted(ITEMSIZE)}}}, "
                                    f"got {trust.short(spec)}")
    size = sum(math.prod(spec["shape"]) * ITEMSIZE[spec["dtype"]] for spec in keys.values())
    if size > MAX_CASE_BYTES:
        raise GoldenFormatError(f"{where}: its keys declare {size} bytes of arrays; at most {MAX_CASE_BYTES} "
                                "are read (format.MAX_CASE_BYTES)")


def load_manifest(directory) -> dict:
    """Read and check ``manifest.json`` of a golden directory (every malformed field is a GoldenFormatError)."""
    directory = trust.check_directory(directory, "golden directory") if os.path.lexists(directory) else directory
    path = os.path.join(directory, MANIFEST)
    if trust.entry_state(path, MANIFEST) == "missing":
        raise GoldenFormatError(f"{directory}: no {MANIFEST}; is this a directory written by `refmoe golden write`?")
    with trust.open_regular(path, MANIFEST) as f:
        if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
            raise GoldenFormatError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not a golden manifest")
        data = f.read()
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:       # JSONDecodeError, bad UTF-8, nesting too deep
        raise GoldenFormatError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise GoldenFormatError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise GoldenFormatError(
            f"{path}: schema_version {trust.short(version)}; this refmoe reads version {SCHEMA_VERSION}")
    cases = manifest.get("cases")
    if not isinstance(cases, dict) or not cases:
        raise GoldenFormatError(f"{path}: 'cases' must be a non-empty object")
    for name, entry in cases.items():
        check_entry(name, entry, path)
    return manifest


# ----------------------------------------------------------------------------------------------
# checking a case's arrays against its manifest entry
# ----------------------------------------------------------------------------------------------

def key_specs(arrays: dict) -> dict:
    """key -> {"shape": [...], "dtype": "..."} as recorded in the manifest."""
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in sorted(arrays.items())}


def validate_arrays(arrays, entry: dict, source: str, *, groups=GROUPS, exact_dtype=True):
    """Every manifest key of ``groups`` is present with its shape (and dtype); raises GoldenFormatError.

    ``arrays`` is a dict of arrays or a trust.NpzArchive (then only the headers are looked at).
    """
    want = {k: v for k, v in entry["keys"].items() if k.split("/")[0] in groups}
    missing = sorted(k for k in want if k not in arrays)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise GoldenFormatError(f"{source}: missing keys {shown}")
    for key, spec in want.items():
        shape, dtype = arrays.spec(key) if hasattr(arrays, "spec") else (np.shape(arrays[key]), arrays[key].dtype)
        if list(shape) != list(spec["shape"]):
            raise GoldenFormatError(
                f"{source}: {key} has shape {tuple(shape)}, expected {tuple(spec['shape'])}")
        if exact_dtype and str(dtype) != spec["dtype"]:
            raise GoldenFormatError(f"{source}: {key} has dtype {dtype}, expected {spec['dtype']}")


def case_path(directory, name: str, entry: dict) -> str:
    """``directory/<name>.npz`` for a checked entry (its ``file`` is that plain name, nothing else)."""
    check_entry(name, entry, os.fspath(directory))
    return os.path.join(directory, f"{name}.npz")


def load_case(directory, name: str, manifest: dict | None = None, *, verify: bool = True) -> dict:
    """The arrays of golden case ``name``, after checking its sha256, keys, shapes and dtypes.

    The ``.npy`` headers are checked against the manifest before any array data is read.
    """
    manifest = load_manifest(directory) if manifest is None else manifest
    if name not in manifest["cases"]:
        raise GoldenFormatError(f"{directory}: no case {trust.short(name)}; "
                                f"cases are {trust.short(sorted(manifest['cases']), 400)}")
    entry = manifest["cases"][name]
    path = case_path(directory, name, entry)
    if trust.entry_state(path, f"file of case {name!r}") == "missing":
        raise GoldenFormatError(f"{path}: file of case {name!r} not found")
    what = f"file of case {name!r}"
    fileobj = None
    if verify:                           # hash the very bytes that are parsed (read once, size bounded)
        with trust.open_regular(path, what) as f:
            if os.fstat(f.fileno()).st_size > 2 * MAX_CASE_BYTES:
                raise GoldenFormatError(f"{path}: larger than {2 * MAX_CASE_BYTES} bytes; not a golden case")
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise GoldenFormatError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest ({entry['sha256'][:16]}...); "
                "the file was modified or belongs to another fixture set")
        fileobj = io.BytesIO(data)
    with trust.NpzArchive(path, what, fileobj) as archive:
        source = f"golden case {name!r}"
        validate_arrays(archive, entry, source)
        extra = sorted(k for k in archive if k not in entry["keys"])
        if extra:
            raise GoldenFormatError(f"{source}: keys {extra[:8]} are not in the manifest")
        return {key: archive[key] for key in archive}
