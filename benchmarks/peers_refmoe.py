"""refmoe's side of ``bench_peers.py``: the objective step in five variants, and where its time goes.

Dimension letters: N tokens, D model, E experts, K top-k.

    refmoe            refmoe.fast.objective_step(x, params, cfg, obj, dy, keep_cache=False): the fused kernels,
                      one host read for C and one for the status
    refmoe_sorted     the same with layout="sorted": the experts' own rows (no padding), each projection one
                      grouped cuBLAS call (one host read of the E loads)
    refmoe_graph      refmoe.fast.GraphedStep(x, params, cfg, obj, dy)(): the same step replayed from a CUDA
                      graph (static C; eager where capture is impossible, e.g. on NumPy)
    refmoe_objective  refmoe.objective_forward_backward(x, params, cfg, dy, obj, per_term=False,
                      forward=refmoe.fast.moe_forward): the earlier fast path (padded experts, core losses)
    refmoe_core       the same with forward=refmoe.moe_forward (the reading path: one expert at a time)
    refmoe_gram  refmoe.fast.moe_forward, L_o from refmoe.fast.ortho_gram, L_aux / L_v from refmoe.losses,
                 one moe_backward with the injections summed (what the objective does, by hand)
"""
from __future__ import annotations

import time

import numpy as np

import refmoe
import refmoe.fast
from refmoe import moe_backward, to_numpy
from refmoe.fast import layer as fast_layer
from refmoe.fast import losses as fast_losses
from refmoe.checks import mask_weights
from refmoe.losses.terms import term_backward, term_forward

from peers_env import objective_of


class RefmoePeer:
    """``step()`` -> (y, grads {name, 'x'}, losses (aux, ortho, var)) of the total objective."""

    def __init__(self, inp, preset, backend, variant="refmoe"):
        xp = refmoe.get_xp(backend)
        self.x, self.dy = xp.asarray(inp.x), xp.asarray(inp.dy)
        self.params = {k: xp.asarray(v) for k, v in inp.params.items()}
        self.cfg, self.batch_shape, self.preset, self.variant = inp.cfg, inp.batch_shape, preset, variant
        self.obj = objective_of(preset)
        self.forward = refmoe.moe_forward if variant == "refmoe_core" else refmoe.fast.moe_forward
        self.graphed = None
        if variant == "refmoe_graph":
            self.graphed = refmoe.fast.GraphedStep(self.x, self.params, self.cfg, self.obj, self.dy,
                                                   batch_shape=self.batch_shape)
            print(f"  refmoe_graph: mode {self.graphed.mode}" + (f" ({self.graphed.reason})"
                  if self.graphed.reason else f", C = {self.graphed.capacity}"), flush=True)

    def step(self):
        if self.variant == "refmoe_gram":
            return self._step_gram()
        if self.variant in ("refmoe", "refmoe_sorted", "refmoe_graph"):
            layout = "sorted" if self.variant == "refmoe_sorted" else None
            r = self.graphed() if self.graphed is not None else refmoe.fast.objective_step(
                self.x, self.params, self.cfg, self.obj, self.dy, batch_shape=self.batch_shape, keep_cache=False,
                layout=layout)
            return r.y, r.grads["total"], (r.losses["aux"], r.losses["ortho"], r.losses["var"])
        r = refmoe.objective_forward_backward(self.x, self.params, self.cfg, self.dy, self.obj, per_term=False,
                                              batch_shape=self.batch_shape, forward=self.forward)
        return r.y, r.grads["total"], (r.losses["aux"], r.losses["ortho"], r.losses["var"])

    def _step_gram(self):
        pr = self.preset
        y, cache = self.forward(self.x, self.params, self.cfg)
        l_aux, d_aux = self.loss(cache, "aux", pr.aux, pr.alpha)
        l_o, c_o = refmoe.fast.ortho_gram.ortho_loss_forward(cache.expert_out, pr.ortho, eps=pr.ortho_eps,
                                                             topk_idx=cache.topk_idx)
        d_eo = refmoe.fast.ortho_gram.ortho_loss_backward(pr.beta, c_o)          # [N, K, D]
        l_v, d_var = self.loss(cache, "var", pr.var, pr.gamma)
        grads = moe_backward(self.dy, cache, d_scores=d_aux + d_var, d_expert_out=d_eo)
        return y, grads, (l_aux, l_o, l_v)

    def loss(self, cache, term, form, coef):
        """(value, injection) of one regulariser on the layer's cache, through refmoe.losses.terms."""
        eps = self.preset.ortho_eps if term == "ortho" else None
        value, tc = term_forward(term, form, cache, batch_shape=self.batch_shape, eps=eps)
        inj = term_backward(float(coef), tc)
        return value, inj.d_scores if inj.d_expert_out is None else inj.d_expert_out

    def resident_bytes(self):
        return sum(int(a.nbytes) for a in [self.x, self.dy, *self.params.values()])

    def graph_pool_bytes(self):
        """Bytes of the CUDA graph's private pool (refmoe_graph in graph mode), else None."""
        g = self.graphed
        return None if g is None or g.mode != "graph" else int(g.pool.total_bytes())

    def sync(self):
        pass


