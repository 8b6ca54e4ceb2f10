r"""The model the paper writes its gradients for (linear experts), its exact gradients, and the printed formulas.

The paper derives its gradient formulas (Sec. 2.2, 3.2 and App. B.2, C.2) for linear experts,
x~_ij = theta_j x_i, combined as y_i = sum_j s_ij x~_ij with S the post-top-k matrix of Eq. 1 (rows renormalised
over the selected experts). This module builds exactly that model, so that each printed formula can be evaluated
on the objects it names and set next to the exact gradient (hand-derived here, checked against finite
differences in ``tests/test_audit.py``).

Dimension letters: N tokens, D input width, O expert output width, E experts (the paper's n), K top-k.

    logits = x W_r^T                    [N, E]    W_r: [E, D]  (the paper's theta_R)
    P      = softmax(logits)            [N, E]
    T_i    = top-K of P_i               [N, K]    (no gradient)
    S      = P renormalised on T_i      [N, E]    (``renorm``; else s_ij = P_ij on T_i: DeepSeek-16B's gates)
    A_ik   = theta_{T_ik} x_i           [N, K, O] token-major expert outputs, the x~_ij of the selected pairs
    y_i    = sum_k s_{i,T_ik} A_ik      [N, O]
    L      = L_h + alpha L_aux(paper_eq2) + beta L_o(pairwise, eps) + gamma L_v(paper)
    L_h    = 1/2 sum_i |y_i - t_i|^2 (``task="sq"``), or sum_i 1^T y_i (``task="sum"``, so g_yi = 1)

Exact gradients: g_i = dL_h/dy_i; dL/dA_ik = s_ik g_i + beta dL_o/dA_ik; dL/dtheta_j = sum over the (i, k) with
T_ik = j of dL/dA_ik x_i^T; dL/ds_ik = g_i^T A_ik (+ the score gradients of L_aux, L_v), chained through S(P),
the softmax and the linear router. L_o depends on S only through the top-k indicator: no router gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import ops
from ..losses.aux import aux_loss_backward, aux_loss_forward, routing_map
from ..losses.ortho import ortho_loss_backward, ortho_loss_forward, paper_eq8_gradient
from ..losses.variance import paper_eq9_gradient, var_loss_backward, var_loss_forward


class Weights(NamedTuple):
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    eps: float = 0.0          # L_o's eps (Eq. 6); Eq. 28 writes none


class Cache(NamedTuple):
    x: object
    theta: object
    P: object
    idx: object               # [N, K]
    S: object                 # [N, E] the combine weights scattered (renormalised or raw, per ``renorm``)
    s_sel: object             # [N, K]
    A: object                 # [N, K, O]
    g: object                 # [N, O] dL_h/dy
    renorm: bool
    lin: tuple                # router linear
    sel: tuple                # S(P): topk-scores cache (renorm) or gather cache (raw gates)
    aux: object               # the caches of L_aux (paper_eq2), L_o (pairwise), L_v (paper)
    ortho: object
    var: object


def instance(rng, N: int = 7, D: int = 5, O: int = 3, E: int = 4) -> dict:
    """A random float64 instance: x [N, D], w_router [E, D], theta [E, O, D], target [N, O]."""
    return dict(x=rng.standard_normal((N, D)), w_router=rng.standard_normal((E, D)),
                theta=rng.standard_normal((E, O, D)) / np.sqrt(D), target=rng.standard_normal((N, O)))


def forward(p: dict, K: int, w: Weights, *, renorm: bool = True, task: str = "sq"):
    """Total loss and cache. ``p``: the dict of ``instance``."""
    if task not in ("sq", "sum"):
        raise ValueError(f"task={task!r}; expected 'sq' or 'sum'")
    x, theta = p["x"], p["theta"]
    logits, lin = ops.linear_forward(x, p["w_router"])
    P, _ = ops.softmax_forward(logits)
    idx = ops.topk_indices(P, K)
    if renorm:
        (S, s_sel), sc = ops.topk_scores_forward(P, idx)
    else:
        s_sel, sc = ops.gather_forward(P, idx)
        S = ops.gather_backward(s_sel, sc)
    A = np.einsum("nkod,nd->nko", theta[idx], x)                             # [N, K, O]
    y = np.einsum("nk,nko->no", s_sel, A)
    if task == "sq":
        g = y - p["target"]
        loss_h = 0.5 * float((g * g).sum())
    else:
        g = np.ones_like(y)
        loss_h = float(y.sum())
    aux, ac = aux_loss_forward(P, idx, "paper_eq2")
    ortho, oc = ortho_loss_forward(A, "pairwise", eps=w.eps)
    var, vc = var_loss_forward(P, idx, "paper")
    loss = loss_h + w.alpha * float(aux) + w.beta * float(ortho) + w.gamma * float(var)
    return loss, Cache(x, theta, P, idx, S, s_sel, A, g, renorm, lin, sc, ac, oc, vc)


def _theta_grad(c: Cache, dA):
    """dL/dtheta_j = sum over (i, k) with T_ik = j of dA_ik x_i^T.  [E, O, D]."""
    dtheta = np.zeros_like(c.theta)
    np.add.at(dtheta, c.idx, np.einsum("nko,nd->nkod", dA, c.x))
    return dtheta


def _dP_from_dsel(c: Cache, ds_sel):
    """A gradient on the selected scores s_sel [N, K] carried back to the softmax P [N, E]."""
    if c.renorm:
        return ops.topk_scores_backward(None, c.sel, d_s_sel=ds_sel)
    return ops.gather_backward(ds_sel, c.sel)


def _router_from_dP(c: Cache, dP):
    return ops.linear_backward(ops.softmax_backward(dP, c.P), c.lin)[1]


def router_grad_from_dS(c: Cache, dS):
    """sum_ij dS_ij ds_ij/dW_r: a coefficient matrix on S [N, E] pushed through S(P), softmax, router."""
    return _router_from_dP(c, _dP_from_dsel(c, np.take_along_axis(dS, c.idx, axis=1)))


def backward(c: Cache, w: Weights) -> dict:
    """Exact gradients of the total loss w.r.t. w_router and theta (top-k indices held fixed)."""
    dA = c.s_sel[:, :, None] * c.g[:, None, :]
    if w.beta:
        dA = dA + ortho_loss_backward(w.beta, c.ortho)
    ds_sel = np.einsum("nko,no->nk", c.A, c.g)                              # g_i^T x~_ij
    dP = _dP_from_dsel(c, ds_sel) + w.alpha * aux_loss_backward(1.0, c.aux) + w.gamma * var_loss_backward(1.0, c.var)
    return dict(w_router=_router_from_dP(c, dP), theta=_theta_grad(c, dA))


# ----------------------------------------------------------------------------------------------
# the formulas as printed
# ----------------------------------------------------------------------------------------------

def loads(c: Cache):
    """f_j = (1/N) #{i : j in T_i}, the proportion of Eq. 2.  [E]."""
    N, E = c.P.shape
    return routing_map(c.idx, E, c.P.dtype, np).sum(axis=0) / N


