"""The PyTorch example in examples/ reproduces every golden case; its deliberately broken modes are caught."""
import importlib.util
import os

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the oracle here: pip install refmoe[oracle]")

from refmoe.golden import check_dump, load_manifest  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "torch_reference.py")


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)                      # tiny tensors: threads only add overhead
    spec = importlib.util.spec_from_file_location("torch_reference", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_reference_passes_every_case(reference, golden, tmp_path):
    done = reference.run(golden, str(tmp_path))
    cases = {n: e for n, e in load_manifest(golden)["cases"].items() if reference.supports(e)}
    assert sorted(done) == sorted(cases)
    # the whole grid but the sys_<S> cases (other routers), the per-rank dist_* cases (a rank's share needs the
    # group's all-reduced counts) and the two megatron-core 0.16.1 conventions
    assert {n for n in load_manifest(golden)["cases"] if n not in cases} == (
        {n for n in load_manifest(golden)["cases"] if n.startswith(("sys_", "dist_"))}
        | {"conv_megatron_seq_valid_over_b", "conv_megatron_global_accumulated"})
    report = check_dump(golden, str(tmp_path), cases=sorted(cases), require_all=True)
    assert report.ok, report.format()
    f64 = [n for n, e in cases.items() if e["dtype"] == "float64"]
    assert check_dump(golden, str(tmp_path), cases=f64, rtol=1e-10, atol=1e-13).ok
    worst = max(r.used for r in report.results if r.case in f64)
    assert worst < 0.01                          # measured < 0.1% of atol + rtol max|want|, i.e. ~1e-14 relative


def test_double_softmax_is_caught_and_named(reference, golden, tmp_path):
    reference.run(golden, str(tmp_path), broken="double_softmax")
    report = check_dump(golden, str(tmp_path))
    assert not report.ok
    failed = {r.case for r in report.failures}
    assert "base" in failed and "k_all" not in failed                     # K = E: the loss is E for any P
    for case in failed:
        first = [r for r in report.failures if r.case == case][0]
        assert first.key == "loss/aux", case                              # nothing before L_aux differs
    assert "FAILED: first mismatch in case" in report.format() and "loss/aux" in report.format()


def test_counted_padding_is_caught_and_named(reference, golden, tmp_path):
    reference.run(golden, str(tmp_path), broken="count_padding")
    report = check_dump(golden, str(tmp_path))
    masked = {n for n, e in load_manifest(golden)["cases"].items()
              if e["padding_tokens"] and not e["regularisers_see_padding"] and reference.supports(e)}
    assert {"padding", "conv_hf_mixtral", "conv_megatron_seq"} <= masked
    assert {r.case for r in report.failures} == masked
    assert all(r.key.startswith(("loss/", "grad/")) for r in report.failures)
    assert report.failures[0].key == "loss/aux"
    assert "grad/aux/w_router" in {r.key for r in report.failures}
