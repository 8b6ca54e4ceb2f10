r"""Lemma 1 (paper Sec. 3.2, proof in App. C.3): the constructive witness, where it fails, and the cycle space.

Dimension letters: N tokens (rows), n experts (columns; E elsewhere in refmoe), k non-zeros per row (K).

Statement: S in R^{N x n}, rows sum to 1 with k non-zero entries each. Then there is a state in which every
column sum tends to N/n and the variance of the non-zero entries of each row increases.

Proof in the paper: a 0/1 support with column degrees floor/ceil(Nk/n); s = 1/k on it; then +delta/-delta
alternately around a cycle of the bipartite row/column support graph. Row and column sums stay, and each row
on the cycle gains variance 2 delta^2 / k (population variance over its k entries).

Everything here is exact: entries are ``fractions.Fraction`` and the checks compare rationals.

The space of perturbations that keep every row sum, every column sum and the support is the cycle space of
the support graph, of dimension  Nk - (N + n) + c  (edges - vertices + components). It is zero exactly when
the graph is a forest; then the state with those sums on that support is unique and no row can gain variance.
This module works on one support, the round-robin one; the lemma lets one choose the support, and
``lemma1_supports`` searches all of them (which supports have a cycle; every row gaining at exact balance).
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple


# ----------------------------------------------------------------------------------------------
# the balanced support and its bipartite graph
# ----------------------------------------------------------------------------------------------

def _check_nnk(N, n, k):
    for name, v in (("N", N), ("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if k > n:
        raise ValueError(f"k={k} exceeds n={n}: a row cannot have more non-zeros than columns")


def balanced_support(N: int, n: int, k: int) -> list[list[int]]:
    """Row i -> its k columns (i k + t) mod n, t = 0..k-1: every column degree is floor or ceil(Nk/n).

    The N k slots are dealt round-robin over the n columns, so degrees differ by at most one (a direct
    realisation of the degree sequence that Gale-Ryser guarantees); within a row the k columns are distinct.
    """
    _check_nnk(N, n, k)
    return [[(i * k + t) % n for t in range(k)] for i in range(N)]


def column_degrees(support, n: int) -> list[int]:
    deg = [0] * n
    for cols in support:
        for j in cols:
            deg[j] += 1
    return deg


def n_components(support, n: int) -> int:
    """Connected components of the bipartite graph (rows 0..N-1, columns N..N+n-1), isolated vertices included."""
    N = len(support)
    parent = list(range(N + n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, cols in enumerate(support):
        for j in cols:
            parent[find(i)] = find(N + j)
    return len({find(v) for v in range(N + n)})


def cycle_space_dim(support, n: int) -> int:
    """Edges - vertices + components: the dimension of the sum- and support-preserving perturbations."""
    N = len(support)
    edges = sum(len(c) for c in support)
    return edges - (N + n) + n_components(support, n)


def find_cycle(support, n: int):
    """A simple cycle of the support graph as a list of (row, column) edges in walking order, or None.

    Consecutive edges share a vertex, alternating row - column - row ...; the list has even length >= 4.
    Depth-first search over the bipartite graph; an edge to a visited vertex other than the parent closes a cycle.
    """
    N = len(support)
    adj = [[] for _ in range(N + n)]
    for i, cols in enumerate(support):
        for j in cols:
            adj[i].append(N + j)
            adj[N + j].append(i)
    seen, parent = [False] * (N + n), [-1] * (N + n)
    for root in range(N + n):
        if seen[root]:
            continue
        seen[root] = True
        stack = [(root, iter(adj[root]))]
        while stack:
            v, it = stack[-1]
            for w in it:
                if w == parent[v]:
                    continue
                if seen[w]:                                  # back edge v -> w closes a cycle
                    path = [v]
                    while path[-1] != w:
                        path.append(parent[path[-1]])
                    path.append(v)                           # w ... v, closed
                    return _as_edges(path, N)
                seen[w], parent[w] = True, v
                stack.append((w, iter(adj[w])))
                break
            else:
                stack.pop()
    return None


def _as_edges(vertices, N):
    edges = []
    for a, b in zip(vertices[:-1], vertices[1:]):
        row, col = (a, b - N) if a < N else (b, a - N)
        edges.append((row, col))
    return edges


# ----------------------------------------------------------------------------------------------
# the witness
# ----------------------------------------------------------------------------------------------

def row_variance(row_entries) -> Fraction:
    """Population variance (divisor k) of the k non-zero entries of a row, exact."""
    k = len(row_entries)
    m = sum(row_entries, Fraction(0)) / k
    return sum(((v - m) ** 2 for v in row_entries), Fraction(0)) / k


class Witness(NamedTuple):
    N: int
    n: int
    k: int
    delta: Fraction
    support: list            # row -> k columns
    cycle: list              # (row, column) edges, or None when the support graph is a forest
    start: list              # [N][n] Fractions, 1/k on the support
    state: list              # [N][n] Fractions after the +/- delta walk around the cycle
    row_sums_kept: bool
    col_sums_kept: bool
    support_kept: bool
    rows_on_cycle: list
    variance_gain: list      # per row, exact: 2 delta^2 / k on the cycle, 0 elsewhere
    col_deviation: Fraction  # max_j |column sum - N/n| of both start and state


def witness(N: int, n: int, k: int, delta=None) -> Witness:
    """The paper's construction, carried out exactly. delta defaults to 1/(2k) (entries stay in (0, 1))."""
    delta = Fraction(1, 2 * k) if delta is None else Fraction(delta)
    if not 0 < delta < Fraction(1, k):
        raise ValueError(f"delta={delta} must lie in (0, 1/k) so that the support is kept")
    return _construct(N, n, k, delta)


