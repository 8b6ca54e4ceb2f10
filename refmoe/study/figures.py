"""PNG figures of the specialisation study, from ``summary.summarize`` / ``summary.sweep_summary`` output.

    fig2_maxvio.png          MaxVio_batch over fine-tuning, one line per loss combination (like the paper's Fig. 2)
    fig3_specialization.png  overlap, silhouette, both routing variances per loss combination (like the paper's Fig. 3)
    ablation.png             aux, +L_o, +L_v, +both: overlap, per-token routing variance, MaxVio_global, L_h
    grad_cosine.png          cosine between the per-term gradients (router, routed experts, layer input)
    grad_cosine_steps.png    the same cosines at every logged fine-tuning step
    sweep.png                aux+ortho+var with each preset's beta and gamma scaled by a factor

One style for all of them: a fixed colour per loss combination (``COMBO_COLOURS``, the Okabe-Ito palette, safe
for colour-blind readers), axis labels that say which direction is better, error bars = sample sd over seeds.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never through pyplot, so they
never switch the backend pyplot uses and never pile up in pyplot's figure list. Every function returns the
Figure: in a notebook with ``%matplotlib inline`` (or after importing pyplot there), ``display(fig)`` shows it;
``save_all`` writes the files.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from .alignment import GROUPS
from .metrics import moving_average

# ----------------------------------------------------------------------------------------------
# the shared style
# ----------------------------------------------------------------------------------------------

FIG3_COMBOS = ("none", "aux", "aux+ortho+var", "ortho+var")
ABLATION_COMBOS = ("aux", "aux+ortho", "aux+var", "aux+ortho+var")

# loss combination -> colour, the same in every figure (Okabe & Ito's colour-blind-safe palette)
COMBO_COLOURS = {
    "none": "#999999",            # grey: no regulariser at all
    "aux": "#0072B2",             # blue
    "aux+ortho": "#56B4E9",       # sky blue
    "aux+var": "#009E73",         # bluish green
    "aux+ortho+var": "#D55E00",   # vermillion
    "ortho+var": "#CC79A7",       # reddish purple
}
PRESET_MARKERS = {"paper": "o", "authors_code": "s"}
PRESET_TITLES = {"paper": "preset 'paper' (camera-ready equations)",
                 "authors_code": "preset 'authors_code' (released code)"}

# metric key -> axis label, with the direction the paper calls better
METRIC_LABELS = {
    "overlap": "expert overlap (lower is better)",
    "silhouette": "silhouette of expert outputs (higher is better)",
    "rv_per_token": "routing variance per token (higher is better)",
    "rv_eq42": "routing variance, paper Eq. 42 (higher is better)",
    "maxvio_global": "load imbalance MaxVio_global (lower is better)",
    "task": "held-out task loss L_h (lower is better)",
    "maxvio_rmse_vs_aux": "RMSE of MaxVio curve vs aux only (lower is better)",
}
GROUP_TITLES = {"router": "router weights", "experts": "routed experts' weights", "input": "layer input x"}
TERM_NAMES = {"task": "L_h", "aux": "L_aux", "ortho": "L_o", "var": "L_v"}
PAIR_LABELS = [("task", "aux"), ("task", "ortho"), ("task", "var"), ("aux", "ortho"), ("aux", "var"),
               ("ortho", "var")]
ERRORBAR_NOTE = "bars: mean over seeds; error bars: sample sd over seeds"
EXACT_ZERO_NOTE = "hatched grey: exactly 0 gradient for one of the two terms (cosine undefined)"
TICK_SIZE = 9
ZERO_FACE = "#d9d9d9"             # the grey of the 'exactly 0' cells, distinct from the near-white of cosine 0


def combo_colour(combo: str) -> str:
    """The colour of a loss combination; grey for a name outside COMBO_COLOURS."""
    return COMBO_COLOURS.get(combo, "#999999")


def _figure(width: float, height: float) -> Figure:
    """A Figure with an Agg canvas of its own: no pyplot, no backend switch."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _tidy(ax):
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(alpha=0.3)


def _preset_title(p: str) -> str:
    return PRESET_TITLES.get(p, f"preset '{p}'")


