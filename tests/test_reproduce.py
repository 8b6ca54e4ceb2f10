"""`refmoe reproduce --quick` end to end: the report folder, its verdicts and the status lines."""
import json
import os

from refmoe.cli import main

VERDICTS = {"supported", "contradicted", "inconclusive", "not measured"}
CLAIMS = {"C1a", "C1a.nmi", "C1b", "C2", "C2.nmi", "C3", "C3'", "C4", "C5", "C6", "C6.nmi", "C7", "C8", "C9", "C10a",
          "C10b"}


def test_quick_run_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = set(os.listdir(out))
    assert {"report.md", "results.json", "fig2_maxvio.png", "fig3_specialization.png", "ablation.png",
            "grad_cosine.png", "grad_cosine_steps.png", "sweep.png"} <= files
    for f in files:
        assert os.path.getsize(out / f) > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["claims"]) == {"paper", "authors_code"}
    for preset, rows in res["claims"].items():
        assert {r["id"] for r in rows} == CLAIMS
        assert all(r["verdict"] in VERDICTS for r in rows)
        assert all(len(r["per_seed"]) == 2 for r in rows)
        assert all(r["verdict"] == "inconclusive" for r in rows)        # 2 seeds: no p below 0.05 is possible
    md = (out / "report.md").read_text()
    assert "## Verdicts" in md and md.count("| C2 ") == 4          # verdicts and evidence, 2 presets each
    assert "Smoke test, not evidence" in md and "**contradicted**" in md and "Holm" in md
    # one status line per logging step: 2 seeds x (pre-training + 2 presets x (6 combos + 1 sweep run)),
    # quick steps 60 (pre) and 40 (fine-tuning) logged at 1, 20, 40 (+ 60 for pre-training)
    status = [ln for ln in printed.splitlines() if ln.startswith("seed ")]
    assert len(status) == 2 * (4 + 2 * 7 * 3)
    assert "C4" in printed and "wrote" in printed


def test_flags_reach_the_study(tmp_path):
    from refmoe.cli import build_parser
    from refmoe.commands.reproduce import study_from_args

    args = build_parser().parse_args(["reproduce", "--quick", "--experts", "5", "--seeds", "3", "--beta", "0.5",
                                      "--combos", "aux", "none"])
    st = study_from_args(args)
    assert st.n_experts == 5 and st.seeds == (0, 1, 2) and st.beta == 0.5 and st.combos == ("aux", "none")
    assert st.d_model == 16                                   # --quick size where no flag was given
    args = build_parser().parse_args(["reproduce"])
    st = study_from_args(args)
    assert st.n_experts == 16 and len(st.seeds) == 11
