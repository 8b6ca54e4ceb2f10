r"""The report folder of a study: ``results.json`` (every number), ``report.md`` (setup, verdicts, tables) and
the PNG figures of ``refmoe.study.figures``.

    write_report(run_study(StudyConfig(...)), "reproduce_report")

JSON floats are rounded to 6 significant digits; NaN is written as NaN (Python's json reads it back).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..backend import device_description
from . import stats as ST
from .alignment import GROUPS
from .environment import environment, environment_lines  # noqa: F401  (re-exported)
from .runner import StudyResult
from .summary import EVAL_KEYS, MAXVIO_RMSE_BOUND, fmt
from .train import uses_fast_path

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
        return (f"RMSE {fmt(*r['rmse'])} (unsmoothed {fmt(*r['raw'])}); for scale, none vs aux "
                f"{fmt(*r['reference'])}")
    if r["id"] in ("C6", "C6.nmi", "C7"):
        what = {"C6": "overlap drop", "C6.nmi": "NMI rise", "C7": "variance rise"}[r["id"]]
        return f"{what} from adding L_o {fmt(*r['a'])}, from adding L_v {fmt(*r['b'])}"
    if r["id"] == "C9":
        return f"mean cosine {fmt(*r['diff'])}; fraction of logged steps in conflict {fmt(*r['conflict'])}"
    if r["id"] in ("C10a", "C10b"):
        what = "L_aux share" if r["id"] == "C10a" else "-L_v"
        return (f"Kendall tau {fmt(*r['diff'])}; {what} at the first logged step {fmt(*r['start'])}, "
                f"at the last {fmt(*r['end'])}")
    if r["id"] == "C14":
        who = ", ".join(f"{c} {n}x" for c, n in r["lowest_other"].items())
        return f"lowest other {fmt(*r['a'])} ({who}) -> aux+ortho+var {fmt(*r['b'])}"
    if r["id"] == "C15":
        per = "; ".join(f"x{f}: {fmt(m, s_)} ({n}/{r['n']} < 0)" for f, (m, s_, n) in r["by_factor"].items())
        return f"least favourable factor per seed {fmt(*r['diff'])}; overlap change by factor: {per}"
    if "a" not in r:
        return f"{fmt(*r['diff'])}"
    rel = "" if math.isnan(r.get("rel_pct", math.nan)) else f" ({r['rel_pct']:+.0f}%)"
    return f"{fmt(*r['a'])} -> {fmt(*r['b'])}{rel}"


def _p(v) -> str:
    """A p-value for a table: 3 significant digits, NaN as n/a."""
    return "n/a" if v is None or math.isnan(v) else f"{v:.3g}"


def _ci(e, lo_hi) -> str:
    if math.isnan(e):
        return "n/a"
    lo, hi = lo_hi
    return f"{e:.3g} [{lo:.3g}, {hi:.3g}]" if not (math.isnan(lo) or math.isnan(hi)) else f"{e:.3g} [n/a]"


def claims_table(rows_by_preset: dict) -> str:
    """Claim, preset, the numbers, the paper's number, Holm-adjusted p and the verdict, one row per claim."""
    lines = ["| claim | preset | numbers (mean +/- sd over seeds) | paper | Holm p | verdict |",
             "|---|---|---|---|---|---|"]
    for preset, rows in rows_by_preset.items():
        for r in rows:
            lines.append(f"| {r['id']} {r['claim']} | {preset} | {_row_numbers(r)} | {r['paper']} | "
                         f"{_p(r['p_holm'])} | **{r['verdict']}** |")
    return "\n".join(lines)


