"""Input checks shared by the losses (public-boundary errors, never NaN or silent broadcasting)."""
from __future__ import annotations

import numpy as np

from ..backend import array_namespace


def check_scores(scores, name="scores"):
    """scores: [N, E] float rows of a softmax (non-negative, summing to 1)."""
    xp = array_namespace(scores)
    if scores.ndim != 2:
        raise ValueError(f"{name} must be [N, E], got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError(f"{name} has N=0 tokens")
    if scores.dtype.type not in (np.float32, np.float64):
        raise TypeError(f"{name} has dtype {scores.dtype}; use float32 or float64")
    if not bool(xp.isfinite(scores).all()):
        raise ValueError(f"{name} contains NaN or inf")
    # Loose on purpose: finite-difference checks step off the simplex by ~1e-6, while logits (the
    # mistake this guards against) have negative entries and row sums far from 1.
    tol = 1e-3
    row_err = float(xp.abs(scores.sum(axis=1) - 1).max())
    if float(scores.min()) < -tol or row_err > tol:
        raise ValueError(
            f"{name} rows must be probabilities summing to 1 (max deviation {row_err:.2e}); "
            "pass the softmax scores from the layer's cache, not logits")
    return xp


def check_topk(topk_idx, n_tokens: int, n_experts: int, xp):
    """topk_idx: [N, K] integer expert ids, in range and distinct within each row."""
    array_namespace(topk_idx, xp.zeros(0))
    if topk_idx.ndim != 2 or topk_idx.shape[0] != n_tokens:
        raise ValueError(f"topk_idx must be [N={n_tokens}, K], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype.kind not in "iu":
        raise TypeError(f"topk_idx must hold integers, got {topk_idx.dtype}")
    K = topk_idx.shape[1]
    if not 1 <= K <= n_experts:
        raise ValueError(f"topk_idx has K={K} columns; need 1 <= K <= n_experts={n_experts}")
    if bool((topk_idx < 0).any()) or bool((topk_idx >= n_experts).any()):
        raise ValueError(f"topk_idx has entries outside [0, {n_experts})")
    srt = xp.sort(topk_idx, axis=1)
    if K > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("topk_idx repeats an expert within a row")


def check_mask(valid_mask, n_tokens: int, xp):
    """valid_mask: [N] bool, True = real token, False = padding. Returns the mask as 0/1 floats or None."""
    if valid_mask is None:
        return None
    array_namespace(valid_mask, xp.zeros(0))
    if valid_mask.dtype != np.bool_:
        raise TypeError(f"valid_mask must be bool (True = real token), got {valid_mask.dtype}")
    if tuple(valid_mask.shape) != (n_tokens,):
        raise ValueError(f"valid_mask must have shape ({n_tokens},), got {tuple(valid_mask.shape)}")
    if not bool(valid_mask.any()):
        raise ValueError("valid_mask marks every token as padding; the loss is undefined")
    return valid_mask
