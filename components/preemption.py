"""Graceful stop: SIGTERM (what schedulers send before they kill a job), SIGUSR1 or SIGUSR2
(the notice a Slurm job asks for with ``--signal=USR1@600``, Lightning's convention),
Ctrl-C or SIGHUP (a dropped ssh session; ignored under nohup) asks the run to finish its
step, save a checkpoint and exit non-zero with the command to resume.
A second signal stops at once, in one line that says what is kept (one within a second of
the first is the same notice from another sender: the scheduler's and the launcher's); a
third meets the default handlers (Python's KeyboardInterrupt, the kernel's SIGTERM). Once
the last step's checkpoint is complete (the final export runs), the first one stops at once.

The handler only sets a flag; the recipe reads it between steps (every step in one
process; with several, :class:`StopVote` agrees on it every step over the CPU backend, and
the sync points also read it at once, so all ranks save the same step).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, NoReturn, Optional

from letrecipes.components.errors import LetRecipesError, StopRequested

# SIGUSR1/2 would end the process at once by default: no checkpoint for the notice asked for.
# SIGHUP too: the terminal of a run in an ssh session that drops (and torchrun passes it on).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# a helper process (a loader or tokenizer worker) ignores these: its trainer stops it
NOTICE_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _handled(sig: int) -> bool:
    """Under nohup (SIGHUP ignored from the start) a hangup is none of the run's business."""
    return not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN)


def _console_failure(err: BaseException) -> bool:
    """An OS error, or the ValueError of a closed stream. Not an error of the project's that
    the write passed on (one raised by code the write ran): that one goes on up."""
    return isinstance(err, OSError) or type(err) is ValueError


class _ForgivingStream:
    """The console of a run whose console may be gone: a write that fails is dropped, and the
    first failure is reported to ``on_failure`` (the graceful stop). A terminal that hung up
    (a dropped ssh session) fails every write with EIO; a pipe whose reader ended (``| head``,
    a ``tee`` that was killed) with EPIPE. Either ended the run at its next log line, in a
    BrokenPipeError traceback, without saving the steps since its last checkpoint."""

    def __init__(self, stream, name: str, on_failure: Optional[Callable[[str], None]] = None):
        self._stream, self._name, self.on_failure = stream, name, on_failure
        self.failed = False

    def _report(self, err: BaseException) -> None:
        report, self.on_failure, self.failed = self.on_failure, None, True  # reported once
        if report is not None:
            report(f"its console closing (a write to {self._name} failed: {err}; a `| head` or `tee` it wrote into "
                   "ended, or its terminal hung up; a log file, `> train.log 2>&1`, cannot close under it)")

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as err:
            if not _console_failure(err):
                raise
            self._report(err)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (OSError, ValueError) as err:
            if not _console_failure(err):
                raise
            self._report(err)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def forgive_console_errors(on_failure: Optional[Callable[[str], None]] = None) -> Callable[[], None]:
    """Make ``sys.stdout`` and ``sys.stderr`` drop the writes that fail (reporting the first to
    ``on_failure``, which may raise: the write then raises it); returns what puts the streams
    back as they were, unless one has failed (then what is still written must not raise)."""
    before = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    made = []
    for name, stream in before.items():
        if isinstance(stream, _ForgivingStream):
            stream.on_failure = None if stream.failed else (on_failure or stream.on_failure)
        elif stream is not None:
            made.append(_ForgivingStream(stream, name, on_failure))
            setattr(sys, name, made[-1])

    def restore() -> None:
        for name, stream in before.items():
            current = getattr(sys, name)
            if isinstance(current, _ForgivingStream) and not current.failed:  # not replaced meanwhile (pytest)
                setattr(sys, name, stream)
        # a logging handler made meanwhile keeps the wrapper as its stream: a failed write through it
        # later (logging's flush at exit, into a console already gone) is dropped, not a stop of work long done
        for wrapper in made:
            wrapper.on_failure = None
    return restore


