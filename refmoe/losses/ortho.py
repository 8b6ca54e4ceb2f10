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

Global batch (data parallelism): ``pairwise`` is a plain sum over tokens, so the ranks' values add up to the
concatenated batch's as they are; ``span`` divides by K N, with N the global token count when ``totals``
(:func:`ortho_loss_totals` summed over the ranks) is given; ``span_code_grouping`` has no share per rank.

Numerics: ``pairwise`` writes each slot as x_k = 2^{e_k} b_k (max |b_k| in [1/2, 1), an exact rescaling) and
forms every term and gradient coefficient from the b's, putting the scale back with ``ldexp`` once; the
numbers are bitwise those of the direct formula wherever that one is finite, and they stay finite down to
the smallest outputs and up to where the value itself overflows (float32 agrees with float64 to ~1e-6
relative from 1e-30 to 1e15; tests/test_numerics.py).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_namespace
from ..checks import (all_finite, check_dloss, check_float_array, check_mask, check_topk, check_totals, mask_weights,
                      not_finite_error)
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

def _plain_parts(A, eps):
    """The formula as written: G, ||x_k||^2, the denominators, w_k and the off-diagonal mask."""
    xp = array_namespace(A)
    K = A.shape[1]
    G = xp.einsum("njd,nkd->njk", A, A)                          # [N, K, K]  Gram matrix per token
    nrm = xp.diagonal(G, axis1=1, axis2=2)                       # [N, K]     ||x_k||^2
    den = nrm + eps
    den = den + (den <= 0).astype(A.dtype)                       # 1 for a zero output with eps = 0 (w = 0 there)
    w = nrm / (den * den)                                        # [N, K]     ||x_k||^2 / (||x_k||^2 + eps)^2
    off = 1.0 - xp.eye(K, dtype=A.dtype)                         # [K, K]     j != k
    return G, nrm, den, w, off


# Outputs whose largest entry lies in PLAIN_RANGE in every slot keep every Gram entry, weight and weight
# derivative (the backward divides by (||x||^2 + eps)^3, a 6th power of the scale, and squares Gram entries of
# size D max|x|^2) inside the normal range of the dtype with room to spare: the formula as written then keeps
# its precision. Outside it (a zero, tiny or huge slot) the power-of-two rescaled form below runs; where both
# are finite they agree bit for bit.
PLAIN_RANGE = {"float32": (2.0 ** -15, 2.0 ** 15), "float64": (2.0 ** -100, 2.0 ** 100)}


def _in_plain_range(A) -> bool:
    xp = array_namespace(A)
    lo, hi = PLAIN_RANGE[A.dtype.name]
    amax = xp.abs(A).max(axis=2)                                 # [N, K]
    return bool(((amax >= lo) & (amax <= hi)).all())             # one small host read


class _PairwiseParts(NamedTuple):
    """Per-slot normalised quantities: x_k = 2^{e_k} b_k with max_d |b_kd| in [1/2, 1)."""
    e: object           # [N, K]     int exponents of the slot scales
    GB: object          # [N, K, K]  <b_j, b_k>   (|GB| <= D)
    wB: object          # [N, K]     nB_k / (nB_k + eps_k)^2,       eps_k = eps 2^{-2 e_k}, nB_k = <b_k, b_k>
    dwB: object         # [N, K]     (eps_k - nB_k) / (nB_k + eps_k)^3
    off: object         # [K, K]     1 for j != k


def _pairwise_parts(A, eps):
    r"""Scale every slot by a power of two (exact) so that no Gram entry, weight or derivative of the weight
    over- or underflows; then :math:`G_{jk} = 2^{e_j+e_k}\,GB_{jk}`, :math:`w_k = 2^{-2e_k}\,wB_k`,
    :math:`w'_k = 2^{-4e_k}\,dwB_k`, and the scales are put back with ``ldexp`` on each finished term."""
    with np.errstate(over="ignore", under="ignore"):             # the limits below are the intended ones
        return _pairwise_parts_scaled(A, eps)


