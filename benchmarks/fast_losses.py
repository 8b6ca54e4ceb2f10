"""Vectorised L_o and L_v (forward + hand-derived backward) used by the benchmark when refmoe.losses.ortho /
refmoe.losses.variance are not installed, and proposed as their fast form.

No Python loop over tokens; L_o works on the per-token Gram matrix G = X X^T [N, K, K] (one batched product)
and, for the span forms, on its batched inverse (projection on the other K-1 slots by the Schur complement).

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
    # span: ||P_a x_a||^2 = G_aa - ||residual||^2 = G_aa - 1 / (G^{-1})_aa (Schur complement), so
    # L = 1/(K N) sum_i [tr G_i - sum_a 1 / (G_i^{-1})_aa]: one batched K x K inverse, no loop at all.
    M = xp.linalg.inv(G)                                                    # [N, K, K]
    m = xp.diagonal(M, axis1=1, axis2=2)                                    # [N, K]
    loss = (xp.trace(G, axis1=1, axis2=2) - (1.0 / m).sum(axis=1)).sum() / (K * N)
    return loss, OrthoCache(variant, x, (M, m), order)


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
        # dL/dG = (I - M diag(1 / m^2) M) / (K N)  (from dM = -M dG M); G = X X^T gives dX = 2 dG X
        M, m = cache.parts
        dG = xp.eye(K, dtype=x.dtype) - (M / (m * m)[:, None, :]) @ M      # [N, K, K] symmetric
        dx = (2.0 * dloss / (K * N)) * (dG @ x)                             # [N, K, D]
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
