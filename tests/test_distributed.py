"""refmoe.distributed in one process: R ranks on threads (tests/thread_comm.py) against the one-process run on the
concatenated batch, float64 central differences of every rank's gradient slice, and the communicators' checks.

The same computations run under a real MPI engine in tests/test_distributed_mpi.py.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import refmoe
from refmoe import ops
from refmoe.distributed import (NCCLCommunicator, SingleProcess, allreduce_parts, data_parallel_step,
                                global_mse_backward, global_mse_forward, global_objective_backward,
                                global_objective_forward, global_objective_forward_backward, megatron_global_forward,
                                qwen_global_forward)
from refmoe.gradcheck import check_vjp, directional_check, rel_error
from refmoe.losses import aux_conventions as conv
from refmoe.losses import aux_loss_forward, aux_loss_totals
from helpers import FD_TOL, assert_all_below
from thread_comm import run_ranks, split

D, H, E, K = 6, 5, 4, 2
CFG = refmoe.MoEConfig(D, H, E, K, n_shared=1)
N = 12
PAD = [3, 9, 10, 11]                 # tokens 9-11: the last sequence of (B, T) = (4, 3) is all padding
SPLITS = [(4, 8), (9, 3), (6, 0, 6), (3, 3, 6)]   # uneven; (9, 3): rank 1 all padding; (6, 0, 6): a rank with no token
OBJECTIVES = {
    "paper": refmoe.PRESETS["paper"].replace(alpha=0.1, beta=0.2, gamma=0.3),
    "megatron": refmoe.Objective("deepseek_batch", "span", "code", alpha=0.1, beta=0.2, gamma=0.3, zeta=0.05),
    "eq2": refmoe.Objective("paper_eq2", "pairwise", "row_topk", alpha=0.1, beta=0.2, gamma=0.3),
    "seq": refmoe.Objective("deepseek_seq", "span", "paper", alpha=0.1, beta=0.2, gamma=0.3),
    "gshard_include": refmoe.Objective("gshard_first_choice", "pairwise", "paper", alpha=0.1, beta=0.2,
                                       gamma=0.3, padding="include"),
}
TOL = 1e-12                          # float64 rank shares against the one-process run; measured <= 4e-15


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(17)
    params = refmoe.init_params(CFG, rng, backend="numpy")
    x = rng.standard_normal((N, D))
    t = rng.standard_normal((N, D))
    mask = np.ones(N, dtype=bool)
    mask[PAD] = False
    return params, x, t, mask


def _shape(obj, n):
    """(B_r, T) of n tokens in sequences of T = 3 for the per-sequence form, else None."""
    return (n // 3, 3) if obj.aux_variant == "deepseek_seq" else None


def one_process(params, x, t, mask, obj, residual=False):
    """The objective on the concatenated batch with the MSE over its valid tokens: (losses, grads, dx)."""
    y, oc = refmoe.objective_forward(x, params, CFG, obj, valid_mask=mask, batch_shape=_shape(obj, x.shape[0]))
    out = x + y if residual else y
    r = (out - t) * mask[:, None]
    task = (r * r).sum() / (mask.sum() * D)
    dy = 2 * r / (mask.sum() * D)
    res = refmoe.objective_backward(dy, oc, task_loss=task)
    return res.losses, res.grads, res.grads["total"]["x"] + (dy if residual else 0)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------------------------
# communicators
# ----------------------------------------------------------------------------------------------

def test_single_process_returns_copies_and_checks_its_input():
    comm = SingleProcess()
    a = np.array([1.0, -2.0, 3.0])
    for op in (comm.allreduce_sum, comm.allreduce_max):
        out = op(a)
        assert np.array_equal(out, a) and out is not a and out.dtype == a.dtype
        out[0] = 9.0
        assert a[0] == 1.0                                     # the input is not touched
    assert comm.allreduce_sum(np.ones((2, 3), np.float32)).dtype == np.float32
    assert comm.allreduce_sum(np.zeros((0, 3))).shape == (0, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        comm.allreduce_sum(np.arange(3))
    with pytest.raises(TypeError, match="numpy.ndarray or cupy.ndarray"):
        comm.allreduce_sum([1.0, 2.0])
    assert (comm.rank, comm.size) == (0, 1)


class _StubNCCL:
    """Stands in for cupyx.distributed's NCCLBackend (rank, all_reduce) where no GPU exists."""
    rank = 1

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        raise AssertionError("never reached: the adapter refuses NumPy arrays first")


