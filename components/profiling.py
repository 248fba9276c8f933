"""``profiler``: torch.profiler over a window of training steps, named by the run's own step numbers.

``profiler.enabled=true profiler.first_step=20 profiler.steps=3`` traces steps 20, 21 and 22
(on rank 0 unless ``profiler.ranks`` says otherwise) and writes, per rank, a Chrome trace
(``<output_dir>/profile/steps_20-22/rank0.trace.json.gz``: open it in https://ui.perfetto.dev)
and a table of the ops by self time (``rank0.ops.txt``, its top lines also logged).

Why not torchtune's ``setup_torch_profiler``: it counts its wait/warmup/active schedule
from the process's first step, so a resumed run traces other steps than the same config
did before it was interrupted, and its handler names every rank's trace ``r0-<minute>``,
so the ranks of one job overwrite each other's files in a shared folder. Here the window
is the run's steps, whatever launch reaches them, and each rank writes its own file.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Union

import torch

PROFILE_FOLDER = "profile"
TOP_OPS_LOGGED = 5


class StepProfiler:
    """Traces the steps ``first_step`` .. ``first_step + steps - 1`` of a run that has already
    taken ``done_steps``: call :meth:`start` before the first step of this launch,
    :meth:`step_done` after each step, :meth:`close` at the end (a window cut short by a
    stop or an error is written with the steps it holds)."""

    def __init__(self, folder: Path, first_step: int, steps: int, done_steps: int, device: torch.device,
                 rank: int = 0, record_shapes: bool = True, profile_memory: bool = False, with_stack: bool = False,
                 with_flops: bool = False, log: Callable[[str], None] = print):
        self.folder, self.rank, self.log, self.device = Path(folder), rank, log, device
        self.begin = max(first_step, done_steps + 1)  # a resumed run may already be inside the window
        self.end = first_step + steps - 1
        self.recorded: List[int] = []  # steps traced so far in this launch
        self.export_seconds = 0.0  # spent writing traces: not training time
        self.profile: Optional[torch.profiler.profile] = None
        if self.begin > self.end:
            return
        # One warm-up step before the window when there is one: the profiler's start-up cost
        # lands there, not in the first traced step.
        lead = self.begin - done_steps - 1
        warmup = 1 if lead >= 1 else 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # no warm-up step when a resume lands in the window: said in the log
            warnings.filterwarnings("ignore", message=".*won't be using warmup.*")
            schedule = torch.profiler.schedule(wait=lead - warmup, warmup=warmup, active=self.end - self.begin + 1,
                                               repeat=1)
        self.profile = torch.profiler.profile(
            activities=activities, record_shapes=record_shapes or profile_memory, profile_memory=profile_memory,
            with_stack=with_stack or profile_memory, with_flops=with_flops, schedule=schedule,
            on_trace_ready=self._write)

    @property
    def window(self) -> str:
        return f"steps {self.begin}-{self.end}" if self.end > self.begin else f"step {self.begin}"

    def start(self) -> None:
        if self.profile is not None:
            self.profile.start()

    def step_done(self, step: int) -> float:
        """After training step ``step`` (the run's count); returns the seconds spent writing
        a trace, which the caller's step timing leaves out."""
        if self.profile is None:
            return 0.0
        if self.begin <= step <= self.end:
            self.recorded.append(step)
        before = self.export_seconds
        self.profile.step()
        if step >= self.end:  # the window is written: nothing more to trace in this launch
            self.profile.stop()
            self.profile = None
        return self.export_seconds - before

    def close(self) -> None:
        """Stop tracing; a window begun and not finished is written with what it holds."""
        if self.profile is None:
            return
        profile, self.profile = self.profile, None
        try:
            profile.stop()
        except Exception as err:  # noqa: BLE001 - the run's own outcome matters more than its trace
            self.log(f"profiler: the trace of {self.window} was not written ({type(err).__name__}: {err})")

    def _write(self, profile: torch.profiler.profile) -> None:
        began = time.perf_counter()
        first, last = (self.recorded[0], self.recorded[-1]) if self.recorded else (self.begin, self.begin)
        folder = self.folder / (f"steps_{first}-{last}" if last > first else f"step_{first}")
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"rank{self.rank}.trace.json.gz"
        profile.export_chrome_trace(str(trace))
        cuda = self.device.type == "cuda"
        averages = profile.key_averages()
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        (folder / f"rank{self.rank}.ops.txt").write_text(averages.table(sort_by=sort_by, row_limit=40) + "\n")
        self.export_seconds += time.perf_counter() - began
        steps = f"steps {first}-{last}" if last > first else f"step {first}"
        note = "" if len(self.recorded) == self.end - self.begin + 1 else f" (cut short: {len(self.recorded)} traced)"
        self.log(f"profiler: {steps} traced on rank {self.rank}{note}: {trace} (open in https://ui.perfetto.dev), "
                 f"ops by self time in {folder / f'rank{self.rank}.ops.txt'}; {top_ops(averages, cuda)}; written in "
                 f"{self.export_seconds:.1f} s")


def top_ops(averages, cuda: bool, count: int = TOP_OPS_LOGGED) -> str:
    """The ops that took the most self time in the traced steps, with their share."""
    def self_time(event) -> float:
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    events = [e for e in averages if self_time(e) > 0]
    total = sum(self_time(e) for e in events)
    if not total:
        return "no op took measurable time"
    ranked = sorted(events, key=self_time, reverse=True)[:count]
    where = "GPU" if cuda else "CPU"
    return f"most {where} self time: " + ", ".join(f"{e.key} {self_time(e) / total:.0%}" for e in ranked)


def traced_ranks(ranks: Union[str, Iterable[int], None]) -> Optional[set]:
    """``profiler.ranks``: a list of ranks, or ``all`` (None)."""
    if ranks is None or ranks == "all":
        return None
    return {int(r) for r in ranks}


def build_profiler(spec: Optional[Mapping], output_dir: Path, done_steps: int, max_steps: int, device: torch.device,
                   rank: int, log: Callable[[str], None] = print) -> Optional[StepProfiler]:
    """The config's ``profiler`` section as a :class:`StepProfiler` for this rank, or None
    (disabled, another rank's, or a window this launch does not reach)."""
    spec = dict(spec or {})
    if not spec.get("enabled", False):
        return None
    ranks = traced_ranks(spec.get("ranks", [0]))
    if ranks is not None and rank not in ranks:
        return None
    first, steps = int(spec.get("first_step", 10)), int(spec.get("steps", 3))
    last = min(first + steps - 1, max_steps)
    if last < done_steps + 1:
        log(f"profiler: steps {first}-{first + steps - 1} were trained before this launch (it starts at step "
            f"{done_steps + 1}): nothing is traced. Fix: profiler.first_step={done_steps + 1} or later")
        return None
    profiler = StepProfiler(Path(output_dir) / PROFILE_FOLDER, first, last - first + 1, done_steps, device, rank,
                            record_shapes=bool(spec.get("record_shapes", True)),
                            profile_memory=bool(spec.get("profile_memory", False)),
                            with_stack=bool(spec.get("with_stack", False)), with_flops=bool(spec.get("with_flops", False)),
                            log=log)
    cold = " (no warm-up step before it: its first step carries the profiler's start)" \
        if profiler.begin == done_steps + 1 else ""
    log(f"profiler: tracing {profiler.window} on rank {rank}{cold} (those steps run slower: their tokens/s is the "
        "profiler's, not the run's)")
    return profiler
