"""The layer's configuration, validated once on construction."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing options of one MoE layer.

    d_model        D, width of tokens
    d_hidden       H, hidden width of each routed SwiGLU expert
    n_experts      E, number of routed experts
    top_k          K, experts selected per token (1 <= K <= E)
    n_shared       always-on shared experts, fused into one SwiGLU of hidden width n_shared * H
    norm_topk_prob renormalise the K selected scores to sum 1 (DeepSeek-MoE-16B and V2-Lite ship False)
    """

    d_model: int
    d_hidden: int
    n_experts: int
    top_k: int
    n_shared: int = 0
    norm_topk_prob: bool = True

    def __post_init__(self):
        for name in ("d_model", "d_hidden", "n_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name}={value} must be positive")
        if isinstance(self.n_shared, bool) or not isinstance(self.n_shared, int):
            raise TypeError(f"n_shared must be an int, got {type(self.n_shared).__name__}")
        if self.n_shared < 0:
            raise ValueError(f"n_shared={self.n_shared} must be >= 0")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if not isinstance(self.norm_topk_prob, bool):
            raise TypeError(f"norm_topk_prob must be a bool, got {type(self.norm_topk_prob).__name__}")

    @property
    def d_shared(self) -> int:
        """Hidden width of the fused shared expert (0 when there is none)."""
        return self.n_shared * self.d_hidden
