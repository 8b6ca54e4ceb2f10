"""No silent non-finite result: hypothesis drives the layer and every loss form to extreme scales.

For each draw, every public call (``moe_forward``, ``moe_backward``, each (term, form) forward and backward)
either raises a ValueError / TypeError whose message names the argument at fault, or returns only finite
arrays. Draws cover float32 and float64, x up to 1e30, router weights scaled up to 1e8, expert weights down to
1e-30 and 0 (tiny and zero outputs), identical tokens, upstream gradients up to 1e30.

Example count per run: LAYER_EXAMPLES + LOSS_EXAMPLES = 1,000 + 600 = 1,600 (about 15 s on one core).
"""
import re

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from refmoe import MoEConfig, init_params, moe_backward, moe_forward
from refmoe.losses.terms import TERM_FORMS, term_backward, term_forward
from refmoe.losses.aux import aux_loss_backward, aux_loss_forward
from refmoe.losses.ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward
from refmoe.losses.variance import var_loss_backward, var_loss_forward

LAYER_EXAMPLES = 1000
LOSS_EXAMPLES = 600

# the names an error may give for the argument at fault
NAMED = re.compile(r"(^|\W)(x|params\['\w+'\]|dy|d_scores|d_expert_out|d_logits|dloss|expert_out|scores|logits)(\W|$)")

SCALES_X = [0.0, 1e-30, 1e-8, 1.0, 1e3, 1e10, 1e20, 1e30]
SCALES_ROUTER = [1e-8, 1.0, 1e4, 1e8]
SCALES_EXPERT = [0.0, 1e-30, 1e-10, 1.0, 1e5]
SCALES_UPSTREAM = [1e-3, 1.0, 1e10, 1e30]


def _finite(*arrays):
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays if a is not None)


def _call(what, fn, *args, **kwargs):
    """fn(*args) -> (True, result), or (False, None) after checking that the error names its argument."""
    try:
        return True, fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        assert NAMED.search(str(exc)), f"{what}: the error does not name its argument: {exc}"
        return False, None


def _check_terms(cache, dloss, n_experts):
    """Every (term, form) on the layer's cache; returns the summed injections (or None where one raised)."""
    d_scores, d_expert_out = [], []
    for term, forms in TERM_FORMS.items():
        for form in forms:
            if term == "var" and form == "code" and n_experts < 2:
                continue                                     # a config error (unbiased variance of 1 value)
            ok, out = _call(f"{term}/{form} forward", term_forward, term, form, cache,
                            batch_shape=(1, cache.x.shape[0]))
            if not ok:
                continue
            value, tcache = out
            assert _finite(value), f"{term}/{form}: silent non-finite value {value}"
            ok, inj = _call(f"{term}/{form} backward", term_backward, dloss, tcache)
            if not ok:
                continue
            assert _finite(inj.d_scores, inj.d_expert_out), f"{term}/{form}: silent non-finite gradient"
            if inj.d_scores is not None:
                d_scores.append(inj.d_scores)
            if inj.d_expert_out is not None:
                d_expert_out.append(inj.d_expert_out)
    return (sum(d_scores) if d_scores else None), (sum(d_expert_out) if d_expert_out else None)