def test_nccl_adapter_refuses_numpy_arrays():
    comm = NCCLCommunicator(_StubNCCL(), 2)
    assert (comm.rank, comm.size, comm.library) == (1, 2, "cupy")
    with pytest.raises(TypeError, match="numpy arrays, but NCCLCommunicator all-reduces cupy arrays only"):
        comm.allreduce_sum(np.ones(3))
    rng = np.random.default_rng(0)
    params = refmoe.init_params(CFG, rng, backend="numpy")
    with pytest.raises(TypeError, match="x and the parameters are numpy arrays"):
        global_objective_forward(comm, rng.standard_normal((4, D)), params, CFG)
    with pytest.raises(ValueError, match="outside a group"):
        NCCLCommunicator(_StubNCCL(), 1)
    with pytest.raises(TypeError, match="all_reduce"):
        NCCLCommunicator(object(), 2)


def test_mpi_adapter_refuses_cupy_arrays(cp):
    pytest.importorskip("mpi4py")
    from refmoe.distributed import MPICommunicator

    comm = MPICommunicator.__new__(MPICommunicator)             # no MPI_Init: the check comes before any call
    comm.rank, comm.size = 0, 1
    with pytest.raises(TypeError, match="cupy arrays, but MPICommunicator all-reduces numpy arrays only"):
        comm.allreduce_sum(cp.ones(3))


def test_allreduce_parts_is_one_collective_in_order():
    def fn(comm):
        r = comm.rank
        return allreduce_parts(comm, {"a": np.array([r, 1.0]), "empty": np.zeros(0), "b": np.array([10.0 * r])}, np)

    (out, _, _), calls = run_ranks(3, fn)
    assert calls == [1, 1, 1]
    assert out["a"].tolist() == [3.0, 3.0] and out["b"].tolist() == [30.0] and out["empty"].shape == (0,)
    with pytest.raises(TypeError, match="must be a refmoe.distributed Communicator"):
        data_parallel_step(object(), {}, None, CFG)


# ----------------------------------------------------------------------------------------------
# the global objective: shares and slices equal the one-process run
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", SPLITS, ids=str)
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_shares_and_slices_equal_the_one_process_run(batch, name, sizes):
    params, x, t, mask = batch
    obj = OBJECTIVES[name]
    if obj.aux_variant == "deepseek_seq" and any(s % 3 for s in sizes):
        pytest.skip("sequences of 3 tokens do not cross ranks")
    losses, grads, _ = one_process(params, x, t, mask, obj)
    parts = split(N, sizes)

    def fn(comm):
        i = parts[comm.rank]
        y, gc = global_objective_forward(comm, x[i], params, CFG, obj, valid_mask=mask[i],
                                         batch_shape=_shape(obj, len(i)))
        task, mse = global_mse_forward(y, t[i], gc.n_tokens, mask[i]) if len(i) else (0.0, None)
        return global_objective_backward(None if mse is None else global_mse_backward(1.0, mse), gc,
                                         task_loss=np.asarray(task))

    results, calls = run_ranks(len(sizes), fn)
    assert calls == [1] * len(sizes)                                     # one all-reduce of the sums
    for term in ("task", *obj.forms, "regularisers", "total"):
        share_sum = sum(float(r.losses[term]) for r in results)
        assert share_sum == pytest.approx(float(losses[term]), rel=TOL, abs=1e-300), term
    for term in ("task", *obj.forms, "total"):
        dx = np.concatenate([r.grads[term]["x"] for r in results])      # [N, D] the ranks' rows in order
        assert _rel(dx, grads[term]["x"]) < TOL, (term, "x")
        for p in params:
            summed = sum(r.grads[term][p] for r in results)             # what the all-reduce of a step sums
            assert _rel(summed, grads[term][p]) < TOL or np.abs(grads[term][p]).max() == 0, (term, p)
    for r, i in zip(results, parts):
        assert r.y.shape == (len(i), D)
        if len(i) == 0:
            assert r.cache is None and all(float(v) == 0 for k, v in r.losses.items() if k != "task")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_single_process_communicator_is_the_objective_bit_for_bit(batch, name):
    params, x, t, mask = batch
    obj = OBJECTIVES[name]
    shape = _shape(obj, N)
    dy = t * mask[:, None]
    want = refmoe.objective_forward_backward(x, params, CFG, dy, obj, valid_mask=mask, batch_shape=shape)
    got = global_objective_forward_backward(SingleProcess(), x, params, CFG, dy, obj, valid_mask=mask,
                                            batch_shape=shape)
    for term in want.losses:
        if want.losses[term] is not None:
            assert np.array_equal(got.losses[term], want.losses[term]), term
    for term in want.grads:
        for p in want.grads[term]:
            assert np.array_equal(got.grads[term][p], want.grads[term][p]), (term, p)
    grouped = refmoe.Objective("switch", "span", "paper", ortho_released_grouping=True)
    one = global_objective_forward_backward(SingleProcess(), x, params, CFG, dy, grouped)
    assert np.array_equal(one.grads["total"]["w_gate"],
                          refmoe.objective_forward_backward(x, params, CFG, dy, grouped).grads["total"]["w_gate"])


