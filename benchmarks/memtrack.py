"""Peak memory of a block of code: host RSS (sampled) and CuPy's memory pool (hooked).

RssPeak      samples /proc/self/statm every 0.5 ms in a thread; ``peak_increase`` is the peak RSS during the
             block minus the RSS at its start (bytes). Works for NumPy and PyTorch CPU alike.
GpuPeak      counts every allocation and release of CuPy's default pool; ``peak_used`` is the largest number
             of bytes in use (held by live arrays) during the block, parameters and inputs included;
             ``pool_total`` is what the pool holds from the device at the end. Compare with
             torch.cuda.max_memory_allocated / max_memory_reserved.
"""
from __future__ import annotations

import os
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class RssPeak:
    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.peak_increase = self.peak - self.start
        return False


class GpuPeak:
    def __enter__(self):
        import cupy
        from cupy.cuda import memory_hook

        pool = cupy.get_default_memory_pool()
        tracker = self

        class _Hook(memory_hook.MemoryHook):
            name = "refmoe_peak"

            def malloc_postprocess(self, **kw):
                tracker.used += kw["mem_size"]
                tracker.peak_used = max(tracker.peak_used, tracker.used)

            def free_postprocess(self, **kw):
                tracker.used -= kw["mem_size"]

        self._pool = pool
        self.used = self.peak_used = pool.used_bytes()
        self._hook = _Hook()
        self._hook.__enter__()
        return self

    def __exit__(self, *exc):
        self._hook.__exit__(*exc)
        self.pool_total = self._pool.total_bytes()
        return False
