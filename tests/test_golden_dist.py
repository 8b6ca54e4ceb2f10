"""The per-rank golden cases (dist_*_r<R>_rank<r>): fields, their numbers against the one-process run on the
concatenated batch, central differences of the stored slices, and dumps made through a communicator.

tests/test_distributed_mpi.py checks the same cases with dumps written under mpiexec.
"""
import os

import numpy as np
import pytest

import refmoe
from refmoe import ops
from refmoe.golden import check_dump, load_case, load_manifest, save_npz
from refmoe.golden.dist_cases import dump_rank, layer_objective
from refmoe.gradcheck import check_vjp
from refmoe.losses import aux_conventions as conv
from helpers import assert_all_below
from thread_comm import ThreadComm, run_ranks


def groups(golden, names=False):
    """group -> [(entry, arrays)] in rank order ([(name, entry, arrays)] with ``names``)."""
    m = load_manifest(golden)
    out = {}
    for name, e in m["cases"].items():
        if "world_size" in e:
            out.setdefault(e["group"], []).append((name, e, load_case(golden, name, m)))
    ordered = {g: sorted(v, key=lambda nea: nea[1]["rank"]) for g, v in out.items()}
    return ordered if names else {g: [(e, a) for _, e, a in v] for g, v in ordered.items()}


def test_every_group_has_its_ranks(golden):
    g = groups(golden)
    assert sorted(g) == sorted(f"dist_{s}_r{R}" for s in ("megatron_global", "qwen_global", "layer") for R in (2, 3))
    for name, ranks in g.items():
        sizes = ranks[0][0]["rank_sizes"]
        assert [e["rank"] for e, _ in ranks] == list(range(len(sizes))) == list(range(ranks[0][0]["world_size"]))
        for e, a in ranks:
            assert e["n_tokens"] == sizes[e["rank"]] == a["input/valid_mask"].shape[0]
            assert e["padding_tokens"] == np.nonzero(~a["input/valid_mask"])[0].tolist()
            for key in ("inter/global_counts", "inter/global_tokens"):    # what the all-reduce returns
                assert np.array_equal(a[key], ranks[0][1][key]), (name, key)
        padded = [bool(e["padding_tokens"]) for e, _ in ranks]
        assert any(padded) and not all(padded), name                              # padding on some ranks
        assert len(set(sizes)) == len(sizes) or 0 in sizes, name                 # uneven ranks
    assert 0 in g["dist_megatron_global_r3"][0][0]["rank_sizes"]                 # a rank without tokens
    layer3 = g["dist_layer_r3"]
    assert not layer3[1][1]["input/valid_mask"].any()                              # a rank all padding


def _concat(ranks, key, axis=0):
    return np.concatenate([a[key] for _, a in ranks], axis=axis)


@pytest.mark.parametrize("system", ["megatron_global", "qwen_global"])
def test_system_groups_are_the_concatenated_batch(golden, system):
    for R in (2, 3):
        ranks = groups(golden)[f"dist_{system}_r{R}"]
        logits, mask = _concat(ranks, "input/logits", axis=1), _concat(ranks, "input/valid_mask")
        scores = np.stack([ops.softmax_forward(z)[0] for z in logits])
        idx = _concat(ranks, "inter/topk_idx", axis=1)
        layers = list(zip(scores, idx))
        loss, cache = (conv.megatron_forward(layers, "global", valid_mask=mask) if system == "megatron_global"
                       else conv.hf_mixtral_forward(layers, valid_mask=mask))
        d = np.stack([ops.softmax_backward(g, s) for g, s in zip(conv.layers_backward(1.0, cache), scores)])
        assert sum(float(a["loss/aux"]) for _, a in ranks) == pytest.approx(float(loss), rel=1e-13)
        assert all(float(a["loss/aux_global"]) == pytest.approx(float(loss), rel=1e-13) for _, a in ranks)
        assert np.abs(_concat(ranks, "grad/aux/logits", axis=1) - d).max() < 1e-13 * np.abs(d).max()
        stats = conv.part_counts(layers, mask)
        assert np.array_equal(ranks[0][1]["inter/global_counts"], np.stack(stats.counts))
        assert float(ranks[0][1]["inter/global_tokens"]) == mask.sum()

        # the last rank's stored slice by central differences of the concatenated batch's loss in its logits
        r = R - 1
        lo = sum(ranks[q][0]["n_tokens"] for q in range(r))

        def f(inp):
            z = logits.copy()
            z[:, lo:] = inp["z"]
            ls = [(ops.softmax_forward(a)[0], i) for a, i in zip(z, idx)]
            return (conv.megatron_forward(ls, "global", valid_mask=mask) if system == "megatron_global"
                    else conv.hf_mixtral_forward(ls, valid_mask=mask))[0]

        assert_all_below(check_vjp(f, {"z": logits[:, lo:]}, {"z": ranks[r][1]["grad/aux/logits"]}))  # ~1e-9