def test_a_form_without_a_share_per_rank_is_refused_across_ranks(batch):
    params, x, _, _ = batch
    grouped = refmoe.Objective("switch", "span", "paper", ortho_released_grouping=True)
    with pytest.raises(ValueError, match="no share per rank"):
        run_ranks(2, lambda comm: global_objective_forward(comm, x[:6] if comm.rank else x[6:], params, CFG, grouped))


# ----------------------------------------------------------------------------------------------
# every rank's slice is the gradient of the global objective on that rank's inputs
# ----------------------------------------------------------------------------------------------

def _global_total(params_of, x_of, t, mask, parts, obj):
    """The global batch's objective (task MSE + regularisers) as a function of each rank's x and replica."""
    def fn(comm):
        r, i = comm.rank, parts[comm.rank]
        y, gc = global_objective_forward(comm, x_of[r], params_of[r], CFG, obj, valid_mask=mask[i],
                                         batch_shape=_shape(obj, len(i)))
        task = global_mse_forward(y, t[i], gc.n_tokens, mask[i])[0] if len(i) else 0.0
        v = gc.ocache.values if gc.ocache is not None else {}
        share = float(task) + sum(obj.coefficients[k] * float(v[k]) for k in v)
        topk = gc.ocache.cache.topk_idx if gc.ocache is not None else np.zeros((0, K), int)
        return share, topk
    results, _ = run_ranks(len(parts), fn)
    return sum(s for s, _ in results), np.concatenate([k for _, k in results])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_slices_by_central_differences(batch, name):
    """Rank 2's slice (x and its replica of every parameter) against float64 central differences of the
    global objective with the other ranks held fixed; a correct slice gives ~1e-9, a per-rank normalisation
    ~1e-1 (pass mark FD_TOL = 1e-7)."""
    params, x, t, mask = batch
    obj = OBJECTIVES[name]
    sizes = (6, 0, 6) if name == "seq" else (4, 2, 6)
    parts = split(N, sizes)
    r = 2

    def run_slice(comm):
        i = parts[comm.rank]
        y, gc = global_objective_forward(comm, x[i], params, CFG, obj, valid_mask=mask[i],
                                         batch_shape=_shape(obj, len(i)))
        mse = global_mse_forward(y, t[i], gc.n_tokens, mask[i])[1] if len(i) else None
        return global_objective_backward(None if mse is None else global_mse_backward(1.0, mse), gc)

    slices = run_ranks(len(sizes), run_slice)[0][r].grads["total"]
    xs = [x[i] for i in parts]

    def f(inp):
        p_of = [params] * len(parts)
        p_of[r] = {k: inp.get(k, v) for k, v in params.items()}
        x_of = list(xs)
        x_of[r] = inp["x"]
        return _global_total(p_of, x_of, t, mask, parts, obj)[0]

    guard = lambda inp: _global_total([params] * r + [{k: inp.get(k, v) for k, v in params.items()}],
                                      xs[:r] + [inp["x"]], t, mask, parts, obj)[1]
    inputs = {"x": xs[r], "w_router": params["w_router"]}
    errs = check_vjp(f, inputs, {k: slices[k] for k in inputs}, guard=guard)
    assert_all_below(errs)                                   # measured 2e-10 to 6e-10 (x), 1e-9 to 3e-9 (w_router)
    all_inputs = {"x": xs[r], **params}
    err = directional_check(f, all_inputs, {k: slices[k] for k in all_inputs}, np.random.default_rng(1), guard=guard)
    assert err < FD_TOL, err                                 # measured 2e-10 to 2e-9


