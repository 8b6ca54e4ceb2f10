r"""The orthogonality loss L_o on the unweighted expert outputs, in three forms, as one forward/backward pair.

Dimension letters: N tokens, K selected experts per token (slots), D model width, E routed experts.
Input: the layer's token-major buffer ``expert_out`` [N, K, D], slot k of token i holding
:math:`\tilde x_{ik} = E_{T_{ik}}(x_i)` (not multiplied by the gate). The backward returns ``d_expert_out``
[N, K, D], which ``moe_backward(..., d_expert_out=...)`` chains into the expert parameters and x. L_o never
reaches the router: its only dependence on the scores is the hard top-k choice (zero gradient).

Variants (``theory/losses.md`` derives each backward):

``pairwise``  (paper Eq. 6) per token, over ordered pairs of distinct slots, summed over tokens, no
              normalisation:

.. math:: L_o = \sum_i \sum_{j \ne k} \Big\lVert \frac{\langle x_j, x_k\rangle}{\langle x_k, x_k\rangle + \epsilon}\,
          x_k \Big\rVert^2 = \sum_i \sum_{j\ne k} G_{jk}^2\, \frac{G_{kk}}{(G_{kk}+\epsilon)^2},
          \qquad G_{jk} = \langle x_{ij}, x_{ik}\rangle

              The paper leaves eps unspecified; refmoe's default is 1e-12 = (1e-6)^2, since eps sits next to a
              squared norm: it switches the term off below an output norm of about 1e-6, the same length
              scale as the 1e-6 that ``span`` adds to a norm. eps = 0 is allowed (a zero output then counts 0).

``span``      (the released code, ``compute_ortho_loss``) for each slot, the squared length of its projection
              on the span of the other K-1 slots, basis by Gram-Schmidt with v / (||v|| + eps), eps = 1e-6,
              summed over slots and tokens and divided by K * N (``ortho_span.py``). Equal to ``pairwise``
              / (K N) up to eps when each slot's other slots are mutually orthogonal (always when K = 2).

``span_code_grouping``  COMPATIBILITY MODE, not the paper's loss. The released training code concatenates
              the per-expert output blocks in expert-major order (expert 0's rows, in token order, then
              expert 1's, ...) and reshapes that [N*K, D] stack to [N, K, D]; ``span`` is then applied to
              groups of K consecutive rows, which are mostly K *different tokens* of the same expert instead
              of the K experts of one token. Use it only to reproduce the released numbers; needs ``topk_idx``.
              Worked example, N = 4, E = 4, K = 2, topk_idx = [[0, 1], [2, 0], [1, 3], [0, 2]]: the
              expert-major stack is E0(x0), E0(x1), E0(x3), E1(x0), E1(x2), E2(x1), E2(x3), E3(x2), so the
              groups are {E0(x0), E0(x1)}, {E0(x3), E1(x0)}, {E1(x2), E2(x1)}, {E2(x3), E3(x2)}; the paper's
              groups are {E0(x0), E1(x0)}, {E2(x1), E0(x1)}, {E1(x2), E3(x2)}, {E0(x3), E2(x3)}.

``valid_mask`` (True = real token) drops padding tokens: their terms vanish and N counts valid tokens only;
for ``span_code_grouping`` the padding rows are removed before the regrouping (the released code has no
mask: pass None to reproduce it). K = 1 gives 0 with a zero gradient in every form.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_namespace
from ..checks import check_float_array, check_mask, check_topk, mask_weights
from .ortho_span import span_backward, span_per_token

class OrthoVariant(NamedTuple):
    default_eps: float
    released_grouping: bool     # True: regroup the rows expert-major first, as the released code does


ORTHO_VARIANTS: dict[str, OrthoVariant] = {
    "pairwise": OrthoVariant(1e-12, False),
    "span": OrthoVariant(1e-6, False),
    "span_code_grouping": OrthoVariant(1e-6, True),
}


class OrthoCache(NamedTuple):
    variant: str
    eps: float
    expert_out: object      # [N, K, D] the input
    weights: object         # [N] per-token weight of the per-token loss (0 for padding); [N_v] grouped rows
    order: object           # span_code_grouping: [N_v*K] flat (token, slot) rows in released order, else None


# ----------------------------------------------------------------------------------------------
# pairwise (paper Eq. 6)
# ----------------------------------------------------------------------------------------------

def _pairwise_parts(A, eps):
    xp = array_namespace(A)
    K = A.shape[1]
    G = xp.einsum("njd,nkd->njk", A, A)                          # [N, K, K]  Gram matrix per token
    nrm = xp.diagonal(G, axis1=1, axis2=2)                       # [N, K]     ||x_k||^2
    den = nrm + eps
    den = den + (den <= 0).astype(A.dtype)                       # 1 for a zero output with eps = 0 (w = 0 there)
    w = nrm / (den * den)                                        # [N, K]     ||x_k||^2 / (||x_k||^2 + eps)^2
    off = 1.0 - xp.eye(K, dtype=A.dtype)                         # [K, K]     j != k
    return G, nrm, den, w, off


def pairwise_per_token(A, eps: float):
    """sum_{j != k} G_jk^2 w_k per token.  A: [N, K, D] -> [N]."""
    G, _, _, w, off = _pairwise_parts(A, eps)
    return (G * G * w[:, None, :] * off).sum(axis=(1, 2))


def pairwise_backward(g, A, eps: float):
    r"""Gradient of sum_i g_i * pairwise_per_token(A)_i.  g: [N], A: [N, K, D] -> dA [N, K, D].

    .. math:: \frac{\partial}{\partial x_m} = 2\sum_k (M_{mk} + M_{km})\, x_k + 2 q_m w'(G_{mm})\, x_m,
              \quad M_{jk} = [j\ne k] G_{jk} w_k,\ q_k = \sum_{j\ne k} G_{jk}^2,\ w'(n) = \frac{\epsilon - n}{(n+\epsilon)^3}
    """
    xp = array_namespace(A, g)
    G, nrm, den, w, off = _pairwise_parts(A, eps)
    M = G * w[:, None, :] * off                                  # [N, K, K]
    q = (G * G * off).sum(axis=1)                                # [N, K]  sum over targets j of G_jk^2
    dw = (eps - nrm) / (den * den * den)                         # [N, K]  d w_k / d ||x_k||^2
    dA = 2.0 * xp.einsum("njk,nkd->njd", M + xp.swapaxes(M, 1, 2), A) + 2.0 * (q * dw)[:, :, None] * A
    return g[:, None, None] * dA


# ----------------------------------------------------------------------------------------------
# the released grouping
# ----------------------------------------------------------------------------------------------

def code_grouping_order(topk_idx, valid_mask=None):
    """Flat (token, slot) row ids [N_v*K] in the order the released code stacks them (expert-major,
    tokens in order within an expert); padding rows dropped. Row r of the stack is flat row order[r]."""
    xp = array_namespace(topk_idx)
    N, K = topk_idx.shape
    flat = topk_idx.reshape(-1)                                  # [N*K]
    if valid_mask is None:
        rows = xp.arange(N * K)
    else:
        rows = xp.nonzero(xp.repeat(valid_mask, K))[0]           # flat rows of valid tokens, in order
    return rows[xp.argsort(flat[rows], kind="stable")]           # one expert after another, token order kept


def _grouped(A, order):
    K, D = A.shape[1], A.shape[2]
    return A.reshape(-1, D)[order].reshape(-1, K, D)             # [N_v, K, D]


# ----------------------------------------------------------------------------------------------
# forward / backward
# ----------------------------------------------------------------------------------------------

def ortho_loss_forward(expert_out, variant: str = "pairwise", *, eps=None, topk_idx=None, valid_mask=None):
    """L_o of the unweighted expert outputs ``expert_out`` [N, K, D] (``MoECache.expert_out``).

    variant     one of ORTHO_VARIANTS (see the module docstring)
    eps         None for the variant's default (ORTHO_VARIANTS: pairwise 1e-12, span forms 1e-6); else >= 0
    topk_idx    [N, K] expert ids (``MoECache.topk_idx``); required by ``span_code_grouping`` only
    valid_mask  optional [N] bool, True = real token
    Returns (loss, cache); loss is a 0-d array on the input's backend and dtype.
    """
    if variant not in ORTHO_VARIANTS:
        raise ValueError(f"variant={variant!r} is not an L_o form; expected one of {list(ORTHO_VARIANTS)}")
    xp = check_float_array(expert_out, "expert_out", "[N, K, D]")
    N, K, _ = expert_out.shape
    if eps is None:
        eps = ORTHO_VARIANTS[variant].default_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    eps = float(eps)
    if topk_idx is not None:
        if tuple(topk_idx.shape) != (N, K):
            raise ValueError(f"topk_idx must be [N={N}, K={K}] like expert_out, got {tuple(topk_idx.shape)}")
        check_topk(topk_idx, N, max(K, int(topk_idx.max()) + 1), xp)
    elif variant == "span_code_grouping":
        raise ValueError("variant='span_code_grouping' needs topk_idx (the layer's MoECache.topk_idx)")
    mask = check_mask(valid_mask, N, xp)
    valid = mask_weights(mask, N, expert_out.dtype, xp)                        # [N]
    n_valid = valid.sum()

    order = None
    if variant == "pairwise":
        weights = valid                                          # a plain sum over valid tokens
        loss = (weights * pairwise_per_token(expert_out, eps)).sum()
    elif variant == "span":
        weights = valid / (K * n_valid)
        loss = (weights * span_per_token(expert_out, eps)).sum()
    else:
        order = code_grouping_order(topk_idx, mask)              # [N_v*K]
        grouped = _grouped(expert_out, order)                    # [N_v, K, D]
        weights = xp.full(grouped.shape[0], 1.0 / (K * grouped.shape[0]), dtype=expert_out.dtype)
        loss = (weights * span_per_token(grouped, eps)).sum()
    return loss, OrthoCache(variant, eps, expert_out, weights, order)


def ortho_loss_backward(dloss, cache: OrthoCache):
    """d_expert_out [N, K, D]: the gradient of ``dloss * L_o`` w.r.t. the unweighted expert outputs.

    The top-k indices (used by ``span_code_grouping`` to regroup) are integers: zero gradient, none returned.
    """
    A, g = cache.expert_out, cache.weights * dloss
    if cache.variant == "pairwise":
        return pairwise_backward(g, A, cache.eps)
    if cache.variant == "span":
        return span_backward(g, A, cache.eps)
    xp = array_namespace(A)
    N, K, D = A.shape
    d_grouped = span_backward(g, _grouped(A, cache.order), cache.eps)      # [N_v, K, D]
    d_flat = xp.zeros((N * K, D), dtype=A.dtype)
    d_flat[cache.order] = d_grouped.reshape(-1, D)               # a permutation of distinct rows: no duplicates
    return d_flat.reshape(N, K, D)


# ----------------------------------------------------------------------------------------------
# the gradient the paper prints (Eq. 8), for comparison only
# ----------------------------------------------------------------------------------------------

def paper_eq8_gradient(expert_out, eps: float = 0.0):
    r"""Eq. 8 with beta = 1: :math:`\sum_{k\ne j} x_k x_k^T x_j / (\langle x_k, x_k\rangle + \epsilon)`.  [N, K, D].

    Not used by any backward. The exact gradient of Eq. 6 (``ortho_loss_backward``, eps -> 0) is
    :math:`\sum_{k\ne j} [2 x_k x_k^T x_j/\lVert x_k\rVert^2 + 2 x_k x_k^T x_j/\lVert x_j\rVert^2
    - 2 (x_k^T x_j)^2 x_j/\lVert x_j\rVert^4]`: Eq. 8 drops the factor 2 and the terms where x_j is the
    base of the projection, the vector projected onto (see ``theory/losses.md``).
    """
    xp = check_float_array(expert_out, "expert_out", "[N, K, D]")
    G, nrm, den, _, off = _pairwise_parts(expert_out, eps)
    coef = G * off / den[:, None, :]                             # [N, K(j), K(k)]  G_jk / (||x_k||^2 + eps)
    return xp.einsum("njk,nkd->njd", coef, expert_out)
