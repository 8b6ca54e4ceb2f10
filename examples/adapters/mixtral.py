"""Adapter: transformers 5.24.0 ``MixtralSparseMoeBlock`` (+ ``load_balancing_loss_func``) on a ``sys_mixtral``
golden case. Copy it with ``_hf.py``. ``build(entry, arrays)`` -> the block with the fixture's weights;
``dump(entry, arrays)`` -> the dump dict (forward, autograd of <dy, y> + alpha L_aux).

The router takes softmax(logits.float()) and ``load_balancing_loss_func`` sums in float32, so in float64 only
the logits, the experts' outputs and the gradients that do not pass through the router are float64 numbers.
"""
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from _hf import TORCH_DTYPES, load_weights, run_block


def build(entry, arrays):
    c = entry["config"]
    if c["renorm"] not in (None, "always") or c["n_shared"] or c["score_function"] != "softmax":
        raise ValueError(f"Mixtral renormalises softmax top-k gates and has no shared expert; got {c}")
    cfg = MixtralConfig(hidden_size=c["d_model"], intermediate_size=c["d_hidden"], num_local_experts=c["n_experts"],
                        num_experts_per_tok=c["top_k"])
    return load_weights(MixtralSparseMoeBlock(cfg), arrays, TORCH_DTYPES[entry["dtype"]])


def dump(entry, arrays):
    block, c = build(entry, arrays), entry["config"]
    aux = lambda logits: load_balancing_loss_func((logits,), c["n_experts"], c["top_k"])
    return run_block(block, arrays, TORCH_DTYPES[entry["dtype"]], aux=aux, alpha=entry["coefficients"]["alpha"])
