r"""The report folder of a study: ``results.json`` (every number), ``report.md`` (setup, verdicts, tables) and
the PNG figures of ``refmoe.study.figures``.

    write_report(run_study(StudyConfig(...)), "reproduce_report")

JSON floats are rounded to 6 significant digits; NaN is written as NaN (Python's json reads it back).
"""
from __future__ import annotations

import json
import math
import os
import platform

import numpy as np

from ..backend import device_description
from .alignment import GROUPS
from .runner import StudyResult
from .summary import EVAL_KEYS, fmt

# ----------------------------------------------------------------------------------------------
# results.json and the claims table
# ----------------------------------------------------------------------------------------------

def _rounded(o, digits: int = 6):
    """Floats rounded to ``digits`` significant digits (NaN kept), recursively through lists and dicts."""
    if isinstance(o, (float, np.floating)):
        o = float(o)
        return o if (math.isnan(o) or math.isinf(o) or o == 0.0) else float(f"{o:.{digits}g}")
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return _rounded(o.tolist(), digits)
    if isinstance(o, dict):
        return {k: _rounded(v, digits) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_rounded(v, digits) for v in o]
    return o


def write_json(path, obj):
    """One JSON file, floats to 6 significant digits, NaN written as NaN (Python's json reads it back)."""
    with open(path, "w") as fh:
        json.dump(_rounded(obj), fh, separators=(",", ":"), allow_nan=True)
        fh.write("\n")


def _row_numbers(r) -> str:
    if r["id"] == "C4":
        return (f"RMSE {fmt(*r['diff'])} (unsmoothed {fmt(*r['raw'])}); for scale, none vs aux "
                f"{fmt(*r['reference'])}")
    if r["id"] == "C6":
        return f"overlap drop from adding L_o {fmt(*r['a'])}, from adding L_v {fmt(*r['b'])}"
    if r["id"] == "C7":
        return f"variance rise from adding L_o {fmt(*r['a'])}, from adding L_v {fmt(*r['b'])}"
    rel = "" if math.isnan(r["rel_pct"]) else f" ({r['rel_pct']:+.0f}%)"
    return f"{fmt(*r['a'])} -> {fmt(*r['b'])}{rel}"


