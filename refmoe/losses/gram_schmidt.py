r"""Modified Gram-Schmidt with the released code's normalisation v / (||v|| + eps), batched, and its reverse.

Dimension letters: N rows orthogonalised at once (tokens, or the K target rows of the weight calibration),
D vector width, m vectors in the basis.

.. math:: w_j = x_j - \sum_{l<j} c_{jl}\, u_l \ \text{(sequentially, } c_{jl} = \langle u_l, v^{(l)}_j\rangle),
          \qquad u_j = \frac{w_j}{\lVert w_j\rVert + \epsilon}

Used by the ``span`` form of L_o (``ortho_span.py``) and by the released weight calibration
(``refmoe.autoscale``). ``theory/losses.md`` derives the reverse.
"""
from __future__ import annotations

from ..backend import array_namespace


def dot(a, b):
    return (a * b).sum(axis=-1, keepdims=True)                       # [N, 1]


def safe_inverse(r):
    """1/r where r > 0, else 0 (the norm is not differentiable at 0; 0 is the subgradient refmoe takes).
    Written with arithmetic on r's dtype only, so float32 stays float32 on both backends."""
    pos = (r > 0).astype(r.dtype)
    return pos / (r + (1.0 - pos))


# ----------------------------------------------------------------------------------------------
# modified Gram-Schmidt with v / (||v|| + eps), batched over tokens, and its reverse
# ----------------------------------------------------------------------------------------------

def gram_schmidt_forward(cols, eps: float, dot=dot):
    """cols: list of m arrays [N, D] (in order) -> (us: list of m arrays [N, D], tape for the backward).
    ``dot(a, b) -> [N, 1]``: how the row dot products are summed (``refmoe.fast`` passes a batched product)."""
    xp = array_namespace(*cols)
    us, tape = [], []
    for x in cols:
        v, steps = x, []
        for u in us:                                # v^{(l+1)} = v^{(l)} - <u_l, v^{(l)}> u_l
            c = dot(u, v)                          # [N, 1]
            steps.append((v, c))
            v = v - c * u
        r = xp.sqrt(dot(v, v))                     # [N, 1]  ||w||
        den = r + eps
        u = v * safe_inverse(den)              # w / (||w|| + eps); 0 when w = 0 and eps = 0
        tape.append((steps, v, r, den))
        us.append(u)
    return us, tape


def gram_schmidt_backward(dus, us, tape, dot=dot):
    """Reverse of :func:`gram_schmidt_forward`: dus (list of m [N, D]) -> dcols (list of m [N, D])."""
    dus = list(dus)
    dcols = [None] * len(us)
    for j in reversed(range(len(us))):              # u_j is complete: later vectors were handled first
        steps, w, r, den = tape[j]
        du = dus[j]
        inv_den = safe_inverse(den)
        # u = w / (r + eps), r = ||w||:  dw = du/(r+eps) - <du, w>/(r+eps)^2 * w/r
        dw = du * inv_den - dot(du, w) * inv_den * inv_den * (w * safe_inverse(r))
        for l in reversed(range(j)):                # v^{(l+1)} = v^{(l)} - c u_l,  c = <u_l, v^{(l)}>
            v_l, c = steps[l]
            dc = -dot(dw, us[l])
            dus[l] = dus[l] - c * dw + dc * v_l
            dw = dw + dc * us[l]
        dcols[j] = dw
    return dcols
