"""The ElementwiseKernels of ``refmoe.fast.kernels`` run on the CPU: a stand-in for ``cupy.ElementwiseKernel``
turns each kernel's parameter lists and body into a C++ loop over ``i`` (raw arguments as pointers indexed by
the body, the others as references to element i, scalars by value), compiles it with g++ and calls it through
the op's own wrapper (argument order, output allocation, scalar types), with a NumPy namespace named "cupy".
Each result is compared with the op's reference. Skipped without g++.
"""
import ctypes
import hashlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from refmoe.fast import kernels as kn
from refmoe.gradcheck import rel_error

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not available")

CTYPES = {"float32": "float", "float64": "double", "int64": "long long", "int32": "int", "bool": "bool"}


def _params(spec):
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        words = part.split()
        raw = words[0] == "raw"
        out.append((raw, words[-2], words[-1]))                 # (raw, type, name)
    return out


class _EmulatedKernel:
    """``cupy.ElementwiseKernel(in_params, out_params, body, name)`` on the CPU (the subset refmoe uses)."""

    def __init__(self, in_params, out_params, body, name, workdir):
        self.ins, self.outs, self.body, self.name, self.workdir = _params(in_params), _params(out_params), body, \
            name, workdir

    def __call__(self, *args):
        params = self.ins + self.outs
        args = list(args)
        arrays = [a for (raw, _, _), a in zip(params, args) if isinstance(a, np.ndarray) and not raw]
        shape = arrays[0].shape
        for raw, typ, name in params[len(args):]:               # outputs not given: allocated like CuPy
            args.append(np.empty(shape, dtype=T_dtype[0]))
        tdtype = next(a.dtype for (_, typ, _), a in zip(params, args) if typ == "T" and isinstance(a, np.ndarray))
        lines, holders = [], []
        for j, ((raw, typ, name), a) in enumerate(zip(params, args)):
            ct = CTYPES[np.dtype(tdtype).name] if typ == "T" else CTYPES[typ]
            if isinstance(a, np.ndarray) and raw:
                lines.append(f"{ct}* {name} = ({ct}*)ptrs[{j}];")
            elif isinstance(a, np.ndarray):
                assert a.shape == shape, (name, a.shape, shape)
                lines.append(f"{ct}* {name}__arr = ({ct}*)ptrs[{j}];")
            else:
                lines.append(f"{ct} {name} = *({ct}*)ptrs[{j}];")
            dt = tdtype if typ == "T" else np.dtype(typ)
            holders.append(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else np.array(a, dtype=dt))
        refs = [f"auto& {name} = {name}__arr[i];" for (raw, _, name), a in zip(params, args)
                if isinstance(a, np.ndarray) and not raw]
        src = ("#include <cmath>\nusing std::exp; using std::sqrt;\n"
               f"typedef {CTYPES[np.dtype(tdtype).name]} T;\n"
               'extern "C" void kern(void** ptrs, long long size) {\n' + "\n".join(lines) +
               "\nfor (long long i = 0; i < size; ++i) {\n" + "\n".join(refs) + "\n" + self.body + "\n}\n}\n")
        lib = _compile(src, self.workdir)
        ptrs = (ctypes.c_void_p * len(holders))(*[h.ctypes.data for h in holders])
        lib.kern(ptrs, ctypes.c_longlong(int(np.prod(shape))))
        for a, h in zip(args, holders):                        # results back into the caller's arrays
            if isinstance(a, np.ndarray) and h is not a:
                a[...] = h
        outs = args[len(self.ins):]
        return outs[0] if len(outs) == 1 else tuple(outs)


T_dtype = [np.float64]
_LIBS = {}


