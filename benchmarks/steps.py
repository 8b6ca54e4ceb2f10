"""The two implementations of one benchmark step (refmoe and PyTorch eager), on the same inputs.

A step: layer forward, L_aux + L_o + L_v forward, their gradients into one layer backward, with a fixed
task gradient dy. Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import refmoe.fast
from refmoe import moe_backward, moe_forward
from refmoe.losses import aux_loss_backward, aux_loss_forward
from refmoe.losses.ortho import ortho_loss_backward, ortho_loss_forward
from refmoe.losses.variance import var_loss_backward, var_loss_forward

COEF = 1e-3   # alpha = beta = gamma (the value does not change the work done)


def loss_functions(proposed=False):
    """refmoe's L_o / L_v; proposed=True: L_o from refmoe.fast.ortho_gram (the Gram/Cholesky form)."""
    if proposed:
        return refmoe.fast.ortho_gram.ortho_loss_forward, refmoe.fast.ortho_gram.ortho_loss_backward, \
            var_loss_forward, var_loss_backward
    return ortho_loss_forward, ortho_loss_backward, var_loss_forward, var_loss_backward


def loss_source():
    return loss_functions()[0].__module__


# ----------------------------------------------------------------------------------------------
# the two implementations of one step
# ----------------------------------------------------------------------------------------------

class RefmoeStep:
    def __init__(self, x, params, cfg, dy, preset, batch_shape, batching="auto", proposed=False):
        ortho_loss_forward, ortho_loss_backward, var_loss_forward, var_loss_backward = loss_functions(proposed)
        self.o_f, self.o_b, self.v_f, self.v_b = ortho_loss_forward, ortho_loss_backward, var_loss_forward, \
            var_loss_backward
        self.x, self.params, self.cfg, self.dy, self.batch_shape = x, params, cfg, dy, batch_shape
        self.aux_v, self.ortho_v, self.var_v, self.eps = preset
        self.batching = batching

    def aux(self, cache):
        loss, c = aux_loss_forward(cache.scores, cache.topk_idx, self.aux_v, batch_shape=self.batch_shape)
        # astype: deepseek_seq returns float64 for float32 scores (n_used is an integer 0-d array)
        return loss, aux_loss_backward(COEF, c).astype(cache.scores.dtype, copy=False)

    def ortho(self, cache):
        loss, c = self.o_f(cache.expert_out, self.ortho_v, eps=self.eps, topk_idx=cache.topk_idx)
        return loss, self.o_b(COEF, c)

    def var(self, cache):
        loss, c = self.v_f(cache.scores, cache.topk_idx, self.var_v)
        return loss, self.v_b(COEF, c)

    def forward(self):
        """"loop": the core layer (one SwiGLU per expert); "auto" / "padded": refmoe.fast (batched experts)."""
        forward = moe_forward if self.batching == "loop" else refmoe.fast.moe_forward
        return forward(self.x, self.params, self.cfg)

    def resident_bytes(self):
        return sum(int(a.nbytes) for a in [self.x, self.dy, *self.params.values()])

    def __call__(self):
        y, cache = self.forward()
        l_aux, d_aux = self.aux(cache)
        l_o, d_eo = self.ortho(cache)
        l_v, d_var = self.var(cache)
        grads = moe_backward(self.dy, cache, d_scores=d_aux + d_var, d_expert_out=d_eo)
        return y, grads, (l_aux, l_o, l_v)


class TorchStep:
    def __init__(self, x, params, cfg, dy, preset, batch_shape, device, dispatch):
        import torch
        import torch_moe
        self.torch, self.tm = torch, torch_moe
        self.x = torch.as_tensor(x).to(device).requires_grad_(True)
        self.dy = torch.as_tensor(dy).to(device)
        self.p = torch_moe.to_torch(params, device)
        self.cfg, self.batch_shape, self.dispatch = cfg, batch_shape, dispatch
        self.aux_v, self.ortho_v, self.var_v, eps = preset
        self.eps = 0.0 if eps is None else eps

    def clear_grads(self):
        for t in [self.x, *self.p.values()]:
            t.grad = None

    def resident_bytes(self):
        return sum(t.numel() * t.element_size() for t in [self.x, self.dy, *self.p.values()])

    def losses(self, scores, idx, eo, em):
        tm = self.tm
        return (tm.aux_loss(scores, idx, self.aux_v, self.batch_shape),
                tm.ortho_loss(eo, em, self.ortho_v, self.eps),
                tm.var_loss(scores, idx, self.var_v))

    def __call__(self):
        for t in [self.x, *self.p.values()]:
            t.grad = None
        y, scores, idx, eo, em = self.tm.layer_forward(self.x, self.p, self.cfg, self.dispatch)
        l_aux, l_o, l_v = self.losses(scores, idx, eo, em)
        total = (y * self.dy).sum() + COEF * (l_aux + l_o + l_v)
        total.backward()
        grads = {k: v.grad for k, v in self.p.items()}
        grads["x"] = self.x.grad
        return y, grads, (l_aux, l_o, l_v)

    def loss_parts(self):
        """Leaf copies of the losses' inputs, for timing each loss's forward+backward alone."""
        with self.torch.no_grad():
            _, scores, idx, eo, em = self.tm.layer_forward(self.x, self.p, self.cfg, self.dispatch)
        return scores.detach(), idx, eo.detach(), em.detach()
