"""Mechanisms that exist only for speed, with the core's signatures and results, each tested equal to the core
(``tests/test_fast*.py``: float64 to 1e-12 relative, float32 at the tolerance each test states).

The API for a training loop or a study:

    objective_step(x, params, cfg, objective, dy=None, *, valid_mask=None, batch_shape=None, task_loss=None,
                   capacity=None, check=True, keep_cache=True)
        -> refmoe.ObjectiveResult, as ``refmoe.objective_forward_backward(x, params, cfg, dy, objective,
           per_term=False, ...)`` returns it (grads = {"total": {...}}), computed by the fused kernels,
           inputs checked once, at most one host read in the step (C; none when ``capacity`` is given) and one
           status read at the end; a step the fast forms do not cover reruns on the core path (``step.py``)
    objective_step(x, params, cfg, objective, task, ...), task(y) -> (task_loss, dy)
        the same where dy depends on the output (a training step, L_h = mse(x + y, t)): the task function runs
        between the forward and the backward, and again on the core's y where the step reruns there
        (``refmoe.study.train`` uses it on CuPy)
    GraphedStep(x, params, cfg, objective, dy=None, *, task=None, task_inputs=(), ...)
        the same step captured once as a CUDA graph and replayed: ``GraphedStep(...)(x=..., dy=...)``, or with a
        task computed inside the graph, ``task(y, x, *task_inputs) -> (task_loss, dy)`` and
        ``step(x=..., task_inputs=(...))`` (``graph.py``: fixed C, private memory pool, eager fallback where
        capture is impossible; ``refmoe.study.train`` replays one per phase on CuPy)
    moe_forward, moe_backward
        ``refmoe.moe_forward`` with the routed experts batched over a padded [E, C, D] layout
        (``refmoe.fast.experts``), for ``objective_forward_backward(..., forward=refmoe.fast.moe_forward)``;
        the backward is the core's, which follows the cache (and may run several times)

Modules:
    kernels     the CuPy kernels (SwiGLU forward / backward, softmax + top-k + gates, the router backward, row
                gathers, combine and its backward, the released Gram-Schmidt L_o forward / backward) and the
                reference each must equal (the span kernels in ``span_kernels``); ``REFMOE_FAST_KERNELS=0`` runs
                the references on CuPy too
    blas        the products: cuBLAS called on handles of its own, so that a CUDA graph can capture them (CuPy
                refuses cuBLAS inside a capture), with output buffers and accumulation; grouped products over the
                experts' own rows
    layer       the layer on those kernels, sort-free dispatch, padded (CuPy) or per-expert (NumPy) experts,
                a backward that frees each buffer after its last use
    losses      L_aux, L_o (pairwise from one batched Gram; span by the kernels), L_v without per-loss checks
    step, graph the objective step and its CUDA-graph replay
    experts     the padded experts behind ``moe_forward``
    ortho_gram  L_o through the per-token Gram matrix (``span`` through its Cholesky factor: kept for comparison;
                it squares the condition number, the kernels of ``kernels`` do not)

The reading path (``refmoe.layer``, ``refmoe.experts``, ``refmoe.losses``, ``refmoe.objective``) never imports
this package.
"""
from ..layer import forward_with, moe_backward
from . import blas, experts, kernels, ortho_gram
from .graph import GraphedStep
from .step import STATUS, objective_step


def moe_forward(x, params: dict, cfg):
    """``refmoe.moe_forward`` with batched experts.  x: [N, D] -> (y [N, D], MoECache)."""
    return forward_with(experts, x, params, cfg)


__all__ = ["objective_step", "GraphedStep", "STATUS", "moe_forward", "moe_backward", "blas", "experts", "kernels",
           "ortho_gram"]
