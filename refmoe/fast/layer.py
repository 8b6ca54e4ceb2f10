r"""The layer of ``refmoe.layer`` on the fused kernels of ``refmoe.fast.kernels``, for the objective step.

Dimension letters: N tokens, D model width, H expert hidden width, E routed experts, K top-k, A = N*K
assignments, C rows per expert (padded layout), R rows of the experts' layout, Hs the shared hidden width.

The same composition as ``refmoe.layer`` (router -> top-k -> gates -> experts -> combine + shared experts),
with three differences that exist only for speed:

* routing (softmax, top-k of the logits, gates) is one kernel per step direction;
* the assignments are placed without a sort: the rank of assignment a within its expert is the running count
  of that expert up to a (a cumulative sum of the [A, E] one-hot), so the layout is computed on the device.
  ``layout="padded"`` (the default on CuPy) gives expert e the rows e*C .. e*C + C - 1, C = the largest load
  (one device->host read) or the ``capacity`` passed in (no read; loads above it are reported by
  ``Plan.fits``), and runs each projection as one batched product over [E, C, .]; ``layout="sorted"``
  (the default on NumPy) puts the experts' rows one after another and runs each projection as one grouped
  product over the experts' own rows (:class:`PerExpertProducts`; one product per expert on NumPy);
* the backward consumes the forward's buffers (:class:`Tape`): each is dropped once its last reader ran,
  and the SwiGLU backward writes (h, da, db) over (dh, a, b). The backward runs once per forward.

Supported: the configurations :func:`unsupported` returns None for (softmax scores selected on the logits, no
bias, groups, capacity or shared gate); ``refmoe.fast.objective_step`` sends the others to the core layer.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_namespace, to_numpy
from ..config import MoEConfig
from . import kernels as kn
from .blas import grouped_matmul, matmul as mm


def unsupported(cfg: MoEConfig):
    """Why the fast layer cannot run ``cfg`` (a short string), or None when it can."""
    checks = {"score_function": cfg.score_function == "softmax", "select_on": cfg.select_on == "logits",
              "gates": cfg.gates == "selected", "expert_bias": not cfg.expert_bias,
              "n_group": cfg.n_group is None and cfg.topk_group is None, "capacity_factor": cfg.capacity_factor is None,
              "shared_gate": not cfg.shared_gate}
    bad = [k for k, ok in checks.items() if not ok]
    return None if not bad else "fast layer does not cover " + ", ".join(bad)


def _renorm(cfg: MoEConfig) -> bool:
    return cfg.renorm_mode == "always" or (cfg.renorm_mode == "k_gt_1" and cfg.top_k > 1)


# ----------------------------------------------------------------------------------------------
# the experts' layout
# ----------------------------------------------------------------------------------------------

class Plan:
    """Where every assignment sits in the experts' layout.

    slot     [N, K] int64 row of assignment (n, k), -1 when it does not fit (padded layout, load > C)
    src      [R] int64 assignment n*K + k of each row, -1 for a padding row
    token    [R] int64 token of each row, -1 for a padding row
    layout   "padded" (R = E*C) or "sorted" (R = A)
    C        rows per expert (padded), or None
    offsets  E + 1 host ints (sorted layout): expert e holds rows offsets[e] .. offsets[e+1] - 1
    fits     0-d bool array: every load <= C (always True for the sorted layout)
    """

    def __init__(self, slot, src, token, layout, C, offsets, fits):
        self.slot, self.src, self.token = slot, src, token
        self.layout, self.C, self.offsets, self.fits = layout, C, offsets, fits


def expert_ranks(topk_idx, n_experts: int):
    """(flat [A], rank [A], counts [E]): the expert of each flat assignment, its place among that expert's
    assignments in token order, and the loads; int64, on the device, no sort and no host read."""
    xp = array_namespace(topk_idx)
    flat = topk_idx.reshape(-1).astype(np.int64, copy=False)                     # [A]
    onehot = (flat[:, None] == xp.arange(n_experts)[None, :]).astype(np.int32)   # [A, E]
    running = xp.cumsum(onehot, axis=0, dtype=np.int32)                          # [A, E] running loads
    counts = running[-1].astype(np.int64)                                        # [E]
    rank = xp.take_along_axis(running, flat[:, None], axis=1)[:, 0].astype(np.int64) - 1   # [A]
    return flat, rank, counts


def plan_rows(topk_idx, n_experts: int, layout: str, capacity=None) -> Plan:
    r"""The experts' layout of the assignments ``topk_idx`` [N, K], without a sort.

    .. math:: \mathrm{rank}_a = \#\{a' < a : e_{a'} = e_a\},\qquad
              \mathrm{row}_a = e_a C + \mathrm{rank}_a\ \text{(padded)}\ \text{or}\ \mathrm{start}_{e_a} + \mathrm{rank}_a

    Host reads: the sorted layout reads the E counts (for its per-expert loop); the padded one reads their
    maximum unless ``capacity`` is given. Integer work: zero gradient.
    """
    xp = array_namespace(topk_idx)
    N, K = topk_idx.shape
    A, E = N * K, n_experts
    flat, rank, counts = expert_ranks(topk_idx, E)                               # [A], [A], [E]
    if layout == "sorted":
        host = to_numpy(counts)
        offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(host)]))
        start = xp.cumsum(counts) - counts                                       # [E]
        row = start[flat] + rank                                                 # [A] a permutation of A rows
        R, C, fits = A, None, xp.ones((), dtype=bool)
    elif layout == "padded":
        C = int(to_numpy(counts.max())) if capacity is None else int(capacity)
        fits = counts.max() <= C
        row = xp.where(rank < C, flat * C + rank, -1)                            # [A]
        R, offsets = E * C, None
    else:
        raise ValueError(f"layout={layout!r}; expected 'padded' or 'sorted'")
    src = xp.full(R + 1, -1, dtype=np.int64)                                     # the last entry takes misfits
    src[xp.where(row >= 0, row, R)] = xp.arange(A, dtype=np.int64)               # distinct rows: exact
    src = src[:R]
    token = xp.where(src >= 0, src // K, -1)
    return Plan(row.reshape(N, K), src, token, layout, C, offsets, fits)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

class Tape:
    """The forward's buffers for the one backward; the backward sets each to None after its last use."""

    def __init__(self, **arrays):
        self.__dict__.update(arrays)

    def take(self, name):
        value = self.__dict__[name]
        self.__dict__[name] = None
        return value


