"""The limit on threads and processes a run meets in a container or on a shared machine (a
cgroup's pids.max, ``ulimit -u``): found, compared with what a run starts, and a thread or
process that cannot start said in one line (components/tasks.py). Before, a run at the
limit failed in a traceback from wherever it next started a thread, or hung for good."""

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from letrecipes.components import tasks
from letrecipes.components.files import environment_errors
from tests.launch import REPO, recipe_command


def _cgroup(folder: Path, limit: str, current: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pids.max").write_text(f"{limit}\n")
    (folder / "pids.current").write_text(f"{current}\n")


def _no_ulimit(monkeypatch) -> None:
    monkeypatch.setattr(tasks.resource, "getrlimit", lambda which: (tasks.resource.RLIM_INFINITY,) * 2)


def test_the_tightest_limit_of_a_process_cgroups_is_found(tmp_path, monkeypatch):
    """v1's pids controller and v2's one hierarchy, each cgroup of the process and those above it."""
    _no_ulimit(monkeypatch)
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("12:pids:/docker/abc\n4:memory:/x\n0::/kubepods/pod1/c1\n")
    _cgroup(root / "pids" / "docker" / "abc", "100", 90)  # a container's --pids-limit
    _cgroup(root / "kubepods" / "pod1", "50", 45)  # a pod's limit, above its container's cgroup
    _cgroup(root / "kubepods" / "pod1" / "c1", "max", 45)  # no limit of its own
    assert tasks.headroom(str(proc), str(root)) == (5, "its cgroup's pids.max 50, 45 in use")
    (proc / "self" / "cgroup").write_text("0::/\n")  # the host's own root cgroup: no pids.max
    assert tasks.headroom(str(proc), str(root)) is None


def test_ulimit_u_counts_every_thread_of_the_user(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    for pid, uid, threads in ((10, 1000, 7), (11, 0, 50), (12, 1000, 3)):
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "status").write_text(f"Name:\tpython\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                                                f"Threads:\t{threads}\n")
    monkeypatch.setattr(tasks.resource, "getrlimit", lambda which: (40, 100))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert tasks.headroom(str(proc), str(tmp_path / "none")) == (
        30, "ulimit -u 40, 10 of this user's threads and processes in use")
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # root is not held to it
    assert tasks.headroom(str(proc), str(tmp_path / "none")) is None


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic (the tokenizers library's thread pool)."""


def test_a_thread_or_process_that_could_not_start_is_told_from_other_errors(monkeypatch):
    def chained():
        try:
            raise RuntimeError("can't start new thread")
        except RuntimeError as err:
            raise ValueError("the save failed") from err

    with pytest.raises(ValueError) as caught:
        chained()
    said = {
        "thread": tasks.start_failure(RuntimeError("can't start new thread")),
        "fork": tasks.start_failure(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")),
        "chain": tasks.start_failure(caught.value),
        "rust": tasks.start_failure(PanicException("The global thread pool has not been initialized.: "
                                                   "ThreadPoolBuildError { kind: IOError(Os { code: 11 }) }")),
    }
    assert said["thread"] == said["chain"] == "a thread could not be started (RuntimeError: can't start new thread)"
    assert said["fork"] == "a process could not be started (BlockingIOError: Resource temporarily unavailable)"
    assert said["rust"].startswith("a thread could not be started (PanicException: The global thread pool")
    assert tasks.start_failure(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable", "/run/x")) is None
    assert tasks.start_failure(ValueError("something else")) is None
    died = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    monkeypatch.setattr(tasks, "headroom", lambda: None)  # no limit: a worker died of something else
    assert tasks.start_failure(died) is None
    monkeypatch.setattr(tasks, "headroom", lambda: (2, "its cgroup's pids.max 12, 10 in use"))
    assert tasks.start_failure(died).startswith("a data loader worker exited unexpectedly")


def test_the_failure_is_one_line_naming_the_limit_what_is_kept_and_the_fix(monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # the error quiets later ones: restored after
    monkeypatch.setattr(tasks, "headroom", lambda: (0, "its cgroup's pids.max 12, 12 in use"))
    with pytest.raises(tasks.TaskLimitError) as caught:
        with environment_errors("output_dir", "training", kept="The last complete checkpoint, c/step_3, is intact.",
                                then="run the same command with resume=true"):
            raise RuntimeError("can't start new thread")
    assert str(caught.value) == (
        "pids.max: training failed: a thread could not be started (RuntimeError: can't start new thread): the threads "
        "and processes this process may start are at or near their limit (its cgroup's pids.max 12, 12 in use). The "
        "last complete checkpoint, c/step_3, is intact. Fix: raise the limit (ulimit -u unlimited, up to ulimit -Hu; "
        "docker run --pids-limit; the pod's or job's pids limit), or start fewer: data.num_workers=0, "
        "OMP_NUM_THREADS=1, RAYON_NUM_THREADS=1 (the tokenizer), then run the same command with resume=true.")


WORKER_START = """
import signal, sys, threading
from multiprocessing import resource_sharer
from letrecipes.components import data

refused = sys.argv[1]
start = threading.Thread.start
def refuse(thread):
    if refused == "all" or refused in getattr(getattr(thread, "_target", None), "__name__", ""):
        raise RuntimeError("can't start new thread")
    start(thread)
threading.Thread.start = refuse
try:
    data._leave_signals_to_the_trainer(0)
    print("started", resource_sharer._resource_sharer._thread is not None)
except RuntimeError as err:
    print("raised", err)
print("SIGTERM blocked", signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set()))
"""


@pytest.mark.parametrize("refused, said", [
    ("none", "started True\nSIGTERM blocked True"),  # the SIGTERM thread takes it; batches' thread runs from the start
    ("all", "raised can't start new thread\nSIGTERM blocked False"),  # the batch-passing thread first
    ("take_sigterm", "raised can't start new thread\nSIGTERM blocked False")])
def test_a_loader_worker_that_cannot_start_its_threads_fails_at_once_and_stays_stoppable(refused, said):
    """At the limit, a worker's SIGTERM thread failed after SIGTERM was blocked: deaf to its
    trainer's terminate(), the trainer's exit waited on it for good. Its batch-passing thread
    (multiprocessing's resource sharer) failed at the first batch after its socket was open,
    and the trainer waited for its answer for good. Both now fail as the worker starts,
    with SIGTERM left as it was, and torch hands the error to the trainer."""
    result = subprocess.run([sys.executable, "-c", WORKER_START, refused], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == said, result.stderr[-2000:]


def _pids_cgroup() -> Path:
    """A cgroup of our own with the pids controller (cgroup v1 or v2), or skip."""
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    name = f"letrecipes-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup")
    candidates = [Path("/sys/fs/cgroup/pids")]
    try:
        if "pids" in (v2 / "cgroup.subtree_control").read_text().split():
            candidates.append(v2)
    except OSError:
        pass
    for base in candidates:
        try:
            folder = base / name
            folder.mkdir()
        except OSError:
            continue
        if (folder / "pids.max").exists():
            return folder
        folder.rmdir()
    pytest.skip("no pids cgroup can be made on this machine")


def test_a_run_in_a_container_short_of_threads_warns_then_ends_in_one_line(base_overrides, tmp_path):
    """A real pids limit of 6 on a run with two loader workers: the start-up warning, then one
    line naming the limit (in the sweep that found it, 4 to 16 ended in tracebacks or hung)."""
    cgroup = _pids_cgroup()
    try:
        (cgroup / "pids.max").write_text("6")
        cmd = recipe_command("pretrain", "--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                             f"data.cache_dir={tmp_path / 'cache'}", "max_steps=4", "save_every=2",
                             "data.num_workers=2")
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env,
                                preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():  # a run that hung, and its workers
            os.kill(int(pid), signal.SIGKILL)
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: pids.max: "), result.stderr[-3000:]
    assert "its cgroup's pids.max 6, " in lines[-1] and "Fix: raise the limit" in lines[-1]
    assert "warning: pids.max: this run starts about" in result.stdout + result.stderr
