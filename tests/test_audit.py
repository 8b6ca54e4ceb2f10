"""Audit of the paper's gradient formulas (Eqs. 3/4, 8, 9/10) and of the "disjoint parameters" claim.

Each test pins one row of ``refmoe lemmas`` (see refmoe/theory/verdicts.py and theory/gradient-audit.md).
Finite differences: float64, central, h = 1e-6, top-k guarded; measured 1e-10 to 7e-9, pass mark 1e-7.
"""
import numpy as np
import pytest

from refmoe.theory import audit

FD_TOL = 1e-7


def test_eq9_ratio():
    for N, E in [(7, 5), (4, 3), (12, 6)]:
        r = audit.audit_eq9(np.random.default_rng(N), N=N, E=E)
        assert r["fd_error_exact"] < FD_TOL                        # measured ~1e-10
        assert r["ratio_min"] == pytest.approx((N - 1) / N, abs=1e-12)
        assert r["ratio_max"] == pytest.approx((N - 1) / N, abs=1e-12)
        assert r["fd_error_paper"] > 0.3 / N                        # off by the factor (N-1)/N


@pytest.mark.parametrize("K", [2, 3, 4])
def test_eq8_discrepancy(K):
    r = audit.audit_eq8(np.random.default_rng(K), N=5, K=K, D=4)
    assert r["fd_error_exact"] < FD_TOL                             # measured ~1e-10
    assert r["fd_error_paper"] > 0.3                                # measured 0.6-0.7
    assert r["cosine"] < 0.99                                       # not parallel to the true gradient (0.7-0.9)
    assert r["best_scale"] < 0.6                                    # far from 1 (and not a fixed 1/2): 0.2-0.3


def test_aux_blocks_and_fd():
    rng = np.random.default_rng(3)
    for variant in ("switch", "deepseek_batch", "paper_eq2"):
        errs = audit.fd_check_layer(rng, "aux", variant)
        assert max(errs.values()) < FD_TOL, errs                    # measured ~1e-9
    bal = audit.aux_router_gradient_at_balance(np.random.default_rng(0))
    for v in ("switch", "deepseek_batch", "paper_eq2"):
        assert bal[f"N=8:{v}"] < 1e-15                              # loads exactly balanced: f constant
        assert bal[f"N=7:{v}"] > 1e-3


def test_within_layer_zero_blocks(backend):
    rows = audit.jacobian_blocks(np.random.default_rng(3), backend=backend)
    assert len(rows) == 8
    for r in rows:
        assert r["x"] > 1e-3, r                                     # every loss reaches the layer input
        if r["loss"] == "ortho":
            assert r["router"] == 0.0 and r["experts"] > 1e-3, r
        else:
            assert r["experts"] == 0.0 and r["router"] > 1e-3, r
    for loss, variant in (("var", "code"), ("ortho", "span")):
        errs = audit.fd_check_layer(np.random.default_rng(5), loss, variant)
        assert max(errs.values()) < FD_TOL, errs


@pytest.mark.parametrize("loss,variant", [("ortho", "pairwise"), ("aux", "switch"), ("var", "row_topk")])
def test_cross_layer_leakage(loss, variant):
    r = audit.two_layer_leakage(np.random.default_rng(11), loss, variant)
    assert r["fd_error"] < FD_TOL, r                                # measured ~1e-9
    assert r["layer1_router"] > 1e-4 and r["layer1_experts"] > 1e-4, r
