"""Gradient-alignment analyses on hand-made gradients with known cosines."""
import math

import numpy as np
import pytest

from refmoe.study import alignment as A

from helpers import host, on


def _grads(xp, router, experts_scale, x):
    E, D, H = 2, 2, 1
    return {"w_router": on(xp, np.asarray(router, dtype=float).reshape(E, D)),
            "w_gate": on(xp, experts_scale * np.ones((E, D, H))), "w_up": on(xp, np.zeros((E, D, H))),
            "w_down": on(xp, np.zeros((E, H, D))), "x": on(xp, np.asarray(x, dtype=float).reshape(1, 2))}


def test_cosine_matrix_and_zero_gradients(xp):
    g = {"task": _grads(xp, [1, 0, 0, 0], 1.0, [1, 0]),
         "aux": _grads(xp, [-1, 0, 0, 0], 0.0, [0, 1]),      # opposite on the router; no expert gradient
         "ortho": _grads(xp, [0, 0, 0, 0], -2.0, [1, 1]),    # no router gradient; opposite on the experts
         "var": _grads(xp, [1, 1, 0, 0], 0.0, [-1, 0])}
    r = A.cosine_matrix(g, "router")
    assert r[0, 1] == pytest.approx(-1.0) and r[0, 3] == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(r[0, 2]) and math.isnan(r[2, 2])    # L_o has exactly zero router gradient
    e = A.cosine_matrix(g, "experts")
    assert e[0, 2] == pytest.approx(-1.0) and math.isnan(e[0, 1])
    x = A.cosine_matrix(g, "input")
    assert x[0, 1] == pytest.approx(0.0) and x[0, 2] == pytest.approx(1 / math.sqrt(2)) and x[0, 3] == pytest.approx(-1)
    assert A.gradient_norms(g, "experts")["ortho"] == pytest.approx(2.0 * math.sqrt(4))


def test_conflict_fraction_and_nanmean():
    m1 = np.array([[1.0, -0.5], [-0.5, 1.0]])
    m2 = np.array([[1.0, 0.2], [0.2, 1.0]])
    m3 = np.array([[1.0, np.nan], [np.nan, 1.0]])
    cf = A.conflict_fraction([m1, m2, m3])
    assert cf[0, 1] == pytest.approx(0.5) and cf[0, 0] == 0.0           # NaN step left out: 1 of 2
    assert math.isnan(A.conflict_fraction([m3])[0, 1])
    assert A.nanmean_matrices([m1, m2, m3])[0, 1] == pytest.approx(-0.15)


def test_affinity_and_discriminativeness(xp):
    dy = on(xp, np.array([[2.0, 0.0], [0.0, 1.0]]))
    eo = on(xp, np.array([[[3.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [2.0, 2.0]]]))   # [N=2, K=2, D=2]
    assert np.allclose(host(A.affinity(dy, eo)), [[6.0, 0.0], [1.0, 2.0]])
    # token 0: cosines 1 and 0 -> spread 1; token 1: both 1/sqrt2 (parallel outputs) -> 0; mean 0.5
    assert A.routing_discriminativeness(dy, eo) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\[N, K, D\]"):
        A.affinity(dy, eo[:, :, :1])