def eq20_expert(c: Cache):
    """Eqs. 3 = 20: dL/dtheta_Ej = sum_i x_i s_ij (the same for L_h alone: L_aux adds 0).  [E, D]."""
    return c.S.T @ c.x


def eq23_router(c: Cache, alpha: float):
    """Eqs. 4 = 23: sum_ij (x_i theta_Ej) ds_ij/dtheta_R + alpha sum_j f_j sum_i ds_ij/dtheta_R.

    x_i theta_Ej is a vector of width O; as a coefficient of the scalar ds_ij it is defined for O = 1 only."""
    if c.A.shape[2] != 1:
        raise ValueError(f"Eq. 23 multiplies the expert output (width O={c.A.shape[2]}) by a scalar derivative; "
                         "it is defined for O = 1 only")
    X = ops.gather_backward(c.A[:, :, 0], (c.idx, c.P.shape))               # [N, E] x~_ij, 0 off the support
    return router_grad_from_dS(c, X + alpha * loads(c)[None, :])


def eq24_router(c: Cache, alpha: float):
    """Eq. 24: dL/dtheta_R ~ alpha sum_j f_j sum_i ds_ij/dtheta_R (the L_aux part of Eq. 23 alone)."""
    return router_grad_from_dS(c, alpha * np.broadcast_to(loads(c)[None, :], c.P.shape))


def eq27_expert(c: Cache, beta: float):
    """Eq. 27: sum_i 1{s_ij > 0} (dL_h/dx~_ij + beta dL_o/dx~_ij) dx~_ij/dtheta_j, dL_h/dx~_ij = g_i s_ij,
    with the exact dL_o/dx~_ij (Eq. 27 leaves it unexpanded)."""
    dA = c.s_sel[:, :, None] * c.g[:, None, :] + ortho_loss_backward(beta, c.ortho)
    return _theta_grad(c, dA)


def eq28_expert(c: Cache, beta: float):
    """Eq. 28: Eq. 27 with dL_o/dx~_ij := sum_{k != j selected} x~_ik x~_ik^T x~_ij / <x~_ik, x~_ik> (Eq. 8, eps = 0)."""
    dA = c.s_sel[:, :, None] * c.g[:, None, :] + beta * paper_eq8_gradient(c.A, eps=0.0)
    return _theta_grad(c, dA)


def eq33_router(c: Cache, alpha: float, gamma: float):
    """Eq. 33 (Eq. 9 with g_yi^T x~_ij for x~_ij, as Eqs. 10, 34 write it):
    sum_ij (g_i^T x~_ij + alpha f_j - gamma 2(N-1)/(nN) (s_ij - sbar_j)) ds_ij/dtheta_R, on the renormalised S."""
    if not c.renorm:
        raise ValueError("Eq. 33 is written on the renormalised S of Eq. 1")
    gx = ops.gather_backward(np.einsum("nko,no->nk", c.A, c.g), (c.idx, c.P.shape))
    return router_grad_from_dS(c, gx + alpha * loads(c)[None, :] + gamma * paper_eq9_gradient(c.S))