# ----------------------------------------------------------------------------------------------
# MaxVio curves and the bar charts
# ----------------------------------------------------------------------------------------------

def fig_maxvio(summary: dict, smooth: int = 5) -> Figure:
    """MaxVio_batch over the fine-tuning steps, one panel per preset, one line per loss combination."""
    presets = list(summary)
    fig = _figure(5.4 * len(presets), 3.9)
    axes = fig.subplots(1, len(presets), squeeze=False, sharey=True)[0]
    for ax, p in zip(axes, presets):
        for c, e in summary[p].items():
            y = e["maxvio_curve"]
            ax.plot(np.arange(1, len(y) + 1), moving_average(y, smooth), label=c, lw=1.6, color=combo_colour(c))
        ax.set_title(_preset_title(p), fontsize=10)
        ax.set_xlabel("fine-tuning step", fontsize=10)
        _tidy(ax)
    axes[0].set_ylabel("load imbalance MaxVio_batch\n(lower is better)", fontsize=10)
    axes[-1].legend(title="loss combination", fontsize=8, title_fontsize=8)
    fig.suptitle(f"Load balance during fine-tuning (mean over seeds, {smooth}-step moving average)", fontsize=11)
    return fig


def _bars(ax, summary_p, combos, key):
    """Horizontal bars, one per combination present, with sd-over-seeds error bars."""
    combos = [c for c in combos if c in summary_p]
    m = [summary_p[c][key][0] for c in combos]
    s = [summary_p[c][key][1] for c in combos]
    y = np.arange(len(combos))
    ax.barh(y, m, xerr=s, capsize=3, color=[combo_colour(c) for c in combos], error_kw={"lw": 1.0})
    ax.set_yticks(y, combos)
    ax.set_xlabel(METRIC_LABELS.get(key, key).replace(" (", "\n("), fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))                   # small values: no colliding tick labels
    _tidy(ax)
    ax.grid(axis="y", visible=False)


def _bar_grid(summary: dict, combos, keys, title: str) -> Figure:
    """One row of bar charts per preset, one column per metric key."""
    presets = list(summary)
    fig = _figure(3.4 * len(keys), 0.6 + 0.45 * len(combos) * len(presets) + 0.9 * len(presets))
    axes = fig.subplots(len(presets), len(keys), squeeze=False, sharey=True)
    for i, p in enumerate(presets):
        for j, k in enumerate(keys):
            _bars(axes[i][j], summary[p], combos, k)
        axes[i][0].set_ylabel(_preset_title(p).replace(" (", "\n("), fontsize=9)
    axes[0][0].invert_yaxis()                      # shared by every panel: the first combination on top
    fig.suptitle(f"{title}\n({ERRORBAR_NOTE})", fontsize=10)
    return fig


def fig_specialization(summary: dict, combos=FIG3_COMBOS) -> Figure:
    return _bar_grid(summary, combos, ["overlap", "silhouette", "rv_per_token", "rv_eq42"],
                     "Expert specialisation on the held-out narrow domain")


def fig_ablation(summary: dict, combos=ABLATION_COMBOS) -> Figure:
    return _bar_grid(summary, combos, ["overlap", "rv_per_token", "maxvio_global", "task"],
                     "Ablation: L_aux alone, with L_o, with L_v, with both")


# ----------------------------------------------------------------------------------------------
# gradient cosines
# ----------------------------------------------------------------------------------------------

def _matrix(m):
    return np.asarray([[math.nan if v is None else v for v in row] for row in m], dtype=np.float64)


def _text_colour(v: float) -> str:
    """White on the dark ends of RdBu_r, black elsewhere."""
    return "white" if abs(v) > 0.6 else "black"


