"""The layer's configuration, validated once on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

SCORE_FUNCTIONS = ("softmax", "sigmoid")
RENORM_MODES = ("always", "k_gt_1", "never")
GATE_MODES = ("selected", "topk_softmax")
GROUP_SCORES = ("max", "top2_sum", "topm_sum")
DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing options of one MoE layer. The defaults are the paper's router (softmax -> top-k of the
    logits -> renormalised gates), bit for bit as before these options existed.

    d_model        D, width of tokens
    d_hidden       H, hidden width of each routed SwiGLU expert
    n_experts      E, number of routed experts
    top_k          K, experts selected per token (1 <= K <= E)
    n_shared       always-on shared experts, fused into one SwiGLU of hidden width n_shared * H
    norm_topk_prob legacy spelling of ``renorm``: True = "always", False = "never". One mechanism: the layer
                   reads only :attr:`renorm_mode`, which is ``renorm`` when given and else comes from
                   ``norm_topk_prob``; ``norm_topk_prob=False`` with a ``renorm`` other than "never" is a
                   ValueError (a contradiction). Both fields keep what was passed, so ``dataclasses.replace``
                   of either behaves as written.

    Routing (docs/spec.md sections 1 and 6; the named presets of ``refmoe.systems`` set these):
    score_function         "softmax" (gates from softmax(z)) or "sigmoid" (gates from s = sigma(z): DeepSeek-V3,
                           Megatron sigmoid; ``MoECache.scores`` is then s / sum_j s, what the losses read)
    renorm                 None (from norm_topk_prob), or how the gates are renormalised over the K selected scores:
                           "always", "k_gt_1" (only when K > 1: Megatron sigmoid, the authors' MoEGate), "never"
                           (DeepSeek-V2, the Qwen / OLMoE config default)
    gate_eps               eps in the renormalisation's denominator (1e-20 in DeepSeek-V3 and Megatron sigmoid)
    routed_scaling_factor  gates multiplied by it after the renormalisation (> 0; 1.0 = no scaling)
    gates                  "selected": the gates are the selected scores (renormalised / scaled as above);
                           "topk_softmax": a softmax over the K selected LOGITS (Megatron's default softmax path;
                           needs score_function="softmax", and ``renorm`` does not apply)
    n_group, topk_group    group-limited selection: E experts in n_group groups of E / n_group consecutive
                           experts, keep the topk_group best groups per token (both None = plain top-k)
    group_score            how a group is scored: "max" (DeepSeek-V2), "top2_sum" (DeepSeek-V3), "topm_sum"
                           (Megatron, top-(K // topk_group)); None = "max" (:attr:`group_rule`)
    expert_bias            a selection-only bias ``params["expert_bias"]`` [E] added to the scores for the choice
                           (DeepSeek-V3 ``e_score_correction_bias``, Megatron ``expert_bias``); zero gradient, moved
                           by ``refmoe.router_select.expert_bias_update``
    capacity_factor        None = no dropping; else each expert keeps at most C = max(ceil(N K / E * f), min_capacity)
                           (token, slot) pairs of the forward's N tokens; a dropped pair gives exactly 0
    drop_policy            which pairs an expert keeps: "probs" (largest gates) or "position" (earliest tokens)
    min_capacity           lower bound on C (>= 0)
    shared_gate            Qwen2-MoE: the shared expert's output times sigmoid(x w^T), w = ``params["shared_w_score"]``
                           [1, D] (needs n_shared > 0)

    How the ranked values are chosen (``select_on`` of ``refmoe.router.routing_forward``): the logits for softmax
    scoring without a bias, unless a summing group rule ranks the scores (DeepSeek-V3 style); the scores
    otherwise (sigmoid, or a bias). Softmax is increasing, so ranking the logits picks what ranking P would.
    """

    d_model: int
    d_hidden: int
    n_experts: int
    top_k: int
    n_shared: int = 0
    norm_topk_prob: bool = True
    score_function: str = "softmax"
    renorm: str | None = None
    gate_eps: float = 0.0
    routed_scaling_factor: float = 1.0
    gates: str = "selected"
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str | None = None
    expert_bias: bool = False
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    min_capacity: int = 0
    shared_gate: bool = False

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
        for name in ("norm_topk_prob", "expert_bias", "shared_gate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_mode("score_function", self.score_function, SCORE_FUNCTIONS)
        _check_mode("gates", self.gates, GATE_MODES)
        _check_mode("drop_policy", self.drop_policy, DROP_POLICIES)
        if self.renorm is not None:
            _check_mode("renorm", self.renorm, RENORM_MODES)
            if not self.norm_topk_prob and self.renorm != "never":
                raise ValueError(f"renorm={self.renorm!r} contradicts norm_topk_prob=False; give renorm alone")
        _check_float("routed_scaling_factor", self.routed_scaling_factor, positive=True)
        _check_float("gate_eps", self.gate_eps, positive=False)
        if self.gates == "topk_softmax":
            if self.score_function != "softmax":
                raise ValueError(f"gates='topk_softmax' needs score_function='softmax', got "
                                 f"score_function={self.score_function!r}")
            if self.gate_eps != 0:
                raise ValueError(f"gates='topk_softmax' has no gate_eps, got gate_eps={self.gate_eps}")
            if self.expert_bias:
                raise ValueError("expert_bias=True with gates='topk_softmax': Megatron ignores the bias on its "
                                 "softmax path; use score_function='sigmoid'")
        self._check_groups()
        if self.capacity_factor is not None:
            _check_float("capacity_factor", self.capacity_factor, positive=True)
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"min_capacity={self.min_capacity!r} must be an int >= 0")
        if self.shared_gate and not self.n_shared:
            raise ValueError("shared_gate=True needs n_shared > 0 (it gates the shared expert)")

    def _check_groups(self):
        G, Kg = self.n_group, self.topk_group
        if G is None and Kg is None:
            if self.group_score not in (None, "max"):
                raise ValueError(f"group_score={self.group_score!r} needs n_group and topk_group")
            return
        if G is None or Kg is None:
            raise ValueError(f"n_group={G} and topk_group={Kg}: group-limited selection needs both")
        for name, v in (("n_group", G), ("topk_group", Kg)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.n_experts % G:
            raise ValueError(f"n_group={G} does not divide n_experts={self.n_experts}")
        if Kg > G:
            raise ValueError(f"topk_group={Kg} > n_group={G}")
        per_group = self.n_experts // G
        if self.top_k > Kg * per_group:
            raise ValueError(f"top_k={self.top_k} > topk_group * (n_experts / n_group) = {Kg} * {per_group}")
        if self.group_score is not None:
            _check_mode("group_score", self.group_score, GROUP_SCORES)
        m = {"max": 1, "top2_sum": 2, "topm_sum": self.top_k // Kg}[self.group_rule]
        if not 1 <= m <= per_group:
            raise ValueError(f"group_score={self.group_rule!r} sums the top {m} of each group; need "
                             f"1 <= {m} <= n_experts / n_group = {per_group}")

    @property
    def d_shared(self) -> int:
        """Hidden width of the fused shared expert (0 when there is none)."""
        return self.n_shared * self.d_hidden

    @property
    def renorm_mode(self) -> str:
        """The renormalisation the layer applies: ``renorm``, or "always" / "never" from ``norm_topk_prob``."""
        if self.renorm is not None:
            return self.renorm
        return "always" if self.norm_topk_prob else "never"

    @property
    def group_rule(self) -> str:
        """The group score rule: ``group_score``, "max" when None."""
        return "max" if self.group_score is None else self.group_score

    @property
    def select_on(self) -> str:
        """What the selection ranks: "logits" or "scores" (see the class docstring)."""
        if self.score_function == "sigmoid" or self.expert_bias:
            return "scores"
        if self.n_group is not None and self.group_rule != "max" and self.gates != "topk_softmax":
            return "scores"
        return "logits"


def _check_mode(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {allowed}")


def _check_float(name, value, positive):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={value} must be finite and {'> 0' if positive else '>= 0'}")
