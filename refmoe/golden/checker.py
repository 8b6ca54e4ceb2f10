"""Comparing another implementation's dump with the golden fixtures, tensor by tensor.

A dump is a directory with one ``<case>.npz`` per case it covers, holding the same keys as the fixture
(at least every ``inter/``, ``loss/`` and ``grad/`` key; ``input/`` and ``param/`` keys are compared when
present). Cases without a dump file are skipped (an implementation may support a subset) unless
``require_all``. A tensor passes when

    max |got - want| <= atol + rtol * max |want|        (floats; tolerances from the manifest by dtype)
    got == want                                          (integers and bools: top-k indices, masks)
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from . import format as fmt


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


def compare_tensor(case, key, got, want, rtol, atol, n_show=5) -> TensorResult:
    want = np.asarray(want)
    got = np.asarray(got)
    if got.shape != want.shape:
        return TensorResult(case, key, np.inf, np.inf, False,
                            f"shape {tuple(got.shape)}, expected {tuple(want.shape)}", ())
    if got.dtype.kind not in "biuf" or got.dtype.hasobject:
        return TensorResult(case, key, np.inf, np.inf, False, f"dtype {got.dtype} is not numeric", ())
    if want.dtype.kind in "biu":
        diff = got.astype(np.int64) != want.astype(np.int64) if want.dtype.kind != "b" else got != want
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


def compare_case(name: str, golden: dict, dump: dict, tolerance: dict, *, n_show: int = 5) -> list:
    """TensorResult rows for one case: every output key of the fixture, plus inputs the dump repeats."""
    rows = []
    for key in sorted(golden, key=lambda k: (fmt.GROUPS.index(k.split("/")[0]), k)):
        group = key.split("/")[0]
        if group not in fmt.OUTPUT_GROUPS and key not in dump:
            continue
        if key not in dump:
            rows.append(TensorResult(name, key, np.inf, np.inf, False, "missing from the dump", ()))
            continue
        rows.append(compare_tensor(name, key, dump[key], golden[key], tolerance["rtol"], tolerance["atol"], n_show))
    return rows


# ----------------------------------------------------------------------------------------------
# a whole directory
# ----------------------------------------------------------------------------------------------

def check_dump(golden_dir, dump_dir, *, cases=None, rtol: float | None = None, atol: float | None = None,
               require_all: bool = False, n_show: int = 5) -> CheckReport:
    """Compare ``dump_dir/<case>.npz`` with ``golden_dir/<case>.npz`` for every golden case (or ``cases``).

    rtol, atol    override the manifest's dtype-aware tolerances
    require_all   a missing dump file fails its case instead of skipping it
    Raises GoldenFormatError for a bad fixture (no manifest, checksum mismatch, missing keys, wrong
    shapes, pickled objects) and for an unreadable or pickled dump file.
    """
    manifest = fmt.load_manifest(golden_dir)
    if not os.path.isdir(dump_dir):
        raise fmt.GoldenFormatError(f"{dump_dir}: dump directory not found")
    names = sorted(manifest["cases"]) if not cases else list(cases)
    unknown = [n for n in names if n not in manifest["cases"]]
    if unknown:
        raise fmt.GoldenFormatError(f"unknown case(s) {unknown}; the fixture has {sorted(manifest['cases'])}")
    results, checked, skipped, tolerances = [], [], [], {}
    for name in names:
        entry = manifest["cases"][name]
        tol = dict(entry["tolerance"])
        if rtol is not None:
            tol["rtol"] = float(rtol)
        if atol is not None:
            tol["atol"] = float(atol)
        tolerances[name] = tol
        path = os.path.join(dump_dir, entry["file"])
        if not os.path.isfile(path):
            if require_all:
                results.append(TensorResult(name, "(file)", np.inf, np.inf, False, f"{path} not found", ()))
                checked.append(name)
            else:
                skipped.append(name)
            continue
        golden = fmt.load_case(golden_dir, name, manifest)
        dump = fmt.load_npz(path)
        results.extend(compare_case(name, golden, dump, tol, n_show=n_show))
        checked.append(name)
    return CheckReport(tuple(results), tuple(checked), tuple(skipped), tolerances)
