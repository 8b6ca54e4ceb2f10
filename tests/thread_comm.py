"""An in-process group of R ranks on threads, for tests only (the library's adapters are MPI and NCCL).

Each rank runs in its own thread; an all-reduce puts the rank's array in a slot, waits for every rank, and
reduces the slots in rank order, so every rank gets the same bits. An exception on one rank aborts the barrier,
so the others fail instead of waiting for ever.
"""
import threading

import numpy as np

from refmoe.backend import array_namespace
from refmoe.distributed import Communicator


class _Group:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size
        self.calls = [0] * size          # collectives each rank has made (the tests count them)


class ThreadComm(Communicator):
    library = None

    def __init__(self, group: _Group, rank: int):
        self._group, self.rank, self.size = group, rank, group.size

    def _allreduce(self, flat, op):
        g = self._group
        g.calls[self.rank] += 1
        g.slots[self.rank] = flat
        g.barrier.wait()
        shapes = {tuple(a.shape) for a in g.slots}
        if len(shapes) != 1:
            g.barrier.abort()
            raise RuntimeError(f"ranks all-reduce arrays of different shapes {sorted(shapes)}")
        xp = array_namespace(*g.slots)
        out = g.slots[0].copy()
        for a in g.slots[1:]:
            out = out + a if op == "sum" else xp.maximum(out, a)
        g.barrier.wait()                 # every rank has read the slots before any overwrites its own
        return out


def run_ranks(size: int, fn):
    """[fn(comm_0), ..., fn(comm_{R-1})], each call on its own thread with a ThreadComm of one group;
    re-raises the first exception. Also returns the number of collectives each rank made."""
    group = _Group(size)
    results, errors = [None] * size, [None] * size

    def work(r):
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as exc:     # noqa: B902 - reported below, after every thread stops
            errors[r] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results, list(group.calls)


def split(n_tokens, sizes):
    """Index arrays of consecutive parts of ``sizes`` tokens (summing to n_tokens)."""
    assert sum(sizes) == n_tokens
    ends = np.cumsum(sizes)
    return [np.arange(e - s, e) for s, e in zip(sizes, ends)]