@st.composite
def layer_cases(draw):
    E = draw(st.integers(1, 5))
    cfg = MoEConfig(d_model=draw(st.integers(1, 5)), d_hidden=draw(st.integers(1, 4)), n_experts=E,
                    top_k=draw(st.integers(1, E)), n_shared=draw(st.integers(0, 1)),
                    norm_topk_prob=draw(st.booleans()))
    return dict(cfg=cfg, n=draw(st.integers(1, 8)), dtype=draw(st.sampled_from([np.float32, np.float64])),
                sx=draw(st.sampled_from(SCALES_X)), sr=draw(st.sampled_from(SCALES_ROUTER)),
                se=draw(st.sampled_from(SCALES_EXPERT)), su=draw(st.sampled_from(SCALES_UPSTREAM)),
                dloss=draw(st.sampled_from(SCALES_UPSTREAM)), identical=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=LAYER_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_layer_and_every_term_finite_or_named(case):
    cfg, dtype = case["cfg"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    params = init_params(cfg, rng, dtype=dtype, backend="numpy")
    params = {k: (w * (case["sr"] if k == "w_router" else case["se"])).astype(dtype) for k, w in params.items()}
    x = rng.standard_normal((1 if case["identical"] else case["n"], cfg.d_model))
    x = np.broadcast_to(x, (case["n"], cfg.d_model)) * case["sx"]
    with np.errstate(over="ignore"):                       # 1e30 * N(0, 1) may not be a float32: inf is a draw too
        x = np.ascontiguousarray(x.astype(dtype))
    ok, out = _call("moe_forward", moe_forward, x, params, cfg)
    if not ok:
        return
    y, cache = out
    assert _finite(y), "moe_forward: silent non-finite y"
    d_scores, d_expert_out = _check_terms(cache, case["dloss"], cfg.n_experts)
    with np.errstate(over="ignore"):
        dy = (rng.standard_normal(y.shape) * case["su"]).astype(dtype)
    ok, grads = _call("moe_backward", moe_backward, dy, cache, d_scores=d_scores, d_expert_out=d_expert_out)
    if ok:
        assert _finite(*grads.values()), "moe_backward: silent non-finite gradient"


@st.composite
def loss_cases(draw):
    N, K = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    E = draw(st.integers(K, 6))
    return dict(N=N, K=K, E=E, D=draw(st.integers(1, 5)), dtype=draw(st.sampled_from([np.float32, np.float64])),
                scale=draw(st.sampled_from([0.0, 1e-40, 1e-30, 1e-8, 1.0, 1e10, 1e19, 1e30])),
                zero_slot=draw(st.booleans()), identical=draw(st.booleans()),
                eps=draw(st.sampled_from([None, 0.0, 1e-30, 0.3])), logit_scale=draw(st.sampled_from([0.0, 1.0, 1e3])),
                dloss=draw(st.sampled_from(SCALES_UPSTREAM)), seed=draw(st.integers(0, 2**31 - 1)))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@settings(max_examples=LOSS_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loss_cases())
def test_every_loss_form_on_extreme_inputs_finite_or_named(c):
    rng = np.random.default_rng(c["seed"])
    N, K, E, D, dtype = c["N"], c["K"], c["E"], c["D"], c["dtype"]
    A = rng.standard_normal((N, K, D))
    if c["identical"]:
        A[:] = A[:1, :1]                                    # every slot of every token the same vector
    if c["zero_slot"]:
        A[:, 0] = 0.0
    with np.errstate(over="ignore", under="ignore"):
        A = (A * c["scale"]).astype(dtype)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)
    for variant in ORTHO_VARIANTS:
        ok, out = _call(f"ortho/{variant}", ortho_loss_forward, A, variant, eps=c["eps"], topk_idx=idx)
        if ok:
            assert _finite(out[0]), f"ortho/{variant}: silent non-finite value"
            ok, dA = _call(f"ortho/{variant} backward", ortho_loss_backward, c["dloss"], out[1])
            if ok:
                assert _finite(dA), f"ortho/{variant}: silent non-finite gradient"
    z = rng.standard_normal((1 if c["identical"] else N, E)) * c["logit_scale"]
    P = _softmax(np.broadcast_to(z, (N, E))).astype(dtype)
    idx = np.argsort(-P, axis=1, kind="stable")[:, :K]
    for term, forward, backward in (("aux", aux_loss_forward, aux_loss_backward),
                                    ("var", var_loss_forward, var_loss_backward)):
        for form in TERM_FORMS[term]:
            if term == "var" and form == "code" and E < 2:
                continue
            kw = dict(batch_shape=(1, N)) if term == "aux" else {}
            ok, out = _call(f"{term}/{form}", forward, P, idx, form, **kw)
            if ok:
                assert _finite(out[0]), f"{term}/{form}: silent non-finite value"
                ok, ds = _call(f"{term}/{form} backward", backward, c["dloss"], out[1])
                if ok:
                    assert _finite(ds), f"{term}/{form}: silent non-finite gradient"
