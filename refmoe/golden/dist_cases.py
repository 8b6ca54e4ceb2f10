r"""Golden cases of the global-batch scopes, one case per rank of a data-parallel group (``<group>_rank<r>``).

Dimension letters: R ranks, N_r tokens of rank r, N_g valid tokens of the global batch, L layers, D model width,
E experts, K top-k.

A group is one global batch split over R ranks, unevenly, with padding on some ranks (and, for R = 3, a rank that
is all padding or holds no token). Case ``<group>_rank<r>`` holds what rank r sees and must produce: its own
inputs, the sums its all-reduce must return (the same on every rank), its share of each loss and its slice of the
gradients. A distributed implementation runs each rank on its file and dumps ``<group>_rank<r>.npz``;
``refmoe golden check`` then compares rank by rank. :func:`dump_rank` is refmoe's own such dump, through a
``refmoe.distributed`` communicator (the tests run it on threads and under ``mpiexec``).

Kinds and keys (besides those of every case of the kind, docs/golden-format.md):

    aux_layers   variants.aux "megatron_global" or "qwen_global" (refmoe.distributed.conventions)
                 input/logits [L, N_r, E]    inter/global_counts [L, E]  c^g_lj summed over the ranks
                 inter/global_tokens []      N_g                         loss/aux [] this rank's share
                 loss/aux_global []          the sum of the shares = the concatenated batch's loss
                 grad/aux/logits [L, N_r, E] this rank's slice
    layer        the objective's shares on rank r's tokens (task L_h = <dy, y>, a sum: its shares add up as they
                 are); inter/global_counts [E] and inter/global_tokens [] of L_aux, inter/global_score_sums [E]
                 (sum of S over the global batch) when L_v is ``paper``; loss/<term>_global [] for each term and
                 total; grad/<term>/<name> this rank's slice (summed over the ranks: the one-process gradient)

The manifest entry adds ``world_size``, ``rank``, ``rank_sizes`` and ``group``; ``padding_tokens`` are this
rank's rows. Every number is computed by summing the ranks' sums in rank order on one process; :func:`dump_rank`
computes them again through a communicator, so the check compares the two.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_xp, to_numpy
from ..layer import moe_forward
from ..losses import aux_conventions as conv
from ..losses.terms import term_totals
from ..objective import Objective, compose_backward, regularisers_forward
from .cases import CaseSpec, case_arrays, make_inputs
from .conventions import _inputs

DIST_FORMS = ("megatron_global", "qwen_global")          # the aux_layers forms of a group


def dist_cases() -> list:
    """Every rank of every group of the default grid."""
    layers = CaseSpec(name="dist", kind="aux_layers", n_layers=2, ortho=None, var=None, seed=11)
    layer = CaseSpec(name="dist", alpha=0.01, beta=0.02, gamma=0.03, seed=12)
    groups = [
        layers.replace(name="dist_megatron_global_r2", aux="megatron_global", micro_batches=(3, 5), padding=(6,),
                       batch_shape=(1, 8), description="Megatron-Core global_aux_loss over 2 data-parallel ranks "
                       "of 3 and 5 tokens (rank 1's token 3 padding), 2 layers"),
        layers.replace(name="dist_megatron_global_r3", aux="megatron_global", micro_batches=(4, 0, 5),
                       padding=(7,), batch_shape=(1, 9), description="Megatron-Core global_aux_loss over 3 ranks of "
                       "4, 0 and 5 tokens (rank 2's token 3 padding), 2 layers"),
        layers.replace(name="dist_qwen_global_r2", aux="qwen_global", micro_batches=(3, 5), padding=(6,),
                       batch_shape=(1, 8), description="Qwen's global-batch balancing loss (HF form, layers "
                       "concatenated) over 2 ranks of 3 and 5 tokens (rank 1's token 3 padding), 2 layers"),
        layers.replace(name="dist_qwen_global_r3", aux="qwen_global", micro_batches=(4, 0, 5), padding=(7,),
                       batch_shape=(1, 9), description="Qwen's global-batch balancing loss over 3 ranks of 4, 0 "
                       "and 5 tokens (rank 2's token 3 padding), 2 layers"),
        layer.replace(name="dist_layer_r2", aux="deepseek_batch", ortho="span", var="paper", micro_batches=(3, 5),
                      padding=(6,), batch_shape=(1, 8), description="the layer's objective over 2 ranks of 3 and 5 "
                      "tokens (rank 1's token 3 padding): aux deepseek_batch (Megatron's global scope on one layer), "
                      "L_o span (global N), L_v paper (global column means)"),
        layer.replace(name="dist_layer_r3", aux="switch", ortho="pairwise", var="paper", micro_batches=(4, 2, 5),
                      padding=(4, 5, 9), batch_shape=(1, 11), description="the layer's objective over 3 ranks of "
                      "4, 2 and 5 tokens (rank 1 all padding, rank 2's token 3 padding): aux switch (Qwen's global "
                      "batch on one layer), L_o pairwise, L_v paper (global column means)"),
    ]
    return [g.replace(name=f"{g.name}_rank{r}", rank=r, description=f"rank {r} of {len(g.micro_batches)}: "
                      + g.description) for g in groups for r in range(len(g.micro_batches))]


def group_name(spec: CaseSpec) -> str:
    return spec.name.rsplit("_rank", 1)[0]


def _rows(spec: CaseSpec):
    """Index arrays of each rank's rows in the global batch."""
    ends = np.cumsum(spec.micro_batches)
    return [np.arange(end - size, end) for size, end in zip(spec.micro_batches, ends)]


