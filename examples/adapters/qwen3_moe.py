"""Adapter: transformers 5.24.0 ``Qwen3MoeSparseMoeBlock`` (+ its ``load_balancing_loss_func``) on a
``sys_qwen3_moe`` golden case. Copy it with ``_hf.py``. ``build(entry, arrays)`` -> the block with the fixture's
weights; ``dump(entry, arrays)`` -> the dump dict (forward, autograd of <dy, y> + alpha L_aux).
"""
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

from _hf import TORCH_DTYPES, load_weights, run_block


def build(entry, arrays):
    c = entry["config"]
    cfg = Qwen3MoeConfig(hidden_size=c["d_model"], moe_intermediate_size=c["d_hidden"], num_experts=c["n_experts"],
                         num_experts_per_tok=c["top_k"], norm_topk_prob=c["renorm"] == "always")
    return load_weights(Qwen3MoeSparseMoeBlock(cfg), arrays, TORCH_DTYPES[entry["dtype"]])


def dump(entry, arrays):
    block, c = build(entry, arrays), entry["config"]
    aux = lambda logits: load_balancing_loss_func((logits,), c["n_experts"], c["top_k"])
    return run_block(block, arrays, TORCH_DTYPES[entry["dtype"]], aux=aux, alpha=entry["coefficients"]["alpha"])