def paper_delta_endpoint(N: int, n: int, k: int) -> Witness:
    """The construction at delta = 1/k, which the paper's proof allows (0 < delta <= 1/k): the entries that
    get -delta reach 0, so the rows on the cycle keep their sums but lose a non-zero (``support_kept`` False)."""
    return _construct(N, n, k, Fraction(1, k))


def nonzero_variances(w: Witness) -> list:
    """Per row of the state, the variance of its NON-ZERO entries (the lemma's definition), exact.

    Inside (0, 1/k) this equals ``variance_gain`` (the support is kept). At the endpoint delta = 1/k a row on
    the cycle keeps k - 1 non-zeros, 2/k and (k - 2) times 1/k: variance 0 for k = 2, 1/36 for k = 3, not the
    2 delta^2 / k = 2/k^3 (2/27 at k = 3) that the k support entries, the new zero included, would give."""
    return [row_variance([v for v in row if v]) for row in w.state]


def _construct(N: int, n: int, k: int, delta: Fraction) -> Witness:
    support = balanced_support(N, n, k)
    start = [[Fraction(0)] * n for _ in range(N)]
    for i, cols in enumerate(support):
        for j in cols:
            start[i][j] = Fraction(1, k)
    state = [row[:] for row in start]
    cycle = find_cycle(support, n)
    if cycle is not None:
        for t, (i, j) in enumerate(cycle):
            state[i][j] += delta if t % 2 == 0 else -delta

    def rsum(m):
        return [sum(r, Fraction(0)) for r in m]

    def csum(m):
        return [sum((m[i][j] for i in range(N)), Fraction(0)) for j in range(n)]

    def nz(m):
        return [[j for j in range(n) if m[i][j] != 0] for i in range(N)]

    gain = [row_variance([state[i][j] for j in support[i]]) - row_variance([start[i][j] for j in support[i]])
            for i in range(N)]
    target = Fraction(N, n)
    dev = max(abs(c - target) for c in csum(start))
    return Witness(N, n, k, delta, support, cycle, start, state,
                   rsum(state) == rsum(start) and all(r == 1 for r in rsum(state)),
                   csum(state) == csum(start),
                   nz(state) == [sorted(c) for c in support],
                   sorted({i for i, _ in cycle}) if cycle else [],
                   gain, dev)


def check_witness(w: Witness) -> bool:
    """All claims of the construction hold exactly for this witness."""
    on = set(w.rows_on_cycle)
    expected = [Fraction(2) * w.delta ** 2 / w.k if i in on else Fraction(0) for i in range(w.N)]
    return (w.cycle is not None and w.row_sums_kept and w.col_sums_kept and w.support_kept
            and w.variance_gain == expected)


def gale_ryser(row_degrees, col_degrees) -> bool:
    """Gale-Ryser: a 0/1 matrix with these row and column sums exists iff the totals agree and, with the
    column degrees sorted descending, sum_{j<=t} c_j <= sum_i min(r_i, t) for every t."""
    c = sorted(col_degrees, reverse=True)
    if sum(row_degrees) != sum(c):
        return False
    return all(sum(c[:t]) <= sum(min(r, t) for r in row_degrees) for t in range(1, len(c) + 1))


# ----------------------------------------------------------------------------------------------
# where the argument does not apply
# ----------------------------------------------------------------------------------------------

def has_cycle_by_count(N: int, n: int, k: int) -> bool:
    """Edge-count criterion on the balanced support: a cycle exists iff N k > N + n - c."""
    s = balanced_support(N, n, k)
    return N * k > N + n - n_components(s, n)


def forced_state_counterexample():
    """(N, n, k) = (2, 4, 2): exact balance (every column sum N/n = 1/2) forces every entry to 1/2.

    Four columns each need a positive sum, and two rows of two non-zeros give exactly four entries: every
    column holds one entry of value 1/2, so both rows are (1/2, 1/2) and have variance 0. No state with exactly
    balanced columns has positive row variance: the lemma, read with exact balance, fails here.
    Returns (N, n, k, the unique balanced state on the balanced support, cycle-space dimension).
    """
    N, n, k = 2, 4, 2
    s = balanced_support(N, n, k)
    w = witness(N, n, k)
    return N, n, k, w.start, cycle_space_dim(s, n)


def scan(max_N: int = 8, max_n: int = 8) -> list[dict]:
    """For every (N, n, k) with k >= 1: cycle criterion, cycle-space dimension and whether the witness works."""
    rows = []
    for N in range(1, max_N + 1):
        for n in range(1, max_n + 1):
            for k in range(1, n + 1):
                s = balanced_support(N, n, k)
                dim = cycle_space_dim(s, n)
                ok = k >= 2 and dim > 0 and check_witness(witness(N, n, k))
                rows.append(dict(N=N, n=n, k=k, dim=dim, count_rule=has_cycle_by_count(N, n, k), witness=ok))
    return rows
