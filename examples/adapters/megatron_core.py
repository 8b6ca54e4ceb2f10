"""Adapter: megatron-core 0.16.1's router on a ``sys_megatron*`` golden case (megatron, megatron_seq,
megatron_global, megatron_capacity, megatron_sigmoid), on CPU. Copy it alone (it imports NumPy and torch).
The file is ``megatron_core.py``, not ``megatron.py``: a module of that name would shadow the ``megatron`` package.

Dimension letters: N tokens (i = t*B + b, Megatron's [seq, batch] order), D model width, H expert hidden width,
E experts, K top-k, (B, T) the case's batch_shape.

Two runs of the same fixture, both Megatron's own code:

1. ``TopKRouter`` (``build``), with a gloo process group of world size 1 on loopback as every parallel group.
   Its ``routing()`` runs z-loss, ``topk_routing_with_score_function``, ``apply_router_token_dropping``,
   ``compute_routing_scores_for_aux_loss`` and the aux loss of ``moe_router_load_balancing_type``, attaching the
   losses to the logits / probs through ``MoEAuxLossAutoScaler``: one backward of <dy, y> gives the total gradient
   (grad/total/*); Megatron's aux-loss tracker logs the loss values (in float32: a cross-check, ``checks``).
   Two things of ``TopKRouter.forward`` need a GPU in 0.16.1 and are stepped around: ``gating()`` moves the
   weight to ``torch.cuda.current_device()`` and its ``router_gating_linear`` needs Transformer Engine, so the
   logits are ``F.linear(x, router.weight)`` (what that function computes) and ``routing()`` is called on them;
   the expert-bias and global-aux buffers are created on ``torch.cuda.current_device()``, so the constructor
   runs with that function returning "cpu".
2. The moe_utils functions one by one, as ``routing()`` calls them, with each loss taken apart
   (``z_loss_func``, ``switch_load_balancing_loss_func``): the per-term gradients grad/<term>/* and the
   intermediates (inter/topk_idx before dropping, inter/gates, inter/scores).

Megatron's experts (TEGroupedMLP / SequentialMLP) need Transformer Engine or a GPU: the experts here are refmoe's
SwiGLU written in torch, E(x) = (silu(x W_g) * (x W_u)) W_d, y = sum over the routing map of probs * E(x).

dtypes: the router casts its softmax / sigmoid to float32 (``topk_routing_with_score_function``) and
``compute_routing_scores_for_aux_loss`` returns float32 softmax scores; on a float64 case the logits, the z-loss
and its gradient, the experts' outputs and the sigmoid aux scores are float64, the rest float32 round-off.
"""
from __future__ import annotations

import contextlib
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import moe_utils as mu
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUX_TYPES = {"megatron_aux": "aux_loss", "megatron_seq_aux": "seq_aux_loss"}


def tensor(a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).clone()