def test_layer_groups_are_the_concatenated_batch(golden):
    for R in (2, 3):
        ranks = groups(golden)[f"dist_layer_r{R}"]
        e = ranks[0][0]
        c = e["config"]
        cfg = refmoe.MoEConfig(c["d_model"], c["d_hidden"], c["n_experts"], c["top_k"], c["n_shared"])
        params = {k[len("param/"):]: v for k, v in ranks[0][1].items() if k.startswith("param/")}
        x, dy, mask = _concat(ranks, "input/x"), _concat(ranks, "input/dy"), _concat(ranks, "input/valid_mask")
        obj = layer_objective(e)
        res = refmoe.objective_forward_backward(x, params, cfg, dy, obj, valid_mask=mask)
        want = dict(res.losses, task=(dy * res.y).sum(), total=(dy * res.y).sum() + res.losses["regularisers"])
        for term in ("task", "aux", "ortho", "var", "total"):
            assert sum(float(a[f"loss/{term}"]) for _, a in ranks) == pytest.approx(float(want[term]), rel=1e-13), term
            assert float(ranks[-1][1][f"loss/{term}_global"]) == pytest.approx(float(want[term]), rel=1e-13)
        for term in ("task", "aux", "ortho", "var", "total"):
            want = res.grads[term]["x"]
            assert np.abs(_concat(ranks, f"grad/{term}/x") - want).max() <= 1e-13 * np.abs(want).max(), term
            for p in params:
                want = res.grads[term][p]
                got = sum(a[f"grad/{term}/{p}"] for _, a in ranks)            # what a data-parallel step sums
                assert np.abs(got - want).max() <= 1e-13 * max(np.abs(want).max(), 1e-300), (term, p)
        assert ranks[0][1]["inter/global_score_sums"].shape == (cfg.n_experts,)

        # rank 0's stored x slice by central differences of the concatenated batch's objective in its rows
        n0 = e["n_tokens"]

        def f(inp):
            xx = np.concatenate([inp["x"], x[n0:]])
            y, oc = refmoe.objective_forward(xx, params, cfg, obj, valid_mask=mask)
            o = oc.values
            return (dy * y).sum() + obj.alpha * o["aux"] + obj.beta * o["ortho"] + obj.gamma * o["var"]

        guard = lambda inp: refmoe.moe_forward(np.concatenate([inp["x"], x[n0:]]), params, cfg)[1].topk_idx
        errs = check_vjp(f, {"x": x[:n0]}, {"x": ranks[0][1]["grad/total/x"]}, guard=guard)
        assert_all_below(errs)                                                      # measured ~1e-10


class _AveragingComm(ThreadComm):
    """The porting mistake of averaging the counts over the ranks: every all-reduce divides its sum by R."""

    def _allreduce(self, flat, op):
        out = super()._allreduce(flat, op)
        return out / self.size if op == "sum" else out


def _dump_groups(golden, directory, comm_class=None):
    """Every rank of every group dumps its case through a communicator on threads; returns the case names."""
    os.makedirs(directory)
    done = []
    for ranks in groups(golden, names=True).values():
        def fn(comm):
            if comm_class is not None:
                comm.__class__ = comm_class                    # the same group, another all-reduce
            name, e, a = ranks[comm.rank]
            save_npz(os.path.join(directory, f"{name}.npz"), dump_rank(comm, e, a))
        run_ranks(len(ranks), fn)
        done += [name for name, _, _ in ranks]
    return sorted(done)


def test_dumps_through_a_communicator_pass_and_averaged_counts_fail(golden, tmp_path):
    cases = _dump_groups(golden, str(tmp_path / "ok"))
    report = check_dump(golden, str(tmp_path / "ok"), cases=cases, require_all=True)
    assert report.ok and len(report.checked) == len(cases) == 15, report.format()

    _dump_groups(golden, str(tmp_path / "mean"), _AveragingComm)
    report = check_dump(golden, str(tmp_path / "mean"), cases=cases, require_all=True)
    failed = {r.case for r in report.failures}
    assert failed == set(cases)
    first = {case: next(r.key for r in report.failures if r.case == case) for case in failed}
    assert set(first.values()) == {"inter/global_counts"}, first           # the first stage where it departs
    with pytest.raises(ValueError, match="rank 0 of 2"):
        e, a = groups(golden)["dist_layer_r2"][0]
        dump_rank(refmoe.distributed.SingleProcess(), e, a)
