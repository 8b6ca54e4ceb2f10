"""The default grid of golden cases: one change from a base case at a time, so a failure names its cause."""
from __future__ import annotations

from ..systems import SYSTEMS
from .cases import AUX_FORMS, CaseSpec
from .dist_cases import dist_cases
from .systems_cases import system_terms

BASE = CaseSpec(name="base", description="E=4, K=2, D=6, H=5, N=8 as (B, T) = (2, 4); switch + pairwise + paper")


def default_cases() -> list:
    """The cases ``refmoe golden write`` produces by default (a few seconds in all on one CPU core)."""
    base = BASE
    cases = [base]
    for form in AUX_FORMS:
        if form != base.aux:
            cases.append(base.replace(name=f"aux_{form}", aux=form, description=f"L_aux form {form}"))
    for form in ("span", "span_code_grouping"):
        cases.append(base.replace(name=f"ortho_{form}", ortho=form, description=f"L_o form {form}"))
    for form in ("code", "row_topk"):
        cases.append(base.replace(name=f"var_{form}", var=form, description=f"L_v form {form}"))
    cases += [
        base.replace(name="preset_paper", preset="paper", padding=(5, 7),
                     description="preset 'paper': switch, pairwise, paper, 1e-3 each; padding excluded"),
        base.replace(name="preset_authors_code", preset="authors_code", padding=(5, 7),
                     description="preset 'authors_code': deepseek_seq, span, code; beta and gamma by the "
                                 "released power-of-ten calibration on this batch; padding included"),
        base.replace(name="shared", n_shared=2, description="two shared experts (fused, hidden 2H)"),
        base.replace(name="no_renorm", norm_topk_prob=False, description="gates = raw top-k scores"),
        base.replace(name="k1", top_k=1, description="K = 1 (L_o has no pairs and is 0)"),
        base.replace(name="k_all", top_k=base.n_experts, description="K = E (every expert selected)"),
        base.replace(name="n1", batch_shape=(1, 1), description="a single token"),
        base.replace(name="padding", padding=(3, 6, 7), aux="deepseek_seq",
                     description="tokens 3, 6, 7 are padding (valid_mask False), excluded from every loss"),
        base.replace(name="ties", ties=True, seed=7,
                     description="exact ties: W_r rows 1 and 2 equal, token 0 is zero; lower index wins"),
        base.replace(name="float32", dtype="float32", description="the base case in float32"),
        base.replace(name="float32_ties", dtype="float32", ties=True, seed=7, n_shared=1,
                     description="ties and a shared expert in float32"),
    ]
    layers = CaseSpec(name="conv", kind="aux_layers", n_layers=3, ortho=None, var=None)
    cases += [
        layers.replace(name="conv_hf_mixtral", aux="hf_mixtral", padding=(2, 7),
                       description="HF Mixtral family: 3 layers' logits concatenated along tokens, "
                                   "2-D attention mask as valid_mask"),
        layers.replace(name="conv_megatron_micro_batch", aux="megatron_micro_batch", n_layers=2,
                       description="Megatron-Core micro-batch scope, per layer, summed over 2 layers"),
        layers.replace(name="conv_megatron_seq", aux="megatron_seq", n_layers=2, padding=(7,),
                       description="Megatron-Core seq_aux_loss: tokens t*B + b, (B, T) = (2, 4), 2 layers"),
        layers.replace(name="conv_megatron_global", aux="megatron_global", n_layers=2, micro_batches=(3, 5),
                       description="Megatron-Core global-batch scope: micro-batches of 3 and 5 tokens, "
                                   "counts over both; loss/aux_pieces holds each micro-batch's share"),
        layers.replace(name="conv_megatron_seq_valid_over_b", aux="megatron_seq_valid_over_b", n_layers=2,
                       padding=(3, 7),
                       description="megatron-core 0.16.1 seq_aux_loss with a padding mask: tokens t*B + b, "
                                   "(B, T) = (2, 4), sequence 1 has 2 valid tokens; every sequence normalised "
                                   "by (valid tokens)/B = 3"),
        layers.replace(name="conv_megatron_global_accumulated", aux="megatron_global_accumulated", n_layers=2,
                       micro_batches=(3, 5), padding=(6,),
                       description="megatron-core 0.16.1 global_aux_loss under gradient accumulation: "
                                   "micro-batches of 3 and 5 tokens (token 6 padding), micro-batch m uses the "
                                   "running mean of the counts of 1..m and its own valid token count; "
                                   "loss/aux_pieces holds each micro-batch's loss, loss/aux their sum"),
    ]
    return cases + system_cases() + dist_cases()


# the small shapes of a system case; groups need E divisible by n_group with more groups than topk_group
SYSTEM_BASE = CaseSpec(name="sys", d_model=8, d_hidden=6, n_experts=8, top_k=2, batch_shape=(2, 6),
                       ortho=None, var=None)
SYSTEM_SHAPES = {"deepseek_v3": (("n_group", 4), ("topk_group", 2))}     # the preset's 8 / 4 need E = 256


def system_cases() -> list:
    """``sys_<S>`` (float64) and ``sys_<S>_f32`` (float32) for every preset S of ``refmoe.systems.SYSTEMS``."""
    cases = []
    for seed, (name, system) in enumerate(SYSTEMS.items()):
        terms = system_terms(name)
        alpha = terms["aux"][2] if "aux" in terms else 0.0
        balancing = "none" if "aux" not in terms else f"{terms['aux'][0]} {terms['aux'][1]} x {alpha:g}"
        balancing += f"; z-loss x {terms['z'][2]:g}" if "z" in terms else ""
        spec = SYSTEM_BASE.replace(
            name=f"sys_{name}", system=name, system_overrides=SYSTEM_SHAPES.get(name, ()), seed=seed,
            n_shared=system.overrides.get("n_shared", 0), aux=system.balancing[1] if system.balancing else None,
            alpha=alpha, beta=0.0, gamma=0.0,
            description=f"system preset {name!r} (E=8, K=2, D=8, H=6, (B, T) = (2, 6)); balancing {balancing}")
        cases += [spec, spec.replace(name=f"sys_{name}_f32", dtype="float32",
                                     description=spec.description + "; float32")]
    return cases


def select(names=None) -> list:
    """Default cases by name (all when ``names`` is empty); unknown names raise ValueError."""
    cases = default_cases()
    if not names:
        return cases
    by_name = {c.name: c for c in cases}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known cases: {sorted(by_name)}")
    return [by_name[n] for n in names]
