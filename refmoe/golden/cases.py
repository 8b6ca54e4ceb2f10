"""The golden cases: what each one fixes (config, data, loss forms, coefficients) and how its arrays are computed.

Dimension letters: N tokens, D model width, H expert hidden width, E experts, K top-k.

A case is one MoE layer on a small deterministic batch. The task loss is the linear functional
L_h = <dy, y> (its gradient is the layer's vector-Jacobian product with ``dy``), so

    total = <dy, y> + alpha L_aux + beta L_o + gamma L_v

and every implementation can reproduce it exactly from the stored ``dy``. Padding rows of ``dy`` are zero.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..backend import get_xp, to_numpy
from ..config import MoEConfig
from ..layer import init_params, moe_forward
from ..losses.terms import TERM_FORMS
from ..autoscale import autoscale_weights
from ..objective import PRESETS, compose_backward, regularisers_forward
from ..systems import system_config

# Forms of L_aux a case may use (the order of the default grid's cases)
AUX_FORMS = tuple(sorted(f for f in TERM_FORMS["aux"] if f != "gshard_first_choice")) + ("gshard_first_choice",)
MIN_MARGIN = 1e-3        # non-tie cases keep the K-th and (K+1)-th score at least this far apart


@dataclass(frozen=True)
class CaseSpec:
    """Everything that defines a case; ``dataclasses.asdict`` of it goes into the manifest."""
    name: str
    description: str = ""
    d_model: int = 6
    d_hidden: int = 5
    n_experts: int = 4
    top_k: int = 2
    n_shared: int = 0
    norm_topk_prob: bool = True
    batch_shape: tuple = (2, 4)          # (B, T), token i = b*T + t (megatron_seq: i = t*B + b)
    padding: tuple = ()                  # token indices that are padding (valid_mask False)
    dtype: str = "float64"
    aux: str = "switch"
    ortho: str | None = "pairwise"       # None: the case has no L_o
    var: str | None = "paper"            # None: the case has no L_v
    alpha: float = 0.01
    beta: float = 0.02
    gamma: float = 0.03
    ortho_eps: float | None = None
    mask_in_losses: bool = True          # False: the regularisers see padding rows (authors' code)
    preset: str | None = None
    ties: bool = False                   # exact ties in the scores, resolved by the tie rule
    seed: int = 0
    kind: str = "layer"                  # "layer", or "aux_layers": a multi-layer balancing-loss convention
    n_layers: int = 1                    # aux_layers: L router outputs
    micro_batches: tuple = ()            # aux_layers, megatron_global: sizes of the micro-batches
    system: str | None = None            # a preset of refmoe.systems: the layer and its losses as S builds them
    system_overrides: tuple = ()         # system: (field, value) pairs replacing preset fields (e.g. n_group)
    rank: int | None = None              # a per-rank case (dist_cases): this rank of the micro_batches ranks

    @property
    def n_tokens(self) -> int:
        return self.batch_shape[0] * self.batch_shape[1]

    def config(self) -> MoEConfig:
        if self.system is not None:
            return system_config(self.system, self.d_model, self.d_hidden, self.n_experts, self.top_k,
                                 **dict(self.system_overrides))
        return MoEConfig(self.d_model, self.d_hidden, self.n_experts, self.top_k, self.n_shared,
                         self.norm_topk_prob)

    def replace(self, **changes) -> "CaseSpec":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def _topk_margin(x, w_router, k):
    p, _ = ops.softmax_forward(x @ w_router.T)
    srt = np.sort(p, axis=1)[:, ::-1]
    return np.inf if k == p.shape[1] else float((srt[:, k - 1] - srt[:, k]).min())


def _tied_router(rng, spec):
    """Dyadic x and W_r (exact products and sums in float32 and float64), W_r rows 1 and 2 equal, token 0 zero.

    Every logit is then exact whatever the summation order, experts 1 and 2 tie on every token and
    token 0 ties on all experts, in every implementation.
    """
    N, D, E = spec.n_tokens, spec.d_model, spec.n_experts
    x = rng.integers(-6, 7, size=(N, D)) / 4.0
    x[0] = 0.0
    w = rng.integers(-6, 7, size=(E, D)) / 8.0
    w[2] = w[1]
    return x, w


def make_inputs(spec: CaseSpec):
    """Host float64 inputs (x, params, dy, valid_mask) of a case, drawn from ``spec.seed`` deterministically."""
    cfg = spec.config()
    for attempt in range(200):
        rng = np.random.default_rng([spec.seed, attempt])
        params = init_params(cfg, rng, dtype=np.float64, backend="numpy")
        if spec.ties:
            x, params["w_router"] = _tied_router(rng, spec)
        else:
            x = rng.standard_normal((spec.n_tokens, spec.d_model))
        dy = rng.standard_normal((spec.n_tokens, spec.d_model))
        if spec.ties:
            scores, _ = ops.softmax_forward(x @ params["w_router"].T)
            idx = np.argsort(-scores, axis=1, kind="stable")[:, :spec.top_k]
            straddle = (idx == 1).any(axis=1) ^ (idx == 2).any(axis=1)   # a tie decided by the rule
            if straddle[1:].any():
                break
        elif _topk_margin(x, params["w_router"], spec.top_k) >= MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"case {spec.name!r}: no draw met the routing condition")
    valid = np.ones(spec.n_tokens, dtype=bool)
    valid[list(spec.padding)] = False
    dy[~valid] = 0.0
    return x, params, dy, valid


def resolve_preset(spec: CaseSpec) -> CaseSpec:
    """A preset case with the preset's forms, padding rule and coefficients filled in.

    ``authors_code`` leaves beta and gamma to the released power-of-ten calibration: they are set by
    ``refmoe.autoscale_weights`` on the case's own batch (padding included, as the released code does).
    Other cases are returned unchanged.
    """
    if spec.preset is None:
        return spec
    if spec.preset not in PRESETS:
        raise ValueError(f"case {spec.name!r}: preset={spec.preset!r}; expected one of {sorted(PRESETS)}")
    obj = PRESETS[spec.preset]
    if not obj.is_calibrated:
        x, params, _, _ = make_inputs(spec)
        dtype = np.dtype(spec.dtype)
        obj = autoscale_weights(x.astype(dtype), {k: v.astype(dtype) for k, v in params.items()},
                                spec.config(), obj).objective
    return spec.replace(aux=obj.aux_variant, ortho=obj.ortho_loss_variant, var=obj.var_variant,
                        alpha=float(obj.alpha), beta=float(obj.beta), gamma=float(obj.gamma),
                        ortho_eps=obj.ortho_eps, mask_in_losses=obj.padding == "exclude")


# ----------------------------------------------------------------------------------------------
# the arrays of a case
# ----------------------------------------------------------------------------------------------

def compute_case(spec: CaseSpec, backend: str = "numpy") -> dict:
    """All arrays of a case (host NumPy, the case's dtype), keyed as in ``refmoe.golden.format``."""
    if spec.rank is not None:
        from .dist_cases import compute_dist_case

        return compute_dist_case(spec, backend)
    if spec.kind == "aux_layers":
        from .conventions import compute_convention_case

        return compute_convention_case(spec, backend)
    if spec.system is not None:
        from .systems_cases import compute_system_case

        return compute_system_case(spec, backend)
    spec = resolve_preset(spec)
    if spec.kind != "layer":
        raise ValueError(f"case {spec.name!r}: kind={spec.kind!r}; expected 'layer' or 'aux_layers'")
    if spec.aux not in AUX_FORMS:
        raise ValueError(f"case {spec.name!r}: aux={spec.aux!r}; expected one of {AUX_FORMS}")
    dtype = np.dtype(spec.dtype)
    xp = get_xp(backend)
    x_h, params_h, dy_h, valid_h = make_inputs(spec)
    x = xp.asarray(x_h.astype(dtype))
    params = {k: xp.asarray(v.astype(dtype)) for k, v in params_h.items()}
    out = evaluate(spec, x, params, xp.asarray(dy_h.astype(dtype)), xp.asarray(valid_h))
    host = {k: to_numpy(v) for k, v in out.items()}
    host = {k: (v if v.dtype.kind in "bi" else v.astype(dtype, copy=False)) for k, v in host.items()}
    host["inter/topk_idx"] = host["inter/topk_idx"].astype(np.int64)
    return host


def evaluate(spec: CaseSpec, x, params: dict, dy, valid) -> dict:
    """The case's pipeline on given arrays (any backend): intermediates, loss values and gradients.

    x [N, D], params, dy [N, D], valid [N] bool. Returns key -> array on the inputs' backend.
    """
    cfg = spec.config()
    mask = valid if (spec.padding and spec.mask_in_losses) else None

    y, cache = moe_forward(x, params, cfg)
    forms = {"aux": spec.aux, "ortho": spec.ortho, "var": spec.var}
    forms = {t: f for t, f in forms.items() if f is not None}
    terms = regularisers_forward(cache, forms, valid_mask=mask, batch_shape=spec.batch_shape,
                                 ortho_eps=spec.ortho_eps)
    coef = {"aux": spec.alpha, "ortho": spec.beta, "var": spec.gamma}
    grads = compose_backward(dy, cache, {t: c for t, (_, c) in terms.items()}, coef)
    return case_arrays(x, params, dy, valid, y, cache, {t: v for t, (v, _) in terms.items()}, coef, grads)


def case_arrays(x, params: dict, dy, valid, y, cache, values: dict, coef: dict, grads: dict, *,
                no_grad: tuple = ()) -> dict:
    """The keys of a layer case (``refmoe.golden.format``) from its inputs, the layer's output and cache, the
    terms' values and coefficients and ``compose_backward``'s gradients; total = <dy, y> + sum_t c_t L_t.
    ``no_grad``: parameters with no gradient key (a selection-only expert bias)."""
    task = (dy * y).sum()
    total = task
    for t, value in values.items():                                     # total = task + alpha aux + ...
        total = total + float(coef[t]) * value
    out = {"input/x": x, "input/dy": dy, "input/valid_mask": valid}
    out.update({f"param/{k}": v for k, v in params.items()})
    for name in ("logits", "scores", "topk_idx", "gates", "expert_out", "shared_out"):
        value = getattr(cache, name)
        if value is not None:
            out[f"inter/{name}"] = value
    out["inter/y"] = y
    out["loss/task"] = task
    for term, value in values.items():
        out[f"loss/{term}"] = value
    out["loss/total"] = total
    for term, g in grads.items():
        out.update({f"grad/{term}/{k}": v for k, v in g.items() if k not in no_grad})
    return out
