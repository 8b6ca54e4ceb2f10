"""A repeated objective step at one shape, captured once as a CUDA graph and replayed (CuPy).

Dimension letters: N tokens, D model width, E routed experts, K top-k, C rows per expert.

    step = refmoe.fast.GraphedStep(x, params, cfg, "paper", dy)
    for batch in batches:
        r = step(x=batch_x, dy=batch_dy)       # copies into the captured buffers, replays, checks
        optimizer_update_in_place(params, r.grads["total"])

    # a task loss computed inside the graph from y and the step's own buffers (a training step):
    step = refmoe.fast.GraphedStep(x, params, cfg, obj, task=task, task_inputs=(target,))
    r = step(x=batch_x, task_inputs=(batch_target,))   # task(y, x, target) -> (L_h, dL_h/dy) in the graph

What the graph needs, and how it is given:

* no host read inside it: the capacity C is fixed when the step is built (the largest expert load of the first
  batch times ``margin``, rounded up to a multiple of 8, or ``capacity``), and the status (finite values, loads
  within C, ...) stays on the device; ``__call__`` reads it once after the replay and, where it fails, runs
  that step eagerly (``refmoe.fast.objective_step``, which falls back to the core path where needed) and
  captures again with a C that fits at the next call;
* fixed addresses: x and dy are copied into buffers the step owns; ``params`` are read where they are, so
  update them in place (rebinding a dict entry is not seen: the graph holds the old array);
* its own memory: everything the capture allocates comes from a private ``cupy.cuda.MemoryPool`` that only
  the graph uses, so no later allocation can take a block the graph writes. The arrays of a result are
  overwritten by the next call: copy what must outlive it.

Where capture is impossible (NumPy, a configuration outside the fast layer, kernels switched off, an error
during the capture) the step runs eagerly every call and ``mode`` / ``reason`` say why.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_namespace, to_numpy
from ..checks import resolve_batch_shape
from ..objective import get_objective
from . import layer as fl
from . import kernels as kn
from .step import _check_boundary, assemble, objective_step, step_on_device, unsupported


_STREAMS = {}


def _capture_stream():
    """One non-blocking stream per device that every GraphedStep captures on and replays on (so its cuBLAS
    handle and workspace, ``refmoe.fast.blas``, are made once, however many steps are built)."""
    import cupy
    dev = cupy.cuda.Device().id
    if dev not in _STREAMS:
        _STREAMS[dev] = cupy.cuda.Stream(non_blocking=True)
    return _STREAMS[dev]


def _copy_in(buf, value, name):
    """buf[...] = value, for a value of buf's library, shape and dtype only (no broadcast, no cast)."""
    array_namespace(value, buf)
    if tuple(value.shape) != tuple(buf.shape) or value.dtype != buf.dtype:
        raise ValueError(f"{name} must be {buf.dtype}{tuple(buf.shape)} as when the step was built, "
                         f"got {value.dtype}{tuple(value.shape)}")
    buf[...] = value