def claims_table(rows_by_preset: dict) -> str:
    lines = ["| claim | preset | numbers (mean +/- sd over seeds) | paper | verdict |", "|---|---|---|---|---|"]
    for preset, rows in rows_by_preset.items():
        for r in rows:
            lines.append(f"| {r['id']} {r['claim']} | {preset} | {_row_numbers(r)} | {r['paper']} | "
                         f"**{r['verdict']}** |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------

def _objective_lines(result: StudyResult) -> list:
    lines = []
    for p in result.study.presets:
        objs = [r["finetune"][p]["objective"] for r in result.per_seed]
        o = objs[0]
        calib = "" if o["calibrated"] is None else " (beta, gamma calibrated on the first narrow batch: " + \
            ", ".join(f"seed {s}: {ob['beta']:g}, {ob['gamma']:g}" for s, ob in zip(result.study.seeds, objs)) + ")"
        lines.append(f"  - `{p}`: alpha = {o['alpha']:g}, beta = {o['beta']:g}, gamma = {o['gamma']:g}{calib}")
    return lines


def _metrics_table(result: StudyResult, preset: str) -> str:
    keys = ("task", "maxvio_global", "overlap", "silhouette", "rv_per_token", "rv_eq42", "sel_cos", "nmi", "discrim",
            "broad_task", "broad_nmi")
    head = "| combo | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for c, e in result.summary[preset].items():
        lines.append(f"| {c} | " + " | ".join(fmt(*e[k], digits=3) for k in keys) + " |")
    return "\n".join(lines)


def _alignment_table(result: StudyResult, preset: str, combo: str = "aux+ortho+var") -> str:
    e = result.summary[preset].get(combo)
    if not e or not e["alignment"]:
        return "(no logged steps)"
    lines = ["| group | pair | mean cosine | fraction of logged steps in conflict (cos < 0) |", "|---|---|---|---|"]
    for g in GROUPS:
        al = e["alignment"][g]
        t = al["terms"]
        for a in range(len(t)):
            for b in range(a + 1, len(t)):
                m, cf = al["mean_cos"][a][b], al["conflict"][a][b]
                m_s = "undefined (a gradient is exactly zero)" if m is None else f"{m:.3f}"
                cf_s = "-" if cf is None else f"{cf:.2f}"
                lines.append(f"| {g} | {t[a]} / {t[b]} | {m_s} | {cf_s} |")
    return "\n".join(lines)


def _sweep_table(result: StudyResult, preset: str) -> str:
    sw = result.sweep.get(preset)
    if not sw:
        return "(no sweep)"
    keys = ("overlap", "rv_per_token", "maxvio_global", "maxvio_rmse_vs_aux", "task")
    lines = ["| beta, gamma | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    a = sw["aux"]
    lines.append("| aux only | " + " | ".join("-" if k == "maxvio_rmse_vs_aux" else fmt(*a[k], digits=3)
                                            for k in keys) + " |")
    for r in sw["rows"]:
        lines.append(f"| {r['beta']:.3g}, {r['gamma']:.3g} (x{r['factor']:g}) | "
                     + " | ".join(fmt(*r[k], digits=3) for k in keys) + " |")
    return "\n".join(lines)


def _in_short(result: StudyResult) -> list:
    lines = []
    for p, rows in result.claims.items():
        by = {}
        for r in rows:
            by.setdefault(r["verdict"], []).append(r["id"])
        parts = [f"{v}: {', '.join(ids)}" for v, ids in by.items()]
        line = f"- `{p}`: " + "; ".join(parts) + "."
        summ = result.summary[p]
        if "aux" in summ and "aux+ortho+var" in summ:
            a, b = summ["aux"]["task"][0], summ["aux+ortho+var"]["task"][0]
            line += (f" Price on the task: held-out L_h {a:.3g} (aux) -> {b:.3g} (aux+ortho+var), "
                     f"{100 * (b - a) / a:+.0f}%.")
        lines.append(line)
    return lines


def render_markdown(result: StudyResult, figures: list) -> str:
    s = result.study
    out = ["# refmoe reproduce: expert specialisation on synthetic clustered data", ""]
    out += [f"Run on {device_description(s.backend)} with backend `{s.backend}`, {s.dtype}, Python "
            f"{platform.python_version()}; training and evaluation took {result.seconds:.1f} s.", ""]
    out += ["## Setup", "",
            f"- Data: {s.n_clusters} latent clusters in R^{s.d_model} (centres of length 3, Gaussian noise sd "
            f"{s.noise}), each with its own teacher t = x + shared(x) + teacher_m(x); the narrow fine-tuning domain "
            f"is {s.n_narrow} of the {s.n_clusters} clusters.",
            f"- Model: one residual MoE block out = x + MoE(x), {s.n_experts} routed SwiGLU experts (H = {s.d_hidden}), "
            f"top-{s.top_k}, {s.n_shared} shared expert(s); task loss L_h = mean squared error to the teacher.",
            f"- Phase 1: {s.pretrain_steps} steps on the broad mixture with L_h + {s.pretrain_alpha:g} L_aux (switch). "
            f"Phase 2: {s.finetune_steps} steps on the narrow domain from that checkpoint, fresh Adam "
            f"(lr {s.lr:g}), batch {s.batch_size}, identical batches for every loss combination.",
            f"- Seeds: {list(s.seeds)}. Numbers are mean +/- sample sd over seeds; verdicts use the per-seed "
            "paired differences (supported = the claimed sign in every seed; mixed = right sign on average only).",
            "- Coefficients in phase 2:"] + _objective_lines(result)
    if s.alpha is not None or s.beta is not None or s.gamma is not None:
        out += [f"- Overridden from the presets: alpha={s.alpha}, beta={s.beta}, gamma={s.gamma} (None = preset)."]
    out += ["- Metrics on a held-out narrow-domain set of "
            f"{s.eval_tokens} tokens. Expert overlap (k = 10) and silhouette are computed on the unweighted outputs "
            "x~_ij of (token, selected expert) pairs of a fixed random subset of tokens, labelled by the expert j. "
            "Routing variance: `rv_per_token` = token mean of the variance across experts of the full softmax "
            "(ddof 1, the released code's log); `rv_eq42` = paper Eq. 42 on the post-top-k scores. `sel_cos` = mean "
            "|cos| between a token's selected experts' outputs; `nmi` = I(cluster; top-1 expert) / H(cluster); "
            "`discrim` = mean over tokens of max_j - min_j cos(g_y, x~_ij); `broad_task`, `broad_nmi`: the same on a "
            "held-out broad (all-cluster) set, to see what fine-tuning does to the other clusters.", ""]
    out += ["## Verdicts", "", claims_table(result.claims), "", "In short:", ""] + _in_short(result) + [""]
    out += ["Caveats: this is one residual MoE block on synthetic data, not a language model; the verdicts say "
            "whether the paper's directional claims show up here, at these sizes and coefficients, and nothing "
            "about their size elsewhere. The `paper` preset's L_o (Eq. 6) is a sum over tokens with no "
            "normalisation, so at beta = 1e-3 its weight grows with the batch size; the `authors_code` preset "
            "normalises it and calibrates beta, gamma by powers of ten. L_aux's coefficient alpha is set for this "
            "study (see Setup), because at the presets' 1e-3 it hardly balances the narrow domain here (run "
            "`refmoe reproduce --alpha 1e-3 --pretrain-alpha 1e-3` to see that regime).", ""]
    for p in s.presets:
        out += [f"## Held-out metrics, preset `{p}` (narrow domain)", "", _metrics_table(result, p), ""]
        out += [f"### Sensitivity to the L_o / L_v coefficients, preset `{p}` (aux+ortho+var, alpha fixed)", "",
                "The same fine-tuning with beta and gamma multiplied by a factor; `maxvio_rmse_vs_aux` is the "
                "C4 statistic against the aux-only run.", "", _sweep_table(result, p), ""]
        out += [f"### Gradient alignment, preset `{p}`, aux+ortho+var", "",
                "Each term's gradient alone (already multiplied by its coefficient) on the router weights, the "
                "routed experts' weights and the layer input x, at every logged step.", "",
                _alignment_table(result, p), ""]
    out += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(out)


def write_report(result: StudyResult, out_dir: str, *, figures: bool = True) -> dict:
    """Write results.json, report.md and the PNG figures into out_dir (created). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    names = []
    if figures:
        from .figures import save_all

        has_sweep = any(r["factor"] != 1.0 for sw in result.sweep.values() for r in sw["rows"])
        names = save_all(result.summary, out_dir, sweep=result.sweep if has_sweep else None)
    payload = {"config": result.study._asdict(), "seconds": result.seconds, "eval_keys": list(EVAL_KEYS),
               "summary": result.summary, "claims": result.claims, "sweep": result.sweep,
               "per_seed": result.per_seed}
    write_json(os.path.join(out_dir, "results.json"), payload)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(render_markdown(result, names))
    return {"dir": out_dir, "figures": names, "json": "results.json", "markdown": "report.md"}
