r"""From per-seed results to a summary over seeds and a verdict per paper claim.

Every claim is judged on S paired differences, one per seed: two loss combinations fine-tuned from the same
pre-trained checkpoint on the same batches (for "MaxVio kept", the per-seed RMSE minus the paper's bound 0.03).
``refmoe.study.stats`` tests each row (two-sided Wilcoxon signed-rank), adjusts the p-values of every row of the
report together (Holm), and gives the verdict

    supported      Holm-adjusted p < 0.05, the effect in the claimed direction
    contradicted   Holm-adjusted p < 0.05, the effect in the opposite direction
    inconclusive   otherwise

with the sign test, a t-test and the effect size with a bootstrap interval beside it. The family of the Holm
correction is every claim row of every preset in the per-seed results (the rows of one report), so a row's
verdict depends on how many rows the report has. Numbers are mean +/- sample standard deviation over seeds.
"""
from __future__ import annotations

import math

import numpy as np

from ..objective import TERMS
from . import stats as ST
from .alignment import conflict_fraction, nanmean_matrices
from .metrics import moving_average, rmse_curves

EVAL_KEYS = ("task", "maxvio_global", "rv_eq42", "rv_per_token", "overlap", "silhouette", "mi_bits", "nmi",
             "nmi_arith", "sel_cos", "all_cos", "discrim")
MAXVIO_RMSE_BOUND = 0.03          # paper: RMSE of MaxVio curves with vs without L_o, L_v stays <= 0.03
SMOOTH = 10                       # MaxVio_batch curves are compared after a 10-step moving average


def maxvio_rmse(run_a, run_b, smooth: int = SMOOTH) -> float:
    """Eq. 43 between two runs' MaxVio_batch curves, each smoothed by a ``smooth``-step moving average."""
    return rmse_curves(moving_average(run_a["maxvio"], smooth), moving_average(run_b["maxvio"], smooth))


def mean_sd(values) -> tuple:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(m, s, digits=4) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}g} +/- {s:.2g}"


# ----------------------------------------------------------------------------------------------
# summary over seeds
# ----------------------------------------------------------------------------------------------

def summarize(per_seed: list, presets, combos, domain: str = "narrow") -> dict:
    """preset -> combo -> {metric: [mean, sd], 'maxvio_curve': mean curve, 'alignment': {...}}."""
    out = {}
    for p in presets:
        out[p] = {}
        for c in combos:
            runs = [r["finetune"][p][c] for r in per_seed]
            entry = {k: list(mean_sd([run["eval"][domain][k] for run in runs])) for k in EVAL_KEYS}
            entry["broad_task"] = list(mean_sd([run["eval"]["broad"]["task"] for run in runs]))
            entry["broad_nmi"] = list(mean_sd([run["eval"]["broad"]["nmi"] for run in runs]))
            entry["maxvio_curve"] = np.mean([run["maxvio"] for run in runs], axis=0).tolist()
            entry["task_curve"] = np.mean([run["task"] for run in runs], axis=0).tolist()
            entry["alignment"] = alignment_summary(runs)
            out[p][c] = entry
    return out


def sweep_summary(per_seed: list, presets, domain: str = "narrow") -> dict:
    """preset -> list of rows, one per coefficient factor of the aux+ortho+var sweep (factor 1 = the main run)."""
    out = {}
    for p in presets:
        ft0 = per_seed[0]["finetune"][p]
        if "aux+ortho+var" not in ft0 or "aux" not in ft0:
            continue
        names = [(1.0, None)] + [(v["factor"], k) for k, v in ft0.get("sweep", {}).items()]
        rows = []
        for factor, key in sorted(names):
            runs = [s["finetune"][p]["aux+ortho+var"] if key is None else s["finetune"][p]["sweep"][key]
                    for s in per_seed]
            row = {"factor": factor, "beta": ft0["objective"]["beta"] * factor,
                   "gamma": ft0["objective"]["gamma"] * factor}
            for k in ("task", "maxvio_global", "overlap", "rv_per_token", "rv_eq42", "sel_cos"):
                row[k] = list(mean_sd([run["eval"][domain][k] for run in runs]))
            row["maxvio_rmse_vs_aux"] = list(mean_sd([maxvio_rmse(s["finetune"][p]["aux"], run)
                                                      for s, run in zip(per_seed, runs)]))
            rows.append(row)
        base = {k: list(mean_sd([s["finetune"][p]["aux"]["eval"][domain][k] for s in per_seed]))
                for k in ("task", "maxvio_global", "overlap", "rv_per_token", "rv_eq42", "sel_cos")}
        out[p] = {"aux": base, "rows": rows}
    return out


