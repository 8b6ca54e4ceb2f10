"""`refmoe reproduce` end to end: the report folder, its verdicts, the progress lines, the flags refused before
any work, and the report moved into place only when the run is complete."""
import io
import json
import os

import pytest

from refmoe.cli import main

VERDICTS = {"supported", "contradicted", "inconclusive", "not measured"}
CLAIMS = {"C1a", "C1a.nmi", "C1b", "C2", "C2.nmi", "C3", "C3'", "C4", "C5", "C6", "C6.nmi", "C7", "C8", "C9", "C10a",
          "C10b", "C11", "C11.aux", "C12", "C13", "C14", "C15"}
# a study of a few seconds: 2 seeds x (pre-training + 1 preset x 2 combos) = 6 training runs
TINY = ["--quick", "--pretrain-steps", "4", "--finetune-steps", "3", "--log-every", "2", "--presets", "paper",
        "--combos", "aux", "aux+ortho+var", "--sweep", "--eval-tokens", "64", "--no-figures", "--workers", "1"]


def test_quick_run_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--quick", "--seeds", "2", "--workers", "1", "--out", str(out)]) == 0
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
    # 2 seeds x (pre-training + 2 presets x (6 combos + 1 sweep run)) = 30, each announced once when piped
    assert "= 30 training runs" in printed
    runs = [ln for ln in printed.splitlines() if ln.startswith("run ")]
    assert [ln.split()[1] for ln in runs] == [f"{i}/30" for i in range(1, 31)]
    assert all(" ETA " in ln for ln in runs) and runs[-1].startswith("run 30/30 seed 1 authors_code:sweep:0.1")
    assert not [ln for ln in printed.splitlines() if ln.startswith("seed ")]     # per-step losses: --verbose
    assert "C4" in printed and "wrote" in printed
    assert [n for n in os.listdir(tmp_path) if n != "rep"] == []                  # no staging folder left


def test_verbose_prints_every_logging_step_and_quiet_only_the_summary(tmp_path, capsys):
    assert main(["reproduce", *TINY, "--out", str(tmp_path / "a"), "--verbose"]) == 0
    printed = capsys.readouterr().out.splitlines()
    # pre-training logs steps 1, 2, 4; fine-tuning 1, 2, 3: 2 seeds x (3 + 2 x 3)
    assert len([ln for ln in printed if ln.startswith("seed ")]) == 2 * (3 + 2 * 3)
    assert len([ln for ln in printed if ln.startswith("run ")]) == 6
    assert main(["reproduce", *TINY, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    assert not [ln for ln in cap.out.splitlines() if ln.startswith(("run ", "seed ", "refmoe reproduce:"))]
    assert "verdicts" in cap.out and "wrote" in cap.out


def test_progress_rewrites_one_line_on_a_terminal():
    from refmoe.study.runner import Progress

    clock = iter([0.0, 10.0, 30.0]).__next__
    stream = io.StringIO()
    p = Progress(3, 40, stream=stream, tty=True, clock=clock)
    p.start("seed 0 pretrain", 20)              # t = 0
    p.start("seed 0 paper:aux", 10)             # t = 10 s after 20 steps: 0.5 s/step, 20 steps left
    p.note("seed 0 paper:aux step 1")
    p.start("seed 0 paper:none", 10)            # t = 30 s after 30 steps: 1 s/step, 10 left
    p.close()
    text = stream.getvalue()
    assert text.count("\n") == 2                 # the note and the final newline; progress itself in place
    assert "\r\x1b[Krun 1/3 seed 0 pretrain ... ETA --:--" in text
    assert "run 2/3 seed 0 paper:aux ... ETA 00:10" in text
    assert text.endswith("\r\x1b[Krun 3/3 seed 0 paper:none ... ETA 00:10\n")


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "1"], "need at least 2 seeds: a verdict needs a spread over seeds"),
    (["--seeds", "0"], "need at least 2 seeds"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--finetune-steps", "0"], "--finetune-steps 0: must be at least 1"),
    (["--experts", "0"], "--experts 0: must be at least 2"),
    (["--top-k", "99"], "--top-k 99 exceeds --experts 6"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--pretrain-steps", "-5"], "--pretrain-steps -5: must be at least 1"),
    (["--beta", "-1"], "--beta -1.0: must be a finite number >= 0"),
    (["--sweep", "0"], "--sweep 0.0: every factor must be a finite number > 0"),
    (["--narrow", "9"], "--narrow 9 exceeds --clusters 6"),
    (["--workers", "0"], "--workers 0: must be an integer >= 1"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "rep"
    assert main(["reproduce", "--quick", *flags, "--out", str(out)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""                          # nothing started
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cupy_without_a_gpu_is_refused(tmp_path, capsys):
    from refmoe.backend import cupy_status

    if cupy_status()[0]:
        pytest.skip("CuPy works here")
    assert main(["reproduce", "--quick", "--backend", "cupy", "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --backend cupy: CuPy cannot run here")


def test_unwritable_out_is_refused_before_the_study(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["reproduce", *TINY, "--out", str(blocker / "rep")]) == 2      # parent is a file
    assert main(["reproduce", *TINY, "--out", str(blocker)]) == 2              # out itself is a file
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 2
    assert "cannot write there" in cap.err and "is not a folder" in cap.err
    assert os.listdir(tmp_path) == ["file"]


def test_other_files_in_out_are_kept_and_stale_figures_removed(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    (out / "sweep.png").write_bytes(b"stale")                 # from an earlier run with a sweep
    assert main(["reproduce", *TINY, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "report.md", "results.json"]
    assert (out / "README.md").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["rep"]


def test_interrupted_run_leaves_the_previous_report_alone(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", *TINY, "--out", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    import refmoe.study.report as report

    real = report.write_report

    def interrupted(result, out_dir, **kw):
        real(result, out_dir, **kw)              # the new files are written, then the run is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["reproduce", *TINY, "--lr", "0.05", "--out", str(out)])
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["rep"]         # the staging folder is gone
    monkeypatch.setattr(report, "write_report", real)
    assert main(["reproduce", *TINY, "--lr", "0.05", "--out", str(out)]) == 0   # a complete run replaces it
    assert json.loads((out / "results.json").read_text())["config"]["lr"] == 0.05
    assert os.listdir(tmp_path) == ["rep"]


def test_a_single_combination_says_why_there_is_no_verdict(tmp_path, capsys):
    flags = [f for f in TINY if f != "aux+ortho+var"]
    assert main(["reproduce", *flags, "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "[paper] only 2 verdict(s): the other claims compare two loss combinations" in printed
    assert "--combos gave only aux" in printed
    assert "[paper] C10a" in printed and "[paper] C2 " not in printed      # only the aux-only trend claims


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


def test_default_study_counts_every_run_it_trains():
    from refmoe.study.runner import StudyConfig, count_runs, count_steps

    st = StudyConfig()
    assert count_runs(st) == 11 * (1 + 2 * (6 + 3)) == 209      # the sweep's runs included
    assert count_steps(st) == 11 * (300 + 2 * 9 * 300)
