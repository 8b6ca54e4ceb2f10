"""refmoe lemmas: verdicts on the paper's Lemma 1, Lemma 2 and stated gradient formulas, with evidence; then the
exploratory findings (measurements that are no claim of the paper), printed apart."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

HELP = "check the paper's Lemma 1, Lemma 2 and gradient formulas numerically; print a verdict table"
WIDTH = 120


def add_arguments(parser):
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (legend, error measures, verdicts, findings)")
    parser.add_argument("--figure", metavar="PATH", default=None,
                        help="write the Lemma 1 variance/balance trade-off as a PNG (a directory gets "
                             "lemma1_tradeoff.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instances (default 0)")


def _block(label: str, text: str, indent: int) -> list[str]:
    """``label: text`` wrapped to WIDTH columns, continuation lines indented under the text."""
    pad = " " * indent
    return textwrap.wrap(f"{label}: {text}", WIDTH, initial_indent=pad, subsequent_indent=pad + "  ",
                         break_on_hyphens=False)


def run(args) -> int:
    import numpy as np

    from ..theory.verdicts import ERRORS, LEGEND, all_findings, all_verdicts

    verdicts, findings = all_verdicts(args.seed), all_findings(args.seed)
    figure = None
    if args.figure:
        from ..theory.figures import plot_tradeoff, tradeoff_data

        path = Path(args.figure)
        if path.is_dir() or args.figure.endswith(("/", "\\")):
            path.mkdir(parents=True, exist_ok=True)
            path = path / "lemma1_tradeoff.png"
        figure = plot_tradeoff(tradeoff_data(np.random.default_rng(args.seed)), path)
    if args.json:
        print(json.dumps({"legend": LEGEND, "errors": ERRORS, "verdicts": [v._asdict() for v in verdicts],
                          "findings": [f._asdict() for f in findings], "figure": figure}, indent=2))
        return 0
    w_id = max(len(v.id) for v in verdicts + findings)
    w_v = max(len(word) for word in list(LEGEND) + list(ERRORS))
    ind = w_id + w_v + 4
    out = ["Verdict words:"]
    for word, meaning in LEGEND.items():
        out += textwrap.wrap(f"{word:<{w_v}}  {meaning}", WIDTH, initial_indent="  ", subsequent_indent=" " * (w_v + 4))
    out.append("Errors:")
    for name, meaning in ERRORS.items():
        out += textwrap.wrap(f"{name:<{w_v}}  {meaning}", WIDTH, initial_indent="  ", subsequent_indent=" " * (w_v + 4))
    out += ["", f"{'id':<{w_id}}  {'verdict':<{w_v}}  claim | evidence | test"]
    for v in verdicts:
        head = textwrap.wrap(v.claim, WIDTH - ind)
        out.append(f"{v.id:<{w_id}}  {v.verdict:<{w_v}}  {head[0]}")
        out += [" " * ind + h for h in head[1:]]
        out += _block("evidence", v.evidence, ind) + _block("test", v.test, ind)
    out += ["", "Exploratory findings (no claim of the paper; they depend on choices the paper does not fix):"]
    for f in findings:
        head = textwrap.wrap(f.question, WIDTH - ind)
        out.append(f"{f.id:<{w_id}}  {'finding':<{w_v}}  {head[0]}")
        out += [" " * ind + h for h in head[1:]]
        out += _block("measured", f.finding, ind) + _block("test", f.test, ind)
    if figure:
        out.append(f"figure written to {figure}")
    print("\n".join(out))
    return 0