def _mark_exact_zero(ax, col: float, row: float, label: str | None = "exactly 0"):
    ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, facecolor=ZERO_FACE, edgecolor="#737373", hatch="///",
                           lw=0.0))
    if label:
        ax.text(col, row, label, ha="center", va="center", fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.15", "fc": ZERO_FACE, "ec": "none"})


def _zero_legend(fig):
    fig.legend(handles=[Patch(facecolor=ZERO_FACE, edgecolor="#737373", hatch="///", label=EXACT_ZERO_NOTE)],
               loc="outside lower center", fontsize=8, frameon=False)


def _alignment_axes(summary: dict, combo: str, width: float, row_height: float):
    """Presets that logged gradient alignment for ``combo``, and a figure with one row of 3 axes per preset."""
    presets = [p for p in summary if combo in summary[p] and summary[p][combo]["alignment"]]
    n = max(1, len(presets))
    fig = _figure(width, row_height * n + 0.8)
    axes = fig.subplots(n, len(GROUPS), squeeze=False)
    if not presets:                                  # e.g. --combos aux: say so instead of empty axes
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][1].text(0.5, 0.5, f"no {combo} run with logged steps in this study", ha="center", va="center",
                        fontsize=11, transform=axes[0][1].transAxes)
    return presets, fig, axes


def fig_grad_cosine(summary: dict, combo: str = "aux+ortho+var") -> Figure:
    """Lower triangle (no diagonal) of the cosine between each pair of per-term gradients, per parameter group."""
    presets, fig, axes = _alignment_axes(summary, combo, 11.5, 3.3)
    im = None
    for i, p in enumerate(presets):
        al = summary[p][combo]["alignment"]
        for j, g in enumerate(GROUPS):
            ax = axes[i][j]
            terms = al[g]["terms"]
            m = _matrix(al[g]["mean_cos"])
            rows, cols = terms[1:], terms[:-1]               # pairs (a, b) with b before a: each pair once
            tri = np.full((len(rows), len(cols)), np.nan)
            for a in range(len(rows)):
                for b in range(a + 1):
                    tri[a, b] = m[a + 1, b]
            im = ax.imshow(np.ma.masked_invalid(tri), vmin=-1, vmax=1, cmap="RdBu_r")
            for a in range(len(rows)):
                for b in range(a + 1):
                    v = tri[a, b]
                    if math.isnan(v):
                        _mark_exact_zero(ax, b, a)
                    else:
                        txt = f"{v:+.2f}" if abs(v) >= 0.005 else f"{v:+.3f}"     # about 0, not exactly 0
                        ax.text(b, a, txt, ha="center", va="center", fontsize=8.5, color=_text_colour(v))
            ax.set_xticks(range(len(cols)), [TERM_NAMES.get(t, t) for t in cols])
            ax.set_yticks(range(len(rows)), [TERM_NAMES.get(t, t) for t in rows])
            ax.tick_params(labelsize=TICK_SIZE)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            ax.set_title(f"{p}: {GROUP_TITLES.get(g, g)}", fontsize=9.5)
        fig.colorbar(im, ax=axes[i].tolist(), shrink=0.85,
                     label="cosine (+1 same direction, -1 opposed)")
    fig.suptitle(f"How the loss terms' gradients align under {combo}\n(mean cosine over logged steps and seeds)",
                 fontsize=10)
    if presets:
        _zero_legend(fig)
    return fig


def fig_grad_cosine_steps(summary: dict, combo: str = "aux+ortho+var") -> Figure:
    """The cosine of each pair of per-term gradients at each logged fine-tuning step (mean over seeds)."""
    presets, fig, axes = _alignment_axes(summary, combo, 12.5, 3.0)
    im = None
    for i, p in enumerate(presets):
        al = summary[p][combo]["alignment"]
        for j, g in enumerate(GROUPS):
            terms = al[g]["terms"]
            rows = []
            for a, b in PAIR_LABELS:
                ia, ib = terms.index(a), terms.index(b)
                rows.append([math.nan if m[ia][ib] is None else m[ia][ib] for m in al[g]["cos_by_step"]])
            r = np.asarray(rows, dtype=np.float64)
            ax = axes[i][j]
            im = ax.imshow(np.ma.masked_invalid(r), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
            for a, b in zip(*np.nonzero(np.isnan(r))):
                _mark_exact_zero(ax, b, a, label=None)
            ax.set_yticks(range(len(PAIR_LABELS)),
                          [f"{TERM_NAMES[a]} / {TERM_NAMES[b]}" for a, b in PAIR_LABELS])
            steps = al[g]["steps"]
            every = max(1, math.ceil(len(steps) / 8))             # at most about 8 step labels
            ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]])
            ax.tick_params(labelsize=TICK_SIZE - 0.5)
            ax.set_xlabel("fine-tuning step", fontsize=9)
            ax.set_title(f"{p}: {GROUP_TITLES.get(g, g)}", fontsize=9.5)
            if j > 0:
                ax.tick_params(labelleft=False)
        fig.colorbar(im, ax=axes[i].tolist(), shrink=0.85,
                     label="cosine (+1 same direction, -1 opposed)")
    fig.suptitle(f"Gradient alignment over fine-tuning under {combo} (mean over seeds)", fontsize=10)
    if presets:
        _zero_legend(fig)
    return fig


