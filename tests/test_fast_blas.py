"""``refmoe.fast.blas.matmul`` against ``xp.matmul`` on every operand layout it reads in place or copies, and
(CuPy) inside a captured CUDA graph.  float64: 1e-13 relative (measured ~1e-16); float32: 1e-6 (~2e-7)."""
import numpy as np
import pytest

from refmoe.fast import blas
from refmoe.gradcheck import rel_error

from helpers import host, on

TOL = {np.float64: 1e-13, np.float32: 1e-6}


def _rand(xp, rng, shape, dtype):
    return on(xp, rng.standard_normal(shape).astype(dtype))


def _layouts(xp, rng, dtype):
    """(name, a, b) pairs: C- and F-ordered (transposed views), broadcast 2-D, sliced, degenerate."""
    B, M, P, Q = 3, 7, 5, 4
    a, b = _rand(xp, rng, (B, M, P), dtype), _rand(xp, rng, (B, P, Q), dtype)
    at = _rand(xp, rng, (B, P, M), dtype).swapaxes(1, 2)                   # F-ordered last two axes
    bt = _rand(xp, rng, (B, Q, P), dtype).swapaxes(1, 2)
    wide = _rand(xp, rng, (B, M, 2 * P), dtype)
    yield "C @ C", a, b
    yield "F @ C", at, b
    yield "C @ F", a, bt
    yield "F @ F", at, bt
    yield "3-D @ 2-D", a, b[0]
    yield "2-D @ 3-D", a[0], b
    yield "2-D @ 2-D.T", a[0], bt[1]
    yield "column slice (ld > P)", wide[:, :, :P], b
    yield "step slice (copied)", wide[:, :, ::2], b
    yield "batch of one", a[:1], b[:1]
    yield "matrix-vector", a, _rand(xp, rng, (B, P), dtype)[:, :, None]
    yield "single row", a[:, :1], b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_equals_xp_matmul(xp, rng, dtype):
    for name, a, b in _layouts(xp, rng, dtype):
        want = host(a) @ host(b)
        got = blas.matmul(xp, a, b)
        assert got.shape == want.shape and got.dtype == dtype, name
        assert rel_error(host(got), want) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_out_and_accumulate(xp, rng, dtype):
    a, b = _rand(xp, rng, (4, 6, 5), dtype), _rand(xp, rng, (4, 5, 3), dtype)
    base = _rand(xp, rng, (4, 6, 3), dtype)
    out = base.copy()
    assert blas.matmul(xp, a, b, out=out) is out
    assert rel_error(host(out), host(a) @ host(b)) < TOL[dtype]
    out = base.copy()
    blas.matmul(xp, a, b.swapaxes(1, 2).copy().swapaxes(1, 2), out=out, accumulate=True)
    assert rel_error(host(out), host(base) + host(a) @ host(b)) < TOL[dtype]
    empty = blas.matmul(xp, a[:, :, :0], b[:, :0, :])                      # P = 0: zeros
    assert float(abs(host(empty)).max()) == 0.0 and empty.shape == (4, 6, 3)
    assert blas.matmul(xp, a[:0], b[0]).shape == (0, 6, 3)                  # an empty batch, as NumPy


def test_matmul_refuses_what_does_not_chain(xp, rng):
    a = _rand(xp, rng, (2, 3, 4), np.float64)
    with pytest.raises(ValueError, match="do not chain"):
        blas.matmul(xp, a, a)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        blas.matmul(xp, a, a.swapaxes(1, 2), accumulate=True)
    if xp is not np:                                                      # the cuBLAS path checks out itself
        with pytest.raises(ValueError, match="out must be"):
            blas.matmul(xp, a, a.swapaxes(1, 2), out=xp.empty((2, 3, 4)))
        with pytest.raises(ValueError, match="batch sizes"):
            blas.matmul(xp, a, _rand(xp, rng, (3, 4, 2), np.float64))


def test_matmul_is_captured_in_a_cuda_graph(xp, rng):
    """The reason the module exists: a graph with products in it, replayed on new inputs, gives their values."""
    if xp is np:
        pytest.skip("CUDA graphs need CuPy")
    import cupy
    assert blas.mode() == "cublas", blas.mode()
    a, b = _rand(xp, rng, (8, 64, 32), np.float32), _rand(xp, rng, (32, 16), np.float32)
    stream, pool = cupy.cuda.Stream(non_blocking=True), cupy.cuda.MemoryPool()
    with stream:
        blas.matmul(xp, a, b)                                              # the handle of this stream
        stream.synchronize()
        with cupy.cuda.using_allocator(pool.malloc):                       # the graph's blocks stay its own
            stream.begin_capture()
            out = blas.matmul(xp, xp.tanh(a), b)
            blas.matmul(xp, a, b, out=out, accumulate=True)
            graph = stream.end_capture()
    for scale in (1.0, -2.0):
        a *= scale
        graph.launch(stream=stream)
        stream.synchronize()
        want = np.tanh(host(a)) @ host(b) + host(a) @ host(b)
        assert rel_error(host(out), want) < TOL[np.float32]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_matmul_equals_one_product_per_group(xp, rng, dtype):
    """The experts' own rows (sizes 0 to 9, one group empty), forward-style, transposed (a weight gradient),
    and accumulated."""
    sizes = [3, 0, 9, 1, 5]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    R, D, H, E = int(starts[-1]), 6, 4, len(sizes)
    rows, w = _rand(xp, rng, (R, D), dtype), _rand(xp, rng, (E, H, D), dtype)
    out = xp.full((R, H), np.nan, dtype=dtype)
    blas.grouped_matmul(xp, [(rows[lo:hi], w[e].T, out[lo:hi]) for e, (lo, hi) in
                             enumerate(zip(starts[:-1], starts[1:])) if lo < hi])
    want = np.concatenate([host(rows)[lo:hi] @ host(w)[e].T for e, (lo, hi) in
                           enumerate(zip(starts[:-1], starts[1:]))])
    assert rel_error(host(out), want) < TOL[dtype]
    base = _rand(xp, rng, (R, H), dtype)
    acc = base.copy()
    blas.grouped_matmul(xp, [(rows[lo:hi], w[e].T, acc[lo:hi]) for e, (lo, hi) in
                             enumerate(zip(starts[:-1], starts[1:])) if lo < hi], accumulate=True)
    assert rel_error(host(acc), host(base) + want) < TOL[dtype]
    dw = xp.full((E, D, H), np.nan, dtype=dtype)                             # x^T da per expert; empty: 0
    blas.grouped_matmul(xp, [(rows[lo:hi].T, out[lo:hi], dw[e]) for e, (lo, hi) in
                             enumerate(zip(starts[:-1], starts[1:]))])
    for e, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        want_e = host(rows)[lo:hi].T @ host(out)[lo:hi]
        assert rel_error(host(dw[e]), want_e) < TOL[dtype] if hi > lo else not host(dw[e]).any()
    with pytest.raises(ValueError, match="does not chain"):
        blas.grouped_matmul(xp, [(rows[:3], w[0], out[:3])])


def test_mode_says_which_path_the_products_take(xp):
    m = blas.mode()                                                        # never raises, CuPy or not
    assert m == "cublas" or m.startswith("cupy.matmul ("), m
    if xp is not np:
        assert m == "cublas"
