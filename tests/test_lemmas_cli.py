"""``refmoe lemmas``: one verdict per claim, the verdicts pinned, each backed by a test that exists and named in
the theory notes; the exploratory findings apart; a legend of the verdict words; 120 columns; the figure written."""
import json
import re
from pathlib import Path

import pytest

from refmoe.cli import main
from refmoe.theory.verdicts import ERRORS, LEGEND, all_findings, all_verdicts

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "L1.witness": "HOLDS", "L1.delta": "HOLDS-IF", "L1.all_rows": "HOLDS-IF", "L1.k1": "FAILS",
    "L1.cycle": "HOLDS-IF", "L1.exact_balance": "FAILS", "L1.opt": "HOLDS-IF", "L1.loss_joint": "HOLDS",
    "L1.hidden_balance": "CONFIRMED", "L1.loss_conflict": "FAILS", "Aux.min": "FAILS",
    "L2.printed": "FAILS", "L2.intended": "HOLDS-IF", "L2.identical": "FAILS", "L2.types": "HOLDS-IF",
    "L2.D_lt_K": "FAILS", "L2.tradeoff": "HOLDS-IF",
    "G.eq9_10": "REFUTED", "G.eq8": "REFUTED", "G.eq3_20": "REFUTED", "G.eq4_23": "REFUTED",
    "G.eq24": "HOLDS-IF", "G.eq27": "CONFIRMED", "G.eq10_34": "CONFIRMED", "G.disjoint": "CONFIRMED",
    "G.lo_router": "REFUTED", "G.cross_layer": "SCOPE",
    "T1.mean_gain": "CONFIRMED", "T1.up_to": "REFUTED", "T1.sota": "CONFIRMED", "T1.all_baselines": "REFUTED",
    "T1.margin": "HOLDS-IF",
}
FINDINGS = {"L1.loss_descent"}
NOTES = {"L1": "theory/lemma1.md", "Aux": "theory/lemma1.md", "L2": "theory/lemma2.md",
         "G": "theory/gradient-audit.md", "T1": "theory/table1.md"}


@pytest.fixture
def verdicts(lemma_rows):
    return lemma_rows[0]


@pytest.fixture(autouse=True)
def computed_once(lemma_rows, monkeypatch):
    """The command runs on the session's rows: every check is computed once per test session."""
    import refmoe.theory.verdicts as V

    monkeypatch.setattr(V, "all_verdicts", lambda seed=0: lemma_rows[0] if seed == 0 else all_verdicts(seed))
    monkeypatch.setattr(V, "all_findings", lambda seed=0: lemma_rows[1] if seed == 0 else all_findings(seed))


def test_every_claim_has_a_verdict(verdicts):
    assert {v.id: v.verdict for v in verdicts} == EXPECTED


def test_each_verdict_names_an_existing_test_and_a_note(verdicts):
    for v in verdicts:
        path, name = v.test.split("::")
        assert re.search(rf"def {name}\(", (ROOT / path).read_text()), v.test
        note = (ROOT / NOTES[v.id.split(".")[0]]).read_text()
        assert v.id in note and name in note, (v.id, NOTES[v.id.split(".")[0]])
        assert f"{v.id}` | {v.verdict}" in note, f"{v.id}: the note's verdict differs from {v.verdict}"


def test_findings_apart_and_named(verdicts, lemma_rows):
    findings = lemma_rows[1]
    assert {f.id for f in findings} == FINDINGS and not FINDINGS & set(EXPECTED)
    for f in findings:
        path, name = f.test.split("::")
        assert re.search(rf"def {name}\(", (ROOT / path).read_text()), f.test
        note = (ROOT / NOTES[f.id.split(".")[0]]).read_text()
        assert f"{f.id}` | finding" in note and name in note, f.id
    assert {v.verdict for v in verdicts} <= set(LEGEND)


def test_cli_table_and_json(capsys, tmp_path):
    assert main(["lemmas", "--figure", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120
    for word in list(LEGEND) + list(ERRORS):
        assert re.search(rf"^  {re.escape(word)}\s", out, re.M), word
    table, _, tail = out.partition("Exploratory findings")
    for vid, word in EXPECTED.items():
        assert re.search(rf"^{re.escape(vid)}\s+{word}\s", table, re.M), vid
    for fid in FINDINGS:
        assert re.search(rf"^{re.escape(fid)}\s+finding\s", tail, re.M) and fid not in table, fid
    png = tmp_path / "lemma1_tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lemmas", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {v["id"]: v["verdict"] for v in data["verdicts"]} == EXPECTED
    assert data["figure"] is None and all(v["evidence"] for v in data["verdicts"])
    assert {f["id"] for f in data["findings"]} == FINDINGS and data["legend"] == LEGEND


def test_figure_file_path(tmp_path):
    path = tmp_path / "sub" / "trade.png"
    path.parent.mkdir()
    assert main(["lemmas", "--figure", str(path), "--json"]) == 0
    assert path.exists() and path.stat().st_size > 1000
