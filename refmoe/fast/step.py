r"""One objective step on the fast path: ``refmoe.objective_forward_backward(..., per_term=False)`` in one call,
with the inputs checked once and at most one device->host read in the step itself.

Dimension letters: N tokens, D model width, E routed experts, K top-k.

:func:`objective_step` checks everything that can be checked from shapes and dtypes at its boundary, then
runs the layer (``refmoe.fast.layer``), the three regularisers (``refmoe.fast.losses``) and one backward
with their gradients injected, all on the device. What needs values (finite y, task loss and gradients, the
scale range of ``pairwise``, the capacity, a mask with a valid token) is gathered into one small ``status``
array and read once at the end (``check=True``); where it says the fast forms do not apply, the step is run
again on the core path (``refmoe.objective_forward_backward`` with ``refmoe.moe_forward``), which computes the
same function with the core's error messages and its rescaled forms. So the result is always the core's,
up to rounding.

The upstream gradient is either given (``dy`` [N, D]) or computed from the output by a task function
``dy = task(y) -> (task_loss, dy)``, for a loss whose gradient depends on y (a training step's
L_h = mse(x + y, t)). The task function runs on the device between the forward and the backward; where the
step reruns on the core path it is called again, on the core's y.

Host reads per step: the padded layout's capacity C (none when ``capacity`` is given), and the status
(none with ``check=False``; :class:`refmoe.fast.GraphedStep` reads it after the replay).
"""
from __future__ import annotations

import numpy as np

from .. import layer as core_layer
from ..backend import array_namespace, to_numpy
from ..checks import mask_weights, resolve_batch_shape
from ..losses.ortho import ORTHO_VARIANTS
from ..objective import (ObjectiveResult, _check_task_loss, get_objective, objective_backward, objective_forward,
                         objective_forward_backward)
from . import layer as fl
from . import losses as fls

STATUS = ("y_finite", "grads_finite", "losses_finite", "pairwise_in_range", "mask_has_token", "capacity_fits")


def unsupported(x, cfg, obj, valid_mask) -> str | None:
    """Why :func:`objective_step` hands a step to the core path before running it, or None."""
    why = fl.unsupported(cfg)
    if why:
        return why
    if obj.zeta > 0:
        return "the z-loss is not on the fast path"
    if obj.ortho_released_grouping and valid_mask is not None and obj.padding == "exclude":
        return "span_code_grouping with padding excluded drops rows (a data-dependent shape)"
    return None


