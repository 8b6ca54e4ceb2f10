"""Smoke test of benchmarks/bench_peers.py: its agreement check, on a tiny shape in float64 on NumPy.

The check is what makes the benchmark's numbers worth anything (a faster peer that computes something else is
worthless), so it is tested both ways: the PyTorch batched peer agrees with refmoe to 1e-10 on both presets,
and a peer with one coefficient changed is refused. Skips cleanly without torch; the JAX case without jax.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_peers  # noqa: E402
import peers_env  # noqa: E402


def _impls(names, preset_name, preset_changes=None):
    inp = peers_env.make_inputs("tiny", np.float64)
    preset = peers_env.presets()[preset_name]
    impls = {"refmoe": bench_peers.build("refmoe", "numpy", inp, preset)}
    peer_preset = preset._replace(**(preset_changes or {}))
    impls.update({n: bench_peers.build(n, "numpy", inp, peer_preset) for n in names})
    return impls


@pytest.mark.parametrize("preset_name", ["paper", "authors_code"])
def test_torch_batched_agrees_with_refmoe(preset_name):
    assert not peers_env.configure("numpy", ["torch_batched"], x64=False)
    table = bench_peers.agreement(_impls(["torch_batched", "torch_loop"], preset_name), "float64")
    for name in ("torch_batched", "torch_loop"):
        assert set(table[name]) >= {"y", "loss_aux", "loss_ortho", "loss_var", "dx", "dw_router", "dw_gate",
                                    "dw_up", "dw_down", "dshared_w_gate"}
        assert max(table[name].values()) < 1e-10


@pytest.mark.parametrize("change", [{"alpha": 0.0}, {"beta": 0.0}, {"gamma": 2e-3}])
def test_agreement_refuses_a_peer_that_computes_something_else(change):
    with pytest.raises(AssertionError, match="disagree"):
        bench_peers.agreement(_impls(["torch_batched"], "authors_code", change), "float64")


def test_torch_span_refuses_another_eps():
    with pytest.raises(ValueError, match="eps = 1e-6"):
        bench_peers.agreement(_impls(["torch_batched"], "authors_code", {"ortho_eps": 1e-3}), "float64")


def test_tiny_inputs_have_top_k_margins_and_capacity():
    inp = peers_env.make_inputs("tiny", np.float64)
    assert inp.min_gap >= 1e-3
    assert inp.capacity >= inp.x.shape[0] * inp.cfg.top_k / inp.cfg.n_experts


def test_jax_agrees_with_refmoe():
    pytest.importorskip("jax")
    assert not peers_env.configure("numpy", ["jax"], x64=True)
    table = bench_peers.agreement(_impls(["jax"], "authors_code"), "float64")
    assert max(table["jax"].values()) < 1e-10


@pytest.mark.parametrize("preset_name", ["paper", "authors_code"])
def test_refmoe_variants_agree_with_refmoe(preset_name):
    """The sorted layout (grouped products) and the graph replay (eager on NumPy) against the padded step."""
    table = bench_peers.agreement(_impls(["refmoe_sorted", "refmoe_graph"], preset_name), "float64")
    for name in ("refmoe_sorted", "refmoe_graph"):
        assert {"y", "dx", "dw_gate", "dw_down"} <= set(table[name]) and max(table[name].values()) < 1e-12
