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

from ..backend import get_xp, to_numpy
from ..config import MoEConfig
from ..layer import init_params, moe_backward, moe_forward
from ..losses import aux_conventions
from ..losses.aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward

# Forms of L_aux a case may use: the registered ones plus GShard's first-choice f (needs the slot order).
AUX_FORMS = tuple(sorted(AUX_VARIANTS)) + ("gshard_first_choice",)
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

    @property
    def n_tokens(self) -> int:
        return self.batch_shape[0] * self.batch_shape[1]

    def config(self) -> MoEConfig:
        return MoEConfig(self.d_model, self.d_hidden, self.n_experts, self.top_k, self.n_shared,
                         self.norm_topk_prob)

    def replace(self, **changes) -> "CaseSpec":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def _topk_margin(x, w_router, k):
    z = x @ w_router.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
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
            scores = _softmax(x @ params["w_router"].T)
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
    from ..autoscale import autoscale_weights
    from ..objective import PRESETS

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


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# the losses of a case: value and d(intermediate) for dloss = 1
# ----------------------------------------------------------------------------------------------

def aux_form(scores, topk_idx, form, *, valid_mask=None, batch_shape=None):
    """(loss, d_scores [N, E]) of any form in ``AUX_FORMS``."""
    if form == "gshard_first_choice":
        loss, c = aux_conventions.gshard_first_choice_forward(scores, topk_idx, valid_mask=valid_mask)
        return loss, aux_conventions.gshard_first_choice_backward(1.0, c)
    loss, c = aux_loss_forward(scores, topk_idx, form, valid_mask=valid_mask, batch_shape=batch_shape)
    return loss, aux_loss_backward(1.0, c)


def _ortho(cache, spec, mask):
    from ..losses.ortho import ortho_loss_backward, ortho_loss_forward

    loss, c = ortho_loss_forward(cache.expert_out, spec.ortho, eps=spec.ortho_eps, topk_idx=cache.topk_idx,
                                 valid_mask=mask)
    return loss, ortho_loss_backward(1.0, c)


def _var(cache, spec, mask):
    from ..losses.variance import var_loss_backward, var_loss_forward

    loss, c = var_loss_forward(cache.scores, cache.topk_idx, spec.var, valid_mask=mask)
    return loss, var_loss_backward(1.0, c)


def compute_case(spec: CaseSpec, backend: str = "numpy") -> dict:
    """All arrays of a case (host NumPy, the case's dtype), keyed as in ``refmoe.golden.format``."""
    if spec.kind == "aux_layers":
        from .conventions import compute_convention_case

        return compute_convention_case(spec, backend)
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
    terms = {"task": ((dy * y).sum(), {})}
    l_aux, d_aux = aux_form(cache.scores, cache.topk_idx, spec.aux, valid_mask=mask, batch_shape=spec.batch_shape)
    terms["aux"] = (l_aux, {"d_scores": d_aux})
    if spec.ortho is not None:
        l_o, d_o = _ortho(cache, spec, mask)
        terms["ortho"] = (l_o, {"d_expert_out": d_o})
    if spec.var is not None:
        l_v, d_v = _var(cache, spec, mask)
        terms["var"] = (l_v, {"d_scores": d_v})

    grads = {"task": moe_backward(dy, cache)}
    for term in ("aux", "ortho", "var"):
        if term in terms:
            grads[term] = moe_backward(None, cache, **terms[term][1])
    # total = task + alpha aux + beta ortho + gamma var: one backward with every gradient injected
    coef = {"aux": spec.alpha, "ortho": spec.beta, "var": spec.gamma}
    total = terms["task"][0]
    d_scores_total = 0                                                  # [N, E] after the aux term
    d_eo_total = None                                                   # [N, K, D] with L_o
    for term in ("aux", "ortho", "var"):
        if term not in terms:
            continue
        c = float(coef[term])
        total = total + c * terms[term][0]
        inj = terms[term][1]
        if "d_scores" in inj:
            d_scores_total = d_scores_total + c * inj["d_scores"]
        else:
            d_eo_total = c * inj["d_expert_out"]
    grads["total"] = moe_backward(dy, cache, d_scores=d_scores_total, d_expert_out=d_eo_total)

    out = {"input/x": x, "input/dy": dy, "input/valid_mask": valid}
    out.update({f"param/{k}": v for k, v in params.items()})
    for name in ("logits", "scores", "topk_idx", "gates", "expert_out", "shared_out"):
        value = getattr(cache, name)
        if value is not None:
            out[f"inter/{name}"] = value
    out["inter/y"] = y
    for term, (value, _) in terms.items():
        out[f"loss/{term}"] = value
    out["loss/total"] = total
    for term, g in grads.items():
        out.update({f"grad/{term}/{k}": v for k, v in g.items()})
    return out
