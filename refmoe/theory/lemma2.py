r"""Lemma 2 (App. C.2): the printed statement, the intended claim, and where the intended claim fails.

Dimension letters: N tokens, D model width, H expert hidden width, E experts, K top-k.

Printed: "for two sets of points A and B of equal size, it is always possible to partition A u B such that
A n B = {} and |A| = |B|". Read literally it is false: take A = B = {p}. The given sets intersect, and
A u B = {p} has one point, so it has no split into two disjoint halves of equal size either.

Intended: expert outputs can be made mutually orthogonal (L_o = 0, what L_o drives at) while the loads are
exactly equal (L_aux at its balanced value), provided the data has enough variety. ``orthogonal_balanced_layer``
builds such a state with refmoe's own layer (needs D >= E: each expert writes into its own coordinate block).
Where it fails:
  * identical tokens: every token gets the same top-k set, loads cannot be equal unless K = E;
  * fewer distinct token directions m than needed: loads can be equal only if the m top-k sets cover the
    experts evenly (m K >= E at the very least);
  * D < K: K non-zero vectors in R^D cannot be mutually orthogonal; for unit outputs the least per-token
    pairwise L_o is K (K - D) / D (frame potential bound of tight frames);
  * few directions with balanced routing: E = 5 experts with FIXED unit output directions (the same for every
    token) in D = 2, K = 2, cyclic routing (perfectly balanced) forces the odd cycle 0-1-2-3-4-0 of co-selected
    experts, so L_o >= 10 sin^2(pi/10) = 0.955 per round; rerouting one token breaks the odd cycle and gives
    L_o = 0 at MaxVio = 0.5 (``tradeoff_odd_cycle``). The bound needs token-independent directions: the
    paper's linear experts x~_ij = theta_j x_i on 5 distinct tokens in R^2, on the same balanced sets, reach
    L_o = 0 (``tradeoff_linear_experts``: theta_j maps x_j to e_1 and x_{j-1} to e_2).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from ..config import MoEConfig
from ..layer import moe_forward
from ..losses.aux import AUX_VARIANTS, aux_loss_forward
from ..losses.ortho import ortho_loss_forward


# ----------------------------------------------------------------------------------------------
# the printed statement
# ----------------------------------------------------------------------------------------------

def printed_statement_scan(max_size: int = 4, universe: int = 6) -> list[dict]:
    """Every pair of equal-size subsets A, B of {0..universe-1} up to size ``max_size``: whether A u B can be
    split into two disjoint halves of equal size (brute force over its subsets), next to |A n B|.

    |A u B| = 2|A| - |A n B|, so an equal split exists iff |A n B| is even: the statement, read as "split
    A u B into two new disjoint halves", is false exactly when |A n B| is odd."""
    from itertools import combinations

    rows = []
    for m in range(0, max_size + 1):
        subsets = [frozenset(c) for c in combinations(range(universe), m)]
        for A in subsets:
            for B in subsets:
                U = sorted(A | B)
                split = any(len(H) == len(U) - len(H)                      # H and its complement in U
                            for r in range(len(U) + 1) for H in combinations(U, r))
                rows.append(dict(size=m, inter=len(A & B), union=len(U), split=split))
    return rows


def printed_statement_counterexample():
    """A = B = {(0, 0)}: equal size, A n B != {}, and |A u B| = 1 is odd, so no equal disjoint split exists."""
    A = {(0, 0)}
    B = {(0, 0)}
    union = A | B
    return dict(A=A, B=B, intersection=A & B, union_size=len(union),
                literal_false=bool(A & B), split_impossible=len(union) % 2 == 1)


# ----------------------------------------------------------------------------------------------
# the intended claim: orthogonal outputs and exactly balanced loads, in refmoe's layer
# ----------------------------------------------------------------------------------------------

