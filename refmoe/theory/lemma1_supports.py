r"""Lemma 1 over every support: the lemma lets one CHOOSE the support, so its checks search supports.

Dimension letters: N tokens (rows), n experts (columns; E elsewhere in refmoe), k non-zeros per row (K).

A support is a 0/1 N x n pattern with k ones per row (row i -> its k columns). ``lemma1`` builds one of them,
the round-robin support; here we search all of them.

1. A cycle (``cyclic_support``, ``support_scan``). The proof needs a cycle in the bipartite row/column graph
   of a support whose column degrees are floor/ceil(Nk/n). The round-robin support is a forest in cases where
   another support with the same degrees has a cycle, e.g. (N, n, k) = (4, 5, 2): rows {0,1}, {0,1}, {2,3},
   {2,4}. An exhaustive search (rows in non-decreasing order, rows being interchangeable; which columns get
   the ceil degree does not matter, columns being interchangeable) finds, for every N, n <= 8,

       a cyclic balanced support exists  iff  N >= 2, k >= 2 and N k >= n + 2.

2. Every row gains variance at exact balance (``all_rows_state``). Wanted: S with rows summing to 1, k
   non-zeros per row, every column sum exactly N/n, and every row's non-zero entries not all equal. On any
   support this is: a point of the polytope {s >= eps on the support, row sums 1, column sums N/n} off the
   hyperplanes s_ia = s_ib. A mixed-integer program (``scipy.optimize.milp``, support z and one ordered pair
   (a, b) per row with s_ia - s_ib >= eps as binaries) searches every support at once; the support it returns
   is then re-solved as a plain LP (maximise t with s_ia - s_ib >= t and s >= t), which gives the witness.
   Infeasible cases have a counting proof, e.g. (5, 8, 2): 10 entries over 8 columns leave >= 6 columns with
   one entry, each = N/n = 5/8; a row can hold at most one of them (5/8 + 5/8 > 1), and 5 rows < 6.
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from .lemma1 import balanced_support, cycle_space_dim, row_variance


# ----------------------------------------------------------------------------------------------
# a balanced support with a cycle
# ----------------------------------------------------------------------------------------------

def balanced_degrees(N: int, n: int, k: int) -> list[int]:
    """Column degrees ceil(Nk/n) for the first (Nk mod n) columns, floor(Nk/n) for the rest."""
    q, r = divmod(N * k, n)
    return [q + 1] * r + [q] * (n - r)


def cyclic_support(N: int, n: int, k: int):
    """A support with column degrees ``balanced_degrees`` whose bipartite graph has a cycle, or None.

    Exhaustive depth-first search over the rows' k-subsets, in non-decreasing order (rows are
    interchangeable), pruned by the remaining column capacities; it stops at the first cyclic support.
    """
    combos = list(itertools.combinations(range(n), k))
    rem, sup = balanced_degrees(N, n, k), []

    def rec(i, first):
        if i == N:
            return all(r == 0 for r in rem) and cycle_space_dim(sup, n) > 0
        for c in range(first, len(combos)):
            cols = combos[c]
            if all(rem[j] > 0 for j in cols):
                for j in cols:
                    rem[j] -= 1
                sup.append(list(cols))
                if rec(i + 1, c):
                    return True
                sup.pop()
                for j in cols:
                    rem[j] += 1
        return False

    return [row[:] for row in sup] if rec(0, 0) else None


def cycle_rule(N: int, n: int, k: int) -> bool:
    """The condition the search finds: N >= 2, k >= 2 and N k >= n + 2."""
    return N >= 2 and k >= 2 and N * k >= n + 2


def support_scan(max_N: int = 8, max_n: int = 8) -> list[dict]:
    """Per (N, n, k), k <= n: cycle-space dimension of the round-robin support, whether a search over all
    balanced supports finds a cyclic one, and the rule ``cycle_rule``."""
    rows = []
    for N in range(1, max_N + 1):
        for n in range(1, max_n + 1):
            for k in range(1, n + 1):
                rows.append(dict(N=N, n=n, k=k, round_robin_dim=cycle_space_dim(balanced_support(N, n, k), n),
                                 searched=cyclic_support(N, n, k) is not None, rule=cycle_rule(N, n, k)))
    return rows


# ----------------------------------------------------------------------------------------------
# every row with positive variance at exact column balance, on a support of our choice
# ----------------------------------------------------------------------------------------------

def three_rows_example():
    """(N, n, k) = (3, 4, 2): rows (1/4, 3/4) on columns {0,1}, {0,2}, {0,3}, exact. Returns (S, column sums,
    row variances of the non-zeros)."""
    q = Fraction(1, 4)
    S = [[q, 1 - q, 0, 0], [q, 0, 1 - q, 0], [q, 0, 0, 1 - q]]
    cols = [sum(r[j] for r in S) for j in range(4)]
    return S, cols, [row_variance([v for v in r if v]) for r in S]


def _milp(N, n, k, eps, want_variance):
    """Feasibility MILP over supports; returns (s [N, n], z [N, n] bool, pair per row) or None."""
    ns = N * n
    pairs = [(i, a, b) for i in range(N) for a in range(n) for b in range(n) if a != b] if want_variance else []
    nv = 2 * ns + len(pairs)
    A, lo, hi = [], [], []

    def con(coefs, lower, upper):
        r = np.zeros(nv)
        for idx, c in coefs:
            r[idx] += c
        A.append(r), lo.append(lower), hi.append(upper)

    def s(i, j):
        return i * n + j

    def z(i, j):
        return ns + i * n + j

    for i in range(N):
        con([(s(i, j), 1.0) for j in range(n)], 1.0, 1.0)                      # row sums 1
        con([(z(i, j), 1.0) for j in range(n)], k, k)                          # k non-zeros
        for j in range(n):
            con([(s(i, j), 1.0), (z(i, j), -eps)], 0.0, np.inf)                # s >= eps on the support
            con([(s(i, j), 1.0), (z(i, j), -1.0)], -np.inf, 0.0)               # s = 0 off it
    for j in range(n):
        con([(s(i, j), 1.0) for i in range(N)], N / n, N / n)                  # exact balance
    for p, (i, a, b) in enumerate(pairs):                                      # w = 1: s_ia - s_ib >= eps
        w = 2 * ns + p
        con([(w, 1.0), (z(i, a), -1.0)], -np.inf, 0.0)
        con([(w, 1.0), (z(i, b), -1.0)], -np.inf, 0.0)
        con([(s(i, a), 1.0), (s(i, b), -1.0), (w, -(1.0 + eps))], -1.0, np.inf)
    for i in range(N) if want_variance else ():
        con([(2 * ns + p, 1.0) for p, (r, _, _) in enumerate(pairs) if r == i], 1.0, np.inf)
    integrality = np.r_[np.zeros(ns), np.ones(nv - ns)]
    res = milp(np.zeros(nv), constraints=LinearConstraint(np.array(A), lo, hi), integrality=integrality,
               bounds=Bounds(0.0, 1.0))
    if res.status != 0:
        return None
    x = res.x
    chosen = [next((a, b) for p, (r, a, b) in enumerate(pairs) if r == i and x[2 * ns + p] > 0.5)
              for i in range(N)] if want_variance else None
    return x[:ns].reshape(N, n), x[ns:2 * ns].reshape(N, n) > 0.5, chosen


def _polish(N, n, support, pairs):
    """On a fixed support: maximise t with s >= t on it, s_ia - s_ib >= t for each row's pair (an LP)."""
    var = [(i, j) for i in range(N) for j in support[i]]
    col = {v: c for c, v in enumerate(var)}
    m = len(var) + 1                                                           # last variable: t
    A_eq, b_eq = [], []
    for i in range(N):
        r = np.zeros(m)
        r[[col[(i, j)] for j in support[i]]] = 1.0
        A_eq.append(r), b_eq.append(1.0)
    for j in range(n):
        r = np.zeros(m)
        r[[col[v] for v in var if v[1] == j]] = 1.0
        A_eq.append(r), b_eq.append(N / n)
    A_ub, b_ub = [], []
    for c in range(len(var)):                                                  # t - s <= 0
        r = np.zeros(m)
        r[c], r[-1] = -1.0, 1.0
        A_ub.append(r), b_ub.append(0.0)
    for i, (a, b) in enumerate(pairs):                                         # t - (s_ia - s_ib) <= 0
        r = np.zeros(m)
        r[col[(i, a)]], r[col[(i, b)]], r[-1] = -1.0, 1.0, 1.0
        A_ub.append(r), b_ub.append(0.0)
    c = np.zeros(m)
    c[-1] = -1.0
    res = linprog(c, A_ub=np.array(A_ub), b_ub=b_ub, A_eq=np.array(A_eq), b_eq=b_eq,
                  bounds=[(0, None)] * (m - 1) + [(None, 1.0)], method="highs")
    S = np.zeros((N, n))
    for v, c_ in col.items():
        S[v] = res.x[c_]
    return S, float(res.x[-1])


def all_rows_state(N: int, n: int, k: int, eps: float = 1e-3) -> dict:
    """Search every support for a state with exact column balance and positive variance in every row.

    Returns feasible (bool), and when feasible: support, S [N, n] (the LP witness on that support), margin t
    (every non-zero >= t and one pair per row differs by >= t), min row variance, max column-sum deviation.
    ``balance_feasible``: whether exact balance alone (positive entries, no variance asked) is feasible.
    """
    balance = _milp(N, n, k, eps, want_variance=False) is not None
    found = _milp(N, n, k, eps, want_variance=True) if balance else None
    out = dict(N=N, n=n, k=k, feasible=found is not None, balance_feasible=balance)
    if found is None:
        return out
    _, z, pairs = found
    support = [[int(j) for j in np.flatnonzero(z[i])] for i in range(N)]
    S, t = _polish(N, n, support, pairs)
    out.update(support=support, S=S, margin=t,
               min_row_variance=float(min(np.var(S[i, support[i]]) for i in range(N))),
               col_deviation=float(np.abs(S.sum(axis=0) - N / n).max()))
    return out
