"""Comparing another implementation's dump with the golden fixtures, tensor by tensor.

A dump is a directory with one ``<case>.npz`` per case it covers, holding the same keys as the fixture
(at least every ``inter/``, ``loss/`` and ``grad/`` key; ``input/`` and ``param/`` keys are compared when
present). Cases without a dump file are skipped (an implementation may support a subset) unless
``require_all``. A tensor passes when

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
from typing import NamedTuple

import numpy as np

from . import format as fmt
from . import trust


class TensorResult(NamedTuple):
    case: str
    key: str
    max_abs: float
    max_rel: float            # max_abs / max|want| (nan when the reference is all zeros)
    ok: bool
    note: str                 # "" or why it failed before comparing (missing, shape, NaN ...)
    mismatches: tuple         # up to ``n_show`` (index, got, want) of the worst entries, when failed
    used: float = float("inf")  # max_abs / (atol + rtol * max|want|): the share of the tolerance used


class CheckReport(NamedTuple):
    results: tuple            # TensorResult rows, case by case
    checked: tuple            # case names compared
    skipped: tuple            # case names without a dump file
    tolerances: dict          # case -> {"rtol", "atol"}

    @property
    def ok(self) -> bool:
        return bool(self.checked) and all(r.ok for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def format(self, verbose: bool = False, n_show: int = 5) -> str:
        """A readable table: every tensor of failing cases (all cases when ``verbose``) and the first
        mismatching entries of each failing tensor."""
        lines = []
        for case in self.checked:
            rows = [r for r in self.results if r.case == case]
            tol = self.tolerances[case]
            bad = [r for r in rows if not r.ok]
            if not bad and not verbose:
                worst = max(rows, key=lambda r: r.used)
                lines.append(f"case {case}: {len(rows)} tensors ok (closest: {worst.key} at "
                             f"{100 * worst.used:.2g}% of its tolerance)")
                continue
            status = "ok" if not bad else f"FAIL ({len(bad)} of {len(rows)} tensors)"
            lines.append(f"case {case}: {status}   rtol {tol['rtol']:g}, atol {tol['atol']:g}")
            width = max(len(r.key) for r in rows)
            lines.append(f"  {'tensor':<{width}}  {'max abs':>9}  {'max rel':>9}  ok")
            for r in rows:
                mark = "ok" if r.ok else "FAIL"
                extra = f"  {r.note}" if r.note else ""
                lines.append(f"  {r.key:<{width}}  {r.max_abs:9.2e}  {r.max_rel:9.2e}  {mark}{extra}")
            for r in bad:
                for index, got, want in r.mismatches[:n_show]:
                    lines.append(f"    {r.key}{list(index)}: got {got!r}, want {want!r}")
        n_bad_cases = len({r.case for r in self.failures})
        lines.append(f"{len(self.checked)} case(s) checked, {n_bad_cases} failed, {len(self.skipped)} skipped"
                     + (f" (no dump: {', '.join(self.skipped)})" if self.skipped else ""))
        if not self.checked:
            lines.append("no case was compared: the dump directory holds none of the golden cases")
        if self.failures:
            first = self.failures[0]
            lines.append(f"FAILED: first mismatch in case {first.case!r}, tensor {first.key}")
        else:
            lines.append("OK" if self.checked else "FAILED")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# one tensor, one case
# ----------------------------------------------------------------------------------------------

def _py(v):
    return v.item() if hasattr(v, "item") else v


def _kind_error(case, key, got_dtype, want_dtype):
    want_kind = trust.KIND_NAMES.get(want_dtype.kind, want_dtype.kind)
    return fmt.GoldenFormatError(f"case {case!r}: {key} has dtype {got_dtype}, expected a {want_kind} array "
                                 f"like the fixture's {want_dtype}")


def compare_tensor(case, key, got, want, rtol, atol, n_show=5) -> TensorResult:
    """One tensor's verdict. A dtype whose kind differs from the fixture's (float for int64 ...) is a
    GoldenFormatError, not a mismatch; integers and bools are compared exactly, without a cast."""
    want = np.asarray(want)
    got = np.asarray(got)
    if got.dtype.kind not in trust.PLAIN_KINDS or got.dtype.hasobject:
        raise fmt.GoldenFormatError(f"case {case!r}: {key} has dtype {got.dtype}, which is not plain numbers")
    if got.dtype.kind != want.dtype.kind:
        raise _kind_error(case, key, got.dtype, want.dtype)
    if got.shape != want.shape:
        return TensorResult(case, key, np.inf, np.inf, False,
                            f"shape {tuple(got.shape)}, expected {tuple(want.shape)}", ())
    if want.dtype.kind in "biu":
        diff = got != want                                  # same kind: exact, no cast
        n_bad = int(diff.sum())
        mism = tuple((tuple(int(i) for i in ix), _py(got[ix]), _py(want[ix])) for ix in zip(*np.nonzero(diff)))
        note = f"{n_bad} of {want.size} entries differ" if n_bad else ""
        return TensorResult(case, key, float(n_bad > 0), float(n_bad > 0), n_bad == 0, note, mism[:n_show],
                            np.inf if n_bad else 0.0)
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    if not np.isfinite(g).all():
        bad = ~np.isfinite(g)
        mism = tuple((tuple(int(i) for i in ix), float(g[ix]), float(w[ix])) for ix in zip(*np.nonzero(bad)))
        return TensorResult(case, key, np.inf, np.inf, False, "NaN or inf in the dump", mism[:n_show])
    err = np.abs(g - w)
    scale = float(np.abs(w).max()) if w.size else 0.0
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = max_abs / scale if scale > 0 else float("nan")
    bound = atol + rtol * scale
    ok = max_abs <= bound
    used = max_abs / bound if bound > 0 else (0.0 if max_abs == 0 else np.inf)
    mism = ()
    if not ok:
        flat = np.argsort(-err, axis=None, kind="stable")[:n_show]
        idx = [np.unravel_index(int(f), err.shape) for f in flat]
        mism = tuple((tuple(int(i) for i in ix), float(g[ix]), float(w[ix])) for ix in idx if err[ix] > bound)
    return TensorResult(case, key, max_abs, max_rel, ok, "", mism, used)


def compare_case(name: str, golden: dict, dump, tolerance: dict, *, n_show: int = 5) -> list:
    """TensorResult rows for one case: every output key of the fixture, plus inputs the dump repeats.

    ``dump`` is a dict of arrays or a trust.NpzArchive; for an archive a member's dtype kind and shape are
    checked from its header, and its data is read only when they fit.
    """
    rows = []
    for key in sorted(golden, key=lambda k: (fmt.GROUPS.index(k.split("/")[0]), k)):
        group = key.split("/")[0]
        if group not in fmt.OUTPUT_GROUPS and key not in dump:
            continue
        if key not in dump:
            rows.append(TensorResult(name, key, np.inf, np.inf, False, "missing from the dump", ()))
            continue
        want = golden[key]
        if hasattr(dump, "spec"):
            shape, dtype = dump.spec(key)
            if dtype.kind != want.dtype.kind:
                raise _kind_error(name, key, dtype, want.dtype)
            if shape != want.shape:
                rows.append(TensorResult(name, key, np.inf, np.inf, False,
                                         f"shape {shape}, expected {tuple(want.shape)}", ()))
                continue
        rows.append(compare_tensor(name, key, dump[key], want, tolerance["rtol"], tolerance["atol"], n_show))
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


def check_dump(golden_dir, dump_dir, *, cases=None, rtol: float | None = None, atol: float | None = None,
               require_all: bool = False, n_show: int = 5) -> CheckReport:
    """Compare ``dump_dir/<case>.npz`` with ``golden_dir/<case>.npz`` for every golden case (or ``cases``).

    rtol, atol    replace the default tolerances (finite, >= 0; see case_tolerance)
    require_all   a missing dump file fails its case instead of skipping it
    Raises GoldenFormatError for a bad fixture (no manifest, a malformed field, checksum mismatch, missing
    keys, wrong shapes, pickled objects, symlinks) and for an unreadable, pickled or wrongly typed dump file.
    """
    manifest = fmt.load_manifest(golden_dir)
    dump_dir = trust.check_directory(dump_dir, "dump directory")
    names = sorted(manifest["cases"]) if not cases else list(cases)
    unknown = [n for n in names if n not in manifest["cases"]]
    if unknown:
        raise fmt.GoldenFormatError(f"unknown case(s) {unknown}; the fixture has {sorted(manifest['cases'])}")
    results, checked, skipped, tolerances = [], [], [], {}
    for name in names:
        entry = manifest["cases"][name]
        tol = tolerances[name] = case_tolerance(entry, rtol, atol)
        path = os.path.join(dump_dir, f"{trust.check_name(name, 'case')}.npz")
        if trust.entry_state(path, f"dump of case {name!r}") == "missing":
            if require_all:
                results.append(TensorResult(name, "(file)", np.inf, np.inf, False, f"{path} not found", ()))
                checked.append(name)
            else:
                skipped.append(name)
            continue
        golden = fmt.load_case(golden_dir, name, manifest)
        with trust.NpzArchive(path, f"dump of case {name!r}") as dump:
            results.extend(compare_case(name, golden, dump, tol, n_show=n_show))
        checked.append(name)
    return CheckReport(tuple(results), tuple(checked), tuple(skipped), tolerances)
