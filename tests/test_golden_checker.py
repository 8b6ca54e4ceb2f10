"""What `refmoe golden check` says about a failing dump: --terms (one loss term alone), missing keys apart from
mismatches, ratios for a forgotten factor, padding rows, a dump of another dtype, and condensed output.
Each test builds its dumps in tmp_path from the session's golden fixtures."""
import math

import numpy as np
import pytest

from refmoe.cli import main
from refmoe.golden import check_dump, load_manifest, load_npz, save_npz
from refmoe.golden.checker import TERMS, needed_keys

AUX_ONLY = ("inter/scores", "inter/topk_idx", "loss/aux")


def _dump(golden, tmp_path, cases, change=None):
    """dump/<case>.npz: the fixture's arrays, passed through ``change(name, arrays)`` when given."""
    dump = tmp_path / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    for name in cases:
        arrays = load_npz(f"{golden}/{name}.npz")
        save_npz(str(dump / f"{name}.npz"), change(name, arrays) if change else arrays)
    return dump


def _aux_only(name, a):
    """What an implementation of only a balancing loss writes."""
    return {k: v for k, v in a.items() if k in AUX_ONLY or k.startswith("grad/aux/")}


def _cli(capsys, *argv):
    code = main(["golden", "check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------
# --terms
# ----------------------------------------------------------------------------------------------

def test_needed_keys_table(golden):
    keys = load_manifest(golden)["cases"]["shared"]["keys"]
    grads = lambda t: {k for k in keys if k.startswith(f"grad/{t}/")}
    assert set(needed_keys(keys, ["aux"])) == {"inter/scores", "inter/topk_idx", "loss/aux"} | grads("aux")
    assert set(needed_keys(keys, ["ortho"])) == {"inter/expert_out", "inter/topk_idx", "loss/ortho"} | grads("ortho")
    assert set(needed_keys(keys, ["var"])) == {"inter/scores", "inter/topk_idx", "loss/var"} | grads("var")
    inter = {k for k in keys if k.startswith("inter/")}
    assert "inter/shared_out" in inter and set(needed_keys(keys, ["task"])) == inter | {"loss/task"} | grads("task")
    assert not {"loss/total"} & set(needed_keys(keys, ["task", "aux", "ortho"]))     # var is not chosen
    every = needed_keys(keys, ["task", "aux", "ortho", "var"])
    assert "loss/total" in every and grads("total") <= set(every)
    assert set(every) == set(needed_keys(keys)) == {k for k in keys if k.split("/")[0] in ("inter", "loss", "grad")}
    assert needed_keys(keys, ["z"]) == []                                            # no case has L_z yet
    assert needed_keys(keys, ["aux", "z"]) == needed_keys(keys, ["aux"])             # nor its inter/logits
    conv = load_manifest(golden)["cases"]["conv_megatron_global"]["keys"]
    assert set(needed_keys(conv, ["aux"])) == {k for k in conv if not k.startswith("input/")}   # + aux_pieces


def test_an_aux_only_dump_passes_with_terms_aux_and_fails_clearly_without(golden, tmp_path, capsys):
    cases = ["base", "padding", "conv_hf_mixtral"]
    dump = _dump(golden, tmp_path, cases, _aux_only)
    report = check_dump(golden, str(dump), terms=["aux"])
    assert report.ok and sorted(report.checked) == sorted(cases)
    assert {r.key for r in report.results if r.case == "base"} == set(needed_keys(load_npz(f"{golden}/base.npz"),
                                                                                  ["aux"]))
    code, out, _ = _cli(capsys, golden, dump, "--terms", "aux")
    assert code == 0 and out.strip().endswith("OK") and "terms aux" in out
    code, out, _ = _cli(capsys, golden, dump)                       # every key is required without --terms
    assert code == 1 and "inf" not in out
    base = [line for line in out.splitlines() if line.startswith("case base:")]
    assert len(base) == 1 and "missing: inter/expert_out" in base[0]
    assert "the dump has every key of --terms aux" in base[0]
    assert "FAILED: case 'base' lacks" in out


def test_total_is_checked_only_when_every_term_is_chosen(golden, tmp_path, capsys):
    def spoil(name, a):
        a["loss/total"] = a["loss/total"] * 3
        return a
    dump = _dump(golden, tmp_path, ["base"], spoil)
    assert check_dump(golden, str(dump), terms=["aux", "ortho", "var"]).ok
    report = check_dump(golden, str(dump), terms=["task", "aux", "ortho", "var"])
    assert [r.key for r in report.failures] == ["loss/total"]
    assert _cli(capsys, golden, dump, "--terms", "task,aux", "--terms", "ortho", "--terms", "var")[0] == 1


def test_terms_z_is_accepted_and_an_unknown_term_is_bad_input(golden, tmp_path, capsys):
    dump = _dump(golden, tmp_path, ["base"])
    assert "z" in TERMS
    code, out, err = _cli(capsys, golden, dump, "--terms", "z")      # only the sys_megatron* cases have z
    assert code == 1 and not err and "the dump directory holds none of the golden cases that have" in out
    dump = _dump(golden, tmp_path, ["sys_megatron"])
    code, out, err = _cli(capsys, golden, dump, "--terms", "z")
    assert code == 0 and not err and "1 case(s) checked: 1 passed" in out
    code, out, err = _cli(capsys, golden, dump, "--terms", "aux,balance")
    assert code == 2 and err.strip() == ("refmoe golden: error: --terms balance: expected some of "
                                         "task, aux, ortho, var, z")
    code, _, err = _cli(capsys, golden, dump, "--terms", ",")
    assert code == 2 and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# missing keys, ratios, padding rows, dtypes
# ----------------------------------------------------------------------------------------------

def test_missing_keys_are_listed_apart_from_mismatches_never_as_inf(golden, tmp_path, capsys):
    def spoil(name, a):
        del a["grad/aux/w_router"], a["loss/var"]
        a["inter/y"] = a["inter/y"] * 1.01
        return a
    dump = _dump(golden, tmp_path, ["base"], spoil)
    report = check_dump(golden, str(dump))
    assert report.missing("base") == ["loss/var", "grad/aux/w_router"]
    assert [r.key for r in report.failures if not r.missing] == ["inter/y"]
    assert all(math.isnan(r.max_abs) for r in report.failures if r.missing)
    code, out, _ = _cli(capsys, golden, dump)
    (line,) = [line for line in out.splitlines() if line.startswith("case base:")]
    assert code == 1 and line.startswith("case base: FAIL  inter/y: max abs")
    assert "missing: loss/var, grad/aux/w_router" in line and "inf" not in out
    code, out, _ = _cli(capsys, golden, dump, "-v")
    assert "  missing: loss/var, grad/aux/w_router" in out and "inf" not in out


@pytest.mark.parametrize("factor, shown", [(2.0, "ratio 2.0000"), (0.5, "ratio 0.5000")])
def test_a_forgotten_factor_shows_the_ratio(golden, tmp_path, capsys, factor, shown):
    """K = 2 in base: an L_aux that forgets its 1/K is 2x too large; one that forgets a factor 2 is 0.5x."""
    def spoil(name, a):
        for k in [k for k in a if k == "loss/aux" or k.startswith("grad/aux/")]:
            a[k] = a[k] * factor
        return a
    dump = _dump(golden, tmp_path, ["base"], spoil)
    report = check_dump(golden, str(dump), terms=["aux"])
    first = report.failures[0]
    assert first.key == "loss/aux" and first.ratio == pytest.approx(factor, rel=1e-12)
    code, out, _ = _cli(capsys, golden, dump, "--terms", "aux")
    (line,) = [line for line in out.splitlines() if line.startswith("case base:")]
    assert code == 1 and f"loss/aux: got" in line and shown in line
    code, out, _ = _cli(capsys, golden, dump, "--terms", "aux", "-v")
    assert "grad/aux/w_router" in out and shown in out                    # tensors: the ratio of their norms


def test_a_scalar_near_its_value_shows_the_ratio_as_one_plus_a_small_number(golden, tmp_path):
    def spoil(name, a):
        a["loss/var"] = a["loss/var"] * (1 - 3e-8)
        return a
    out = check_dump(golden, str(_dump(golden, tmp_path, ["base"], spoil)), terms="var").format()
    assert "loss/var: got" in out and "ratio 1-3.0e-08" in out


def test_an_integer_mismatch_names_its_first_entry(golden, tmp_path):
    def spoil(name, a):
        a["inter/topk_idx"] = a["inter/topk_idx"].copy()
        a["inter/topk_idx"][6] = a["inter/topk_idx"][6, ::-1]             # token 6 is padding
        return a
    out = check_dump(golden, str(_dump(golden, tmp_path, ["padding"], spoil))).format()
    line = out.splitlines()[0]
    assert line.startswith("case padding: FAIL  inter/topk_idx: 2 of 16 entries differ, 2 on padding rows, "
                           "first at row 6 (padding) [6, 0]: got "), line
    assert "max abs" not in line


def test_a_tensor_shows_its_norm_ratio_only_when_far_from_one(golden, tmp_path, capsys):
    def spoil(name, a):
        a["grad/var/w_router"] = a["grad/var/w_router"] * 3
        a["inter/y"] = a["inter/y"] * (1 + 1e-6)
        return a
    dump = _dump(golden, tmp_path, ["base"], spoil)
    rows = {r.key: r for r in check_dump(golden, str(dump)).failures}
    assert rows["grad/var/w_router"].ratio == pytest.approx(3.0) and rows["inter/y"].ratio == pytest.approx(1.0)
    out = check_dump(golden, str(dump), terms=["var"]).format()
    assert "norm ratio 3.0000" in out
    out = check_dump(golden, str(dump), terms=["task"]).format()
    assert "inter/y" in out and "ratio" not in out


def test_entries_on_padding_rows_are_labelled(golden, tmp_path, capsys):
    """padding: tokens 3, 6, 7 are padding; conv_hf_mixtral ([L, N, E] tensors): tokens 2 and 7."""
    def spoil(name, a):
        if name == "padding":
            a["grad/aux/x"][6] += 1e-3                                     # a gradient leaking into padding
            a["grad/aux/x"][0, 0] += 1e-5
        else:
            a["grad/aux/logits"][:, 7] += 1e-3
        return a
    dump = _dump(golden, tmp_path, ["padding", "conv_hf_mixtral"], spoil)
    report = check_dump(golden, str(dump))
    pad = {r.case: r for r in report.failures}
    assert pad["padding"].key == "grad/aux/x" and (pad["padding"].n_bad, pad["padding"].n_bad_padding) == (7, 6)
    assert pad["conv_hf_mixtral"].padding and set(pad["conv_hf_mixtral"].padding) == {7}      # token axis 1
    code, out, _ = _cli(capsys, golden, dump)
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("case ")}
    assert "worst entry at row 6 (padding) [6, " in lines["case padding"]
    assert "7 entries off, 6 on padding rows" in lines["case padding"]
    assert "worst entry at row 7 (padding) [" in lines["case conv_hf_mixtral"]
    code, out, _ = _cli(capsys, golden, dump, "-v")
    assert "grad/aux/x[6, " in out and "(row 6 is padding)" in out and "(row 7 is padding)" in out


def test_a_dump_of_another_dtype_is_named_in_one_line(golden, tmp_path, capsys):
    def cast(name, a):
        return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in a.items()}
    dump = _dump(golden, tmp_path, ["base", "float32"], cast)
    code, out, _ = _cli(capsys, golden, dump)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 3, out                              # base's line, summary, verdict
    assert lines[0].startswith("case base: FAIL  dump is float32, case 'base' is float64: compare against "
                               "the float32 cases or cast")
    assert out.count("float32") == 2 and "case float32" not in out         # the float32 case passes
    report = check_dump(golden, str(dump), rtol=1e-6, atol=1e-7)          # a deliberate, looser check passes
    assert report.ok and report.notes == {"base": "dump is float32, case 'base' is float64: compare against "
                                                  "the float32 cases or cast"}


