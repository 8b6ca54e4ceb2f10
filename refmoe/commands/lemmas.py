"""refmoe lemmas: verdicts on the paper's Lemma 1, Lemma 2 and stated gradient formulas, with evidence."""
from __future__ import annotations

import json
from pathlib import Path

HELP = "check the paper's Lemma 1, Lemma 2 and gradient formulas numerically; print a verdict table"


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object (list of verdicts)")
    parser.add_argument("--figure", metavar="PATH", default=None,
                        help="write the Lemma 1 variance/balance trade-off as a PNG (a directory gets "
                             "lemma1_tradeoff.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instances (default 0)")


def run(args) -> int:
    import numpy as np

    from ..theory.verdicts import all_verdicts

    verdicts = all_verdicts(args.seed)
    figure = None
    if args.figure:
        from ..theory.figures import plot_tradeoff, tradeoff_data

        path = Path(args.figure)
        if path.is_dir() or args.figure.endswith(("/", "\\")):
            path.mkdir(parents=True, exist_ok=True)
            path = path / "lemma1_tradeoff.png"
        figure = plot_tradeoff(tradeoff_data(np.random.default_rng(args.seed)), path)
    if args.json:
        print(json.dumps({"verdicts": [v._asdict() for v in verdicts], "figure": figure}, indent=2))
        return 0
    w_id = max(len(v.id) for v in verdicts)
    w_v = max(len(v.verdict) for v in verdicts)
    print(f"{'id':<{w_id}}  {'verdict':<{w_v}}  claim | evidence")
    for v in verdicts:
        print(f"{v.id:<{w_id}}  {v.verdict:<{w_v}}  {v.claim}\n{'':<{w_id + w_v + 4}}  evidence: {v.evidence}"
              f"\n{'':<{w_id + w_v + 4}}  test: {v.test}")
    if figure:
        print(f"figure written to {figure}")
    return 0
