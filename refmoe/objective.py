r"""The total objective of the method and its two named presets.

Dimension letters: N tokens, D model width, E routed experts, K top-k.

.. math:: L = L_h + \alpha L_{aux} + \beta L_o + \gamma L_v\ (+ \zeta L_z)

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
from .checks import check_mask, resolve_batch_shape
from .config import MoEConfig
from .layer import MoECache, moe_backward, moe_forward
from .losses.terms import TERM_FORMS, term_backward, term_forward

PADDING_MODES = ("exclude", "include")
TERMS = ("task", "aux", "ortho", "var")
REGULARISERS = ("aux", "ortho", "var")
# megatron_seq reads tokens in Megatron's order t*B + b; the objective's layout is b*T + t
OBJECTIVE_AUX_FORMS = tuple(f for f in TERM_FORMS["aux"] if f != "megatron_seq")


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

    aux_variant              one of ``OBJECTIVE_AUX_FORMS`` ("paper_eq2", "switch", "deepseek_batch",
                             "deepseek_seq", "gshard_first_choice"); ``megatron_seq`` is refused because it
                             orders tokens t*B + b while the objective lays them out b*T + t
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
    zeta                     coefficient of the router z-loss L_z (>= 0, default 0). The z term enters ``forms``,
                             the losses and the gradients only when zeta > 0, so an objective without it
                             computes exactly what it did before the term existed
    z_variant                its form, "zloss" (``refmoe.losses.zloss``: mean_t logsumexp(z_t)^2 on the logits)
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
    zeta: float = 0.0
    z_variant: str = "zloss"

    def __post_init__(self):
        if self.aux_variant == "megatron_seq":
            raise ValueError("aux_variant='megatron_seq' orders tokens t*B + b (Megatron's [T, B] layout); the "
                             "objective's tokens are b*T + t: use 'deepseek_seq', the same loss in that order")
        if self.aux_variant not in OBJECTIVE_AUX_FORMS:
            raise ValueError(f"aux_variant={self.aux_variant!r}; expected one of {list(OBJECTIVE_AUX_FORMS)}")
        if self.ortho_variant == "span_code_grouping":
            raise ValueError("ortho_variant='span_code_grouping' is spelled ortho_variant='span', "
                             "ortho_released_grouping=True")
        if self.ortho_variant not in ("pairwise", "span"):
            raise ValueError(f"ortho_variant={self.ortho_variant!r}; expected 'pairwise' or 'span'")
        if self.var_variant not in TERM_FORMS["var"]:
            raise ValueError(f"var_variant={self.var_variant!r}; expected one of {list(TERM_FORMS['var'])}")
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
        _check_weight("zeta", self.zeta, allow_none=False)
        if self.z_variant not in TERM_FORMS["z"]:
            raise ValueError(f"z_variant={self.z_variant!r}; expected one of {list(TERM_FORMS['z'])}")

    @property
    def ortho_loss_variant(self) -> str:
        """The name passed to ``ortho_loss_forward`` (one of ``ORTHO_VARIANTS``)."""
        return "span_code_grouping" if self.ortho_released_grouping else self.ortho_variant

    @property
    def forms(self) -> dict:
        """term -> form name, as :func:`refmoe.losses.term_forward` takes them."""
        forms = {"aux": self.aux_variant, "ortho": self.ortho_loss_variant, "var": self.var_variant}
        if self.zeta > 0:
            forms["z"] = self.z_variant
        return forms

    @property
    def coefficients(self) -> dict:
        """term -> coefficient (alpha, beta, gamma)."""
        coefficients = {"aux": self.alpha, "ortho": self.beta, "var": self.gamma}
        if self.zeta > 0:
            coefficients["z"] = self.zeta
        return coefficients

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
    losses  dict of 0-d arrays (input dtype): 'aux', 'ortho', 'var' (and 'z' when zeta > 0) unweighted;
            'regularisers' = alpha aux + beta ortho + gamma var (+ zeta z); 'task' = task_loss as given (None
            when not given); 'total' = task + regularisers ('total' = 'regularisers' when task_loss is None)
    grads   dict term -> dict name -> array, names 'x' and every parameter. Terms: 'task' (from dy alone),
            'aux', 'ortho', 'var', 'z' when zeta > 0 (each term's contribution to the total: the gradient of its
            value times its coefficient) and 'total' (one backward pass with everything injected; equal to the
            sum of the others up to round-off). This is refmoe's one per-term convention; the golden fixtures use
            it too.
    """
    y: object
    cache: MoECache
    losses: dict
    grads: dict