# ----------------------------------------------------------------------------------------------
# the coefficient sweep
# ----------------------------------------------------------------------------------------------

def fig_sweep(sweep: dict, rmse_bound: float = 0.03) -> Figure:
    """aux+ortho+var against the factor on each preset's (beta, gamma); dashed: aux only, dotted: paper bound."""
    keys = ["overlap", "rv_per_token", "maxvio_rmse_vs_aux"]
    presets = list(sweep)
    fig = _figure(4.2 * len(keys), 3.2 * len(presets) + 0.9)
    axes = fig.subplots(len(presets), len(keys), squeeze=False)
    for i, p in enumerate(presets):
        sw = sweep[p]
        base = next((r for r in sw["rows"] if r["factor"] == 1.0), sw["rows"][0])
        f = [r["factor"] for r in sw["rows"]]
        for j, k in enumerate(keys):
            ax = axes[i][j]
            m = [r[k][0] for r in sw["rows"]]
            s = [r[k][1] for r in sw["rows"]]
            ax.errorbar(f, m, yerr=s, marker=PRESET_MARKERS.get(p, "o"), capsize=3, lw=1.5,
                        color=combo_colour("aux+ortho+var"))
            if k in sw["aux"]:
                ax.axhline(sw["aux"][k][0], color=combo_colour("aux"), ls="--", lw=1.2)
            if k == "maxvio_rmse_vs_aux":
                ax.axhline(rmse_bound, color="#000000", ls=":", lw=1.2)
            ax.set_xscale("log")
            ax.set_xticks(f, [f"x{v:g}" for v in f])
            ax.minorticks_off()
            ax.set_xlabel("factor on the preset's beta and gamma", fontsize=9)
            ax.set_ylabel(METRIC_LABELS[k].replace(" (", "\n("), fontsize=9)
            _tidy(ax)
        b0, g0 = base["beta"] / base["factor"], base["gamma"] / base["factor"]
        axes[i][0].set_title(f"{_preset_title(p)}; x1 = its beta, gamma\n(seed 0: beta {b0:.3g}, gamma {g0:.3g})",
                             fontsize=9, loc="left")
    handles = [Line2D([], [], color=combo_colour("aux+ortho+var"), marker="o", lw=1.5,
                      label="aux+ortho+var at the scaled beta, gamma (mean; error bars: sd over seeds)"),
               Line2D([], [], color=combo_colour("aux"), ls="--", lw=1.2, label="aux only (mean over seeds)"),
               Line2D([], [], color="#000000", ls=":", lw=1.2, label=f"paper's bound on the RMSE, {rmse_bound:g}")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle("Sensitivity to the L_o / L_v coefficients (alpha fixed)", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# all of them
# ----------------------------------------------------------------------------------------------

FILE_NAMES = ("fig2_maxvio.png", "fig3_specialization.png", "ablation.png", "grad_cosine.png",
              "grad_cosine_steps.png", "sweep.png")      # every file save_all can write


def save_all(summary: dict, out_dir: str, sweep: dict | None = None) -> list:
    """Write every figure as PNG under out_dir; returns the file names."""
    made = {"fig2_maxvio.png": fig_maxvio, "fig3_specialization.png": fig_specialization,
            "ablation.png": fig_ablation, "grad_cosine.png": fig_grad_cosine,
            "grad_cosine_steps.png": fig_grad_cosine_steps}
    if sweep:
        made["sweep.png"] = lambda _: fig_sweep(sweep)
    names = []
    for name, fn in made.items():
        fig = fn(summary)
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        names.append(name)
    return names