def orthogonal_balanced_layer(N: int = 12, E: int = 4, K: int = 2, H: int = 3, rng=None):
    """Params and tokens for which every token's K expert outputs are exactly orthogonal and loads are equal.

    D = E. Token i carries the indicator of its cyclic top-k set {i, ..., i+K-1} mod E plus small noise in
    those coordinates only; the router is the identity, so top-k = that set. Expert j's w_down writes only
    into coordinate j, so outputs of different experts are orthogonal whatever the token.
    Returns (x [N, D], params, cfg).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    D = E
    cfg = MoEConfig(d_model=D, d_hidden=H, n_experts=E, top_k=K)
    x = np.zeros((N, D))
    for i in range(N):
        for t in range(K):
            x[i, (i + t) % E] = 1.0 + 0.1 * rng.random()
    params = {"w_router": np.eye(E),
              "w_gate": rng.standard_normal((E, D, H)) * 0.5,
              "w_up": rng.standard_normal((E, D, H)) * 0.5,
              "w_down": np.zeros((E, H, D))}
    for j in range(E):
        params["w_down"][j, :, j] = rng.standard_normal(H) + 2.0
    return x, params, cfg


def intended_claim_check(N: int = 12, E: int = 4, K: int = 2) -> dict:
    x, params, cfg = orthogonal_balanced_layer(N, E, K)
    _, cache = moe_forward(x, params, cfg)
    loads = np.bincount(cache.topk_idx.reshape(-1), minlength=E)
    out = dict(N=N, E=E, K=K, loads=loads.tolist(),
               min_output_norm=float(np.linalg.norm(cache.expert_out, axis=-1).min()))
    out["ortho_pairwise"] = float(ortho_loss_forward(cache.expert_out, "pairwise")[0])
    out["ortho_span"] = float(ortho_loss_forward(cache.expert_out, "span")[0])
    out["deepseek_batch"] = float(aux_loss_forward(cache.scores, cache.topk_idx, "deepseek_batch")[0])
    out["deepseek_batch_balanced"] = AUX_VARIANTS["deepseek_batch"].balanced_value(N, E, K)
    return out


def random_data_construction(rng, N: int = 8, D: int = 12, E: int = 4, K: int = 2, H: int = 3):
    """Gaussian tokens (linearly independent: N <= D) and a router solved from them so that token i selects the
    cyclic set {i, ..., i+K-1} mod E (logits X W_r^T = T exactly, W_r^T = pinv(X) T); expert j writes only into
    its own block of D // E coordinates. Needs N <= D ("enough variety") and D >= E.
    Returns a dict like ``intended_claim_check``."""
    if N > D or D < E:
        raise ValueError(f"needs N <= D and D >= E, got N={N}, D={D}, E={E}")
    cfg = MoEConfig(d_model=D, d_hidden=H, n_experts=E, top_k=K)
    x = rng.standard_normal((N, D))
    T = np.zeros((N, E))
    for i in range(N):
        for t in range(K):
            T[i, (i + t) % E] = 4.0 - t * 0.5                    # distinct selected logits, no ties
    w_router = (np.linalg.pinv(x) @ T).T                         # [E, D]
    b = D // E
    w_down = np.zeros((E, H, D))
    for j in range(E):
        w_down[j, :, j * b:(j + 1) * b] = rng.standard_normal((H, b))
    params = {"w_router": w_router, "w_gate": rng.standard_normal((E, D, H)) / np.sqrt(D),
              "w_up": rng.standard_normal((E, D, H)) / np.sqrt(D), "w_down": w_down}
    _, cache = moe_forward(x, params, cfg)
    loads = np.bincount(cache.topk_idx.reshape(-1), minlength=E)
    return dict(N=N, D=D, E=E, K=K, loads=loads.tolist(),
                min_output_norm=float(np.linalg.norm(cache.expert_out, axis=-1).min()),
                ortho_pairwise=float(ortho_loss_forward(cache.expert_out, "pairwise")[0]),
                deepseek_batch=float(aux_loss_forward(cache.scores, cache.topk_idx, "deepseek_batch")[0]))


# ----------------------------------------------------------------------------------------------
# the boundary
# ----------------------------------------------------------------------------------------------

def best_maxvio_with_m_types(E: int, K: int, m: int) -> float:
    """Least MaxVio when the tokens come in m equally frequent distinct types (one top-k set per type):
    the m sets cover experts floor/ceil(m K / E) times at best; MaxVio = E ceil(mK/E) / (m K) - 1."""
    return E * -(-m * K // E) / (m * K) - 1


def min_pairwise_unit(K: int, D: int, rng, restarts: int = 5) -> float:
    """Least per-token pairwise L_o (eps = 0) for K unit vectors in R^D, by optimisation over directions."""
    def f(v):
        V = v.reshape(K, D)
        U = V / np.linalg.norm(V, axis=1, keepdims=True)
        G = U @ U.T
        return float((G ** 2).sum() - K)
    best = np.inf
    for _ in range(restarts):
        best = min(best, minimize(f, rng.standard_normal(K * D), method="BFGS").fun)
    return best


def frame_bound(K: int, D: int) -> float:
    """K (K - D) / D for K > D, else 0: least sum_{j != k} cos^2 of K unit vectors in R^D."""
    return max(0.0, K * (K - D) / D)


def _min_ortho_fixed_dirs(sets, E: int, D: int, rng, restarts: int = 8) -> float:
    """Least L_o (pairwise, eps = 0) over unit output directions u_j in R^D, one per expert, for these top-k sets."""
    pairs = [(a, b) for s in sets for a in s for b in s if a != b]

    def f(v):
        U = v.reshape(E, D)
        U = U / np.linalg.norm(U, axis=1, keepdims=True)
        return float(sum((U[a] @ U[b]) ** 2 for a, b in pairs))
    return min(minimize(f, rng.standard_normal(E * D), method="BFGS").fun for _ in range(restarts))


def tradeoff_odd_cycle(rng) -> dict:
    """E = 5, D = 2, K = 2. Balanced cyclic routing vs the same routing with one token moved off the odd cycle."""
    E, D = 5, 2
    balanced = [(i, (i + 1) % E) for i in range(E)]
    rerouted = balanced[:-1] + [(4, 1)]

    def maxvio(sets):
        loads = np.bincount(np.array(sets).reshape(-1), minlength=E)
        return float(loads.max() / loads.mean() - 1)

    return dict(balanced_maxvio=maxvio(balanced), balanced_min_ortho=_min_ortho_fixed_dirs(balanced, E, D, rng),
                rerouted_maxvio=maxvio(rerouted), rerouted_min_ortho=_min_ortho_fixed_dirs(rerouted, E, D, rng),
                bound=10 * np.sin(np.pi / 10) ** 2)


def identical_tokens_check(N: int = 8, E: int = 4, K: int = 2, rng=None) -> dict:
    """Identical tokens through a random layer: one top-k set for all, MaxVio = E/K - 1 whatever the router."""
    from ..layer import init_params

    rng = np.random.default_rng(1) if rng is None else rng
    cfg = MoEConfig(d_model=6, d_hidden=4, n_experts=E, top_k=K)
    params = init_params(cfg, rng, backend="numpy")
    x = np.repeat(rng.standard_normal((1, 6)), N, axis=0)
    _, cache = moe_forward(x, params, cfg)
    loads = np.bincount(cache.topk_idx.reshape(-1), minlength=E)
    return dict(loads=loads.tolist(), maxvio=float(loads.max() / (N * K / E) - 1), predicted=E / K - 1)


def _linear_outputs(theta, X, sets):
    """A [N, K, D]: A_ik = theta_{sets[i][k]} x_i (the paper's linear experts, token-major buffer)."""
    return np.stack([np.stack([theta[j] @ X[i] for j in s]) for i, s in enumerate(sets)])


def _cos2_overlap(A):
    """sum_i sum_{k != l} cos^2(A_ik, A_il): L_o with unit-normalised outputs (it cannot be lowered by shrinking)."""
    U = A / np.linalg.norm(A, axis=-1, keepdims=True)
    G = np.einsum("nkd,nld->nkl", U, U) ** 2
    return float(G.sum() - np.trace(G, axis1=1, axis2=2).sum())


def tradeoff_linear_experts(rng, restarts: int = 8) -> dict:
    """E = 5, D = 2, K = 2, token i on the balanced set {i, i+1} mod 5, 5 distinct unit tokens in R^2, linear
    experts theta_j [D, D]. Least normalised overlap by BFGS over theta, and an exact construction:
    theta_j [x_j, x_{j-1}] = [e_1, e_2], so token i's outputs are theta_i x_i = e_1 and theta_{i+1} x_i = e_2."""
    E, D = 5, 2
    sets = [(i, (i + 1) % E) for i in range(E)]
    ang = 2 * np.pi * np.arange(E) / E + 0.3
    X = np.stack([np.cos(ang), np.sin(ang)], axis=1)                        # [5, 2], pairwise independent

    def f(v):
        return _cos2_overlap(_linear_outputs(v.reshape(E, D, D), X, sets))

    best = min(minimize(f, rng.standard_normal(E * D * D), method="BFGS").fun for _ in range(restarts))
    theta = np.stack([np.linalg.solve(np.stack([X[j], X[(j - 1) % E]]), np.eye(D)).T for j in range(E)])
    A = _linear_outputs(theta, X, sets)
    loads = np.bincount(np.array(sets).reshape(-1), minlength=E)
    return dict(maxvio=float(loads.max() / loads.mean() - 1), optimised_cos2=best,
                constructed_ortho=float(ortho_loss_forward(A, "pairwise", eps=0.0)[0]),
                constructed_min_norm=float(np.linalg.norm(A, axis=-1).min()))
