"""The task loss L_h of the study and of the stacked objective: the mean squared error, a forward/backward pair.

Dimension letters: N tokens, D model width.

(The golden fixtures use the linear task loss L_h = <dy, y> instead, whose gradient is dy itself.)
"""
from __future__ import annotations


def mse_forward(out, target):
    r"""L_h = (1/(N D)) sum_i ||out_i - t_i||^2, the mean squared error.  out, target: [N, D] -> (0-d loss, cache).

    Averaged over tokens and features: about 1 for an untrained block on ``make_task`` data, the order of
    a per-token language-model loss that the paper's coefficients (1e-3) are set against.
    """
    if tuple(out.shape) != tuple(target.shape) or out.ndim != 2:
        raise ValueError(f"out {tuple(out.shape)} and target {tuple(target.shape)} must be the same [N, D]")
    r = out - target                                                            # [N, D]
    return (r * r).sum() / (out.shape[0] * out.shape[1]), r


def mse_backward(dloss, r):
    r"""dL_h/dout = (2 / (N D)) (out - t) dloss.  Returns d_out [N, D]."""
    return r * (2.0 * float(dloss) / (r.shape[0] * r.shape[1]))
