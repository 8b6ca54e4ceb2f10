"""Vectorised L_o and L_v (forward + hand-derived backward) used by the benchmark when refmoe.losses.ortho /
refmoe.losses.variance are not installed, and proposed as their fast form.

No Python loop over tokens; L_o works on the per-token Gram matrix G = X X^T [N, K, K] (one batched product)
and, for the span forms, on a batched linear solve with the Gram matrix of the other K-1 slots.

Dimension letters: N tokens, K slots, D model, E experts.
"""
from __future__ import annotations

from typing import NamedTuple

from refmoe import ops
from refmoe.backend import array_namespace

ORTHO_VARIANTS = ("pairwise", "span", "span_code_grouping")
VAR_VARIANTS = ("paper", "code", "row_topk")


def _mT(a):
    return a.swapaxes(-1, -2)


class OrthoCache(NamedTuple):
    variant: str
    x: object        # [N, K, D] (expert-major regrouped for span_code_grouping)
    parts: tuple
    order: object    # [N*K] regrouping permutation or None


def ortho_loss_forward(expert_out, variant="pairwise", *, eps=None, topk_idx=None, valid_mask=None):
    xp = array_namespace(expert_out)
    N, K, D = expert_out.shape
    x, order = expert_out, None
    if variant == "span_code_grouping":
        order = xp.argsort(topk_idx.reshape(-1), kind="stable")            # [N*K] expert-major
        x = expert_out.reshape(N * K, D)[order].reshape(N, K, D)
    G = x @ _mT(x)                                                          # [N, K, K]
    if variant == "pairwise":
        # L = sum_i sum_{j != k} G_jk^2 G_kk / (G_kk + eps)^2    (paper Eq. 6 through the Gram matrix)
        e = 0.0 if eps is None else float(eps)
        d = xp.diagonal(G, axis1=1, axis2=2)                                # [N, K]
        c = d / (d + e) ** 2                                                # [N, K]
        off = 1.0 - xp.eye(K, dtype=x.dtype)                                # [K, K]
        G2 = G * G * off                                                    # [N, K, K]
        loss = (G2 * c[:, None, :]).sum()
        return loss, OrthoCache(variant, x, (G, d, c, off, e), order)
    # span: L = 1/(K N) sum_i sum_a x_a^T P_a x_a, P_a the projector on span(other slots); coefficients
    # c_a = G_o^{-1} (X_o x_a) by a batched solve; the residual r_a = x_a - X_o^T c_a.
    loss = 0.0
    parts = []
    for a in range(K):          # K is small (top-k): a loop over slots, vectorised over tokens
        others = [m for m in range(K) if m != a]
        Go = G[:, others][:, :, others]                                     # [N, K-1, K-1]
        g = G[:, others, a]                                                 # [N, K-1]
        coef = xp.linalg.solve(Go, g[:, :, None])[:, :, 0]                  # [N, K-1]
        loss = loss + (coef * g).sum()
        parts.append((others, coef))
    return loss / (K * N), OrthoCache(variant, x, tuple(parts), order)


def ortho_loss_backward(dloss, cache: OrthoCache):
    x = cache.x
    xp = array_namespace(x)
    N, K, D = x.shape
    if cache.variant == "pairwise":
        G, d, c, off, e = cache.parts
        dG = 2.0 * dloss * G * off * c[:, None, :]                          # [N, K, K] d/dG_jk off the diagonal
        dc = dloss * (G * G * off).sum(axis=1)                              # [N, K]
        dd = dc * (e - d) / (d + e) ** 3                                    # d c / d d
        A = dG + xp.eye(K, dtype=x.dtype) * dd[:, :, None]                  # [N, K, K]
        dx = (A + _mT(A)) @ x                                               # [N, K, D]  G = X X^T
    else:
        # d(x_a^T P x_a)/dx_a = 2 P x_a,  d/dx_m = 2 c_m r_a for each other slot m (projector derivative)
        dx = xp.zeros_like(x)
        scale = 2.0 * dloss / (K * N)
        for a, (others, coef) in enumerate(cache.parts):
            px = (coef[:, :, None] * x[:, others]).sum(axis=1)              # [N, D] P x_a
            r = x[:, a] - px                                                # [N, D] residual
            dx[:, a] += scale * px
            dx[:, others] += scale * coef[:, :, None] * r[:, None, :]
    if cache.order is not None:
        flat = xp.empty_like(dx.reshape(N * K, D))
        flat[cache.order] = dx.reshape(N * K, D)
        dx = flat.reshape(N, K, D)
    return dx


class VarCache(NamedTuple):
    variant: str
    parts: tuple


def var_loss_forward(scores, topk_idx, variant="paper", *, valid_mask=None):
    N, E = scores.shape
    if variant == "paper":
        (S, _), tc = ops.topk_scores_forward(scores, topk_idx)
        dev = S - S.mean(axis=0, keepdims=True)                             # [N, E]
        return -(dev * dev).sum() / E, VarCache(variant, (dev, tc, E))
    if variant == "code":
        dev = scores - scores.mean(axis=1, keepdims=True)
        return -(dev * dev).sum() / ((E - 1) * N), VarCache(variant, (dev, N, E))
    if variant == "row_topk":
        (_, s_sel), tc = ops.topk_scores_forward(scores, topk_idx)
        K = s_sel.shape[1]
        dev = s_sel - s_sel.mean(axis=1, keepdims=True)
        return -(dev * dev).sum() / (K * N), VarCache(variant, (dev, tc, N, K))
    raise ValueError(variant)


def var_loss_backward(dloss, cache: VarCache):
    if cache.variant == "paper":
        dev, tc, E = cache.parts
        return ops.topk_scores_backward(dev * (-2.0 * dloss / E), tc)
    if cache.variant == "code":
        dev, N, E = cache.parts
        return dev * (-2.0 * dloss / ((E - 1) * N))
    dev, tc, N, K = cache.parts
    return ops.topk_scores_backward(None, tc, ds_sel=dev * (-2.0 * dloss / (K * N)))
