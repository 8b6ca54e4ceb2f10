"""The Lemma 1 variance/balance trade-off figure (matplotlib's object-oriented API with an Agg canvas: it never
switches the backend pyplot uses)."""
from __future__ import annotations

import numpy as np

from .lemma1_opt import tradeoff_curve, unconstrained_max

CASES = ((8, 4, 2), (7, 4, 2), (10, 4, 3), (2, 4, 2))


def tradeoff_data(rng, n_points: int = 11, cases=CASES) -> list[dict]:
    """For each (N, n, k): allowed column deviation t and the best total row variance found (NaN: infeasible)."""
    out = []
    for N, n, k in cases:
        ts = np.linspace(0.0, 1.0, n_points)
        v = tradeoff_curve(N, n, k, ts, rng, n_vertices=20)
        out.append(dict(N=N, n=n, k=k, t=ts.tolist(), variance=[np.nan if a is None else a for a in v],
                        unconstrained=unconstrained_max(N, k)))
    return out


def plot_tradeoff(data, path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for d in data:
        rel = np.array(d["variance"]) / d["unconstrained"]
        ax.plot(d["t"], rel, marker="o", label=f"N={d['N']}, n={d['n']}, k={d['k']}")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="unconstrained maximum")
    ax.set_xlabel("allowed column-sum deviation t = max_j |sum_i s_ij - N/n|")
    ax.set_ylabel("max total row variance / unconstrained max")
    ax.set_title("Lemma 1: row variance that column balance allows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)