def process_groups() -> ProcessGroupCollection:
    """World size 1 over gloo on 127.0.0.1 (initialised once per process) as tp, cp, tp_cp, tp_dp_cp and dp."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    w = dist.group.WORLD
    return ProcessGroupCollection(tp=w, cp=w, tp_cp=w, tp_dp_cp=w, dp=w)


@contextlib.contextmanager
def buffers_on_cpu():
    """TopKRouter.__init__ puts its expert-bias / global-aux buffers on torch.cuda.current_device()."""
    current = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = current


def aux_type(entry) -> str | None:
    form = entry["variants"]["aux"]
    if form is None:
        return None
    return "global_aux_loss" if entry["system"] == "megatron_global" else AUX_TYPES[form]


def transformer_config(entry) -> TransformerConfig:
    """The TransformerConfig of the case (the MoE router fields; the rest are placeholders of a 1-layer model)."""
    c, coef = entry["config"], entry["coefficients"] or {}
    if c["score_function"] == "softmax" and c["gates"] != "topk_softmax":
        pre_softmax = True                                  # moe_router_pre_softmax: gates = selected softmax
    else:
        pre_softmax = False
    kind = aux_type(entry)
    return TransformerConfig(
        num_layers=1, hidden_size=c["d_model"], num_attention_heads=1, ffn_hidden_size=c["d_hidden"],
        num_moe_experts=c["n_experts"], moe_router_topk=c["top_k"], moe_router_score_function=c["score_function"],
        moe_router_pre_softmax=pre_softmax, moe_router_enable_expert_bias=c["expert_bias"],
        moe_router_topk_scaling_factor=None if c["routed_scaling_factor"] == 1.0 else c["routed_scaling_factor"],
        moe_router_num_groups=c["n_group"], moe_router_group_topk=c["topk_group"],
        moe_expert_capacity_factor=c["capacity_factor"], moe_token_drop_policy=c["drop_policy"],
        moe_router_load_balancing_type=kind or "none", moe_aux_loss_coeff=coef.get("alpha", 0.0) if kind else 0.0,
        moe_z_loss_coeff=coef.get("zeta"), params_dtype=TORCH_DTYPES[entry["dtype"]],
        use_cpu_initialization=True, add_bias_linear=False)


def build(entry, arrays) -> TopKRouter:
    """Megatron's TopKRouter with the fixture's router weight (and expert bias), on CPU."""
    dtype = TORCH_DTYPES[entry["dtype"]]
    pg = process_groups()
    with buffers_on_cpu():
        router = TopKRouter(transformer_config(entry), pg_collection=pg)
    router.set_layer_number(1)                              # the loss tracker logs layer 1
    with torch.no_grad():
        router.weight.copy_(tensor(arrays["param/w_router"], dtype))                     # [E, D]
        if router.expert_bias is not None:
            router.expert_bias.copy_(tensor(arrays["param/expert_bias"], torch.float32))  # [E] float32 buffer
    return router


# ----------------------------------------------------------------------------------------------
# the experts (refmoe's SwiGLU in torch) and the layer around the router
# ----------------------------------------------------------------------------------------------

def expert_params(arrays, dtype) -> dict:
    return {k: tensor(arrays[f"param/{k}"], dtype).requires_grad_(True) for k in ("w_gate", "w_up", "w_down")}


def experts_all(x, p):
    """Every expert on every token: [N, D] -> [N, E, D]."""
    h = F.silu(torch.einsum("nd,edh->neh", x, p["w_gate"])) * torch.einsum("nd,edh->neh", x, p["w_up"])
    return torch.einsum("neh,ehd->ned", h, p["w_down"])


def selected_slots(entry, logits, routing_map, expert_bias):
    """topk_idx [N, K]: the experts of the routing map (before dropping) in descending ranked value, the lower
    index first at a tie (the golden layout; Megatron keeps a dense [N, E] map and needs no slot order)."""
    c = entry["config"]
    s = torch.softmax(logits.double(), -1) if c["score_function"] == "softmax" else torch.sigmoid(logits.double())
    if expert_bias is not None:
        s = s + expert_bias.double()
    ranked = torch.where(routing_map, s, torch.full_like(s, -torch.inf))
    return torch.sort(-ranked, dim=1, stable=True).indices[:, :c["top_k"]]


def aux_loss(entry, scores, aux_map):
    """Megatron's balancing loss of the case (coefficient 1), from moe_utils as TopKRouter._apply_*aux_loss call it
    with one rank: aux_loss / global_aux_loss on one forward, or seq_aux_loss over [T, B*E] divided by B."""
    c = entry["config"]
    N, E, K = scores.shape[0], c["n_experts"], c["top_k"]
    if aux_type(entry) == "seq_aux_loss":
        B, T = entry["batch_shape"]
        scores, aux_map = scores.reshape(T, B * E), aux_map.reshape(T, B * E)
        return mu.switch_load_balancing_loss_func(scores, aux_map.sum(0).to(scores.dtype), T, K, E, 1.0) / B
    return mu.switch_load_balancing_loss_func(scores, aux_map.sum(0).to(scores.dtype), N, K, E, 1.0)


def dump(entry, arrays, checks: dict | None = None) -> dict:
    """Both runs (module docstring) -> the dump dict of the case (NumPy, the case's dtype).

    checks  optional dict, filled with max|router run - functions run| of the probs and of y (they should be 0)
            and the relative difference of the tracker's logged losses from the functions' (float32 logging)
    """
    if not arrays["input/valid_mask"].all():
        raise ValueError("the case has padding tokens; this adapter passes no padding_mask (sys_* cases have none)")
    dtype = TORCH_DTYPES[entry["dtype"]]
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    c, coef = entry["config"], entry["coefficients"] or {}
    B, T = entry["batch_shape"]
    N, E, K = B * T, c["n_experts"], c["top_k"]
    dy = tensor(arrays["input/dy"], dtype)
    out = {}

    # run 1: TopKRouter, the losses attached by MoEAuxLossAutoScaler; grad/total from one backward of <dy, y>
    router = build(entry, arrays)
    mu.clear_aux_losses_tracker()
    mu.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = tensor(arrays["input/x"], dtype).requires_grad_(True)
    p = expert_params(arrays, dtype)
    logits = F.linear(x, router.weight)                                                   # [N, E]
    probs, routing_map = router.routing(logits.view(T, B, E))                            # [N, E], after drops
    y = torch.einsum("ne,ned->nd", probs, experts_all(x, p))                             # [N, D]
    grads = torch.autograd.grad((dy * y).sum(), [x, router.weight] + list(p.values()))
    names = ["x", "w_router"] + list(p)
    out.update({f"grad/total/{k}": g for k, g in zip(names, grads)})
    out["inter/y"] = y
    tracker = mu.get_moe_layer_wise_logging_tracker()
    logged = {"aux": {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                      "global_aux_loss": "global_load_balancing_loss"}.get(aux_type(entry)), "z": "z_loss"}
    megatron_losses = {t: tracker[name]["values"][0].clone() for t, name in logged.items() if name in tracker}
    mu.clear_aux_losses_tracker()

    # run 2: the moe_utils functions as routing() calls them, each loss on its own
    x = tensor(arrays["input/x"], dtype).requires_grad_(True)
    p = expert_params(arrays, dtype)
    w = tensor(arrays["param/w_router"], dtype).requires_grad_(True)
    bias = router.expert_bias
    logits = F.linear(x, w)                                                               # [N, E]
    probs2, pre_map = mu.topk_routing_with_score_function(
        logits, K, use_pre_softmax=router.config.moe_router_pre_softmax, num_groups=c["n_group"],
        group_topk=c["topk_group"], scaling_factor=router.config.moe_router_topk_scaling_factor,
        score_function=c["score_function"], expert_bias=bias)
    topk_idx = selected_slots(entry, logits.detach(), pre_map, bias)                     # [N, K]
    kept_map = pre_map
    if c["capacity_factor"] is not None:
        probs2, kept_map = mu.apply_router_token_dropping(probs2, pre_map, K, c["capacity_factor"],
                                                         drop_policy=c["drop_policy"])
    expert_out = torch.gather(experts_all(x, p), 1, topk_idx[:, :, None].expand(N, K, x.shape[1]))
    expert_out = expert_out * torch.gather(kept_map, 1, topk_idx)[:, :, None].to(dtype)   # [N, K, D] 0 if dropped
    gates = torch.gather(probs2, 1, topk_idx)                                             # [N, K]
    y2 = torch.einsum("nk,nkd->nd", gates, expert_out)                                    # [N, D]
    aux_map, scores = mu.compute_routing_scores_for_aux_loss(logits, K, c["score_function"])
    losses = {"task": (dy * y2).sum()}
    weights = {"task": 1.0}
    if aux_type(entry) is not None:
        losses["aux"], weights["aux"] = aux_loss(entry, scores, aux_map), coef["alpha"]
    if coef.get("zeta") is not None:
        losses["z"], weights["z"] = mu.z_loss_func(logits, 1.0), coef["zeta"]
    leaves = [x, w] + list(p.values())
    for term, loss in losses.items():
        g = torch.autograd.grad(weights[term] * loss, leaves, retain_graph=True, allow_unused=True)
        out.update({f"grad/{term}/{k}": torch.zeros_like(t) if gi is None else gi
                    for k, t, gi in zip(names, leaves, g)})
        out[f"loss/{term}"] = loss
    out["loss/total"] = sum(weights[t] * out[f"loss/{t}"] for t in losses)
    out.update({"inter/logits": logits, "inter/scores": scores, "inter/topk_idx": topk_idx, "inter/gates": gates,
                "inter/expert_out": expert_out})
    if checks is not None:
        checks.update(probs=float((probs - probs2).abs().max()), y=float((y - y2).abs().max()))
        checks.update({f"tracker_{t}": float(abs(v.double() / losses[t].double() - 1))
                       for t, v in megatron_losses.items()})
    return {k: v.detach().numpy().astype(np.int64 if k == "inter/topk_idx" else np_dtype) for k, v in out.items()}