def dist_entry(spec: CaseSpec, base: dict) -> dict:
    """A per-rank case's manifest entry: the entry of its kind for this rank's rows, and the group's fields."""
    rows = _rows(spec)[spec.rank]
    pad = set(spec.padding)
    base.update(world_size=len(spec.micro_batches), rank=spec.rank, rank_sizes=list(spec.micro_batches),
                group=group_name(spec), n_tokens=len(rows), batch_shape=[1, len(rows)], micro_batches=[],
                padding_tokens=[j for j, i in enumerate(rows) if i in pad])
    return base


# ----------------------------------------------------------------------------------------------
# the arrays, from the ranks' sums added on one process
# ----------------------------------------------------------------------------------------------

def compute_dist_case(spec: CaseSpec, backend: str = "numpy") -> dict:
    """The arrays of rank ``spec.rank`` of its group (host NumPy, float64)."""
    xp = get_xp(backend)
    out = _layers_arrays(spec, xp) if spec.kind == "aux_layers" else _layer_arrays(spec, xp)
    host = {k: to_numpy(v) for k, v in out.items()}
    return {k: (v if v.dtype.kind in "biu" else v.astype(np.float64, copy=False)) for k, v in host.items()}


def _layers_arrays(spec: CaseSpec, xp):
    if spec.aux not in DIST_FORMS:
        raise ValueError(f"case {spec.name!r}: aux={spec.aux!r}; expected one of {DIST_FORMS}")
    logits_h, valid_h = _inputs(spec)                                               # [L, N_g, E], [N_g]
    logits, valid = xp.asarray(logits_h), xp.asarray(valid_h)
    scores = xp.stack([ops.softmax_forward(z)[0] for z in logits])                # [L, N_g, E]
    idx = xp.stack([ops.topk_indices(s, spec.top_k) for s in scores])             # [L, N_g, K]
    L, E = spec.n_layers, spec.n_experts
    stats = conv.part_counts([(scores[l], idx[l]) for l in range(L)], valid)       # the group's sums: c^g, N_g
    shares, grads = [], []
    for rows in _rows(spec):
        r = xp.asarray(rows)
        layers = [(scores[l][r], idx[l][r]) for l in range(L)]
        if len(rows) == 0:
            shares.append(xp.zeros(()))
            grads.append(xp.zeros((L, 0, E)))
            continue
        if spec.aux == "megatron_global":
            loss, cache = conv.megatron_forward(layers, "global", valid_mask=valid[r], global_counts=stats)
        else:
            loss, cache = conv.hf_mixtral_forward(layers, valid_mask=valid[r], global_counts=stats)
        d = conv.layers_backward(1.0, cache)                                        # L x [N_r, E]
        shares.append(loss)
        grads.append(xp.stack([ops.softmax_backward(dl, s) for dl, (s, _) in zip(d, layers)]))
    r = xp.asarray(_rows(spec)[spec.rank])
    return {"input/logits": logits[:, r], "input/valid_mask": valid[r], "inter/scores": scores[:, r],
            "inter/topk_idx": idx[:, r].astype(np.int64), "inter/global_counts": xp.stack(stats.counts),
            "inter/global_tokens": xp.asarray(stats.n_tokens), "loss/aux": shares[spec.rank],
            "loss/aux_global": sum(shares), "grad/aux/logits": grads[spec.rank]}


def layer_objective(spec_or_entry) -> Objective:
    """The Objective of a layer group (padding excluded), from its CaseSpec or its manifest entry."""
    if isinstance(spec_or_entry, CaseSpec):
        s = spec_or_entry
        forms, coef = (s.aux, s.ortho, s.var), (s.alpha, s.beta, s.gamma)
    else:
        v, c = spec_or_entry["variants"], spec_or_entry["coefficients"]
        forms, coef = (v["aux"], v["ortho"], v["var"]), (c["alpha"], c["beta"], c["gamma"])
    return Objective(*forms, alpha=coef[0], beta=coef[1], gamma=coef[2], name="dist")


