r"""Matrix products of the fast path that a CUDA graph can capture, with an output buffer and accumulation.

Dimension letters: B batch, M rows, P inner, Q columns.

    matmul(xp, a, b, out=None, accumulate=False)     out (+)= a @ b      a [(B,) M, P], b [(B,) P, Q]
    grouped_matmul(xp, groups, accumulate=False)     out_g (+)= a_g @ b_g for (a_g, b_g, out_g) in groups,
                                                     each with its own M_g, P_g, Q_g (one call: the experts'
                                                     own rows, no padding)

On NumPy it is ``np.matmul`` (``out`` and ``accumulate`` as written). On CuPy, with the kernels on
(``refmoe.fast.switch``), it calls cuBLAS's ``{S,D}gemm(StridedBatched)`` itself, on a handle this module
owns, through ``ctypes``; anything else (other dtypes, no cuBLAS library found) goes to ``cupy.matmul``.

Why not ``cupy.matmul``: CuPy 14 refuses every cuBLAS call while a stream is being captured
(``NotImplementedError: calling cuBLAS API during stream capture is currently unsupported``; the guard is in
its ``cublas.setStream``, which each of its cuBLAS wrappers calls). cuBLAS itself supports capture when the
handle has a workspace of its own (the cuBLAS documentation, "CUDA Graphs Support"), so the handles here get
one (``WORKSPACE_BYTES``, allocated once per handle and kept). A handle serves one (device, stream): its stream
is set once, before its workspace, and never again (``cublasSetStream`` resets the workspace to cuBLAS's
default pool), and two streams never share a workspace. Pointer mode is the host's:
alpha and beta (1 and 0 or 1) are read when the call is made, so a captured call keeps them.

Layout: the operands are read in place when their last two axes are C- or F-ordered (a ``swapaxes`` view is
an F-ordered operand, passed as a transpose, so no copy is made); anything else is copied first. A 2-D
operand against a 3-D one is broadcast over the batch (stride 0). The output is C-ordered [(B,) M, Q]; ``out``
must be that (it may alias neither operand). Numerics: products in the input dtype with cuBLAS's default
math mode (no TF32), the same kernels ``cupy.matmul`` would pick up to its choice of the ``Ex`` entry point.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

from .switch import kernels_on

WORKSPACE_BYTES = 32 << 20          # cuBLAS asks for 32 MiB on Hopper ("cublasSetWorkspace")
_OP_N, _OP_T = 0, 1
_STATE = {"lib": None, "why": None, "handles": {}, "keep": []}


def matmul(xp, a, b, out=None, accumulate=False):
    """``out = a @ b`` (``out += a @ b`` with ``accumulate``); a [(B,) M, P], b [(B,) P, Q] -> [(B,) M, Q]."""
    if a.ndim not in (2, 3) or b.ndim not in (2, 3) or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    if accumulate and out is None:
        raise ValueError("matmul: accumulate=True needs out")
    if not (kernels_on(xp) and a.dtype == b.dtype and a.dtype in (np.float32, np.float64) and _library()):
        if accumulate:
            out += xp.matmul(a, b)
            return out
        return xp.matmul(a, b, out=out)
    return _gemm(xp, a, b, out, accumulate)


def grouped_matmul(xp, groups, accumulate=False):
    """out_g = a_g @ b_g (``+=`` with ``accumulate``) for every (a_g [M_g, P_g], b_g [P_g, Q_g], out_g [M_g, Q_g])
    in ``groups``; out_g has unit column stride (a row block of a C-ordered array). On CuPy one cuBLAS
    ``{S,D}gemmGroupedBatched`` call (its device pointer arrays are one small host->device copy, so this call is
    not for a graph); elsewhere, or without that entry point, one :func:`matmul` per group. A group with P_g = 0
    gets zeros (or is left as it is with ``accumulate``)."""
    groups = [g for g in groups if g[2].size]
    for a, b, out in groups:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or tuple(out.shape) != (a.shape[0], b.shape[1]) \
                or not a.dtype == b.dtype == out.dtype:
            raise ValueError(f"grouped_matmul: group {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)} "
                             f"does not chain, or the dtypes differ")
    live = [g for g in groups if g[0].shape[1]]
    if not accumulate:
        for a, b, out in groups:
            if not a.shape[1]:
                out.fill(0)
    if not live:
        return
    dtype = live[0][0].dtype
    fn = None
    if kernels_on(xp) and dtype in (np.float32, np.float64) and _library():
        fn = getattr(_STATE["lib"], "cublasSgemmGroupedBatched" if dtype == np.float32
                     else "cublasDgemmGroupedBatched", None)
    if fn is None:
        for a, b, out in live:
            matmul(xp, a, b, out=out, accumulate=accumulate)
        return
    _grouped_gemm(xp, fn, live, dtype, accumulate)


def mode() -> str:
    """'cublas' when CuPy products go through this module's handles, else why they go to ``cupy.matmul``."""
    return "cublas" if _library() else f"cupy.matmul ({_STATE['why']})"


