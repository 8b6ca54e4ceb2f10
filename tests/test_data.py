"""Synthetic clustered data: structure, determinism, the narrow domain, and the task loss's gradient."""
import numpy as np
import pytest

from refmoe.study import data as D
from refmoe import gradcheck as gc
from refmoe.losses.task import mse_backward, mse_forward

from helpers import FD_TOL, host, on


def test_task_structure_and_determinism():
    t1 = D.make_task(np.random.default_rng(3), d_model=8, n_clusters=5, n_narrow=2, radius=3.0)
    t2 = D.make_task(np.random.default_rng(3), d_model=8, n_clusters=5, n_narrow=2, radius=3.0)
    assert np.array_equal(t1.centers, t2.centers) and np.array_equal(t1.teacher_out, t2.teacher_out)
    assert t1.centers.shape == (5, 8) and t1.teacher_in.shape == (5, 8, 16)
    assert np.allclose(np.linalg.norm(t1.centers, axis=1), 3.0)


def test_sample_domains_labels_and_teacher(backend):
    task = D.make_task(np.random.default_rng(0), d_model=6, n_clusters=4, n_narrow=2, noise=0.1)
    b = D.sample(task, np.random.default_rng(1), 400, domain="narrow", backend=backend)
    cl = host(b.cluster)
    assert set(cl.tolist()) == {0, 1}                     # only the narrow clusters
    broad = D.sample(task, np.random.default_rng(1), 400, domain="broad", backend=backend)
    assert set(host(broad.cluster).tolist()) == {0, 1, 2, 3}
    x, t = host(b.x), host(b.target)
    # tokens lie near their own centre (noise sd 0.1 in 6 dims: distance ~0.25, centres 3 apart at least ~1)
    d = np.linalg.norm(x[:, None, :] - task.centers[None], axis=2)
    assert (d.argmin(axis=1) == cl).mean() == 1.0
    # the target of token 0 written out by hand
    i, m = 0, cl[0]
    expect = x[i] + np.tanh(x[i] @ task.shared_in) @ task.shared_out + np.tanh(x[i] @ task.teacher_in[m]) @ task.teacher_out[m]
    assert np.allclose(t[i], expect, atol=1e-12)


def test_sample_dtype_and_errors():
    task = D.make_task(np.random.default_rng(0), d_model=4, n_clusters=3, n_narrow=1)
    b = D.sample(task, np.random.default_rng(0), 5, backend="numpy", dtype=np.float32)
    assert b.x.dtype == np.float32 and b.target.dtype == np.float32 and b.cluster.dtype == np.int64
    with pytest.raises(ValueError, match="domain"):
        D.sample(task, np.random.default_rng(0), 5, domain="wide", backend="numpy")
    with pytest.raises(ValueError, match="n_narrow"):
        D.make_task(np.random.default_rng(0), n_clusters=2, n_narrow=3)
    with pytest.raises(TypeError, match="Generator"):
        D.sample(task, 0, 5, backend="numpy")


def test_mse_value_and_gradient(xp, rng):
    out, tgt = on(xp, rng.standard_normal((5, 3))), on(xp, rng.standard_normal((5, 3)))
    loss, r = mse_forward(out, tgt)
    assert float(loss) == pytest.approx(float(((host(out) - host(tgt)) ** 2).mean()), rel=1e-14)
    d_out = mse_backward(1.0, r)
    errs = gc.check_vjp(lambda p: mse_forward(p["out"], tgt)[0], {"out": out}, {"out": d_out})
    assert errs["out"] < FD_TOL      # measured ~1e-10; pass mark 1e-7