def test_global_mse_by_central_differences():
    rng = np.random.default_rng(3)
    out, target = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    mask = np.array([True, False, True, True, False])
    value, cache = global_mse_forward(out, target, 7, mask)
    assert float(value) == pytest.approx(((out - target)[mask] ** 2).sum() / (7 * 4), rel=1e-14)
    errs = check_vjp(lambda p: global_mse_forward(p["out"], target, 7, mask)[0], {"out": out},
                     {"out": global_mse_backward(1.0, cache)})
    assert_all_below(errs)                                                   # measured 2e-10
    assert np.all(global_mse_backward(1.0, cache)[~mask] == 0)
    assert global_mse_forward(out.astype(np.float32), target.astype(np.float32), 7)[0].dtype == np.float32
    with pytest.raises(ValueError, match="n_tokens"):
        global_mse_forward(out, target, 0)


# ----------------------------------------------------------------------------------------------
# the data-parallel step
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("sizes", SPLITS, ids=str)
def test_step_gradients_are_the_one_process_gradients_on_every_rank(batch, sizes, residual):
    params, x, t, mask = batch
    obj = OBJECTIVES["paper"]
    losses, grads, dx = one_process(params, x, t, mask, obj, residual=residual)
    parts = split(N, sizes)

    def fn(comm):
        i = parts[comm.rank]
        return data_parallel_step(comm, params, SimpleNamespace(x=x[i], target=t[i]), CFG, obj,
                                  residual=residual, valid_mask=mask[i])

    results, calls = run_ranks(len(sizes), fn)
    assert calls == [3] * len(sizes)                 # replicas (MAX), the sums, the gradients and shares
    for p in params:
        assert _rel(results[0].grads[p], grads["total"][p]) < TOL, p
        assert all(np.array_equal(res.grads[p], results[0].grads[p]) for res in results), p   # same bits
    for k in ("task", "aux", "ortho", "var", "regularisers", "total"):
        assert float(results[0].totals[k]) == pytest.approx(float(losses[k]), rel=TOL)
        assert sum(float(res.losses[k]) for res in results) == pytest.approx(float(losses[k]), rel=TOL)
    assert _rel(np.concatenate([res.dx for res in results]), dx) < TOL
    assert {res.n_tokens for res in results} == {int(mask.sum())}


def test_step_with_a_single_process_is_the_one_process_step(batch):
    params, x, t, mask = batch
    losses, grads, _ = one_process(params, x, t, mask, OBJECTIVES["megatron"])
    res = data_parallel_step(SingleProcess(), params, SimpleNamespace(x=x, target=t), CFG, OBJECTIVES["megatron"],
                             valid_mask=mask)
    assert all(_rel(res.grads[p], grads["total"][p]) < TOL for p in params)
    assert float(res.totals["z"]) == pytest.approx(float(losses["z"]), rel=TOL)


def test_step_refuses_replicas_that_differ(batch):
    params, x, t, _ = batch
    drifted = dict(params, w_up=params["w_up"] + 1e-12)

    def fn(comm, objective="paper", p=None):
        mine = drifted if (p is None and comm.rank == 1) else params
        return data_parallel_step(comm, mine, SimpleNamespace(x=x[:5], target=t[:5]), CFG, objective)

    with pytest.raises(ValueError, match="different parameter values"):
        run_ranks(2, fn)
    with pytest.raises(ValueError, match="different config or objective"):
        run_ranks(2, lambda comm: fn(comm, "paper" if comm.rank else OBJECTIVES["paper"], p=params))