# ----------------------------------------------------------------------------------------------
# --profile: where the time goes
# ----------------------------------------------------------------------------------------------

def _timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def profile_fast(peer: RefmoePeer, sync, reps: int, jax_peer=None) -> dict:
    """Median seconds of the phases of ``refmoe.fast.objective_step`` (each synchronised on a GPU): the layer
    forward (routing kernel, the capacity read, gathers, batched SwiGLU, combine), each regulariser's forward +
    backward on its outputs, the layer backward with the injections, and the status read; ``step`` = the
    whole ``objective_step``. With a JAX peer also ``jax_layer_only`` (see :func:`profile_refmoe`)."""
    obj, cfg, xp = peer.obj, peer.cfg, refmoe.array_namespace(peer.x)
    forms = obj.forms
    eps = refmoe.ORTHO_VARIANTS[forms["ortho"]].default_eps if obj.ortho_eps is None else obj.ortho_eps
    ph = {}
    for rep in range(reps + 1):
        t = {}
        t["layer_forward"], (y, eo, tape) = _timed(lambda: fast_layer.layer_forward(peer.x, peer.params, cfg), sync)
        valid = mask_weights(None, peer.x.shape[0], peer.x.dtype, xp)
        t["aux"], (l_a, d_a, _) = _timed(lambda: fast_losses.aux(tape.scores, tape.topk_idx, forms["aux"], obj.alpha,
                                                                 valid, peer.batch_shape), sync)
        t["var"], (l_v, d_v, _) = _timed(lambda: fast_losses.var(tape.scores, tape.topk_idx, forms["var"], obj.gamma,
                                                                 valid), sync)
        t["ortho_" + forms["ortho"]], (l_o, d_eo, ok) = _timed(lambda: fast_losses.ortho(
            eo, forms["ortho"], obj.beta, eps, valid, tape.topk_idx, cfg.n_experts), sync)
        t["layer_backward"], grads = _timed(lambda: fast_layer.layer_backward(peer.dy, tape, d_scores=d_a + d_v,
                                                                             d_expert_out=d_eo), sync)
        t["status_read"], _ = _timed(lambda: bool(to_numpy(xp.stack([xp.isfinite(y.sum()),
                                                                       *[xp.isfinite(g.sum()) for g in grads.values()]])).all()), sync)
        del y, eo, tape, d_a, d_v, d_eo, grads
        t["step"], _ = _timed(lambda: refmoe.fast.objective_step(peer.x, peer.params, cfg, obj, peer.dy,
                                                                 batch_shape=peer.batch_shape, keep_cache=False), sync)
        if rep:
            for k, v in t.items():
                ph.setdefault(k, []).append(v)
    if jax_peer is not None:
        ph["jax_layer_only"] = _jax_layer_only(jax_peer, reps)
    return {k: float(np.median(v)) for k, v in ph.items()}


def profile_refmoe(peer: RefmoePeer, sync, reps: int, jax_peer=None) -> dict:
    """Median seconds of refmoe's phases (each synchronised on a GPU): layer forward, each regulariser's
    forward + backward on the layer's cache, the one layer backward with the injections; ``layer_only``
    = forward + backward of the task term alone. With a JAX peer also ``jax_layer_only``: its jitted
    value_and_grad of <dy, y> alone (same layer, no regulariser), to split JAX's step the same way."""
    pr = peer.preset
    ph = {}
    for rep in range(reps + 1):
        t = {}
        t["layer_forward"], (y, cache) = _timed(lambda: peer.forward(peer.x, peer.params, peer.cfg), sync)
        t["aux"], (_, d_aux) = _timed(lambda: peer.loss(cache, "aux", pr.aux, pr.alpha), sync)
        t["ortho"], (_, d_eo) = _timed(lambda: peer.loss(cache, "ortho", pr.ortho, pr.beta), sync)
        t["var"], (_, d_var) = _timed(lambda: peer.loss(cache, "var", pr.var, pr.gamma), sync)
        t["layer_backward"], _ = _timed(lambda: moe_backward(peer.dy, cache, d_scores=d_aux + d_var,
                                                             d_expert_out=d_eo), sync)
        t["layer_only"], _ = _timed(lambda: moe_backward(peer.dy, *peer.forward(peer.x, peer.params, peer.cfg)[1:]),
                                    sync)
        if rep:
            for k, v in t.items():
                ph.setdefault(k, []).append(v)
        del y, cache, d_aux, d_eo, d_var
    if jax_peer is not None:
        ph["jax_layer_only"] = _jax_layer_only(jax_peer, reps)
    return {k: float(np.median(v)) for k, v in ph.items()}


def _jax_layer_only(jp, reps):
    import jax

    import peers_jax

    cfg, C = jp.cfg, jp.capacity
    f = jax.jit(jax.value_and_grad(lambda p, x, dy: (peers_jax.layer_forward(p, x, cfg, C)[0] * dy).sum(),
                                   argnums=(0, 1)))
    jax.block_until_ready(f(jp.p, jp.x, jp.dy))               # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(jp.p, jp.x, jp.dy))
        times.append(time.perf_counter() - t0)
    return times