def alignment_summary(runs) -> dict:
    """Per group: mean cosine matrix over logged steps and seeds, fraction of steps in conflict, and the
    cosine matrices over the logged steps (mean over seeds) for the heatmaps over training."""
    res = {}
    groups = runs[0]["logs"][0]["cosines"].keys() if runs and runs[0]["logs"] else []
    for g in groups:
        mats = [np.asarray(log["cosines"][g]) for run in runs for log in run["logs"]]
        by_step = [nanmean_matrices([np.asarray(run["logs"][i]["cosines"][g]) for run in runs])
                   for i in range(len(runs[0]["logs"]))]
        res[g] = {"terms": list(TERMS), "mean_cos": _nan_to_none(nanmean_matrices(mats)),
                  "conflict": _nan_to_none(conflict_fraction(mats)),
                  "steps": [log["step"] for log in runs[0]["logs"]],
                  "cos_by_step": [_nan_to_none(m) for m in by_step]}
    res["discrim_by_step"] = np.mean([[log["discrim"] for log in run["logs"]] for run in runs], axis=0).tolist() \
        if runs and runs[0]["logs"] else []
    return res


def _nan_to_none(m):
    return [[None if math.isnan(v) else float(v) for v in row] for row in np.asarray(m)]


# ----------------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------------

# where a claim comes from; the paper column of a row holds the paper's number where it gives one
SRC_OBS = "paper: abstract and Obs. I-III, L_aux 'often leads to expert overlap and overly uniform routing'"
SRC_RESULT = "paper: a reported result (the paper column gives its number)"
SRC_CONTROL = ("refmoe's own control: L_o and L_v are not load-balancing terms, so without L_aux the load should "
               "drift (the paper always keeps L_aux)")
SRC_COMPAT = ("paper: abstract, the objectives 'are compatible with the existing auxiliary loss'; refmoe reads it "
              "on the router, the only parameters both L_aux and L_v reach")
SRC_DISCRIM = "paper: Sec. 3.3 / App. C.2, better-separated x~ make p_ij = g_y . x~_ij more discriminative"
SRC_OWN = ("refmoe's own: a reading of the roles the abstract gives the losses (L_o: 'experts process distinct "
           "types of tokens', L_v: 'more discriminative routing decisions'); the paper reports no such comparison")
SRC_OBS2 = ("paper: Obs. II (Eqs. 4/23, 24): once experts are alike, the router's gradient is close to alpha "
            "dL_aux/dtheta_R alone, and routing grows uniform; refmoe reads it as a trend over aux-only fine-tuning")
SRC_NMI = ("refmoe's own measure of the same claim: overlap is computed on the outputs L_o pushes apart; "
           "NMI(cluster; top-1 expert) is not optimised by any term")


SRC_OBS5 = ("paper: Obs. 5, 'our method with both Lo and Lv achieves state-of-the-art (SOTA) results across three "
            "models' on the silhouette and expert-overlap panels of Fig. 3")
SRC_OBS7 = ("paper: Obs. 7, 'Laux leads to higher expert overlap and more homogeneous routing outputs'; its own number "
            "(silhouette 'over 0.05 higher' for aux only) has the other sign (refmoe lemmas F3.obs7)")
SRC_OBS9 = ("paper: Obs. 9, 'Laux impacts model performance on downstream tasks': 'the w/o all method (with no "
            "losses) achieves performance improvements ... than the only aux method'; here on the held-out L_h")
SRC_OBS8 = ("paper: Obs. 8, 'The combination of Lo and Lv significantly enhances model performance in downstream "
            "tasks'; here on the held-out L_h, i.e. what L_o + L_v cost or gain on the task")
SRC_LOWEST = ("paper: App. I.1, 'maintaining the lowest MaxVioGlobal' (Table 7, against ERNIE 4.5 LBL and SIMBAL); "
              "refmoe reads 'lowest' against every other combination it trains (it trains neither baseline; the "
              "paper's own Tables 6 and 8 put AuxOnly below Ours: 7.07 < 7.11, 3.25 < 3.54, 5.21 < 5.32)")
SRC_SWEEP = ("paper: App. H.1, 'our method demonstrates strong robustness across different hyperparameter "
             "magnitudes'; refmoe's own reading: the overlap effect of L_o + L_v keeps its sign at every factor "
             "of the beta, gamma sweep (alpha fixed, beta and gamma scaled together; the paper's Table 3 varies "
             "each of alpha, beta, gamma alone, which this sweep cannot)")


