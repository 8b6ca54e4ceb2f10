"""Adapter: transformers 5.24.0 ``Qwen2MoeSparseMoeBlock`` (+ its ``load_balancing_loss_func``) on a
``sys_qwen2_moe`` golden case. Copy it with ``_hf.py``. ``build(entry, arrays)`` -> the block with the fixture's
weights; ``dump(entry, arrays)`` -> the dump dict (forward, autograd of <dy, y> + alpha L_aux).

The shared expert's hidden width is n_shared * d_hidden (``shared_expert_intermediate_size``), its sigmoid gate
``shared_expert_gate`` is refmoe's ``shared_w_score``. Softmax in float32, gates cast back to the model dtype.
"""
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock, load_balancing_loss_func

from _hf import TORCH_DTYPES, load_weights, run_block


def build(entry, arrays):
    c = entry["config"]
    cfg = Qwen2MoeConfig(hidden_size=c["d_model"], moe_intermediate_size=c["d_hidden"], num_experts=c["n_experts"],
                         num_experts_per_tok=c["top_k"], shared_expert_intermediate_size=c["n_shared"] * c["d_hidden"],
                         norm_topk_prob=c["renorm"] == "always")
    return load_weights(Qwen2MoeSparseMoeBlock(cfg), arrays, TORCH_DTYPES[entry["dtype"]])


def dump(entry, arrays):
    block, c = build(entry, arrays), entry["config"]
    aux = lambda logits: load_balancing_loss_func((logits,), c["n_experts"], c["top_k"])
    return run_block(block, arrays, TORCH_DTYPES[entry["dtype"]], aux=aux, alpha=entry["coefficients"]["alpha"])