def _library():
    if _STATE["lib"] is None and _STATE["why"] is None:
        try:
            _STATE["lib"] = _load()
        except (OSError, ImportError) as exc:
            _STATE["why"] = f"no cuBLAS library: {exc}"
    return _STATE["lib"]


def _load():
    """The libcublas that CuPy has loaded (from the process's maps), else the one the loader finds."""
    import cupy
    cupy.cuda.device.get_cublas_handle()                                         # CuPy loads its cuBLAS
    names = []
    try:
        with open("/proc/self/maps") as maps:
            names = sorted({line.split()[-1] for line in maps
                            if os.path.basename(line.split()[-1]).startswith("libcublas.so")})
    except OSError:
        pass
    names += [n for n in ("libcublas.so.13", "libcublas.so.12", ctypes.util.find_library("cublas")) if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            _declare(lib)
            return lib
        except (OSError, AttributeError):
            continue
    raise OSError("tried " + ", ".join(names))


def _declare(lib):
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    for name in ("cublasSgemm_v2", "cublasDgemm_v2"):
        getattr(lib, name).argtypes = [p, i, i, i, i, i, p, p, i, p, i, p, p, i]
    for name in ("cublasSgemmStridedBatched", "cublasDgemmStridedBatched"):
        getattr(lib, name).argtypes = [p, i, i, i, i, i, p, p, i, ll, p, i, ll, p, p, i, ll, i]


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} returned status {status}")


def _handle(stream_ptr: int):
    """This module's cuBLAS handle for the current device and ``stream_ptr``, with its own workspace."""
    import cupy
    key = (cupy.cuda.Device().id, stream_ptr)
    if key not in _STATE["handles"]:
        lib = _STATE["lib"]
        handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "create")
        work = cupy.cuda.Memory(WORKSPACE_BYTES)                                 # cudaMalloc: no pool's block
        _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream_ptr)), "setStream")
        _check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(work.ptr), WORKSPACE_BYTES), "setWorkspace")
        _STATE["keep"].append(work)
        _STATE["handles"][key] = handle
    return _STATE["handles"][key]


def _operand(xp, a):
    """(array, op, ld, batch stride) of a for a column-major cuBLAS call that reads it as row-major."""
    item = a.itemsize
    rows, cols = a.shape[-2:]
    s_r, s_c = a.strides[-2:]
    if s_c == item and s_r % item == 0 and s_r // item >= max(1, cols):
        op, ld = _OP_N, s_r // item                                              # C-ordered rows
    elif s_r == item and s_c % item == 0 and s_c // item >= max(1, rows):
        op, ld = _OP_T, s_c // item                                              # F-ordered: a transpose
    else:
        a = xp.ascontiguousarray(a)
        op, ld = _OP_N, max(1, cols)
    if a.ndim == 3 and a.shape[0] > 1:
        if a.strides[0] % item or a.strides[0] < 0:
            a = xp.ascontiguousarray(a)
            op, ld = _OP_N, max(1, cols)
        stride = a.strides[0] // item
    else:
        stride = 0
    return a, op, ld, stride


