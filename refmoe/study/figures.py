"""PNG figures of the specialisation study (matplotlib, headless Agg backend), from ``summary.summarize`` output.

    fig2_maxvio.png          MaxVio_batch over fine-tuning steps per loss combination (like the paper's Fig. 2)
    fig3_specialization.png  overlap, silhouette, both routing variances (like the paper's Fig. 3)
    ablation.png             aux, +L_o, +L_v, +both: overlap, per-token routing variance, MaxVio_global, L_h
    grad_cosine.png          cosine matrix of the per-term gradients (router, experts, layer input)
    grad_cosine_steps.png    the off-diagonal cosines over the logged steps (heatmap over training)
    sweep.png                aux+ortho+var with beta, gamma scaled: overlap, routing variance, MaxVio RMSE
Every function returns the Figure, so a notebook can show it inline; ``save_all`` writes the files.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .alignment import GROUPS
from .metrics import moving_average

FIG3_COMBOS = ("none", "aux", "aux+ortho+var", "ortho+var")
ABLATION_COMBOS = ("aux", "aux+ortho", "aux+var", "aux+ortho+var")
PAIR_LABELS = [("task", "aux"), ("task", "ortho"), ("task", "var"), ("aux", "ortho"), ("aux", "var"),
               ("ortho", "var")]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_maxvio(summary: dict, smooth: int = 5):
    plt = _plt()
    presets = list(summary)
    fig, axes = plt.subplots(1, len(presets), figsize=(5.2 * len(presets), 3.6), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], presets):
        for c, e in summary[p].items():
            y = e["maxvio_curve"]
            ax.plot(np.arange(1, len(y) + 1), moving_average(y, smooth), label=c, lw=1.4)
        ax.set_title(f"{p}: MaxVio_batch during fine-tuning")
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"MaxVio_batch (mean over seeds, {smooth}-step avg)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _bars(ax, summary_p, combos, key, title):
    combos = [c for c in combos if c in summary_p]
    m = [summary_p[c][key][0] for c in combos]
    s = [summary_p[c][key][1] for c in combos]
    ax.bar(range(len(combos)), m, yerr=s, capsize=3, color=[f"C{i}" for i in range(len(combos))])
    ax.set_xticks(range(len(combos)))
    ax.set_xticklabels(combos, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _bar_grid(summary: dict, combos, keys):
    """One row of bar charts per preset, one column per (metric key, title)."""
    plt = _plt()
    presets = list(summary)
    fig, axes = plt.subplots(len(presets), len(keys), figsize=(3.2 * len(keys), 3.0 * len(presets)), squeeze=False)
    for i, p in enumerate(presets):
        for j, (k, t) in enumerate(keys):
            _bars(axes[i][j], summary[p], combos, k, f"{p}: {t}")
    fig.tight_layout()
    return fig


def fig_specialization(summary: dict, combos=FIG3_COMBOS):
    return _bar_grid(summary, combos, [("overlap", "expert overlap (Eq. 41)"), ("silhouette", "silhouette (Eq. 38)"),
                                       ("rv_per_token", "routing variance, per token"),
                                       ("rv_eq42", "routing variance, Eq. 42")])


def fig_ablation(summary: dict, combos=ABLATION_COMBOS):
    return _bar_grid(summary, combos, [("overlap", "expert overlap"), ("rv_per_token", "routing variance (per token)"),
                                       ("maxvio_global", "MaxVio_global"), ("task", "L_h (narrow, held out)")])


def _matrix(m):
    return np.asarray([[math.nan if v is None else v for v in row] for row in m], dtype=np.float64)


def _alignment_axes(summary: dict, combo: str, width: float, row_height: float, title: str):
    """Presets that logged gradient alignment for ``combo``, and a figure with one row of 3 axes per preset."""
    plt = _plt()
    presets = [p for p in summary if combo in summary[p] and summary[p][combo]["alignment"]]
    n = max(1, len(presets))
    fig, axes = plt.subplots(n, len(GROUPS), figsize=(width, row_height * n), squeeze=False, layout="constrained")
    fig.suptitle(title, fontsize=9)
    return presets, fig, axes


def fig_grad_cosine(summary: dict, combo: str = "aux+ortho+var"):
    presets, fig, axes = _alignment_axes(
        summary, combo, 11, 3.4, f"cosine of the per-term gradients, {combo}, mean over logged steps and seeds "
                                 "('zero': that term's gradient is exactly zero there)")
    for i, p in enumerate(presets):
        al = summary[p][combo]["alignment"]
        for j, g in enumerate(GROUPS):
            ax = axes[i][j]
            m = _matrix(al[g]["mean_cos"])
            im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
            terms = al[g]["terms"]
            ax.set_xticks(range(len(terms)))
            ax.set_xticklabels(terms, fontsize=8)
            ax.set_yticks(range(len(terms)))
            ax.set_yticklabels(terms, fontsize=8)
            for a in range(len(terms)):
                for b in range(len(terms)):
                    ax.text(b, a, "zero" if math.isnan(m[a, b]) else f"{m[a, b]:.2f}", ha="center",
                            va="center", fontsize=7)
            ax.set_title(f"{p}: {g}", fontsize=9)
        fig.colorbar(im, ax=axes[i].tolist(), shrink=0.8, label="cosine (mean over logged steps)")
    return fig


def fig_grad_cosine_steps(summary: dict, combo: str = "aux+ortho+var"):
    presets, fig, axes = _alignment_axes(
        summary, combo, 12, 3.0, f"cosine of per-term gradients over fine-tuning, {combo}, mean over seeds "
                                 "(white: a gradient is exactly zero)")
    for i, p in enumerate(presets):
        al = summary[p][combo]["alignment"]
        for j, g in enumerate(GROUPS):
            terms = al[g]["terms"]
            rows = []
            for a, b in PAIR_LABELS:
                ia, ib = terms.index(a), terms.index(b)
                rows.append([math.nan if m[ia][ib] is None else m[ia][ib] for m in al[g]["cos_by_step"]])
            ax = axes[i][j]
            im = ax.imshow(np.asarray(rows, dtype=np.float64), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
            ax.set_yticks(range(len(PAIR_LABELS)))
            ax.set_yticklabels([f"{a}.{b}" for a, b in PAIR_LABELS], fontsize=7)
            steps = al[g]["steps"]
            ax.set_xticks(range(len(steps)))
            ax.set_xticklabels(steps, fontsize=6, rotation=90)
            ax.set_xlabel("logged step")
            ax.set_title(f"{p}: {g}", fontsize=9)
        fig.colorbar(im, ax=axes[i].tolist(), shrink=0.8, label="cosine")
    return fig


def fig_sweep(sweep: dict):
    """Overlap, per-token routing variance and MaxVio RMSE vs aux-only, against the L_o / L_v scale factor."""
    plt = _plt()
    keys = [("overlap", "expert overlap"), ("rv_per_token", "routing variance (per token)"),
            ("maxvio_rmse_vs_aux", "RMSE of MaxVio curves vs aux")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.2), squeeze=False)
    for j, (k, t) in enumerate(keys):
        ax = axes[0][j]
        for i, (p, sw) in enumerate(sweep.items()):
            f = [r["factor"] for r in sw["rows"]]
            m = [r[k][0] for r in sw["rows"]]
            s = [r[k][1] for r in sw["rows"]]
            ax.errorbar(f, m, yerr=s, marker="o", capsize=3, label=p, color=f"C{i}")
            if k in sw["aux"]:
                ax.axhline(sw["aux"][k][0], color=f"C{i}", ls="--", lw=0.8)
        if k == "maxvio_rmse_vs_aux":
            ax.axhline(0.03, color="k", ls=":", lw=0.8, label="paper bound 0.03")
        ax.set_xscale("log")
        ax.set_xlabel("factor on beta and gamma")
        ax.set_title(t + " (dashed: aux only)" if k != "maxvio_rmse_vs_aux" else t, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_all(summary: dict, out_dir: str, sweep: dict | None = None) -> list:
    """Write every figure as PNG under out_dir; returns the file names."""
    plt = _plt()
    made = {"fig2_maxvio.png": fig_maxvio, "fig3_specialization.png": fig_specialization,
            "ablation.png": fig_ablation, "grad_cosine.png": fig_grad_cosine,
            "grad_cosine_steps.png": fig_grad_cosine_steps}
    if sweep:
        made["sweep.png"] = lambda _: fig_sweep(sweep)
    names = []
    for name, fn in made.items():
        fig = fn(summary)
        fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names
