r"""Paired tests, a multiplicity correction and effect sizes for the study's verdicts.

Dimension letters: S seeds (one paired difference per seed), M rows of a report (one hypothesis per row).

Every claim of the study is read from S paired differences d_s = metric(b) - metric(a): two loss combinations
fine-tuned from the same checkpoint on the same batches of seed s. The functions here are pure and take host
sequences of floats; ``direction`` is +1 when the claim says d > 0 and -1 when it says d < 0.

    sign_test_p        exact binomial test of the signs (zeros dropped), one-sided
    t_test_p           one-sample t-test of the differences, one-sided (scipy.stats.ttest_1samp)
    wilcoxon_p         signed-rank test of the differences, one-sided (exact by enumeration for S <= 16)
    two_sided          2 min(p_greater, p_less), capped at 1: the p-value of "the effect is not zero"
    kendall_trend      Kendall's tau of a curve against time: one per-seed number for a "grows over training" claim
    holm               Holm's step-down adjustment of M p-values (family-wise error rate)
    bootstrap_ci       percentile bootstrap interval of a statistic of the differences (fixed rng seed)
    effect_size        mean difference and d_z = mean / sd, each with its bootstrap interval
    verdict            supported / contradicted / inconclusive from a Holm-adjusted p and the direction

The verdict rule (stated in every report):

    supported      Holm-adjusted two-sided Wilcoxon p < 0.05, the effect in the claimed direction
    contradicted   Holm-adjusted two-sided Wilcoxon p < 0.05, the effect in the opposite direction
    inconclusive   otherwise (including every row of a run with too few seeds to reach p < 0.05)

A two-sided p with the direction read off afterwards is the same as two one-sided tests at 0.025 each, so the
family-wise error rate of all M rows, wrong-direction errors included, stays at 0.05.
Numerics: all statistics in float64; NaN differences make a row "not measured".
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

ALPHA = 0.05               # family-wise error rate of one report
N_BOOT = 10_000            # bootstrap resamples
BOOT_SEED = 20250528       # fixed: the same differences always give the same interval
VERDICTS = ("supported", "contradicted", "inconclusive", "not measured")


def _diffs(d) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("need at least one paired difference, got none")
    return d


def _alternative(direction: int) -> str:
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r}; expected +1 (claim: d > 0) or -1 (claim: d < 0)")
    return "greater" if direction == 1 else "less"


# ----------------------------------------------------------------------------------------------
# one-sided tests of S paired differences
# ----------------------------------------------------------------------------------------------

def sign_test_p(d, direction: int = 1) -> float:
    r"""Exact one-sided sign test: P(X >= k), X ~ Binomial(n, 1/2), k = #{s: direction * d_s > 0}.

    Zeros are dropped (n counts the non-zero differences); no non-zero difference gives p = 1.
    With every one of n seeds in the claimed direction p = 2^-n (1/32 for 5 seeds, 1/4096 for 12).
    """
    _alternative(direction)
    d = _diffs(d) * direction
    nz = d[d != 0]
    if nz.size == 0:
        return 1.0
    k = int((nz > 0).sum())
    return float(sps.binomtest(k, int(nz.size), 0.5, alternative="greater").pvalue)


def t_test_p(d, direction: int = 1) -> float:
    r"""One-sided one-sample t-test of mean(d) = 0 against the claimed sign.

    .. math:: t = \bar d / (s_d / \sqrt{S}),\quad p = P(T_{S-1} \ge \mathrm{direction} \cdot t)

    Needs S >= 2 and s_d > 0; otherwise NaN (a constant difference has no t statistic).
    """
    d = _diffs(d)
    alt = _alternative(direction)
    if d.size < 2 or float(np.std(d, ddof=1)) == 0.0:
        return math.nan
    return float(sps.ttest_1samp(d, 0.0, alternative=alt).pvalue)


EXACT_MAX = 16             # signed-rank tests enumerate all 2^n sign patterns up to this many non-zero differences


def wilcoxon_p(d, direction: int = 1) -> float:
    r"""One-sided Wilcoxon signed-rank test of the differences (zeros dropped, the "wilcox" convention).

    W+ = sum of the (mid)ranks of |d_s| over the d_s > 0. For n <= EXACT_MAX non-zero differences the p-value is
    exact: the fraction of the 2^n equally likely sign patterns (the null: each difference as likely + as -)
    whose W+ is at least the observed one (at most, for direction -1), ties in |d| kept as midranks. That is
    scipy.stats.wilcoxon's exact distribution without ties, and its permutation version with them, at a
    fraction of the cost. Larger n: scipy.stats.wilcoxon's normal approximation. Every one of n differences
    in the claimed direction gives p = 2^-n, as the sign test does; unlike the sign test it weighs a seed
    against the claim by how large its difference is. No non-zero difference gives p = 1.
    """
    _alternative(direction)
    d = _diffs(d) * direction
    nz = d[d != 0]
    n = nz.size
    if n == 0:
        return 1.0
    if n > EXACT_MAX:
        return float(sps.wilcoxon(nz, alternative="greater", zero_method="wilcox", method="approx").pvalue)
    ranks = sps.rankdata(np.abs(nz))                                   # [n] midranks
    w_obs = float(ranks[nz > 0].sum())
    patterns = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1   # [2^n, n] 1 = positive
    w_all = patterns @ ranks                                           # [2^n]
    return float(np.mean(w_all >= w_obs - 1e-9 * max(1.0, w_obs)))


def two_sided(p_greater: float, p_less: float) -> float:
    """The two-sided p of a test from its two one-sided p-values: min(1, 2 min(p_greater, p_less))."""
    if math.isnan(p_greater) or math.isnan(p_less):
        return math.nan
    return min(1.0, 2.0 * min(p_greater, p_less))


def kendall_trend(y, t=None) -> float:
    r"""Kendall's tau-b between a curve y [T] and its time points t [T] (default 0..T-1), scipy.stats.kendalltau.

    +1 when y only grows, -1 when it only falls; a rank statistic, so it does not care how the curve is scaled.
    Used as one number per seed for a trend claim, whose seeds are then tested like paired differences.
    NaN for T < 2, a constant curve, or any NaN in y.
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    t = np.arange(y.size, dtype=np.float64) if t is None else np.asarray(t, dtype=np.float64).reshape(-1)
    if t.shape != y.shape:
        raise ValueError(f"y {y.shape} and t {t.shape} must have the same length")
    if y.size < 2 or np.isnan(y).any() or np.all(y == y[0]):
        return math.nan
    return float(sps.kendalltau(t, y).statistic)