def test_float32_round_off_in_a_float64_case_says_so(golden, tmp_path, capsys):
    """HF and Megatron routers take the softmax in float32 whatever the input dtype (a float64 dump)."""
    def f32_softmax(name, a):
        z = a["input/logits"].astype(np.float32)
        p = np.exp(z - z.max(-1, keepdims=True))
        a["inter/scores"] = (p / p.sum(-1, keepdims=True)).astype(np.float64)
        return a
    dump = _dump(golden, tmp_path, ["conv_hf_mixtral"], f32_softmax)
    code, out, _ = _cli(capsys, golden, dump, "--terms", "aux")
    assert code == 1 and "is float32 round-off: HF and Megatron routers compute the softmax in float32" in out
    assert _cli(capsys, golden, dump, "--terms", "aux", "--rtol", "1e-6")[0] == 0


# ----------------------------------------------------------------------------------------------
# condensed output
# ----------------------------------------------------------------------------------------------

def test_a_failing_run_prints_a_line_per_failing_case(golden, tmp_path, capsys):
    names = sorted(load_manifest(golden)["cases"])
    dump = _dump(golden, tmp_path, names, lambda n, a: {k: v * 1.5 if v.dtype.kind == "f" else v
                                                        for k, v in a.items()})
    code, out, _ = _cli(capsys, golden, dump)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) <= len(names) + 5, out
    assert sum(line.startswith("case ") for line in lines) == len(names)
    assert lines[-2].startswith(f"{len(names)} case(s) checked: 0 passed, {len(names)} failed, 0 skipped")
    assert lines[-1].startswith("FAILED: first mismatch in case")
    code, verbose, _ = _cli(capsys, golden, dump, "--verbose")
    assert code == 1 and len(verbose.splitlines()) > 20 * len(names)     # every row of every case
    code, out, _ = _cli(capsys, golden, _dump(golden, tmp_path / "ok", names[:3]))
    assert code == 0 and out.strip().splitlines() == [
        f"3 case(s) checked: 3 passed, 0 failed, {len(names) - 3} skipped (no dump file: "
        + ", ".join(names[3:9]) + f" ... ({len(names) - 3} in all))", "OK"]
