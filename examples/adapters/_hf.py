"""What the HF adapters share: refmoe's weights into a transformers MoE block, and one forward + backward of it
into a golden dump. Copy this file with the adapter of your system (it imports NumPy and torch only).

Dimension letters: N tokens, D model width, H expert hidden width, Hs shared hidden width, E experts, K top-k.

Weight layouts (refmoe -> transformers 5.24.0):
    w_router [E, D]                 -> gate.weight [E, D]                      (the same)
    w_gate, w_up [E, D, H]          -> experts.gate_up_proj [E, 2H, D]         (concat on H, then transpose)
    w_down [E, H, D]                -> experts.down_proj [E, D, H]             (transpose)
    shared_w_gate, shared_w_up [D, Hs], shared_w_down [Hs, D] -> shared MLP gate_proj / up_proj / down_proj .weight
                                                                   (nn.Linear: [out, in], the transpose)
    shared_w_score [1, D]           -> shared_expert_gate.weight [1, D]         (Qwen2-MoE)
    expert_bias [E]                 -> gate.e_score_correction_bias [E]         (DeepSeek-V3, a float32 buffer)

What a dump holds (the keys a transformers block can produce; see ``dump``):
    inter/logits, inter/topk_idx, inter/gates   the router's own outputs (a forward hook on ``block.gate``)
    inter/scores                                the softmax of the router logits in float32, as the block
                                                computes it internally (the HF blocks do not return it)
    inter/expert_out                            each selected expert run by ``block.experts`` with weight 1
    inter/shared_out                            the shared MLP on x (before Qwen2-MoE's sigmoid gate)
    inter/y, loss/*, grad/*                     the block's output and torch autograd of <dy, y> (+ alpha L_aux)
"""
from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def tensor(a, dtype):
    """A torch tensor copy of NumPy array ``a`` in ``dtype``."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).clone()


def shared_module(block):
    """The block's shared MLP (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``) or None."""
    return getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)


def load_weights(block, arrays: dict, dtype):
    """Replace the block's random init by the fixture's params (layouts in the module docstring)."""
    p = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    block.to(dtype)
    with torch.no_grad():
        block.gate.weight.copy_(tensor(p["w_router"], dtype))                                   # [E, D]
        gate_up = np.concatenate([p["w_gate"].transpose(0, 2, 1), p["w_up"].transpose(0, 2, 1)], axis=1)
        block.experts.gate_up_proj.copy_(tensor(gate_up, dtype))                               # [E, 2H, D]
        block.experts.down_proj.copy_(tensor(p["w_down"].transpose(0, 2, 1), dtype))           # [E, D, H]
        shared = shared_module(block)
        if shared is not None:
            shared.gate_proj.weight.copy_(tensor(p["shared_w_gate"].T, dtype))                 # [Hs, D]
            shared.up_proj.weight.copy_(tensor(p["shared_w_up"].T, dtype))                     # [Hs, D]
            shared.down_proj.weight.copy_(tensor(p["shared_w_down"].T, dtype))                 # [D, Hs]
        if "shared_w_score" in p:
            block.shared_expert_gate.weight.copy_(tensor(p["shared_w_score"], dtype))          # [1, D]
        if "expert_bias" in p:                                   # HF keeps this buffer in float32 whatever dtype
            block.gate.e_score_correction_bias.copy_(tensor(p["expert_bias"], torch.float32))
    return block


def named_params(block) -> dict:
    """refmoe name -> (torch parameter, function of its gradient giving refmoe's layout)."""
    H = block.experts.down_proj.shape[2]
    out = {"w_router": (block.gate.weight, lambda g: g),
           "w_gate": (block.experts.gate_up_proj, lambda g: g[:, :H].transpose(1, 2)),
           "w_up": (block.experts.gate_up_proj, lambda g: g[:, H:].transpose(1, 2)),
           "w_down": (block.experts.down_proj, lambda g: g.transpose(1, 2))}
    shared = shared_module(block)
    if shared is not None:
        out.update(shared_w_gate=(shared.gate_proj.weight, lambda g: g.T),
                   shared_w_up=(shared.up_proj.weight, lambda g: g.T),
                   shared_w_down=(shared.down_proj.weight, lambda g: g.T))
    if hasattr(block, "shared_expert_gate"):
        out["shared_w_score"] = (block.shared_expert_gate.weight, lambda g: g)
    return out


