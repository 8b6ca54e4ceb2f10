r"""A fast form of refmoe.losses.ortho through the per-token Gram matrix (same function, same eps semantics).

Dimension letters: N tokens, K slots, D model width.

Both L_o forms depend on the expert outputs only through the per-token Gram matrix G = A A^T [N, K, K]:

* ``pairwise`` already is a formula in G. The fast form keeps G from the forward (the backward does not
  form it again).
* ``span`` (the released Gram-Schmidt) uses only inner products of the K slot vectors, so it gives the same
  value on ANY K vectors with the same Gram matrix. The rows of the Cholesky factor L (G = L L^T) are such
  vectors, of length K instead of D: the released Gram-Schmidt (``ortho_span.span_per_token`` /
  ``span_backward``, unchanged, eps included) runs on [N, K, K] instead of [N, K, D], D/K times less work
  (341x at D = 2048, K = 6), and the K runs (one per slot) are batched into one run over N*K groups
  (``span_kernels.ref_span_runs``, the reference of the span kernels), so the number of array operations no
  longer grows with K (what bounds it on a GPU). The gradient comes back through the Cholesky factorisation,

  .. math:: \bar G = L^{-T}\,\Phi\,L^{-1},\quad \Phi = \tfrac12(T + \mathrm{tril}(T, -1)^T),\quad
            T = \mathrm{tril}(L^T \bar L),\qquad \bar A = 2 \bar G A

  (the symmetric-input Cholesky adjoint, as in Murray 2016). The small [N, K, K] work runs in float64.

Numerics: forming G squares the condition number of the K slot vectors; with nearly parallel outputs in
float32 (cos ~ 0.999) expect ~1e-4 relative error instead of ~1e-6 from Gram-Schmidt on A. When the
factorisation fails (dependent slots: G singular) the caller falls back to the Gram-Schmidt on A.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_namespace
from ..checks import check_float_array, check_mask, mask_weights
from ..losses import ortho as ref
from ..losses.ortho_span import span_backward, span_per_token
from .span_kernels import ref_span_runs, ref_span_runs_backward


def gram(A):
    """G = A A^T per token.  A: [N, K, D] -> [N, K, K]."""
    return A @ A.swapaxes(1, 2)


def _cholesky_rows(G64):
    """L with G = L L^T (rows of L reproduce G), or None when G is not positive definite."""
    xp = array_namespace(G64)
    try:
        L = xp.linalg.cholesky(G64)
    except np.linalg.LinAlgError:
        return None
    # CuPy's batched potrf does not raise: check the factor (finite, positive diagonal, reproduces G)
    if not bool(xp.isfinite(L).all()) or not bool((xp.diagonal(L, axis1=1, axis2=2) > 0).all()):
        return None
    resid = float(abs(L @ L.swapaxes(1, 2) - G64).max())
    return L if resid <= 1e-10 * float(abs(G64).max()) else None


def span_per_token_fast(A, eps):
    """Same as ``ortho_span.span_per_token(A, eps)``; returns (per_token [N], L or None)."""
    xp = array_namespace(A)
    L = _cholesky_rows(gram(A).astype(xp.float64)) if A.shape[1] > 1 else None   # K = 1: no other slot
    if L is None:
        return span_per_token(A, eps), None
    per_token, runs = ref_span_runs(xp, L, eps)                          # the K runs batched over N*K groups
    return per_token.astype(A.dtype), (L, runs)


def span_backward_fast(g, A, L, eps):
    """Same as ``ortho_span.span_backward(g, A, eps)`` given the factor L of :func:`span_per_token_fast`."""
    xp = array_namespace(A)
    if L is None:
        return span_backward(g, A, eps)
    L, runs = L
    dL = ref_span_runs_backward(xp, g.astype(xp.float64), runs, L.shape[1])   # [N, K, K] on the rows of L
    T = xp.tril(L.swapaxes(1, 2) @ dL)
    phi = 0.5 * (T + xp.tril(T, -1).swapaxes(1, 2))
    Linv = xp.linalg.inv(L)                                              # [N, K, K] small, batched
    dG = Linv.swapaxes(1, 2) @ phi @ Linv                                # [N, K, K] symmetric
    return 2.0 * xp.einsum("njk,nkd->njd", dG.astype(A.dtype), A)       # [N, K, D]


def ortho_loss_forward(expert_out, variant="pairwise", *, eps=None, topk_idx=None, valid_mask=None):
    """``refmoe.losses.ortho.ortho_loss_forward`` with the fast inner parts (same arguments, same checks)."""
    if variant not in ref.ORTHO_VARIANTS:
        raise ValueError(f"variant={variant!r} is not an L_o form; expected one of {ref.ORTHO_VARIANTS}")
    if variant == "span_code_grouping" and topk_idx is None:
        raise ValueError("variant='span_code_grouping' needs topk_idx (the layer's MoECache.topk_idx)")
    xp = check_float_array(expert_out, "expert_out", "[N, K, D]")
    N, K, _ = expert_out.shape
    eps = ref.ORTHO_VARIANTS[variant].default_eps if eps is None else float(eps)
    mask = check_mask(valid_mask, N, xp)
    valid = mask_weights(mask, N, expert_out.dtype, xp)
    if variant == "pairwise":
        G = gram(expert_out)
        d = xp.diagonal(G, axis1=1, axis2=2)                                 # [N, K]
        den = d + eps
        den = xp.where(den > 0, den, 1.0)
        w = d / (den * den)
        off = 1.0 - xp.eye(K, dtype=expert_out.dtype)
        loss = (valid * ((G * G * off) * w[:, None, :]).sum(axis=(1, 2))).sum()
        return loss, (variant, eps, expert_out, valid, (G, d, den, w, off), None, expert_out.shape)
    order = None
    A = expert_out
    if variant == "span":
        weights = valid / (K * valid.sum())
    else:
        order = ref.code_grouping_order(topk_idx, mask)
        A = ref._grouped(expert_out, order)
        weights = xp.full(A.shape[0], 1.0 / (K * A.shape[0]), dtype=expert_out.dtype)
    per_token, L = span_per_token_fast(A, eps)
    return (weights * per_token).sum(), (variant, eps, A, weights, L, order, expert_out.shape)


def ortho_loss_backward(dloss, cache):
    variant, eps, A, weights, parts, order, (N, K, D) = cache
    K = A.shape[1]
    xp = array_namespace(A)
    g = weights * dloss
    if variant == "pairwise":
        G, d, den, w, off = parts
        M = G * w[:, None, :] * off                                          # [N, K, K]
        q = (G * G * off).sum(axis=1)                                        # [N, K]
        dw = (eps - d) / (den * den * den)
        # dA = 2 (M + M^T + diag(q w')) A, scaled per token by g: one pass over A
        C = M + M.swapaxes(1, 2) + xp.eye(K, dtype=A.dtype) * (q * dw)[:, :, None]
        return xp.einsum("njk,nkd->njd", (2.0 * g)[:, None, None] * C, A)
    dA = span_backward_fast(g, A, parts, eps)
    if order is None:
        return dA
    d_flat = xp.zeros((N * K, D), dtype=A.dtype)
    d_flat[order] = dA.reshape(-1, D)
    return d_flat.reshape(N, K, D)
