"""Elapsed time and ETAs for long work: training (:class:`ProgressClock`, on every log line),
``prepare-data`` and ``export`` (:func:`elapsed_and_eta`). Torch-free: prepare workers import it."""

from __future__ import annotations

import time
from typing import Dict, Optional


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressClock:
    """Elapsed time, a smoothed throughput and an ETA for every log line, so that a run's
    log redirected to a file (a cluster job's) says how far it is and how long is left;
    the progress bar does the same on a terminal only.

    The rate is a moving average of steps per second between log lines, measured on the
    wall clock: evaluations and checkpoints are in it, as they are in what is left. The
    first interval holds the start-up (compiling the blocks, warming the allocator, minutes
    at 7B on a GPU): it gives the first line its figures, and the second interval replaces
    them instead of being averaged with them."""

    def __init__(self, max_steps: int, step: int, tokens_per_step: int, smoothing: float = 0.7):
        self.max_steps, self.tokens_per_step, self.smoothing = max_steps, tokens_per_step, smoothing
        self.start = self.last_time = time.perf_counter()
        self.last_step = step
        self.steps_per_s: Optional[float] = None
        self.intervals = 0

    def update(self, step: int) -> Dict[str, float]:
        now = time.perf_counter()
        steps, seconds = step - self.last_step, now - self.last_time
        if steps > 0 and seconds > 0:
            rate = steps / seconds
            self.intervals += 1
            self.steps_per_s = rate if self.intervals <= 2 else \
                self.smoothing * self.steps_per_s + (1 - self.smoothing) * rate
            self.last_step, self.last_time = step, now
        out = {"elapsed_s": now - self.start}
        if self.steps_per_s:
            out.update({"tokens_per_s_avg": self.steps_per_s * self.tokens_per_step,
                        "eta_s": max(0, self.max_steps - step) / self.steps_per_s})
        return out


def elapsed_and_eta(elapsed: float, done: float, total: float) -> str:
    """``elapsed 1m05s, ETA 4h00m00s`` for work measured in any unit (bytes, units), the rest
    assumed to go at the rate so far."""
    eta = elapsed * max(0.0, total - done) / done if done > 0 else None
    return f"elapsed {clock(elapsed)}, ETA {clock(eta) if eta is not None else 'unknown'}"


PROGRESS_EVERY_S = 10.0  # long work that is not a training step says how far it is, this often


class ByteProgress:
    """``<what>: 3.21 of 15.05 GB <verb>, 210 MB/s, elapsed 15s, ETA 56s`` every
    ``PROGRESS_EVERY_S`` seconds while ``add`` counts bytes done (an export, loading a
    teacher: minutes at 7B)."""

    def __init__(self, what: str, verb: str, total_bytes: float, log) -> None:
        self.what, self.verb, self.total, self.log = what, verb, total_bytes, log
        self.done = 0.0
        self.start = self.last = time.perf_counter()

    def add(self, nbytes: float) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last, elapsed = now, now - self.start
            scale, unit = (1e9, "GB") if self.total >= 1e9 else (1e6, "MB")
            rate = self.done / max(elapsed, 1e-9) / 1e6
            self.log(f"{self.what}: {self.done / scale:.2f} of {self.total / scale:.2f} {unit} {self.verb}, "
                     f"{rate:,.0f} MB/s, {elapsed_and_eta(elapsed, self.done, self.total)}")
