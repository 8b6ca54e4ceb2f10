"""Adapter: transformers 5.24.0 ``DeepseekV2Moe`` on a ``sys_deepseek_v2`` golden case. Copy it with ``_hf.py``.
``build(entry, arrays)`` -> the block with the fixture's weights; ``dump(entry, arrays)`` -> the dump dict
(forward, autograd of <dy, y>; the HF model computes no balancing loss, so there is no aux term).

``topk_method`` is "greedy", or "group_limited_greedy" when the config has n_group / topk_group. The router runs
in float32 whatever the model dtype (``hidden_states.type(torch.float32)``), logits included; its top-k has
sorted=False, so the slots are put in descending score order (the golden layout) before the dump.
"""
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from _hf import TORCH_DTYPES, load_weights, run_block


def build(entry, arrays):
    c = entry["config"]
    groups = {} if c["n_group"] is None else dict(n_group=c["n_group"], topk_group=c["topk_group"])
    cfg = DeepseekV2Config(hidden_size=c["d_model"], moe_intermediate_size=c["d_hidden"],
                           n_routed_experts=c["n_experts"], num_experts_per_tok=c["top_k"],
                           n_shared_experts=c["n_shared"], routed_scaling_factor=c["routed_scaling_factor"],
                           topk_method="group_limited_greedy" if groups else "greedy",
                           num_attention_heads=4, num_key_value_heads=4, **groups)
    return load_weights(DeepseekV2Moe(cfg), arrays, TORCH_DTYPES[entry["dtype"]])


def dump(entry, arrays):
    rank = lambda logits, idx, gates: gates                    # scaled softmax scores: the same order
    return run_block(build(entry, arrays), arrays, TORCH_DTYPES[entry["dtype"]], rank=rank)