TIE_RTOL = 1e-12                  # |metric(b) - metric(a)| below this times their size is round-off: a tie


NO_REL = {"silhouette"}            # a signed score in [-1, 1] near 0: a relative change says nothing


def _tie(va: float, vb: float) -> float:
    """vb - va, with a difference at round-off level (e.g. NMI 1.0 from two different tables) set to 0.0."""
    d = vb - va
    return 0.0 if abs(d) <= TIE_RTOL * max(abs(va), abs(vb)) else d


def _paired(per_seed, preset, a, b, key, domain="narrow"):
    """Per seed: metric(b) - metric(a) (round-off differences as exact ties, which the tests drop)."""
    return [_tie(r["finetune"][preset][a]["eval"][domain][key], r["finetune"][preset][b]["eval"][domain][key])
            for r in per_seed]


def _rel(per_seed, preset, a, b, key):
    base = np.mean([r["finetune"][preset][a]["eval"]["narrow"][key] for r in per_seed])
    new = np.mean([r["finetune"][preset][b]["eval"]["narrow"][key] for r in per_seed])
    return 100.0 * (new - base) / abs(base) if base != 0 else math.nan


def _router_cos(run, t1: str, t2: str) -> list:
    """Router cosine between two terms' gradients at every logged step of one run (NaN where undefined)."""
    i, j = TERMS.index(t1), TERMS.index(t2)
    return [np.nan if (c := log["cosines"]["router"][i][j]) is None else float(c) for log in run["logs"]]


