"""Named presets of the routers people port today: the MoEConfig each one needs, with its balancing loss,
how its layers combine, its z-loss and where each fact was read.

One literal table, ``SYSTEMS``, name -> :class:`System`; :func:`system_config` turns a preset and the shapes into
a validated ``MoEConfig``. docs/spec.md section 6.2 has the same table in prose, sections 6.3 and 7 the
pseudo-code read from each source. What a preset does NOT reproduce is said in its ``notes`` (dtype casts,
torch's unspecified slot order at ties, input jitter, Megatron's pad-to-capacity).

Balancing losses are named as ``(term, form)`` of :func:`refmoe.losses.term_forward`: ``("aux", ...)`` for the
forms of ``refmoe.losses.aux``, ``("sys_aux", ...)`` for those of ``refmoe.losses.aux_systems``;
``balancing_coefficient`` is the source's default coefficient (None where the source computes no loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import MoEConfig

_HF = "transformers 5.24.0"
_MCORE = "megatron-core 0.16.1"


@dataclass(frozen=True)
class System:
    """One router preset.

    overrides              MoEConfig fields the system sets (shapes come from :func:`system_config`)
    balancing              (term, form) of its balancing loss, or None when the source computes none
    balancing_scope        over which tokens f and P are taken
    balancing_coefficient  the source's default coefficient, or None
    layers                 how the per-layer losses combine into the model's loss
    z_loss                 the router z-loss coefficient, or None when the system has none
    dropping               token dropping
    source                 package, version and file(s) read
    notes                  what the preset leaves out or where it differs from the source
    """
    overrides: dict
    balancing: tuple | None
    balancing_scope: str
    balancing_coefficient: float | None
    layers: str
    z_loss: float | None
    dropping: str
    source: str
    notes: str = ""
    extra: dict = field(default_factory=dict)


_HF_LAYERS = "logits of all MoE layers concatenated along tokens first, one loss per model (hf_mixtral convention)"
_HF_SCOPE = "whole batch x all layers at once; 2-D attention mask (1 = real) excludes padding"
_HF_NOTES = ("softmax in float32, selection on the float32 probs (refmoe ranks the logits: the same experts "
             "except where float32 probs tie); torch.topk slot order at ties is unspecified")
_MCORE_SOURCE = (f"{_MCORE}: megatron/core/transformer/moe/moe_utils.py (topk_routing_with_score_function, "
                 "compute_routing_scores_for_aux_loss, switch_load_balancing_loss_func, z_loss_func, "
                 "apply_router_token_dropping), megatron/core/transformer/moe/router.py (TopKRouter)")
_MCORE_LAYERS = ("each layer's loss attached to its own probs (MoEAuxLossAutoScaler): summed over layers, "
                 "x 1/num_microbatches")
_MCORE_AUX = ("aux map: a fresh plain top-k of the aux scores (no bias, no groups, no capacity), so with capacity "
              "on the counts are those BEFORE dropping")

SYSTEMS: dict[str, System] = {
    "mixtral": System(
        overrides=dict(score_function="softmax", renorm="always"),
        balancing=("aux", "switch"), balancing_scope=_HF_SCOPE, balancing_coefficient=0.001,
        layers=_HF_LAYERS, z_loss=None, dropping="none",
        source=f"{_HF}: transformers/models/mixtral/modeling_mixtral.py (MixtralTopKRouter, load_balancing_loss_func)",
        notes=_HF_NOTES + "; router_jitter_noise (input jitter in training, default 0) not implemented"),
    "qwen2_moe": System(
        overrides=dict(score_function="softmax", renorm="never", n_shared=1, shared_gate=True),
        balancing=("aux", "switch"), balancing_scope=_HF_SCOPE, balancing_coefficient=0.001,
        layers=_HF_LAYERS + "; dense layers (mlp_only_layers, decoder_sparse_step) add nothing",
        z_loss=None, dropping="none",
        source=(f"{_HF}: transformers/models/qwen2_moe/modeling_qwen2_moe.py (Qwen2MoeTopKRouter, "
                "Qwen2MoeSparseMoeBlock)"),
        notes=_HF_NOTES + "; renorm from norm_topk_prob (config default False); the shared expert's hidden width "
              "is n_shared * d_hidden in refmoe, shared_expert_intermediate_size in the source"),
    "qwen3_moe": System(
        overrides=dict(score_function="softmax", renorm="never"),
        balancing=("aux", "switch"), balancing_scope=_HF_SCOPE, balancing_coefficient=0.001,
        layers=_HF_LAYERS, z_loss=None, dropping="none",
        source=f"{_HF}: transformers/models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeTopKRouter)",
        notes=_HF_NOTES + "; renorm from norm_topk_prob (config default False; pass renorm='always' for a "
              "checkpoint that sets it)"),
    "olmoe": System(
        overrides=dict(score_function="softmax", renorm="never"),
        balancing=("aux", "switch"), balancing_scope=_HF_SCOPE, balancing_coefficient=0.01,
        layers=_HF_LAYERS, z_loss=None, dropping="none",
        source=f"{_HF}: transformers/models/olmoe/modeling_olmoe.py (OlmoeTopKRouter)",
        notes=_HF_NOTES + "; renorm from norm_topk_prob (config default False); the original OLMoE training code "
              "(MegaBlocks, with a z-loss) was not read"),
    "deepseek_v2": System(
        overrides=dict(score_function="softmax", renorm="never", routed_scaling_factor=1.0, n_shared=2),
        balancing=None, balancing_scope="none computed in the HF model", balancing_coefficient=None,
        layers="-", z_loss=None, dropping="none",
        source=f"{_HF}: transformers/models/deepseek_v2/modeling_deepseek_v2.py (DeepseekV2TopkRouter, DeepseekV2Moe)",
        notes=("topk_method 'greedy' (no groups); 'group_limited_greedy' is n_group=, topk_group=, "
               "group_score='max' (the source masks other groups with 0, refmoe with -inf: the same experts "
               "while the kept groups hold K positive scores); norm_topk_prob is ignored by the source; "
               "routed_scaling_factor: config default 1.0 (DeepSeek-V2 ships 16.0)"),
        extra=dict(group_limited_greedy=dict(group_score="max"))),
    "deepseek_v3": System(
        overrides=dict(score_function="sigmoid", renorm="always", gate_eps=1e-20, routed_scaling_factor=2.5,
                       n_group=8, topk_group=4, group_score="top2_sum", expert_bias=True, n_shared=1),
        balancing=("aux", "deepseek_seq"),
        balancing_scope=("per sequence, on s' = s / sum_j s over all experts; f from the selection (bias and "
                         "groups included); the HF model computes none: the form and its small coefficient "
                         "(1e-4) are the DeepSeek-V3 paper's, reported, not read in code"),
        balancing_coefficient=1e-4,
        layers="per layer, summed (paper; not in the HF source)", z_loss=None, dropping="none",
        source=f"{_HF}: transformers/models/deepseek_v3/modeling_deepseek_v3.py (DeepseekV3TopkRouter, DeepseekV3MoE)",
        notes=("e_score_correction_bias is a buffer transformers never updates; refmoe moves it with "
               "router_select.expert_bias_update (the auxiliary-loss-free rule); n_group=8, topk_group=4 are "
               "the config defaults (E = 256): pass others for small E")),
    "megatron": System(
        overrides=dict(score_function="softmax", gates="topk_softmax"),
        balancing=("sys_aux", "megatron_aux"),
        balancing_scope="micro-batch (aux_loss: counts over TPxCP); " + _MCORE_AUX,
        balancing_coefficient=None, layers=_MCORE_LAYERS, z_loss=None, dropping="none",
        source=_MCORE_SOURCE,
        notes=("moe_aux_loss_coeff and moe_z_loss_coeff have no default value in use (0 / None): give them; "
               "moe_router_pre_softmax is renorm='never' with gates='selected'; tokens are t*B + b")),
    "megatron_seq": System(
        overrides=dict(score_function="softmax", gates="topk_softmax"),
        balancing=("sys_aux", "megatron_seq_aux"),
        balancing_scope="per sequence (seq_aux_loss), mean over B, tokens t*B + b; " + _MCORE_AUX,
        balancing_coefficient=None, layers=_MCORE_LAYERS, z_loss=None, dropping="none",
        source=_MCORE_SOURCE,
        notes="with padding Megatron divides by (valid tokens)/B, refmoe by each sequence's valid length"),
    "megatron_global": System(
        overrides=dict(score_function="softmax", gates="topk_softmax"),
        balancing=("sys_aux", "megatron_aux"),
        balancing_scope=("global (global_aux_loss): counts over TPxDPxCP, running mean over the micro-batches "
                         "so far; on one forward = megatron_aux; several parts: "
                         "aux_conventions.megatron_forward(scope='global'); " + _MCORE_AUX),
        balancing_coefficient=None, layers=_MCORE_LAYERS, z_loss=None, dropping="none",
        source=_MCORE_SOURCE, notes=("the layer's loss is the across-ranks form; the running mean over the micro-batches of gradient "
               "accumulation is refmoe.losses.aux_conventions.megatron_global_accumulated_forward (docs/spec.md 6.4 "
               "item 2)")),
    "megatron_capacity": System(
        overrides=dict(score_function="softmax", gates="topk_softmax", capacity_factor=1.0, drop_policy="probs"),
        balancing=("sys_aux", "megatron_aux"),
        balancing_scope="micro-batch; " + _MCORE_AUX,
        balancing_coefficient=None, layers=_MCORE_LAYERS, z_loss=None,
        dropping=("moe_expert_capacity_factor: C = ceil(N K / E * factor), per expert the C largest routing probs "
                  "kept (drop_policy 'probs'; 'position' keeps the earliest)"),
        source=_MCORE_SOURCE,
        notes=("pad_to_capacity not implemented; Megatron breaks ties with torch.topk (unspecified), refmoe "
               "with the lower token index; the expert-bias counts use the map AFTER dropping")),
    "megatron_sigmoid": System(
        overrides=dict(score_function="sigmoid", renorm="k_gt_1", gate_eps=1e-20, expert_bias=True),
        balancing=("sys_aux", "megatron_aux"),
        balancing_scope="micro-batch, on sigmoid(z) / (sum_j sigmoid(z)_j + 1e-20); " + _MCORE_AUX,
        balancing_coefficient=None, layers=_MCORE_LAYERS, z_loss=None, dropping="none",
        source=_MCORE_SOURCE,
        notes="moe_router_score_function='sigmoid', moe_router_enable_expert_bias=True (bias rate default 1e-3)"),
    "authors_code": System(
        overrides=dict(score_function="softmax", renorm="never", n_shared=2),
        balancing=("aux", "deepseek_seq"),
        balancing_scope="per sequence (seq_aux=True), padding counted; f from the selection",
        balancing_coefficient=0.001,
        layers="each layer's aux - var + ortho added through AddAuxiliaryLoss with gradient 1: summed over layers",
        z_loss=None, dropping="none",
        source=("HongcanGuo/Auxloss-For-Advancing-Expert-Specialization @ b1fea9d: Model/ds/modeling_deepseek.py "
                "(MoEGate, DeepseekMoE), Model/ds_v2_lite, Model/kimi"),
        notes=("softmax in the model dtype (bf16), no upcast; norm_topk_prob false for ds / ds_v2_lite (kimi: "
               "renorm='k_gt_1', gate_eps=1e-20); the objective preset 'authors_code' holds L_o and L_v")),
}


def system_config(name: str, d_model: int, d_hidden: int, n_experts: int, top_k: int, **overrides) -> MoEConfig:
    """The ``MoEConfig`` of preset ``name`` at these shapes; ``overrides`` replace preset fields (e.g. n_group=4,
    topk_group=2 for a small deepseek_v3, or capacity_factor=1.25). Raises ValueError for an unknown name (listing
    the known ones) and whatever ``MoEConfig`` raises for a bad combination."""
    if name not in SYSTEMS:
        raise ValueError(f"system={name!r} is not a preset; expected one of {sorted(SYSTEMS)}")
    fields = {**SYSTEMS[name].overrides, **overrides}
    return MoEConfig(d_model=d_model, d_hidden=d_hidden, n_experts=n_experts, top_k=top_k, **fields)