# ----------------------------------------------------------------------------------------------
# many rows: Holm's step-down correction
# ----------------------------------------------------------------------------------------------

def holm(pvalues) -> list:
    r"""Holm-adjusted p-values, in the order given.  pvalues [M] -> [M] (NaN entries stay NaN, not counted).

    With the m finite p-values sorted, p_(1) <= ... <= p_(m):

    .. math:: \tilde p_{(i)} = \max_{j \le i} \min\bigl(1, (m - j + 1)\, p_{(j)}\bigr)

    Rejecting every row with adjusted p < alpha keeps the family-wise error rate at alpha for any dependence
    between the rows (the rows of one report share seeds and checkpoints, so they are not independent).
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out.tolist()
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])        # (m - j + 1) p_(j), j = 1..m
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


# ----------------------------------------------------------------------------------------------
# effect sizes with a bootstrap interval
# ----------------------------------------------------------------------------------------------

def standardized_mean(d) -> float:
    """d_z = mean(d) / sd(d) (sample sd, ddof 1): the mean difference in units of its seed-to-seed spread.
    NaN for S < 2 or sd = 0."""
    d = _diffs(d)
    if d.size < 2:
        return math.nan
    sd = float(np.std(d, ddof=1))
    return float(d.mean()) / sd if sd > 0 else math.nan


def bootstrap_ci(d, statistic: str = "mean", *, n_boot: int = N_BOOT, level: float = 0.95,
                 seed: int = BOOT_SEED) -> tuple:
    r"""Percentile bootstrap interval of ``statistic`` ("mean" or "dz") over S paired differences.

    Draws n_boot resamples of the S seeds with replacement (``numpy.random.default_rng(seed)``, so the
    interval is a function of d), computes the statistic on each, and returns the (1-level)/2 and
    (1+level)/2 percentiles. Resamples where d_z is undefined (sd = 0) are left out. Returns (lo, hi);
    (NaN, NaN) for S < 2 (S < 3 for d_z). With S = 12 seeds the interval is rough: it says how stable the sign is,
    not a precise coverage.
    """
    d = _diffs(d)
    if statistic not in ("mean", "dz"):
        raise ValueError(f"statistic={statistic!r}; expected 'mean' or 'dz'")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    S = d.size
    if S < 2 or (statistic == "dz" and S < 3):      # 2 seeds: every resample with an sd has the same d_z
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    sample = d[rng.integers(0, S, size=(n_boot, S))]                   # [n_boot, S]
    mean = sample.mean(axis=1)
    if statistic == "mean":
        vals = mean
    else:
        sd = sample.std(axis=1, ddof=1)
        vals = np.divide(mean, sd, out=np.full_like(mean, np.nan), where=sd > 0)
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            return math.nan, math.nan
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    lo, hi = np.percentile(vals, q)
    return float(lo), float(hi)


def effect_size(d, **boot) -> dict:
    """{'mean': mean(d), 'mean_ci': [lo, hi], 'dz': mean/sd, 'dz_ci': [lo, hi]} (bootstrap_ci's keywords)."""
    d = _diffs(d)
    return {"mean": float(d.mean()), "mean_ci": list(bootstrap_ci(d, "mean", **boot)),
            "dz": standardized_mean(d), "dz_ci": list(bootstrap_ci(d, "dz", **boot))}


# ----------------------------------------------------------------------------------------------
# one row, then the verdict once the whole report's rows are adjusted
# ----------------------------------------------------------------------------------------------

def paired_tests(d, direction: int) -> dict:
    """Everything about one row that does not depend on the other rows.

    n, n_claimed (seeds with the claimed sign), n_zero; one-sided p in the claimed direction of the sign test,
    the t-test and the Wilcoxon test, and ``p_wilcoxon_opposite`` the other way; ``p_test``, the two-sided
    Wilcoxon p that goes into Holm's correction; and the effect sizes. NaN differences give NaN p-values
    (the row is not measured).
    """
    d = _diffs(d)
    _alternative(direction)
    base = {"n": int(d.size), "direction": int(direction)}
    if np.isnan(d).any():
        nan = math.nan
        return {**base, "n_claimed": 0, "n_zero": 0, "p_sign": nan, "p_t": nan, "p_wilcoxon": nan,
                "p_wilcoxon_opposite": nan, "p_test": nan, "mean": nan, "mean_ci": [nan, nan], "dz": nan,
                "dz_ci": [nan, nan]}
    p_w, p_opp = wilcoxon_p(d, direction), wilcoxon_p(d, -direction)
    return {**base, "n_claimed": int((direction * d > 0).sum()), "n_zero": int((d == 0).sum()),
            "p_sign": sign_test_p(d, direction), "p_t": t_test_p(d, direction), "p_wilcoxon": p_w,
            "p_wilcoxon_opposite": p_opp, "p_test": two_sided(p_w, p_opp), **effect_size(d)}


def verdict(p_adjusted: float, p_claimed: float, p_opposite: float, alpha: float = ALPHA) -> str:
    """The verdict of one row from its Holm-adjusted two-sided p and its two one-sided p-values.

    Below alpha: "supported" when the one-sided test in the claimed direction is the smaller (the effect has the
    claimed sign), "contradicted" when the opposite one is; "inconclusive" otherwise; "not measured" for NaN.
    """
    if math.isnan(p_adjusted) or math.isnan(p_claimed) or math.isnan(p_opposite):
        return "not measured"
    if p_adjusted >= alpha or p_claimed == p_opposite:
        return "inconclusive"
    return "supported" if p_claimed < p_opposite else "contradicted"