def _raw_rows(per_seed: list, preset: str, combos) -> list:
    """One dict per claim of one preset, before the report-wide correction: id, claim, source, comparison,
    paper, the numbers to show, ``per_seed`` (the paired differences) and ``direction`` (the claimed sign)."""
    rows = []
    have = set(combos)

    def add(cid, claim, source, comparison, d, direction, paper="", **numbers):
        d = [float(v) for v in d]
        rows.append({"id": cid, "claim": claim, "source": source, "comparison": comparison, "paper": paper,
                     "per_seed": d, **numbers, **ST.paired_tests(d, direction)})

    def diff_row(cid, claim, a, b, key, direction, paper="", source=SRC_OBS):
        if not {a, b} <= have:
            return
        d = _paired(per_seed, preset, a, b, key)
        add(cid, claim, source, f"{key}: {a} -> {b}", d, direction, paper,
            a=list(mean_sd([r["finetune"][preset][a]["eval"]["narrow"][key] for r in per_seed])),
            b=list(mean_sd([r["finetune"][preset][b]["eval"]["narrow"][key] for r in per_seed])),
            diff=list(mean_sd(d)), rel_pct=math.nan if key in NO_REL else _rel(per_seed, preset, a, b, key),
            key=key)

    nmi_claim = " (NMI of cluster and top-1 expert)"
    diff_row("C1a", "aux-only training makes expert outputs overlap more (Obs. I-III)", "none", "aux", "overlap", +1)
    diff_row("C1a.nmi", "aux-only training lowers specialisation" + nmi_claim, "none", "aux", "nmi", -1,
             source=SRC_NMI)
    diff_row("C1b", "aux-only training makes routing more uniform (Obs. I-III)", "none", "aux", "rv_per_token", -1)
    diff_row("C2", "adding L_o and L_v lowers expert overlap", "aux", "aux+ortho+var", "overlap", -1,
             "up to -45%", SRC_RESULT)
    diff_row("C2.nmi", "adding L_o and L_v raises specialisation" + nmi_claim, "aux", "aux+ortho+var", "nmi", +1,
             source=SRC_NMI)
    diff_row("C3", "adding L_o and L_v raises routing variance (per-token)", "aux", "aux+ortho+var",
             "rv_per_token", +1, "+150%", SRC_RESULT)
    diff_row("C3'", "adding L_o and L_v raises routing variance (Eq. 42)", "aux", "aux+ortho+var", "rv_eq42", +1,
             "+150%", SRC_RESULT)
    if {"aux", "aux+ortho+var"} <= have:
        ft = [s["finetune"][preset] for s in per_seed]
        r = [maxvio_rmse(f["aux"], f["aux+ortho+var"]) for f in ft]
        raw = [maxvio_rmse(f["aux"], f["aux+ortho+var"], smooth=1) for f in ft]
        ref = [maxvio_rmse(f["none"], f["aux"]) for f in ft] if "none" in have else []
        add("C4", "adding L_o and L_v keeps MaxVio close to aux-only", SRC_RESULT,
            f"RMSE of MaxVio_batch curves ({SMOOTH}-step average), aux vs aux+ortho+var, minus {MAXVIO_RMSE_BOUND}",
            [v - MAXVIO_RMSE_BOUND for v in r], -1, f"RMSE <= {MAXVIO_RMSE_BOUND}",
            rmse=list(mean_sd(r)), diff=list(mean_sd(r)), raw=list(mean_sd(raw)), reference=list(mean_sd(ref)))
    diff_row("C5", "dropping L_aux makes MaxVio much worse", "aux+ortho+var", "ortho+var", "maxvio_global", +1,
             source=SRC_CONTROL)
    if {"aux", "aux+ortho", "aux+var"} <= have:
        for cid, key, direction, text in (
                ("C6", "overlap", -1, "L_o matters more than L_v for lowering overlap"),
                ("C6.nmi", "nmi", +1, "L_o matters more than L_v for specialisation" + nmi_claim),
                ("C7", "rv_per_token", +1, "L_v matters more than L_o for routing variance")):
            eff_o = np.asarray(_paired(per_seed, preset, "aux", "aux+ortho", key)) * direction
            eff_v = np.asarray(_paired(per_seed, preset, "aux", "aux+var", key)) * direction
            d = (eff_o - eff_v) if cid.startswith("C6") else (eff_v - eff_o)
            add(cid, text, SRC_NMI if cid == "C6.nmi" else SRC_OWN,
                f"{key}: effect of +L_o vs effect of +L_v (each from aux)", d, +1,
                a=list(mean_sd(eff_o)), b=list(mean_sd(eff_v)), diff=list(mean_sd(d)), key=key)
    diff_row("C8", "L_o makes p_ij = g_y . x~ more discriminative across a token's experts", "aux", "aux+ortho",
             "discrim", +1, source=SRC_DISCRIM)
    diff_row("C11", "adding L_o and L_v raises the silhouette coefficient (Obs. 5)", "aux", "aux+ortho+var",
             "silhouette", +1, source=SRC_OBS5)
    diff_row("C11.aux", "aux-only training lowers the silhouette coefficient (Obs. 7)", "none", "aux", "silhouette",
             -1, "+0.05 (its own number)", SRC_OBS7)
    diff_row("C12", "L_aux costs task loss: held-out L_h higher with aux than with no loss (Obs. 9)", "none", "aux",
             "task", +1, source=SRC_OBS9)
    diff_row("C13", "adding L_o and L_v lowers the held-out task loss (Obs. 8)", "aux", "aux+ortho+var", "task", -1,
             source=SRC_OBS8)
    others = [c for c in combos if c != "aux+ortho+var"]
    if "aux+ortho+var" in have and others:
        ours = [r["finetune"][preset]["aux+ortho+var"]["eval"]["narrow"]["maxvio_global"] for r in per_seed]
        low = [min(r["finetune"][preset][c]["eval"]["narrow"]["maxvio_global"] for c in others) for r in per_seed]
        best = [min(others, key=lambda c: r["finetune"][preset][c]["eval"]["narrow"]["maxvio_global"])
                for r in per_seed]
        d = [_tie(lo, o) for lo, o in zip(low, ours)]
        add("C14", "aux+ortho+var has the lowest MaxVio of the combinations (App. I.1)", SRC_LOWEST,
            f"maxvio_global: the lowest of {', '.join(others)} -> aux+ortho+var", d, -1,
            "lowest (Table 7)", a=list(mean_sd(low)), b=list(mean_sd(ours)), diff=list(mean_sd(d)),
            lowest_other={c: best.count(c) for c in sorted(set(best))}, key="maxvio_global")
    sweeps = sorted({v["factor"] for v in per_seed[0]["finetune"][preset].get("sweep", {}).values()})
    if {"aux", "aux+ortho+var"} <= have and sweeps:
        eff = {1.0: _paired(per_seed, preset, "aux", "aux+ortho+var", "overlap")}
        for f in sweeps:
            label = next(k for k, v in per_seed[0]["finetune"][preset]["sweep"].items() if v["factor"] == f)
            eff[f] = [_tie(r["finetune"][preset]["aux"]["eval"]["narrow"]["overlap"],
                           r["finetune"][preset]["sweep"][label]["eval"]["narrow"]["overlap"]) for r in per_seed]
        worst = [max(eff[f][s] for f in eff) for s in range(len(per_seed))]
        add("C15", "the overlap drop from L_o + L_v keeps its sign at every beta, gamma factor (App. H.1)",
            SRC_SWEEP, f"overlap: aux -> aux+ortho+var with beta, gamma x {', '.join(f'{f:g}' for f in sorted(eff))}; "
            "per seed the least favourable factor", worst, -1,
            "robust (Table 3)", diff=list(mean_sd(worst)),
            by_factor={f"{f:g}": [*mean_sd(eff[f]), int(sum(v < 0 for v in eff[f]))] for f in sorted(eff)})
    if "aux+ortho+var" in have and per_seed[0]["finetune"][preset]["aux+ortho+var"]["logs"]:
        runs = [s["finetune"][preset]["aux+ortho+var"] for s in per_seed]
        cos = [_router_cos(run, "aux", "var") for run in runs]
        m = [float(np.nanmean(c)) if not np.isnan(c).all() else math.nan for c in cos]
        frac = [float(np.mean(np.asarray(c)[~np.isnan(c)] < 0)) if not np.isnan(c).all() else math.nan
                for c in cos]
        add("C9", "L_v's router gradient does not pull against L_aux's (gradient-level compatibility)", SRC_COMPAT,
            "router cosine of the L_aux and L_v gradients, mean over logged steps of aux+ortho+var", m, +1,
            diff=list(mean_sd(m)), conflict=list(mean_sd(frac)))
    if "aux" in have and per_seed[0]["finetune"][preset]["aux"]["logs"]:
        runs = [s["finetune"][preset]["aux"] for s in per_seed]
        steps = [[log["step"] for log in run["logs"]] for run in runs]
        share = [[log["norms"]["router"]["aux"] / max(log["norms"]["router"]["aux"] + log["norms"]["router"]["task"],
                                                      1e-300) for log in run["logs"]] for run in runs]
        var = [[-log["losses"]["var"] for log in run["logs"]] for run in runs]
        tau_share = [ST.kendall_trend(y, t) for y, t in zip(share, steps)]
        tau_var = [ST.kendall_trend(y, t) for y, t in zip(var, steps)]
        add("C10a", "under aux-only fine-tuning L_aux's share of the router gradient grows (Obs. II)", SRC_OBS2,
            "Kendall tau over logged steps of |alpha g_aux| / (|alpha g_aux| + |g_task|) on the router, aux",
            tau_share, +1, diff=list(mean_sd(tau_share)),
            start=list(mean_sd([y[0] for y in share])), end=list(mean_sd([y[-1] for y in share])))
        add("C10b", "under aux-only fine-tuning routing grows more uniform over training (Obs. II)", SRC_OBS2,
            "Kendall tau over logged steps of the batch routing variance -L_v (the preset's form), aux",
            tau_var, -1, diff=list(mean_sd(tau_var)),
            start=list(mean_sd([y[0] for y in var])), end=list(mean_sd([y[-1] for y in var])))
    return rows


