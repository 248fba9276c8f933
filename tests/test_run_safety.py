"""Issue 15: one run per folder, resume that checks what changed, checkpoints that vouch
for their bytes, nothing rewritten in place, errors of the environment.

Unit tests drive the components in-process; the end-to-end ones run real `tune run`
subprocesses (pretrain_tiny: a few seconds each).
"""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from letrecipes.components.checkpointing import Checkpointer, CheckpointError, Progress
from letrecipes.components.files import StorageError, check_writable_folder, environment_errors, replace_atomically
from letrecipes.components.metrics import read_metrics, truncate_after
from letrecipes.components.resume import ResumeChangeError, apply_settings, check, optimizer_settings
from letrecipes.components.run_lock import LOCK_FILE, RunLock, RunLockError
from tests.launch import recipe_command
from tests.test_hostile_input import digest

REPO = Path(__file__).resolve().parents[1]
COMMON = ("max_steps=8", "save_every=3", "log_every=1", "eval_every=4", "keep_last_checkpoints=3")
BASE: list = []  # the test corpus, tokenizer and tiny model (conftest's base_overrides)


@pytest.fixture(scope="module", autouse=True)
def test_corpus(base_overrides):
    BASE[:] = base_overrides
    return BASE


def command(out, *overrides):
    return recipe_command("pretrain", "--config", "pretrain_tiny", *BASE, *COMMON, f"output_dir={out}", *overrides)


def tune(out, *overrides, preexec=None, timeout=300):
    cmd = command(out, *overrides)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=preexec)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def losses(out):
    return {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def flip_a_byte(path: Path, offset: int = 100_000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def copy_of_a_run(tmp_path_factory, test_corpus):
    """``copy_of_a_run(to, *overrides)``: a copy at ``to`` of a run with these overrides, trained
    once in this module (a run that only prepares the folder a test needs costs about 7 s;
    the cases of one test that use it are kept on one worker: ``xdist_group``)."""
    trained = {}

    def copy(to: Path, *overrides: str) -> Path:
        if overrides not in trained:
            trained[overrides] = tmp_path_factory.mktemp("run") / "run"
            ok(tune(trained[overrides], *overrides))
        shutil.copytree(trained[overrides], to)
        return to
    return copy


@pytest.fixture(scope="module")
def straight(tmp_path_factory, test_corpus):
    out = tmp_path_factory.mktemp("straight")
    ok(tune(out))
    return out


# ------------------------------------------------------------------ 1: one run per folder
def test_lock_names_its_owner_and_is_stale_once_the_owner_is_gone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from letrecipes.components.run_lock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError, match=rf"in use by another run: pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    messages = []
    lock = RunLock(tmp_path).acquire(log=messages.append)  # the kernel dropped the dead owner's lock
    assert messages and f"from pid {holder.pid}" in messages[0] and "which is gone" in messages[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text(encoding="utf-8"))["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_launch_that_loses_the_race_by_a_moment_still_names_the_winner(tmp_path):
    # The winner holds the flock a moment before its name is in the file (CI caught a
    # loser reporting "a process that has not written its name yet").
    import fcntl
    import threading
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    owner = {"pid": 4242, "host": "winner", "started": "now", "argv": ["x"]}
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, json.dumps(owner).encode(), 0))
    writer.start()
    try:
        with pytest.raises(RunLockError, match="in use by another run: pid 4242 on winner"):
            RunLock(tmp_path).acquire()
    finally:
        writer.join()
        os.close(fd)


def test_a_lock_file_no_run_wrote_is_taken_over_or_named_not_a_traceback(tmp_path):
    """A lock file whose content is no owner's (a killed run's, then damaged or edited: a
    list, a string, an argv of numbers) was an AttributeError or TypeError at the next
    launch, when it names what it takes over, and in `letrecipes status` while held."""
    import fcntl

    from letrecipes.components.run_status import describe_status, run_status

    for content in ("[1]", '"x"', "3", '{"argv": 5, "pid": "a"}', '{"argv": [1, null], "host": ["h"]}'):
        (tmp_path / LOCK_FILE).write_text(content)
        lock = RunLock(tmp_path).acquire(log=lambda _: None)
        assert json.loads((tmp_path / LOCK_FILE).read_text(encoding="utf-8"))["pid"] == os.getpid()
        lock.release()
    (tmp_path / "run_info.json").write_text("{}")
    for content, named in (('{"pid": 7, "argv": [1, 2]}', "pid 7 on None, started None (1 2)"),
                           ("[1]", "a process that has not written its name yet")):
        (tmp_path / LOCK_FILE).write_text(content)
        held = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            assert named in describe_status(run_status(tmp_path)).splitlines()[0]
            if content.startswith("{"):
                with pytest.raises(RunLockError, match=re.escape(f"in use by another run: {named}")):
                    RunLock(tmp_path).acquire()
        finally:
            os.close(held)


def test_a_launch_during_a_status_probe_takes_the_lock(tmp_path):
    # `letrecipes status` holds a shared flock for an instant and never names itself: a run
    # launched in that instant was refused as "in use by a process that has not written its name".
    import fcntl
    import threading
    (tmp_path / LOCK_FILE).write_text("")
    probe = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    letting_go = threading.Timer(0.3, lambda: fcntl.flock(probe, fcntl.LOCK_UN))
    letting_go.start()
    try:
        lock = RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text(encoding="utf-8"))["pid"] == os.getpid()
        lock.release()
    finally:
        letting_go.join()
        os.close(probe)


def test_a_folder_that_is_not_a_runs_is_refused_even_with_overwrite(tmp_path):
    """``output_dir=/``, ``~``, a repository: a run would scatter its files among others and
    ``overwrite=true`` would delete their ``final``/``checkpoints``. Refused before any write;
    a folder with hidden files only (``.DS_Store``, ``.gitkeep``) is an empty one."""
    home = tmp_path / "home"
    (home / "final").mkdir(parents=True)
    (home / "final" / "thesis.tex").write_text("years of work")
    (home / "notes.md").write_text("mine")
    before = digest(home)
    for extra in ((), ("overwrite=true",)):
        result = tune(home, "max_steps=1", *extra)
        assert result.returncode == 1
        assert last_line(result).startswith(f"error: output_dir={str(home)!r} holds files that are not a run's "
                                            "(final, notes.md). A run writes only into a new or empty folder"), result.stderr
    assert digest(home) == before and not (home / LOCK_FILE).exists()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitkeep").write_text("")
    ok(tune(hidden, "max_steps=1", "save_every=0", "eval_every=0"))


def test_two_launches_at_once_one_trains_the_other_stops_naming_it(tmp_path, straight):
    cmd = command(tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[2] == 1)
    last = loser[1].strip().splitlines()[-1]
    # Launched together they race for the lock; on a loaded machine one may start only after the
    # other finished, and then finds a finished run. Either way it stops with one line, naming why.
    assert "is in use by another run: pid" in last or "already holds a run" in last, last
    assert losses(tmp_path) == losses(straight)  # one run's records, each step once, no torn lines
    assert not (tmp_path / LOCK_FILE).exists()


def test_resume_while_the_first_run_still_trains_is_refused(tmp_path):
    cmd = command(tmp_path, "max_steps=100000", "save_every=0")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").stat().st_size, first)
        second = tune(tmp_path, "resume=true")
        assert second.returncode == 1 and f"pid {first.pid}" in last_line(second)
        assert first.poll() is None  # the running run is untouched
    finally:
        first.kill()
        first.wait()
    ok(tune(tmp_path, "resume=true", "max_steps=4"))  # its owner is gone: the lock is taken over


