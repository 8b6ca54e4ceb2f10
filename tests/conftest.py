"""Shared fixtures. Every numerical test takes ``xp`` (numpy or cupy); CuPy cases skip where no GPU is usable.

``REFMOE_BACKEND=cupy python3 -m pytest tests`` runs both halves on a GPU machine; on a machine without one
the CuPy half is skipped with the reason printed by ``-ra``.
"""
import numpy as np
import pytest

from refmoe.backend import cupy_available

_CUPY = cupy_available()


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    if request.param == "cupy" and not _CUPY:
        pytest.skip("CuPy with a CUDA device is not available")
    return request.param


@pytest.fixture
def xp(backend):
    if backend == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(20251123)


@pytest.fixture
def cp():
    """CuPy itself, for tests that only make sense with a GPU (parity, mixing); skipped without one."""
    if not _CUPY:
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy

    return cupy


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """The default golden fixtures, written once per test session (tests copy before they tamper)."""
    from refmoe.golden import write_golden

    d = tmp_path_factory.mktemp("golden")
    write_golden(str(d))
    return str(d)


@pytest.fixture(scope="session")
def lemma_rows():
    """(verdicts, findings) of ``refmoe lemmas`` at seed 0, computed once per test session."""
    from refmoe.theory.verdicts import all_findings, all_verdicts

    return all_verdicts(0), all_findings(0)