def test_float32_in_float32_out(batch):
    params, x, t, mask = batch
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    res = run_ranks(2, lambda comm: data_parallel_step(
        comm, p32, SimpleNamespace(x=x[:5].astype(np.float32) if comm.rank == 0 else x[5:].astype(np.float32),
                                   target=t[:5].astype(np.float32) if comm.rank == 0 else t[5:].astype(np.float32)),
        CFG, "paper", valid_mask=mask[:5] if comm.rank == 0 else mask[5:]))[0]
    assert {g.dtype for g in res[0].grads.values()} == {np.dtype(np.float32)}
    assert res[0].totals["total"].dtype == np.float32
    _, grads, _ = one_process(params, x, t, mask, refmoe.PRESETS["paper"])
    assert _rel(res[0].grads["w_router"], grads["total"]["w_router"]) < 1e-5


# ----------------------------------------------------------------------------------------------
# the two systems' global-batch balancing losses over several layers
# ----------------------------------------------------------------------------------------------

def _layers(rng, L=2, n=N):
    z = rng.standard_normal((L, n, E)) * 1.5
    s = np.stack([ops.softmax_forward(a)[0] for a in z])
    return z, s, np.stack([ops.topk_indices(a, K) for a in s])


@pytest.mark.parametrize("sizes", SPLITS, ids=str)
@pytest.mark.parametrize("system", ["megatron", "qwen"])
def test_system_global_losses_equal_the_concatenated_batch(system, sizes):
    rng = np.random.default_rng(5)
    z, s, idx = _layers(rng)
    mask = np.ones(N, dtype=bool)
    mask[PAD] = False
    whole = [(s[l], idx[l]) for l in range(len(s))]
    if system == "megatron":
        want, wc = conv.megatron_forward(whole, "global", valid_mask=mask)
    else:
        want, wc = conv.hf_mixtral_forward(whole, valid_mask=mask)
    dwant = np.stack(conv.layers_backward(1.0, wc))                          # [L, N, E]
    parts = split(N, sizes)
    forward = megatron_global_forward if system == "megatron" else qwen_global_forward

    def fn(comm):
        i = parts[comm.rank]
        loss, cache = forward(comm, [(s[l][i], idx[l][i]) for l in range(len(s))], valid_mask=mask[i])
        return loss, np.stack(conv.layers_backward(1.0, cache))

    results, calls = run_ranks(len(sizes), fn)
    assert calls == [1] * len(sizes)
    assert sum(float(v) for v, _ in results) == pytest.approx(float(want), rel=TOL)
    assert _rel(np.concatenate([d for _, d in results], axis=1), dwant) < TOL

    # the slice of the last rank holding a valid token, by central differences of the global loss in that
    # rank's logits (through the softmax)
    r = max(q for q, i in enumerate(parts) if mask[i].any())
    zr = [z[:, i] for i in parts]

    def f(inp):
        def fn2(comm):
            zz = inp["z"] if comm.rank == r else zr[comm.rank]
            ss = [ops.softmax_forward(a)[0] if a.shape[0] else a for a in zz]
            return float(forward(comm, [(ss[l], idx[l][parts[comm.rank]]) for l in range(len(ss))],
                                 valid_mask=mask[parts[comm.rank]])[0])
        return sum(run_ranks(len(sizes), fn2)[0])

    d = results[r][1]
    dz = np.stack([ops.softmax_backward(d[l], s[l][parts[r]]) for l in range(len(s))])
    assert np.abs(dz).max() > 1e-3
    assert_all_below(check_vjp(f, {"z": zr[r]}, {"z": dz}))                    # measured 4e-9 to 7e-9


