r"""Audit of the gradient formulas the paper states, against exact gradients (hand-derived and finite differences).

Dimension letters: N tokens, D model width, H expert hidden width, E experts (the paper's n), K top-k.

What is audited (see ``theory/gradient-audit.md`` for which equation is which and what we could read):
    L_v   Eq. 9/10   paper: -2(N-1)/(nN) (s_ij - sbar_j);  exact: -(2/n)(s_ij - sbar_j)
    L_o   Eq. 8      paper: sum_{k!=j} x_k x_k^T x_j / (|x_k|^2 + eps); exact: ``ortho_loss_backward``
    L_aux Eqs. 3/4   counts f constant: dL/dP_ij = W_ij (router), zero gradient to the experts
    "disjoint parameters": the within-layer Jacobian blocks (aux, var) -> experts and ortho -> router are exactly
    zero; every loss reaches x, so in a two-layer stack each reaches every parameter of the layer below.
All finite differences are float64 central differences with a top-k guard (``refmoe.gradcheck``).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_backend, to_numpy
from ..config import MoEConfig
from ..gradcheck import numerical_vjp, rel_error
from ..checks import cache_loss
from ..layer import init_params, moe_backward, moe_forward
from ..losses.ortho import ortho_loss_backward, ortho_loss_forward, paper_eq8_gradient
from ..losses.variance import paper_eq9_gradient
from ..ops import softmax_forward, topk_indices, topk_scores_forward

EXPERT_KEYS = ("w_gate", "w_up", "w_down")


# ----------------------------------------------------------------------------------------------
# Eq. 9/10 (L_v) and Eq. 8 (L_o) on random instances
# ----------------------------------------------------------------------------------------------

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
                ratio_min=float(ratio.min()), ratio_max=float(ratio.max()), expected_ratio=(N - 1) / N)


def audit_eq8(rng, N: int = 5, K: int = 3, D: int = 4) -> dict:
    """Eq. 8 vs the exact gradient of Eq. 6 (eps = 0) and FD: relative discrepancy and cosine."""
    A = rng.standard_normal((N, K, D))
    _, cache = ortho_loss_forward(A, "pairwise", eps=0.0)
    exact = ortho_loss_backward(1.0, cache)
    fd = numerical_vjp(lambda inp: ortho_loss_forward(inp["A"], "pairwise", eps=0.0)[0], {"A": A.copy()})["A"]
    paper = paper_eq8_gradient(A, eps=0.0)
    cos = float((paper * exact).sum() / (np.linalg.norm(paper) * np.linalg.norm(exact)))
    scale = float((paper * exact).sum() / (exact * exact).sum())       # least-squares factor paper ~ c * exact
    return dict(fd_error_exact=rel_error(exact, fd), fd_error_paper=rel_error(paper, fd),
                cosine=cos, best_scale=scale)


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
# two layers: y1 = layer1(x), loss on layer2(y1); what reaches layer 1
# ----------------------------------------------------------------------------------------------

def two_layer_leakage(rng, loss: str, variant: str) -> dict:
    """max |grad| on layer 1's router and experts of a loss of layer 2, and an FD check of them."""
    x, p1, cfg = layer_instance(rng)
    p2 = init_params(cfg, rng, backend="numpy")
    y1, c1 = moe_forward(x, p1, cfg)
    g2 = loss_grads(y1, p2, cfg, loss, variant)
    g1 = moe_backward(g2["x"], c1)                                   # dy of layer 1 = dx of layer 2

    def f(inp):
        y, _ = moe_forward(x, {k: inp[k] for k in p1}, cfg)
        return loss_value(y, p2, cfg, loss, variant)

    def guard(inp):
        y, c = moe_forward(x, {k: inp[k] for k in p1}, cfg)
        _, c2 = moe_forward(y, p2, cfg)
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