def _check_task_loss(task_loss, xp, *, finite: bool = True):
    """task_loss as ``objective_backward`` uses it; ``finite=False`` leaves the finiteness of an array to the
    caller (``refmoe.fast.objective_step`` folds it into its one status read)."""
    if task_loss is None:
        return None
    if isinstance(task_loss, bool):
        raise TypeError("task_loss must be a number or a 0-d array, got a bool")
    if isinstance(task_loss, (int, float, np.floating)):
        if not math.isfinite(task_loss):
            raise ValueError(f"task_loss={float(task_loss)!r} is not finite")
        return task_loss
    array_namespace(task_loss, xp.zeros(0))
    if task_loss.size != 1:
        raise ValueError(f"task_loss must be a scalar, got shape {tuple(task_loss.shape)}")
    if task_loss.dtype.kind not in "fiu":
        raise TypeError(f"task_loss must be real, got dtype {task_loss.dtype}")
    if finite and not bool(xp.isfinite(task_loss).all()):
        raise ValueError("task_loss contains NaN or inf")
    return task_loss.reshape(())


class ObjectiveCache(NamedTuple):
    """What :func:`objective_backward` needs from :func:`objective_forward`."""
    obj: Objective
    y: object               # [N, D] layer output
    cache: MoECache         # the layer's cache
    values: dict            # 'aux', 'ortho', 'var': unweighted 0-d arrays
    term_caches: dict       # 'aux', 'ortho', 'var': ``refmoe.losses.terms.TermCache``


def objective_forward(x, params: dict, cfg: MoEConfig, objective="paper", *, valid_mask=None, batch_shape=None,
                      forward=None):
    """Layer forward and the three regularisers.  x: [N, D] -> (y [N, D], ObjectiveCache).

    Use it with :func:`objective_backward` when the task gradient dy depends on y (a training step);
    :func:`objective_forward_backward` is the two in one call. Arguments as there; ``forward`` is the layer's
    forward (default ``refmoe.moe_forward``; ``refmoe.fast.moe_forward`` gives the same numbers faster on a GPU).
    """
    obj = get_objective(objective)
    if not obj.is_calibrated:
        raise ValueError(
            f"objective {obj.name!r} has pending auto-scaled weights (beta={obj.beta}, gamma={obj.gamma}); "
            "calibrate them with refmoe.autoscale_weights(x, params, cfg, objective).objective, "
            "or set them with objective.replace(beta=..., gamma=...)")
    y, cache = (moe_forward if forward is None else forward)(x, params, cfg)   # y [N, D]
    xp = array_namespace(x)
    check_mask(valid_mask, x.shape[0], xp)
    mask = valid_mask if obj.padding == "exclude" else None
    terms = regularisers_forward(cache, obj.forms, valid_mask=mask, batch_shape=batch_shape,
                                 ortho_eps=obj.ortho_eps)
    values = {t: v for t, (v, _) in terms.items()}
    return y, ObjectiveCache(obj, y, cache, values, {t: c for t, (_, c) in terms.items()})


def regularisers_forward(cache: MoECache, forms: dict, *, valid_mask=None, batch_shape=None, ortho_eps=None,
                         totals=None) -> dict:
    """term -> (value, TermCache) for each (term, form) of ``forms`` on the layer's cache.

    batch_shape (B, T) tiles the N tokens (token i = b*T + t for every form but ``megatron_seq``, i = t*B + b);
    None is one sequence, (1, N).
    totals      None, or term -> the term's sums over a global batch (``refmoe.losses.term_totals`` summed over
                the ranks of a data-parallel group): each value is then this batch's share (``refmoe.distributed``)
    """
    batch_shape = resolve_batch_shape(batch_shape, cache.x.shape[0])
    totals = {} if totals is None else totals
    return {term: term_forward(term, form, cache, valid_mask=valid_mask, batch_shape=batch_shape,
                               eps=ortho_eps if term == "ortho" else None, totals=totals.get(term))
            for term, form in forms.items()}