def test_qwen_share_is_the_rank_value_weighted_by_its_tokens():
    """Qwen's per-rank value E sum_j f^g_j mean_{t in r} P_tj is the share times N_g / N_r: averaging the ranks'
    values equals the concatenated batch's loss only when every rank holds the same number of tokens."""
    rng = np.random.default_rng(6)
    _, s, idx = _layers(rng, L=1)
    parts = split(N, (3, 9))
    c = np.zeros(E)
    np.add.at(c, idx[0].reshape(-1), 1.0)
    f = c / N
    qwen = [E * (f * s[0][i].mean(axis=0)).sum() for i in parts]
    shares, _ = run_ranks(2, lambda comm: float(qwen_global_forward(comm, [(s[0][parts[comm.rank]],
                                                                            idx[0][parts[comm.rank]])])[0]))
    for share, value, i in zip(shares, qwen, parts):
        assert share * N / len(i) == pytest.approx(value, rel=1e-13)
    whole = float(conv.hf_mixtral_forward([(s[0], idx[0])])[0])
    assert sum(shares) == pytest.approx(whole, rel=1e-13)
    assert abs(np.mean(qwen) - whole) > 1e-3                   # the plain average misses it for 3 / 9 tokens


def test_the_usual_porting_mistakes_give_other_numbers(batch):
    """What the tests above would catch: counts averaged over the ranks instead of summed, and a task loss
    averaged per rank then over the ranks, both on uneven ranks (3 and 9 tokens)."""
    params, x, t, mask = batch
    _, cache = refmoe.moe_forward(x, params, CFG)
    parts = split(N, (3, 9))
    full = float(aux_loss_forward(cache.scores, cache.topk_idx, "deepseek_batch")[0])
    local = [aux_loss_totals(cache.scores[i], cache.topk_idx[i], "deepseek_batch") for i in parts]
    summed, averaged = sum(local), sum(local) / 2
    share = lambda tot: sum(float(aux_loss_forward(cache.scores[i], cache.topk_idx[i], "deepseek_batch",
                                                   totals=tot)[0]) for i in parts)
    assert share(summed) == pytest.approx(full, rel=1e-14)
    assert share(averaged) == pytest.approx(2 * full, rel=1e-14)             # c / R and N / R: R times the loss
    _, grads, _ = one_process(params, x, t, np.ones(N, bool), refmoe.PRESETS["paper"].replace(alpha=0.0, beta=0.0,
                                                                                             gamma=0.0))
    per_rank = sum(refmoe.objective_forward_backward(x[i], params, CFG, 2 * (refmoe.moe_forward(x[i], params, CFG)[0]
                   - t[i]) / (len(i) * D), "paper").grads["task"]["w_gate"] for i in parts) / 2
    assert rel_error(per_rank, grads["task"]["w_gate"]) > 1e-2


def test_totals_are_checked():
    rng = np.random.default_rng(8)
    s = ops.softmax_forward(rng.standard_normal((5, E)))[0]
    idx = ops.topk_indices(s, K)
    assert aux_loss_totals(s, idx, "switch").shape == (E + 1,)
    assert aux_loss_totals(s, idx, "deepseek_seq", batch_shape=(5, 1)).tolist() == [5.0]
    with pytest.raises(ValueError, match=r"totals must have shape \(5,\)"):
        aux_loss_forward(s, idx, "switch", totals=np.ones(3))
    with pytest.raises(ValueError, match="no valid token"):
        aux_loss_forward(s, idx, "switch", totals=np.zeros(E + 1))
    zero = np.zeros(5, dtype=bool)
    assert aux_loss_totals(s, idx, "switch", valid_mask=zero).tolist() == [0.0] * (E + 1)
    with pytest.raises(ValueError, match="every token as padding"):
        aux_loss_forward(s, idx, "switch", valid_mask=zero)              # without global totals: undefined
    assert float(aux_loss_forward(s, idx, "switch", valid_mask=zero, totals=np.ones(E + 1))[0]) == 0.0


def test_importing_refmoe_distributed_loads_no_engine():
    """mpi4py and cupyx.distributed are imported when a communicator on them is made, never before."""
    code = ("import sys, refmoe, refmoe.distributed, refmoe.golden; "
            "print(sorted(m for m in ('mpi4py', 'cupyx', 'cupyx.distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "REFMOE_BACKEND": "numpy"}).stdout.strip()
    assert out == "[]"
