"""Golden cases of the router presets of ``refmoe.systems`` (``sys_<S>``, ``sys_<S>_f32``): the layer as system S
builds it, its balancing loss in S's form and, for Megatron, the router z-loss.

Dimension letters: N tokens, D model width, H expert hidden width, E experts, K top-k, G expert groups.

    total = <dy, y> + alpha L_bal (+ zeta L_z)

L_bal is stored as term "aux" whatever family its form comes from: an ``aux`` form of ``refmoe.losses.aux``
(HF's ``switch``, ``deepseek_seq``) or a ``sys_aux`` form of ``refmoe.losses.aux_systems`` (Megatron's
``megatron_aux``, ``megatron_seq_aux``); the manifest's ``balancing`` field says which. A system that computes
no balancing loss (deepseek_v2) has no aux term. Coefficients: the source's default where it has one,
else 1e-2 (``coefficient_source`` in the manifest says which).

Inputs (:func:`make_system_inputs`) are drawn as for every case, then kept only when every discrete choice of
the router is clear by at least ``MIN_MARGIN`` (:func:`routing_margin`): the K-th against the (K+1)-th ranked
value inside the kept groups, the kept groups against the rest, the plain top-k of P that HF's and Megatron's
losses recount, and the C-th against the (C+1)-th gate of every over-full expert under capacity. A preset with
``expert_bias`` gets a non-zero bias that changes the choice of at least one token, and a grouped preset one
token at least whose choice the groups change.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_xp, to_numpy
from ..layer import init_params, moe_forward
from ..losses.terms import term_forward
from ..objective import compose_backward
from ..router_capacity import expert_capacity
from ..router_select import group_scores
from ..systems import SYSTEMS
from .cases import case_arrays

MIN_MARGIN = 1e-3
BIAS_SCALE = 0.1            # expert_bias ~ BIAS_SCALE * N(0, 1): sigmoid scores are spread over ~(0.2, 0.8)
DEFAULT_COEFFICIENT = 1e-2  # where the source has no default coefficient
Z_COEFFICIENT = 1e-2        # Megatron's moe_z_loss_coeff has no default (None)


# ----------------------------------------------------------------------------------------------
# the terms of a system
# ----------------------------------------------------------------------------------------------

def has_z_loss(system: str) -> bool:
    """Megatron-Core has a router z-loss (``moe_z_loss_coeff``); the HF models and the authors' code have none."""
    return system.startswith("megatron")


def system_terms(system: str) -> dict:
    """term -> (family, form, coefficient, where the coefficient comes from) of a system's case.

    family is the term name of ``refmoe.losses.term_forward`` ("aux", "sys_aux" or "z"); the case stores the
    balancing loss as "aux" and the z-loss as "z".
    """
    s = SYSTEMS[system]
    terms = {}
    if s.balancing is not None:
        family, form = s.balancing
        if s.balancing_coefficient is not None:
            terms["aux"] = (family, form, float(s.balancing_coefficient), f"the source's default ({s.source})")
        else:
            terms["aux"] = (family, form, DEFAULT_COEFFICIENT, "no default in the source: 1e-2")
    if has_z_loss(system):
        terms["z"] = ("z", "zloss", Z_COEFFICIENT, "moe_z_loss_coeff has no default in the source: 1e-2")
    return terms


# float32: the real float32 implementations (HF Mixtral block + load_balancing_loss_func, HF DeepSeek-V3 block,
# Megatron-Core topk routing, capacity, aux losses, z-loss) differ from these cases by at most 7e-7 x max|want|
# per tensor (docs/golden-format.md, "Per-system cases"); rtol 1e-5 leaves a factor 14. atol only decides
# tensors that are (nearly) all zero. float64: format.TOLERANCES, for float64 implementations of the formulas;
# the real code keeps float32 routers in a float64 model and needs rtol ~1e-6 there (give it to the checker).
SYSTEM_TOLERANCES = {"float64": {"rtol": 1e-10, "atol": 1e-13}, "float32": {"rtol": 1e-5, "atol": 1e-9}}


def system_tolerance(system: str, dtype: str) -> dict:
    """The tolerance a system case records; each is within format.TOLERANCES (the checker never loosens)."""
    if system not in SYSTEMS:
        raise ValueError(f"system={system!r}; expected one of {sorted(SYSTEMS)}")
    return SYSTEM_TOLERANCES[dtype]


# ----------------------------------------------------------------------------------------------
# inputs with clear routing decisions
# ----------------------------------------------------------------------------------------------

def _gap(values, k):
    """min over rows of (k-th largest - (k+1)-th largest) of values [N, M]; inf when the (k+1)-th is -inf or absent."""
    srt = -np.sort(-values, axis=1)
    if k >= values.shape[1]:
        return np.inf
    gap = srt[:, k - 1] - srt[:, k]
    gap[~np.isfinite(srt[:, k])] = np.inf
    return float(gap.min())