class Products:
    """The two kinds of product a SwiGLU needs, on rows that are all one expert's (the shared experts) or
    batched over a leading expert axis (the padded [E, C, .] layout):

    by_weight(rows, w, out=None, accumulate=False)   rows @ w        [M, P] @ [P, Q] -> [M, Q]
    weight_grad(rows, d)                             rows^T @ d      [M, P], [M, Q] -> [P, Q]
    """

    def __init__(self, xp):
        self.xp = xp

    def by_weight(self, rows, w, out=None, accumulate=False):
        return mm(self.xp, rows, w, out=out, accumulate=accumulate)

    def weight_grad(self, rows, d):
        return mm(self.xp, rows.swapaxes(-1, -2), d)


class PerExpertProducts(Products):
    """The same products on the sorted layout: rows [R, .] where expert e holds rows offsets[e] .. offsets[e+1]-1,
    weights [E, ., .]; each product is one grouped call over the experts (``blas.grouped_matmul``), and an
    expert without rows gets a zero weight gradient."""

    def __init__(self, xp, offsets):
        super().__init__(xp)
        self.spans = list(zip(offsets[:-1], offsets[1:]))

    def by_weight(self, rows, w, out=None, accumulate=False):
        if out is None:
            out = self.xp.empty((rows.shape[0], w.shape[-1]), dtype=rows.dtype)
        grouped_matmul(self.xp, [(rows[lo:hi], w[e], out[lo:hi]) for e, (lo, hi) in enumerate(self.spans)
                                 if lo < hi], accumulate=accumulate)
        return out

    def weight_grad(self, rows, d):
        out = self.xp.empty((len(self.spans), rows.shape[1], d.shape[1]), dtype=rows.dtype)
        grouped_matmul(self.xp, [(rows[lo:hi].T, d[lo:hi], out[e]) for e, (lo, hi) in enumerate(self.spans)])
        return out


