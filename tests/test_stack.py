"""The stack of residual MoE blocks: its gradient against finite differences, and the upstream reach of the
top layer's regularisers (compatibility is local to a layer)."""
import math

import numpy as np

from refmoe.study import data as D
from refmoe import gradcheck as gc
from refmoe.losses.task import mse_forward
from refmoe.study.alignment import cosine_matrix
from refmoe.config import MoEConfig
from refmoe.layer import init_params, moe_forward
from refmoe.objective import PRESETS, objective_forward_backward
from refmoe.stack import stack_forward_backward, upstream_term_grads

CFG = MoEConfig(d_model=4, d_hidden=3, n_experts=4, top_k=2, n_shared=1)
OBJ = PRESETS["paper"].replace(alpha=0.3, beta=0.05, gamma=0.7)


def _setup(seed=11, margin=2e-3):
    rng = np.random.default_rng(seed)
    b = D.sample(D.make_task(rng, d_model=4, n_clusters=3, n_narrow=1, teacher_rank=3), rng, 6, backend="numpy")
    for _ in range(300):                                   # two layers whose routing is clear of ties
        ps = [init_params(CFG, rng, np.float64, backend="numpy") for _ in range(2)]
        for p in ps:
            p["w_router"] = p["w_router"] * 3.0
        h, gaps = b.x, []
        for p in ps:
            y, c = moe_forward(h, p, CFG)
            s = np.sort(c.scores, axis=1)[:, ::-1]
            gaps.append((s[:, 1] - s[:, 2]).min())
            h = h + y
        if min(gaps) > margin:
            return ps, b
    raise AssertionError("no tie-free routing found")


def _flat(ps):
    return {f"{l}.{k}": v for l, p in enumerate(ps) for k, v in p.items()}


def _unflat(d):
    return [{k.split(".", 1)[1]: v for k, v in d.items() if k.startswith(f"{l}.")} for l in range(2)]


def _total(ps, b):
    h, reg = b.x, 0.0
    for p in ps:
        reg = reg + objective_forward_backward(h, p, CFG, None, OBJ, per_term=False).losses["regularisers"]
        h = h + moe_forward(h, p, CFG)[0]
    return mse_forward(h, b.target)[0] + reg


def _routing(ps, b):
    h, key = b.x, []
    for p in ps:
        y, c = moe_forward(h, p, CFG)
        key.append(c.topk_idx)
        h = h + y
    return np.concatenate(key)


def test_stack_gradient_matches_finite_differences():
    ps, b = _setup()
    st = stack_forward_backward(b.x, ps, CFG, b.target, OBJ)
    analytic = _flat([{k: g[k] for k in p} for p, g in zip(ps, st.grads)])
    errs = gc.check_vjp(lambda d: _total(_unflat(d), b), _flat(ps), analytic,
                        guard=lambda d: _routing(_unflat(d), b))
    assert max(errs.values()) < 1e-7, errs           # measured ~1e-9; pass mark 1e-7


def test_top_layer_regularisers_reach_the_layer_below():
    ps, b = _setup()
    st = stack_forward_backward(b.x, ps, CFG, b.target, OBJ, per_term=True)
    up = upstream_term_grads(st, top=1, below=0)
    # inside layer 1: no L_aux gradient on its experts, no L_o gradient on its router
    own = st.results[1].grads
    assert all(float(np.abs(own["aux"][k]).max()) == 0.0 for k in ("w_gate", "w_up", "w_down"))
    assert float(np.abs(own["ortho"]["w_router"]).max()) == 0.0
    # below: layer 1's L_aux reaches layer 0's experts and L_o its router (non-zero, defined cosines)
    for k in ("w_gate", "w_up", "w_down"):
        assert float(np.abs(up["aux"][k]).max()) > 1e-8
    assert float(np.abs(up["ortho"]["w_router"]).max()) > 1e-8
    m = cosine_matrix(up, "experts")
    assert not math.isnan(m[0, 1]) and not math.isnan(m[0, 2]) and not math.isnan(m[1, 2])
    # the upstream terms add up to what the whole stack gives layer 0 minus layer 0's own regularisers
    own0 = st.results[0].grads
    for k in ps[0]:
        lhs = sum(up[t][k] for t in ("task", "aux", "ortho", "var")) + own0["aux"][k] + own0["ortho"][k] + own0["var"][k]
        assert np.abs(lhs - st.grads[0][k]).max() < 1e-12 * (1 + np.abs(st.grads[0][k]).max())