def _layer_arrays(spec: CaseSpec, xp):
    x_h, params_h, dy_h, valid_h = make_inputs(spec)                                 # the global batch
    x, dy, valid = xp.asarray(x_h), xp.asarray(dy_h), xp.asarray(valid_h)
    params = {k: xp.asarray(v) for k, v in params_h.items()}
    cfg, obj = spec.config(), layer_objective(spec)
    runs, totals = [], None
    for rows in _rows(spec):                                                         # every rank's forward
        r = xp.asarray(rows)
        y, cache = moe_forward(x[r], params, cfg)
        local = {t: term_totals(t, f, cache, valid_mask=valid[r]) for t, f in obj.forms.items()}
        totals = local if totals is None else {t: totals[t] + local[t] for t in local}
        runs.append((r, y, cache))
    arrays = []
    for r, y, cache in runs:
        terms = regularisers_forward(cache, obj.forms, valid_mask=valid[r], totals=totals)
        grads = compose_backward(dy[r], cache, {t: c for t, (_, c) in terms.items()}, obj.coefficients)
        values = {t: v for t, (v, _) in terms.items()}
        arrays.append(case_arrays(x[r], params, dy[r], valid[r], y, cache, values, obj.coefficients, grads))
    out = arrays[spec.rank]
    for key in [k for k in out if k.startswith("loss/")]:
        out[f"{key}_global"] = sum(a[key] for a in arrays)                           # the concatenated batch's
    out.update(_global_keys(obj, totals))
    out["inter/topk_idx"] = out["inter/topk_idx"].astype(np.int64)
    return out


def _global_keys(obj: Objective, totals: dict) -> dict:
    """inter/global_* of a layer case from the terms' all-reduced sums (refmoe.losses.term_totals layouts)."""
    out = {"inter/global_counts": totals["aux"][:-1], "inter/global_tokens": totals["aux"][-1]}
    if obj.var_variant == "paper":
        out["inter/global_score_sums"] = totals["var"][:-1]
    return out


# ----------------------------------------------------------------------------------------------
# refmoe's own distributed dump of a rank
# ----------------------------------------------------------------------------------------------

def dump_rank(comm, entry: dict, arrays: dict) -> dict:
    """This rank's dump of a per-rank case, computed through ``comm`` (a ``refmoe.distributed`` Communicator of
    ``entry["world_size"]`` ranks, this one being ``entry["rank"]``) from the fixture's inputs and parameters;
    the keys of the fixture's outputs. This is what a distributed implementation does for ``golden check``.
    The arrays stay NumPy (as loaded): ``comm`` must move NumPy arrays (SingleProcess, MPICommunicator)."""
    from ..distributed import (global_objective_backward, global_objective_forward, megatron_global_forward,
                               qwen_global_forward)
    from ..distributed.conventions import global_counts
    from ..config import MoEConfig

    if (comm.size, comm.rank) != (entry["world_size"], entry["rank"]):
        raise ValueError(f"case is rank {entry['rank']} of {entry['world_size']}; the communicator is rank "
                         f"{comm.rank} of {comm.size}")
    valid = arrays["input/valid_mask"]
    if entry["kind"] == "aux_layers":
        logits, K = arrays["input/logits"], entry["config"]["top_k"]
        scores = np.stack([ops.softmax_forward(z)[0] if z.shape[0] else z for z in logits])
        idx = np.stack([ops.topk_indices(s, K) if s.shape[0] else np.zeros((0, K), np.int64) for s in scores])
        layers = list(zip(scores, idx))
        stats = global_counts(comm, layers, valid)
        forward = megatron_global_forward if entry["variants"]["aux"] == "megatron_global" else qwen_global_forward
        loss, cache = forward(comm, layers, valid_mask=valid)
        d = conv.layers_backward(1.0, cache)
        return {"inter/scores": scores, "inter/topk_idx": idx.astype(np.int64),
                "inter/global_counts": np.stack(stats.counts), "inter/global_tokens": np.asarray(stats.n_tokens),
                "loss/aux": np.asarray(loss), "loss/aux_global": comm.allreduce_sum(np.asarray(loss).reshape(1))[0],
                "grad/aux/logits": np.stack([ops.softmax_backward(dl, s) for dl, s in zip(d, scores)])
                if scores.shape[1] else np.zeros_like(logits)}
    c = entry["config"]
    cfg = MoEConfig(c["d_model"], c["d_hidden"], c["n_experts"], c["top_k"], c["n_shared"], c["norm_topk_prob"])
    obj = layer_objective(entry)
    x, dy = arrays["input/x"], arrays["input/dy"]
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    y, gcache = global_objective_forward(comm, x, params, cfg, obj, valid_mask=valid)
    res = global_objective_backward(dy, gcache, task_loss=(dy * y).sum())
    out = case_arrays(x, params, dy, valid, y, gcache.ocache.cache, gcache.ocache.values, obj.coefficients,
                      res.grads)
    keys = sorted(k for k in out if k.startswith("loss/"))
    summed = comm.allreduce_sum(np.stack([out[k] for k in keys]))
    out.update({f"{k}_global": summed[i] for i, k in enumerate(keys)})
    out.update(_global_keys(obj, gcache.totals))
    return {k: v for k, v in out.items() if k.split("/")[0] in ("inter", "loss", "grad")}
