"""Elementary ops of the MoE layer, each a pure forward/backward pair.

Dimension letters:
    N tokens, D model width, H expert hidden width, E routed experts, K selected experts per token,
    M rows fed to one SwiGLU (the tokens of one expert, or all N for the shared expert).

Every ``*_forward`` returns ``(out, cache)`` and every ``*_backward(dout, cache)`` returns one gradient per
differentiable input, in the forward's order. Integer inputs (expert indices) have zero gradient and get none.
The derivations are in ``theory/gradients.md``; ``tests/test_ops.py`` checks each one by finite differences.
"""
from __future__ import annotations

from typing import NamedTuple

from .backend import array_namespace


# ----------------------------------------------------------------------------------------------
# linear map  z = x @ W.T   (router logits: x [N, D], W [E, D] -> z [N, E])
# ----------------------------------------------------------------------------------------------

class LinearCache(NamedTuple):
    x: object        # [N, D]
    w: object        # [E, D]


def linear_forward(x, w):
    """z = x W^T.  x: [N, D], w: [E, D] -> z: [N, E]."""
    return x @ w.T, LinearCache(x, w)


def linear_backward(dz, cache):
    """dx = dz W, dW = dz^T x.  Returns (dx [N, D], dw [E, D])."""
    x, w = cache
    return dz @ w, dz.T @ x


# ----------------------------------------------------------------------------------------------
# softmax over the last axis
# ----------------------------------------------------------------------------------------------

