"""Backend switch, explicit transfers, config validation and the `refmoe info` command."""
import json

import numpy as np
import pytest

import refmoe
from refmoe import MoEConfig
from refmoe.backend import BackendUnavailableError, array_namespace, backend_name, get_xp, to_backend, to_numpy
from refmoe.cli import main


def test_backend_name_resolution(monkeypatch):
    monkeypatch.delenv("REFMOE_BACKEND", raising=False)
    assert backend_name() == "numpy"
    monkeypatch.setenv("REFMOE_BACKEND", "CuPy")
    assert backend_name() == "cupy"
    assert backend_name("numpy") == "numpy"  # an explicit name beats the environment
    monkeypatch.setenv("REFMOE_BACKEND", "jax")
    with pytest.raises(ValueError, match="REFMOE_BACKEND='jax' is not a backend"):
        backend_name()
    with pytest.raises(ValueError, match="backend='torch' is not a backend"):
        backend_name("torch")


def test_cupy_unavailable_is_a_clear_error():
    if refmoe.cupy_available():
        pytest.skip("CuPy is usable here")
    with pytest.raises(BackendUnavailableError, match="backend 'cupy' was requested"):
        get_xp("cupy")
    with pytest.raises(BackendUnavailableError):
        refmoe.init_params(MoEConfig(2, 2, 2, 1), 0, backend="cupy")


def test_array_namespace():
    a = np.zeros(2)
    assert array_namespace(a, None, a) is np
    with pytest.raises(TypeError, match="got builtins.list"):
        array_namespace(a, [1.0, 2.0])


def test_mixed_namespace_raises(cp):
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        array_namespace(np.zeros(2), cp.zeros(2))
    assert array_namespace(cp.zeros(2)) is cp


def test_transfers_are_explicit(backend):
    a = np.arange(3.0)
    moved = to_backend(a, backend)
    assert array_namespace(moved) is get_xp(backend)
    np.testing.assert_array_equal(to_numpy(moved), a)
    with pytest.raises(TypeError):
        to_numpy([1, 2])


@pytest.mark.parametrize("kw, error, match", [
    (dict(top_k=9), ValueError, "top_k=9 exceeds n_experts=8"),
    (dict(top_k=0), ValueError, "top_k=0 must be positive"),
    (dict(d_model=-1), ValueError, "d_model=-1 must be positive"),
    (dict(n_shared=-1), ValueError, "n_shared=-1"),
    (dict(d_hidden=2.5), TypeError, "d_hidden must be an int"),
    (dict(norm_topk_prob=1), TypeError, "norm_topk_prob must be a bool"),
])
def test_config_validation(kw, error, match):
    base = dict(d_model=4, d_hidden=3, n_experts=8, top_k=2)
    with pytest.raises(error, match=match):
        MoEConfig(**{**base, **kw})


def test_config_is_frozen():
    cfg = MoEConfig(4, 3, 8, 2, n_shared=2)
    assert cfg.d_shared == 6
    with pytest.raises(Exception):
        cfg.top_k = 3


def test_info_command(capsys, monkeypatch):
    monkeypatch.delenv("REFMOE_BACKEND", raising=False)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refmoe"] == refmoe.__version__
    assert info["backend"] == "numpy" and info["backend_source"] == "default"
    assert "float64" in info["dtype_policy"]
    assert main(["info"]) == 0
    assert "backend" in capsys.readouterr().out