def _gemm(xp, a, b, out, accumulate):
    import cupy
    batch = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
    if 0 in [t.shape[0] for t in (a, b) if t.ndim == 3]:
        batch = 0                                                                # an empty batch broadcasts
    for t in (a, b):
        if t.ndim == 3 and t.shape[0] not in (1, batch):
            raise ValueError(f"matmul: batch sizes {a.shape[0]} and {b.shape[0]} differ")
    M, P, Q = a.shape[-2], a.shape[-1], b.shape[-1]
    shape = (batch, M, Q) if max(a.ndim, b.ndim) == 3 else (M, Q)
    if out is None:
        out = xp.empty(shape, dtype=a.dtype)
    elif tuple(out.shape) != shape or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be a C-ordered {a.dtype} array of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if out.size == 0:
        return out
    if P == 0:
        if not accumulate:
            out.fill(0)
        return out
    a, op_a, ld_a, s_a = _operand(xp, a)
    b, op_b, ld_b, s_b = _operand(xp, b)
    lib = _STATE["lib"]
    handle = _handle(cupy.cuda.get_current_stream().ptr)
    scalar = ctypes.c_float if a.dtype == np.float32 else ctypes.c_double
    alpha, beta = scalar(1.0), scalar(1.0 if accumulate else 0.0)
    # row-major out = a @ b is column-major out^T = b^T a^T: cuBLAS gets (b, a) and computes an [Q, M] matrix
    args_b = (ctypes.c_void_p(b.data.ptr), ld_b)
    args_a = (ctypes.c_void_p(a.data.ptr), ld_a)
    if batch == 1:
        fn = lib.cublasSgemm_v2 if a.dtype == np.float32 else lib.cublasDgemm_v2
        status = fn(handle, op_b, op_a, Q, M, P, ctypes.byref(alpha), *args_b, *args_a, ctypes.byref(beta),
                    ctypes.c_void_p(out.data.ptr), Q)
    else:
        fn = lib.cublasSgemmStridedBatched if a.dtype == np.float32 else lib.cublasDgemmStridedBatched
        status = fn(handle, op_b, op_a, Q, M, P, ctypes.byref(alpha), *args_b, s_b, *args_a, s_a,
                    ctypes.byref(beta), ctypes.c_void_p(out.data.ptr), Q, M * Q, batch)
    _check(status, "gemm")
    return out


def _grouped_gemm(xp, fn, groups, dtype, accumulate):
    import cupy
    G = len(groups)
    ints = lambda values: (ctypes.c_int * G)(*values)                           # noqa: E731
    cols = {"ta": [], "tb": [], "m": [], "n": [], "k": [], "lda": [], "ldb": [], "ldc": []}
    ptrs, keep = [[], [], []], []
    item = np.dtype(dtype).itemsize
    for a, b, out in groups:
        if out.strides[1] != item or out.strides[0] < out.shape[1] * item or out.strides[0] % item:
            raise ValueError("grouped_matmul: every out_g needs unit column stride (rows of a C-ordered array)")
        a, op_a, ld_a, _ = _operand(xp, a)
        b, op_b, ld_b, _ = _operand(xp, b)
        keep += [a, b]              # a copied operand lives until the call: its freed block could take the next copy
        M, P, Q = a.shape[0], a.shape[1], b.shape[1]
        for key, value in zip(cols, (op_b, op_a, Q, M, P, ld_b, ld_a, out.strides[0] // item)):
            cols[key].append(value)
        for i, t in enumerate((b, a, out)):
            ptrs[i].append(t.data.ptr)
    dev = cupy.asarray(np.array(ptrs, dtype=np.uint64))                          # [3, G] host -> device
    scalar = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    alpha, beta = (scalar * G)(*([1.0] * G)), (scalar * G)(*([1.0 if accumulate else 0.0] * G))
    handle = _handle(cupy.cuda.get_current_stream().ptr)
    row = lambda i: ctypes.c_void_p(dev[i].data.ptr)                            # noqa: E731
    status = fn(handle, ints(cols["ta"]), ints(cols["tb"]), ints(cols["m"]), ints(cols["n"]), ints(cols["k"]),
                alpha, row(0), ints(cols["lda"]), row(1), ints(cols["ldb"]), beta, row(2), ints(cols["ldc"]),
                ctypes.c_int(G), ints([1] * G))                                  # G groups of one product
    _check(status, "gemmGroupedBatched")


__all__ = ["matmul", "grouped_matmul", "mode", "WORKSPACE_BYTES"]
