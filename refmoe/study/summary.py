r"""From per-seed results to a summary over seeds and a verdict per paper claim.

Every claim is judged on paired differences between two loss combinations trained from the same pre-trained
checkpoint on the same batches (one difference per seed). A verdict is

    supported      the difference has the claimed sign in every seed
    mixed          the mean difference has the claimed sign but at least one seed disagrees
    not supported  the mean difference has the wrong sign (or is zero)

except for "MaxVio kept", judged against the paper's own bound (RMSE between MaxVio_batch curves <= 0.03).
Numbers are mean +/- sample standard deviation over seeds (just the value for one seed).
"""
from __future__ import annotations

import math

import numpy as np

from ..objective import TERMS
from .alignment import conflict_fraction, nanmean_matrices
from .metrics import moving_average, rmse_curves

EVAL_KEYS = ("task", "maxvio_global", "rv_eq42", "rv_per_token", "overlap", "silhouette", "mi_bits", "nmi",
             "sel_cos", "all_cos", "discrim")
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

def _paired(per_seed, preset, a, b, key, domain="narrow"):
    """Per seed: metric(b) - metric(a)."""
    return [r["finetune"][preset][b]["eval"][domain][key] - r["finetune"][preset][a]["eval"][domain][key]
            for r in per_seed]


def _sign_verdict(diffs, sign: int) -> str:
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0 or np.isnan(d).any():
        return "not measured"
    if sign * d.mean() <= 0:
        return "not supported"
    return "supported" if (sign * d > 0).all() else "mixed"


def _rel(per_seed, preset, a, b, key):
    base = np.mean([r["finetune"][preset][a]["eval"]["narrow"][key] for r in per_seed])
    new = np.mean([r["finetune"][preset][b]["eval"]["narrow"][key] for r in per_seed])
    return 100.0 * (new - base) / abs(base) if base != 0 else math.nan


def claim_rows(per_seed: list, preset: str, combos) -> list:
    """One dict per claim: id, claim, comparison, numbers, verdict."""
    rows = []
    have = set(combos)

    def diff_row(cid, claim, a, b, key, sign, paper=""):
        if not {a, b} <= have:
            return
        d = _paired(per_seed, preset, a, b, key)
        ma, sa = mean_sd([r["finetune"][preset][a]["eval"]["narrow"][key] for r in per_seed])
        mb, sb = mean_sd([r["finetune"][preset][b]["eval"]["narrow"][key] for r in per_seed])
        md, sd = mean_sd(d)
        rows.append({"id": cid, "claim": claim, "comparison": f"{key}: {a} -> {b}",
                     "a": [ma, sa], "b": [mb, sb], "diff": [md, sd], "rel_pct": _rel(per_seed, preset, a, b, key),
                     "paper": paper, "verdict": _sign_verdict(d, sign), "per_seed": d})

    diff_row("C1a", "aux-only training makes expert outputs overlap more (Obs. I-III)", "none", "aux", "overlap", +1)
    diff_row("C1b", "aux-only training makes routing more uniform (Obs. I-III)", "none", "aux", "rv_per_token", -1)
    diff_row("C2", "adding L_o and L_v lowers expert overlap", "aux", "aux+ortho+var", "overlap", -1,
             "up to -45%")
    diff_row("C3", "adding L_o and L_v raises routing variance (per-token)", "aux", "aux+ortho+var",
             "rv_per_token", +1, "+150%")
    diff_row("C3'", "adding L_o and L_v raises routing variance (Eq. 42)", "aux", "aux+ortho+var", "rv_eq42", +1,
             "+150%")
    if {"aux", "aux+ortho+var"} <= have:
        ft = [s["finetune"][preset] for s in per_seed]
        r = [maxvio_rmse(f["aux"], f["aux+ortho+var"]) for f in ft]
        raw = [maxvio_rmse(f["aux"], f["aux+ortho+var"], smooth=1) for f in ft]
        m, sd = mean_sd(r)
        ref = [maxvio_rmse(f["none"], f["aux"]) for f in ft] if "none" in have else []
        rows.append({"id": "C4", "claim": "adding L_o and L_v keeps MaxVio close to aux-only",
                     "comparison": f"RMSE of MaxVio_batch curves ({SMOOTH}-step average), aux vs aux+ortho+var",
                     "diff": [m, sd], "raw": list(mean_sd(raw)), "reference": list(mean_sd(ref)),
                     "paper": f"RMSE <= {MAXVIO_RMSE_BOUND}",
                     "verdict": "supported" if m <= MAXVIO_RMSE_BOUND else "not supported", "per_seed": r})
    diff_row("C5", "dropping L_aux makes MaxVio much worse", "aux+ortho+var", "ortho+var", "maxvio_global", +1)
    if {"aux", "aux+ortho", "aux+var"} <= have:
        for cid, key, sign, text in (("C6", "overlap", -1, "L_o matters more than L_v for lowering overlap"),
                                     ("C7", "rv_per_token", +1, "L_v matters more than L_o for routing variance")):
            eff_o = np.asarray(_paired(per_seed, preset, "aux", "aux+ortho", key)) * sign
            eff_v = np.asarray(_paired(per_seed, preset, "aux", "aux+var", key)) * sign
            d = (eff_o - eff_v) if key == "overlap" else (eff_v - eff_o)
            rows.append({"id": cid, "claim": text, "comparison": f"{key}: effect of +L_o vs effect of +L_v",
                         "a": list(mean_sd(eff_o)), "b": list(mean_sd(eff_v)), "diff": list(mean_sd(d)),
                         "paper": "ablation (Table 4)", "verdict": _sign_verdict(d, +1), "per_seed": d.tolist()})
    diff_row("C8", "L_o makes p_ij = g_y . x~ more discriminative across a token's experts", "aux", "aux+ortho",
             "discrim", +1)
    return rows
