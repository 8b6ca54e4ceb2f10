"""The PyTorch peers of ``bench_peers.py``: one objective step by eager autograd, in two dispatch plans.

Benchmark-only code (refmoe never imports torch). Dimension letters: N tokens, D model, H expert hidden,
E experts, K top-k, A = N*K assignments, C rows per expert (the static capacity).

``batched``  the plan a user who wants speed writes (and refmoe.fast uses): a padded [E, C, D] layout with
             the static capacity C given by the caller (the largest expert load, computed once outside the
             timing, so the step never reads a count back to the host), ``torch.bmm`` for the three
             projections of every expert at once, gathers in and out by row index.
``loop``     the authors' ``modeling_deepseek.py`` training path: tokens repeated K times, one boolean mask
             per expert, one SwiGLU per expert (``torch_moe.layer_forward(dispatch="authors")``).

The losses are the ones of ``torch_moe`` (the formulas of docs/spec.md, section 2) for both plans; the
``span`` L_o is the authors' Gram-Schmidt loop there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_moe


# ----------------------------------------------------------------------------------------------
# the padded plan
# ----------------------------------------------------------------------------------------------

def padded_rows(topk_idx, n_experts: int, capacity: int):
    """slot [A]: the row e*C + rank of every flat (token, slot) assignment; rank = its place within expert e
    in token order (one stable sort, no host read). Integer work: no gradient."""
    A = topk_idx.numel()
    flat = topk_idx.reshape(-1)                                        # [A]
    order = torch.argsort(flat, stable=True)                           # [A]
    counts = torch.bincount(flat, minlength=n_experts)                 # [E]
    start = torch.cumsum(counts, 0) - counts                           # [E]
    expert_sorted = flat[order]                                        # [A]
    rank = torch.arange(A, device=flat.device) - start[expert_sorted]  # [A]
    slot = torch.empty_like(order)
    slot[order] = expert_sorted * capacity + rank                      # a permutation into E*C rows
    return slot


def batched_layer_forward(x, p, cfg, capacity: int):
    """Returns (y [N, D], scores [N, E], topk_idx [N, K], expert_out [N, K, D]); capacity = C >= max load."""
    N, D = x.shape
    K, E, C = cfg.top_k, cfg.n_experts, capacity
    logits = x @ p["w_router"].T                                       # [N, E]
    scores = logits.softmax(dim=-1)                                    # [N, E]
    sel, topk_idx = torch.topk(scores, K, dim=-1)                      # [N, K]
    gates = sel / sel.sum(dim=-1, keepdim=True) if cfg.norm_topk_prob else sel
    slot = padded_rows(topk_idx, E, C)                                 # [A]
    token_of_row = torch.full((E * C,), N, dtype=slot.dtype, device=x.device)
    token_of_row[slot] = torch.arange(N * K, device=x.device) // K     # padding rows read row N (zeros)
    x_ext = F.pad(x, (0, 0, 0, 1))                                     # [N+1, D]
    x_pad = x_ext[token_of_row].view(E, C, D)                          # [E, C, D]
    h = F.silu(torch.bmm(x_pad, p["w_gate"])) * torch.bmm(x_pad, p["w_up"])   # [E, C, H]
    out_pad = torch.bmm(h, p["w_down"])                                # [E, C, D]
    expert_out = out_pad.view(E * C, D).index_select(0, slot).view(N, K, D)
    y = torch.einsum("nk,nkd->nd", gates, expert_out)                  # [N, D]
    if cfg.n_shared:
        y = y + torch_moe.swiglu(x, p["shared_w_gate"], p["shared_w_up"], p["shared_w_down"])
    return y, scores, topk_idx, expert_out


# ----------------------------------------------------------------------------------------------
# one step: forward, the three losses, autograd of the total
# ----------------------------------------------------------------------------------------------

class TorchPeer:
    """``step()`` -> (y, grads {name: tensor, 'x'}, losses (aux, ortho, var)) of
    total = <dy, y> + alpha L_aux + beta L_o + gamma L_v.

    xh, dyh, host_params  host arrays (the same values refmoe gets); preset: ``bench_peers.Preset``
    """

    def __init__(self, xh, host_params, cfg, dyh, preset, batch_shape, device, plan, capacity):
        self.x = torch.as_tensor(xh).to(device).requires_grad_(True)
        self.dy = torch.as_tensor(dyh).to(device)
        self.p = torch_moe.to_torch(host_params, device)
        self.cfg, self.preset, self.batch_shape = cfg, preset, batch_shape
        self.plan, self.capacity, self.device = plan, capacity, device
        if plan not in ("batched", "loop"):
            raise ValueError(f"plan={plan!r}; expected 'batched' or 'loop'")

    def layer(self):
        """(y, scores, topk_idx, expert_out [N, K, D] token-major, the rows the L_o variant reads)."""
        if self.plan == "batched":
            y, scores, idx, eo = batched_layer_forward(self.x, self.p, self.cfg, self.capacity)
            return y, scores, idx, eo, eo
        return torch_moe.layer_forward(self.x, self.p, self.cfg, dispatch="authors")

    def losses(self, scores, idx, eo, em):
        pr = self.preset
        if pr.ortho == "span_code_grouping" and self.plan == "batched":
            raise ValueError("the batched torch peer has no expert-major buffer for span_code_grouping")
        if pr.ortho.startswith("span") and pr.ortho_eps != 1e-6:
            raise ValueError(f"torch_moe's span L_o is the authors' loop with eps = 1e-6, not {pr.ortho_eps}")
        return (torch_moe.aux_loss(scores, idx, pr.aux, self.batch_shape),
                torch_moe.ortho_loss(eo, em, pr.ortho, pr.ortho_eps),
                torch_moe.var_loss(scores, idx, pr.var))

    def clear_grads(self):
        for t in [self.x, *self.p.values()]:
            t.grad = None

    def resident_bytes(self):
        return sum(t.numel() * t.element_size() for t in [self.x, self.dy, *self.p.values()])

    def step(self):
        self.clear_grads()
        pr = self.preset
        y, scores, idx, eo, em = self.layer()
        l_aux, l_o, l_v = self.losses(scores, idx, eo, em)
        total = (y * self.dy).sum() + pr.alpha * l_aux + pr.beta * l_o + pr.gamma * l_v
        total.backward()
        grads = {k: v.grad for k, v in self.p.items()}
        grads["x"] = self.x.grad
        return y, grads, (l_aux.detach(), l_o.detach(), l_v.detach())

    def sync(self):
        if self.device != "cpu":
            torch.cuda.synchronize()