def _pairwise_parts_scaled(A, eps):
    xp = array_namespace(A)
    K = A.shape[1]
    amax = xp.abs(A).max(axis=2)                                 # [N, K]
    _, e = xp.frexp(amax)                                        # max|x_k| < 2^e
    e = xp.where(amax > 0, e, -1100)                             # a zero slot: eps_k = +huge, so w = w' = 0 there
    B = xp.ldexp(A, -e[:, :, None])                              # [N, K, D] exact: a power-of-two scale
    GB = xp.einsum("njd,nkd->njk", B, B)                         # [N, K, K]
    nB = xp.diagonal(GB, axis1=1, axis2=2)                       # [N, K]
    fmax = float(np.finfo(A.dtype).max)
    eps_k = xp.minimum(xp.ldexp(xp.full(e.shape, eps, dtype=np.float64), -2 * e), fmax).astype(A.dtype)
    den = nB + eps_k
    den = den + (den <= 0).astype(A.dtype)                       # 1 for a zero output with eps = 0 (w = 0 there)
    wB = nB / (den * den)                                        # [N, K]  0 when eps_k >> nB (den^2 -> inf)
    dwB = (eps_k - nB) / (den * den * den)                       # [N, K]
    off = 1.0 - xp.eye(K, dtype=A.dtype)                         # [K, K]  j != k
    return _PairwiseParts(e, GB, wB, dwB, off)


def pairwise_per_token(A, eps: float):
    r"""sum_{j != k} G_jk^2 w_k per token.  A: [N, K, D] -> [N].

    .. math:: G_{jk}^2 w_k = 2^{2e_j}\, GB_{jk}^2\, wB_k

    Numerics: when some slot lies outside ``PLAIN_RANGE`` each term is formed from the normalised slots and
    scaled back once, so it overflows only when its own value does (outputs of 1e10 in float32 are fine; the
    value of 3e9 everywhere is 5.4e19).
    """
    if _in_plain_range(A):
        G, _, _, w, off = _plain_parts(A, eps)
        return (G * G * w[:, None, :] * off).sum(axis=(1, 2))
    p = _pairwise_parts(A, eps)
    xp = array_namespace(A)
    terms = p.GB * p.GB * p.wB[:, None, :] * p.off               # [N, K(j), K(k)]
    with np.errstate(over="ignore", under="ignore"):             # an overflow here is the value's own
        return xp.ldexp(terms, 2 * p.e[:, :, None]).sum(axis=(1, 2))


def pairwise_backward(g, A, eps: float):
    r"""Gradient of sum_i g_i * pairwise_per_token(A)_i.  g: [N], A: [N, K, D] -> dA [N, K, D].

    .. math:: \frac{\partial}{\partial x_m} = 2\sum_k (M_{mk} + M_{km})\, x_k + 2 q_m w'(G_{mm})\, x_m,
              \quad M_{jk} = [j\ne k] G_{jk} w_k,\ q_k = \sum_{j\ne k} G_{jk}^2,\ w'(n) = \frac{\epsilon - n}{(n+\epsilon)^3}

    On the normalised slots (x_k = 2^{e_k} b_k): M_{mk} x_k = 2^{e_m} GB_{mk} wB_k b_k,
    M_{km} x_k = 2^{2e_k - e_m} GB_{km} wB_m b_k, q_m w'_m x_m = \sum_j 2^{2e_j - e_m} GB_{jm}^2 dwB_m b_m.

    Numerics: every coefficient is scaled back with ``ldexp`` before it multiplies a normalised b, so a
    tiny output (1e-8 in float32, 1e-60 in float64, eps = 0) gives a finite gradient of its true size; an
    inf or NaN is left only where the gradient itself overflows (``ortho_loss_backward`` then raises). Inside
    ``PLAIN_RANGE`` the formula runs as written (the same numbers, a third of the work).
    """
    if _in_plain_range(A):
        xp = array_namespace(A, g)
        G, nrm, den, w, off = _plain_parts(A, eps)
        M = G * w[:, None, :] * off                              # [N, K, K]
        q = (G * G * off).sum(axis=1)                            # [N, K]  sum over targets j of G_jk^2
        dw = (eps - nrm) / (den * den * den)                     # [N, K]  d w_k / d ||x_k||^2
        dA = 2.0 * xp.einsum("njk,nkd->njd", M + xp.swapaxes(M, 1, 2), A) + 2.0 * (q * dw)[:, :, None] * A
        return g[:, None, None] * dA
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):   # see the Numerics line
        return _pairwise_backward_scaled(g, A, eps)


