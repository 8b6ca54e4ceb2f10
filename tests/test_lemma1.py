"""Lemma 1: the exact witness, where the construction fails, the optimisation survey and the loss-level check.

Each test pins one row of ``refmoe lemmas`` (see refmoe/theory/verdicts.py and theory/lemma1.md).
Host-only (exact rationals, scipy): no backend parametrisation needed.
"""
from fractions import Fraction

import numpy as np
import pytest

from refmoe.theory import lemma1, lemma1_losses, lemma1_opt, lemma1_supports


@pytest.mark.parametrize("N,n,k", [(5, 4, 2), (7, 5, 3), (12, 8, 6), (9, 3, 2), (4, 4, 4)])
def test_witness_exact(N, n, k):
    w = lemma1.witness(N, n, k)
    deg = lemma1.column_degrees(w.support, n)
    assert set(deg) <= {N * k // n, -(-N * k // n)}                 # floor/ceil(Nk/n)
    assert all(len(set(c)) == k for c in w.support)
    assert w.cycle is not None and len(w.cycle) % 2 == 0 and len(w.cycle) >= 4
    assert w.row_sums_kept and w.col_sums_kept and w.support_kept
    for i in range(N):                                              # exact: 2 delta^2 / k on the cycle, else 0
        expected = 2 * w.delta ** 2 / k if i in w.rows_on_cycle else Fraction(0)
        assert w.variance_gain[i] == expected
    assert lemma1.check_witness(w)
    assert all(isinstance(v, Fraction) for row in w.state for v in row)


@pytest.mark.parametrize("N,n,k", [(5, 4, 2), (7, 5, 3), (12, 8, 6), (9, 3, 2), (3, 7, 3)])
def test_support_realises_gale_ryser_degrees(N, n, k):
    s = lemma1.balanced_support(N, n, k)
    deg = lemma1.column_degrees(s, n)
    assert lemma1.gale_ryser([k] * N, deg)
    assert not lemma1.gale_ryser([k] * N, [N * k] + [0] * (n - 1))   # one column cannot take every slot


def test_every_row_gains():
    """Exact balance and positive variance in every row, on a support of our choice (search + LP)."""
    S, cols, var = lemma1_supports.three_rows_example()                     # exact: the (3,4,2) example
    assert cols == [Fraction(3, 4)] * 4 and var == [Fraction(1, 16)] * 3
    assert all(sum(r) == 1 and sum(1 for v in r if v) == 2 for r in S)
    for N, n, k in [(3, 4, 2), (4, 6, 2), (5, 4, 2)]:
        r = lemma1_supports.all_rows_state(N, n, k)
        assert r["feasible"] and r["margin"] > 0.1, r                       # measured 0.17-0.33
        S = r["S"]
        assert np.allclose(S.sum(axis=1), 1.0, atol=1e-12)
        assert r["col_deviation"] < 1e-12 and r["min_row_variance"] > 1e-3
        assert [sorted(np.flatnonzero(S[i] > 1e-9).tolist()) for i in range(N)] == r["support"]
        assert all(len(c) == k for c in r["support"])
    r = lemma1_supports.all_rows_state(5, 8, 2)                            # pigeonhole: balance itself fails
    assert not r["feasible"] and not r["balance_feasible"]
    r = lemma1_supports.all_rows_state(2, 4, 2)                            # balance forces (1/2, 1/2)
    assert not r["feasible"] and r["balance_feasible"]


def test_witness_rejects_bad_delta_and_input():
    with pytest.raises(ValueError, match="delta"):
        lemma1.witness(5, 4, 2, delta=Fraction(1, 2))               # would zero an entry
    with pytest.raises(ValueError, match="k=5 exceeds n=4"):
        lemma1.balanced_support(3, 4, 5)


def test_k1_no_cycle_no_variance():
    for N, n in [(6, 4), (10, 3), (3, 7)]:
        w = lemma1.witness(N, n, 1)
        assert w.cycle is None
        assert lemma1.cycle_space_dim(w.support, n) == 0
        assert all(lemma1.row_variance([Fraction(1)]) == 0 for _ in range(N))
        assert not lemma1.check_witness(w)


def test_cycle_exists_iff():
    """Search over all supports with column degrees floor/ceil(Nk/n): a cyclic one iff N >= 2, k >= 2, Nk >= n+2."""
    rows = lemma1_supports.support_scan(8, 8)
    assert len(rows) == 288
    for r in rows:
        assert r["searched"] == r["rule"], r
    assert sum(1 for r in rows if r["k"] >= 2 and not r["searched"]) == 47
    assert [(r["N"], r["n"], r["k"]) for r in rows if r["round_robin_dim"] == 0 and r["searched"]] == [
        (4, 5, 2), (5, 7, 2), (6, 7, 2)]                                    # the round-robin support missed them
    for N, n, k in [(4, 5, 2), (5, 7, 2), (6, 7, 2)]:
        s = lemma1_supports.cyclic_support(N, n, k)
        assert lemma1.column_degrees(s, n) == lemma1_supports.balanced_degrees(N, n, k)
        assert lemma1.cycle_space_dim(s, n) > 0 and all(len(set(c)) == k for c in s)
    assert lemma1_supports.cyclic_support(2, 4, 2) is None                 # no support at all


def test_cycle_iff_edge_count():
    """On the round-robin support: a cycle iff N k > N + n - c (the cycle-space dimension)."""
    rows = lemma1.scan(8, 8)
    assert len(rows) == 288
    for r in rows:
        assert r["count_rule"] == (r["dim"] > 0), r
        assert r["witness"] == (r["k"] >= 2 and r["dim"] > 0), r
        if r["N"] == 1 and r["k"] >= 2:                             # one row: a star, never a cycle
            assert r["dim"] == 0, r
    assert sum(1 for r in rows if r["k"] >= 2 and r["dim"] == 0) == 50
    assert {(2, 4, 2), (3, 6, 2)} <= {(r["N"], r["n"], r["k"]) for r in rows if r["k"] >= 2 and r["dim"] == 0}


def test_forced_state():
    N, n, k, state, dim = lemma1.forced_state_counterexample()
    assert (N, n, k) == (2, 4, 2) and dim == 0
    half = Fraction(1, 2)
    assert [sum(state[i][j] for i in range(N)) for j in range(n)] == [half] * 4
    assert all(lemma1.row_variance([v for v in row if v]) == 0 for row in state)
    rng = np.random.default_rng(0)                                  # the optimiser agrees: max variance 0
    assert lemma1_opt.max_row_variance(2, 4, 2, 0.0, rng) == pytest.approx(0.0, abs=1e-12)


def test_optimisation_survey():
    rng = np.random.default_rng(0)
    survey = lemma1_opt.balance_cost_survey(rng, n_instances=24, n_vertices=24)
    div = [r for r in survey if r["divisible"]]
    ndiv = [r for r in survey if not r["divisible"] and r["ratio"] is not None]
    assert div and ndiv
    for r in div:                                                   # n | N: balance costs nothing (supremum)
        assert r["ratio"] == pytest.approx(1.0, abs=1e-9), r
    for r in ndiv:                                                  # n does not divide N: strictly below
        assert r["ratio"] < 1 - 1e-6, r
    for r in survey:
        assert r["unconstrained_max"] == pytest.approx(r["N"] * (r["k"] - 1) / r["k"] ** 2)


def test_tradeoff_curve_monotone():
    rng = np.random.default_rng(1)
    v = lemma1_opt.tradeoff_curve(7, 4, 2, [0.0, 0.4, 0.6, 1.0], rng)
    assert v[0] is None                                             # exact balance infeasible on this support
    assert v[1] < v[2] <= v[3] + 1e-12 and v[3] == pytest.approx(lemma1_opt.unconstrained_max(7, 2))


def test_loss_level_joint_optimum():
    for r in lemma1_losses.joint_table(N=8, E=4, K=2, tau=60.0):
        assert abs(r["balanced_confident:aux_gap"]) < 1e-9, r
        assert 0 <= r["balanced_confident:var_gap"] < 1e-9, r
        assert r["near_uniform:var_gap"] > 0.2, r                  # uniform routing: L_v far from its best
        assert r["collapsed_confident:aux_gap"] >= 1.0, r          # collapse: L_aux far from balanced


def test_paper_form_hides_balancing():
    assert lemma1_losses.paper_identity_check(np.random.default_rng(0)) < 1e-12
    tab = {(r["aux"], r["var"]): r for r in lemma1_losses.joint_table()}
    assert tab[("switch", "paper")]["collapsed_confident:var_gap"] == pytest.approx(1.5, abs=1e-9)  # N/n (1-1/n)
    assert tab[("switch", "code")]["collapsed_confident:var_gap"] < 1e-9
    assert tab[("switch", "row_topk")]["collapsed_confident:var_gap"] < 1e-9


def test_loss_level_conflict():
    c = lemma1_losses.conflict_example(N=6, E=4)
    assert c["floor"] == pytest.approx(40 / 36)
    assert c["confident_switch"] == pytest.approx(c["floor"], abs=1e-12)
    assert c["confident_var_code"] == pytest.approx(c["var_code_infimum"], abs=1e-12)
    assert c["uniform_switch"] == pytest.approx(1.0, abs=1e-6)
    assert abs(c["uniform_var_code"]) < 1e-10
    assert lemma1_losses.switch_confident_floor(8, 4) == pytest.approx(1.0)   # E | N: no conflict


def test_aux_minimum_is_not_balance():
    m = lemma1_losses.aux_minimum_not_balanced(N=8, E=4, tau=60.0)
    assert m["maxvio"] == 1.0                                       # expert 0 holds every token
    assert m["aux:switch"] == pytest.approx(4 * (9 + 9 + 4) / 64, abs=1e-9)     # 1.375 < K = 2
    assert m["aux:deepseek_batch"] == pytest.approx(1.375 / 2, abs=1e-9)        # < 1
    assert m["aux:paper_eq2"] == pytest.approx((9 + 9 + 4) / 8, abs=1e-9)       # 2.75 < N K / E = 4
    assert m["var_gap:code"] < 1e-9 and m["var_gap:row_topk"] < 1e-9
    assert m["var_gap:paper"] == pytest.approx(0.1875, abs=1e-9)   # (N/E) sum_j (sbar_j - 1/E)^2 = 2 * 3/32
    assert m["k1_uniform_maxvio"] == 3.0 and m["k1_uniform_switch"] == pytest.approx(1.0, abs=1e-12)


def test_descent_search():
    rng = np.random.default_rng(0)
    runs = [r for a in ("switch", "paper_eq2") for v in ("paper", "code")
            for r in lemma1_losses.descent_search(a, v, rng, steps=300, restarts=3)]
    assert all(r["end"] < r["start"] for r in runs)                 # descent works
    assert all(r["var_gap"] < 0.2 for r in runs)                    # L_v near its infimum: confident routing
    assert any(r["maxvio"] > 0 for r in runs)                       # yet the loads are not all balanced
    assert any(r["aux_gap"] <= 1e-3 and r["maxvio"] > 0 for r in runs)   # L_aux 'balanced' without balance
    # exploratory, and sensitive to the optimiser: balanced ends out of 8 per (lr, start scale)
    sens = lemma1_losses.descent_sensitivity(np.random.default_rng(0))
    got = {(s["lr"], s["init_scale"]): s["balanced"] for s in sens}
    assert got[(2.0, 0.1)] == 8 and got[(2.0, 3.0)] <= 1                   # small starts balance, large do not
    assert got[(0.5, 1.0)] < got[(8.0, 1.0)]                               # a larger step balances more often


@pytest.mark.parametrize("N,n,k", [(5, 4, 2), (7, 5, 3), (12, 8, 6)])
def test_delta_endpoint_loses_support(N, n, k):
    """The proof allows 0 < delta <= 1/k; at delta = 1/k the -delta entries become exactly 0."""
    w = lemma1.paper_delta_endpoint(N, n, k)
    assert w.row_sums_kept and w.col_sums_kept
    assert not w.support_kept
    assert w.rows_on_cycle and all(sum(1 for v in w.state[i] if v) == k - 1 for i in w.rows_on_cycle)
    # the lemma's variance (of the non-zero entries) is not 2 delta^2 / k there: 0 at k = 2, 1/36 at k = 3
    got = lemma1.nonzero_variances(w)[w.rows_on_cycle[0]]
    assert got == {2: Fraction(0), 3: Fraction(1, 36)}.get(k, got) and got != 2 * w.delta ** 2 / k
    with pytest.raises(ValueError, match="must lie in"):
        lemma1.witness(N, n, k, delta=Fraction(1, k))