def slot_order(idx, ranked):
    """Reorder the K slots of each row by descending ranked value, the lower expert index first at a tie (the
    golden tie rule; torch.topk with sorted=False promises no order).  idx [N, K] int, ranked [N, K] -> perm [N, K]."""
    by_index = torch.argsort(idx, dim=1)
    r = torch.gather(ranked, 1, by_index)
    return torch.gather(by_index, 1, torch.sort(-r, dim=1, stable=True).indices)


def run_block(block, arrays: dict, dtype, *, rank=None, aux=None, alpha=0.0):
    """One forward + backward of an HF MoE block on the fixture; returns the dump dict (NumPy, the case's dtype).

    rank   optional function (logits, topk_idx, gates) -> [N, K] ranked values for :func:`slot_order`
           (None: torch.topk's sorted output is already in descending order)
    aux    optional function (logits [N, E]) -> the block's balancing loss L_aux (a torch scalar), or None
    alpha  its coefficient: grad/aux/* = alpha dL_aux, loss/total = <dy, y> + alpha L_aux
    """
    if not arrays["input/valid_mask"].all():
        raise ValueError("the case has padding tokens; these adapters pass no attention mask (sys_* cases have none)")
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    x = tensor(arrays["input/x"], dtype).requires_grad_(True)                                   # [N, D]
    dy = tensor(arrays["input/dy"], dtype)                                                      # [N, D]
    N, D = x.shape
    seen = {}
    hook = block.gate.register_forward_hook(lambda mod, inp, out: seen.update(router=out))
    try:
        y = block(x.view(1, N, D)).view(N, D)                                                   # [N, D]
    finally:
        hook.remove()
    logits, gates, idx = seen["router"]                                                         # [N, E], [N, K] x2
    perm = slot_order(idx, rank(logits, idx, gates)) if rank is not None else None
    if perm is not None:
        idx, gates = torch.gather(idx, 1, perm), torch.gather(gates, 1, perm)
    task = (dy * y).sum()
    params = named_params(block)
    leaves = [x] + list({id(t): t for t, _ in params.values()}.values())
    losses = {"task": task}
    if aux is not None:
        losses["aux"] = aux(logits)
    coef = {"task": 1.0, "aux": alpha}
    out = {"inter/logits": logits, "inter/scores": torch.softmax(logits.float(), dim=-1),
           "inter/topk_idx": idx, "inter/gates": gates, "inter/y": y, "loss/task": task}
    with torch.no_grad():
        out["inter/expert_out"] = torch.stack(
            [block.experts(x, idx[:, k:k + 1], torch.ones(N, 1, dtype=dtype)) for k in range(idx.shape[1])], 1)
        shared = shared_module(block)
        if shared is not None:
            out["inter/shared_out"] = shared(x)
    total = task
    for term, loss in losses.items():
        out[f"loss/{term}"] = loss
        if term != "task":
            total = total + coef[term] * loss
        grads = torch.autograd.grad(coef[term] * loss, leaves, retain_graph=True, allow_unused=True)
        by_leaf = {id(t): (torch.zeros_like(t) if g is None else g) for t, g in zip(leaves, grads)}
        out[f"grad/{term}/x"] = by_leaf[id(x)]
        for name, (t, layout) in params.items():
            out[f"grad/{term}/{name}"] = layout(by_leaf[id(t)])
    out["loss/total"] = total
    for key in [k for k in out if k.startswith("grad/task/")]:
        name = key.split("/")[2]
        out[f"grad/total/{name}"] = sum(out[f"grad/{t}/{name}"] for t in losses)
    dump = {}
    for key, value in out.items():
        a = value.detach().numpy()
        dump[key] = a.astype(np.int64) if key == "inter/topk_idx" else a.astype(np_dtype)
    return dump