def softmax_forward(z):
    r"""p = softmax(z) along the last axis.  z: [N, E] -> p: [N, E].

    .. math:: p_{ij} = e^{z_{ij} - m_i} / \sum_l e^{z_{il} - m_i},\quad m_i = \max_l z_{il}

    Numerics: max-shifted, so no overflow for large logits.
    """
    xp = array_namespace(z)
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp, p):
    r"""dz_ij = p_ij (dp_ij - \sum_l dp_il p_il).  Returns dz [N, E]."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# top-k selection (no gradient) and the gather of the selected scores
# ----------------------------------------------------------------------------------------------

def topk_indices(scores, k: int):
    """Indices of the k largest entries of each row, in descending order of score.  [N, E] -> [N, K] int64.

    Tie rule: among equal scores the lower expert index wins (a stable sort of -scores), on both backends.
    The selection is piecewise constant in the scores: it has zero gradient.
    """
    xp = array_namespace(scores)
    order = xp.argsort(-scores, axis=-1, kind="stable")
    return order[:, :k].astype(xp.int64)


class GatherCache(NamedTuple):
    idx: object      # [N, K] int64
    shape: tuple     # (N, E)


def gather_forward(scores, idx):
    """sel_ik = scores[i, idx_ik].  scores: [N, E], idx: [N, K] -> sel: [N, K]."""
    xp = array_namespace(scores)
    return xp.take_along_axis(scores, idx, axis=1), GatherCache(idx, tuple(scores.shape))


def gather_backward(d_sel, cache: GatherCache):
    """d_scores[i, idx_ik] = d_sel_ik, zero elsewhere (idx has distinct entries per row).  Returns [N, E]."""
    idx, shape = cache
    xp = array_namespace(d_sel)
    d_scores = xp.zeros(shape, dtype=d_sel.dtype)
    rows = xp.arange(shape[0])[:, None]  # [N, 1]
    d_scores[rows, idx] = d_sel  # plain assignment is exact: the K indices of a row are distinct
    return d_scores


# ----------------------------------------------------------------------------------------------
# renormalisation of the selected scores:  g_ik = sel_ik / sum_l sel_il
# ----------------------------------------------------------------------------------------------

class RenormCache(NamedTuple):
    g: object        # [N, K] renormalised scores
    z: object        # [N, 1] row sums of the selected scores


def renorm_forward(sel):
    r"""g_ik = sel_ik / Z_i, Z_i = \sum_l sel_il.  sel: [N, K] -> g: [N, K].

    Numerics: Z_i >= max_k sel_ik > 0 for softmax scores, so no eps is needed.
    """
    z = sel.sum(axis=1, keepdims=True)  # [N, 1]
    g = sel / z
    return g, RenormCache(g, z)


def renorm_backward(dg, cache: RenormCache):
    r"""d_sel_ik = (dg_ik - \sum_l dg_il g_il) / Z_i.  Returns d_sel [N, K]."""
    g, z = cache
    return (dg - (dg * g).sum(axis=1, keepdims=True)) / z


# ----------------------------------------------------------------------------------------------
# the post-top-k score matrix S of the paper (rows sum to 1, K non-zeros), built from scores and idx
# ----------------------------------------------------------------------------------------------

class TopkScoresCache(NamedTuple):
    gather: GatherCache
    renorm: RenormCache


def topk_scores_forward(scores, idx):
    """S_ij = P_ij / sum_{l in T_i} P_il for j in T_i, else 0 (paper Eq. 1).

    scores: [N, E] full softmax, idx: [N, K] -> (S [N, E], s_sel [N, K] the non-zero entries in slot order).
    """
    sel, gcache = gather_forward(scores, idx)
    s_sel, rcache = renorm_forward(sel)
    S = gather_backward(s_sel, gcache)  # scatter back into [N, E]
    return (S, s_sel), TopkScoresCache(gcache, rcache)


def topk_scores_backward(d_S, cache: TopkScoresCache, d_s_sel=None):
    """Gradient into the full scores from d_S [N, E] (only entries on the support matter) and/or d_s_sel [N, K]."""
    xp = array_namespace(d_S, d_s_sel)
    idx = cache.gather.idx
    d_sel = xp.take_along_axis(d_S, idx, axis=1) if d_S is not None else 0
    if d_s_sel is not None:
        d_sel = d_sel + d_s_sel
    return gather_backward(renorm_backward(d_sel, cache.renorm), cache.gather)


# ----------------------------------------------------------------------------------------------
# SwiGLU MLP:  out = (silu(x Wg) * (x Wu)) Wd
# ----------------------------------------------------------------------------------------------

class SwigluCache(NamedTuple):
    x: object        # [M, D]
    a: object        # [M, H]  x @ w_gate
    b: object        # [M, H]  x @ w_up
    sig: object      # [M, H]  sigmoid(a)
    h: object        # [M, H]  silu(a) * b
    w_gate: object   # [D, H]
    w_up: object     # [D, H]
    w_down: object   # [H, D]


def _sigmoid(xp, a):
    """Plain sigma(a) = 1 / (1 + e^{-a}) in two branches (the reading reference for :func:`sigmoid`)."""
    # Numerics: exp of -|a| never overflows; both branches agree where they meet.
    e = xp.exp(-xp.abs(a))
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid(a):
    """sigma(a) in one pass: SciPy's / CuPy's ``expit`` ufunc (same numerics as :func:`_sigmoid`, fewer temporaries)."""
    xp = array_namespace(a)
    if xp.__name__ == "numpy":
        from scipy.special import expit
    else:
        from cupyx.scipy.special import expit
    return expit(a)


def _mT(a):
    """Matrix transpose of the last two axes (a plain ``.T`` for 2-D; batched for [E, C, .] stacks)."""
    return a.swapaxes(-1, -2)


def swiglu_forward(x, w_gate, w_up, w_down):
    r"""SwiGLU expert.  x: [M, D], w_gate, w_up: [D, H], w_down: [H, D] -> out: [M, D].

    A leading batch axis is allowed on every argument (x: [E, C, D] with weights [E, D, H], [E, H, D]):
    the matmuls then run batched, one matrix product per expert.

    .. math:: a = x W_g,\; b = x W_u,\; h = \mathrm{silu}(a) \odot b,\; out = h W_d,\quad
              \mathrm{silu}(a) = a\,\sigma(a)
    """
    array_namespace(x, w_gate, w_up, w_down)
    a = x @ w_gate                      # [M, H]
    b = x @ w_up                        # [M, H]
    sig = sigmoid(a)                    # [M, H]
    h = a * sig                         # [M, H] silu(a)
    h *= b                              # [M, H] silu(a) * b, in place on a fresh array
    out = h @ w_down                    # [M, D]
    return out, SwigluCache(x, a, b, sig, h, w_gate, w_up, w_down)


def swiglu_backward(dout, cache: SwigluCache):
    r"""Returns (dx [M, D], dw_gate [D, H], dw_up [D, H], dw_down [H, D]) (batched like the forward).

    .. math:: dh = dout\,W_d^T,\; db = dh \odot \mathrm{silu}(a),\;
              da = dh \odot b \odot \sigma(a)(1 + a(1 - \sigma(a))) = dh \odot b \odot (\sigma + \mathrm{silu}(a)(1 - \sigma))
    """
    c = cache
    dw_down = _mT(c.h) @ dout                         # [H, D]
    dh = dout @ _mT(c.w_down)                         # [M, H]
    silu = c.a * c.sig                                # [M, H]
    db = dh * silu                                    # [M, H]
    dsilu = 1 - c.sig                                 # [M, H] built in place: sig + silu (1 - sig)
    dsilu *= silu
    dsilu += c.sig
    da = dh * c.b                                     # [M, H]
    da *= dsilu
    dw_gate = _mT(c.x) @ da                           # [D, H]
    dw_up = _mT(c.x) @ db                             # [D, H]
    dx = da @ _mT(c.w_gate)                           # [M, D]
    dx += db @ _mT(c.w_up)
    return dx, dw_gate, dw_up, dw_down