def _compile(src, workdir):
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    if key not in _LIBS:
        cpp, so = workdir / f"k{key}.cpp", workdir / f"k{key}.so"
        cpp.write_text(src)
        subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True, capture_output=True)
        _LIBS[key] = ctypes.CDLL(str(so))
    return _LIBS[key]


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path_factory):
    """(namespace named "cupy" that is NumPy, ...) with ``cupy.ElementwiseKernel`` emulated."""
    workdir = tmp_path_factory.mktemp("emulated_kernels")
    fake = types.ModuleType("cupy")
    fake.ElementwiseKernel = lambda i, o, b, n: _EmulatedKernel(i, o, b, n, workdir)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kn, "_CACHE", {})
    xp = types.ModuleType("cupy")
    xp.__getattr__ = lambda name: getattr(np, name)
    assert kn.kernels_on(xp)
    return xp


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_elementwise_kernels_equal_their_references(fake_cupy, rng, dtype):
    xp = fake_cupy
    T_dtype[0] = dtype
    tol = 1e-13 if dtype == np.float64 else 2e-6
    N, K, E, D, H = 13, 3, 7, 6, 5
    r = lambda *s: rng.standard_normal(s).astype(dtype)                                   # noqa: E731
    a, b, dh = 3 * r(N, H), r(N, H), r(N, H)
    assert rel_error(kn.swiglu_forward_ew(xp, a, b), kn.ref_swiglu_forward_ew(np, a, b)) < tol
    for got, want in zip(kn.swiglu_backward_ew(xp, dh.copy(), a.copy(), b.copy()),
                         kn.ref_swiglu_backward_ew(np, dh.copy(), a.copy(), b.copy())):
        assert rel_error(got, want) < tol
    z = r(N, E)
    z[0] = 0.25                                                     # ties
    for renorm, eps, scale in ((True, 0.0, 1.0), (False, 0.0, 2.5), (True, 1e-20, 16.0)):
        got, want = kn.softmax_topk(xp, z, K, renorm, eps, scale), kn.ref_softmax_topk(np, z, K, renorm, eps, scale)
        assert (got[1] == want[1]).all() and got[1].dtype == np.int64
        for g_, w_ in zip(got, want):
            assert g_.dtype == w_.dtype and rel_error(g_, w_) < tol
        P, idx, _, denom = got
        dg, inj = r(N, K), r(N, E)
        for d_inj in (None, inj):
            assert rel_error(kn.router_backward(xp, dg, P, idx, denom, renorm, scale, d_inj),
                             kn.ref_router_backward(np, dg, P, idx, denom, renorm, scale, d_inj)) < tol
    R = 20
    rows_src = rng.permutation(R)[: N * K // 3 * 3][: R - 4]
    src = np.full(R, -1, dtype=np.int64)
    slot = np.full(N * K, -1, dtype=np.int64)
    slot[: rows_src.size] = rows_src
    src[rows_src] = np.arange(rows_src.size)
    slot = slot.reshape(N, K)
    table, g, dy, inj3, base = r(R, D), r(N, K), r(N, D), r(N, K, D), r(N, D)
    assert np.array_equal(kn.gather_rows(xp, table, src), kn.ref_gather_rows(np, table, src))
    eo = r(N, K, D)
    for bs in (None, base):
        assert rel_error(kn.combine(xp, g, eo, bs), kn.ref_combine(np, g, eo, bs)) < tol
    for d_inj in (None, inj3):
        assert rel_error(kn.combine_backward_rows(xp, g, dy, d_inj, src),
                         kn.ref_combine_backward_rows(np, g, dy, d_inj, src)) < tol
    assert rel_error(kn.slot_sum(xp, table, slot, base), kn.ref_slot_sum(np, table, slot, base)) < tol


def test_the_emulation_runs_the_kernel_bodies(fake_cupy):
    """A wrong body must fail: the stand-in really compiles and runs the source it is given."""
    T_dtype[0] = np.float64
    kn._CACHE["swiglu_fwd"] = _EmulatedKernel("T a, T b", "T h", "h = a + b;", "x", _workdir(fake_cupy))
    a, b = np.ones(4), np.full(4, 2.0)
    assert (kn.swiglu_forward_ew(fake_cupy, a, b) == 3.0).all()


def _workdir(xp):
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp())
