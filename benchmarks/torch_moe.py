"""PyTorch eager baseline of the refmoe layer and its three losses, differentiated by autograd.

Benchmark-only code: refmoe itself never imports torch. Two dispatch styles are provided:

``authors``  the training path of the authors' ``modeling_deepseek.py`` (DeepseekMoE.forward): tokens
             repeated K times, one boolean mask per expert, outputs written back with a masked store.
             The span_code_grouping L_o reads the per-expert outputs concatenated expert-major, as there.
``sorted``   one stable sort of the N*K assignments and contiguous per-expert matmuls (the same plan as
             refmoe); a tuned eager baseline.

Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_torch(params: dict, device, requires_grad=True) -> dict:
    """Host float arrays -> leaf tensors on ``device`` (same values as refmoe's parameters)."""
    out = {}
    for k, v in params.items():
        t = torch.as_tensor(v).to(device)
        out[k] = t.requires_grad_(requires_grad)
    return out


def swiglu(x, w_gate, w_up, w_down):
    """(silu(x Wg) * (x Wu)) Wd with refmoe's [D, H] / [H, D] weight layout."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------

def layer_forward(x, p, cfg, dispatch="sorted"):
    """Returns (y [N, D], scores [N, E], topk_idx [N, K], expert_out [N, K, D], expert_major [N, K, D])."""
    N, D = x.shape
    K, E = cfg.top_k, cfg.n_experts
    logits = x @ p["w_router"].T                                   # [N, E]
    scores = logits.softmax(dim=-1)                                # [N, E]
    sel, topk_idx = torch.topk(scores, K, dim=-1)                  # [N, K]
    gates = sel / sel.sum(dim=-1, keepdim=True) if cfg.norm_topk_prob else sel
    flat = topk_idx.reshape(-1)                                    # [N*K]
    if dispatch == "authors":
        xr = x.repeat_interleave(K, dim=0)                         # [N*K, D]
        y_flat = torch.empty_like(xr)
        outs = []
        for e in range(E):
            mask = flat == e
            if mask.any():
                o = swiglu(xr[mask], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
                y_flat[mask] = o
                outs.append(o)
        expert_major = torch.cat(outs, dim=0).view(N, K, D)
    elif dispatch == "sorted":
        order = torch.argsort(flat, stable=True)                   # [N*K]
        counts = torch.bincount(flat, minlength=E).tolist()
        xs = x[order // K]                                         # [N*K, D]
        outs, lo = [], 0
        for e in range(E):
            hi = lo + counts[e]
            if hi > lo:
                outs.append(swiglu(xs[lo:hi], p["w_gate"][e], p["w_up"][e], p["w_down"][e]))
            lo = hi
        expert_major = torch.cat(outs, dim=0)                      # [N*K, D] sorted by expert
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        y_flat = expert_major[inv]                                 # token-major
        expert_major = expert_major.view(N, K, D)
    else:
        raise ValueError(dispatch)
    expert_out = y_flat.view(N, K, D)
    y = (expert_out * gates.unsqueeze(-1)).sum(dim=1)
    if cfg.n_shared:
        y = y + swiglu(x, p["shared_w_gate"], p["shared_w_up"], p["shared_w_down"])
    return y, scores, topk_idx, expert_out, expert_major


# ----------------------------------------------------------------------------------------------
# losses (the formulas of docs/spec.md, section 2)
# ----------------------------------------------------------------------------------------------

def topk_scores(scores, topk_idx):
    """Post-top-k S [N, E]: selected scores renormalised per row, zero elsewhere."""
    sel = scores.gather(1, topk_idx)
    return torch.zeros_like(scores).scatter(1, topk_idx, sel / sel.sum(dim=1, keepdim=True))


def aux_loss(scores, topk_idx, variant, batch_shape=None):
    N, E = scores.shape
    K = topk_idx.shape[1]
    counts = torch.bincount(topk_idx.reshape(-1), minlength=E).to(scores.dtype)   # [E]
    if variant == "switch":
        return E * ((counts / N) * scores.mean(0)).sum()
    if variant == "paper_eq2":
        return ((counts / N) * topk_scores(scores, topk_idx).sum(0)).sum()
    if variant == "deepseek_batch":
        return ((E * counts / (N * K)) * scores.mean(0)).sum()
    if variant == "deepseek_seq":                                  # as in the authors' MoEGate
        B, T = batch_shape
        ce = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
        ce.scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, T * K, device=scores.device, dtype=scores.dtype))
        ce = ce / (T * K / E)
        return (ce * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean()
    raise ValueError(variant)


def ortho_pairwise(eo, eps):
    """Eq. 6 through the Gram matrix: sum_i sum_{j!=k} G_jk^2 G_kk / (G_kk + eps)^2."""
    G = eo @ eo.transpose(1, 2)                                    # [N, K, K]
    d = G.diagonal(dim1=1, dim2=2)                                 # [N, K]
    K = G.shape[1]
    off = 1 - torch.eye(K, device=eo.device, dtype=eo.dtype)
    return (G.square() * (d / (d + eps).square()).unsqueeze(1) * off).sum()


def ortho_span_gs(eo):
    """The authors' compute_ortho_loss, loop for loop (Gram-Schmidt per slot over the other K-1)."""
    K = eo.shape[1]
    total = 0.0
    for i in range(K):
        other = torch.cat([eo[:, :i], eo[:, i + 1:]], dim=1)
        u = []
        for j in range(other.size(1)):
            v = other[:, j]
            for u_vec in u:
                v = v - (u_vec * v).sum(dim=-1, keepdim=True) * u_vec
            v = v / (torch.norm(v, dim=-1, keepdim=True) + 1e-6)
            u.append(v)
        cur = eo[:, i]
        proj_loss = 0.0
        for u_vec in u:
            proj_loss = proj_loss + torch.sum(((u_vec * cur).sum(dim=-1, keepdim=True) * u_vec) ** 2)
        total = total + proj_loss
    return total / (K * eo.shape[0])


def var_loss(scores, topk_idx, variant):
    N, E = scores.shape
    if variant == "paper":
        S = topk_scores(scores, topk_idx)
        return -((S - S.mean(0, keepdim=True)).square().sum()) / E
    if variant == "code":
        return -torch.var(scores, dim=-1).mean()
    if variant == "row_topk":
        sel = topk_scores(scores, topk_idx).gather(1, topk_idx)
        return -torch.var(sel, dim=-1, unbiased=False).mean()
    raise ValueError(variant)


def ortho_loss(expert_out, expert_major, variant, eps):
    if variant == "pairwise":
        return ortho_pairwise(expert_out, eps)
    if variant == "span":
        return ortho_span_gs(expert_out)
    if variant == "span_code_grouping":
        return ortho_span_gs(expert_major)
    raise ValueError(variant)
