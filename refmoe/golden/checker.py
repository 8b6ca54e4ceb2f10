"""Comparing another implementation's dump with the golden fixtures, tensor by tensor.

A dump is a directory with one ``<case>.npz`` per case it covers, holding the same keys as the fixture
(every ``inter/``, ``loss/`` and ``grad/`` key, or with ``terms`` only those of the chosen loss terms, see
``TERM_INTERMEDIATES``; ``input/`` and ``param/`` keys are compared when present). Cases without a dump file
are skipped (an implementation may support a subset) unless ``require_all``. A tensor passes when

    max |got - want| <= atol + rtol * max |want|        (floats)
    got == want                                          (integers and bools, in their dtype: top-k indices, masks)

The tolerances are the checker's own: ``format.TOLERANCES`` by dtype, or ``rtol`` / ``atol`` when given; a
manifest's ``tolerance`` can only tighten the defaults, never loosen them. The golden and dump directories
are not trusted (docs/golden-format.md#trust): every file is a plain ``<case>.npz`` inside its directory, no
symlinks are followed, and a dump member's ``.npy`` header (dtype kind, shape, declared size) is checked
before its data is read.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import format as fmt
from . import trust
from .report import MISSING, CheckReport, TensorResult

TERMS = ("task", "aux", "ortho", "var", "z")     # what --terms accepts (z: the router z-loss, no case yet)
# The intermediates each term is computed from, checked with it under ``terms`` (keys a case lacks are left
# out). None: every inter/ key, since <dy, y> and its gradient run through the whole layer.
TERM_INTERMEDIATES = {
    "task": None,
    "aux": ("inter/scores", "inter/topk_idx", "inter/global_counts", "inter/global_tokens"),
    "ortho": ("inter/expert_out", "inter/topk_idx", "inter/global_tokens"),
    "var": ("inter/scores", "inter/topk_idx", "inter/global_tokens", "inter/global_score_sums"),
    "z": ("inter/logits",),
}
# ----------------------------------------------------------------------------------------------
# which keys a check covers
# ----------------------------------------------------------------------------------------------

def case_terms(keys) -> list:
    """The loss terms of a case (not ``total``), from its manifest keys: the ``<term>`` of ``grad/<term>/*``."""
    return sorted({k.split("/")[1] for k in keys if k.startswith("grad/")} - {"total"})


def check_terms(terms) -> tuple | None:
    """``terms`` as a tuple in TERMS order (None stays None); ValueError for an unknown or empty choice."""
    if terms is None:
        return None
    terms = [terms] if isinstance(terms, str) else terms
    terms = [t for item in terms for t in str(item).replace(",", " ").split()]
    unknown = sorted(set(terms) - set(TERMS))
    if unknown or not terms:
        raise ValueError(f"--terms {' '.join(unknown) or '(empty)'}: expected some of {', '.join(TERMS)}")
    return tuple(t for t in TERMS if t in terms)


def _owner(key: str) -> str:
    """The term a ``loss/`` or ``grad/`` key belongs to: loss/aux, loss/aux_pieces, grad/aux/x -> aux."""
    name = key.split("/")[1]
    return name if name in TERMS or name == "total" else name.split("_")[0]


def needed_keys(keys, terms=None) -> list:
    """The output keys (inter/, loss/, grad/) among ``keys`` that checking ``terms`` needs (None: all).

    For term t: loss/t (and loss/t_*), grad/t/* and the intermediates of TERM_INTERMEDIATES[t];
    loss/total and grad/total/* only when every term of the case is chosen.
    """
    out = [k for k in keys if k.split("/")[0] in fmt.OUTPUT_GROUPS]
    if terms is None:
        return out
    chosen = set(terms)
    whole = set(case_terms(keys)) <= chosen
    inter = set()
    for t in chosen & set(case_terms(keys)):                  # a term the case lacks needs nothing
        inter |= {k for k in out if k.startswith("inter/")} if TERM_INTERMEDIATES[t] is None \
            else set(TERM_INTERMEDIATES[t])
    return [k for k in out if k in inter
            or (not k.startswith("inter/") and (_owner(k) in chosen or (_owner(k) == "total" and whole)))]


# ----------------------------------------------------------------------------------------------
# one tensor, one case
# ----------------------------------------------------------------------------------------------

def _py(v):
    return v.item() if hasattr(v, "item") else v


def _kind_error(case, key, got_dtype, want_dtype):
    want_kind = trust.KIND_NAMES.get(want_dtype.kind, want_dtype.kind)
    return fmt.GoldenFormatError(f"case {case!r}: {key} has dtype {got_dtype}, expected a {want_kind} array "
                                 f"like the fixture's {want_dtype}")


def _rows_of(shape, padding_mask, token_axis):
    """The padding-row mask to label entries with, or None when the tensor has no token axis."""
    if (padding_mask is None or not padding_mask.any() or len(shape) <= token_axis
            or shape[token_axis] != padding_mask.shape[0]):
        return None
    return padding_mask


def _bad_entries(bad, index_list, pad, token_axis):
    """(n_bad, n_bad_padding, and for each index of ``index_list`` its token row if that is padding, else None)."""
    n_bad = int(bad.sum())
    if pad is None:
        return n_bad, 0, ()
    n_pad = int(np.moveaxis(bad, token_axis, 0)[pad].sum())
    return n_bad, n_pad, tuple(ix[token_axis] if pad[ix[token_axis]] else None for ix in index_list)


def compare_tensor(case, key, got, want, rtol, atol, n_show=5, *, padding_mask=None, token_axis=0) -> TensorResult:
    """One tensor's verdict. A dtype whose kind differs from the fixture's (float for int64 ...) is a
    GoldenFormatError, not a mismatch; integers and bools are compared exactly, without a cast.

    padding_mask  [N] bool, True on padding rows: failing entries on them are counted and labelled, for
                  tensors whose axis ``token_axis`` has length N
    """
    want = np.asarray(want)
    got = np.asarray(got)
    if got.dtype.kind not in trust.PLAIN_KINDS or got.dtype.hasobject:
        raise fmt.GoldenFormatError(f"case {case!r}: {key} has dtype {got.dtype}, which is not plain numbers")
    if got.dtype.kind != want.dtype.kind:
        raise _kind_error(case, key, got.dtype, want.dtype)
    if got.shape != want.shape:
        return TensorResult(case, key, math.nan, math.nan, False,
                            f"shape {tuple(got.shape)}, expected {tuple(want.shape)}", ())
    pad = _rows_of(want.shape, padding_mask, token_axis)
    if want.dtype.kind in "biu":
        diff = got != want                                  # same kind: exact, no cast
        where = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(diff))][:n_show]
        n_bad, n_pad, flags = _bad_entries(diff, where, pad, token_axis)
        mism = tuple((ix, _py(got[ix]), _py(want[ix])) for ix in where)
        note = f"{n_bad} of {want.size} entries differ" if n_bad else ""
        return TensorResult(case, key, float(n_bad > 0), float(n_bad > 0), n_bad == 0, note, mism,
                            np.inf if n_bad else 0.0, math.nan, n_bad, n_pad, flags)
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    if not np.isfinite(g).all():
        bad = ~np.isfinite(g)
        where = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(bad))][:n_show]
        n_bad, n_pad, flags = _bad_entries(bad, where, pad, token_axis)
        mism = tuple((ix, float(g[ix]), float(w[ix])) for ix in where)
        return TensorResult(case, key, np.inf, np.inf, False, "NaN or inf in the dump", mism, np.inf,
                            math.nan, n_bad, n_pad, flags)
    err = np.abs(g - w)
    scale = float(np.abs(w).max()) if w.size else 0.0
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = max_abs / scale if scale > 0 else float("nan")
    bound = atol + rtol * scale
    ok = max_abs <= bound
    used = max_abs / bound if bound > 0 else (0.0 if max_abs == 0 else np.inf)
    if ok:
        return TensorResult(case, key, max_abs, max_rel, True, "", (), used)
    flat = np.argsort(-err, axis=None, kind="stable")[:n_show]
    where = [tuple(int(i) for i in np.unravel_index(int(f), err.shape)) for f in flat]
    where = [ix for ix in where if err[ix] > bound]
    n_bad, n_pad, flags = _bad_entries(err > bound, where, pad, token_axis)
    mism = tuple((ix, float(g[ix]), float(w[ix])) for ix in where)
    norm_w = float(np.linalg.norm(w))
    ratio = float(np.linalg.norm(g)) / norm_w if w.ndim else (float(g) / float(w) if w != 0 else math.nan)
    ratio = ratio if w.ndim == 0 or norm_w > 0 else math.nan
    return TensorResult(case, key, max_abs, max_rel, False, "", mism, used, ratio, n_bad, n_pad, flags)


def compare_case(name: str, golden: dict, dump, tolerance: dict, *, n_show: int = 5, terms=None,
                 token_axis: int = 0) -> list:
    """TensorResult rows for one case: the output keys ``terms`` need (all when None, see needed_keys),
    plus inputs and parameters the dump repeats.

    ``dump`` is a dict of arrays or a trust.NpzArchive; for an archive a member's dtype kind and shape are
    checked from its header, and its data is read only when they fit. Entries on the rows where
    ``golden["input/valid_mask"]`` is False (axis ``token_axis``) are labelled as padding.
    """
    needed = set(needed_keys(golden, terms))
    valid = golden.get("input/valid_mask")
    padding_mask = None if valid is None else ~np.asarray(valid, dtype=bool)
    rows = []
    for key in sorted(golden, key=lambda k: (fmt.GROUPS.index(k.split("/")[0]), k)):
        group = key.split("/")[0]
        if key not in dump:
            if key in needed:
                rows.append(TensorResult(name, key, math.nan, math.nan, False, MISSING, ()))
            continue
        if group in fmt.OUTPUT_GROUPS and key not in needed:
            continue
        want = golden[key]
        if hasattr(dump, "spec"):
            shape, dtype = dump.spec(key)
            if dtype.kind != want.dtype.kind:
                raise _kind_error(name, key, dtype, want.dtype)
            if shape != want.shape:
                rows.append(TensorResult(name, key, math.nan, math.nan, False,
                                         f"shape {shape}, expected {tuple(want.shape)}", ()))
                continue
        rows.append(compare_tensor(name, key, dump[key], want, tolerance["rtol"], tolerance["atol"], n_show,
                                   padding_mask=padding_mask, token_axis=token_axis))
    return rows


# ----------------------------------------------------------------------------------------------
# a whole directory
# ----------------------------------------------------------------------------------------------

def check_tolerance(value, name: str) -> float:
    """``value`` as a float if it is a finite number >= 0; GoldenFormatError otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise fmt.GoldenFormatError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def case_tolerance(entry: dict, rtol=None, atol=None) -> dict:
    """The tolerances a case is checked at: ``rtol`` / ``atol`` when given, else format.TOLERANCES of the
    case's dtype tightened (never loosened) by the manifest entry's ``tolerance``."""
    own = fmt.TOLERANCES[entry["dtype"]]
    recorded = entry["tolerance"]
    return {field: (check_tolerance(given, field) if given is not None else min(own[field], recorded[field]))
            for field, given in (("rtol", rtol), ("atol", atol))}


def dtype_note(name: str, case_dtype: str, dump, keys) -> str | None:
    """One line when the dump's float tensors among ``keys`` are not of the case's dtype, else None."""
    floats = [(k, str(dump.spec(k)[1] if hasattr(dump, "spec") else np.asarray(dump[k]).dtype))
              for k in keys if k in dump]
    floats = [(k, d) for k, d in floats if np.dtype(d).kind == "f"]
    other = [(k, d) for k, d in floats if d != case_dtype]
    if not other:
        return None
    kinds = sorted({d for _, d in other})
    if len(other) == len(floats) and len(kinds) == 1:
        return (f"dump is {kinds[0]}, case {name!r} is {case_dtype}: compare against the {kinds[0]} cases "
                "or cast")
    return (f"dump has {len(other)} of {len(floats)} float tensors in {'/'.join(kinds)} (first {other[0][0]}), "
            f"case {name!r} is {case_dtype}")


def _hint(rows, entry, dump, terms) -> str | None:
    """What may explain a failing case: the dump holds the keys of fewer terms, or float32 round-off."""
    if any(r.missing for r in rows):
        full = [t for t in case_terms(entry["keys"]) if all(k in dump for k in needed_keys(entry["keys"], [t]))]
        if full and tuple(full) != terms:
            return f"the dump has every key of --terms {','.join(full)}"
        return None
    bad = [r for r in rows if not r.ok]
    if bad and entry["dtype"] == "float64" and all(1e-9 <= r.max_rel <= 1e-5 for r in bad):
        worst = max(r.max_rel for r in bad)
        return (f"max rel {worst:.0e} is float32 round-off: HF and Megatron routers compute the softmax in "
                "float32 (docs/golden-format.md, float32 routers)")
    return None


def check_dump(golden_dir, dump_dir, *, cases=None, rtol: float | None = None, atol: float | None = None,
               require_all: bool = False, n_show: int = 5, terms=None) -> CheckReport:
    """Compare ``dump_dir/<case>.npz`` with ``golden_dir/<case>.npz`` for every golden case (or ``cases``).

    rtol, atol    replace the default tolerances (finite, >= 0; see case_tolerance)
    require_all   a missing dump file fails its case instead of skipping it
    terms         check only these loss terms (some of TERMS) and the intermediates they need (needed_keys);
                  a case with none of them is skipped; None: every key
    Raises GoldenFormatError for a bad fixture (no manifest, a malformed field, checksum mismatch, missing
    keys, wrong shapes, pickled objects, symlinks) and for an unreadable, pickled or wrongly typed dump file;
    ValueError for an unknown term.
    """
    terms = check_terms(terms)
    manifest = fmt.load_manifest(golden_dir)
    dump_dir = trust.check_directory(dump_dir, "dump directory")
    names = sorted(manifest["cases"]) if not cases else list(cases)
    unknown = [n for n in names if n not in manifest["cases"]]
    if unknown:
        raise fmt.GoldenFormatError(f"unknown case(s) {unknown}; the fixture has {sorted(manifest['cases'])}")
    results, checked, skipped, tolerances, reasons, notes, hints = [], [], [], {}, {}, {}, {}
    for name in names:
        entry = manifest["cases"][name]
        tol = tolerances[name] = case_tolerance(entry, rtol, atol)
        if terms is not None and not set(terms) & set(case_terms(entry["keys"])):
            skipped.append(name)
            reasons[name] = f"no {'/'.join(terms)} term"
            continue
        path = os.path.join(dump_dir, f"{trust.check_name(name, 'case')}.npz")
        if trust.entry_state(path, f"dump of case {name!r}") == "missing":
            if require_all:
                results.append(TensorResult(name, "(file)", math.nan, math.nan, False, f"{path} not found", ()))
                checked.append(name)
            else:
                skipped.append(name)
                reasons[name] = "no dump file"
            continue
        golden = fmt.load_case(golden_dir, name, manifest)
        axis = 1 if entry.get("kind") == "aux_layers" else 0          # [L, N, ...] tensors
        with trust.NpzArchive(path, f"dump of case {name!r}") as dump:
            rows = compare_case(name, golden, dump, tol, n_show=n_show, terms=terms, token_axis=axis)
            compared = [r.key for r in rows if not r.missing]
            note = dtype_note(name, entry["dtype"], dump, compared)
            hint = None if note else _hint(rows, entry, dump, terms)
        results.extend(rows)
        checked.append(name)
        if note:
            notes[name] = note
        if hint:
            hints[name] = hint
    return CheckReport(tuple(results), tuple(checked), tuple(skipped), tolerances, reasons, notes, hints, terms)
