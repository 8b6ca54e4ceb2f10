r"""The released code's coefficient calibration: one power of ten per regulariser, chosen on the first batch.

Dimension letters: N tokens, D model width, E routed experts, K top-k.

In the authors' code (``MoEGate.compute_weight`` in ``Model/*/modeling_deepseek.py``) the config values
``ortho_loss_weight`` and ``variance_loss_weight`` are *targets*, not coefficients. On the first forward pass
of the first MoE layer, with no gradient, it measures two references and sets

.. math:: w = 10^{\mathrm{round}(\log_{10}(\mathrm{target} / \mathrm{reference}))}

once for the whole run (module-level globals: every layer and every later step reuses them). round is
round-half-to-even (``torch.round``; ``numpy.round`` is the same). The references:

- L_o: the span loss of the code evaluated on the router weight matrix W_r [E, D], not on expert outputs:
  the rows of W_r play the experts. For each of the first K rows w_a, the squared projection of w_a on a
  Gram-Schmidt basis (``v / (||v|| + eps)``, eps = 1e-6) of *all* the other E - 1 rows, averaged over the K:

  .. math:: R_o = \frac{1}{K} \sum_{a < K} \sum_{u \in GS(W_r \setminus w_a)} \| \langle u, w_a \rangle u \|^2

  (the code tiles W_r over the B sequences and divides by K B, which cancels). It does not depend on x.
- L_v: the mean over all N tokens (padding included) of the unbiased variance across the E experts of
  the full softmax ``softmax(x W_r^T)``, i.e. minus the ``code`` form of L_v:

  .. math:: R_v = \frac{1}{N} \sum_i \frac{1}{E - 1} \sum_j (P_{ij} - \bar P_i)^2

A zero target gives weight 0. Released targets: ortho 1e-4, variance 1e-3 (the three ``config.json``);
``aux_loss_alpha`` = 1e-3 is used as is, never rescaled.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import ops
from .backend import array_namespace
from .config import MoEConfig
from .checks import check_mask, mask_weights
from .losses.gram_schmidt import gram_schmidt_forward
from .objective import Objective, get_objective

RELEASED_ORTHO_TARGET = 1e-4
RELEASED_VAR_TARGET = 1e-3
GRAM_SCHMIDT_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# the two references
# ----------------------------------------------------------------------------------------------

def router_ortho_reference(w_router, top_k: int, eps: float = GRAM_SCHMIDT_EPS) -> float:
    """R_o of the module docstring: the code's span loss with the rows of W_r [E, D] as the "experts".

    Modified Gram-Schmidt over the other E - 1 rows in index order, each vector divided by its norm + eps,
    vectorised over the K target rows. Returns a Python float (a small device-to-host read).
    Numerics: with E - 1 >= D the later residuals are round-off divided by eps (as in the code).
    """
    xp = array_namespace(w_router)
    if w_router.ndim != 2:
        raise ValueError(f"w_router must be [E, D], got shape {tuple(w_router.shape)}")
    E, D = w_router.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k!r} must be an int in [1, E={E}]")
    K = top_k
    rows = np.arange(E)
    others = np.stack([np.delete(rows, a) for a in range(K)])          # [K, E-1] host indices
    others = xp.asarray(others) if xp is not np else others
    cols = [w_router[others[:, j]] for j in range(E - 1)]              # E-1 arrays [K, D]
    basis, _ = gram_schmidt_forward(cols, eps)                          # E-1 arrays [K, D]
    w_target = w_router[:K]                                             # [K, D]
    total = xp.zeros((), dtype=w_router.dtype)
    for u in basis:
        proj = (u * w_target).sum(axis=-1, keepdims=True) * u           # [K, D]
        total = total + (proj * proj).sum()
    return float(total) / K


def score_variance_reference(x, w_router, valid_mask=None) -> float:
    """R_v of the module docstring: mean over tokens of the unbiased variance of softmax(x W_r^T) [N, E].

    valid_mask  optional [N] bool; None (the released behaviour) averages over every token, padding included
    Returns a Python float. Numerics: two-pass variance.
    """
    xp = array_namespace(x, w_router)
    if x.ndim != 2 or w_router.ndim != 2 or x.shape[1] != w_router.shape[1]:
        raise ValueError(f"need x [N, D] and w_router [E, D], got {tuple(x.shape)} and {tuple(w_router.shape)}")
    N, E = x.shape[0], w_router.shape[0]
    if E < 2:
        raise ValueError("the unbiased variance across experts needs E >= 2")
    mask = check_mask(valid_mask, N, xp)
    logits, _ = ops.linear_forward(x, w_router)                         # [N, E]
    p, _ = ops.softmax_forward(logits)                                  # [N, E]
    centred = p - p.mean(axis=-1, keepdims=True)                        # [N, E]
    var = (centred * centred).sum(axis=-1) / (E - 1)                    # [N]
    if mask is None:
        return float(var.mean())
    m = mask_weights(mask, N, var.dtype, xp)
    return float((var * m).sum() / m.sum())


def power_of_ten(target: float, reference: float) -> tuple:
    """(weight, exponent): 10^round(log10(target / reference)), round half to even; (0.0, None) for target 0.

    Raises ValueError for a reference that is zero, negative or not finite (the released code would
    produce an infinite or NaN weight there).
    """
    if not math.isfinite(target) or target < 0:
        raise ValueError(f"target={target} must be finite and >= 0")
    if target == 0:
        return 0.0, None
    if not math.isfinite(reference) or reference <= 0:
        raise ValueError(f"reference={reference} must be finite and > 0 to calibrate a weight "
                         f"(target {target}); the power-of-ten rule is undefined there")
    exponent = int(np.round(np.log10(target / reference)))
    return 10.0 ** exponent, exponent


# ----------------------------------------------------------------------------------------------
# the helper
# ----------------------------------------------------------------------------------------------

class AutoscaleReport(NamedTuple):
    """Weights chosen by :func:`autoscale_weights` and what they were computed from."""
    beta: float                 # coefficient of L_o
    gamma: float                # coefficient of L_v
    ortho_reference: float      # R_o, measured on W_r
    var_reference: float        # R_v, measured on softmax(x W_r^T)
    ortho_target: float
    var_target: float
    ortho_exponent: int | None  # log10(beta), None when the target is 0
    var_exponent: int | None
    objective: Objective        # the input objective with beta and gamma filled in


def autoscale_weights(x, params: dict, cfg: MoEConfig, objective="authors_code", *, ortho_target=None,
                      var_target=None, valid_mask=None, eps: float = GRAM_SCHMIDT_EPS) -> AutoscaleReport:
    """Calibrate beta (L_o) and gamma (L_v) on one batch the way the released code does (opt-in).

    x             [N, D] the batch entering the layer (the code uses the first MoE layer's first batch)
    params, cfg   the layer; only ``params["w_router"]`` and ``cfg.top_k`` are read
    objective     preset name or Objective supplying the targets (default "authors_code": 1e-4, 1e-3)
    ortho_target, var_target  override the objective's targets
    valid_mask    optional [N] bool for R_v; None (the released behaviour) keeps padding tokens
    eps           Gram-Schmidt eps of R_o (1e-6 in the code)
    Returns an ``AutoscaleReport``; ``report.objective`` is ready for ``objective_forward_backward``.
    Call it once and reuse the weights for later batches and for every layer, as the code does.
    """
    obj = get_objective(objective)
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    if not isinstance(params, dict) or "w_router" not in params:
        raise ValueError("params must be the layer's parameter dict (with 'w_router')")
    w_router = params["w_router"]
    array_namespace(x, w_router)
    if tuple(w_router.shape) != (cfg.n_experts, cfg.d_model):
        raise ValueError(f"params['w_router'] has shape {tuple(w_router.shape)}, "
                         f"expected {(cfg.n_experts, cfg.d_model)}")
    ortho_target = obj.ortho_target if ortho_target is None else ortho_target
    var_target = obj.var_target if var_target is None else var_target
    if ortho_target is None or var_target is None:
        raise ValueError(f"objective {obj.name!r} has no calibration targets; pass ortho_target= and var_target= "
                         f"(released: {RELEASED_ORTHO_TARGET}, {RELEASED_VAR_TARGET})")
    r_o = router_ortho_reference(w_router, cfg.top_k, eps=eps)
    r_v = score_variance_reference(x, w_router, valid_mask=valid_mask)
    beta, e_o = power_of_ten(float(ortho_target), r_o)
    gamma, e_v = power_of_ten(float(var_target), r_v)
    calibrated = obj.replace(beta=beta, gamma=gamma, ortho_target=float(ortho_target),
                             var_target=float(var_target))
    return AutoscaleReport(beta, gamma, r_o, r_v, float(ortho_target), float(var_target), e_o, e_v, calibrated)
