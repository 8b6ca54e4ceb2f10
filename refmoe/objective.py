r"""The total objective of the method and its two named presets.

Dimension letters: N tokens, D model width, E routed experts, K top-k.

.. math:: L = L_h + \alpha L_{aux} + \beta L_o + \gamma L_v

L_h is the task loss (known to refmoe only through its upstream gradient ``dy`` on the layer output);
L_aux, L_o and L_v are the regularisers of ``refmoe.losses``, each in a form chosen by name. An
``Objective`` fixes the three forms, the three coefficients and how padding is treated; ``PRESETS`` holds the
two coherent sets the sources describe (every difference between them: ``theory/presets.md``):

    paper         aux ``switch`` (Eq. 18), L_o ``pairwise`` (Eq. 6), L_v ``paper`` (Eq. 7),
                  alpha = beta = gamma = 1e-3 (App. F); padding excluded when a mask is given
    authors_code  aux ``deepseek_seq``, L_o ``span`` (optionally with the released expert-major grouping),
                  L_v ``code``; alpha = 1e-3, beta and gamma calibrated on the first batch from the released
                  targets 1e-4 (L_o) and 1e-3 (L_v) by :func:`refmoe.autoscale.autoscale_weights`;
                  padding included, as the released code does

:func:`objective_forward_backward` runs the layer, the three regularisers and their backward passes, and
returns every loss value and the gradient of every term alone as well as of the total.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .backend import array_namespace
from .config import MoEConfig
from .layer import MoECache, moe_backward, moe_forward
from .losses._checks import check_mask
from .losses.aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward
from .losses.ortho import ortho_loss_backward, ortho_loss_forward
from .losses.variance import VAR_VARIANTS, var_loss_backward, var_loss_forward

PADDING_MODES = ("exclude", "include")
TERMS = ("task", "aux", "ortho", "var")


# ----------------------------------------------------------------------------------------------
# the objective: forms and coefficients, validated once
# ----------------------------------------------------------------------------------------------

def _check_weight(name, value, allow_none):
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} is None; give a number >= 0")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value} must be finite and >= 0")


@dataclass(frozen=True)
class Objective:
    """Which form of each regulariser, and with which coefficient.

    aux_variant              one of ``AUX_VARIANTS`` ("paper_eq2", "switch", "deepseek_batch", "deepseek_seq")
    ortho_variant            "pairwise" (paper Eq. 6) or "span" (the authors' Gram-Schmidt projection)
    var_variant              one of ``VAR_VARIANTS`` ("paper", "code", "row_topk")
    alpha, beta, gamma       coefficients of L_aux, L_o, L_v (>= 0). beta / gamma may be None when the
                             matching target is set: they are then calibrated by ``autoscale_weights``
    ortho_eps                eps of L_o (None: the loss's own default; see ``refmoe.losses.ortho``)
    ortho_released_grouping  compatibility flag, only with ortho_variant="span": group the expert outputs
                             expert-major as the released code does (``span_code_grouping``), which puts
                             k different tokens of one expert in a group instead of the k experts of a token
    padding                  "exclude": a ``valid_mask`` removes padding tokens from every regulariser;
                             "include": the regularisers see every row, padding included (the released
                             code); the mask is then checked but not used by them
    ortho_target, var_target targets of the power-of-ten calibration (the released config values)
    name                     label shown in reports
    """

    aux_variant: str = "switch"
    ortho_variant: str = "pairwise"
    var_variant: str = "paper"
    alpha: float = 1e-3
    beta: float | None = 1e-3
    gamma: float | None = 1e-3
    ortho_eps: float | None = None
    ortho_released_grouping: bool = False
    padding: str = "exclude"
    ortho_target: float | None = None
    var_target: float | None = None
    name: str = "custom"

    def __post_init__(self):
        if self.aux_variant not in AUX_VARIANTS:
            raise ValueError(f"aux_variant={self.aux_variant!r}; expected one of {sorted(AUX_VARIANTS)}")
        if self.ortho_variant == "span_code_grouping":
            raise ValueError("ortho_variant='span_code_grouping' is spelled ortho_variant='span', "
                             "ortho_released_grouping=True")
        if self.ortho_variant not in ("pairwise", "span"):
            raise ValueError(f"ortho_variant={self.ortho_variant!r}; expected 'pairwise' or 'span'")
        if self.var_variant not in VAR_VARIANTS:
            raise ValueError(f"var_variant={self.var_variant!r}; expected one of {list(VAR_VARIANTS)}")
        if not isinstance(self.ortho_released_grouping, bool):
            raise TypeError("ortho_released_grouping must be a bool")
        if self.ortho_released_grouping and self.ortho_variant != "span":
            raise ValueError("ortho_released_grouping=True needs ortho_variant='span' (the released code's form)")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding={self.padding!r}; expected one of {PADDING_MODES}")
        _check_weight("alpha", self.alpha, allow_none=False)
        _check_weight("ortho_target", self.ortho_target, allow_none=True)
        _check_weight("var_target", self.var_target, allow_none=True)
        _check_weight("beta", self.beta, allow_none=self.ortho_target is not None)
        _check_weight("gamma", self.gamma, allow_none=self.var_target is not None)
        if self.ortho_eps is not None:
            _check_weight("ortho_eps", self.ortho_eps, allow_none=False)
        if not isinstance(self.name, str):
            raise TypeError("name must be a str")

    @property
    def ortho_loss_variant(self) -> str:
        """The name passed to ``ortho_loss_forward`` (one of ``ORTHO_VARIANTS``)."""
        return "span_code_grouping" if self.ortho_released_grouping else self.ortho_variant

    @property
    def is_calibrated(self) -> bool:
        """True when every coefficient is a number (no pending auto-scaling)."""
        return self.beta is not None and self.gamma is not None

    def replace(self, **changes) -> "Objective":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Objective] = {
    "paper": Objective(
        aux_variant="switch", ortho_variant="pairwise", var_variant="paper",
        alpha=1e-3, beta=1e-3, gamma=1e-3, padding="exclude", name="paper"),
    "authors_code": Objective(
        aux_variant="deepseek_seq", ortho_variant="span", var_variant="code",
        alpha=1e-3, beta=None, gamma=None, ortho_eps=1e-6, padding="include",
        ortho_target=1e-4, var_target=1e-3, name="authors_code"),
}


def get_objective(objective) -> Objective:
    """An ``Objective`` from a preset name or an ``Objective`` (returned unchanged)."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        if objective not in PRESETS:
            raise ValueError(f"objective={objective!r} is not a preset; expected one of {sorted(PRESETS)} "
                             "or an Objective")
        return PRESETS[objective]
    raise TypeError(f"objective must be a preset name or an Objective, got {type(objective).__name__}")


# ----------------------------------------------------------------------------------------------
# forward and backward of the whole objective
# ----------------------------------------------------------------------------------------------

class ObjectiveResult(NamedTuple):
    """What :func:`objective_forward_backward` returns.

    y       [N, D] layer output
    cache   the layer's ``MoECache`` (scores, topk_idx, gates, expert_out ...)
    losses  dict of 0-d arrays (input dtype): 'aux', 'ortho', 'var' unweighted; 'regularisers' =
            alpha aux + beta ortho + gamma var; 'task' = task_loss as given (None when not given);
            'total' = task + regularisers ('total' = 'regularisers' when task_loss is None)
    grads   dict term -> dict name -> array, names 'x' and every parameter. Terms: 'task' (from dy alone),
            'aux', 'ortho', 'var' (each alone, already multiplied by its coefficient) and 'total'
            (one backward pass with everything injected; equal to the sum of the four up to round-off)
    """
    y: object
    cache: MoECache
    losses: dict
    grads: dict


def resolve_batch_shape(batch_shape, n_tokens: int) -> tuple:
    """(B, T) with B * T = N; None means the whole batch as one sequence, (1, N)."""
    if batch_shape is None:
        return (1, n_tokens)
    try:
        B, T = (int(v) for v in batch_shape)
    except (TypeError, ValueError):
        raise ValueError(f"batch_shape must be a pair (B, T), got {batch_shape!r}") from None
    if B < 1 or T < 1 or B * T != n_tokens:
        raise ValueError(f"batch_shape={(B, T)} does not tile N={n_tokens} tokens (need B * T = N)")
    return (B, T)


def _check_task_loss(task_loss, xp):
    if task_loss is None:
        return None
    if isinstance(task_loss, bool):
        raise TypeError("task_loss must be a number or a 0-d array, got a bool")
    if isinstance(task_loss, (int, float, np.floating)):
        return task_loss
    array_namespace(task_loss, xp.zeros(0))
    if task_loss.size != 1:
        raise ValueError(f"task_loss must be a scalar, got shape {tuple(task_loss.shape)}")
    return task_loss.reshape(())


class ObjectiveCache(NamedTuple):
    """What :func:`objective_backward` needs from :func:`objective_forward`."""
    obj: Objective
    y: object               # [N, D] layer output
    cache: MoECache         # the layer's cache
    values: dict            # 'aux', 'ortho', 'var': unweighted 0-d arrays
    loss_caches: tuple      # (aux, ortho, var) caches of the three losses


def objective_forward(x, params: dict, cfg: MoEConfig, objective="paper", *, valid_mask=None, batch_shape=None):
    """Layer forward and the three regularisers.  x: [N, D] -> (y [N, D], ObjectiveCache).

    Use it with :func:`objective_backward` when the task gradient dy depends on y (a training step);
    :func:`objective_forward_backward` is the two in one call. Arguments as there.
    """
    obj = get_objective(objective)
    if not obj.is_calibrated:
        raise ValueError(
            f"objective {obj.name!r} has pending auto-scaled weights (beta={obj.beta}, gamma={obj.gamma}); "
            "calibrate them with refmoe.autoscale_weights(x, params, cfg, objective).objective, "
            "or set them with objective.replace(beta=..., gamma=...)")
    y, cache = moe_forward(x, params, cfg)                                   # y [N, D]
    xp = array_namespace(x)
    N = x.shape[0]
    check_mask(valid_mask, N, xp)
    mask = valid_mask if obj.padding == "exclude" else None
    batch_shape = resolve_batch_shape(batch_shape, N)

    # the three regularisers on the layer's intermediates
    l_aux, aux_cache = aux_loss_forward(cache.scores, cache.topk_idx, obj.aux_variant,
                                        valid_mask=mask, batch_shape=batch_shape)
    l_ortho, ortho_cache = ortho_loss_forward(cache.expert_out, obj.ortho_loss_variant, eps=obj.ortho_eps,
                                              topk_idx=cache.topk_idx, valid_mask=mask)
    l_var, var_cache = var_loss_forward(cache.scores, cache.topk_idx, obj.var_variant, valid_mask=mask)
    values = {"aux": l_aux, "ortho": l_ortho, "var": l_var}
    return y, ObjectiveCache(obj, y, cache, values, (aux_cache, ortho_cache, var_cache))


def objective_backward(dy, ocache: ObjectiveCache, *, task_loss=None, per_term: bool = True) -> ObjectiveResult:
    """Gradients of every term from the task gradient dy [N, D] (or None) and the forward's cache.

    Returns ObjectiveResult(y, cache, losses, grads) as :func:`objective_forward_backward` does.
    """
    if not isinstance(per_term, bool):
        raise TypeError("per_term must be a bool")
    obj, cache = ocache.obj, ocache.cache
    aux_cache, ortho_cache, var_cache = ocache.loss_caches
    task_loss = _check_task_loss(task_loss, array_namespace(cache.x))
    l_aux, l_ortho, l_var = (ocache.values[k] for k in ("aux", "ortho", "var"))
    regularisers = obj.alpha * l_aux + obj.beta * l_ortho + obj.gamma * l_var
    total = regularisers if task_loss is None else task_loss + regularisers
    losses = {"task": task_loss, "aux": l_aux, "ortho": l_ortho, "var": l_var,
              "regularisers": regularisers, "total": total}

    # their gradients on the intermediates, each already weighted (dloss = its coefficient)
    d_scores_aux = aux_loss_backward(float(obj.alpha), aux_cache)            # [N, E]
    d_expert_out = ortho_loss_backward(float(obj.beta), ortho_cache)         # [N, K, D]
    d_scores_var = var_loss_backward(float(obj.gamma), var_cache)            # [N, E]

    grads = {}
    if per_term:
        grads["task"] = moe_backward(dy, cache)
        grads["aux"] = moe_backward(None, cache, d_scores=d_scores_aux)
        grads["ortho"] = moe_backward(None, cache, d_expert_out=d_expert_out)
        grads["var"] = moe_backward(None, cache, d_scores=d_scores_var)
    grads["total"] = moe_backward(dy, cache, d_scores=d_scores_aux + d_scores_var, d_expert_out=d_expert_out)
    return ObjectiveResult(ocache.y, cache, losses, grads)


def objective_forward_backward(x, params: dict, cfg: MoEConfig, dy=None, objective="paper", *,
                               task_loss=None, valid_mask=None, batch_shape=None,
                               per_term: bool = True) -> ObjectiveResult:
    r"""Layer forward, the three regularisers, and the gradients of every term.

    .. math:: L = L_h + \alpha L_{aux}(P, T) + \beta L_o(\tilde x) + \gamma L_v(P, T)

    x           [N, D] layer input; params, cfg as for ``moe_forward``
    dy          [N, D] dL_h/dy from the task loss, or None (zero task gradient)
    objective   a preset name ("paper", "authors_code") or an ``Objective``; its beta and gamma must be
                numbers (calibrate "authors_code" first with ``autoscale_weights``)
    task_loss   optional value of L_h (a number or 0-d array), only reported and added to 'total'
    valid_mask  optional [N] bool, True = real token; used by the regularisers when padding="exclude"
    batch_shape (B, T) layout of the N tokens, token i = b*T + t. Only ``deepseek_seq`` uses it; the
                default None treats the whole batch as one sequence, (1, N)
    per_term    False skips the four per-term backward passes (grads then holds 'total' only)
    Returns ObjectiveResult(y, cache, losses, grads); see its docstring.

    Gradients reach the parameters through the layer's backward: L_aux and L_v inject d_scores [N, E]
    (into the full softmax), L_o injects d_expert_out [N, K, D]; the top-k indices have zero gradient.
    """
    if not isinstance(per_term, bool):
        raise TypeError("per_term must be a bool")
    _, ocache = objective_forward(x, params, cfg, objective, valid_mask=valid_mask, batch_shape=batch_shape)
    return objective_backward(dy, ocache, task_loss=task_loss, per_term=per_term)