# ------------------------------------------------------------------ 6: graceful stop, during a save
def test_sigterm_during_a_save_completes_it_and_stops_there(tmp_path, straight):
    stopped = tune(tmp_path, "debug.sigterm_during_save_at_step=6")
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert last_line(stopped).startswith("error: stopped by SIGTERM after step 6")
    assert (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    assert max(losses(tmp_path)) == 6  # no step past the save
    ok(tune(tmp_path, "resume=true"))
    assert losses(tmp_path) == losses(straight)


def test_slurms_usr1_notice_to_every_process_of_the_job_saves_a_step(tmp_path):
    """`sbatch --signal=USR1@600` (Lightning's convention): Slurm signals every process of the
    job, the loader's workers included. SIGUSR1 ended the trainer at once by default, with
    no checkpoint for the notice; now it is a stop request like SIGTERM, and the workers
    leave it to their trainer."""
    cmd = command(tmp_path, "max_steps=100000", "save_every=0", "data.num_workers=2")
    run = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
                           start_new_session=True)  # a process group of its own, as a job step is
    try:
        wait_until(lambda: read_metrics_safely(tmp_path), run)
        os.killpg(run.pid, signal.SIGUSR1)
        out, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 1 and "Traceback" not in err and "SIGUSR1 received" in out, err[-2000:]
    assert "killed by signal" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGUSR1 after step ") and "resume=true" in last
    step = int(last.split("after step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()


def test_ctrl_c_stops_gracefully_and_a_second_signal_at_once(tmp_path):
    cmd = command(tmp_path, "max_steps=100000", "save_every=0")
    run = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    wait_until(lambda: read_metrics_safely(tmp_path), run)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "Traceback" not in err and "SIGINT received" in out
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGINT after step ")
    step = int(err.strip().splitlines()[-1].split("after step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()

    script = ("import os, signal, time; from letrecipes.components.preemption import GracefulStop, StoppedAtOnce\n"
              "stop = GracefulStop().install(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)\n"
              "assert stop.requested\n"
              "try:\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('survived')\n"
              "except StoppedAtOnce as err:\n    print('at once:', err)\n"
              "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('survived a third')")
    twice = subprocess.run([sys.executable, "-c", script.replace("0.5", "1.5")], capture_output=True, text=True,
                           timeout=60)
    # the second stops at once, as an error; a third meets the default handler (the kernel's kill)
    assert "at once: stopped at once by a second SIGTERM" in twice.stdout and "survived" not in twice.stdout
    assert twice.returncode == -signal.SIGTERM
    # the same notice from two senders at once (Slurm signals every process, torchrun passes its
    # own on a few milliseconds later) is one request: the step is still saved
    echoed = subprocess.run([sys.executable, "-c", script.replace("0.5", "0.01")], capture_output=True, text=True,
                            timeout=60)
    assert "survived\n" in echoed.stdout and "at once:" not in echoed.stdout, echoed.stdout + echoed.stderr


def test_a_signal_that_lands_in_a_try_block_of_its_own_still_stops_the_work():
    """A scheduler's SIGTERM during a run's setup trained the run to its end (seen once in CI):
    the handler raised its stop as a ValueError (every LetRecipesError is one), it landed inside
    an `except ValueError` of the code it interrupted (a JSON read's fallback), and was dropped."""
    import letrecipes.components.preemption as preemption

    def interrupted(catches):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the call returns to Python
            time.sleep(0.5)
        except catches:
            return "dropped"
        return "not raised"

    for catches in (ValueError, Exception):  # the stop passes through the code's own fallbacks
        with pytest.raises(preemption.StoppedBeforeTraining, match="^stopped by SIGTERM while preparing. kept$"):
            with preemption.stop_at_once_on_signals("while preparing", "kept"):
                interrupted(catches)
    # a library's `except BaseException: pass` (or a finalizer) drops it: the block's end stops
    went_on = []
    with pytest.raises(preemption.StoppedBeforeTraining, match="^stopped by SIGTERM while preparing. kept$"):
        with preemption.stop_at_once_on_signals("while preparing", "kept"):
            went_on.append(interrupted(BaseException))
    assert went_on == ["dropped"]
    # during training, a second signal's stop at once passes a logger's `except Exception` too
    stop = preemption.GracefulStop().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.requested
        stop.received_at -= 10  # not the same notice again: a second request
        with pytest.raises(preemption.StoppedAtOnce, match="second SIGTERM"):
            interrupted(Exception)
    finally:
        stop.uninstall()

    # a stop that landed inside DCP, which gathers each rank's failure into a CheckpointException
    # (a BaseException): said as the stop, not as a damaged checkpoint or a traceback
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from letrecipes.components.checkpointing import _is_library_failure

    for stopped in (preemption.StoppedBeforeTraining("stopped by SIGTERM during setup. kept"),
                    preemption.StoppedAtOnce("stopped at once by a second SIGTERM")):
        wrapped = CheckpointException("load failed", {0: (stopped, traceback.StackSummary())})
        with pytest.raises(type(stopped)) as raised:
            with environment_errors("output_dir", "saving"):
                raise wrapped
        assert raised.value is stopped
        with pytest.raises(type(stopped)):
            _is_library_failure(wrapped)
    assert _is_library_failure(CheckpointException("load failed", {0: (OSError(5, "EIO"), traceback.StackSummary())}))


FORKED_WORKER = """
import multiprocessing, os, signal, sys, time
from letrecipes.components.preemption import GracefulStop, stop_at_once_on_signals

def worker():  # a pool's task loop: it catches the errors of its tasks and goes on
    while True:
        try:
            time.sleep(0.02)
        except Exception as err:
            print("worker caught", type(err).__name__, flush=True)

def ended_by(sig, wait=10):
    child = os.fork()
    if child == 0:
        try:
            worker()
        finally:
            os._exit(0)
    time.sleep(0.3)
    os.kill(child, sig)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return "still running"

def check():
    print("SIGTERM:", ended_by(signal.SIGTERM), "SIGUSR1:", ended_by(signal.SIGUSR1, wait=1),
          "SIGINT:", ended_by(signal.SIGINT))
    # a pool closed while its tasks run (lm-eval's, on any error in its loop) sends SIGTERM to them
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map_async(time.sleep, [30] * 4)
        time.sleep(0.5)
    print("pool closed", flush=True)

if sys.argv[1] == "graceful":
    stop = GracefulStop().install()
    check()
    print("run asked to stop:", stop.requested)
else:
    with stop_at_once_on_signals("evaluating", "nothing kept"):
        check()
"""


@pytest.mark.parametrize("installed", ["graceful", "at_once"])
def test_a_forked_pool_worker_ends_on_sigterm_as_its_pool_expects_and_leaves_notices_to_the_run(installed):
    """lm-eval's bootstrap (a fork Pool) hung an eval for good: the pool's SIGTERM met the
    eval's inherited handler in a worker, whose task loop caught its error and waited on."""
    done = subprocess.run([sys.executable, "-c", FORKED_WORKER, installed], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "SIGTERM: -15 SIGUSR1: still running SIGINT: -2\npool closed" in done.stdout, done.stdout + done.stderr
    assert "worker caught" not in done.stdout and "received" not in done.stdout + done.stderr
    if installed == "graceful":
        assert "run asked to stop: False" in done.stdout


def test_ctrl_c_pressed_twice_stops_a_slow_save_at_once_in_one_line_and_the_run_resumes(tmp_path):
    """The second Ctrl-C lands in the checkpoint save the first asked for (held 60 s here, a
    slow filesystem): the run ends within seconds in one line saying what is kept, without
    a KeyboardInterrupt traceback, its lock released and no half-written checkpoint listed."""
    log = tmp_path / "stdout.txt"
    with open(log, "w") as out:
        run = subprocess.Popen(command(tmp_path / "run", "max_steps=100000", "save_every=0", "debug.slow_save_s=60"),
                               cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "WANDB_MODE": "disabled"})
        try:
            wait_until(lambda: read_metrics_safely(tmp_path / "run"), run)
            run.send_signal(signal.SIGINT)
            wait_until(lambda: "SIGINT received" in log.read_text(encoding="utf-8"), run)
            time.sleep(1.5)  # past the window in which a second signal is the same notice again
            sent = time.monotonic()
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=50)
        finally:
            run.kill()
    assert time.monotonic() - sent < 30, "the second Ctrl-C waited for the save"
    assert run.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: stopped at once by a second SIGINT after step \d+, without saving\. No checkpoint "
                    r"was saved yet\. Fix: run the same command with resume=true", last), last
    assert list((tmp_path / "run" / "checkpoints").glob("step_*[0-9]")) == []  # the .tmp is no checkpoint
    RunLock(tmp_path / "run").acquire(log=lambda line: None).release()  # nobody holds the run


def test_a_signal_after_the_last_step_never_waits_for_the_export_and_resume_writes_it(tmp_path):
    """Once the last step's checkpoint is complete there is nothing left to save: a signal
    during the final export (minutes for a 7B model; held 60 s here) stops it at once, with
    nothing of final/ left, and resume=true writes it. Before, the run said "finishing this
    step, then saving a checkpoint", went on with the whole export and exited 0. A signal
    during the last step stops before the export the same way; with save_every=0 the export,
    the weights' only copy, is written first and said so."""
    run = tmp_path / "run"
    log = tmp_path / "stdout.txt"
    with open(log, "w") as out:
        live = subprocess.Popen(command(run, "debug.slow_export_s=60"), cwd=REPO, stdout=out, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        try:
            wait_until((run / "checkpoints" / "step_00000008" / "COMPLETE").is_file, live)
            time.sleep(0.5)
            sent = time.monotonic()
            live.send_signal(signal.SIGINT)
            _, err = live.communicate(timeout=50)
        finally:
            live.kill()
    assert time.monotonic() - sent < 30, "the signal waited for the export"
    assert live.returncode == 1 and "Traceback" not in err, err[-3000:]
    kept = (rf"after step 8, the last: its checkpoint {run}/checkpoints/step_00000008 is complete; no {run}/final "
            r"was written\. Fix: run the same command with resume=true to write the export")
    assert re.match(rf"error: stopped by SIGINT (during the final export, )?{kept}", err.strip().splitlines()[-1]), err
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    resumed = ok(tune(run, "resume=true"))
    assert "exported" in resumed.stdout and (run / "final" / "config.json").is_file()

    at_last = tune(tmp_path / "last", "debug.sigterm_at_step=8")
    assert at_last.returncode == 1 and "Traceback" not in at_last.stderr, at_last.stderr[-3000:]
    assert re.match(rf"error: stopped by SIGTERM {kept.replace(str(run), str(tmp_path / 'last'))}",
                    last_line(at_last)), at_last.stderr[-2000:]
    assert not (tmp_path / "last" / "final").exists()
    only_copy = ok(tune(tmp_path / "only", "debug.sigterm_at_step=8", "save_every=0"))
    assert "SIGTERM asked for a stop at the last step: with save_every=0 the export was the weights' only copy, so " \
           "it was written" in only_copy.stdout and (tmp_path / "only" / "final" / "config.json").is_file()


def test_a_run_folder_removed_while_the_run_trains_gets_its_records_and_lock_back_at_the_next_save(tmp_path):
    """`rm -r` of a live run's folder (or a scratch purge of its old files): the saves went on
    into a folder without run_info.json, config.yaml, metrics.jsonl or the lock's file, which
    resume=true and `letrecipes status` then took for no run's, and which a second launch could
    take while this one trained. They are written again at the next save, said once."""
    from letrecipes.components.run_lock import live_owner
    from letrecipes.components.run_status import run_status

    run = tmp_path / "run"
    live = subprocess.Popen(command(run, "max_steps=12", "debug.slow_batches_s=0.3"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        wait_until((run / "checkpoints" / "step_00000003" / "COMPLETE").is_file, live)
        shutil.rmtree(run)
        wait_until((run / "checkpoints" / "step_00000006" / "COMPLETE").is_file, live)
        assert live_owner(run) is not None and live.poll() is None  # the folder is held again while it trains
        _, err = live.communicate(timeout=120)
    finally:
        live.kill()
    assert live.returncode == 0, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("warning: output_dir: ")]
    assert len(said) == 1 and "run_info.json, config.yaml, metrics.jsonl and the run lock were gone at step 6's " \
        "save" in said[0], err[-3000:]
    assert {"run_info.json", "config.yaml", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert min(r["step"] for r in read_metrics(run / "metrics.jsonl")) > 6
    assert run_status(run)["state"] == "finished"
    resumed = ok(tune(run, "resume=true", "max_steps=14"))
    assert "step_00000012" in resumed.stdout and (run / "final" / "config.json").is_file()

    # save_every=0: nothing is saved before the export, which sees it; status reads the step from the export
    only = tmp_path / "only_export"
    live = subprocess.Popen(command(only, "max_steps=12", "save_every=0", "debug.slow_batches_s=0.3"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        wait_until(lambda: len(read_metrics_safely(only)) >= 2, live)
        shutil.rmtree(only)
        _, err = live.communicate(timeout=120)
    finally:
        live.kill()
    assert live.returncode == 0 and "were gone at step 12's export" in err, err[-3000:]
    status = run_status(only)
    assert status["state"] == "finished" and status["step"] == 12 and status.get("exported_step") == 12, status


CLOSING_SCRIPT = """
import os, signal, sys, time
from letrecipes._config import load_config, run
from letrecipes.components.errors import LetRecipesError
from letrecipes.pretrain import PretrainRecipe

class SlowToClose(PretrainRecipe):
    def train(self):
        super().train()
        if "fail" in sys.argv:
            raise LetRecipesError("the run's own error")

    def cleanup(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run closes
        time.sleep(5)
        super().cleanup()

run(SlowToClose, load_config("pretrain_tiny", sys.argv[2:]))
"""


@pytest.mark.parametrize("failing", [False, True])
def test_ctrl_c_while_a_run_closes_is_one_line_and_never_hides_the_runs_own_error(tmp_path, failing):
    """A signal in a recipe's cleanup (the lock's release, an async save's wait, a process
    group ending, the eval's 15 GB temporary copy removed) met the default handler: a
    KeyboardInterrupt traceback. Now one line, or the run's own error line where it was
    failing; the lock is released either way."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", CLOSING_SCRIPT, "fail" if failing else "ok", *BASE, *COMMON,
                             f"output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result) == ("error: the run's own error" if failing else
                                 "error: stopped by SIGINT while the run was closing. What it wrote is complete, as "
                                 "the lines above say; only its closing (releasing its lock, removing temporary files) "
                                 "was cut short.")
    assert (out / "final" / "config.json").is_file()
    RunLock(out).acquire(log=lambda line: None).release()  # nobody holds the run


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_a_terminal_that_hangs_up_stops_the_run_with_its_step_saved(tmp_path, loader_workers):
    """A run in an ssh session that drops gets SIGHUP, and its terminal fails every write with
    EIO: it died at once, losing every step since its last checkpoint (and a loader worker,
    also on the terminal, died of the SIGHUP as well)."""
    import pty
    import threading

    master, terminal = pty.openpty()
    run = subprocess.Popen(command(tmp_path, "max_steps=100000", "save_every=0", f"data.num_workers={loader_workers}"),
                           cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    os.close(terminal)

    def drain():  # what the terminal shows, until it hangs up
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    try:
        wait_until(lambda: len(read_metrics_safely(tmp_path)) >= 3, run)
        os.close(master)  # the terminal is gone: every write to it fails
        run.send_signal(signal.SIGHUP)
        run.wait(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 1
    saved = [int(folder.name.split("_")[1]) for folder in Checkpointer(tmp_path).complete_checkpoints()]
    assert len(saved) == 1 and saved[0] == read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] >= 3


def test_a_signals_error_raised_inside_a_console_write_is_not_taken_for_the_console_closing():
    """A second Ctrl-C whose handler ran inside a print raised StoppedAtOnce (a ValueError, as
    every LetRecipesError is) out of the write: it was caught as the console failing, and the
    run said its console had closed (seen once in CI, in the eval recipe's twin of this)."""
    from letrecipes.components.preemption import StoppedAtOnce, _ForgivingStream

    class Interrupted:
        def write(self, text):
            raise StoppedAtOnce("stopped at once by a second SIGINT")

        flush = write

    class Closed:
        def write(self, text):
            raise ValueError("I/O operation on closed file.")

        flush = write

    reported = []
    interrupted = _ForgivingStream(Interrupted(), "stdout", reported.append)
    with pytest.raises(StoppedAtOnce):
        interrupted.write("step 5/8")
    assert reported == [] and not interrupted.failed
    closed = _ForgivingStream(Closed(), "stdout", reported.append)
    assert closed.write("step 5/8") == len("step 5/8") and closed.failed
    assert len(reported) == 1 and "I/O operation on closed file" in reported[0]


def test_a_logging_handler_made_while_the_console_was_watched_does_not_stop_work_done_later(monkeypatch):
    """A handler made inside the eval recipe's watch (lm-eval's, datasets') keeps the watched
    stream: its flush at exit, into a console closed by then (pytest's capture, a `| head`
    that ended), raised the recipe's stop from logging's atexit hook long after the work."""
    import io
    import logging

    from letrecipes.components.preemption import StoppedBeforeTraining, stop_when_the_console_closes

    console = io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    with stop_when_the_console_closes("while evaluating", "Nothing is lost."):
        handler = logging.StreamHandler(sys.stderr)
        handler.stream.write("scoring\n")
    assert sys.stderr is console and console.getvalue() == "scoring\n"
    console.close()
    handler.stream.write("after the work\n")  # dropped, said by no one
    handler.flush()
    with pytest.raises(StoppedBeforeTraining):  # while watched, a console that closes still stops the work
        with stop_when_the_console_closes("while evaluating", "Nothing is lost."):
            sys.stderr.write("scoring\n")


@pytest.mark.parametrize("in_setup", [True, False])
def test_a_run_whose_console_reader_ends_saves_its_step_and_says_so(tmp_path, in_setup):
    """`tune run ... | head` (or a `tee` that was killed): the run's next log line raised
    BrokenPipeError, a traceback that lost every step since the last checkpoint."""
    run = subprocess.Popen(command(tmp_path, "max_steps=100000", "save_every=0"), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        # in the setup: closed before its first line (`run: git ...`), so that no line can reach
        # the pipe after the setup; in training: `head` reads up to a step's line
        line = "" if in_setup else run.stdout.readline()
        while not in_setup and not line.startswith("step "):
            assert line
            line = run.stdout.readline()
        run.stdout.close()
        err = run.stderr.read()
        run.wait(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by its console closing (a write to stdout failed: [Errno 32] Broken "
                           "pipe"), last
    if in_setup:
        assert last.endswith("during setup, before the first step. Nothing was trained; corpus shards prepared so far "
                             "are kept, and launching again goes on from them."), last
        return
    step = int(last.split(") after step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == step


def test_status_tells_a_live_run_from_a_stopped_and_a_finished_one(tmp_path, straight, capsys):
    from letrecipes import cli
    from letrecipes.components.run_status import run_status

    live = tmp_path / "live"
    run = subprocess.Popen(command(live, "max_steps=100000", "save_every=20", "log_every=5"), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        wait_until((live / "checkpoints" / "step_00000020" / "COMPLETE").is_file, run)
        now = run_status(live)
        assert now["state"] == "running" and now["owner"]["pid"] == run.pid and now["last"]["step"] >= 20
        assert now["last"]["tokens"] == now["last"]["step"] * 4 * 32  # the tiny run: batch 4 x 32 tokens
        assert cli.main(["status", str(tmp_path)]) == 0  # a folder of runs: each one
        out = capsys.readouterr().out
        assert f"{live}: running (pid {run.pid} on " in out and "/100000 (0%)" in out and "ETA " in out
        run.kill()  # SIGKILL: no cleanup at all; the kernel drops its lock
        run.wait(timeout=60)
    finally:
        run.kill()
    stopped = run_status(live)
    assert stopped["state"] == "stopped" and stopped["resume_from"].endswith(stopped["checkpoints"][-1])
    assert run_status(straight)["state"] == "finished"
    assert cli.main(["status", str(straight), str(tmp_path / "absent")]) == 1
    out, err = capsys.readouterr()
    assert f"{straight}: finished" in out and "checkpoints: step_00000003, step_00000006" in out
    assert "absent: nothing there" in err
    # asked on a login node, often in a loop: it imports neither torch nor torchtune (5.5 s and 430 MB a call before)
    probe = subprocess.run([sys.executable, "-c", "import sys; from letrecipes.cli import main; code = main(['status', "
                            f"{str(straight)!r}]); print(code, sorted(m for m in ('torch', 'torchtune', 'torchao', "
                            "'numpy') if m in sys.modules))"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert probe.stdout.startswith(f"{straight}: finished") and probe.stdout.strip().endswith("0 []"), probe
    # a path inside a run (its metrics file, a step checkpoint, which holds a copy of run_info.json, its checkpoints
    # folder): that run's status, not "no run in it" or a step taken for a run with no step logged
    step = straight / "checkpoints" / "step_00000003"
    assert run_status(step)["state"] == "not a run"
    for inside in (straight / "metrics.jsonl", step, straight / "checkpoints"):
        assert cli.main(["status", str(inside)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{straight}: finished\n"), out
    # a log line caught half-written (a live run, or one killed mid-write) is no error: the last whole one counts
    with open(live / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 999, "loss": 1.')
    assert run_status(live)["last"]["step"] == stopped["last"]["step"]


def test_status_reads_a_damaged_or_edited_run_folder_without_a_traceback(tmp_path, capsys):
    """Lines of metrics.jsonl that are no record (another JSON value, a value of the wrong
    type, garbage) and a run_info.json that is not an object: passed over and counted, the
    rest of the status said (was an AttributeError from `letrecipes status`)."""
    from letrecipes import cli
    from letrecipes.components.run_status import run_status

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text("[]")
    (run / "metrics.jsonl").write_text("\n".join([
        json.dumps({"step": 1, "loss": 5.0, "tokens": 128}), '"a string"', "[1, 2", json.dumps([3]),
        json.dumps({"step": "two", "loss": 4.0}), json.dumps({"step": 2, "loss": 4.5, "val_loss": "n/a",
                                                            "tokens": "many"}), ""]))
    status = run_status(run)
    assert status["unreadable_lines"] == 3 and status["max_steps"] is None
    assert status["last"] == {"step": 2, "loss": 4.5} and "val_loss" not in status
    assert cli.main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step 2 | loss 4.5000" in out and "3 line(s) of metrics.jsonl read are not records" in out
    # the log is read from its end, and only as far back as the newest records: a run that does not
    # validate stops at its last step's (a long run's log is about 1 KB a step)
    (run / "run_info.json").write_text(json.dumps({"config": {"max_steps": 9, "eval_every": 0}}))
    status = run_status(run)
    assert status["unreadable_lines"] == 0 and status["last"] == {"step": 2, "loss": 4.5}


def test_status_takes_the_step_a_finished_run_reached_from_its_checkpoint_past_the_last_log_line(
        tmp_path, straight, capsys):
    """A resume that lowers max_steps to a step with a checkpoint and no log line exports from it
    at once: the run is finished at that step, though metrics.jsonl ends earlier. Before, its
    status said "stopped" at the last logged step, with a final export and resume advice."""
    from letrecipes import cli
    from letrecipes.components.run_status import run_status

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    max_steps = json.loads((run / "run_info.json").read_text(encoding="utf-8"))["config"]["max_steps"]
    records = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in records
                                               if json.loads(line).get("step", 0) < max_steps))
    status = run_status(run)
    assert status["last"]["step"] < max_steps == status["step"] == status["saved_step"]
    assert status["state"] == "finished" and "resume_from" not in status
    assert cli.main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run}: finished\n") and "resume=true" not in out
    assert f"step {max_steps}/{max_steps} reached by its newest checkpoint (no log line at that step)" in out
    assert run_status(straight)["state"] == "finished" and "saved_step" not in run_status(straight)


def test_status_of_a_folder_of_runs_passes_over_one_it_may_not_read(tmp_path, capsys, monkeypatch):
    """A shared folder of runs where one is another user's, unreadable: its PermissionError
    stopped the whole `letrecipes status` in one line, the readable runs unlisted. It is said
    and passed over. (Root reads any folder: the denial is stood in for.)"""
    import pathlib

    from letrecipes import cli

    run, private = tmp_path / "mine", tmp_path / "theirs"
    for folder in (run, private):
        folder.mkdir()
        (folder / "run_info.json").write_text("{}")
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    real_is_file = pathlib.Path.is_file

    def is_file(path):
        if private in (path, *path.parents):
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)

    monkeypatch.setattr(pathlib.Path, "is_file", is_file)
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: stopped" in out and "step 1 | loss 5.0000" in out
    assert f"{private}: unreadable (permission denied ({private / 'run_info.json'})): passed over" in out


def wait_until(ready, process, timeout_s: float = 120):
    """Poll ``ready()`` until it holds, failing if ``process`` ends or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline and process.poll() is None, process.poll()
        time.sleep(0.1)


def read_metrics_safely(folder):
    try:
        return read_metrics(folder / "metrics.jsonl")
    except (OSError, ValueError):
        return []


def test_a_run_rolled_back_to_an_earlier_checkpoint_never_goes_back_to_the_later_ones(tmp_path):
    """Rolled back to step 4 (a loss spike: a lower learning rate from there) and killed at step
    7, the run's next resume=true took the abandoned step 8, lr and all, called the run
    complete and kept the abandoned run's export as its own."""
    ok(tune(tmp_path, "max_steps=8", "save_every=2", "keep_last_checkpoints=3", "eval_every=0"))
    abandoned = digest(tmp_path / "final")
    rolled = tune(tmp_path, "max_steps=8", "save_every=2", "keep_last_checkpoints=2", "eval_every=0",
                  "optimizer.lr=1e-4", f"resume={tmp_path / 'checkpoints' / 'step_00000004'}", "debug.kill_at_step=7")
    assert rolled.returncode != 0
    aside = list((tmp_path / "superseded").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("after_step_00000004_")
    assert sorted(p.name for p in aside[0].iterdir()) == ["final", "step_00000006", "step_00000008"]
    assert f"resume: step_00000004 is not the run's newest checkpoint: step_00000006, step_00000008, final (what " \
           f"came after it) moved to {aside[0]}" in rolled.stdout
    resumed = ok(tune(tmp_path, "max_steps=8", "save_every=2", "keep_last_checkpoints=2", "eval_every=0",
                      "optimizer.lr=1e-4", "resume=true"))
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000006'} at step 6" in resumed.stdout  # this branch's
    assert digest(tmp_path / "final") != abandoned and digest(aside[0] / "final") == abandoned
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")][-3:] == [6, 7, 8]


# ------------------------------------------------------------------ 2: resume checks what changed
def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path):
    killed = tune(tmp_path / "a", "optimizer.lr=3e-3", "debug.kill_at_step=5")
    assert killed.returncode != 0
    resumed = ok(tune(tmp_path / "a", "optimizer.lr=3e-5", "resume=true"))
    assert "resume: optimizer.lr 0.003 -> 3e-05" in resumed.stdout
    ok(tune(tmp_path / "b", "optimizer.lr=3e-5"))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [a[s][1] for s in range(4, 9)] == [b[s][1] for s in range(4, 9)]  # the new rates from step 4 on
    assert a[3][1] != b[3][1]  # steps before the checkpoint kept theirs


@pytest.mark.xdist_group("resume_refused")
@pytest.mark.parametrize("change", ["model.num_layers=3", "seed=1", "data.seq_len=64"])
def test_resume_that_would_be_another_run_is_refused_in_one_line(tmp_path, change, copy_of_a_run):
    run = copy_of_a_run(tmp_path / "run", "max_steps=3")
    before = digest(run)
    result = tune(run, "resume=true", change)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "was written by a different run: " + change.split("=")[0] in last_line(result)
    assert digest(run) == before


def test_resume_notices_a_tokenizer_whose_bytes_changed(tmp_path, tokenizer_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(tokenizer_path.read_bytes())
    run = tmp_path / "run"
    ok(tune(run, f"tokenizer.path={tokenizer}", "max_steps=3"))
    # the same path, other bytes
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text(encoding="utf-8")), indent=3), encoding="utf-8")
    result = tune(run, f"tokenizer.path={tokenizer}", "resume=true")
    assert result.returncode == 1 and "tokenizer fingerprint" in last_line(result)


def test_resume_notices_a_corpus_that_changed_and_follows_one_that_moved(tmp_path, corpus_dir):
    """The data position saved is an index into the prepared tokens: a corpus edited since
    would resume into other text. The same corpus at another path resumes."""
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    run = tmp_path / "run"
    ok(tune(run, f"data.source={corpus}", "max_steps=3"))
    moved = tmp_path / "moved"
    shutil.copytree(corpus, moved)
    resumed = ok(tune(run, f"data.source={moved}", "max_steps=4", "resume=true"))
    assert 'resume: data.source "' in resumed.stdout and 'corpus" -> "' in resumed.stdout and 'moved"' in resumed.stdout
    before = digest(run)
    first = sorted(moved.rglob("*.txt"))[0]
    first.write_text(first.read_text(encoding="utf-8") + "\nOne more sentence that was not there before.\n")
    result = tune(run, f"data.source={moved}", "max_steps=5", "resume=true")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = last_line(result)
    assert "was written by a different run: data fingerprint " in line and "the corpus changed since" in line
    assert "letrecipes export " in line and "init_from=<folder>" in line
    assert digest(run) == before


def test_a_moved_corpus_is_told_from_another_one_by_the_data_fingerprint():
    mixture = [{"source": "/data/a", "weight": 3, "name": "web"}, {"source": "/data/books", "weight": 1}]
    saved = {"config": {"data": {"sources": mixture}}, "world_size": 1, "data_fingerprint": "f1"}

    def resumed(sources, fingerprint="f1", record=True):
        current = {"config": {"data": {"sources": sources}}, "world_size": 1, "data_fingerprint": fingerprint}
        return check_from(saved if record else {k: v for k, v in saved.items() if k != "data_fingerprint"}, current)

    elsewhere = [{"source": "/scratch/a", "weight": 3, "name": "web"}, {"source": "/scratch/books", "weight": 1}]
    assert [k for k, _, _ in resumed(elsewhere)] == ["data.sources"]  # applied and logged
    for refused in ([{**mixture[0], "weight": 1}, mixture[1]],  # another mixture
                    [mixture[0], {"source": "/scratch/novels", "weight": 1}]):  # an unnamed source renamed
        with pytest.raises(ResumeChangeError, match="data.sources"):
            resumed(refused)
    with pytest.raises(ResumeChangeError, match="data fingerprint"):
        resumed(elsewhere, fingerprint="f2")
    with pytest.raises(ResumeChangeError, match="data.sources"):  # a checkpoint without a fingerprint: the old rule
        resumed(elsewhere, record=False)


def test_resume_check_unit():
    saved = {"config": {"model": {"num_layers": 2}, "optimizer": {"lr": 1e-3}, "resume": False}, "world_size": 1,
             "tokenizer_fingerprint": "abc"}
    same = json.loads(json.dumps(saved))
    same["config"]["resume"] = True
    assert check_from(saved, same) == []
    lower = json.loads(json.dumps(same))
    lower["config"]["optimizer"]["lr"] = 1e-4
    assert check_from(saved, lower) == [("optimizer.lr", 1e-3, 1e-4)]
    for mutate in (lambda c: c["config"]["model"].update(num_layers=3), lambda c: c.update(tokenizer_fingerprint="def"),
                   lambda c: c["config"]["optimizer"].update(_component_="torch.optim.SGD")):
        other = json.loads(json.dumps(saved))
        mutate(other)
        with pytest.raises(ResumeChangeError, match="different run"):
            check_from(saved, other)


def check_from(saved, current, folder=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "run_info.json").write_text(json.dumps(saved))
        return check(Path(d), current)


def test_apply_settings_moves_the_schedule_onto_the_new_rate():
    from letrecipes.components.lr_schedules import warmup_cosine

    def build(lr):
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)
        return opt, warmup_cosine(opt, warmup_steps=2, total_steps=10)

    old_opt, old_sched = build(1e-3)
    for _ in range(4):
        old_opt.step()
        old_sched.step()
    new_opt, new_sched = build(1e-4)
    settings = optimizer_settings(new_opt)
    new_opt.load_state_dict(old_opt.state_dict())
    new_sched.load_state_dict(old_sched.state_dict())
    apply_settings(new_opt, settings, new_sched)
    reference_opt, reference_sched = build(1e-4)
    for _ in range(4):
        reference_opt.step()
        reference_sched.step()
    assert new_opt.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]
    new_sched.step(), reference_sched.step()
    assert new_opt.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]


# ------------------------------------------------------------------ 3: checkpoints vouch for their bytes
def tiny_checkpointer(folder: Path, keep_last: int = 5):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(folder, keep_last=keep_last, log=lambda message: None)
    ckpt.track(model, optimizer, progress=Progress())
    return ckpt, model


def test_marker_lists_every_file_and_damage_of_each_kind_is_found(tmp_path):
    ckpt, model = tiny_checkpointer(tmp_path)
    first, second = ckpt.save(1), ckpt.save(2)
    marker = json.loads((second / "COMPLETE").read_text(encoding="utf-8"))
    assert {".metadata", "__0_0.distcp", "format.json"} <= set(marker["files"]) and marker["finite_weights"]
    assert ckpt.verify(second) == [] and ckpt.last_save["checksum_s"] >= 0
    flip_a_byte(second / "__0_0.distcp", 1000)
    assert "checksum differs" in ckpt.verify(second)[0]
    assert ckpt.last_good() == first
    os.truncate(first / ".metadata", 10)
    assert "bytes" in ckpt.verify(first)[0] and ckpt.last_good() is None
    third = ckpt.save(3)
    (third / "__0_0.distcp").unlink()
    assert ckpt.verify(third) == ["__0_0.distcp is missing"]


@pytest.mark.parametrize("marker, said", [
    ("[]", "JSON, but not a list of files"), ("{}", "JSON, but not a list of files"),
    ('{"files": 5}', "JSON, but not a list of files"), ('{"step_folder": "step_0', "that are not the JSON written"),
])
def test_a_damaged_marker_is_damage_not_an_unverified_old_checkpoint(tmp_path, marker, said):
    """A COMPLETE marker cut or edited into other JSON was taken for 0.3's plain-text marker
    (loaded unverified) or failed with a TypeError; it is damage, found by verify, so
    resume=true takes the checkpoint before. 0.3's own marker still loads unverified."""
    ckpt, _ = tiny_checkpointer(tmp_path)
    first, second = ckpt.save(1), ckpt.save(2)
    (second / "COMPLETE").write_text(marker)
    assert ckpt.verify(second) == [f"its COMPLETE marker is damaged ({len(marker.encode())} bytes that are not the "
                                   "JSON written)" if "JSON written" in said else
                                   "its COMPLETE marker is damaged (JSON, but not a list of files)"]
    assert ckpt.last_good() == first
    (second / "COMPLETE").write_text("step_00000002\n")  # as 0.3 wrote it
    assert ckpt.verify(second) == [] and ckpt.last_good() == second


def test_weights_that_are_not_finite_are_never_the_last_good_checkpoint(tmp_path):
    ckpt, model = tiny_checkpointer(tmp_path)
    good = ckpt.save(1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    bad = ckpt.save(2)
    assert ckpt.verify(bad) == ["it holds non-finite weights"] and ckpt.last_good() == good


def test_load_of_a_truncated_metadata_is_one_error_not_a_base_exception(tmp_path):
    ckpt, _ = tiny_checkpointer(tmp_path)
    path = ckpt.save(1)
    os.truncate(path / ".metadata", 20)
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load(path)


@pytest.fixture(scope="module")
def killed_at_step_8(tmp_path_factory, test_corpus):
    """A run SIGKILLed at step 8, its checkpoints at 3 and 6 (made once: the tests copy it)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    assert tune(out, "debug.kill_at_step=8").returncode != 0
    return out


@pytest.mark.xdist_group("killed_at_step_8")
@pytest.mark.parametrize("damage", ["flip", "truncate_shard", "delete_shard", "truncate_metadata"])
def test_resume_skips_a_damaged_newest_checkpoint_and_matches_a_straight_run(tmp_path, straight, killed_at_step_8,
                                                                              damage):
    tmp_path = Path(shutil.copytree(killed_at_step_8, tmp_path / "run"))
    newest = tmp_path / "checkpoints" / "step_00000006"
    {"flip": lambda: flip_a_byte(newest / "__0_0.distcp"),
     "truncate_shard": lambda: os.truncate(newest / "__0_0.distcp", 1000),
     "delete_shard": lambda: (newest / "__0_0.distcp").unlink(),
     "truncate_metadata": lambda: os.truncate(newest / ".metadata", 100)}[damage]()
    resumed = ok(tune(tmp_path, "resume=true"))
    assert f"resume: skipping {newest}" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    assert losses(tmp_path) == losses(straight)


@pytest.mark.xdist_group("resume_refused")  # the same prepared run
def test_export_of_a_damaged_checkpoint_is_refused(tmp_path, copy_of_a_run):
    from letrecipes.components.export import ExportError, export_checkpoint

    checkpoint = copy_of_a_run(tmp_path / "run", "max_steps=3") / "checkpoints" / "step_00000003"
    flip_a_byte(checkpoint / "__0_0.distcp")
    with pytest.raises(ExportError, match="is damaged: __0_0.distcp has other bytes than were written"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.xdist_group("killed_at_step_8")
def test_resume_from_a_damaged_path_or_with_nothing_verified_is_refused(tmp_path, killed_at_step_8):
    tmp_path = Path(shutil.copytree(killed_at_step_8, tmp_path / "run"))  # checkpoints at 3 and 6
    for step in (3, 6):
        flip_a_byte(tmp_path / "checkpoints" / f"step_{step:08d}" / "__0_0.distcp")
    explicit = tune(tmp_path, f"resume={tmp_path / 'checkpoints' / 'step_00000006'}")
    assert explicit.returncode == 1 and "is damaged: __0_0.distcp has other bytes" in last_line(explicit)
    latest = tune(tmp_path, "resume=true")
    assert latest.returncode == 1 and "no checkpoint in" in last_line(latest) and "verified" in last_line(latest)
    assert (tmp_path / "checkpoints" / "step_00000003").is_dir()  # nothing deleted


# ------------------------------------------------------------------ 4: nothing rewritten in place
def test_metrics_are_cut_at_a_byte_offset_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)]
    path.write_text("".join(records) + '{"step": 6, "lo')
    inode = path.stat().st_ino
    truncate_after(path, 3)
    assert path.read_text(encoding="utf-8") == "".join(records[:3]) and path.stat().st_ino == inode
    truncate_after(path, 10)
    assert path.read_text(encoding="utf-8") == "".join(records[:3])


def test_a_line_that_is_no_record_is_passed_over_not_taken_for_the_cut(tmp_path):
    """An edited-in line (text, a JSON list, a step that is no number) before the resume's
    step: the records after it stay (the cut used to fall on it, losing them; a JSON list
    there made the resume an AttributeError)."""
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)]
    odd = ["a note by hand\n", "[1]\n", json.dumps({"step": "two"}) + "\n"]
    path.write_text(records[0] + "".join(odd) + "".join(records[1:]))
    truncate_after(path, 3)
    assert path.read_text(encoding="utf-8") == records[0] + "".join(odd) + "".join(records[1:3])


def test_replace_atomically_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")

    with pytest.raises(TypeError):
        replace_atomically(path, 12345)  # fails inside the write
    assert path.read_text(encoding="utf-8") == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def limit_file_size(limit_bytes):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


@pytest.mark.xdist_group("killed_at_step_8")
def test_a_write_failure_during_resume_keeps_history_and_checkpoints(tmp_path, straight, killed_at_step_8):
    tmp_path = Path(shutil.copytree(killed_at_step_8, tmp_path / "run"))
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")  # a run killed after step 5: a checkpoint at 3 only
    before = (tmp_path / "metrics.jsonl").read_bytes()
    kept = digest(tmp_path / "checkpoints" / "step_00000003")
    shard = (tmp_path / "checkpoints" / "step_00000003" / "__0_0.distcp").stat().st_size
    failed = tune(tmp_path, "resume=true", preexec=limit_file_size(shard // 2))  # a shard cannot be written
    message = last_line(failed)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "output_dir: saving the step-6 checkpoint" in message and "file size limit" in message
    assert "step_00000003, is intact" in message and "resume=true" in message
    assert (tmp_path / "metrics.jsonl").read_bytes().startswith(before.split(b'{"step": 4')[0])
    assert digest(tmp_path / "checkpoints" / "step_00000003") == kept
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    ok(tune(tmp_path, "resume=true"))
    assert losses(tmp_path) == losses(straight)


def test_torchs_dcp_writer_collected_after_a_failed_save_prints_no_traceback(monkeypatch):
    """Under Python 3.13 the test above failed: after the run's one-line error, "Exception ignored
    in: <...NoCloseWriter ...> ... ValueError: flush of closed file" (torch's DCP writer flushes
    its closed file when collected; 3.13 logs what a finalizer raises). Only that is dropped."""
    import types

    from torch.distributed.checkpoint import filesystem

    from letrecipes.components.checkpointing import quiet_dcp_writer_finalizer

    reached = []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)
    quiet_dcp_writer_finalizer()
    quiet_dcp_writer_finalizer()  # installed once
    writer = type("NoCloseWriter", (), {"__module__": filesystem.__name__})()
    sys.unraisablehook(types.SimpleNamespace(object=writer, exc_value=ValueError("flush of closed file")))
    other = [types.SimpleNamespace(object=writer, exc_value=OSError("disk")),
             types.SimpleNamespace(object=object(), exc_value=ValueError("flush of closed file"))]
    for unraisable in other:
        sys.unraisablehook(unraisable)
    assert reached == other


def test_a_closing_that_fails_is_one_line_or_leaves_the_runs_own_error_to_stand():
    import errno

    from letrecipes._config import close

    def failing_close():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/metrics.jsonl")

    with pytest.raises(SystemExit) as ended:
        close(failing_close, "the run")
    assert str(ended.value.code) == ("error: the run ended, but closing it failed: the disk is full "
                                     "(/runs/a/metrics.jsonl). What it wrote before is complete (checkpoints and "
                                     "export, as the lines above say); its log may lack its last lines. Fix: free space.")
    with pytest.raises(SystemExit, match="error: the run's own line"):
        try:
            raise SystemExit("error: the run's own line")
        finally:
            close(failing_close, "the run")


def test_a_log_that_fills_the_disk_mid_run_is_one_line_naming_it(tmp_path):
    """metrics.jsonl's write failing mid-run (a full disk, a quota) was said in one line, then
    the run's closing flushed the same buffered record, failed again, and its traceback hid
    that line; the write's error named no file either."""
    ok(tune(tmp_path / "first", "max_steps=1"))  # the token cache, made without the limit
    run = tmp_path / "run"
    failed = tune(run, "max_steps=300", "save_every=0", "eval_every=0", preexec=limit_file_size(8192))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert last_line(failed).startswith(f"error: output_dir: training failed: a file size limit was reached (ulimit "
                                        f"-f, or the filesystem's) ({run / 'metrics.jsonl'}).")


@pytest.mark.parametrize("name", [".run_info.json", ".config.yaml", "metrics.jsonl", "prepared-"])
def test_a_full_disk_at_the_start_of_a_run_is_one_line_and_the_same_command_goes_on(tmp_path, name):
    """A write of the run's start failing (the disk full as run_info.json, config.yaml or
    metrics.jsonl is written, or as the data cache's lock is taken) was an OSError
    traceback; and a start that had written config.yaml alone left a folder the next launch
    refused as "not a run's". Now one line, and the command it names (resume=true) trains
    the run."""
    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    cmd = [sys.executable, str(REPO / "tests" / "io_fault.py"), name, "ENOSPC", "--", "letrecipes.pretrain",
           *command(out, cache, "max_steps=2")[3:]]
    assert command(out)[1:3] == ["-m", "letrecipes.pretrain"]
    failed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    message = last_line(failed)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    if name == "prepared-":
        assert message.startswith(f"error: data.cache_dir: taking the lock {tmp_path / 'cache'}/prepared-"), message
        assert "failed: the disk is full (" in message
    else:
        assert message.startswith(f"error: output_dir: starting the run in {out} failed: the disk is full ("), message
        assert "No checkpoint was saved yet. Fix: free space, then run the same command with resume=true." in message
    ok(tune(out, cache, "resume=true", "max_steps=2"))
    assert max(losses(out)) == 2


@pytest.mark.parametrize("code", ["EOPNOTSUPP", "ENOSYS"])
def test_an_output_dir_on_an_object_store_mount_is_one_line_naming_the_filesystem(tmp_path, code):
    """Mountpoint for S3 (and other object stores' FUSE mounts) refuses renames and appends
    with EOPNOTSUPP or ENOSYS: the line said the errno's bare text with no fix."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tests" / "io_fault.py"), "metrics.jsonl", code, "--", "letrecipes.pretrain",
           *command(out, f"data.cache_dir={tmp_path / 'cache'}", "max_steps=2")[3:]]
    failed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    message = last_line(failed)
    assert failed.returncode == 1 and message.startswith(f"error: output_dir: starting the run in {out} failed: the "
                                                         "filesystem does not "), failed.stderr[-3000:]
    assert "Fix: point it at a POSIX filesystem (a local disk, NFS, Lustre) and copy to the bucket " \
        "afterwards" in message


def test_a_filesystem_out_of_inodes_is_not_said_as_a_full_disk(tmp_path, monkeypatch):
    """ENOSPC is also what creating a file gets when the inodes are used up and the space is
    not (a tmpfs's nr_inodes; an ext4 holding millions of small files): "the disk is full.
    Fix: free space" sent a user to df, which showed the disk 1% used. Measured on a tmpfs
    with nr_inodes=12: the step-2 checkpoint's save, now said as the inodes."""
    from letrecipes.components import files

    def filesystem(files_total, files_free, blocks_free):
        return lambda path: os.statvfs_result((4096, 4096, 51200, blocks_free, blocks_free, files_total, files_free,
                                               files_free, 0, 255))

    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints" / "step_2.tmp"))
    monkeypatch.setattr(os, "statvfs", filesystem(files_total=12, files_free=0, blocks_free=51000))
    cause, fix = files.cause_and_fix(err)
    assert cause.startswith("the filesystem can hold no more files: its inodes are all used, while its space is not "
                            "(df -i shows them)") and str(tmp_path) in cause
    assert fix.startswith("remove files you no longer need")
    for total, free, blocks in ((12, 0, 0), (0, 0, 51000), (100000, 5000, 51000)):  # full; no inode count; inodes left
        monkeypatch.setattr(os, "statvfs", filesystem(total, free, blocks))
        assert files.cause_and_fix(err) == (f"the disk is full ({err.filename})", "free space")


@pytest.mark.parametrize("name, key", [(".metadata", "output_dir"), (".metadata#2", "output_dir"),
                                       ("__0_0.distcp", "output_dir"), ("COMPLETE", "output_dir"),
                                       ("tokenizer.json#2", "tokenizer.path")])  # the 1st: a GGUF probe
@pytest.mark.xdist_group("failing_disk_at_start")
def test_a_failing_disk_under_what_a_run_reads_at_its_start_is_one_line_naming_the_key(tmp_path, name, key,
                                                                                       copy_of_a_run):
    """An input/output error as a resume reads its checkpoint, or as the tokenizer is read,
    was an OSError traceback; as DCP read the checkpoint (.metadata#2) it was "cannot load
    ... into this run. Fix: resume with the same model", and as a shard of the corpus was
    read in training, "output_dir: training failed" (reliability.md); as its COMPLETE marker
    was read, the checkpoint was taken as damaged and skipped (steps lost; the run would have
    replaced it on reaching its step again). Each is one line naming the key whose path failed."""
    out = copy_of_a_run(tmp_path / "run", "max_steps=2", "save_every=2")
    before = digest(out)
    cmd = [sys.executable, str(REPO / "tests" / "io_fault.py"), "--read", name, "EIO", "--", "letrecipes.pretrain",
           *command(out, "resume=true", "max_steps=3")[3:]]
    failed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    message = last_line(failed)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert message.startswith(f"error: {key}: ") and "failed: an input/output error (a failing disk or a lost " \
        "network mount) (" in message and name.split("#")[0] in message, message
    assert "Fix: fix the path or the filesystem, then run the same command" in message
    assert digest(out) == before  # nothing written: the same command goes on as from the copy itself...
    if name == ".metadata#2":  # ...which it does (once: every case leaves these same bytes)
        ok(tune(out, "resume=true", "max_steps=3"))
        assert max(losses(out)) == 3


@pytest.mark.xdist_group("failing_disk_at_start")  # the same prepared run
@pytest.mark.parametrize("name", [".metadata#2", "__0_0.distcp#2"])  # DCP's own reads (the 1st: the checksums')
def test_a_sigterm_inside_dcps_read_at_resume_is_the_setup_stop(tmp_path, name, copy_of_a_run):
    """DCP gathers what its read raised into a CheckpointException: a SIGTERM whose handler ran
    there was said as "its .metadata is unreadable (StoppedBeforeTraining: ...)" and as
    "cannot load ... into this run. Fix: resume with the same model", sending the user after a
    checkpoint that was sound."""
    out = copy_of_a_run(tmp_path / "run", "max_steps=2", "save_every=2")
    cmd = [sys.executable, str(REPO / "tests" / "io_fault.py"), "--read", name, "SIGTERM", "--",
           "letrecipes.pretrain", *command(out, "resume=true", "max_steps=3")[3:]]
    stopped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "WANDB_MODE": "disabled"})
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert last_line(stopped) == ("error: stopped by SIGTERM during setup, before the first step. Nothing was trained; "
                                  "corpus shards prepared so far are kept, and launching again goes on from them.")
    assert digest(out) == digest(copy_of_a_run(tmp_path / "prepared", "max_steps=2", "save_every=2"))
    # the resume from these bytes runs in test_a_failing_disk_under_what_a_run_reads_at_its_start_is_one_line_naming_the_key


# ------------------------------------------------------------------ 7: the environment's errors
def test_environment_errors_name_the_key_the_cause_and_what_was_kept(tmp_path):
    with pytest.raises(StorageError, match=r"^output_dir: saving x failed: the disk is full \(/d/f\)\. step 3 is "
                                           r"intact\. Fix: free space, then run again\.$"):
        with environment_errors("output_dir", "saving x", "step 3 is intact.", then="run again"):
            raise OSError(28, "No space left on device", "/d/f")
    # Rust libraries (safetensors, tokenizers) wrap the OS error in their own type, with its number in the text
    with pytest.raises(StorageError, match=r"^export: writing failed: the disk is full\. Fix: free space"):
        with environment_errors("export", "writing"):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not about the environment: passes through
        with environment_errors("export", "writing"):
            raise RuntimeError("shape mismatch")
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        check_writable_folder(tmp_path / "file", "data.cache_dir")
    with pytest.raises(StorageError, match="data.cache_dir: .*a part of the path is a file"):
        check_writable_folder(tmp_path / "file" / "below", "data.cache_dir")
    folders = {"output_dir": tmp_path / "run", "data.cache_dir": tmp_path / "cache"}
    with pytest.raises(StorageError, match=r"^data.cache_dir: training failed: an input/output error .*No checkpoint"):
        with environment_errors(folders, "training", kept=lambda: "No checkpoint was saved yet."):
            raise OSError(5, "Input/output error", str(tmp_path / "cache" / "prepared-x" / "shard_000000.bin"))
    for code, cause in ((30, "the filesystem is read-only"), (122, "the disk quota is exceeded"),
                        (13, "permission denied"), (116, r"a stale network file handle .*Fix: check that no other"),
                        (107, r"the mount is disconnected .*Fix: remount it"),
                        (24, r"this process has too many open files\. Fix: raise the open-file limit \(ulimit -n")):
        with pytest.raises(StorageError, match=f"data.cache_dir: preparing failed: {cause}"):
            with environment_errors("data.cache_dir", "preparing"):
                raise OSError(code, os.strerror(code))
    # a corpus file that may not be read was told to "point it at a folder you may write"
    with pytest.raises(StorageError, match=r"^data.source: reading failed: permission denied \(/c/a.txt\)\. Fix: make "
                                           r"it readable \(an input\) or point it at a folder you may write"):
        with environment_errors("data.source", "reading"):
            raise PermissionError(13, os.strerror(13), "/c/a.txt")
    with pytest.raises(StorageError, match=r"output: writing failed: the folder is on a virtual filesystem \(like "
                                           r"/proc or /sys\), which refuses new files \(/proc/scores.json\)"):
        with environment_errors("output", "writing"):
            open("/proc/scores.json", "w")  # ENOENT, though /proc exists
    with pytest.raises(StorageError, match=r"output: writing failed: the path does not exist"):
        with environment_errors("output", "writing"):
            open(tmp_path / "no" / "such" / "folder.json", "w")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tmp_path):
    tmp_path.chmod(0o555)
    with pytest.raises(StorageError, match="permission denied"):
        check_writable_folder(tmp_path / "run", "output_dir")


def test_the_cuda_random_stream_saved_is_this_processs_gpus_and_restores_where_fewer_gpus_are_seen(monkeypatch):
    """A checkpoint held every visible GPU's CUDA stream (torch.cuda.get_rng_state_all) and a
    resume set them all back: where fewer GPUs are visible (4 a node after 8) torch stopped
    on the fifth with an IndexError. Now the stream of the process's own GPU is saved and
    restored; an older checkpoint's list gives it its own device's entry. No GPU here: torch's
    CUDA stream functions are stood in for, recording what the checkpoint code asks of them."""
    from letrecipes.components.checkpointing import RNGState

    before = RNGState().state_dict()
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # LOCAL_RANK 1's GPU
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([int(device)], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state.tolist(),
                                                                                                    device)))
    state = RNGState().state_dict()
    assert state["cuda"].tolist() == [1]  # this process's GPU, not a list of every visible one
    RNGState().load_state_dict(state)
    assert restored == [([1], 1)]
    older = {**state, "cuda": [torch.tensor([10 + i], dtype=torch.uint8) for i in range(8)]}  # saved seeing 8 GPUs
    RNGState().load_state_dict(older)
    assert restored[-1] == ([11], 1)  # device 1's own entry
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    RNGState().load_state_dict({**state, "cuda": older["cuda"][:2]})  # saved seeing 2, device 5 now: left seeded
    RNGState().load_state_dict({**state, "cuda": None})  # a CPU checkpoint on a GPU
    assert len(restored) == 2
    monkeypatch.undo()
    RNGState().load_state_dict(before)


def test_a_rank_the_saved_run_did_not_have_gets_random_streams_of_its_own(monkeypatch):
    """Resumed on 4 processes after 2: ranks 0 and 1 go on with their saved streams, ranks 2
    and 3 get new ones, distinct from every saved rank's and from each other, the same on
    every resume (before: rank 2 took rank 0's, rank 3 rank 1's, and drew alike)."""
    import random

    import numpy as np

    from letrecipes.components import checkpointing
    from letrecipes.components.checkpointing import RNGState

    before = RNGState().state_dict()  # this process's streams, given back at the end
    saved = []
    for seed in (10, 11):
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        saved.append(RNGState().state_dict())

    def draws_on(rank):
        monkeypatch.setattr(checkpointing, "_rank", lambda: rank)
        RNGState().load_resharded(saved)
        return torch.rand(4).tolist(), float(np.random.rand()), random.random()

    after = {rank: draws_on(rank) for rank in range(4)}
    for rank in (0, 1):
        RNGState().load_state_dict(saved[rank])
        assert after[rank] == (torch.rand(4).tolist(), float(np.random.rand()), random.random())
    firsts = [after[rank][0] for rank in range(4)]
    assert all(firsts[i] != firsts[j] for i in range(4) for j in range(i))
    assert [after[rank][1] for rank in (2, 3)] != [after[rank][1] for rank in (0, 1)]
    assert draws_on(3) == after[3]  # deterministic: a second resume draws the same
    RNGState().load_state_dict(before)


def test_a_save_killed_between_its_marker_and_its_rename_is_no_checkpoint_anywhere(tmp_path, straight):
    """step_N.tmp holds COMPLETE for an instant before it is renamed step_N; killed there, it
    was listed by `letrecipes status`, and the eval recipe of the run folder ended in
    "ValueError: invalid literal for int() with base 10: '00099999.tmp'"."""
    import shutil

    from letrecipes.components.checkpointing import CheckpointError, require_complete
    from letrecipes.components.run_status import run_status
    from letrecipes.eval import _run_checkpoints

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    shutil.copytree(run / "checkpoints" / steps[-1], run / "checkpoints" / "step_00099999.tmp")
    # a user's copy under a name no save gives: neither listed nor an int() it cannot parse (ValueError: 'best')
    shutil.copytree(run / "checkpoints" / steps[0], run / "checkpoints" / "step_best")
    assert run_status(run)["checkpoints"] == steps
    assert _run_checkpoints(run)[1] == [*(run / "checkpoints" / name for name in steps), run / "final"]
    with pytest.raises(CheckpointError, match=rf"resume=.*{steps[-1]}\.$"):
        require_complete(run)
