r"""Audit of the gradient formulas the paper states, against exact gradients (hand-derived and finite differences).

Dimension letters: N tokens, D model width, H expert hidden width, O expert output width (``paper_model``),
E experts (the paper's n), K top-k.

What is audited (``theory/gradient-audit.md`` quotes each equation and gives the verdicts):
    L_v   Eqs. 9, 10, 33   paper: -2(N-1)/(nN) (s_ij - sbar_j);  exact: -(2/n)(s_ij - sbar_j)
    L_o   Eqs. 8, 28       paper: sum_{k!=j} x_k x_k^T x_j / (|x_k|^2 + eps); exact: ``ortho_loss_backward``
    Eqs. 3 = 20, 4 = 23, 24, 27, 28, 33/34 on the paper's own model (linear experts, ``paper_model``)
    Sec. 3.2's separation ("L_aux and L_v do not directly contribute gradients to the expert parameter matrix",
    "L_o does not affect the gradient with respect to routing parameters"), stated per layer: the within-layer
    Jacobian blocks (aux, var) -> experts and ortho -> router are exactly zero; every loss reaches x, so in a
    two-layer stack each reaches every parameter of the layer below.
All finite differences are float64 central differences with a top-k guard (``refmoe.gradcheck``).

Two error measures, both max-norm:
    ``rel_error(a, b)``  = max|a - b| / (max|a| + max|b|)   (``refmoe.gradcheck``; used against FD, where a ~ b;
                          for a = c b it is |c - 1| / (|c| + 1), about half the plain measure)
    ``plain_error(a, b)`` = max|a - b| / max|b|, b the exact gradient  (used for a printed formula vs the truth)
"""
from __future__ import annotations

import numpy as np

from ..backend import to_backend, to_numpy
from ..config import MoEConfig
from ..gradcheck import numerical_vjp, rel_error
from ..gradcheck import cache_loss
from ..layer import init_params, moe_backward, moe_forward
from ..study.metrics import safe_cosine
from ..objective import Objective
from ..stack import stack_forward_backward, upstream_term_grads
from ..losses.ortho import ortho_loss_backward, ortho_loss_forward, paper_eq8_gradient
from ..losses.variance import paper_eq9_gradient
from ..ops import softmax_forward, topk_indices, topk_scores_forward
from . import paper_model as pm

EXPERT_KEYS = ("w_gate", "w_up", "w_down")


# ----------------------------------------------------------------------------------------------
# Eq. 9/10 (L_v) and Eq. 8 (L_o) on random instances
# ----------------------------------------------------------------------------------------------

