r"""Held-out evaluation of a trained MoE block: every metric of ``refmoe.study.metrics`` on stated inputs.

Dimension letters: N tokens, D model width, E routed experts, K top-k.

For each held-out set (``narrow`` and ``broad``) of the experiment:

    task              L_h = (1/(N D)) sum_i ||x_i + y_i - t_i||^2
    maxvio_global     MaxVio (Eq. 36) over the whole set
    rv_eq42           routing variance, Eq. 42, on the post-top-k matrix S (rows sum to 1)
    rv_per_token      mean over tokens of the variance across the E experts of the full softmax P (ddof 1)
    overlap, silhouette  on the unweighted outputs x~_ij of (token, selected expert) pairs, labelled by the
                      expert j, for a fixed random subset of tokens (k = 10 neighbours, Euclidean)
    mi_bits, nmi      mutual information between the true cluster and the top-1 expert (bits; / H(cluster))
    nmi_arith         the same divided by (H(cluster) + H(top-1 expert)) / 2 (scikit-learn's default NMI)
    sel_cos           mean |cos| between a token's K selected experts' outputs (what L_o acts on)
    all_cos           mean off-diagonal cosine between all E experts' outputs on the same tokens
    discrim           routing_discriminativeness of p_ij = g_yi . x~_ij with the task gradient of this set

Host reads: the integer results (loads, MaxVio, the top-1 expert, the mutual information) come from one copy
of topk_idx [N, K] and one of the cluster labels [N]; each float metric is one small read of its own.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import array_namespace, to_numpy
from ..layer import moe_forward
from ..losses.task import mse_backward, mse_forward
from . import data as D_
from .alignment import routing_discriminativeness
from .metrics import (expert_output_cosine, expert_overlap, max_vio, mutual_information,
                      normalized_mutual_information, routing_variance_eq42, routing_variance_per_token,
                      selected_output_cosine, silhouette)

OVERLAP_K = 10


def all_expert_outputs(x, params: dict):
    """E_e(x_i) for every expert e on every token.  x [N, D] -> [N, E, D] (unweighted)."""
    xp = array_namespace(x)
    E = params["w_gate"].shape[0]
    outs = [ops.swiglu_forward(x, params["w_gate"][e], params["w_up"][e], params["w_down"][e])[0]
            for e in range(E)]
    return xp.stack(outs, axis=1)


def evaluate_set(params: dict, cfg, batch: D_.Batch, n_points: int, rng) -> dict:
    """Every metric on one held-out batch.  Returns Python floats."""
    xp = array_namespace(batch.x)
    y, cache = moe_forward(batch.x, params, cfg)
    task, r = mse_forward(batch.x + y, batch.target)
    dy = mse_backward(1.0, r)
    N, K = cache.topk_idx.shape
    idx, cluster = to_numpy(cache.topk_idx), to_numpy(batch.cluster)            # host [N, K], [N]: integers
    (S, _), _ = ops.topk_scores_forward(cache.scores, cache.topk_idx)           # [N, E] post-top-k
    n_tok = max(2, min(N, n_points // K))
    pick_host = np.sort(rng.choice(N, size=n_tok, replace=False))              # same subset for every model
    pick = xp.asarray(pick_host)
    emb = cache.expert_out[pick].reshape(n_tok * K, -1).astype(xp.float64)      # [n_tok*K, D]
    lab = cache.topk_idx[pick].reshape(-1)                                       # [n_tok*K]
    has_two = np.unique(idx[pick_host]).shape[0] >= 2
    cos_all = to_numpy(expert_output_cosine(all_expert_outputs(batch.x[pick], params)))
    E = cos_all.shape[0]
    off = cos_all[~np.eye(E, dtype=bool)]
    return {
        "task": float(to_numpy(task)),
        "maxvio_global": max_vio(idx, cfg.n_experts),
        "rv_eq42": routing_variance_eq42(S),
        "rv_per_token": routing_variance_per_token(cache.scores),
        "overlap": expert_overlap(emb, lab, OVERLAP_K),
        "silhouette": silhouette(emb, lab) if has_two else float("nan"),
        "mi_bits": mutual_information(cluster, idx[:, 0]),
        "nmi": normalized_mutual_information(cluster, idx[:, 0]),
        "nmi_arith": normalized_mutual_information(cluster, idx[:, 0], average="arithmetic"),
        "sel_cos": selected_output_cosine(cache.expert_out),
        "all_cos": float(off.mean()) if off.size else float("nan"),
        "discrim": routing_discriminativeness(dy, cache.expert_out),
        "loads": np.bincount(idx.reshape(-1), minlength=cfg.n_experts).tolist(),
    }


def evaluate(params: dict, cfg, held: dict, n_points: int, seed: int) -> dict:
    """``evaluate_set`` on every held-out set of ``held`` (name -> Batch); the token subset depends on seed only."""
    return {name: evaluate_set(params, cfg, b, n_points, np.random.default_rng([seed, 17, i]))
            for i, (name, b) in enumerate(held.items())}