def _products(xp, plan: Plan) -> Products:
    return Products(xp) if plan.layout == "padded" else PerExpertProducts(xp, plan.offsets)


def _swiglu_forward(pr: Products, x, w_gate, w_up, w_down):
    """(out, a, b): out = (silu(x Wg) * (x Wu)) Wd, with the products of ``pr``."""
    a = pr.by_weight(x, w_gate)                                                   # [M, H]
    b = pr.by_weight(x, w_up)                                                     # [M, H]
    h = kn.swiglu_forward_ew(pr.xp, a, b)                                         # [M, H]
    return pr.by_weight(h, w_down), a, b


def _swiglu_backward(pr: Products, dout, operands, w_gate, w_up, w_down, dx=None, accumulate=False):
    """(dx, dw_gate, dw_up, dw_down) of :func:`_swiglu_forward`.

    operands: [x, a, b], handed over (the list is emptied: a and b are overwritten and each buffer is freed
    after its last product, da before dw_up is allocated). dx: None (a new [M, D] array), an [M, D] buffer
    the gradient of x is written into (it may be ``dout``'s own, last read before), or, with
    ``accumulate``, the buffer it is added to.
    """
    x, a, b = operands
    operands.clear()
    dh = pr.by_weight(dout, w_down.swapaxes(-1, -2))                              # [M, H]
    h, da, db = kn.swiglu_backward_ew(pr.xp, dh, a, b)                            # over (dh, a, b)
    del dh, a, b
    dw_down = pr.weight_grad(h, dout)                                             # [H, D]
    del h
    dw_gate = pr.weight_grad(x, da)                                               # [D, H]
    dx = pr.by_weight(da, w_gate.swapaxes(-1, -2), out=dx, accumulate=accumulate)   # [M, D]
    del da
    dw_up = pr.weight_grad(x, db)                                                 # [D, H]
    del x
    pr.by_weight(db, w_up.swapaxes(-1, -2), out=dx, accumulate=True)
    return dx, dw_gate, dw_up, dw_down


def _experts_forward(xp, x_rows, params, plan: Plan):
    """Outputs in the layout [R, D]; a, b [R, H] kept for the backward."""
    wg, wu, wd = params["w_gate"], params["w_up"], params["w_down"]
    E, D, H = wg.shape
    if plan.layout == "padded":
        x_rows = x_rows.reshape(E, plan.C, D)                                     # [E, C, D]
    out, a, b = _swiglu_forward(_products(xp, plan), x_rows, wg, wu, wd)
    return out.reshape(-1, D), a.reshape(-1, H), b.reshape(-1, H)


def layer_forward(x, params: dict, cfg: MoEConfig, *, layout=None, capacity=None):
    """Forward of the layer.  x: [N, D] -> (y [N, D], expert_out [N, K, D], Tape).

    The caller checked the inputs (``refmoe.fast.objective_step`` does, once per step). ``layout`` None is
    "padded" on CuPy and "sorted" on NumPy. The Tape also holds the reader's intermediates: logits, scores,
    topk_idx, gates, shared_out, and expert_out (the backward drops it once read: a caller that drops its own
    reference before the backward frees those [N, K, D] early).
    """
    xp = array_namespace(x)
    layout = layout or ("padded" if xp.__name__ == "cupy" else "sorted")
    N, D = x.shape
    renorm = _renorm(cfg)
    logits = mm(xp, x, params["w_router"].T)                                      # [N, E]
    scores, topk_idx, gates, denom = kn.softmax_topk(xp, logits, cfg.top_k, renorm, float(cfg.gate_eps),
                                                     float(cfg.routed_scaling_factor))   # [N, E], [N, K], [N]
    plan = plan_rows(topk_idx, cfg.n_experts, layout, capacity)
    x_rows = kn.gather_rows(xp, x, plan.token)                                    # [R, D]
    out_rows, a, b = _experts_forward(xp, x_rows, params, plan)                   # [R, D], [R, H] x2
    expert_out = kn.gather_rows(xp, out_rows, plan.slot.reshape(-1)).reshape(N, cfg.top_k, D)   # [N, K, D]
    del out_rows
    shared_out = a_s = b_s = None
    if cfg.n_shared:
        shared_out, a_s, b_s = _swiglu_forward(Products(xp), x, params["shared_w_gate"], params["shared_w_up"],
                                               params["shared_w_down"])           # [N, D], [N, Hs] x2
    y = kn.combine(xp, gates, expert_out, shared_out)                             # [N, D]
    tape = Tape(x=x, params=params, cfg=cfg, renorm=renorm, logits=logits, scores=scores, topk_idx=topk_idx,
                gates=gates, denom=denom, plan=plan, x_rows=x_rows, a=a, b=b, a_s=a_s, b_s=b_s,
                shared_out=shared_out, expert_out=expert_out, d_expert_out=None)
    return y, expert_out, tape


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

