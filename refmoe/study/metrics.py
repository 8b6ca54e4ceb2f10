r"""Measures of balance and specialisation (paper App. E, and two that use a known ground truth).

Dimension letters: N tokens (or points), D width, E routed experts, K top-k, C distinct labels, T curve length
(training steps).

Every function takes arrays of one backend and computes there (namespace from the inputs); results are
returned as Python floats (an explicit, small device-to-host read) or as arrays of the input's backend.

Choices refmoe makes where the paper is silent (stated again in every report):
* MaxVio: ``max_vio`` follows Eq. 36, (max_j Load_j - mean Load) / mean Load; ``absolute=True`` gives the
  released code's max_j |Load_j - ideal| / ideal. "batch" vs "global" is only which tokens are counted.
* Expert overlap and silhouette run on whatever embeddings and labels are given; the experiment uses the
  unweighted outputs x~_ij of each (token, selected expert) pair, labelled by the expert j.
* Routing variance: ``routing_variance_eq42`` is Eq. 42 on the rows of a score matrix; ``routing_variance_
  per_token`` is the token mean of each row's variance across the E experts (what the released code logs).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_namespace, to_numpy


def _f(a) -> float:
    return float(to_numpy(a))


# ----------------------------------------------------------------------------------------------
# load balance
# ----------------------------------------------------------------------------------------------

def expert_loads(topk_idx, n_experts: int):
    """Load_j = #{(i, k): T_ik = j}.  topk_idx [N, K] int -> [E] counts (float64, input backend)."""
    xp = array_namespace(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be [N, K], got shape {tuple(topk_idx.shape)}")
    return xp.bincount(topk_idx.reshape(-1), minlength=n_experts).astype(xp.float64)


def max_vio(topk_idx, n_experts: int, *, absolute: bool = False) -> float:
    r"""MaxVio (paper Eq. 36): (max_j Load_j - \overline{Load}) / \overline{Load}, \overline{Load} = N K / E.

    absolute=True: max_j |Load_j - \overline{Load}| / \overline{Load} (the released code's form).
    Computed on a training batch it is "MaxVio_batch"; on a whole held-out set, "MaxVio_global".
    """
    return _f(max_vio_array(topk_idx, n_experts, absolute=absolute))


def max_vio_array(topk_idx, n_experts: int, *, absolute: bool = False):
    """:func:`max_vio` as a 0-d float64 value on the input's backend, not read to the host (a training loop
    reads all its steps' values at once)."""
    load = expert_loads(topk_idx, n_experts)
    mean = load.sum() / n_experts
    dev = load - mean
    xp = array_namespace(load)
    top = xp.abs(dev).max() if absolute else dev.max()
    return top / mean


def moving_average(y, w: int) -> np.ndarray:
    """Moving average of width w over a host curve [T], padded with its end values so the length stays T.

    w <= 1, or a curve shorter than w, is returned unchanged (as float64).
    """
    y = np.asarray(y, dtype=np.float64)
    if w <= 1 or y.size < w:
        return y
    return np.convolve(np.pad(y, (w // 2, w - 1 - w // 2), mode="edge"), np.ones(w) / w, mode="valid")


def rmse_curves(a, b) -> float:
    r"""RMSE between two curves [T] (paper Eq. 43): sqrt(mean_t (a_t - b_t)^2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"curves must be 1-D of equal non-zero length, got {a.shape} and {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------------------------
# routing variance, two notions
# ----------------------------------------------------------------------------------------------

def routing_variance_eq42(scores) -> float:
    r"""Paper Eq. 42: (1/E) sum_j (mean_i g_j(x_i) - 1/E)^2 on a score matrix [N, E] whose rows sum to 1.

    A variance of the expert-mean scores around uniform: it measures imbalance of the average routing, and
    is at most (E-1)/E^2 (all mass on one expert), not how confident each token's routing is.
    """
    array_namespace(scores)
    E = scores.shape[1]
    gbar = scores.mean(axis=0)                                      # [E]
    return _f(((gbar - 1.0 / E) ** 2).mean())


def routing_variance_per_token(scores, ddof: int = 1) -> float:
    r"""mean_i Var_j(scores_ij): each token's variance across the E experts, averaged over tokens.

    ddof=1 (divisor E-1) is the released code's convention. Two-pass variance.
    """
    E = scores.shape[1]
    if E - ddof < 1:
        raise ValueError(f"E={E} experts leave no degrees of freedom with ddof={ddof}")
    dev = scores - scores.mean(axis=1, keepdims=True)               # [N, E]
    return _f(((dev * dev).sum(axis=1) / (E - ddof)).mean())


# ----------------------------------------------------------------------------------------------
# clustering quality of labelled embeddings (App. E, Eqs. 38-41)
# ----------------------------------------------------------------------------------------------

def _sq_dists(emb):
    """[N, N] squared Euclidean distances, clipped at 0 (round-off)."""
    xp = array_namespace(emb)
    sq = (emb * emb).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (emb @ emb.T)
    return xp.maximum(d2, 0.0)


def _check_labelled(emb, labels, min_points=2):
    xp = array_namespace(emb, labels)
    if emb.ndim != 2 or labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"embeddings must be [N, D] and labels [N], got {tuple(emb.shape)} and {tuple(labels.shape)}")
    if emb.shape[0] < min_points:
        raise ValueError(f"need at least {min_points} points, got {emb.shape[0]}")
    return xp


def expert_overlap(emb, labels, k: int = 10) -> float:
    r"""Expert overlap (paper Eqs. 39-41): mean over points of the fraction of their k' nearest neighbours
    (k' = min(k, N-1), the point itself excluded, Euclidean distance) whose label differs from theirs.

    0 when every neighbourhood is pure; near 1 - sum_c p_c^2 when labels are independent of position.
    Ties in distance are broken by the lower index.
    """
    xp = _check_labelled(emb, labels)
    N = emb.shape[0]
    kk = min(int(k), N - 1)
    if kk < 1:
        raise ValueError(f"k={k} must be >= 1")
    d2 = _sq_dists(emb)
    d2[xp.arange(N), xp.arange(N)] = xp.inf                         # exclude the point itself
    nn = xp.argsort(d2, axis=1, kind="stable")[:, :kk]              # [N, k']
    differ = labels[nn] != labels[:, None]                          # [N, k']
    return _f(differ.astype(xp.float64).mean())


def silhouette(emb, labels) -> float:
    r"""Mean silhouette coefficient (paper Eq. 38): s_i = (b_i - a_i) / max(a_i, b_i), Euclidean distances.

    a_i mean distance to the other points of its label, b_i the smallest mean distance to another label;
    s_i = 0 for a point alone in its label (the usual convention). Needs at least two labels.
    """
    xp = _check_labelled(emb, labels)
    uniq = xp.unique(labels)
    if uniq.shape[0] < 2:
        raise ValueError("silhouette needs at least two distinct labels")
    dist = xp.sqrt(_sq_dists(emb)).astype(xp.float64)               # [N, N]
    onehot = (labels[:, None] == uniq[None, :]).astype(xp.float64)  # [N, C]
    sums = dist @ onehot                                            # [N, C] summed distance to each label
    counts = onehot.sum(axis=0)                                     # [C]
    own = onehot.astype(bool)
    own_count = (onehot * counts[None, :]).sum(axis=1)              # [N]
    a = (sums * onehot).sum(axis=1) / xp.maximum(own_count - 1.0, 1.0)
    other = xp.where(own, xp.inf, sums / counts[None, :])
    b = other.min(axis=1)
    s = (b - a) / xp.maximum(xp.maximum(a, b), 1e-300)
    s = xp.where(own_count > 1, s, 0.0)
    return _f(s.mean())


# ----------------------------------------------------------------------------------------------
# beyond the paper: measures that use the known cluster labels
# ----------------------------------------------------------------------------------------------

def mutual_information(a, b, *, normalized: bool = False) -> float:
    r"""I(A; B) in bits from paired integer labels a, b [N] (plug-in estimate from the contingency table).

    .. math:: I = \sum_{u,v} p(u,v) \log_2 \frac{p(u,v)}{p(u) p(v)}

    normalized=True divides by H(A) (the first argument; 1 = B determines A; 0 if H(A) = 0).
    """
    array_namespace(a, b)  # refuses a NumPy/CuPy mix
    if a.ndim != 1 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"labels must be 1-D of equal non-zero length, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = to_numpy(a).astype(np.int64), to_numpy(b).astype(np.int64)      # small label vectors
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    mi = max(mi, 0.0)
    if not normalized:
        return mi
    h = float(-(pa * np.log2(pa)).sum())
    return mi / h if h > 0 else 0.0


def _entropy_bits(labels: np.ndarray) -> float:
    """H(A) in bits of host integer labels [N] (plug-in)."""
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


NMI_AVERAGES = ("first", "arithmetic", "geometric", "min", "max")


def normalized_mutual_information(a, b, *, average: str = "first") -> float:
    r"""I(A; B) / norm(H(A), H(B)) from paired integer labels a, b [N] (plug-in estimates).

    average  "first":      norm = H(A)            (the uncertainty coefficient of A given B)
             "arithmetic": norm = (H(A) + H(B))/2  (scikit-learn's normalized_mutual_info_score default)
             "geometric":  sqrt(H(A) H(B));  "min", "max": of the two

    The study calls it with a = the true cluster, b = the top-1 expert, and reports "first": 1 when the top-1
    expert determines the cluster, whatever the number of experts a cluster is spread over. That makes it a
    measure of specialisation that load balancing does not lower by itself (spreading a cluster over more
    experts raises H(B), which "arithmetic" would count against it), and one that L_o does not optimise:
    L_o acts on expert outputs, not on which cluster reaches which expert. 0 when norm = 0.
    """
    if average not in NMI_AVERAGES:
        raise ValueError(f"average={average!r}; expected one of {NMI_AVERAGES}")
    mi = mutual_information(a, b)                                  # checks shapes and backends
    ha, hb = _entropy_bits(to_numpy(a)), _entropy_bits(to_numpy(b))
    norm = {"first": ha, "arithmetic": 0.5 * (ha + hb), "geometric": math.sqrt(ha * hb),
            "min": min(ha, hb), "max": max(ha, hb)}[average]
    return mi / norm if norm > 0 else 0.0


def expert_output_cosine(outputs):
    r"""Mean cosine similarity of experts' outputs on the same tokens.  outputs [N, E, D] -> [E, E].

    C_ab = mean_i cos(E_a(x_i), E_b(x_i)); the diagonal is 1 (0 for an expert whose outputs are all zero).
    """
    xp = array_namespace(outputs)
    if outputs.ndim != 3:
        raise ValueError(f"outputs must be [N, E, D], got shape {tuple(outputs.shape)}")
    nrm = xp.sqrt((outputs * outputs).sum(axis=2, keepdims=True))            # [N, E, 1]
    unit = outputs / xp.where(nrm > 0, nrm, 1.0)
    return xp.einsum("nad,nbd->ab", unit, unit) / outputs.shape[0]


def selected_output_cosine(expert_out) -> float:
    r"""Mean |cos| between the outputs of a token's K selected experts, over tokens and pairs j < k.

    expert_out [N, K, D] (the layer's unweighted buffer). The quantity L_o drives towards 0.
    """
    xp = array_namespace(expert_out)
    N, K, _ = expert_out.shape
    if K < 2:
        return 0.0
    nrm = xp.sqrt((expert_out * expert_out).sum(axis=2, keepdims=True))
    unit = expert_out / xp.where(nrm > 0, nrm, 1.0)
    g = xp.abs(xp.einsum("njd,nkd->njk", unit, unit))                        # [N, K, K]
    rows, cols = (xp.asarray(a) for a in np.triu_indices(K, 1))        # pairs j < k
    return _f(g[:, rows, cols].mean())


def safe_cosine(u, v) -> float:
    """cos(u, v) of two flat vectors; NaN when either is exactly zero (the angle is undefined)."""
    xp = array_namespace(u, v)
    nu, nv = _f(xp.sqrt((u * u).sum())), _f(xp.sqrt((v * v).sum()))
    if nu == 0.0 or nv == 0.0:
        return math.nan
    return _f((u * v).sum()) / (nu * nv)
