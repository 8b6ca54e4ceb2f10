r"""Lemma 1 as an optimisation problem: how much row variance does column balance cost?

Dimension letters: N tokens (rows), n experts (columns), k non-zeros per row.

On the balanced support T (``lemma1.balanced_support``) with entries s_ij >= 0 on T, rows summing to 1:

.. math:: V(S) = \sum_i \frac1k \sum_{j\in T_i} (s_{ij} - \tfrac1k)^2 = \frac1k \lVert S\rVert_F^2 - \frac{N}{k^2}

    maximise V(S)  subject to  |sum_i s_ij - N/n| <= t  for every column j.

The unconstrained maximum (t = infinity) is N (k-1)/k^2: one entry 1 per row (a supremum; the zeros leave the
support). V is convex, so its maximum over the polytope sits at a vertex: we sample vertices with
``scipy.optimize.linprog`` under random linear objectives and polish the best with SLSQP. The result is a
lower bound on the true maximum (exact when the best vertex is found); the unconstrained value is an upper bound.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linprog, minimize

from .lemma1 import balanced_support


def _polytope(N, n, k, t):
    """Variables: the N k support entries, row-major. Returns (A_eq, b_eq, A_ub, b_ub, col_of_var)."""
    support = balanced_support(N, n, k)
    cols = np.array([j for row in support for j in row])             # [N k]
    m = N * k
    A_eq = np.zeros((N, m))
    for i in range(N):
        A_eq[i, i * k:(i + 1) * k] = 1.0                              # row sums = 1
    C = np.zeros((n, m))
    C[cols, np.arange(m)] = 1.0                                       # column sums
    target = N / n
    A_ub = np.vstack([C, -C])
    b_ub = np.concatenate([np.full(n, target + t), np.full(n, t - target)])
    return A_eq, np.ones(N), A_ub, b_ub


def max_row_variance(N: int, n: int, k: int, t: float, rng, n_vertices: int = 40):
    """Best total row variance found with column sums within t of N/n; None when that is infeasible."""
    A_eq, b_eq, A_ub, b_ub = _polytope(N, n, k, t)
    m = N * k
    best, best_x = None, None
    for _ in range(n_vertices):
        res = linprog(rng.standard_normal(m), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq,
                      bounds=(0, None), method="highs")
        if res.status == 2:
            return None                                               # infeasible
        if res.status != 0:
            continue
        v = float((res.x ** 2).sum() / k - N / k ** 2)
        if best is None or v > best:
            best, best_x = v, res.x
    if best_x is None:
        return None
    cons = [{"type": "eq", "fun": lambda x: A_eq @ x - b_eq, "jac": lambda x: A_eq},
            {"type": "ineq", "fun": lambda x: b_ub - A_ub @ x, "jac": lambda x: -A_ub}]
    pol = minimize(lambda x: -(x @ x) / k, best_x, jac=lambda x: -2 * x / k, method="SLSQP",
                   bounds=[(0, None)] * m, constraints=cons)
    if pol.success and np.all(A_ub @ pol.x <= b_ub + 1e-9) and np.allclose(A_eq @ pol.x, b_eq, atol=1e-9):
        best = max(best, float(pol.x @ pol.x / k - N / k ** 2))
    return best


def unconstrained_max(N: int, k: int) -> float:
    """sup of the total row variance without the column constraint: N (k - 1) / k^2."""
    return N * (k - 1) / k ** 2


def balance_cost_survey(rng, n_instances: int = 30, n_vertices: int = 30) -> list[dict]:
    """Random (N, n, k) with k >= 2: best variance at exact balance (t = 0) vs the unconstrained maximum."""
    out = []
    while len(out) < n_instances:
        n = int(rng.integers(2, 7))
        k = int(rng.integers(2, min(n, 4) + 1))
        N = int(rng.integers(2, 11))
        v0 = max_row_variance(N, n, k, 0.0, rng, n_vertices)
        vmax = unconstrained_max(N, k)
        out.append(dict(N=N, n=n, k=k, divisible=(N % n == 0), balanced_max=v0, unconstrained_max=vmax,
                        ratio=None if v0 is None else v0 / vmax))
    return out


def tradeoff_curve(N: int, n: int, k: int, ts, rng, n_vertices: int = 40) -> list:
    """Best total row variance for each allowed column deviation t (None where infeasible)."""
    return [max_row_variance(N, n, k, float(t), rng, n_vertices) for t in ts]
