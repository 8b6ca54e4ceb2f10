r"""Gradient-alignment analyses: how the terms of the objective pull on the same parameters.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k, T objective terms
(``refmoe.objective.TERMS``), S logged steps.

Inputs are the per-term gradients of :func:`refmoe.objective.objective_forward_backward` (``grads[term]``,
each already multiplied by its coefficient; the T terms 'task' = L_h, 'aux', 'ortho', 'var'). They are grouped as

    router   w_router                              [E, D]
    experts  w_gate, w_up, w_down (routed experts)  [E, D, H], [E, D, H], [E, H, D]
    input    x, the layer input                     [N, D]  (the path to upstream layers)

and compared by cosine similarity. Cosines with an exactly-zero gradient are undefined and reported as NaN:
that is the paper's "compatibility" (L_aux and L_v never reach the experts, L_o never the router), so a NaN in
those cells is the expected outcome, not a failure.

The paper's "mutually reinforcing" argument (Sec. 3.3) looks at p_ij = g_{y_i} . x~_ij, the product of the
task gradient on token i's output with the unweighted output of its selected expert j: dL_h/dg_ij = p_ij is
what the router learns from. If the p_ij of a token's K experts are alike, the router gets no signal about
which expert to prefer. :func:`routing_discriminativeness` measures how different they are.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_namespace, to_numpy
from ..objective import TERMS
from .metrics import safe_cosine

GROUPS = {"router": ("w_router",), "experts": ("w_gate", "w_up", "w_down"), "input": ("x",)}


def flat_group(grads: dict, group: str):
    """The named group's gradients of one term, flattened and concatenated into one vector."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}; expected one of {sorted(GROUPS)}")
    parts = [grads[k] for k in GROUPS[group]]
    xp = array_namespace(*parts)
    return xp.concatenate([p.reshape(-1) for p in parts])


def cosine_matrix(grads_by_term: dict, group: str, terms=TERMS) -> np.ndarray:
    """[T, T] host matrix of cosines between the terms' gradients on ``group`` (NaN where one is zero)."""
    vecs = [flat_group(grads_by_term[t], group) for t in terms]
    n = len(terms)
    out = np.full((n, n), math.nan)
    for a in range(n):
        for b in range(n):
            out[a, b] = safe_cosine(vecs[a], vecs[b])
    return out


def gradient_norms(grads_by_term: dict, group: str, terms=TERMS) -> dict:
    """term -> L2 norm of its gradient on ``group`` (Python floats)."""
    res = {}
    for t in terms:
        v = flat_group(grads_by_term[t], group)
        xp = array_namespace(v)
        res[t] = float(to_numpy(xp.sqrt((v * v).sum())))
    return res


def conflict_fraction(matrices) -> np.ndarray:
    """Per pair of terms, the fraction of logged steps whose cosine is < 0 (NaN steps left out; NaN if none).

    matrices: a sequence of [T, T] cosine matrices -> [T, T].
    """
    m = np.asarray(matrices, dtype=np.float64)                  # [S, T, T]
    if m.ndim != 3:
        raise ValueError(f"expected a stack of square matrices, got shape {m.shape}")
    defined = ~np.isnan(m)
    n_def = defined.sum(axis=0)
    neg = (np.where(defined, m, 0.0) < 0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_def > 0, neg / np.maximum(n_def, 1), np.nan)


def nanmean_matrices(matrices) -> np.ndarray:
    """Element-wise mean over steps, ignoring NaN cells (NaN where every step is NaN).  [S, T, T] -> [T, T]."""
    m = np.asarray(matrices, dtype=np.float64)                  # [S, T, T]
    defined = ~np.isnan(m)
    n_def = defined.sum(axis=0)
    tot = np.where(defined, m, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_def > 0, tot / np.maximum(n_def, 1), np.nan)


# ----------------------------------------------------------------------------------------------
# p_ij = g_yi . x~_ij  and how discriminative it is across a token's experts
# ----------------------------------------------------------------------------------------------

def affinity(dy, expert_out):
    r"""p_ij = <g_{y_i}, x~_ij>.  dy [N, D] (dL_h/dy), expert_out [N, K, D] -> p [N, K]."""
    xp = array_namespace(dy, expert_out)
    if dy.ndim != 2 or expert_out.ndim != 3 or expert_out.shape[0] != dy.shape[0] \
            or expert_out.shape[2] != dy.shape[1]:
        raise ValueError(f"dy must be [N, D] and expert_out [N, K, D], got {tuple(dy.shape)}, {tuple(expert_out.shape)}")
    return xp.einsum("nd,nkd->nk", dy, expert_out)


def routing_discriminativeness(dy, expert_out) -> float:
    r"""Mean over tokens of the spread of c_ij = cos(g_{y_i}, x~_ij) across the token's K selected experts.

    .. math:: \Delta = \frac1N \sum_i \big(\max_j c_{ij} - \min_j c_{ij}\big) \in [0, 2]

    c_ij is p_ij with the norms divided out (p_ij / (||g_yi|| ||x~_ij||)), so a larger output norm alone does
    not count as discrimination. Tokens with a zero task gradient (or zero outputs) contribute 0.
    """
    xp = array_namespace(dy, expert_out)
    p = affinity(dy, expert_out)                                                 # [N, K]
    ng = xp.sqrt((dy * dy).sum(axis=1))                                          # [N]
    nx = xp.sqrt((expert_out * expert_out).sum(axis=2))                          # [N, K]
    den = ng[:, None] * nx
    c = xp.where(den > 0, p / xp.where(den > 0, den, 1.0), 0.0)                  # [N, K]
    return float(to_numpy((c.max(axis=1) - c.min(axis=1)).mean()))
