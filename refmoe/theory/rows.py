"""The row types of ``refmoe lemmas`` and the words they use: a ``Verdict`` per claim of the paper, a ``Finding``
per exploratory measurement, the verdict words (``LEGEND``) and the error measures (``ERRORS``)."""
from __future__ import annotations

from typing import NamedTuple


LEGEND = {
    "HOLDS": "the claim is true in every case checked (exactly, or to the stated tolerance)",
    "HOLDS-IF": "true under the condition the evidence states, false without it",
    "FAILS": "a counterexample to the claim as stated",
    "REFUTED": "a formula or statement the paper prints is wrong",
    "CONFIRMED": "a formula or statement the paper prints is right",
    "SCOPE": "the paper's claim is narrower; the evidence shows where it stops (no refutation)",
}
ERRORS = {
    "rel. error": "max|a-b| / (max|a|+max|b|), a vs b (FD or exact); about half the plain error when a ~ c b",
    "plain error": "max|a-b| / max|b|, a printed formula a against the exact gradient b",
}


class Verdict(NamedTuple):
    id: str
    claim: str
    verdict: str
    evidence: str
    test: str


class Finding(NamedTuple):
    """An exploratory measurement: depends on choices (optimiser, step, start) that no claim of the paper fixes."""
    id: str
    question: str
    finding: str
    test: str
