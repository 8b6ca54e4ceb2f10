"""refmoe.study.stats: paired tests, Holm's correction, effect sizes and the verdict rule, against scipy and
hand-computed values."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from refmoe.study import stats as S
from refmoe.study.summary import claim_rows, mean_sd, report_claims


# ----------------------------------------------------------------------------------------------
# one-sided tests
# ----------------------------------------------------------------------------------------------

def test_sign_test_hand_computed():
    assert S.sign_test_p([1, 2, 3, 4, 5], +1) == pytest.approx(1 / 32)             # 5/5: 2^-5
    assert S.sign_test_p([-1, -2, -3, -4, -5], -1) == pytest.approx(1 / 32)
    assert S.sign_test_p([1, 2, 3, 4, 5], -1) == pytest.approx(1.0)
    d = [1.0] * 9 + [-1.0]
    assert S.sign_test_p(d, +1) == pytest.approx(11 / 1024)                        # C(10,9) + C(10,10)
    assert S.sign_test_p([0.0, 1, 2, 3], +1) == pytest.approx(1 / 8)               # zero dropped: n = 3
    assert S.sign_test_p([0.0, 0.0], +1) == 1.0
    assert S.sign_test_p([1.0] * 12, +1) == pytest.approx(2.0 ** -12)


def test_t_test_matches_the_formula():
    d = np.array([0.3, 0.1, 0.4, -0.05, 0.2, 0.25])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    assert S.t_test_p(d, +1) == pytest.approx(sps.t.sf(t, d.size - 1), rel=1e-12)
    assert S.t_test_p(d, -1) == pytest.approx(sps.t.cdf(t, d.size - 1), rel=1e-12)
    assert math.isnan(S.t_test_p([2.0, 2.0, 2.0], +1))                             # constant: no t
    assert math.isnan(S.t_test_p([2.0], +1))


def test_wilcoxon_exact_hand_computed():
    # no ties: W+ is the sum of the ranks of the positive differences; 2^5 equally likely sign patterns
    assert S.wilcoxon_p([1, 2, 3, 4, 5], +1) == pytest.approx(1 / 32)
    assert S.wilcoxon_p([-1, 2, 3, 4, 5], +1) == pytest.approx(2 / 32)             # W+ = 14: {2,3,4,5} and all
    assert S.wilcoxon_p([-5, 1, 2, 3, 4], +1) == pytest.approx(10 / 32)            # W+ = 10
    assert S.wilcoxon_p([-1, 2, 3, 4, 5], -1) == pytest.approx(31 / 32)            # P(W+ <= 14)
    assert S.wilcoxon_p([0.0, 0.0], +1) == 1.0
    # ties in |d| as midranks: d = 1, 1, 2 -> ranks 1.5, 1.5, 3; only the all-positive pattern reaches W+ = 6
    assert S.wilcoxon_p([1.0, 1.0, 2.0], +1) == pytest.approx(1 / 8)
    assert S.wilcoxon_p([-1.0, 1.0, 2.0], +1) == pytest.approx(3 / 8)            # W+ = 4.5: {1.5,3}x2, {all}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wilcoxon_matches_scipy_exact_without_ties(seed):
    d = np.random.default_rng(seed).normal(0.3, 1.0, size=11)
    for direction, alt in ((1, "greater"), (-1, "less")):
        ref = sps.wilcoxon(d, alternative=alt, method="exact").pvalue
        assert S.wilcoxon_p(d, direction) == pytest.approx(ref, rel=1e-12)
    big = np.random.default_rng(seed).normal(0.3, 1.0, size=S.EXACT_MAX + 4)        # normal approximation
    assert S.wilcoxon_p(big, 1) == pytest.approx(sps.wilcoxon(big, alternative="greater",
                                                              method="approx").pvalue)


def test_two_sided():
    assert S.two_sided(0.01, 0.995) == pytest.approx(0.02)
    assert S.two_sided(0.7, 0.4) == pytest.approx(0.8)
    assert S.two_sided(0.6, 0.6) == 1.0
    assert math.isnan(S.two_sided(math.nan, 0.5))


def test_direction_checked():
    with pytest.raises(ValueError, match="direction"):
        S.sign_test_p([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="at least one"):
        S.paired_tests([], +1)


def test_kendall_trend():
    assert S.kendall_trend([1.0, 2.0, 5.0, 9.0]) == pytest.approx(1.0)
    assert S.kendall_trend([4.0, 3.0, 2.0], t=[0, 50, 100]) == pytest.approx(-1.0)
    # 4 points, one discordant pair of 6: (5 - 1) / 6
    assert S.kendall_trend([1.0, 3.0, 2.0, 4.0]) == pytest.approx(4 / 6)
    assert math.isnan(S.kendall_trend([2.0, 2.0, 2.0])) and math.isnan(S.kendall_trend([1.0]))
    assert math.isnan(S.kendall_trend([1.0, math.nan, 2.0]))


# ----------------------------------------------------------------------------------------------
# Holm
# ----------------------------------------------------------------------------------------------

def test_holm_hand_computed():
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adj = S.holm([0.01, math.nan, 0.02])                                          # NaN not counted: m = 2
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert S.holm([]) == []


def test_holm_never_below_raw_and_at_most_bonferroni():
    p = np.random.default_rng(0).uniform(size=20) ** 3
    adj = np.asarray(S.holm(p))
    assert (adj >= p - 1e-15).all() and (adj <= np.minimum(1.0, 20 * p) + 1e-15).all()


# ----------------------------------------------------------------------------------------------
# effect sizes
# ----------------------------------------------------------------------------------------------

def test_effect_size_and_bootstrap():
    d = np.array([0.3, 0.1, 0.4, -0.05, 0.2, 0.25, 0.15, 0.35])
    e = S.effect_size(d)
    assert e["mean"] == pytest.approx(d.mean())
    assert e["dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    lo, hi = e["mean_ci"]
    assert lo < d.mean() < hi and d.min() <= lo and hi <= d.max()
    # the percentile interval, drawn again by hand with the same generator
    rng = np.random.default_rng(S.BOOT_SEED)
    means = d[rng.integers(0, d.size, size=(S.N_BOOT, d.size))].mean(axis=1)
    assert [lo, hi] == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    assert S.effect_size(d) == e                                                   # fixed seed: reproducible
    assert e["dz_ci"][0] < e["dz"] < e["dz_ci"][1]
    assert all(math.isnan(v) for v in S.bootstrap_ci([1.0], "mean"))
    assert all(math.isnan(v) for v in S.bootstrap_ci([1.0, 2.0], "dz"))            # 2 seeds: no interval


# ----------------------------------------------------------------------------------------------
# one row and the verdict rule
# ----------------------------------------------------------------------------------------------

def test_paired_tests_row():
    d = [0.2, 0.3, 0.1, 0.25, 0.4, 0.15, 0.22, 0.31, 0.18, 0.27, 0.33, 0.12]
    r = S.paired_tests(d, +1)
    assert (r["n"], r["n_claimed"], r["n_zero"]) == (12, 12, 0)
    assert r["p_sign"] == pytest.approx(2.0 ** -12) and r["p_wilcoxon"] == pytest.approx(2.0 ** -12)
    assert r["p_test"] == pytest.approx(2.0 ** -11)
    assert math.isnan(S.paired_tests([1.0, math.nan], +1)["p_test"])            # a NaN seed: not measured


def test_verdict_rule():
    assert S.verdict(0.01, 0.001, 0.999) == "supported"
    assert S.verdict(0.01, 0.999, 0.001) == "contradicted"
    assert S.verdict(0.05, 0.001, 0.999) == "inconclusive"                         # not below alpha
    assert S.verdict(0.3, 0.01, 0.99) == "inconclusive"
    assert S.verdict(math.nan, 0.5, 0.5) == "not measured"
    # 5 seeds all in the claimed direction: 2/32 two-sided, never below 0.05: too few seeds for any verdict
    r = S.paired_tests([1, 2, 3, 4, 5], +1)
    assert S.verdict(S.holm([r["p_test"]])[0], r["p_wilcoxon"], r["p_wilcoxon_opposite"]) == "inconclusive"
    # 11 seeds (the default), 32 rows (a default report) all as strong: each survives Holm (2^-10 < 0.05 / 32)
    r = S.paired_tests(np.arange(1.0, 12.0), -1)
    adj = S.holm([r["p_test"]] * 32)
    assert S.verdict(adj[0], r["p_wilcoxon"], r["p_wilcoxon_opposite"]) == "contradicted"
    # 10 seeds cannot: 2^-9 > 0.05 / 32, so the first Holm step already fails
    r = S.paired_tests(np.arange(1.0, 11.0), +1)
    assert S.holm([r["p_test"]] * 32)[0] >= S.ALPHA


# ----------------------------------------------------------------------------------------------
# the claim rows of refmoe.study.summary on hand-made per-seed results
# ----------------------------------------------------------------------------------------------

COMBOS = ("none", "aux", "aux+ortho", "aux+var", "aux+ortho+var", "ortho+var")
KEYS = ("task", "maxvio_global", "rv_eq42", "rv_per_token", "overlap", "silhouette", "mi_bits", "nmi", "nmi_arith",
        "sel_cos", "all_cos", "discrim")


def _fake(evals_by_combo_per_seed, curves_per_seed):
    """per_seed results with given narrow-domain metrics (combo -> metric -> value) and MaxVio curves, preset
    'paper' only, no logged steps (so no gradient or trend rows)."""
    out = []
    for evals, curves in zip(evals_by_combo_per_seed, curves_per_seed):
        ft = {}
        for c, ev in evals.items():
            full = {k: 0.0 for k in KEYS}
            full.update(ev)
            ft[c] = {"eval": {"narrow": full, "broad": full}, "maxvio": curves.get(c, [0.0] * 20),
                     "task": [0.0] * 20, "logs": []}
        out.append({"finetune": {"paper": ft}})
    return out


def _hand_made(n_seeds):
    seeds, curves = [], []
    for s in range(n_seeds):
        e = 0.001 * (s + 1)                           # distinct per seed: no tied differences
        flip = 0.01 * (s + 1) * (1 if s % 2 == 0 else -1)
        seeds.append({
            "none": {"overlap": 0.2, "rv_per_token": 0.05 + e},
            "aux": {"overlap": 0.6 + e, "rv_per_token": 0.01, "discrim": 0.1},
            "aux+ortho": {"overlap": 0.3, "rv_per_token": 0.011, "discrim": 0.3 + e},
            "aux+var": {"overlap": 0.55 + 0.5 * e, "rv_per_token": 0.03 + e},
            "aux+ortho+var": {"overlap": 0.6 + e + flip, "rv_per_token": 0.005 + 0.1 * e, "maxvio_global": 0.3},
            "ortho+var": {"maxvio_global": 1.2 + e},
        })
        curves.append({"aux": [0.2] * 20, "aux+ortho+var": [0.22 + 0.5 * e] * 20, "none": [1.0] * 20})
    return _fake(seeds, curves)


def test_claim_rows_verdicts_on_hand_made_results():
    rows = {r["id"]: r for r in claim_rows(_hand_made(11), "paper", COMBOS)}
    assert {r["verdict"] for r in rows.values()} <= set(S.VERDICTS)
    assert rows["C1a"]["verdict"] == "supported"            # overlap 0.2 -> 0.6 in every seed
    assert rows["C1b"]["verdict"] == "supported"            # rv 0.05 -> 0.01
    assert rows["C2"]["verdict"] == "inconclusive"          # overlap +-0.01 (s + 1), alternating: no sign
    assert rows["C3"]["verdict"] == "contradicted"          # claim: rv up; it went down in every seed
    assert rows["C4"]["verdict"] == "supported"             # RMSE 0.02 .. 0.0255, below the bound 0.03
    assert rows["C4"]["rmse"][0] == pytest.approx(0.02 + 0.0005 * 6)
    assert rows["C5"]["verdict"] == "supported"
    assert rows["C6"]["verdict"] == "supported"             # +L_o lowers overlap by ~0.3, +L_v by ~0.05
    assert rows["C7"]["verdict"] == "supported"             # +L_v raises rv by ~0.02, +L_o by 0.001
    assert rows["C8"]["verdict"] == "supported"
    assert rows["C2.nmi"]["verdict"] == "inconclusive"      # NMI the same in every run: every difference a tie
    assert rows["C2.nmi"]["n_zero"] == 11 and rows["C2.nmi"]["p_test"] == 1.0
    c3 = rows["C3"]
    assert (c3["n"], c3["n_claimed"], c3["direction"]) == (11, 0, 1)
    assert c3["p_sign"] == pytest.approx(1.0) and c3["p_test"] == pytest.approx(2.0 ** -10)
    # Holm over the whole report: every row's adjusted p is at least its own and the family is every row
    assert all(r["p_holm"] >= r["p_test"] - 1e-15 for r in rows.values() if not math.isnan(r["p_test"]))
    assert {r["family_size"] for r in rows.values()} == {len(rows)}
    assert report_claims(_hand_made(11), COMBOS)["paper"] == list(rows.values())
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_too_few_seeds_are_inconclusive_whatever_the_data():
    rows = claim_rows(_hand_made(5), "paper", COMBOS)
    assert {r["verdict"] for r in rows} == {"inconclusive"}
    with pytest.raises(ValueError, match="preset"):
        claim_rows(_hand_made(5), "authors_code", COMBOS)


def test_report_environment_lines():
    from refmoe.study.report import environment, environment_lines

    e = environment()
    assert {"python", "numpy", "scipy", "blas", "blas_threads", "platform", "cpus"} <= set(e)
    assert e["blas_threads"] is None or e["blas_threads"] >= 1
    lines = environment_lines(e)
    assert lines[0].startswith(f"- Python {e['python']}, NumPy {e['numpy']}") and "BLAS" in lines[0]
    assert "unknown thread" in environment_lines({**e, "blas_threads": None, "thread_env": {}})[0]


def _with_new_metrics(n_seeds, sweep_signs=(-1, -1)):
    """_hand_made plus silhouette, task loss and MaxVio for the rows C11-C14, and two sweep runs (factors 0.1, 10)
    whose overlap change from aux has the given signs (C15)."""
    per_seed = _hand_made(n_seeds)
    for s, r in enumerate(per_seed):
        e = 0.001 * (s + 1)
        ft = r["finetune"]["paper"]
        for combo, sil, task, mv in (("none", 0.10, 0.10, 1.0), ("aux", 0.05 + e, 0.12 + e, 0.25 + e),
                                     ("aux+ortho", 0.1, 0.2, 0.4), ("aux+var", 0.1, 0.2, 0.5),
                                     ("aux+ortho+var", 0.2 + e, 0.15 + 2 * e, 0.3), ("ortho+var", 0.1, 0.2, None)):
            ev = ft[combo]["eval"]["narrow"]
            ev.update(silhouette=sil, task=task)
            if mv is not None:
                ev["maxvio_global"] = mv
        aux = ft["aux"]["eval"]["narrow"]["overlap"]
        ft["sweep"] = {f"sweep:{f:g}": {"factor": f, "eval": {"narrow": {**ft["aux"]["eval"]["narrow"],
                                                                         "overlap": aux + sign * (0.1 + e)}}}
                       for f, sign in zip((0.1, 10.0), sweep_signs)}
    return per_seed


def test_new_claim_rows_on_hand_made_results():
    rows = {r["id"]: r for r in claim_rows(_with_new_metrics(11), "paper", COMBOS)}
    assert rows["C11"]["verdict"] == "supported"            # silhouette 0.05 -> 0.2 in every seed
    assert rows["C11.aux"]["verdict"] == "supported"        # none 0.10 -> aux 0.05: lower under L_aux
    assert rows["C12"]["verdict"] == "supported"            # task loss 0.10 -> 0.12: L_aux costs task loss
    assert rows["C13"]["verdict"] == "contradicted"         # task loss 0.12 -> 0.15: L_o + L_v cost task loss
    c14 = rows["C14"]
    assert c14["verdict"] == "contradicted"                 # aux 0.25 + e is below aux+ortho+var 0.3
    assert c14["lowest_other"] == {"aux": 11} and c14["a"][0] == pytest.approx(0.256)
    c15 = rows["C15"]
    # factor 1 is C2's alternating +-0.01 (s + 1); factors 0.1 and 10 drop overlap by 0.1 + e: the worst factor
    # per seed is the main run where it rises (even seeds), else the larger of the two drops
    assert set(c15["by_factor"]) == {"0.1", "1", "10"} and c15["by_factor"]["10"][2] == 11
    assert c15["verdict"] == "inconclusive" and c15["n_claimed"] == 5
    flip = {r["id"]: r for r in claim_rows(_with_new_metrics(11, (-1, +1)), "paper", COMBOS)}["C15"]
    assert flip["verdict"] == "contradicted" and flip["by_factor"]["10"][2] == 0    # x10 raises overlap: sign lost
    assert {r["family_size"] for r in rows.values()} == {len(rows)}
    no_sweep = {r["id"] for r in claim_rows(_hand_made(11), "paper", COMBOS)}
    assert "C15" not in no_sweep and {"C11", "C11.aux", "C12", "C13", "C14"} <= no_sweep
