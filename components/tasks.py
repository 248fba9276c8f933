"""The threads and processes a run may start: the limits on them, and what a run needs.

Linux counts threads and processes alike (tasks), against two limits a run meets on
shared machines: a cgroup's ``pids.max`` (a container's ``--pids-limit``, a Kubernetes
pod's, a Slurm job's cgroup) and, for a user other than root, ``ulimit -u`` (every thread
of the user's processes counts). A run at such a limit failed wherever it next started a
thread: "can't start new thread" from checkpoint hashing, a Rust panic from the
tokenizer's thread pool, libgomp's "Thread creation failed" (an exit, no traceback), or
it hung: a loader worker whose own threads could not start left its trainer waiting.
So the limit is compared with what the run needs at its start (a warning), and a failure
to start a thread or process is said as the limit, with its figures, in one line.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple

from letrecipes.components.errors import LetRecipesError, errors_within

CGROUP_ROOT = "/sys/fs/cgroup"
TASKS_PER_LOADER_WORKER = 5  # a process, its queue's feeder, its batch-passing and signal threads (pids.peak)
# "Resource temporarily unavailable" is how clone() refuses a task at the limit; Python says
# "can't start new thread", Rust's thread pools the errno's text
STARTING_A_TASK_FAILED = ("can't start new thread", "Thread creation failed", "failed to spawn thread",
                          "ThreadPoolBuildError")


class TaskLimitError(LetRecipesError):
    """A thread or process could not start: the machine's or container's limit on them."""


def headroom(proc: str = "/proc", cgroup_root: str = CGROUP_ROOT) -> Optional[Tuple[int, str]]:
    """How many more tasks this process may start, and the limit that says so, in words
    (``"its cgroup's pids.max 12, 9 in use"``): the tightest of its cgroups' ``pids.max``
    (v2, and v1's pids controller) and ``ulimit -u``. None where no limit is set."""
    found = list(_cgroup_limits(proc, cgroup_root))
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:  # root is not held to ulimit -u
        in_use = _tasks_of_user(os.getuid(), proc)
        if in_use is not None:
            found.append((soft - in_use, f"ulimit -u {soft}, {in_use} of this user's threads and processes in use"))
    return min(found) if found else None


def _cgroup_limits(proc: str, cgroup_root: str) -> Iterator[Tuple[int, str]]:
    """(room left, words) for each cgroup of this process, and each above it, that sets pids.max."""
    try:
        lines = Path(proc, "self", "cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base = Path(cgroup_root)  # v2: one hierarchy
        elif "pids" in parts[1].split(","):
            base = Path(cgroup_root, "pids")  # v1: the pids controller's own
        else:
            continue
        folder = base / parts[2].lstrip("/")
        for level in (folder, *folder.parents):
            if base not in (level, *level.parents):
                break
            try:
                limit = (level / "pids.max").read_text().strip()
                current = int((level / "pids.current").read_text().strip())
            except (OSError, ValueError):
                continue
            if limit.isdigit():
                yield int(limit) - current, f"its cgroup's pids.max {limit}, {current} in use"


def _tasks_of_user(uid: int, proc: str) -> Optional[int]:
    """The threads of every process whose real user is ``uid``: what ``ulimit -u`` counts."""
    total = 0
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return None
    for pid in entries:
        try:
            fields = dict(line.split(":", 1) for line in Path(proc, pid, "status").read_text().splitlines()
                          if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return total


def needed(torch_threads: int, num_workers: int, tokenizer_threads: int, hash_threads: int,
           compile_threads: int = 0) -> int:
    """About how many tasks one training process starts at its peak. From runs in a pids
    cgroup of their own (pids.peak, 2 cores; docs/reliability.md): the main thread, torch's
    threads, 2 of Python's and the checkpoint's hashing pool; then the larger of the
    tokenizer's pool while a corpus is prepared and, in training, 5 per loader worker and
    what compile=true runs (a pool of ``compile_threads`` processes, 2 tasks each, and 3 more)."""
    training = TASKS_PER_LOADER_WORKER * num_workers + (3 + 2 * compile_threads if compile_threads else 0)
    return 1 + torch_threads + 2 + hash_threads + max(tokenizer_threads, training)


def own_tasks(proc: str = "/proc") -> int:
    """The threads this process has now."""
    try:
        for line in Path(proc, "self", "status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 1


def start_failure(err: BaseException) -> Optional[str]:
    """What failed, when ``err`` (or an error it carries) is a thread or process that could not
    start (``RuntimeError: can't start new thread``, a fork's EAGAIN, a Rust thread pool's
    panic); None for any other error."""
    for err in errors_within(err):
        text = str(err)
        if isinstance(err, OSError) and err.errno == errno.EAGAIN and not err.filename:
            return f"a process could not be started ({type(err).__name__}: {err.strerror or text})"
        if any(sign in text for sign in STARTING_A_TASK_FAILED):
            first = (text.strip().splitlines() or [""])[0][:160]
            return f"a thread could not be started ({type(err).__name__}: {first})"
        if "DataLoader worker" in text and "exited unexpectedly" in text:
            # the worker's own error stays in the worker (its traceback above); where the limit leaves less
            # than a worker's tasks, starting one of its threads is what it died of
            room = headroom()
            if room is not None and room[0] < TASKS_PER_LOADER_WORKER:
                return ("a data loader worker exited unexpectedly (its traceback is above: at this limit, a thread "
                        "it started)")
    return None


def limit_error(failure: str, doing: str, kept: str, then: str) -> TaskLimitError:
    """The one line for a thread or process that could not start, named by the limit that
    binds now (``pids.max``, ``ulimit -u``), or both where none is seen from here."""
    room = headroom()
    if room is None:
        limit = ("no limit on threads and processes is seen from here: look at ulimit -u, the container's pids "
                 "limit, and the memory for their stacks (ulimit -v, a cgroup's memory.max)")
    else:
        limit = f"the threads and processes this process may start are at or near their limit ({room[1]})"
    quiet_later_failures_to_start()
    if multiprocessing.active_children():  # a loader worker dying of the same limit prints its traceback as it
        _wait(0.5)  # goes: let it land before the line, which stays the last one
    return TaskLimitError(f"{limit_name(room)}: {doing} failed: {failure}: {limit}. {kept + ' ' if kept else ''}"
                          f"Fix: {FIX}, then {then}.")


def _wait(seconds: float) -> None:
    """Sleep, through torch's SIGCHLD handler raising that a loader worker died meanwhile
    (of the limit being said)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except RuntimeError:
            continue


def limit_name(room: Optional[Tuple[int, str]]) -> str:
    """The key of a line about the limit: ``pids.max`` or ``ulimit -u`` (``threads`` where unknown)."""
    if room is None:
        return "threads"
    return "ulimit -u" if room[1].startswith("ulimit") else "pids.max"


def quiet_later_failures_to_start() -> None:
    """Once the limit is said, the same failure again as the process ends is no news, and
    neither is a data loader's cleanup when it is collected (it starts a thread to stop its
    workers; one whose worker could not be forked is half-built and raises AttributeError):
    Python printed each as an "Exception ignored in ..." traceback after the line. Other
    such errors still print."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        loader = "DataLoaderIter" in getattr(unraisable.object, "__qualname__", "")
        if not loader and (unraisable.exc_value is None or start_failure(unraisable.exc_value) is None):
            previous(unraisable)

    sys.unraisablehook = hook


FIX = ("raise the limit (ulimit -u unlimited, up to ulimit -Hu; docker run --pids-limit; the pod's or job's pids "
       "limit), or start fewer: data.num_workers=0, OMP_NUM_THREADS=1, RAYON_NUM_THREADS=1 (the tokenizer)")
