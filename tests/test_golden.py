"""Golden fixtures: format, determinism, tamper detection, the checker's verdicts, and the numbers themselves."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import refmoe
from refmoe.cli import main
from refmoe.golden import (GoldenFormatError, check_dump, compute_case, default_cases, load_case, load_manifest,
                           load_npz, save_npz, select, write_golden)
from refmoe.golden.cases import evaluate, make_inputs
from refmoe.gradcheck import directional_check
from helpers import softmax_rows


def _copy_dump(golden, tmp_path, cases=None):
    dump = tmp_path / "dump"
    dump.mkdir()
    for name in cases or load_manifest(golden)["cases"]:
        shutil.copy(os.path.join(golden, f"{name}.npz"), dump / f"{name}.npz")
    return dump


def _rewrite(path, arrays):
    """Rewrite a fixture file and re-sign it in the manifest (a consistent but wrong fixture)."""
    digest = save_npz(path, arrays)
    mpath = os.path.join(os.path.dirname(path), "manifest.json")
    m = json.load(open(mpath))
    m["cases"][os.path.basename(path)[:-4]]["sha256"] = digest
    json.dump(m, open(mpath, "w"))


# ----------------------------------------------------------------------------------------------
# the grid and the manifest
# ----------------------------------------------------------------------------------------------

def test_grid_covers_the_required_axes():
    cases = default_cases()
    names = {c.name for c in cases}
    assert len(names) == len(cases)
    assert {c.aux for c in cases} >= set(refmoe.golden.AUX_FORMS)
    assert {"float32", "float64"} == {c.dtype for c in cases}
    assert any(c.n_shared for c in cases) and any(not c.norm_topk_prob for c in cases)
    assert any(c.top_k == 1 for c in cases) and any(c.top_k == c.n_experts for c in cases)
    assert any(c.n_tokens == 1 for c in cases) and any(c.padding for c in cases) and any(c.ties for c in cases)
    with pytest.raises(ValueError, match="unknown case"):
        select(["nope"])


def test_manifest_fields_and_checksums(golden):
    m = load_manifest(golden)
    assert m["schema_version"] == 2 and m["refmoe_version"] == refmoe.__version__
    assert "lower expert index wins" in m["tie_rule"]
    assert m["tolerances"]["float64"]["rtol"] == 1e-10
    for name, e in m["cases"].items():
        data = open(os.path.join(golden, e["file"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == e["sha256"]
        if e["kind"] == "aux_layers":
            assert set(e["config"]) == {"n_experts", "top_k", "n_layers"} and e["terms"] == ["aux"]
            assert e["keys"]["grad/aux/logits"]["shape"] == e["keys"]["input/logits"]["shape"]
            continue
        if e["system"] is not None:                     # sys_<S>: checked in test_golden_systems.py
            continue
        assert set(e["config"]) == {"d_model", "d_hidden", "n_experts", "top_k", "n_shared", "norm_topk_prob"}
        assert set(e["coefficients"]) == {"alpha", "beta", "gamma"} and e["variants"]["aux"]
        assert e["keys"]["input/x"]["dtype"] == e["dtype"] and e["keys"]["inter/topk_idx"]["dtype"] == "int64"
        for term in e["terms"]:
            assert f"grad/{term}/x" in e["keys"] and f"grad/{term}/w_router" in e["keys"]


def test_regeneration_is_bit_identical(golden, tmp_path):
    again = tmp_path / "again"
    write_golden(str(again))
    for f in sorted(os.listdir(golden)):
        assert open(os.path.join(golden, f), "rb").read() == open(again / f, "rb").read(), f


def test_files_load_without_pickle(golden):
    with np.load(os.path.join(golden, "base.npz"), allow_pickle=False) as z:
        assert "grad/total/w_router" in z.files and z["loss/total"].shape == ()


# ----------------------------------------------------------------------------------------------
# what the fixtures contain
# ----------------------------------------------------------------------------------------------

def test_intermediates_and_totals_are_consistent(golden):
    m = load_manifest(golden)
    for name, e in m["cases"].items():
        if e["kind"] != "layer" or e["system"] is not None:      # sys_<S>: test_golden_systems.py
            continue
        a = load_case(golden, name, m)
        tol = 1e-12 if e["dtype"] == "float64" else 1e-5
        np.testing.assert_allclose(a["inter/logits"], a["input/x"] @ a["param/w_router"].T, rtol=tol, atol=tol)
        np.testing.assert_allclose(a["inter/scores"], softmax_rows(a["inter/logits"].astype(np.float64)),
                                   rtol=tol, atol=tol)
        c = e["coefficients"]
        coef = {"task": 1.0, "aux": c["alpha"], "ortho": c["beta"], "var": c["gamma"]}
        terms = [t for t in e["terms"] if t != "total"]
        total = sum(coef[t] * float(a[f"loss/{t}"]) for t in terms)
        assert float(a["loss/total"]) == pytest.approx(total, rel=tol, abs=tol)
        for p in [k.split("/")[-1] for k in a if k.startswith("grad/total/")]:
            summed = sum(a[f"grad/{t}/{p}"].astype(np.float64) for t in terms)     # contributions, weighted
            scale = np.abs(summed).max() + 1e-30
            assert np.abs(a[f"grad/total/{p}"] - summed).max() <= 10 * tol * scale, (name, p)


def test_tie_rule_in_the_tie_cases(golden):
    for name in ("ties", "float32_ties"):
        a = load_case(golden, name)
        s, idx = a["inter/scores"], a["inter/topk_idx"]
        assert np.all(s[0] == s[0, 0]) and idx[0].tolist() == [0, 1]         # all equal: lowest indices
        assert np.array_equal(s[:, 1], s[:, 2])                              # experts 1 and 2 always tie
        straddle = (idx == 1).any(axis=1) & ~(idx == 2).any(axis=1)
        assert straddle[1:].any()                                            # the rule decided a selection
        assert not ((idx == 2).any(axis=1) & ~(idx == 1).any(axis=1)).any()  # 2 never wins over 1


def test_padding_rows_get_no_regulariser_gradient(golden):
    a = load_case(golden, "padding")
    pad = ~a["input/valid_mask"]
    assert pad.sum() == 3
    for term in [k.split("/")[1] for k in a if k.startswith("loss/")]:
        if term != "total":
            assert np.all(a[f"grad/{term}/x"][pad] == 0), term


def test_total_gradient_by_central_differences(rng):
    """A float64 directional check of the stored total gradient (inputs and routing weights)."""
    for spec in select(["base", "padding", "shared"]):
        x, params, dy, valid = make_inputs(spec)
        out = evaluate(spec, x, params, dy, valid)
        inputs = {"x": x, **params}
        grads = {k: out[f"grad/total/{k}"] for k in inputs}
        f = lambda inp: evaluate(spec, inp["x"], {k: inp[k] for k in params}, dy, valid)["loss/total"]
        guard = lambda inp: refmoe.moe_forward(inp["x"], {k: inp[k] for k in params}, spec.config())[1].topk_idx
        err = directional_check(f, inputs, grads, rng, guard=guard)
        assert err < 1e-7, (spec.name, err)                      # measured ~1e-10; pass mark 1e-7


def test_convention_cases(golden):
    """Multi-layer conventions: the stored gradient w.r.t. the logits by central differences, the
    global-batch pieces, and the HF concatenation."""
    from refmoe import ops
    from refmoe.gradcheck import check_vjp
    from refmoe.losses import aux_conventions as conv

    m = load_manifest(golden)
    for name in ("conv_hf_mixtral", "conv_megatron_seq", "conv_megatron_global"):
        e = m["cases"][name]
        a = load_case(golden, name, m)
        idx, mask = a["inter/topk_idx"], a["input/valid_mask"]
        mask = None if mask.all() else mask

        def loss(inp):
            layers = [(ops.softmax_forward(z)[0], i) for z, i in zip(inp["logits"], idx)]
            if e["variants"]["aux"] == "hf_mixtral":
                return conv.hf_mixtral_forward(layers, valid_mask=mask)[0]
            if e["variants"]["aux"] == "megatron_seq":
                return conv.megatron_forward(layers, "seq", valid_mask=mask, batch_shape=e["batch_shape"])[0]
            return conv.megatron_forward(layers, "global", valid_mask=mask)[0]

        assert float(loss({"logits": a["input/logits"]})) == pytest.approx(float(a["loss/aux"]), rel=1e-13)
        errs = check_vjp(loss, {"logits": a["input/logits"]}, {"logits": a["grad/aux/logits"]})
        assert errs["logits"] < 1e-7, (name, errs)               # measured ~1e-9; pass mark 1e-7
    a = load_case(golden, "conv_megatron_global", m)
    assert a["loss/aux_pieces"].shape == (2,)
    assert a["loss/aux_pieces"].sum() == pytest.approx(float(a["loss/aux"]), rel=1e-14)


def test_megatron_core_convention_cases(golden):
    """conv_megatron_seq_valid_over_b and conv_megatron_global_accumulated: values recomputed by hand from the
    logits (megatron-core 0.16.1's arithmetic, docs/spec.md 6.4) and the stored gradients by central differences."""
    from refmoe.gradcheck import check_vjp
    from refmoe.losses import aux_conventions as conv

    m = load_manifest(golden)
    e = m["cases"]["conv_megatron_seq_valid_over_b"]
    a = load_case(golden, "conv_megatron_seq_valid_over_b", m)
    (B, T), K, E = e["batch_shape"], e["config"]["top_k"], e["config"]["n_experts"]
    v = a["input/valid_mask"].astype(float)
    assert v.reshape(T, B).sum(0).tolist() == [4.0, 2.0]                 # uneven sequences, T-bar = 3
    want = 0.0
    for s, idx in zip(softmax_rows(a["input/logits"].reshape(-1, E)).reshape(a["input/logits"].shape),
                      a["inter/topk_idx"]):
        r = np.zeros_like(s); np.put_along_axis(r, idx, 1.0, axis=1)
        c = (v[:, None] * r).reshape(T, B, E).sum(0)
        S = (v[:, None] * s).reshape(T, B, E).sum(0)
        want += (E / (K * 3.0 ** 2) * c * S).sum() / B
    assert float(a["loss/aux"]) == pytest.approx(want, rel=1e-13)

    def seq(inp):
        layers = [(softmax_rows(z), i) for z, i in zip(inp["logits"], a["inter/topk_idx"])]
        return conv.megatron_forward(layers, "seq_valid_over_b", valid_mask=a["input/valid_mask"],
                                     batch_shape=(B, T))[0]

    errs = check_vjp(seq, {"logits": a["input/logits"]}, {"logits": a["grad/aux/logits"]})
    assert errs["logits"] < 1e-7, errs                                  # pass mark 1e-7

    a = load_case(golden, "conv_megatron_global_accumulated", m)
    mb, valid = a["input/micro_batch"], a["input/valid_mask"]
    parts = [np.nonzero(mb == k)[0] for k in range(mb.max() + 1)]
    assert [len(p) for p in parts] == [3, 5] and not valid[6]

    def pieces(inp):
        micro = [[(softmax_rows(z[p]), i[p]) for z, i in zip(inp["logits"], a["inter/topk_idx"])] for p in parts]
        return [loss for loss, _ in conv.megatron_global_accumulated_forward(micro, [valid[p] for p in parts])]

    got = pieces({"logits": a["input/logits"]})
    np.testing.assert_allclose(got, a["loss/aux_pieces"], rtol=1e-13)
    assert a["loss/aux_pieces"].sum() == pytest.approx(float(a["loss/aux"]), rel=1e-14)
    errs = check_vjp(lambda inp: sum(pieces(inp)), {"logits": a["input/logits"]}, {"logits": a["grad/aux/logits"]})
    assert errs["logits"] < 1e-7, errs


# ----------------------------------------------------------------------------------------------
# bad or tampered fixtures
# ----------------------------------------------------------------------------------------------

def test_checksum_mismatch_is_reported(golden, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(golden, bad)
    data = bytearray(open(bad / "base.npz", "rb").read())
    data[-200] ^= 1
    open(bad / "base.npz", "wb").write(bytes(data))
    with pytest.raises(GoldenFormatError, match="sha256"):
        load_case(str(bad), "base")
    with pytest.raises(GoldenFormatError, match="sha256"):
        check_dump(str(bad), golden)
    assert main(["golden", "check", str(bad), golden]) == 2


def test_missing_key_and_wrong_shape_in_a_fixture(golden, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(golden, bad)
    arrays = load_npz(str(bad / "base.npz"))
    del arrays["grad/aux/w_router"]
    _rewrite(str(bad / "base.npz"), arrays)
    with pytest.raises(GoldenFormatError, match="missing keys grad/aux/w_router"):
        load_case(str(bad), "base")
    arrays = load_npz(str(bad / "k1.npz"))
    arrays["inter/scores"] = arrays["inter/scores"][:, :3]
    _rewrite(str(bad / "k1.npz"), arrays)
    with pytest.raises(GoldenFormatError, match=r"inter/scores has shape \(8, 3\), expected \(8, 4\)"):
        load_case(str(bad), "k1")


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "evil.npz")
    np.savez(path, ok=np.zeros(2), evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(GoldenFormatError, match="pickled"):
        load_npz(path)
    with pytest.raises(GoldenFormatError, match="dtype object"):
        save_npz(str(tmp_path / "x.npz"), {"evil": np.array([None], dtype=object)})


def test_bad_directories(golden, tmp_path):
    with pytest.raises(GoldenFormatError, match="no manifest.json"):
        load_manifest(str(tmp_path))
    bad = tmp_path / "v2"
    shutil.copytree(golden, bad)
    m = json.load(open(bad / "manifest.json"))
    m["schema_version"] = 1
    json.dump(m, open(bad / "manifest.json", "w"))
    with pytest.raises(GoldenFormatError, match="schema_version 1"):
        load_manifest(str(bad))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(GoldenFormatError, match="not a readable .npz"):
        load_npz(str(tmp_path / "junk.npz"))
    with pytest.raises(GoldenFormatError, match="dump directory not found"):
        check_dump(golden, str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------
# the checker's verdicts
# ----------------------------------------------------------------------------------------------

def test_round_trip_passes_and_cli_exit_codes(golden, tmp_path, capsys):
    report = check_dump(golden, golden)
    assert report.ok and len(report.checked) == len(default_cases()) and not report.skipped
    assert main(["golden", "check", golden, golden, "-v"]) == 0
    out = capsys.readouterr().out
    assert "max abs" in out and "max rel" in out and out.strip().endswith("OK")
    d = tmp_path / "cli"
    assert main(["golden", "write", str(d), "--case", "k1"]) == 0
    assert sorted(os.listdir(d)) == ["k1.npz", "manifest.json"]
    assert main(["golden", "write", str(d), "--case", "nope"]) == 2
    assert "unknown case" in capsys.readouterr().err
    assert main(["golden"]) == 2
    assert main(["golden", "list"]) == 0 and "ties" in capsys.readouterr().out


def test_a_small_error_fails_and_is_named(golden, tmp_path, capsys):
    dump = _copy_dump(golden, tmp_path, ["base", "float32"])
    a = load_npz(str(dump / "base.npz"))
    a["grad/aux/w_router"] = a["grad/aux/w_router"] * (1 + 1e-7)
    save_npz(str(dump / "base.npz"), a)
    report = check_dump(golden, str(dump))
    assert not report.ok and [r.key for r in report.failures] == ["grad/aux/w_router"]
    assert report.failures[0].mismatches and len(report.skipped) == len(default_cases()) - 2
    assert main(["golden", "check", golden, str(dump)]) == 1
    out = capsys.readouterr().out
    assert "grad/aux/w_router" in out and "FAIL" in out and "got" in out and "want" in out
    # round-off of 1e-13 relative passes in float64; 1e-6 passes in float32
    a["grad/aux/w_router"] = load_npz(os.path.join(golden, "base.npz"))["grad/aux/w_router"] * (1 + 1e-13)
    save_npz(str(dump / "base.npz"), a)
    b = load_npz(str(dump / "float32.npz"))
    b["grad/total/w_gate"] = (b["grad/total/w_gate"] * np.float32(1 + 1e-6)).astype(np.float32)
    save_npz(str(dump / "float32.npz"), b)
    assert check_dump(golden, str(dump)).ok
    assert not check_dump(golden, str(dump), require_all=True).ok


def test_dump_defects_each_fail(golden, tmp_path):
    dump = _copy_dump(golden, tmp_path, ["ties"])
    base = load_npz(str(dump / "ties.npz"))
    defects = {
        "inter/topk_idx": lambda a: a.__setitem__("inter/topk_idx", a["inter/topk_idx"][:, ::-1].copy()),
        "loss/aux": lambda a: a.pop("loss/aux"),
        "inter/gates": lambda a: a.__setitem__("inter/gates", a["inter/gates"].T.copy()),
        "inter/y": lambda a: a["inter/y"].__setitem__((0, 0), np.nan),
    }
    for key, spoil in defects.items():
        a = {k: v.copy() for k, v in base.items()}
        spoil(a)
        save_npz(str(dump / "ties.npz"), a)
        report = check_dump(golden, str(dump))
        assert [r.key for r in report.failures] == [key], key
    np.savez(str(dump / "ties.npz"), **base, evil=np.array([object()], dtype=object))
    with pytest.raises(GoldenFormatError, match="pickled"):
        check_dump(golden, str(dump))


def test_counted_padding_is_caught(golden, tmp_path):
    """Padding counted in the regularisers (a shipped bug) fails the check on the padding case."""
    dump = tmp_path / "dump"
    dump.mkdir()
    spec = select(["padding"])[0]
    good = compute_case(spec)
    counted = compute_case(spec.replace(mask_in_losses=False))
    save_npz(str(dump / "padding.npz"), counted)
    bad = {r.key for r in check_dump(golden, str(dump)).failures}
    assert "loss/aux" in bad and "grad/aux/w_router" in bad and "inter/scores" not in bad
    assert np.array_equal(good["inter/scores"], counted["inter/scores"])


def test_cupy_fixtures_match_numpy_within_tolerance(backend, golden, tmp_path):
    if backend == "numpy":
        pytest.skip("compares the CuPy backend with NumPy")
    d = tmp_path / "gpu"
    write_golden(str(d), backend="cupy")
    report = check_dump(golden, str(d))
    assert report.ok, report.format()


def test_layer_cases_agree_with_the_objective(golden):
    """Every layer case whose forms the Objective knows: values and gradients of objective_forward_backward
    (per-term gradients are contributions to the total in both) equal the fixture's. The per-rank cases are
    shares of a global batch (tests/test_golden_dist.py)."""
    objective = pytest.importorskip("refmoe.objective")
    m = load_manifest(golden)
    checked = 0
    for name, e in m["cases"].items():
        v = e["variants"]
        if e["kind"] != "layer" or v["aux"] not in objective.OBJECTIVE_AUX_FORMS or None in v.values() \
                or "world_size" in e:
            continue
        a = load_case(golden, name, m)
        c = e["config"]
        cfg = refmoe.MoEConfig(c["d_model"], c["d_hidden"], c["n_experts"], c["top_k"], c["n_shared"],
                               c["norm_topk_prob"])
        k = e["coefficients"]
        obj = objective.Objective(
            aux_variant=v["aux"], ortho_variant="span" if v["ortho"] == "span_code_grouping" else v["ortho"],
            ortho_released_grouping=v["ortho"] == "span_code_grouping", var_variant=v["var"],
            alpha=k["alpha"], beta=k["beta"], gamma=k["gamma"], ortho_eps=e["ortho_eps"],
            padding="include" if e["regularisers_see_padding"] else "exclude")
        params = {p[len("param/"):]: a[p] for p in a if p.startswith("param/")}
        mask = a["input/valid_mask"] if e["padding_tokens"] else None
        res = objective.objective_forward_backward(a["input/x"], params, cfg, a["input/dy"], obj,
                                                   task_loss=a["loss/task"], valid_mask=mask,
                                                   batch_shape=e["batch_shape"])
        tol = 1e-12 if e["dtype"] == "float64" else 1e-5
        for term in ("aux", "ortho", "var", "total"):
            assert float(res.losses[term]) == pytest.approx(float(a[f"loss/{term}"]), rel=tol, abs=tol), (name, term)
        for term in ("task", "aux", "ortho", "var", "total"):
            for p, g in res.grads[term].items():
                # one composition (objective.compose_backward) wrote both: the same numbers, bit for bit
                assert np.array_equal(g, a[f"grad/{term}/{p}"]), (name, term, p)
        checked += 1
    assert checked >= 10
