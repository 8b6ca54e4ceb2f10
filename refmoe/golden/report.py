"""The report of a golden check: one ``TensorResult`` per compared tensor, and ``CheckReport.format``, the
lines ``refmoe golden check`` prints (one per failing case by default, every tensor with ``verbose``).
"""
from __future__ import annotations

import math
from typing import NamedTuple


MISSING = "missing from the dump"
FAR_RATIO = 0.01          # a tensor's norm ratio is shown when |ratio - 1| >= this


class TensorResult(NamedTuple):
    case: str
    key: str
    max_abs: float
    max_rel: float            # max_abs / max|want| (nan when the reference is all zeros, or nothing compared)
    ok: bool
    note: str                 # "" or why it failed before comparing (missing, shape, NaN ...)
    mismatches: tuple         # up to ``n_show`` (index, got, want) of the worst entries, when failed
    used: float = float("inf")  # max_abs / (atol + rtol * max|want|): the share of the tolerance used
    ratio: float = float("nan")  # got / want for a scalar, |got| / |want| (Frobenius norms) for a tensor
    n_bad: int = 0            # entries outside the tolerance
    n_bad_padding: int = 0    # of those, entries on padding rows
    padding: tuple = ()       # parallel to ``mismatches``: the entry's token row when it is padding, else None

    @property
    def missing(self) -> bool:
        return self.note == MISSING