class GraphedStep:
    """``refmoe.fast.objective_step`` at a fixed shape, replayed from a CUDA graph where possible.

    x [N, D], params, cfg, objective, dy [N, D] or None, valid_mask, batch_shape   as for ``objective_step``
    task       instead of dy: ``task(y, x, *task_inputs) -> (task_loss, dy)``, device work only (no host read),
               run inside the graph on the step's buffers
    task_inputs  the arrays ``task`` reads besides y and x (copied into buffers, like x)
    capacity   rows per expert (None: from the first batch, times ``margin``)
    check      read the status after each replay (one small host read) and redo a failing step eagerly
    keep_cache return the ``MoECache`` reader fields (topk_idx, scores, ...) too; like every result array they
               are overwritten by the next call
    Attributes: ``mode`` ("graph" or "eager"), ``reason`` (why eager), ``capacity``, ``captures``.
    """

    def __init__(self, x, params, cfg, objective="paper", dy=None, *, task=None, task_inputs=(), valid_mask=None,
                 batch_shape=None, capacity=None, margin: float = 1.125, check: bool = True,
                 keep_cache: bool = False):
        self.obj = get_objective(objective)
        if callable(dy):
            raise TypeError("GraphedStep takes a task function as task=(y, x, *task_inputs) -> (task_loss, dy), "
                            "reading the step's buffers, not as dy")
        if task is not None and dy is not None:
            raise ValueError("GraphedStep: give dy or task, not both")
        self.xp = _check_boundary(x, params, cfg, self.obj, dy, valid_mask)
        for t in task_inputs:
            array_namespace(t, x)
        self.task, self.task_inputs = task, tuple(t.copy() for t in task_inputs)   # captured buffers
        self.keep_cache = bool(keep_cache)
        self.params, self.cfg, self.check, self.margin = params, cfg, check, float(margin)
        self.batch_shape = resolve_batch_shape(batch_shape, x.shape[0])
        self.x = x.copy()                                                       # [N, D] captured buffers
        self.dy = None if task is not None else self.xp.zeros_like(x) if dy is None else dy.copy()
        self.valid_mask = None if valid_mask is None else valid_mask.copy()
        self.capacity, self.captures, self.graph, self.out = capacity, 0, None, None
        self.mode, self.reason = "eager", self._why_eager()
        if self.reason is None:
            self._capture()

    def _why_eager(self):
        if self.xp.__name__ != "cupy":
            return "CUDA graphs need CuPy"
        if not kn.kernels_on(self.xp):
            return "REFMOE_FAST_KERNELS=0"
        return unsupported(self.x, self.cfg, self.obj, self.valid_mask)

    def _dy(self):
        """The step's dy: the buffer, or the task function on the step's buffers."""
        if self.task is None:
            return self.dy
        return lambda y: self.task(y, self.x, *self.task_inputs)

    def _run(self):
        y, cache, values, grads, status = step_on_device(
            self.x, self.params, self.cfg, self.obj, self._dy(), self.valid_mask, self.batch_shape,
            capacity=self.capacity, layout="padded", keep_cache=self.keep_cache)
        return assemble(self.obj, y, cache, values, grads, status)

    def _capture(self):
        import cupy
        if self.capacity is None:
            self.capacity = self._capacity_for(self.x)
        self.stream = _capture_stream()
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with self.stream:                                                      # compiles every kernel, makes
            self._run()                                                        # cuBLAS ready on this stream
        self.stream.synchronize()
        self.pool = cupy.cuda.MemoryPool()
        graph = out = None
        try:
            with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
                self.stream.begin_capture()
                try:
                    out = self._run()
                finally:
                    graph = self.stream.end_capture()
        except Exception as exc:                                               # noqa: BLE001 any capture failure
            self.mode, self.reason, self.graph, self.out = "eager", f"capture failed: {exc!r}", None, None
            return
        self.graph, self.out, self.mode, self.reason = graph, out, "graph", None
        self.captures += 1

    def _capacity_for(self, x):
        """C = the largest load of x's routing times the margin, rounded up to a multiple of 8 (one host read)."""
        xp = self.xp
        logits = x @ self.params["w_router"].T
        _, idx, _, _ = kn.softmax_topk(xp, logits, self.cfg.top_k, fl._renorm(self.cfg), float(self.cfg.gate_eps),
                                       float(self.cfg.routed_scaling_factor))
        load = int(to_numpy(xp.bincount(idx.reshape(-1), minlength=self.cfg.n_experts).max()))
        return int(-(-int(np.ceil(load * self.margin)) // 8) * 8)

    def __call__(self, x=None, dy=None, task_inputs=None):
        """One step on x and dy or task_inputs (copied into the step's buffers; None keeps the previous ones)."""
        if x is not None:
            _copy_in(self.x, x, "x")
        if dy is not None:
            if self.task is not None:
                raise ValueError("this GraphedStep computes dy with its task; pass task_inputs")
            _copy_in(self.dy, dy, "dy")
        if task_inputs is not None:
            if len(task_inputs) != len(self.task_inputs):
                raise ValueError(f"{len(task_inputs)} task_inputs given, the step has {len(self.task_inputs)}")
            for i, (buf, t) in enumerate(zip(self.task_inputs, task_inputs)):
                _copy_in(buf, t, f"task_inputs[{i}]")
        if self.mode != "graph":
            return self._eager()
        import cupy
        current = cupy.cuda.get_current_stream()
        self.stream.wait_event(current.record())                               # inputs and params are written
        self.graph.launch(stream=self.stream)
        current.wait_event(self.stream.record())                               # readers wait for the replay
        if self.check:
            self.stream.synchronize()
            if not bool(to_numpy(self.out.losses["status"]).all()):
                return self._redo()
        return self.out

    def _eager(self, check=None):
        return objective_step(self.x, self.params, self.cfg, self.obj, self._dy(), valid_mask=self.valid_mask,
                              batch_shape=self.batch_shape, check=self.check if check is None else check,
                              keep_cache=self.keep_cache, capacity=self.capacity)

    def _redo(self):
        """The step eagerly (exact), and a new capture with a capacity that fits this batch."""
        result = self._eager(check=True)
        needed = self._capacity_for(self.x)
        if needed > self.capacity:
            self.capacity = needed
            self.graph = self.out = None
            self._capture()
        return result
