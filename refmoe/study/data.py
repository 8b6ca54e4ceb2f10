r"""Synthetic tokens with a known cluster structure, per-cluster teacher targets, and a narrow domain.

Dimension letters: N tokens, D model width, M latent clusters, R inner width of a teacher map.

A task is M cluster centres mu_m (random directions of length ``radius``) and M teacher maps. Token i of
cluster m_i is

.. math:: x_i = \mu_{m_i} + \sigma z_i,\qquad z_i \sim \mathcal N(0, I_D)

and its target is the teacher of its cluster applied to it, on top of the identity (the model is a residual
block) and of a map shared by every cluster:

.. math:: t_i = x_i + \tanh(x_i A_0) B_0 + \tanh(x_i A_{m_i}) B_{m_i}

The shared part is what a shared expert can learn; the per-cluster part is what the routed experts have to
split among themselves: the ground truth of "specialisation" is the cluster label m_i.
"Broad" data mixes all M clusters uniformly (pre-training); the "narrow" domain draws from the first
``n_narrow`` clusters only (post-training on a narrow distribution, the setting where the paper says the
balancing loss pushes tokens onto experts that do not fit them).

Randomness only through the explicit ``rng``; arrays are drawn in float64 on the host and created on the
named backend, so one seed gives the same data on NumPy and CuPy.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import get_xp

FLOAT_DTYPES = (np.float32, np.float64)


class ClusterTask(NamedTuple):
    """The fixed structure of a synthetic task (host float64 arrays; small)."""
    centers: np.ndarray        # [M, D] cluster centres mu_m
    shared_in: np.ndarray      # [D, R] A_0
    shared_out: np.ndarray     # [R, D] B_0
    teacher_in: np.ndarray     # [M, D, R] A_m
    teacher_out: np.ndarray    # [M, R, D] B_m
    noise: float               # sigma
    n_narrow: int              # clusters 0 .. n_narrow-1 form the narrow domain

    @property
    def n_clusters(self) -> int:
        return self.centers.shape[0]

    @property
    def d_model(self) -> int:
        return self.centers.shape[1]


class Batch(NamedTuple):
    x: object          # [N, D] tokens (backend array)
    target: object     # [N, D] teacher targets t_i (backend array)
    cluster: object    # [N] int64 cluster labels m_i (backend array)


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def make_task(rng, *, d_model: int = 32, n_clusters: int = 8, n_narrow: int = 2, radius: float = 3.0,
              noise: float = 0.6, teacher_rank: int = 16, teacher_scale: float = 1.0) -> ClusterTask:
    """Draw cluster centres and teachers.

    rng            numpy Generator (the only source of randomness)
    d_model        D;  n_clusters  M;  n_narrow  clusters in the narrow domain (1 <= n_narrow <= M)
    radius         length of every centre;  noise  sigma of the within-cluster Gaussian
    teacher_rank   R, inner width of each teacher;  teacher_scale  size of the per-cluster part
    """
    _check_rng(rng)
    for name, v in (("d_model", d_model), ("n_clusters", n_clusters), ("n_narrow", n_narrow),
                    ("teacher_rank", teacher_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if n_narrow > n_clusters:
        raise ValueError(f"n_narrow={n_narrow} exceeds n_clusters={n_clusters}")
    for name, v in (("radius", radius), ("noise", noise), ("teacher_scale", teacher_scale)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v!r} must be finite and >= 0")
    D, M, R = d_model, n_clusters, teacher_rank
    c = rng.standard_normal((M, D))
    centers = radius * c / np.linalg.norm(c, axis=1, keepdims=True)          # [M, D]
    # tanh inputs of order 1 for a token of norm ~ radius: scale A by 1 / radius
    a_scale = 1.0 / max(radius, 1.0)
    shared_in = rng.standard_normal((D, R)) * a_scale                           # [D, R]
    shared_out = rng.standard_normal((R, D)) / np.sqrt(R)                       # [R, D]
    teacher_in = rng.standard_normal((M, D, R)) * a_scale                       # [M, D, R]
    teacher_out = teacher_scale * rng.standard_normal((M, R, D)) / np.sqrt(R)   # [M, R, D]
    return ClusterTask(centers, shared_in, shared_out, teacher_in, teacher_out, float(noise), int(n_narrow))


def teacher(task: ClusterTask, x: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """t_i = x_i + tanh(x_i A_0) B_0 + tanh(x_i A_{m_i}) B_{m_i}.  Host float64: x [N, D], cluster [N] -> [N, D]."""
    t = x + np.tanh(x @ task.shared_in) @ task.shared_out
    h = np.tanh(np.einsum("nd,ndr->nr", x, task.teacher_in[cluster]))           # [N, R]
    return t + np.einsum("nr,nrd->nd", h, task.teacher_out[cluster])


def sample(task: ClusterTask, rng, n_tokens: int, *, domain: str = "broad", backend: str | None = None,
           dtype=np.float64) -> Batch:
    """N tokens of the ``broad`` mixture (all M clusters) or of the ``narrow`` domain (first n_narrow).

    Clusters are drawn uniformly within the domain. Returns a Batch on ``backend`` in ``dtype``.
    """
    _check_rng(rng)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive int")
    if domain not in ("broad", "narrow"):
        raise ValueError(f"domain={domain!r}; expected 'broad' or 'narrow'")
    dtype = np.dtype(dtype)
    if dtype.type not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; use float32 or float64")
    n_pool = task.n_clusters if domain == "broad" else task.n_narrow
    cluster = rng.integers(0, n_pool, size=n_tokens)                            # [N]
    x = task.centers[cluster] + task.noise * rng.standard_normal((n_tokens, task.d_model))
    t = teacher(task, x, cluster)
    xp = get_xp(backend)
    return Batch(xp.asarray(x.astype(dtype)), xp.asarray(t.astype(dtype)), xp.asarray(cluster.astype(np.int64)))
