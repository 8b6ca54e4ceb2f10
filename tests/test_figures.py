"""The study's figures and the Lemma 1 figure: built without pyplot (the backend pyplot uses is never switched),
one colour per loss combination in every figure, labels that say which direction is better, and the
'exactly 0' cells of the cosine heatmaps drawn apart from cosines that are about 0."""
import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_hex

from refmoe.study import figures
from refmoe.study.train import COMBOS

TERMS = ["task", "aux", "ortho", "var"]


def _alignment(steps=(1, 20, 40)):
    """Cosine matrices shaped like summary.alignment_summary: None where a gradient is exactly zero."""
    cos = [[1.0, -0.4, None, 0.001], [-0.4, 1.0, None, 0.9], [None, None, None, None], [0.001, 0.9, None, 1.0]]
    g = {"terms": TERMS, "mean_cos": cos, "conflict": cos, "steps": list(steps), "cos_by_step": [cos] * len(steps)}
    return {"router": g, "experts": g, "input": g, "discrim_by_step": [0.1] * len(steps)}


def _summary(presets=("paper", "authors_code"), combos=tuple(COMBOS)):
    rng = np.random.default_rng(0)
    keys = ("task", "maxvio_global", "overlap", "silhouette", "rv_per_token", "rv_eq42")
    return {p: {c: {**{k: [float(rng.uniform(0.1, 1)), 0.05] for k in keys},
                    "maxvio_curve": rng.uniform(0.2, 1.5, 30).tolist(), "alignment": _alignment()}
                for c in combos} for p in presets}


def _sweep(presets=("paper", "authors_code")):
    row = lambda f: {"factor": f, "beta": 1e-3 * f, "gamma": 1e-3 * f, "overlap": [0.2, 0.01],
                     "rv_per_token": [0.02, 0.001], "maxvio_rmse_vs_aux": [0.02, 0.005]}
    return {p: {"aux": {"overlap": [0.21, 0.01], "rv_per_token": [0.019, 0.001]},
                "rows": [row(0.1), row(1.0), row(10.0)]} for p in presets}


def test_figures_leave_pyplot_and_its_backend_alone(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    before = matplotlib.get_backend()
    plt.switch_backend("svg")                     # stands in for a notebook's inline backend
    try:
        names = figures.save_all(_summary(), str(tmp_path), sweep=_sweep())
        from refmoe.theory.figures import plot_tradeoff

        plot_tradeoff([{"N": 8, "n": 4, "k": 2, "t": [0.0, 0.5, 1.0], "variance": [0.1, 0.2, np.nan],
                        "unconstrained": 0.3}], tmp_path / "tradeoff.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []            # nothing registered with pyplot, nothing to leak
    finally:
        plt.switch_backend(before)
    assert len(names) == 6
    for name in names + ["tradeoff.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_loss_combination_keeps_its_colour():
    assert set(figures.COMBO_COLOURS) == set(COMBOS)
    assert len(set(figures.COMBO_COLOURS.values())) == len(COMBOS)
    s = _summary()
    fig = figures.fig_maxvio(s)
    for ax in fig.axes:
        for line in ax.get_lines():
            assert to_hex(line.get_color()) == figures.COMBO_COLOURS[line.get_label()].lower()
    for fig, combos in ((figures.fig_specialization(s), figures.FIG3_COMBOS),
                        (figures.fig_ablation(s), figures.ABLATION_COMBOS)):
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == list(combos)
        assert [to_hex(b.get_facecolor()) for b in ax.patches] == [figures.COMBO_COLOURS[c].lower() for c in combos]


def test_labels_say_which_direction_is_better():
    s = _summary()
    for fig in (figures.fig_specialization(s), figures.fig_ablation(s), figures.fig_sweep(_sweep())):
        xlabels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
        ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
        assert any("is better" in lab for lab in xlabels + ylabels)
        assert "sd over seeds" in fig.get_suptitle() + " ".join(t.get_text() for lg in fig.legends
                                                                 for t in lg.get_texts())
    sweep_legend = [t.get_text() for t in figures.fig_sweep(_sweep()).legends[0].get_texts()]
    assert any("aux only" in t for t in sweep_legend) and any("bound" in t for t in sweep_legend)


def test_cosine_heatmap_marks_exact_zero_apart_from_about_zero():
    fig = figures.fig_grad_cosine(_summary())
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "exactly 0" in texts                  # the ortho gradient is exactly zero
    assert "+0.001" in texts                     # about 0, printed as such
    assert "+1.00" not in texts                  # no diagonal
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours["+0.90"] == "white" and colours["-0.40"] == "black"   # contrast-aware text