class CheckReport(NamedTuple):
    results: tuple            # TensorResult rows, case by case
    checked: tuple            # case names compared
    skipped: tuple            # case names not compared
    tolerances: dict          # case -> {"rtol", "atol"}
    skip_reasons: dict = {}   # case -> "no dump file" or "no aux term" ...
    notes: dict = {}          # case -> a line about the whole case (a dump of another dtype)
    hints: dict = {}          # case -> what may explain its failure (--terms, float32 round-off)
    terms: tuple | None = None  # the terms checked (None: all)

    @property
    def ok(self) -> bool:
        return bool(self.checked) and all(r.ok for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def missing(self, case: str) -> list:
        return [r.key for r in self.results if r.case == case and r.missing]

    def format(self, verbose: bool = False, n_show: int = 5) -> str:
        """Default: one line per failing case (its first failing key with the numbers), then a summary and
        the verdict. ``verbose``: the table of every tensor of every case and the worst entries of each
        failing tensor."""
        lines = []
        for case in self.checked:
            rows = [r for r in self.results if r.case == case]
            lines.extend(self._case_table(case, rows, n_show) if verbose else self._case_line(case, rows))
        lines.extend(self._summary())
        return "\n".join(lines)

    def _case_line(self, case, rows) -> list:
        bad = [r for r in rows if not r.ok]
        if not bad:
            return []
        tol = self.tolerances[case]
        mism = [r for r in bad if not r.missing]
        parts = []
        if case in self.notes:
            parts.append(self.notes[case])
            if mism:
                parts.append(f"first failing key {mism[0].key}, max rel {mism[0].max_rel:.1e}")
        elif mism:
            parts.append(describe(mism[0]) + f" (rtol {tol['rtol']:g}, atol {tol['atol']:g})")
        missing = [r.key for r in bad if r.missing]
        if missing:
            parts.append(f"missing: {_cut(missing, 4)}")
        if len(mism) > 1:
            parts.append(f"{len(mism)} of {len(rows)} tensors differ")
        if case in self.hints:
            parts.append(self.hints[case])
        return [f"case {case}: FAIL  " + "; ".join(parts)]

    def _case_table(self, case, rows, n_show) -> list:
        tol = self.tolerances[case]
        bad = [r for r in rows if not r.ok]
        status = "ok" if not bad else f"FAIL ({len(bad)} of {len(rows)} tensors)"
        lines = [f"case {case}: {status}   rtol {tol['rtol']:g}, atol {tol['atol']:g}"]
        if case in self.notes:
            lines.append(f"  {self.notes[case]}")
        width = max([len(r.key) for r in rows] + [6])
        lines.append(f"  {'tensor':<{width}}  {'max abs':>9}  {'max rel':>9}  ok")
        for r in rows:
            if r.missing:
                lines.append(f"  {r.key:<{width}}  {'-':>9}  {'-':>9}  missing")
                continue
            extra = f"  {r.note}" if r.note else ""
            if not r.ok and _show_ratio(r):
                extra += f"  ratio {_ratio(r.ratio)}"
            lines.append(f"  {r.key:<{width}}  {r.max_abs:9.2e}  {r.max_rel:9.2e}  {'ok' if r.ok else 'FAIL'}{extra}")
        for r in bad:
            for (index, got, want), row in zip(r.mismatches[:n_show], r.padding or (None,) * len(r.mismatches)):
                pad = "" if row is None else f"  (row {row} is padding)"
                lines.append(f"    {r.key}{list(index)}: got {got!r}, want {want!r}{pad}")
        missing = [r.key for r in bad if r.missing]
        if missing:
            lines.append(f"  missing: {', '.join(missing)}")
        if case in self.hints:
            lines.append(f"  {self.hints[case]}")
        return lines

    def _summary(self) -> list:
        n_bad = len({r.case for r in self.failures})
        line = (f"{len(self.checked)} case(s) checked: {len(self.checked) - n_bad} passed, {n_bad} failed, "
                f"{len(self.skipped)} skipped")
        by_reason = {}
        for case in self.skipped:
            by_reason.setdefault(self.skip_reasons.get(case, "no dump file"), []).append(case)
        if by_reason:
            line += " (" + "; ".join(f"{why}: {_cut(names, 6)}" for why, names in by_reason.items()) + ")"
        if self.terms is not None:
            line += f"; terms {', '.join(self.terms)}"
        lines = [line]
        if not self.checked and self.skipped and all(why != "no dump file" for why in by_reason):
            lines.append(f"no case was compared: no golden case has the term(s) {', '.join(self.terms)}")
        elif not self.checked:
            lines.append("no case was compared: the dump directory holds none of the golden cases"
                         + ("" if self.terms is None else " that have the chosen terms"))
        mism = [r for r in self.failures if not r.missing]
        if mism:
            lines.append(f"FAILED: first mismatch in case {mism[0].case!r}, tensor {mism[0].key}")
        elif self.failures:
            first = self.failures[0].case
            lines.append(f"FAILED: case {first!r} lacks {_cut(self.missing(first), 3)}")
        else:
            lines.append("OK" if self.checked else "FAILED")
        return lines


def _cut(names, n: int) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _ratio(r: float) -> str:
    """0.5000, 2.0000 (a forgotten factor); 1-3.1e-08 (round-off); 1.2346e+05."""
    if 0 < abs(r - 1) < 1e-4:
        return f"1{r - 1:+.1e}"
    return f"{r:.4f}" if 1e-3 <= abs(r) < 1e4 else f"{r:.4e}"


def _show_ratio(r: TensorResult) -> bool:
    scalar = not r.mismatches or not r.mismatches[0][0]
    return math.isfinite(r.ratio) and (scalar or abs(r.ratio - 1) >= FAR_RATIO)


def describe(r: TensorResult) -> str:
    """One failing tensor in a phrase: its key and the numbers that say how it fails."""
    if r.note and not r.mismatches:
        return f"{r.key}: {r.note}"
    if r.mismatches and not r.mismatches[0][0]:                  # a scalar: got, want and their ratio
        (_, got, want), = r.mismatches[:1]
        text = f"{r.key}: got {got:.10g}, want {want:.10g}"
        return text + (f", ratio {_ratio(r.ratio)}" if math.isfinite(r.ratio) else "")
    if r.mismatches and isinstance(r.mismatches[0][1], (bool, int)):   # integers and bools: exact
        index, got, want = r.mismatches[0]
        row = r.padding[0] if r.padding else None
        where = f"{list(index)}" if row is None else f"row {row} (padding) {list(index)}"
        pad = f", {r.n_bad_padding} on padding rows" if r.n_bad_padding else ""
        return f"{r.key}: {r.note}{pad}, first at {where}: got {got}, want {want}"
    text = f"{r.key}: {r.note + ', ' if r.note else ''}max abs {r.max_abs:.2e}, max rel {r.max_rel:.2e}"
    if r.mismatches:
        index, got, want = r.mismatches[0]
        row = r.padding[0] if r.padding else None
        where = f"{list(index)}" if row is None else f"row {row} (padding) {list(index)}"
        text += f", worst entry at {where}: got {got:.6g}, want {want:.6g}"
    if r.n_bad:
        text += f"; {r.n_bad} entries off" + (f", {r.n_bad_padding} on padding rows" if r.n_bad_padding else "")
    if _show_ratio(r):
        text += f"; norm ratio {_ratio(r.ratio)}"
    return text
