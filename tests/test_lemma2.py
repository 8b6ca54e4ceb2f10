"""Lemma 2: the printed statement is false; the intended claim holds by construction; its boundary.

Each test pins one row of ``refmoe lemmas`` (see refmoe/theory/verdicts.py and theory/lemma2.md).
"""
import numpy as np
import pytest

from refmoe import moe_forward, ortho_loss_forward
from refmoe.theory import lemma2


def test_printed_statement_false():
    ce = lemma2.printed_statement_counterexample()
    assert len(ce["A"]) == len(ce["B"])                            # the hypothesis holds
    assert ce["intersection"] == ce["A"] and ce["literal_false"]   # A n B = {} fails
    assert ce["union_size"] == 1 and ce["split_impossible"]       # no equal disjoint split of A u B
    rows = lemma2.printed_statement_scan(max_size=4, universe=6)   # an equal split iff |A n B| is even
    assert len(rows) == 887
    assert all(r["split"] == (r["inter"] % 2 == 0) for r in rows)
    assert all(r["union"] == 2 * r["size"] - r["inter"] for r in rows)
    assert any(not r["split"] for r in rows) and any(r["split"] and r["inter"] > 0 for r in rows)


def test_intended_claim():
    ic = lemma2.intended_claim_check(N=12, E=4, K=2)
    assert ic["loads"] == [6, 6, 6, 6]
    assert ic["ortho_pairwise"] == 0.0 and ic["ortho_span"] == 0.0                 # exact zeros
    assert ic["min_output_norm"] > 1e-3                                            # not by zero outputs
    assert ic["deepseek_batch"] == pytest.approx(ic["deepseek_batch_balanced"], abs=1e-12)


@pytest.mark.parametrize("N,D,E,K", [(8, 12, 4, 2), (12, 12, 6, 3), (5, 8, 5, 2)])
def test_intended_claim_random_data(N, D, E, K):
    r = lemma2.random_data_construction(np.random.default_rng(N), N=N, D=D, E=E, K=K)
    assert len(set(r["loads"])) == 1 and sum(r["loads"]) == N * K
    assert r["ortho_pairwise"] == 0.0 and r["min_output_norm"] > 1e-3
    assert r["deepseek_batch"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="N <= D"):
        lemma2.random_data_construction(np.random.default_rng(0), N=13, D=12, E=4, K=2)


def test_intended_claim_outputs_orthogonal_per_token():
    x, params, cfg = lemma2.orthogonal_balanced_layer(N=10, E=5, K=3)
    _, c = moe_forward(x, params, cfg)
    G = np.einsum("nkd,nld->nkl", c.expert_out, c.expert_out)
    off = G * (1 - np.eye(3))
    assert np.all(off == 0.0)
    assert np.all(np.diagonal(G, axis1=1, axis2=2) > 0)
    assert np.bincount(c.topk_idx.reshape(-1), minlength=5).tolist() == [6] * 5


def test_identical_tokens():
    it = lemma2.identical_tokens_check(N=8, E=4, K=2)
    assert sorted(it["loads"]) == [0, 0, 8, 8]
    assert it["maxvio"] == pytest.approx(it["predicted"]) and it["predicted"] == 1.0


def test_distinct_types():
    assert [lemma2.best_maxvio_with_m_types(8, 2, m) for m in (1, 2, 3, 4, 5, 8)] == pytest.approx(
        [3.0, 1.0, 1 / 3, 0.0, 0.6, 0.0])


@pytest.mark.parametrize("K,D", [(3, 2), (4, 2), (4, 3), (2, 2)])
def test_d_less_than_k(K, D):
    rng = np.random.default_rng(0)
    assert lemma2.min_pairwise_unit(K, D, rng) == pytest.approx(lemma2.frame_bound(K, D), abs=1e-6)


def test_d_less_than_k_in_ortho_loss():
    # the bound is attained by the paper's L_o: 3 unit vectors at 120 degrees in R^2 give K(K-D)/D = 1.5
    a = np.array([[np.cos(t), np.sin(t)] for t in (0, 2 * np.pi / 3, 4 * np.pi / 3)])[None]
    assert float(ortho_loss_forward(a, "pairwise", eps=0.0)[0]) == pytest.approx(1.5, abs=1e-12)


def test_odd_cycle_tradeoff():
    t = lemma2.tradeoff_odd_cycle(np.random.default_rng(0))
    assert t["balanced_maxvio"] == 0.0 and t["rerouted_maxvio"] == pytest.approx(0.5)
    assert t["balanced_min_ortho"] == pytest.approx(10 * np.sin(np.pi / 10) ** 2, abs=1e-6)
    assert t["rerouted_min_ortho"] < 1e-8
    # the bound needs token-independent directions: linear experts theta_j x_i on distinct tokens reach 0
    lin = lemma2.tradeoff_linear_experts(np.random.default_rng(0))
    assert lin["maxvio"] == 0.0
    assert lin["optimised_cos2"] < 1e-8                                    # measured 2e-14 (BFGS)
    assert lin["constructed_ortho"] < 1e-20 and lin["constructed_min_norm"] > 0.99   # exact up to rounding