def layer_backward(dy, tape: Tape, d_scores=None, d_expert_out=None) -> dict:
    """Gradients of <dy, y> + <d_scores, scores> + <d_expert_out, expert_out> for x and every parameter.

    dy [N, D], d_scores [N, E] or None, d_expert_out [N, K, D] or None. Consumes ``tape``, expert_out
    included. ``d_expert_out`` may instead be left on the tape (``tape.d_expert_out``), which the backward
    drops after its one use: so a caller holds neither [N, K, D] array through the backward.
    """
    xp = array_namespace(dy)
    t, cfg, p = tape, tape.cfg, tape.params
    grads = {}
    expert_out = t.take("expert_out")
    if d_expert_out is None:
        d_expert_out = t.take("d_expert_out")
    d_gates = mm(xp, expert_out, dy[:, :, None])[:, :, 0]                        # combine: [N, K]
    del expert_out
    plan = t.plan
    d_rows = kn.combine_backward_rows(xp, t.gates, dy, d_expert_out, plan.src)    # combine: [R, D]
    del d_expert_out
    d_logits = kn.router_backward(xp, d_gates, t.scores, t.topk_idx, t.denom, t.renorm,
                                  float(cfg.routed_scaling_factor), d_scores)     # router: [N, E]
    dx_base = mm(xp, d_logits, p["w_router"])                                    # router: [N, D]
    grads["w_router"] = mm(xp, d_logits.T, t.x)                                   # [E, D]
    del d_logits
    if cfg.n_shared:                                                              # shared experts, added
        _, grads["shared_w_gate"], grads["shared_w_up"], grads["shared_w_down"] = _swiglu_backward(
            Products(xp), dy, [t.x, t.take("a_s"), t.take("b_s")], p["shared_w_gate"], p["shared_w_up"],
            p["shared_w_down"], dx=dx_base, accumulate=True)
    dx_rows, grads["w_gate"], grads["w_up"], grads["w_down"] = _experts_backward(xp, d_rows, t)   # [R, D]
    del d_rows
    grads["x"] = kn.slot_sum(xp, dx_rows, plan.slot, dx_base)                     # [N, D] fan-in of x
    return grads


def _experts_backward(xp, d_rows, t: Tape):
    wg, wu, wd = t.params["w_gate"], t.params["w_up"], t.params["w_down"]
    E, D, H = wg.shape
    plan = t.plan
    shape = (E, plan.C) if plan.layout == "padded" else (-1,)                     # [E, C, .] or [R, .]
    d_out = d_rows.reshape(*shape, D)                                             # its buffer takes dx
    operands = [t.take("x_rows").reshape(*shape, D), t.take("a").reshape(*shape, H), t.take("b").reshape(*shape, H)]
    dx, dwg, dwu, dwd = _swiglu_backward(_products(xp, plan), d_out, operands, wg, wu, wd, dx=d_out)
    return dx.reshape(-1, D), dwg, dwu, dwd
