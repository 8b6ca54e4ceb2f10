"""The CUDA source of the span kernels (``refmoe.fast.kernels._SPAN_SOURCE``) compiled as C++ for the CPU, one
std::thread per CUDA thread of a block, ``__syncthreads`` a barrier and ``__shfl_xor_sync`` an exchange through
a buffer, then compared with the core's span L_o: the kernels' logic (indexing, reductions, the replayed forward
and the reverse Gram-Schmidt) is checked on a machine without a GPU. Skipped without g++ (C++20).
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from refmoe.fast import kernels as kn
from refmoe.gradcheck import rel_error
from refmoe.losses.ortho_span import span_backward, span_per_token

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not available")

HARNESS = r"""
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using std::sqrt;
struct dim3_ { int x = 0, y = 0, z = 0; };
thread_local dim3_ threadIdx, blockIdx;
static std::barrier<>* bar = nullptr;
static double xchg[1024];
inline void __syncthreads() { bar->arrive_and_wait(); }
template <class V> V __shfl_xor_sync(unsigned, V v, int off) {
    xchg[threadIdx.x] = (double)v; bar->arrive_and_wait();
    V r = (V)xchg[threadIdx.x ^ off]; bar->arrive_and_wait();
    return r;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
"""

DRIVER = r"""
extern "C" void emu_forward(const T* A, T* out, int N, int D, T eps) {
    for (int n = 0; n < N; ++n) {
        std::barrier<> b(BS); bar = &b;
        std::vector<std::thread> ts;
        for (int t = 0; t < BS; ++t) ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = n;
                                                             span_forward(A, out, N, D, eps); });
        for (auto& th : ts) th.join();
    }
}
extern "C" void emu_backward(const T* A, const T* g, T* out, T* dA, int N, int D, T eps) {
    for (int n = 0; n < N; ++n) {
        std::barrier<> b(BS); bar = &b;
        std::vector<std::thread> ts;
        for (int t = 0; t < BS; ++t) ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = n;
                                                             span_backward(A, g, out, dA, N, D, eps); });
        for (auto& th : ts) th.join();
    }
}
"""


def _build(tmp_path, dtype, K, D):
    src, _ = kn.span_source(dtype, K, D)
    src = src.replace('extern "C" __global__', "__global__")      # the kernels need not be C symbols here
    path = tmp_path / f"span_{np.dtype(dtype).name}_{K}_{D}"
    path.with_suffix(".cpp").write_text(HARNESS + src + DRIVER)
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(path.with_suffix(".so")),
                    str(path.with_suffix(".cpp"))], check=True, capture_output=True)
    return ctypes.CDLL(str(path.with_suffix(".so")))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K, D", [(2, 7), (4, 40), (6, 130)])
def test_span_cuda_source_on_cpu_threads(tmp_path, rng, dtype, K, D):
    lib = _build(tmp_path, dtype, K, D)
    N = 4
    A = rng.standard_normal((N, K, D)).astype(dtype)
    A[1, -1] = A[1, 0] * 0.3 + 1e-3 * A[1, -1]        # nearly dependent slots
    A[2, 0] = 0.0                                     # a zero slot
    g = rng.standard_normal(N).astype(dtype)
    ct = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)                       # noqa: E731
    out, out2, dA = np.empty(N, dtype), np.empty(N, dtype), np.empty_like(A)
    lib.emu_forward(ptr(A), ptr(out), N, D, ct(1e-6))
    lib.emu_backward(ptr(A), ptr(g), ptr(out2), ptr(dA), N, D, ct(1e-6))
    tol = 1e-12 if dtype == np.float64 else 1e-4     # float32: the nearly dependent token
    ref_v, ref_d = span_per_token(A, 1e-6), span_backward(g, A, 1e-6)
    assert rel_error(out, ref_v) < tol and rel_error(out2, ref_v) < tol
    assert rel_error(dA, ref_d) < tol
