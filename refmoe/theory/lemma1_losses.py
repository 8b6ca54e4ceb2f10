r"""Lemma 1 at the level of the actual losses: can L_aux and L_v be at their best values in one router state?

Dimension letters: N tokens, E experts (the paper's n), K top-k. A router state is a logit matrix Z [N, E];
P = softmax(Z), top-k sets and S follow as in the layer. Evaluated with refmoe's own losses.

Canonical states (``tau`` is a confidence scale):
    balanced_confident   token i's logits: tau on expert i mod E, tau/2 on its next K-1 experts (mod E)
    collapsed_confident  every token the same as token 0 (all mass on expert 0)
    near_uniform         logits 1e-3 times the balanced pattern (almost uniform P, balanced top-k)

Infima of L_v over all states (approached as tau grows), from the definitions:
    row_topk  -(K-1)/K^2       one entry of each S row -> 1
    code      -1/E             P rows one-hot (unbiased variance of a one-hot row of length E)
    paper     -(N/E)(1-1/E)    rows one-hot AND column means all 1/E: by the identity
              sum (s_ij - sbar_j)^2 = sum s_ij^2 - N sum_j sbar_j^2, the form hides + (N/E) sum_j sbar_j^2,
              a balancing term minimised at sbar_j = 1/E.
"""
from __future__ import annotations

import numpy as np

from ..losses.aux import AUX_VARIANTS, aux_loss_forward
from ..losses.variance import var_loss_forward
from ..ops import softmax_forward, topk_indices

LOSS_AUX = ("paper_eq2", "switch", "deepseek_batch")
LOSS_VAR = ("paper", "code", "row_topk")


def balanced_logits(N: int, E: int, K: int, tau: float) -> np.ndarray:
    Z = np.zeros((N, E))
    for i in range(N):
        Z[i, i % E] = tau
        for t in range(1, K):
            Z[i, (i + t) % E] = tau / 2
    return Z


def collapsed_logits(N: int, E: int, K: int, tau: float) -> np.ndarray:
    return np.repeat(balanced_logits(1, E, K, tau), N, axis=0)


def var_infimum(variant: str, N: int, E: int, K: int) -> float:
    return {"row_topk": -(K - 1) / K ** 2, "code": -1.0 / E, "paper": -(N / E) * (1 - 1 / E)}[variant]


def evaluate(Z, K: int) -> dict:
    """Every L_aux and L_v form at the router state Z [N, E], plus the max load violation."""
    P, _ = softmax_forward(Z)
    idx = topk_indices(P, K)
    N, E = P.shape
    loads = np.bincount(idx.reshape(-1), minlength=E)
    out = {"maxvio": float(loads.max() / (N * K / E) - 1)}
    for a in LOSS_AUX:
        out[f"aux:{a}"] = float(aux_loss_forward(P, idx, a)[0])
    for v in LOSS_VAR:
        out[f"var:{v}"] = float(var_loss_forward(P, idx, v)[0])
    return out


def joint_table(N: int = 8, E: int = 4, K: int = 2, tau: float = 60.0) -> list[dict]:
    """For every (aux form, var form): L_aux - its balanced value and L_v - its infimum at the canonical states."""
    states = {"balanced_confident": balanced_logits(N, E, K, tau),
              "collapsed_confident": collapsed_logits(N, E, K, tau),
              "near_uniform": balanced_logits(N, E, K, 1e-3)}
    vals = {name: evaluate(Z, K) for name, Z in states.items()}
    rows = []
    for a in LOSS_AUX:
        bal = AUX_VARIANTS[a].balanced_value(N, E, K)
        for v in LOSS_VAR:
            inf = var_infimum(v, N, E, K)
            row = dict(aux=a, var=v, N=N, E=E, K=K)
            for s, d in vals.items():
                row[f"{s}:aux_gap"] = d[f"aux:{a}"] - bal
                row[f"{s}:var_gap"] = d[f"var:{v}"] - inf
                row[f"{s}:maxvio"] = d["maxvio"]
            rows.append(row)
    return rows


def switch_confident_floor(N: int, E: int) -> float:
    """K = 1: with one-hot P rows, L_switch = E sum_j c_j^2 / N^2 (c_j loads); its least value over loads.

    Balanced-as-possible loads minimise sum c_j^2. Equals K = 1 (the balanced value) iff E divides N.
    """
    q, r = divmod(N, E)
    loads = [q + 1] * r + [q] * (E - r)
    return E * sum(c * c for c in loads) / N ** 2


def conflict_example(N: int = 6, E: int = 4, tau: float = 40.0) -> dict:
    """K = 1, E not dividing N: a confident state (L_v code at its infimum) cannot reach L_switch = 1,
    while a near-uniform state reaches 1 exactly but has L_v code near 0 (its worst value)."""
    conf = evaluate(balanced_logits(N, E, 1, tau), 1)
    unif = evaluate(balanced_logits(N, E, 1, 1e-6), 1)
    return dict(N=N, E=E, K=1, floor=switch_confident_floor(N, E),
                confident_switch=conf["aux:switch"], confident_var_code=conf["var:code"],
                uniform_switch=unif["aux:switch"], uniform_var_code=unif["var:code"],
                var_code_infimum=var_infimum("code", N, E, 1))