@contextmanager
def stop_when_the_console_closes(during: str, kept: str) -> Iterator[None]:
    """Where there is no step to save (a run's setup, the eval recipe): a console that closes
    (``| head``, a killed ``tee``) stops the work with one line on whatever still reads, as a
    signal would, instead of a BrokenPipeError traceback."""
    def stop(reason: str) -> NoReturn:
        raise StoppedBeforeTraining(f"stopped by {reason} {during}. {kept}")

    restore = forgive_console_errors(on_failure=stop)
    try:
        yield
    finally:
        restore()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunStopped(LetRecipesError):
    """The run was asked to stop and saved its state first."""


class StoppedAtOnce(StopRequested):
    """A second signal: the run stopped where it was, without saving the step it was in."""


class StoppedBeforeTraining(StopRequested):
    """A signal arrived while there was nothing to save (a run's setup, preparing the corpus,
    an export, an evaluation)."""


def _left_to_the_forked_child(installer: int, signum: int) -> bool:
    """True in a process forked from the one that installed the handler: a library's worker
    pool (lm-eval's bootstrap, ``datasets``' map) inherits the handler, but what it does
    belongs to the run's own process. There the signal does what it would without us: a
    notice is ignored (the run's process acts on it), anything else ends the worker, as the
    pool that sends it expects. A handler that raised in a pool worker had its error caught
    by the worker's task loop, which went back to wait on a queue whose lock the pool held
    while it waited for that worker to end: ``Pool.terminate()`` hung for good."""
    if os.getpid() == installer:
        return False
    if signum in NOTICE_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
        return True
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return True


@contextmanager
def stop_at_once_on_signals(during: str, kept: str) -> Iterator[None]:
    """While there is no step to finish and nothing to save (a run's setup: preparing the
    corpus, loading the teacher, compiling; the ``letrecipes`` commands; the eval recipe),
    SIGTERM or Ctrl-C stops at once with one line saying what is kept (``kept``), instead of a
    KeyboardInterrupt traceback or a silent kill. The exception unwinds through every
    ``finally``, so locks are released and half-written files removed as on any error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    installer = os.getpid()

    requested: List[str] = []

    def handle(signum, frame):
        if _left_to_the_forked_child(installer, signum):
            return
        requested.append(f"stopped by {signal.Signals(signum).name} {during}. {kept}")
        raise StoppedBeforeTraining(requested[-1])

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS if _handled(sig)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Reached with a signal handled: its stop was dropped where it landed (a library's bare
    # `except BaseException`, a finalizer, whose errors Python only prints) and the work went
    # on to its end. It stops here, before what follows (the first step) begins.
    if requested:
        raise StoppedBeforeTraining(requested[0])


@contextmanager
def stop_at_once_with_one_line(during: str, kept: str) -> Iterator[None]:
    """A signal or the console closing, where there is nothing to save (a run's setup, the
    eval recipe): either stops the work at once in one line saying what is kept."""
    with stop_at_once_on_signals(during, kept), stop_when_the_console_closes(during, kept):
        yield


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun (and `tune run`) in every process it starts


def stop_with_the_launcher() -> None:
    """Under torchrun, have the kernel send this process SIGTERM when the launcher dies
    (Linux's parent-death signal), so the run saves a step and exits like on any notice.
    torchrun starts each rank in a session of its own: a launcher killed by SIGKILL, the
    OOM killer or a signal it has no handler for (SIGUSR1) left its ranks training on,
    orphans holding the run's lock and their GPUs until the job's time limit."""
    sigterm_when_the_parent_dies = parent_death_sigterm()
    if _under_torchrun() and sigterm_when_the_parent_dies is not None:
        sigterm_when_the_parent_dies()


def parent_death_sigterm() -> Optional[Callable[[], None]]:
    """What asks the kernel for SIGTERM when this process's parent dies (Linux's
    ``PR_SET_PDEATHSIG``), looked up now so that a child can call it between fork and exec
    (``subprocess.Popen(preexec_fn=...)``); None where there is no prctl (not Linux, another
    libc): the parent's own signals still arrive."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


