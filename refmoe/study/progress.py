"""What ``refmoe reproduce`` prints while it trains: ``run i/N <name> ... ETA mm:ss`` before each training run.

    progress = Progress(count_runs(study), count_steps(study))
    run_study(study, status=progress.note, progress=progress)

Runs may overlap (``refmoe.study.parallel`` trains several at once): each start names the worker it runs on,
and a worker's previous run counts as done when its next one starts.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 6000:                                   # 100 minutes and more: hours and minutes
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class Progress:
    """``run i/N <name> ... ETA mm:ss``: on a terminal one line rewritten in place, otherwise (piped, a log
    file) one plain line per run. The ETA is the elapsed time per finished optimizer step so far times the steps
    left (pre-training and fine-tuning runs differ in length); ``--:--`` before the first run ends.
    """

    def __init__(self, total_runs: int, total_steps: int, *, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total_runs, self.total_steps = total_runs, max(1, total_steps)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.clock = clock
        self.i, self.done_steps = 0, 0
        self.running = {}                   # worker -> steps of the run it is on
        self.t0 = None
        self.line = ""

    def eta(self) -> str:
        if self.done_steps == 0 or self.t0 is None:
            return "--:--"
        rate = (self.clock() - self.t0) / self.done_steps
        return _mmss(rate * (self.total_steps - self.done_steps))

    def start(self, name: str, steps: int, worker=0):
        """A training run of ``steps`` steps begins on ``worker`` (whose previous run, if any, has finished)."""
        if self.t0 is None:
            self.t0 = self.clock()
        self.done_steps += self.running.pop(worker, 0)
        self.running[worker] = steps
        self.i += 1
        self.line = f"run {self.i}/{self.total_runs} {name} ... ETA {self.eta()}"
        self._show()

    def note(self, text: str):
        """A line of detail (a logging step's losses) printed above the progress line."""
        if self.tty:
            self.stream.write("\r\x1b[K" + text + "\n")
            self._show()
        else:
            print(text, file=self.stream, flush=True)

    def _show(self):
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line)
            self.stream.flush()
        else:
            print(self.line, file=self.stream, flush=True)

    def close(self):
        """Ends the updating line on a terminal (the last run has finished or the study was interrupted)."""
        if self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""