def _pairwise_backward_scaled(g, A, eps):
    xp = array_namespace(A, g)
    p = _pairwise_parts(A, eps)
    e = p.e
    B = xp.ldexp(A, -e[:, :, None])                              # [N, K, D]
    GBt = xp.swapaxes(p.GB, 1, 2)
    C = (xp.ldexp(p.GB * p.wB[:, None, :] * p.off, e[:, :, None])                    # M_mk x_k   [N, m, k]
         + xp.ldexp(GBt * p.wB[:, :, None] * p.off, 2 * e[:, None, :] - e[:, :, None]))  # M_km x_k
    qB = xp.ldexp(GBt * GBt * p.off, 2 * e[:, None, :] - 2 * e[:, :, None]).sum(axis=2)   # [N, m] q_m 2^{-4e_m}
    diag = xp.ldexp(qB * p.dwB, e)                                                     # [N, m] q_m w'_m 2^{e_m}
    # a slot far smaller than another (q_m 2^{-4e_m} overflows): scale each term back alone; elsewhere the
    # line above keeps the rounding of the unscaled formula (bitwise equal where that one was finite)
    each = xp.ldexp(GBt * GBt * p.dwB[:, :, None] * p.off, 2 * e[:, None, :] - e[:, :, None]).sum(axis=2)
    diag = xp.where(xp.isfinite(qB), diag, each)
    dA = 2.0 * xp.einsum("nmk,nkd->nmd", C, B) + 2.0 * diag[:, :, None] * B
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

NO_SHARE_PER_RANK = ("ortho variant 'span_code_grouping' groups the rows of its own batch expert-major; on a "
                     "concatenated batch the groups mix the parts' rows, so it has no share per rank "
                     "(use 'span' or 'pairwise' in a data-parallel group)")


def ortho_loss_totals(expert_out, variant: str = "pairwise", *, valid_mask=None):
    """The sums over this batch that ``variant`` normalises by, a float64 array on the input's backend:
    ``pairwise`` none ([0]: a plain sum over tokens, so the shares of a data-parallel group add up with no
    communication), ``span`` [1], the number of valid tokens N (it divides by K N). ``span_code_grouping`` has
    none: it groups the rows of one batch expert-major, and the groups of a concatenated batch mix the rows
    of its parts, so its value is not a sum of per-part values (ValueError)."""
    if variant == "span_code_grouping":
        raise ValueError(NO_SHARE_PER_RANK)
    if variant not in ORTHO_VARIANTS:
        raise ValueError(f"variant={variant!r} is not an L_o form; expected one of {list(ORTHO_VARIANTS)}")
    xp = check_float_array(expert_out, "expert_out", "[N, K, D]")
    mask = check_mask(valid_mask, expert_out.shape[0], xp, allow_all_padding=True)
    valid = mask_weights(mask, expert_out.shape[0], np.float64, xp)            # [N]
    return valid.sum().reshape(1) if variant == "span" else xp.zeros(0, dtype=np.float64)