def compose_backward(dy, cache: MoECache, term_caches: dict, coefficients: dict, *, per_term: bool = True) -> dict:
    """Gradients of L = <dy, y> + sum_t c_t L_t, the sum over the terms of ``term_caches``.

    Returns term -> name -> array: 'task' (dy alone) and each term's contribution c_t dL_t (when ``per_term``),
    and 'total', one backward pass with every injection summed. Each injection is computed with
    dloss = c_t, so a term's contribution and its share of the total are the same numbers.
    """
    injections = {t: term_backward(float(coefficients[t]), tc) for t, tc in term_caches.items()}
    grads = {}
    if per_term:
        grads["task"] = moe_backward(dy, cache)
        for t, inj in injections.items():
            grads[t] = moe_backward(None, cache, d_scores=inj.d_scores, d_expert_out=inj.d_expert_out,
                                    d_logits=inj.d_logits)
    d_scores = [inj.d_scores for inj in injections.values() if inj.d_scores is not None]           # [N, E] each
    d_expert_out = [inj.d_expert_out for inj in injections.values() if inj.d_expert_out is not None]  # [N, K, D]
    d_logits = [inj.d_logits for inj in injections.values() if inj.d_logits is not None]             # [N, E] each
    grads["total"] = moe_backward(dy, cache, d_scores=_sum(d_scores), d_expert_out=_sum(d_expert_out),
                                  d_logits=_sum(d_logits))
    return grads


def _sum(arrays):
    """a_0 + a_1 + ... in order, or None for no arrays."""
    total = None
    for a in arrays:
        total = a if total is None else total + a
    return total


def objective_backward(dy, ocache: ObjectiveCache, *, task_loss=None, per_term: bool = True) -> ObjectiveResult:
    """Gradients of every term from the task gradient dy [N, D] (or None) and the forward's cache.

    Returns ObjectiveResult(y, cache, losses, grads) as :func:`objective_forward_backward` does.
    """
    if not isinstance(per_term, bool):
        raise TypeError("per_term must be a bool")
    obj, cache = ocache.obj, ocache.cache
    task_loss = _check_task_loss(task_loss, array_namespace(cache.x))
    v = ocache.values
    regularisers = obj.alpha * v["aux"] + obj.beta * v["ortho"] + obj.gamma * v["var"]
    if "z" in v:
        regularisers = regularisers + obj.zeta * v["z"]
    total = regularisers if task_loss is None else task_loss + regularisers
    losses = {"task": task_loss, **v, "regularisers": regularisers, "total": total}
    grads = compose_backward(dy, cache, ocache.term_caches, obj.coefficients, per_term=per_term)
    return ObjectiveResult(ocache.y, cache, losses, grads)


def objective_forward_backward(x, params: dict, cfg: MoEConfig, dy=None, objective="paper", *,
                               task_loss=None, valid_mask=None, batch_shape=None,
                               per_term: bool = True, forward=None) -> ObjectiveResult:
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
    forward     the layer's forward: None for ``refmoe.moe_forward``, or ``refmoe.fast.moe_forward``
    Returns ObjectiveResult(y, cache, losses, grads); see its docstring.

    Gradients reach the parameters through the layer's backward: L_aux and L_v inject d_scores [N, E]
    (into the full softmax), L_o injects d_expert_out [N, K, D]; the top-k indices have zero gradient.
    """
    if not isinstance(per_term, bool):
        raise TypeError("per_term must be a bool")
    _, ocache = objective_forward(x, params, cfg, objective, valid_mask=valid_mask, batch_shape=batch_shape,
                                  forward=forward)
    return objective_backward(dy, ocache, task_loss=task_loss, per_term=per_term)
