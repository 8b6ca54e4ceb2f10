"""One rank of the MPI test: ``mpiexec -n R python tests/mpi_worker.py [DUMP_DIR]`` (R = 2 or 3).

Every rank draws the same global batch (14 tokens, some padding), takes its uneven share of it (R = 3 gives one
rank no token at all) and runs, through ``refmoe.distributed.MPICommunicator``:

    data_parallel_step           three objectives (paper; Megatron's global aux + span + code + z-loss;
                                 deepseek_seq + pairwise + paper), the residual block for one of them, and
                                 float32 for one
    megatron_global_forward,     two layers of router scores
    qwen_global_forward

Every rank checks with MAX all-reduces that all ranks hold the same all-reduced gradients, bit for bit; rank 0
gathers the ranks' shares and slices, recomputes everything in one process on the concatenated batch, prints one
JSON line {"size", "errors": name -> max relative error, "identical", "seconds"} and exits 1 when an error of a
float64 run passes 1e-12 (float32: 1e-5) or the ranks disagree. With DUMP_DIR, each rank also writes its dumps
of the golden ``dist_*_r<R>_rank<r>`` cases there (tests/test_distributed_mpi.py checks them).
"""
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

import refmoe
from refmoe import ops
from refmoe.distributed import MPICommunicator, data_parallel_step, megatron_global_forward, qwen_global_forward
from refmoe.losses import aux_conventions as conv

D, H, E, K = 6, 5, 4, 2
CFG = refmoe.MoEConfig(D, H, E, K, n_shared=1)
N = 14
PAD = [5, 12, 13]
SIZES = {1: (14,), 2: (4, 10), 3: (6, 0, 8)}           # even sizes: sequences of 2 tokens stay on one rank
OBJECTIVES = {
    "paper": refmoe.PRESETS["paper"].replace(alpha=0.1, beta=0.2, gamma=0.3),
    "megatron": refmoe.Objective("deepseek_batch", "span", "code", alpha=0.1, beta=0.2, gamma=0.3, zeta=0.05),
    "seq": refmoe.Objective("deepseek_seq", "pairwise", "paper", alpha=0.1, beta=0.2, gamma=0.3),
}
RUNS = [("paper", False, np.float64), ("megatron", False, np.float64), ("seq", False, np.float64),
        ("paper", True, np.float64), ("megatron", False, np.float32)]


def data():
    rng = np.random.default_rng(2025)
    params = refmoe.init_params(CFG, rng, backend="numpy")
    x, t = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    mask = np.ones(N, dtype=bool)
    mask[PAD] = False
    z = rng.standard_normal((2, N, E)) * 1.5                                 # [L, N, E] router logits
    return params, x, t, mask, z