def ortho_loss_forward(expert_out, variant: str = "pairwise", *, eps=None, topk_idx=None, valid_mask=None,
                       totals=None):
    """L_o of the unweighted expert outputs ``expert_out`` [N, K, D] (``MoECache.expert_out``).

    variant     one of ORTHO_VARIANTS (see the module docstring)
    eps         None for the variant's default (ORTHO_VARIANTS: pairwise 1e-12, span forms 1e-6); else >= 0
    topk_idx    [N, K] expert ids (``MoECache.topk_idx``); required by ``span_code_grouping`` only
    valid_mask  optional [N] bool, True = real token
    totals      None, or :func:`ortho_loss_totals` summed over the ranks of a data-parallel group: the loss is
                then this batch's share of the concatenated batch's (this batch may be all padding)
    Returns (loss, cache); loss is a 0-d array on the input's backend and dtype.
    Numerics: ``pairwise`` is computed on power-of-two normalised slots (no over- or underflow short of the
    value's own); a value that still overflows raises ValueError naming ``expert_out``.
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
    mask = check_mask(valid_mask, N, xp, allow_all_padding=totals is not None)
    valid = mask_weights(mask, N, expert_out.dtype, xp)                        # [N]
    n_valid = valid.sum()
    if totals is not None:
        if variant == "span_code_grouping":
            raise ValueError(NO_SHARE_PER_RANK)
        totals = check_totals(totals, (1,) if variant == "span" else (0,), xp, "ortho_loss_totals")
        if variant == "span":
            n_valid = totals[0].astype(expert_out.dtype)         # the global batch's token count

    order = None
    if variant == "pairwise":
        weights = valid                                          # a plain sum over valid tokens
        with np.errstate(over="ignore"):                       # a non-finite loss raises below
            loss = (weights * pairwise_per_token(expert_out, eps)).sum()
    elif variant == "span":
        weights = valid / (K * n_valid)
        with np.errstate(over="ignore", invalid="ignore"):      # a non-finite loss raises below
            loss = (weights * span_per_token(expert_out, eps)).sum()
    else:
        order = code_grouping_order(topk_idx, mask)              # [N_v*K]
        grouped = _grouped(expert_out, order)                    # [N_v, K, D]
        weights = xp.full(grouped.shape[0], 1.0 / (K * grouped.shape[0]), dtype=expert_out.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            loss = (weights * span_per_token(grouped, eps)).sum()
    if not bool(xp.isfinite(loss)):
        raise not_finite_error(f"L_o ({variant}) = {float(loss)}", {"expert_out": expert_out}, expert_out.dtype)
    return loss, OrthoCache(variant, eps, expert_out, weights, order)


def ortho_loss_backward(dloss, cache: OrthoCache):
    """d_expert_out [N, K, D]: the gradient of ``dloss * L_o`` w.r.t. the unweighted expert outputs.

    dloss  a finite real number or 0-d array (cast to the cache's dtype); anything else raises
    The top-k indices (used by ``span_code_grouping`` to regroup) are integers: zero gradient, none returned.
    Numerics: ValueError naming ``dloss`` and ``expert_out`` when the gradient overflows.
    """
    A = cache.expert_out
    xp = array_namespace(A)
    dloss = check_dloss(dloss, A)
    g = cache.weights * dloss                                    # [N] (or [N_v] grouped rows)
    if cache.variant == "pairwise":
        dA = pairwise_backward(g, A, cache.eps)
    elif cache.variant == "span":
        with np.errstate(over="ignore", invalid="ignore"):      # a non-finite gradient raises below
            dA = span_backward(g, A, cache.eps)
    else:
        N, K, D = A.shape
        with np.errstate(over="ignore", invalid="ignore"):
            d_grouped = span_backward(g, _grouped(A, cache.order), cache.eps)  # [N_v, K, D]
        d_flat = xp.zeros((N * K, D), dtype=A.dtype)
        d_flat[cache.order] = d_grouped.reshape(-1, D)           # a permutation of distinct rows: no duplicates
        dA = d_flat.reshape(N, K, D)
    if not all_finite(xp, dA):
        raise not_finite_error(f"d_expert_out of L_o ({cache.variant})", {"dloss": dloss, "expert_out": A}, A.dtype)
    return dA


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
    K = expert_out.shape[1]
    G = xp.einsum("njd,nkd->njk", expert_out, expert_out)        # [N, K, K]
    den = xp.diagonal(G, axis1=1, axis2=2) + eps                 # [N, K]
    den = den + (den <= 0).astype(expert_out.dtype)
    off = 1.0 - xp.eye(K, dtype=expert_out.dtype)
    coef = G * off / den[:, None, :]                             # [N, K(j), K(k)]  G_jk / (||x_k||^2 + eps)
    return xp.einsum("njk,nkd->njd", coef, expert_out)
