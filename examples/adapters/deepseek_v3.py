"""Adapter: transformers 5.24.0 ``DeepseekV3MoE`` on a ``sys_deepseek_v3`` golden case. Copy it with ``_hf.py``.
``build(entry, arrays)`` -> the block with the fixture's weights (``expert_bias`` into the float32 buffer
``e_score_correction_bias``); ``dump(entry, arrays)`` -> the dump dict (forward, autograd of <dy, y>).

The HF model computes no balancing loss (DeepSeek-V3's sequence-wise loss is the paper's, not in the source), so
the dump has no aux term: check it with ``--terms task``. The router runs in float32 whatever the model dtype;
``inter/scores`` of the golden case is s / sum_j s (s = sigmoid(z)), computed here from the router's logits as
refmoe's losses read it. The top-k has sorted=False: the slots are put in descending order of s + bias.
"""
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from _hf import TORCH_DTYPES, load_weights, run_block


def build(entry, arrays):
    c = entry["config"]
    if c["score_function"] != "sigmoid" or c["n_group"] is None:
        raise ValueError(f"DeepSeek-V3 routes on grouped sigmoid scores; got {c}")
    cfg = DeepseekV3Config(hidden_size=c["d_model"], moe_intermediate_size=c["d_hidden"],
                           n_routed_experts=c["n_experts"], num_experts_per_tok=c["top_k"],
                           n_shared_experts=c["n_shared"], routed_scaling_factor=c["routed_scaling_factor"],
                           n_group=c["n_group"], topk_group=c["topk_group"], norm_topk_prob=c["renorm"] == "always",
                           num_attention_heads=4, num_key_value_heads=4)
    return load_weights(DeepseekV3MoE(cfg), arrays, TORCH_DTYPES[entry["dtype"]])


def dump(entry, arrays):
    block = build(entry, arrays)
    bias = block.gate.e_score_correction_bias
    rank = lambda logits, idx, gates: torch.gather(torch.sigmoid(logits) + bias, 1, idx)
    out = run_block(block, arrays, TORCH_DTYPES[entry["dtype"]], rank=rank)
    s = torch.sigmoid(torch.from_numpy(out["inter/logits"]))
    out["inter/scores"] = (s / s.sum(dim=1, keepdim=True)).numpy()
    return out
