"""refmoe info is a diagnostic: it reports a backend that cannot run here instead of raising, and exits 0;
a name that is not a backend is a one-line usage error with exit 2."""
import json
import sys
import types

import pytest

from refmoe import backend
from refmoe.cli import main
from refmoe.commands import info


class _NoCupy:
    """A finder that answers `import cupy` as an environment without CuPy does."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cupy":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def no_cupy(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "cupy"]:   # on a GPU machine it may be imported
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoCupy(), *sys.meta_path])
    monkeypatch.delenv("REFMOE_BACKEND", raising=False)


def fake_cupy(monkeypatch, get_device_count):
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="13.9.9", cuda=types.SimpleNamespace(
        runtime=runtime)))
    monkeypatch.delenv("REFMOE_BACKEND", raising=False)


def lines(capsys):
    out = capsys.readouterr().out.splitlines()
    assert all(len(line) <= info.WIDTH for line in out)
    return {line.split()[0]: line.split(None, 1)[1] for line in out}


def test_cupy_status_without_cupy(no_cupy):
    assert backend.cupy_status() == (False, "No module named 'cupy'")
    assert backend.cupy_available() is False


def test_cupy_requested_without_cupy_is_reported_not_raised(no_cupy, capsys):
    assert main(["info", "--backend", "cupy"]) == 0
    got = lines(capsys)
    assert got["backend"] == "cupy" and got["backend_source"] == "--backend"
    assert got["cupy"] == "not available (No module named 'cupy')"
    assert got["device"] == "none: CuPy is not available (No module named 'cupy'); " \
                            "pip install refmoe[cuda12] or refmoe[cuda13]"
    assert main(["info", "--json", "--backend", "cupy"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cupy_available"] is False and report["cupy"] == "not available (No module named 'cupy')"


def test_cupy_without_a_cuda_device(monkeypatch, capsys):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake_cupy(monkeypatch, no_device)
    assert backend.cupy_status() == (False, "no CUDA device: cudaErrorNoDevice: no CUDA-capable device is detected")
    monkeypatch.setenv("REFMOE_BACKEND", "cupy")
    assert main(["info"]) == 0
    got = lines(capsys)
    assert got["backend_source"] == "$REFMOE_BACKEND"
    assert got["cupy"] == "not available (no CUDA device: cudaErrorNoDevice: no CUDA-capable device is detected)"
    assert got["device"] == "none: CuPy is not available (no CUDA device: cudaErrorNoDevice: no CUDA-capable " \
                            "device is detected)"


def test_cupy_with_zero_devices(monkeypatch):
    fake_cupy(monkeypatch, lambda: 0)
    assert backend.cupy_status() == (False, "no CUDA device is visible")


def test_cupy_with_devices_reports_version_and_count(monkeypatch, capsys):
    fake_cupy(monkeypatch, lambda: 2)
    assert backend.cupy_status() == (True, "CuPy 13.9.9, 2 CUDA devices")
    assert main(["info"]) == 0                    # numpy backend: the device is the CPU
    got = lines(capsys)
    assert got["cupy"] == "CuPy 13.9.9, 2 CUDA devices" and got["device"].startswith("CPU (")


def test_long_reasons_are_cut_to_the_width(monkeypatch, capsys):
    def broken():
        raise RuntimeError("CUDA driver version is insufficient\nfor CUDA runtime version " + "x" * 300)

    fake_cupy(monkeypatch, broken)
    assert main(["info", "--backend", "cupy"]) == 0
    got = lines(capsys)                           # every line fits, and each value stays on its line
    assert got["device"].endswith("...") and "insufficient for CUDA" in got["device"]


def test_torch_is_reported_either_way(monkeypatch, capsys):
    monkeypatch.delenv("REFMOE_BACKEND", raising=False)
    assert main(["info"]) == 0
    torch_line = lines(capsys)["torch"]
    assert "oracle" in torch_line and (torch_line[0].isdigit() or torch_line.startswith("not installed"))


@pytest.mark.parametrize("argv, env, named", [
    (["info", "--backend", "foo"], None, "backend='foo'"),
    (["info"], "foo", "REFMOE_BACKEND='foo'"),
])
def test_unknown_backend_is_a_one_line_usage_error(argv, env, named, monkeypatch, capsys):
    if env:
        monkeypatch.setenv("REFMOE_BACKEND", env)
    else:
        monkeypatch.delenv("REFMOE_BACKEND", raising=False)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"refmoe info: error: {named} is not a backend; expected one of ('numpy', 'cupy')"]