def plain_error(a, exact) -> float:
    """max|a - exact| / max|exact|: the plain relative error of a printed formula against the exact gradient."""
    a, exact = np.asarray(a, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return float(np.abs(a - exact).max() / np.abs(exact).max())


def _random_S(rng, N, E, K):
    P, _ = softmax_forward(rng.standard_normal((N, E)) * 2.0)
    idx = topk_indices(P, K)
    (S, _), _ = topk_scores_forward(P, idx)
    return S


def audit_eq9(rng, N: int = 7, E: int = 5, K: int = 2) -> dict:
    """Ratio paper/exact on the support (expected (N-1)/N everywhere) and the FD error of the exact form.

    The exact form is differentiated as a function of S with free entries (Eq. 7 written on S)."""
    S = _random_S(rng, N, E, K)

    def L(inp):
        s = inp["S"]
        return -((s - s.mean(axis=0)) ** 2).sum() / E

    exact = (-2.0 / E) * (S - S.mean(axis=0))
    fd = numerical_vjp(L, {"S": S.copy()})["S"]
    paper = paper_eq9_gradient(S)
    mask = np.abs(exact) > 1e-12
    ratio = paper[mask] / exact[mask]
    return dict(N=N, E=E, fd_error_exact=rel_error(exact, fd), fd_error_paper=rel_error(paper, fd),
                plain_error_paper=plain_error(paper, exact), ratio_min=float(ratio.min()),
                ratio_max=float(ratio.max()), expected_ratio=(N - 1) / N)


def audit_eq8(rng, N: int = 5, K: int = 3, D: int = 4) -> dict:
    """Eq. 8 vs the exact gradient of Eq. 6 (eps = 0) and FD: relative discrepancy and cosine."""
    A = rng.standard_normal((N, K, D))
    _, cache = ortho_loss_forward(A, "pairwise", eps=0.0)
    exact = ortho_loss_backward(1.0, cache)
    fd = numerical_vjp(lambda inp: ortho_loss_forward(inp["A"], "pairwise", eps=0.0)[0], {"A": A.copy()})["A"]
    paper = paper_eq8_gradient(A, eps=0.0)
    cos = safe_cosine(np.ravel(paper), np.ravel(exact))
    scale = float((paper * exact).sum() / (exact * exact).sum())       # least-squares factor paper ~ c * exact
    return dict(fd_error_exact=rel_error(exact, fd), fd_error_paper=rel_error(paper, fd),
                plain_error_paper=plain_error(paper, exact), cosine=cos, best_scale=scale)


# ----------------------------------------------------------------------------------------------
# a layer instance, and the within-layer Jacobian blocks of each loss
# ----------------------------------------------------------------------------------------------

def layer_instance(rng, N: int = 7, D: int = 5, H: int = 4, E: int = 4, K: int = 2, backend: str = "numpy"):
    """A random float64 layer and input on ``backend``; N = 7 tokens so that the loads are not balanced."""
    cfg = MoEConfig(d_model=D, d_hidden=H, n_experts=E, top_k=K)
    params = init_params(cfg, rng, backend=backend)
    x = to_backend(rng.standard_normal((N, D)), backend)
    return x, params, cfg


def loss_grads(x, params, cfg, loss: str, variant: str):
    """Gradients of one loss w.r.t. x and every parameter of the layer, via moe_backward with dy = None."""
    _, c = moe_forward(x, params, cfg)
    _, d_scores, d_expert_out = cache_loss(loss, variant)(c)
    return moe_backward(None, c, d_scores=d_scores, d_expert_out=d_expert_out)


def loss_value(x, params, cfg, loss: str, variant: str) -> float:
    _, c = moe_forward(x, params, cfg)
    return float(cache_loss(loss, variant)(c)[0])


def jacobian_blocks(rng, cases=(("aux", "switch"), ("aux", "deepseek_batch"), ("aux", "paper_eq2"),
                                ("var", "paper"), ("var", "code"), ("var", "row_topk"),
                                ("ortho", "pairwise"), ("ortho", "span")), backend: str = "numpy") -> list[dict]:
    """max |grad| of each loss on the router, on the experts and on x, within one layer (on ``backend``)."""
    x, params, cfg = layer_instance(rng, backend=backend)
    rows = []
    for loss, variant in cases:
        g = {k: to_numpy(v) for k, v in loss_grads(x, params, cfg, loss, variant).items()}
        rows.append(dict(loss=loss, variant=variant,
                         router=float(np.abs(g["w_router"]).max()),
                         experts=max(float(np.abs(g[k]).max()) for k in EXPERT_KEYS),
                         x=float(np.abs(g["x"]).max())))
    return rows


def fd_check_layer(rng, loss: str, variant: str, names=("w_router", "w_gate", "x")) -> dict:
    """FD check of the injected loss gradients through the layer (guarded against top-k flips)."""
    x, params, cfg = layer_instance(rng)
    g = loss_grads(x, params, cfg, loss, variant)
    inputs = {"x": x, **params}

    def f(inp):
        return loss_value(inp["x"], {k: inp[k] for k in params}, cfg, loss, variant)

    def guard(inp):
        _, c = moe_forward(inp["x"], {k: inp[k] for k in params}, cfg)
        return c.topk_idx

    fd = numerical_vjp(f, inputs, names=list(names), guard=guard)
    return {k: rel_error(g[k], fd[k]) for k in names}


# ----------------------------------------------------------------------------------------------
# two residual layers (``refmoe.stack``): what a loss of layer 2 sends to layer 1
# ----------------------------------------------------------------------------------------------

def two_layer_leakage(rng, loss: str, variant: str) -> dict:
    """max |grad| on layer 1's router and experts of one loss of layer 2 alone, and an FD check of them.

    h_1 = x + MoE_1(x), layer 2 reads h_1; the gradients are ``refmoe.stack.upstream_term_grads`` (layer 2's
    term alone, coefficient 1, carried to layer 1 through h_1)."""
    x, p1, cfg = layer_instance(rng)
    p2 = init_params(cfg, rng, backend="numpy")
    field = {"aux": "aux_variant", "ortho": "ortho_variant", "var": "var_variant"}[loss]
    obj = Objective(alpha=1.0, beta=1.0, gamma=1.0, **{field: variant})
    stack = stack_forward_backward(x, [p1, p2], cfg, np.zeros_like(x), obj, per_term=True)
    g1 = upstream_term_grads(stack, top=1, below=0)[loss]

    def h1(inp):
        y, c = moe_forward(x, {k: inp[k] for k in p1}, cfg)
        return x + y, c

    def f(inp):
        _, c2 = moe_forward(h1(inp)[0], p2, cfg)
        return float(cache_loss(loss, variant)(c2)[0])

    def guard(inp):
        h, c = h1(inp)
        _, c2 = moe_forward(h, p2, cfg)
        return np.concatenate([c.topk_idx, c2.topk_idx])

    fd = numerical_vjp(f, dict(p1), names=["w_router", "w_down"], guard=guard)
    return dict(loss=loss, variant=variant,
                layer1_router=float(np.abs(g1["w_router"]).max()),
                layer1_experts=max(float(np.abs(g1[k]).max()) for k in EXPERT_KEYS),
                fd_error=max(rel_error(g1[k], fd[k]) for k in ("w_router", "w_down")))


def aux_router_gradient_at_balance(rng) -> dict:
    """Exactly balanced loads (N K / E an integer, cyclic top-k): f is constant, so the router gradient of
    L_aux is (up to rounding) zero: max |d w_router| for each form, next to an unbalanced instance (N = 7)."""
    from .lemma1_losses import balanced_logits

    out = {}
    for N in (8, 7):
        x, params, cfg = layer_instance(rng, N=N, D=4, E=4, K=2)
        x = balanced_logits(N, 4, 2, 3.0) + 0.01 * rng.standard_normal((N, 4))   # router = identity below
        params["w_router"] = np.eye(4)
        for variant in ("switch", "deepseek_batch", "paper_eq2"):
            g = loss_grads(x, params, cfg, "aux", variant)
            out[f"N={N}:{variant}"] = float(np.abs(g["w_router"]).max())
    return out


# ----------------------------------------------------------------------------------------------
# the printed formulas on the paper's own model: linear experts (``paper_model``)
# ----------------------------------------------------------------------------------------------

def _exact(p, K, w, **kw):
    _, c = pm.forward(p, K, w, **kw)
    return c, pm.backward(c, w)


def paper_model_fd(rng, K: int = 2) -> dict:
    """FD error of the exact backward of ``paper_model`` (all four losses on), gated both ways, both tasks."""
    out = {}
    w = pm.Weights(alpha=1.0, beta=1.0, gamma=1.0)
    for renorm in (True, False):
        for task in ("sq", "sum"):
            p = pm.instance(rng)
            _, g = _exact(p, K, w, renorm=renorm, task=task)

            def f(inp):
                return pm.forward({**p, **inp}, K, w, renorm=renorm, task=task)[0]

            def guard(inp):
                return pm.forward({**p, **inp}, K, w, renorm=renorm, task=task)[1].idx

            fd = numerical_vjp(f, {k: p[k].copy() for k in ("w_router", "theta")}, guard=guard)
            out[f"renorm={renorm},task={task}"] = max(rel_error(g[k], fd[k]) for k in fd)
    return out


def audit_eq20_23(rng, K: int = 2) -> dict:
    """Eqs. 3 = 20 (experts) and 4 = 23 (router) on scalar linear experts (O = 1, so x_i theta_Ej is a number).

    Both drop g_yi = dL_h/dy_i: they equal the exact gradient when g_yi = 1 (L_h = sum_i y_i) and not for a
    squared error. The L_aux parts: 0 on the experts, alpha sum_j f_j ds_ij on the router."""
    p = pm.instance(rng, O=1)
    r = {}
    for task in ("sum", "sq"):
        c, g = _exact(p, K, pm.Weights(), task=task)
        r[f"eq20_{task}"] = rel_error(pm.eq20_expert(c), g["theta"][:, 0, :])
        r[f"eq20_cos_{task}"] = safe_cosine(np.ravel(pm.eq20_expert(c)), np.ravel(g["theta"][:, 0, :]))
        c, g = _exact(p, K, pm.Weights(alpha=1.0), task=task)
        r[f"eq23_{task}"] = rel_error(pm.eq23_router(c, 1.0), g["w_router"])
    c, g1 = _exact(p, K, pm.Weights(alpha=1.0))
    _, g0 = _exact(p, K, pm.Weights())
    r["aux_expert_block"] = float(np.abs(g1["theta"] - g0["theta"]).max())
    r["aux_router_term"] = rel_error(pm.eq24_router(c, 1.0), g1["w_router"] - g0["w_router"])
    return r


def audit_eq24(rng, K: int = 2, spreads=(0.0, 1e-3, 1e-2, 1e-1), alpha: float = 1.0) -> dict:
    """Eq. 24: as the experts become alike, dL/dtheta_R -> alpha dL_aux/dtheta_R. Experts theta_bar +
    spread * Delta_j; per spread and gating: max |dL_h/dW_r| and the relative miss of Eq. 24 on the total,
    ||total - Eq. 24||_F / ||total||_F, at L_aux weight ``alpha`` (the paper trains with alpha = 1e-3)."""
    p = pm.instance(rng)
    bar = p["theta"].mean(axis=0)
    out = {}
    for renorm in (True, False):
        for s in spreads:
            q = dict(p, theta=bar[None] + s * (p["theta"] - bar))
            _, gh = _exact(q, K, pm.Weights(), renorm=renorm)
            c, gt = _exact(q, K, pm.Weights(alpha=alpha), renorm=renorm)
            miss = np.linalg.norm(gt["w_router"] - pm.eq24_router(c, alpha)) / np.linalg.norm(gt["w_router"])
            out[(renorm, s)] = dict(task_router=float(np.abs(gh["w_router"]).max()), eq24_miss=float(miss))
    return out


def audit_eq27_28(rng, K: int = 3) -> dict:
    """Eq. 27 (the chain rule, exact dL_o/dx~) and Eq. 28 (Eq. 27 with Eq. 8's L_o term) on linear experts,
    each against FD: Eq. 28's task term alone (beta = 0), in full (beta = 1), and its L_o term alone."""
    p = pm.instance(rng, O=4)

    def fd(w):
        return numerical_vjp(lambda inp: pm.forward({**p, **inp}, K, w)[0], {"theta": p["theta"].copy()},
                             guard=lambda inp: pm.forward({**p, **inp}, K, w)[1].idx)["theta"]

    w1, w0 = pm.Weights(beta=1.0), pm.Weights()
    fd1, fd0 = fd(w1), fd(w0)
    _, c = pm.forward(p, K, w1)
    lo_paper = pm.eq28_expert(c, 1.0) - pm.eq28_expert(c, 0.0)
    return dict(eq27=rel_error(pm.eq27_expert(c, 1.0), fd1), eq28_task=rel_error(pm.eq28_expert(c, 0.0), fd0),
                eq28=rel_error(pm.eq28_expert(c, 1.0), fd1),
                eq28_ortho=rel_error(lo_paper, fd1 - fd0),
                eq28_ortho_cos=safe_cosine(np.ravel(lo_paper), np.ravel(fd1 - fd0)))


def audit_eq33(rng, K: int = 2) -> dict:
    """Eqs. 10/33/34: dL/ds_ij = g_i^T x~_ij + alpha f_j + gamma dL_v/ds_ij, pushed through ds_ij/dtheta_R.
    gamma = 0 isolates the task and L_aux terms; gamma = 1 adds the L_v term with its (N-1)/N factor."""
    p = pm.instance(rng)
    out = {}
    for gamma in (0.0, 1.0):
        c, g = _exact(p, K, pm.Weights(alpha=1.0, gamma=gamma))
        out[f"gamma={gamma:g}"] = rel_error(pm.eq33_router(c, 1.0, gamma), g["w_router"])
    E = c.P.shape[1]
    exact_v = pm.router_grad_from_dS(c, (-2.0 / E) * (c.S - c.S.mean(axis=0)))          # -(2/n)(s - sbar)
    out["gamma=1,exact_v"] = rel_error(pm.eq33_router(c, 1.0, 0.0) + exact_v, g["w_router"])
    return out