class StopVote:
    """Ranks agree on a stop every step, without waiting on the GPU: each step posts this
    rank's flag in an asynchronous all-reduce over the process group's CPU backend (gloo;
    a GPU group is created as ``cuda:nccl,cpu:gloo``) and reads the one it posted the step
    before, long finished. Every rank reads the same sums at the same steps, so all stop
    after the same step, at most two steps after the signal. (Agreeing only at log and save
    steps could take ``log_every`` steps: at 7B, more than the 30 s torchrun waits after
    its SIGTERM before it kills the processes, so a scheduler's notice saved nothing.)"""

    def __init__(self):
        self.pending = None  # (the all-reduce in flight, its tensor)

    def poll(self, requested: bool) -> bool:
        import torch
        import torch.distributed as dist

        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item() > 0)
        flag = torch.tensor([1.0 if requested else 0.0])
        self.pending = (dist.all_reduce(flag, async_op=True), flag)
        return stop

    def close(self) -> None:
        """Finish the all-reduce in flight (before the process group goes); a peer already
        gone is no error here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                pending[0].wait()
            except Exception:  # noqa: BLE001 - the run's own outcome is decided elsewhere
                pass


# A signal this soon after the first is the same notice again, not a second request: under
# torchrun the scheduler's SIGTERM reaches every process and the launcher passes its own on
# to them a few milliseconds later (Slurm signals every process of a job step).
REPEAT_WINDOW_S = 1.0


class GracefulStop:
    """``at_once(signal_name)`` is the error line for a second signal: raised from the
    handler, it unwinds the step through every ``finally`` (a save in progress leaves only
    its ``.tmp`` folder, the run's lock is released) and ends in one line like any error."""

    def __init__(self, log=print, at_once: Optional[Callable[[str], str]] = None):
        self.log = log
        self.at_once = at_once or (lambda name: f"stopped at once by a second {name}, without saving.")
        self.received: Optional[str] = None
        self.received_at = 0.0
        # what a first signal is told the run will do; once there is nothing left to save (the last
        # step's checkpoint is complete, the final export runs), ``first_at_once`` is its error line
        self.notice = "finishing this step, then saving a checkpoint"
        self.first_at_once: Optional[Callable[[str], str]] = None
        self._previous: Dict[int, object] = {}
        self._installer = os.getpid()
        self.parent = os.getppid() if _under_torchrun() else None  # torchrun's agent

    def install(self) -> "GracefulStop":
        self._installer = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in filter(_handled, SIGNALS):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if _left_to_the_forked_child(self._installer, signum):
            return
        name = signal.Signals(signum).name
        if self.first_at_once is not None:  # nothing to save: no reason to wait for the work in progress
            self.uninstall()
            raise StoppedAtOnce(self.first_at_once(name))
        if self.received is not None:
            if time.monotonic() - self.received_at < REPEAT_WINDOW_S:  # the same notice, by another sender
                return
            # A second request: no more waiting. Before, the signal was raised again under the
            # default handler, and a Ctrl-C pressed twice ended in a KeyboardInterrupt traceback.
            self.uninstall()  # a third signal meets the default handler, in case unwinding hangs
            raise StoppedAtOnce(self.at_once(name))
        self.received, self.received_at = name, time.monotonic()
        forgive_console_errors()  # SIGHUP: the terminal may be gone
        self.log(f"{name} received: {self.notice} (send it again to stop at once)")

    def request(self, reason: str) -> None:
        """A stop asked for by the run itself (its console closing): as a first signal is."""
        if self.received is None:
            self.received, self.received_at = reason, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def cause(self) -> Optional[str]:
        """The signal, and whether the launcher has died, which is when the kernel sends it
        (:func:`stop_with_the_launcher`). Asked after the step and its save: the kernel sends
        the signal as the launcher's threads exit, before this process is handed to init."""
        if self.received is None:
            return None
        return self.received + (" (the launcher has died)" if self.parent not in (None, os.getppid()) else "")