def paper_identity_check(rng, N: int = 7, E: int = 5, K: int = 2) -> float:
    """|L_v(paper) - ( -(1/E) sum s^2 + (N/E) sum_j sbar_j^2 )| on a random state (the hidden balancing term)."""
    from ..ops import topk_scores_forward

    P, _ = softmax_forward(rng.standard_normal((N, E)))
    idx = topk_indices(P, K)
    (S, _), _ = topk_scores_forward(P, idx)
    sbar = S.mean(axis=0)
    rhs = -(S ** 2).sum() / E + (N / E) * (sbar ** 2).sum()
    return abs(float(var_loss_forward(P, idx, "paper")[0]) - float(rhs))


def second_choice_collapse_logits(N: int, E: int, tau: float) -> np.ndarray:
    """K = 2: every token's second choice is expert 0 (logit tau/2, P -> 0 there); first choices 1..E-1 in turn."""
    Z = np.zeros((N, E))
    Z[:, 0] = tau / 2
    for i in range(N):
        Z[i, 1 + i % (E - 1)] = tau
    return Z


def aux_minimum_not_balanced(N: int = 8, E: int = 4, tau: float = 60.0) -> dict:
    """L_aux below its balanced value at unbalanced loads (K = 2), and at its balanced value with all tokens on
    one expert (K = 1, uniform P). Returns the loss values, their balanced values and the MaxVio of each state."""
    K = 2
    d = evaluate(second_choice_collapse_logits(N, E, tau), K)
    out = dict(N=N, E=E, K=K, maxvio=d["maxvio"])
    for a in LOSS_AUX:
        out[f"aux:{a}"] = d[f"aux:{a}"]
        out[f"balanced:{a}"] = AUX_VARIANTS[a].balanced_value(N, E, K)
    for v in LOSS_VAR:
        out[f"var_gap:{v}"] = d[f"var:{v}"] - var_infimum(v, N, E, K)
    u = evaluate(np.zeros((N, E)), 1)                           # uniform P; ties -> expert 0 for every token
    out["k1_uniform_maxvio"] = u["maxvio"]
    out["k1_uniform_switch"] = u["aux:switch"]
    return out


def descent_search(aux: str, var: str, rng, N: int = 8, E: int = 4, K: int = 2, steps: int = 600,
                   lr: float = 2.0, restarts: int = 4, init_scale: float = 1.0) -> list[dict]:
    """Gradient descent on the logits Z of L_aux / balanced value + L_v / |infimum| from random starts.

    Gradients by refmoe's backward passes (aux/var -> d_scores -> softmax backward); the top-k sets are
    re-chosen at every step; the starting logits are ``init_scale`` times standard normal. Returns, per
    restart, the objective at the start and the end, the final gaps (L_aux / balanced - 1, L_v / |infimum| + 1,
    so 0 means 'at the balanced value / at the infimum') and MaxVio.
    Exploratory: where descent ends depends on the start and the step (``descent_sensitivity``); it is a finding
    about this optimiser, not a claim of the paper.
    """
    from ..losses.aux import aux_loss_backward
    from ..losses.variance import var_loss_backward
    from ..ops import softmax_backward

    bal, inf = AUX_VARIANTS[aux].balanced_value(N, E, K), abs(var_infimum(var, N, E, K))

    def step(Z):
        P, _ = softmax_forward(Z)
        idx = topk_indices(P, K)
        la, ca = aux_loss_forward(P, idx, aux)
        lv, cv = var_loss_forward(P, idx, var)
        dP = aux_loss_backward(1.0 / bal, ca) + var_loss_backward(1.0 / inf, cv)
        return float(la) / bal + float(lv) / inf, float(la), float(lv), softmax_backward(dP, P), idx

    runs = []
    for _ in range(restarts):
        Z = init_scale * rng.standard_normal((N, E))
        j0 = step(Z)[0]
        for _ in range(steps):
            Z = Z - lr * step(Z)[3]
        j1, la, lv, _, idx = step(Z)
        loads = np.bincount(idx.reshape(-1), minlength=E)
        runs.append(dict(start=j0, end=j1, aux_gap=la / bal - 1, var_gap=lv / inf + 1,
                         maxvio=float(loads.max() / (N * K / E) - 1)))
    return runs


def descent_sensitivity(rng, aux: str = "switch", var: str = "code", restarts: int = 8,
                        settings=((2.0, 1.0), (0.5, 1.0), (8.0, 1.0), (2.0, 0.1), (2.0, 3.0))) -> list[dict]:
    """How often ``descent_search`` ends balanced (MaxVio = 0), per (learning rate, scale of the random
    starting logits). Each setting restarts the same ``restarts`` draws of ``rng``'s state at entry."""
    state = rng.bit_generator.state
    out = []
    for lr, scale in settings:
        rng.bit_generator.state = state
        runs = descent_search(aux, var, rng, lr=lr, restarts=restarts, init_scale=scale)
        out.append(dict(lr=lr, init_scale=scale, runs=len(runs), balanced=sum(1 for r in runs if r["maxvio"] == 0)))
    return out