def routing_margin(x, params, cfg):
    """The smallest margin of any discrete choice the layer and its losses make on x [N, D] (float64 host)."""
    _, cache = moe_forward(x, params, cfg)
    choice = cache.router.choice                                           # [N, E] what the selection ranks
    K, E = cfg.top_k, cfg.n_experts
    margins = [_gap(cache.scores, K)]                                      # plain top-k of P (the losses' recount)
    if cfg.n_group is None:
        margins.append(_gap(choice, K))
    else:
        G, Kg = cfg.n_group, cfg.topk_group
        m = {"max": 1, "top2_sum": 2, "topm_sum": K // Kg}[cfg.group_rule]
        h = group_scores(choice, G, m)                                     # [N, G]
        margins.append(_gap(h, Kg))
        kept = ops.topk_indices(h, Kg)                                     # [N, Kg]
        in_kept = np.zeros((x.shape[0], G), dtype=bool)
        np.put_along_axis(in_kept, kept, True, axis=1)
        margins.append(_gap(np.where(np.repeat(in_kept, E // G, axis=1), choice, -np.inf), K))
    if cfg.capacity_factor is not None:
        C = expert_capacity(x.shape[0], E, K, cfg.capacity_factor, cfg.min_capacity)
        pre = cache.router.gates                                           # [N, K] gates before dropping
        for j in range(E):
            column = pre[cache.topk_idx == j]
            if column.size > C:
                srt = np.sort(column)[::-1]
                margins.append(float(srt[C - 1] - srt[C]))
    return min(margins)


def _choice_changes(x, params, cfg):
    """(the bias changes some token's experts, the groups change some token's experts) on x."""
    _, cache = moe_forward(x, params, cfg)
    chosen = np.sort(cache.topk_idx, axis=1)
    bias_bites = groups_bite = True
    if cfg.expert_bias:
        plain = np.sort(ops.topk_indices(cache.router.choice - params["expert_bias"], cfg.top_k), axis=1)
        bias_bites = bool((plain != chosen).any())
    if cfg.n_group is not None:
        ungrouped = np.sort(ops.topk_indices(cache.router.choice, cfg.top_k), axis=1)
        groups_bite = bool((ungrouped != chosen).any())
    return bias_bites, groups_bite


def _drops_some(x, params, cfg):
    if cfg.capacity_factor is None:
        return True
    _, cache = moe_forward(x, params, cfg)
    return bool((~cache.keep).any())


def make_system_inputs(spec):
    """Host float64 (x [N, D], params, dy [N, D], valid_mask [N]) of a system case, deterministic in spec.seed."""
    cfg = spec.config()
    for attempt in range(500):
        rng = np.random.default_rng([spec.seed, attempt])
        params = init_params(cfg, rng, dtype=np.float64, backend="numpy")
        x = rng.standard_normal((spec.n_tokens, spec.d_model))             # [N, D]
        dy = rng.standard_normal((spec.n_tokens, spec.d_model))            # [N, D]
        if cfg.expert_bias:
            params["expert_bias"] = BIAS_SCALE * rng.standard_normal(cfg.n_experts)   # [E]
        if (routing_margin(x, params, cfg) >= MIN_MARGIN and all(_choice_changes(x, params, cfg))
                and _drops_some(x, params, cfg)):
            return x, params, dy, np.ones(spec.n_tokens, dtype=bool)
    raise RuntimeError(f"case {spec.name!r}: no draw met the routing conditions")


# ----------------------------------------------------------------------------------------------
# the arrays
# ----------------------------------------------------------------------------------------------

def compute_system_case(spec, backend: str = "numpy") -> dict:
    """All arrays of a system case (host NumPy, the case's dtype), keyed as every layer case."""
    dtype = np.dtype(spec.dtype)
    xp = get_xp(backend)
    x_h, params_h, dy_h, valid_h = make_system_inputs(spec)
    x = xp.asarray(x_h.astype(dtype))                                                  # [N, D]
    params = {k: xp.asarray(v.astype(dtype)) for k, v in params_h.items()}
    dy = xp.asarray(dy_h.astype(dtype))                                                # [N, D]
    out = evaluate_system(spec, x, params, dy, xp.asarray(valid_h))
    host = {k: to_numpy(v) for k, v in out.items()}
    host = {k: (v if v.dtype.kind in "bi" else v.astype(dtype, copy=False)) for k, v in host.items()}
    host["inter/topk_idx"] = host["inter/topk_idx"].astype(np.int64)
    return host


def evaluate_system(spec, x, params: dict, dy, valid) -> dict:
    """A system case's pipeline on given arrays (any backend): key -> array (``expert_bias`` has no gradient key).

    x [N, D], params (the config's, ``expert_bias`` included), dy [N, D], valid [N] bool (all True here).
    """
    cfg = spec.config()
    y, cache = moe_forward(x, params, cfg)
    terms = system_terms(spec.system)
    caches = {t: term_forward(family, form, cache, batch_shape=spec.batch_shape)
              for t, (family, form, _, _) in terms.items()}
    coef = {t: c for t, (_, _, c, _) in terms.items()}
    grads = compose_backward(dy, cache, {t: tc for t, (_, tc) in caches.items()}, coef)
    return case_arrays(x, params, dy, valid, y, cache, {t: v for t, (v, _) in caches.items()}, coef, grads,
                       no_grad=("expert_bias",))                         # selection only: no gradient key