def _check_boundary(x, params, cfg, obj, dy, valid_mask):
    """The checks of the core's public functions that need no values (shapes, dtypes, libraries)."""
    if not isinstance(cfg, core_layer.MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    core_layer._check_params(params, cfg)
    xp = core_layer._check_input(x, params, cfg)
    core_layer._check_upstream("dy", dy, x.shape, x)
    if valid_mask is not None:
        array_namespace(valid_mask, x)
        if valid_mask.dtype != np.bool_:
            raise TypeError(f"valid_mask must be bool (True = real token), got {valid_mask.dtype}")
        if tuple(valid_mask.shape) != (x.shape[0],):
            raise ValueError(f"valid_mask must have shape ({x.shape[0]},), got {tuple(valid_mask.shape)}")
    if not obj.is_calibrated:
        raise ValueError(f"objective {obj.name!r} has pending auto-scaled weights (beta={obj.beta}, "
                         f"gamma={obj.gamma}); calibrate them with refmoe.autoscale_weights first")
    if obj.var_variant == "code" and cfg.n_experts < 2:
        raise ValueError(f"variant='code' needs n_experts >= 2 for an unbiased variance, got E={cfg.n_experts}")
    return xp


def step_on_device(x, params, cfg, obj, dy, valid_mask, batch_shape, *, capacity=None, layout=None,
                   keep_cache=True, task_loss=None):
    """The step without host reads (but C when ``capacity`` is None on the padded layout).

    dy is [N, D], None, or a task function ``y -> (task_loss, dy)`` (then ``task_loss`` is None).
    Returns (y, cache, values {task, aux, ortho, var}, grads, status [len(STATUS)] bool array).
    Numerics: overflow and NaN are not warned about here; the status reports them (the core path then raises).
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        return _step_on_device(x, params, cfg, obj, dy, valid_mask, batch_shape, capacity, layout, keep_cache,
                               task_loss)


def _step_on_device(x, params, cfg, obj, dy, valid_mask, batch_shape, capacity, layout, keep_cache, task_loss):
    xp = array_namespace(x)
    N, K = x.shape[0], cfg.top_k
    y, expert_out, tape = fl.layer_forward(x, params, cfg, layout=layout, capacity=capacity)
    if callable(dy):                                                                # the task of this y
        task_loss, dy = dy(y)
        task_loss = _check_task_loss(task_loss, xp, finite=False)                   # finite: in the status
        core_layer._check_upstream("dy", dy, x.shape, x)
    dy = xp.zeros_like(x) if dy is None else dy
    mask = valid_mask if obj.padding == "exclude" else None
    valid = mask_weights(mask, N, x.dtype, xp)                                      # [N]
    forms, eps = obj.forms, obj.ortho_eps
    l_aux, d_aux, _ = fls.aux(tape.scores, tape.topk_idx, forms["aux"], obj.alpha, valid, batch_shape)
    l_var, d_var, _ = fls.var(tape.scores, tape.topk_idx, forms["var"], obj.gamma, valid)
    o_form = forms["ortho"]
    o_eps = ORTHO_VARIANTS[o_form].default_eps if eps is None else float(eps)
    l_o, tape.d_expert_out, o_ok = fls.ortho(expert_out, o_form, obj.beta, o_eps, valid, tape.topk_idx,
                                             cfg.n_experts)                        # the backward drops it
    cache = None
    if keep_cache:
        cache = core_layer.MoECache(tape.logits, tape.scores, tape.topk_idx, tape.gates, expert_out,
                                    tape.shared_out, x, cfg, dict(params), None, None, None, None)
    fits = tape.plan.fits                                                           # 0-d bool
    del expert_out                                                                  # the tape's (and the cache's)
    grads = fl.layer_backward(dy, tape, d_scores=d_aux + d_var)
    del tape
    true = xp.ones((), dtype=bool)
    sums = xp.stack([g.sum() for g in grads.values()])                              # one sum per gradient
    losses_ok = xp.isfinite(xp.stack([l_aux, l_o, l_var])).all()
    if task_loss is not None and not isinstance(task_loss, (int, float, np.floating)):
        losses_ok = losses_ok & xp.isfinite(task_loss)                              # numbers: checked above
    status = xp.stack([xp.isfinite(y.sum()), xp.isfinite(sums).all(), losses_ok,
                       true if o_ok is None else o_ok,
                       true if mask is None else mask.any(),
                       fits])
    return y, cache, {"task": task_loss, "aux": l_aux, "ortho": l_o, "var": l_var}, grads, status


def objective_step(x, params: dict, cfg, objective="paper", dy=None, *, valid_mask=None, batch_shape=None,
                   task_loss=None, capacity=None, check=True, keep_cache=True, layout=None) -> ObjectiveResult:
    r"""``refmoe.objective_forward_backward(x, params, cfg, dy, objective, per_term=False, ...)`` on the fast path.

    .. math:: L = L_h + \alpha L_{aux} + \beta L_o + \gamma L_v

    x, params, cfg, dy, objective, task_loss, valid_mask, batch_shape   as for ``objective_forward_backward``,
                and dy may be a task function ``task(y) -> (task_loss, dy [N, D])`` (called once on the fast
                y, and once more on the core's y where the step reruns there; task_loss must then be None)
    capacity    rows per expert of the padded layout (CuPy); None: the largest load (one host read)
    check       read the status once at the end and rerun on the core path where it says so (default); False
                returns the fast numbers unchecked, with ``losses["status"]`` (the array, see ``STATUS``)
    keep_cache  False returns ``cache=None`` (the expert outputs are then freed inside the backward)
    layout      "padded" / "sorted" (``refmoe.fast.layer``); None: padded on CuPy, sorted on NumPy
    Returns ObjectiveResult(y, cache, losses, grads) with grads = {"total": {...}}; the cache is a
    ``MoECache`` whose reader fields (logits, scores, topk_idx, gates, expert_out, shared_out, x) are set and
    whose backward fields are None (the backward has consumed them).
    """
    obj = get_objective(objective)
    if callable(dy) and task_loss is not None:
        raise ValueError("task_loss was given with a task function dy, which returns it; pass one of the two")
    why = unsupported(x, cfg, obj, valid_mask)
    if why is not None:
        return core_step(x, params, cfg, obj, dy, valid_mask, batch_shape, task_loss)
    xp = _check_boundary(x, params, cfg, obj, None if callable(dy) else dy, valid_mask)
    batch_shape = resolve_batch_shape(batch_shape, x.shape[0])
    task_loss = _check_task_loss(task_loss, xp, finite=False)                       # finite: in the status
    y, cache, values, grads, status = step_on_device(x, params, cfg, obj, dy, valid_mask, batch_shape,
                                                     capacity=capacity, layout=layout, keep_cache=keep_cache,
                                                     task_loss=task_loss)
    if check and not bool(to_numpy(status).all()):
        del y, cache, values, grads
        return core_step(x, params, cfg, obj, dy, valid_mask, batch_shape, task_loss)
    return assemble(obj, y, cache, values, grads, None if check else status)


def assemble(obj, y, cache, values, grads, status=None) -> ObjectiveResult:
    """The ObjectiveResult of one step, as ``refmoe.objective.objective_backward`` assembles it."""
    task_loss = values["task"]
    regularisers = obj.alpha * values["aux"] + obj.beta * values["ortho"] + obj.gamma * values["var"]
    total = regularisers if task_loss is None else task_loss + regularisers
    losses = {**values, "regularisers": regularisers, "total": total}
    if status is not None:
        losses["status"] = status
    return ObjectiveResult(y, cache, losses, {"total": grads})


def core_step(x, params, cfg, obj, dy, valid_mask, batch_shape, task_loss) -> ObjectiveResult:
    """The core path: ``refmoe.objective_forward_backward(..., per_term=False)`` (it raises the core's errors);
    a task function dy is called on the core's y, between ``objective_forward`` and ``objective_backward``."""
    if not callable(dy):
        return objective_forward_backward(x, params, cfg, dy, obj, task_loss=task_loss, valid_mask=valid_mask,
                                          batch_shape=batch_shape, per_term=False)
    y, ocache = objective_forward(x, params, cfg, obj, valid_mask=valid_mask, batch_shape=batch_shape)
    task_loss, dy = dy(y)
    return objective_backward(dy, ocache, task_loss=task_loss, per_term=False)


__all__ = ["objective_step", "step_on_device", "STATUS"]