def evidence_table(rows_by_preset: dict) -> str:
    """Per claim: the paired differences, how many seeds have the claimed sign, the three tests' one-sided p in
    the claimed direction, the two-sided p and its Holm adjustment, the effect sizes with their intervals."""
    lines = ["| claim | preset | differences per seed (claimed sign) | n | claimed sign in | p sign | p t | "
             "p Wilcoxon | p two-sided | Holm p | mean diff [95% CI] | d_z [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, rows in rows_by_preset.items():
        for r in rows:
            sign = "> 0" if r["direction"] > 0 else "< 0"
            diffs = ", ".join(f"{v:.2g}" for v in r["per_seed"])
            lines.append(f"| {r['id']} | {preset} | {diffs} ({sign}) | {r['n']} | {r['n_claimed']}/{r['n']} | "
                         f"{_p(r['p_sign'])} | {_p(r['p_t'])} | {_p(r['p_wilcoxon'])} | {_p(r['p_test'])} | "
                         f"{_p(r['p_holm'])} | {_ci(r['mean'], r['mean_ci'])} | {_ci(r['dz'], r['dz_ci'])} | "
                         f"{r['verdict']} |")
    return "\n".join(lines)


def sources_list(rows_by_preset: dict) -> list:
    """One line per claim id: what it compares and where the claim comes from."""
    seen, lines = set(), []
    for rows in rows_by_preset.values():
        for r in rows:
            if r["id"] not in seen:
                seen.add(r["id"])
                lines.append(f"- {r['id']}: {r['comparison']}. Source: {r['source']}.")
    return lines


def verdict_rule_lines(rows_by_preset: dict) -> list:
    m = next((r["family_size"] for rows in rows_by_preset.values() for r in rows), 0)
    n = next((r["n"] for rows in rows_by_preset.values() for r in rows), 0)
    return [
        "How to read a verdict. Each claim is read from one paired difference per seed (the two loss combinations "
        "are fine-tuned from the same checkpoint on the same batches; C4 uses the per-seed RMSE minus the paper's "
        f"bound {MAXVIO_RMSE_BOUND:g}). The test is the Wilcoxon signed-rank test of those differences, two-sided; "
        f"its p-values are adjusted with Holm's step-down method over all {m} rows of this report, both presets "
        "together, so that the chance of any wrong verdict in the report stays at most 0.05.",
        "",
        f"- **supported**: Holm-adjusted p < {ST.ALPHA:g} and the effect goes the way the claim says.",
        f"- **contradicted**: Holm-adjusted p < {ST.ALPHA:g} and the effect goes the other way.",
        "- **inconclusive**: neither; the seeds do not settle the sign of the effect at this level (this is not "
        "evidence of no effect). With S seeds the smallest two-sided p is 2^(1-S) (0.0625 for 5 seeds, 0.00098 for "
        f"11; here S = {n}: {2.0 ** (1 - n):.2g}), so a run with few seeds cannot reach any other verdict.",
        "- **not measured**: a difference is NaN in some seed.",
        "",
        "Beside the test: the exact sign test and the t-test (one-sided, in the claimed direction), and the effect "
        "size, the mean paired difference and d_z = mean / sd of the differences, each with a 95% percentile "
        f"bootstrap interval ({ST.N_BOOT} resamples of the seeds, fixed rng seed). The `.nmi` rows read the same "
        "claim with NMI(cluster; top-1 expert) = I / H(cluster) on the held-out set, a measure of specialisation "
        "that no term of the objective optimises; expert overlap is computed on the very outputs L_o pushes "
        "apart, so a drop in overlap under L_o is close to guaranteed.",
    ]



# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------

def _is_quick(study) -> bool:
    try:
        from ..commands.reproduce import QUICK
    except Exception:
        return False
    return all(getattr(study, k, None) == (tuple(v) if isinstance(v, (list, tuple)) else v)
               for k, v in QUICK.items() if k != "seeds")


def _banner(result: StudyResult) -> list:
    """A warning at the top of a report whose rows cannot carry evidence."""
    n = len(result.study.seeds)
    m = next((r["family_size"] for rows in result.claims.values() for r in rows), 1)
    floor = ST.holm([2.0 ** (1 - n)] * m)[0] if n >= 1 else 1.0
    if _is_quick(result.study):
        return [f"> **Smoke test, not evidence.** This is a `--quick` run (tiny sizes, {n} seed(s)): it checks that "
                "the study runs end to end. Its numbers and verdicts say nothing about the paper's claims; run "
                "`refmoe reproduce` without `--quick` for those.", ""]
    if floor >= ST.ALPHA:
        return [f"> **Too few seeds for any verdict.** With {n} seed(s) and {m} rows the smallest Holm-adjusted p "
                f"is {floor:.3g} >= {ST.ALPHA:g}: every row is inconclusive whatever the data.", ""]
    return []


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
    keys = ("task", "maxvio_global", "overlap", "nmi", "nmi_arith", "silhouette", "rv_per_token", "rv_eq42",
            "sel_cos", "discrim", "broad_task", "broad_nmi")
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
    out = ["# refmoe reproduce: expert specialisation on synthetic clustered data", ""] + _banner(result)
    path = (" (non-logging steps replayed from a CUDA graph, refmoe.fast.GraphedStep)"
            if uses_fast_path(s.backend) else "")
    out += [f"Run on {device_description(s.backend)} with backend `{s.backend}`{path}, {s.dtype}; training and "
            f"evaluation took {result.seconds:.1f} s.", ""] + environment_lines(result.environment) + [""]
    out += ["## Setup", "",
            f"- Data: {s.n_clusters} latent clusters in R^{s.d_model} (centres of length 3, Gaussian noise sd "
            f"{s.noise}), each with its own teacher t = x + shared(x) + teacher_m(x); the narrow fine-tuning domain "
            f"is {s.n_narrow} of the {s.n_clusters} clusters.",
            f"- Model: one residual MoE block out = x + MoE(x), {s.n_experts} routed SwiGLU experts (H = {s.d_hidden}), "
            f"top-{s.top_k}, {s.n_shared} shared expert(s); task loss L_h = mean squared error to the teacher.",
            f"- Phase 1: {s.pretrain_steps} steps on the broad mixture with L_h + {s.pretrain_alpha:g} L_aux (switch). "
            f"Phase 2: {s.finetune_steps} steps on the narrow domain from that checkpoint, fresh Adam "
            f"(lr {s.lr:g}), batch {s.batch_size}, identical batches for every loss combination.",
            f"- Seeds: {list(s.seeds)}. Numbers are mean +/- sample sd over seeds; verdicts test the per-seed "
            "paired differences (see Verdicts).",
            "- Coefficients in phase 2:"] + _objective_lines(result)
    if s.alpha is not None or s.beta is not None or s.gamma is not None:
        out += [f"- Overridden from the presets: alpha={s.alpha}, beta={s.beta}, gamma={s.gamma} (None = preset)."]
    out += ["- Metrics on a held-out narrow-domain set of "
            f"{s.eval_tokens} tokens. Expert overlap (k = 10) and silhouette are computed on the unweighted outputs "
            "x~_ij of (token, selected expert) pairs of a fixed random subset of tokens, labelled by the expert j. "
            "Routing variance: `rv_per_token` = token mean of the variance across experts of the full softmax "
            "(ddof 1, the released code's log); `rv_eq42` = paper Eq. 42 on the post-top-k scores. `sel_cos` = mean "
            "|cos| between a token's selected experts' outputs; `nmi` = I(cluster; top-1 expert) / H(cluster) (1: the "
            "top-1 expert determines the cluster); `nmi_arith` = I / ((H(cluster) + H(top-1 expert)) / 2), "
            "scikit-learn's default, which also falls when a cluster is spread over more experts; "
            "`discrim` = mean over tokens of max_j - min_j cos(g_y, x~_ij); `broad_task`, `broad_nmi`: the same on a "
            "held-out broad (all-cluster) set, to see what fine-tuning does to the other clusters.", ""]
    out += ["## Verdicts", ""] + verdict_rule_lines(result.claims) + ["", claims_table(result.claims), "",
                                                                       "In short:", ""] + _in_short(result) + [""]
    out += ["### Evidence per claim", "",
            "Differences are metric(second) - metric(first) per seed, in seed order; p sign, p t and p Wilcoxon "
            "are one-sided in the claimed direction; p two-sided is the Wilcoxon test that Holm's correction "
            "adjusts.", "", evidence_table(result.claims), "", "What each claim compares, and where it comes from:",
            ""] + sources_list(result.claims) + [""]
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
                "C4 statistic against the aux-only run. C15 reads it per seed: the overlap change from aux at the "
                "least favourable factor. It can show whether the sign of the effect survives these factors; it "
                "cannot separate beta from gamma (they move together), says nothing about alpha (fixed) or about "
                "factors it did not run.", "", _sweep_table(result, p), ""]
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
               "environment": result.environment, "verdict_rule": verdict_rule_lines(result.claims),
               "summary": result.summary, "claims": result.claims, "sweep": result.sweep,
               "per_seed": result.per_seed}
    write_json(os.path.join(out_dir, "results.json"), payload)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(render_markdown(result, names))
    return {"dir": out_dir, "figures": names, "json": "results.json", "markdown": "report.md"}