def report_claims(per_seed: list, combos, presets=None) -> dict:
    """preset -> claim rows, with ``p_holm`` (Holm over every row of every preset) and ``verdict``.

    presets None: every preset in ``per_seed`` (the rows of one report). Each row: id, claim, source,
    comparison, paper, per_seed differences, the numbers to show, and ``refmoe.study.stats.paired_tests``.
    """
    presets = list(per_seed[0]["finetune"]) if presets is None else list(presets)
    raw = {p: _raw_rows(per_seed, p, combos) for p in presets}
    flat = [r for p in presets for r in raw[p]]
    adjusted = ST.holm([r["p_test"] for r in flat])
    out = {p: [] for p in presets}
    k = 0
    for p in presets:
        for r in raw[p]:
            pa = adjusted[k]
            k += 1
            out[p].append({**r, "p_holm": pa, "family_size": len(flat),
                           "verdict": ST.verdict(pa, r["p_wilcoxon"], r["p_wilcoxon_opposite"])})
    return out


def claim_rows(per_seed: list, preset: str, combos) -> list:
    """The claim rows of one preset, verdicts corrected over the whole report (see ``report_claims``)."""
    presets = list(per_seed[0]["finetune"])
    if preset not in presets:
        raise ValueError(f"preset={preset!r} is not in the results; they hold {presets}")
    return report_claims(per_seed, combos, presets)[preset]
