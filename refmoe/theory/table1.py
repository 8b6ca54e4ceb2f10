r"""The arithmetic behind the paper's Table 1 headlines, from the table's own numbers (``refmoe/theory/table1.csv``).

Dimension letters: M models (3), B benchmarks (11), so M B = 33 cells; 4 baselines per cell.

Headlines checked (the paper's words):
    abstract   "improves classic MoE baselines with auxiliary loss by up to 23.79%"
    Sec. 1     "We achieve 23.79% relative gains across 11 benchmarks and outperform all baselines on 92.42% of tasks"
    Sec. 4.2   "state-of-the-art (SOTA) results in over 85% of the 33 tasks across the three models"; "the average
               across multiple measurements even outperforms the next-best method by nearly 7%"

    relative gain of a cell   (ours - aux) / aux           (aux = "With Aux Loss")
    wins                      cells where ours beats all 4 baselines
    pairwise wins             (cell, baseline) pairs where ours is higher, out of 4 M B = 132
    margin                    ours - best baseline, in accuracy points
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "table1.csv"
BASELINES = ("aux", "loss_free", "gshard", "st_moe")


def load(path=DATA) -> dict:
    """{method: array [M, B]} of Table 1's mean accuracies, and the benchmark names."""
    with open(path, newline="") as f:
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    header, body = rows[0], rows[1:]
    models = sorted({int(r[0]) for r in body})
    out = {}
    for m in BASELINES + ("ours",):
        out[m] = np.array([[float(v) for v in r[2:]] for mod in models for r in body
                           if int(r[0]) == mod and r[1] == m])            # [M, B]
    return dict(methods=out, benchmarks=header[2:])


def headline_numbers(path=DATA) -> dict:
    t = load(path)["methods"]
    ours, aux = t["ours"], t["aux"]                                      # [M, B]
    base = np.stack([t[m] for m in BASELINES])                           # [4, M, B]
    gain = (ours - aux) / aux
    best = base.max(axis=0)
    return dict(cells=int(ours.size), mean_gain=float(gain.mean()), max_gain=float(gain.max()),
                median_gain=float(np.median(gain)), wins=int((ours > best).sum()),
                pairwise_wins=int((ours[None] > base).sum()), pairs=int(base.size),
                max_margin_points=float((ours - best).max()),
                max_margin_relative=float(((ours - best) / best).max()))
