r"""The ``span`` form of L_o (the authors' released code): projection of each slot on the span of the others.

Dimension letters: N tokens (groups), K slots per group, D model width. Every array below is batched over
the N tokens; the Python loops run over slots and basis vectors only (O(K^3) steps of [N, D] arithmetic).

For one token with slot outputs :math:`x_1..x_K` and each slot a, the other K-1 slots, in slot order, are
orthogonalised by modified Gram-Schmidt with the released code's normalisation

.. math:: w_j = x_{o_j} - \sum_{l<j} c_{jl}\, u_l \ \text{(sequentially, } c_{jl} = \langle u_l, v^{(l)}_j\rangle),
          \qquad u_j = \frac{w_j}{\lVert w_j\rVert + \epsilon}

and the slot's loss is the squared length of its projection on that basis,
:math:`\sum_l \lVert \langle u_l, x_a\rangle u_l\rVert^2 = \sum_l \langle u_l, x_a\rangle^2 \lVert u_l\rVert^2`.
The loss sums over slots and (valid) tokens and divides by K * N, as the code does.

Numerics: eps (default 1e-6, the code's constant) is absolute, in the units of the outputs. It makes every
u_l slightly shorter than 1 (length r/(r+eps)), so the value differs from the exact projection by a relative
O(eps/r); when a slot is (numerically) a combination of earlier ones its residual has length O(eps) and its
normalised u has length O(1), not 0: dependent slots stay finite (no NaN) but are over-counted (for two
identical slots u has length about 2/3, see ``theory/losses.md``). Gradients are then as large as ~1/eps.
The backward (``span_backward``) replays the Gram-Schmidt and runs it in reverse; ``theory/losses.md``
derives every step.
"""
from __future__ import annotations

from ..backend import array_namespace
from .gram_schmidt import dot, gram_schmidt_backward, gram_schmidt_forward


# ----------------------------------------------------------------------------------------------
# the span loss on a [N, K, D] buffer
# ----------------------------------------------------------------------------------------------

def _others(K, a):
    return [b for b in range(K) if b != a]


def span_per_token(A, eps: float):
    """sum over slots a of || Proj_{span(others)} A[:, a] ||^2 as the code computes it.  A: [N, K, D] -> [N]."""
    xp = array_namespace(A)
    N, K, _ = A.shape
    total = xp.zeros(N, dtype=A.dtype)
    for a in range(K):
        us, _ = gram_schmidt_forward([A[:, b] for b in _others(K, a)], eps)
        for u in us:
            p = dot(u, A[:, a])[:, 0]                          # [N]  <u_l, x_a>
            total = total + p * p * dot(u, u)[:, 0]             # ||p u||^2 = p^2 ||u||^2
    return total


def span_backward(g, A, eps: float):
    """Gradient of sum_i g_i * span_per_token(A)_i.  g: [N] weights, A: [N, K, D] -> dA [N, K, D]."""
    xp = array_namespace(A, g)
    N, K, _ = A.shape
    g = g[:, None]                                               # [N, 1]
    dA = xp.zeros_like(A)
    for a in range(K):
        others = _others(K, a)
        us, tape = gram_schmidt_forward([A[:, b] for b in others], eps)   # replay the forward
        x_a = A[:, a]
        dus = []
        for u in us:
            p, s = dot(u, x_a), dot(u, u)                      # [N, 1] each
            dp, ds = 2.0 * p * s * g, p * p * g                  # d(p^2 s) = 2 p s dp + p^2 ds
            dA[:, a] += dp * u
            dus.append(dp * x_a + 2.0 * ds * u)
        for b, dcol in zip(others, gram_schmidt_backward(dus, us, tape)):
            dA[:, b] += dcol
    return dA


# ----------------------------------------------------------------------------------------------
# closed-form cross-check (value only)
# ----------------------------------------------------------------------------------------------

def span_closed_form_per_token(A):
    r"""The exact projection form, eps = 0, by least squares on the other K-1 slots.  A: [N, K, D] -> [N].

    .. math:: \lVert \mathrm{Proj}_{O}\, x_a\rVert^2 = b^T (O O^T)^{-1} b,\qquad b = O x_a,

    with O [K-1, D] the other slots of the token. Requires those slots to be linearly independent (the
    Gram matrix is solved, not pseudo-inverted); used to cross-check ``span`` in the tests.
    """
    xp = array_namespace(A)
    N, K, _ = A.shape
    total = xp.zeros(N, dtype=A.dtype)
    for a in range(K):
        O = A[:, _others(K, a)]                                  # [N, K-1, D]
        if O.shape[1] == 0:
            continue
        gram = xp.einsum("nld,nmd->nlm", O, O)                   # [N, K-1, K-1]
        b = xp.einsum("nld,nd->nl", O, A[:, a])                  # [N, K-1]
        coef = xp.linalg.solve(gram, b[:, :, None])[:, :, 0]     # [N, K-1]
        total = total + (b * coef).sum(axis=1)
    return total