def shape(name, n):
    return (n // 2, 2) if name == "seq" and n else None


def one_process(params, x, t, mask, name, residual):
    obj = OBJECTIVES[name]
    y, oc = refmoe.objective_forward(x, params, CFG, obj, valid_mask=mask, batch_shape=shape(name, N))
    r = ((x + y if residual else y) - t) * mask[:, None]
    task = (r * r).sum() / (mask.sum() * D)
    dy = 2 * r / (mask.sum() * D)
    res = refmoe.objective_backward(dy, oc, task_loss=task)
    return res.losses, res.grads["total"], res.grads["total"]["x"] + (dy if residual else 0)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if b.size else 0.0


def identical(comm, a):
    """True on every rank when every rank holds the same bits of ``a`` (two MAX all-reduces)."""
    return bool((comm.allreduce_max(a) == a).all() and (comm.allreduce_max(-a) == -a).all())


def main():
    start = time.perf_counter()
    comm = MPICommunicator()
    R, rank = comm.size, comm.rank
    params, x, t, mask, z = data()
    ends = np.cumsum(SIZES[R])
    mine = np.arange(ends[rank] - SIZES[R][rank], ends[rank])                # this rank's token indices
    report, same = [], True

    for name, residual, dtype in RUNS:
        p = {k: v.astype(dtype) for k, v in params.items()}
        batch = SimpleNamespace(x=x[mine].astype(dtype), target=t[mine].astype(dtype))
        res = data_parallel_step(comm, p, batch, CFG, OBJECTIVES[name], residual=residual, valid_mask=mask[mine],
                                 batch_shape=shape(name, len(mine)))
        flat = np.concatenate([res.grads[k].reshape(-1) for k in sorted(res.grads)])
        same = identical(comm, flat.astype(np.float64)) and same
        report.append((res.grads, {k: float(v) for k, v in res.totals.items()},
                       {k: float(v) for k, v in res.losses.items()}, res.dx))

    scores = np.stack([ops.softmax_forward(a)[0] for a in z])                # [L, N, E]
    idx = np.stack([ops.topk_indices(a, K) for a in scores])                 # [L, N, K]
    layers = [(scores[l][mine], idx[l][mine]) for l in range(len(z))]
    systems = {}
    for system, forward in (("megatron", megatron_global_forward), ("qwen", qwen_global_forward)):
        loss, cache = forward(comm, layers, valid_mask=mask[mine])
        systems[system] = (float(loss), np.stack(conv.layers_backward(1.0, cache)))

    if len(sys.argv) > 1:
        write_dumps(comm, sys.argv[1])
    gathered = comm.mpi_comm.gather((report, systems), root=0)
    if rank != 0:
        return 0

    errors = {}
    for j, (name, residual, dtype) in enumerate(RUNS):
        tag = f"{name}{'_residual' if residual else ''}{'_f32' if dtype == np.float32 else ''}"
        losses, grads, dx = one_process(params, x, t, mask, name, residual)
        grads_r, totals, _, _ = gathered[0][0][j]
        errors[f"step_{tag}_grads"] = max(rel(grads_r[k], grads[k]) for k in grads_r)
        errors[f"step_{tag}_losses"] = max(rel(totals[k], float(losses[k])) for k in totals)
        errors[f"step_{tag}_shares"] = max(rel(sum(g[0][j][2][k] for g in gathered), float(losses[k]))
                                           for k in totals)
        errors[f"step_{tag}_dx"] = rel(np.concatenate([g[0][j][3] for g in gathered]), dx)
    whole = [(scores[l], idx[l]) for l in range(len(z))]
    for system in ("megatron", "qwen"):
        want, wc = (conv.megatron_forward(whole, "global", valid_mask=mask) if system == "megatron"
                    else conv.hf_mixtral_forward(whole, valid_mask=mask))
        errors[f"{system}_global_loss"] = rel(sum(g[1][system][0] for g in gathered), float(want))
        errors[f"{system}_global_d_scores"] = rel(np.concatenate([g[1][system][1] for g in gathered], axis=1),
                                                  np.stack(conv.layers_backward(1.0, wc)))
    ok = same and all(v <= (1e-5 if "_f32" in k else 1e-12) for k, v in errors.items())
    print(json.dumps({"size": R, "sizes": list(SIZES[R]), "errors": errors, "identical": same,
                      "seconds": round(time.perf_counter() - start, 3)}), flush=True)
    return 0 if ok else 1


def write_dumps(comm, directory):
    """This rank's dumps of the golden per-rank cases of its group size (DIR/golden -> DIR/dump), through MPI."""
    from refmoe.golden import load_case, load_manifest, save_npz
    from refmoe.golden.dist_cases import dump_rank

    manifest = load_manifest(os.path.join(directory, "golden"))
    os.makedirs(os.path.join(directory, "dump"), exist_ok=True)
    for name, entry in sorted(manifest["cases"].items()):
        if entry.get("world_size") == comm.size and entry.get("rank") == comm.rank:
            arrays = load_case(os.path.join(directory, "golden"), name, manifest)
            save_npz(os.path.join(directory, "dump", f"{name}.npz"), dump_rank(comm, entry, arrays))


if __name__ == "__main__":
    sys.exit(main())
