"""A failed multi-process run ends with its ranks' errors in a few lines, not torchrun's report.

``tune run --nproc_per_node N`` and ``torchrun`` end a failed job by raising
``ChildFailedError`` in the launcher: Python prints the launcher's own stack (about twenty
lines of tune, torchrun and elastic frames, none of them the user's) and then a report that
repeats each failed rank's error in a seven-line block. The ranks' errors are what the user
needs, and most are every rank's alike (a config key, a missing file). A ``sys.excepthook``
in the launcher prints them grouped instead::

    letrecipes.pretrain failed on 2 processes of this node (ranks 0-1, on gpu-07); rank 0 first, at 20:58:41:
      ranks 0-1: error: data.source: '/data/c' does not exist ...

A rank's Python traceback (a bug) is printed whole; a rank killed by a signal is named with
it. A launcher stopped by Ctrl-C or SIGTERM (``SignalException``, after its ranks saved and
said so) ends in one line too. Only a job of letrecipes is summarised this way (its name, or
one of its ranks' errors in our one-line form); any other job, and any run with
``LETRECIPES_TRACEBACK=1``, gets torchrun's report as it was. The launcher also logged, on every failure, that it has no
error file of its own to copy the first rank's into (true of every plain torchrun run, and
nothing a user can act on): that one log line is dropped.

Installed by ``import letrecipes``, which the ``.pth`` file of scripts/setup.sh runs at the
start of every Python in the venv, so it is in place in the launcher before it fails.
"""

import os
import signal
import socket
import sys
from datetime import datetime

from letrecipes._torchao_notice import drop_message
from letrecipes._unknown_recipe import hook_installed

NO_PARENT_ERROR_FILE = "no error file defined for parent, to copy child error file"
NO_ERROR_RECORDED = "To enable traceback see:"  # torchrun's message for a rank that recorded no error


# torchrun's wait between the SIGTERM that stops the rest of a failed job and its SIGKILL (fixed in
# torch 2.13; --shutdown-timeout sets only the wait after a signal to the launcher)
LAUNCHER_KILL_AFTER_S = 30


def _message(failure, others_failed: bool = False, after_first_s: float = 0) -> str:
    """What the rank said: its one-line error, its traceback, or how it ended. ``others_failed``:
    another rank ended otherwise than by SIGTERM, which is how torchrun stops the rest of a job
    once one of its processes has failed; ``after_first_s``: how long after the first failure
    this one was recorded."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("extraInfo", {}).get("py_callstack") or message.get("message") or ""
    message = str(message).strip()
    if failure.exitcode == -signal.SIGTERM and others_failed:
        return "stopped by the launcher (SIGTERM) once another rank had failed"
    if failure.exitcode < 0:
        name = failure.signal_name()
        why = (" (the kernel's out-of-memory killer does this; `dmesg` says so, or a scheduler's kill)"
               if name == "SIGKILL" else "")
        if name == "SIGKILL" and others_failed and after_first_s >= LAUNCHER_KILL_AFTER_S:
            # a rank that hung (a stopped process, a stuck GPU): said to be the OOM killer's, it sent users to dmesg
            why = (f" ({after_first_s:.0f} s after the first failure: torchrun kills a process that has not exited "
                   f"{LAUNCHER_KILL_AFTER_S} s after the SIGTERM it sends once another rank has failed, so this one was "
                   "hung or stopped; the kernel's out-of-memory killer does this too, `dmesg` says so)")
        return f"killed by signal {-failure.exitcode} ({name}){why}"
    if not message or message.startswith(NO_ERROR_RECORDED):
        return f"exit code {failure.exitcode}, with no error recorded: its own output above says why"
    if "\n" in message:  # a traceback: a bug, shown whole
        return "\n    " + message.replace("\n", "\n    ")
    return message


def _ranks(ranks) -> str:
    """``0-3, 6``: the ranks as runs of consecutive numbers."""
    runs = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def summary(error) -> str:
    """The failed ranks of ``error`` (a ``ChildFailedError``), grouped by what they said."""
    failed = {rank for rank, failure in error.failures.items() if failure.exitcode != -signal.SIGTERM}
    # torchrun's first is the earliest timestamp, in whole seconds: a rank it stopped ties with the one that
    # failed, and then its lower rank number made it "first"; a rank that failed of itself comes first
    first = min(failed or error.failures, key=lambda rank: (error.failures[rank].timestamp, rank))
    failure = error.failures[first]
    said = {}
    for rank, other in sorted(error.failures.items(), key=lambda item: (item[0] != first, item[0])):
        said.setdefault(_message(other, others_failed=bool(failed - {rank}),  # the first's first
                                 after_first_s=other.timestamp - failure.timestamp), []).append(rank)
    count = len(error.failures)
    at = datetime.fromtimestamp(failure.timestamp).strftime("%H:%M:%S")
    lines = [f"{error.name} failed on {count} process{'es' if count > 1 else ''} of this node "
             f"(rank{'s' if count > 1 else ''} {_ranks(error.failures)}, on {socket.gethostname()}); "
             f"rank {first} first, at {at}:"]
    lines += [f"  rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}: {message}" for message, ranks in said.items()]
    return "\n".join(lines)


def _is_letrecipes_job(error) -> bool:
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return False
    return "letrecipes" in str(getattr(error, "name", "")) or any(
        _message(failure).startswith("error: ") for failure in failures.values())


def _launcher_stopped(error) -> str:
    """torchrun's agent, stopped by Ctrl-C or a SIGTERM, raises ``SignalException`` once it has
    passed the signal on and its processes have exited: about twenty lines of its own frames
    after the ranks had each said what they saved."""
    sigval = getattr(error, "sigval", None)
    name = sigval.name if isinstance(sigval, signal.Signals) else "a signal"
    return (f"error: the launcher was stopped by {name}; it passed the signal on to its processes, and their lines "
            "above say where each stopped and what it saved (a checkpoint to resume from with resume=true).")


def _is_letrecipes_launch() -> bool:
    return any("letrecipes" in word for word in sys.argv)  # tune run letrecipes/x, torchrun .../letrecipes/x.py


def _failed_ranks_in_a_few_lines(previous):
    def hook(kind, error, traceback):
        traceback_asked = bool(os.environ.get("LETRECIPES_TRACEBACK"))
        if kind.__name__ == "SignalException" and _is_letrecipes_launch() and not traceback_asked:
            print(_launcher_stopped(error), file=sys.stderr, flush=True)
            return None
        if kind.__name__ != "ChildFailedError" or traceback_asked or not _is_letrecipes_job(error):
            return previous(kind, error, traceback)
        try:
            text = summary(error)
        except Exception:  # torchrun's report, as it was, rather than none
            return previous(kind, error, traceback)
        print(text, file=sys.stderr, flush=True)  # the interpreter exits with status 1
    hook.previous, hook.failed_ranks_in_a_few_lines = previous, True
    return hook


def _command_words() -> list:
    """The launch command as typed. At the start of Python (the ``.pth``), before runpy,
    ``python -m torch.distributed.run ...`` has ``sys.argv`` ``['-m', ...]``, without the module:
    ``sys.orig_argv`` still has it."""
    words = list(getattr(sys, "argv", None) or [])
    original = list(getattr(sys, "orig_argv", None) or [])
    if words[:1] == ["-m"] and "-m" in original:
        return original[original.index("-m"):]  # ['-m', 'torch.distributed.run', ...]
    return words


def _is_launcher(words) -> bool:
    """``tune run --nproc_per_node N ...``, ``torchrun ...`` or ``python -m torch.distributed.run ...``."""
    several = any(word.split("=")[0] in ("--nproc_per_node", "--nproc-per-node", "--nnodes") for word in words)
    return several and (os.path.basename(words[0]) in ("tune", "torchrun") or "torch.distributed.run" in words[:3])


def _one_node(words) -> bool:
    """A launch of one node: no ``--nnodes``, or 1 (``1:1``), or ``--standalone``."""
    for i, word in enumerate(words):
        name, _, value = word.partition("=")
        if name == "--nnodes":
            value = value or (words[i + 1] if i + 1 < len(words) else "")
            return value.strip() in ("1", "1:1")
    return True


def _options_start(words) -> int:
    """Where the launcher's own options begin in ``sys.argv``: after ``tune run``; after
    ``torchrun`` (or the ``-m`` that stands for ``python -m torch.distributed.run``)."""
    return 2 if os.path.basename(words[0]) == "tune" else 1


def say_if_the_host_name_does_not_resolve() -> None:
    """torchrun gives its processes this node's host name as the address to meet at, unless
    ``--local-addr`` names one: where the name does not resolve (a container's host name
    missing from /etc/hosts, a node's broken DNS) each process retried for 5 minutes and
    then printed a C++ stack, with nothing of letrecipes said. A job of one node needs no
    name: its processes meet at 127.0.0.1 (``--local-addr 127.0.0.1`` is added to the
    launcher's options, and said). A job of several nodes is told in one line, here in the
    launcher, which goes on (a resolver that answers late may answer it)."""
    words = _command_words()
    if not _is_launcher(words) or not _is_letrecipes_launch():
        return
    if any(word.split("=")[0] in ("--local-addr", "--local_addr") for word in words):
        return
    name = socket.gethostname()
    try:
        socket.getaddrinfo(socket.getfqdn(name), None)
    except socket.gaierror as err:
        unresolved = (f"this machine's host name {name!r} does not resolve to an address ({err.strerror}), and "
                      "torchrun gives it to its processes as the address to meet at")
        if _one_node(words):
            at = _options_start(sys.argv)
            sys.argv[at:at] = ["--local-addr", "127.0.0.1"]
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo looks the name up too, and warns of each miss
            sys.stderr.write(f"note: {unresolved}; on one node they meet at 127.0.0.1 instead (--local-addr 127.0.0.1 "
                             "added). To keep the name, make it resolve (/etc/hosts, DNS).\n")
            return
        sys.stderr.write(f"warning: {unresolved}: they would wait for it (5 minutes), then fail. Fix: make it resolve "
                         "(/etc/hosts, DNS), or give torchrun this node's address that the other nodes reach: "
                         "tune run --nnodes ... --local-addr <address> ...\n")


def split_config_equals() -> None:
    """``tune run <recipe> --config=<name>``: tune looks for the word ``--config`` on its own
    and stopped with "The '--config' argument is required" (argparse's usual ``--key=value``
    spelling, which the recipes' own parser takes). The word is split in two, as meant."""
    words = sys.argv
    original = list(getattr(sys, "orig_argv", None) or [])
    tune = os.path.basename(words[0]) == "tune" if words else False
    tune = tune or (words[:1] == ["-m"] and "torchtune._cli.tune" in original)  # python -m torchtune._cli.tune
    if not tune or words[1:2] != ["run"] or "--config" in words:
        return
    for i, word in enumerate(words):
        if word.startswith("--config="):
            words[i:i + 1] = ["--config", word.partition("=")[2]]
            return


def install() -> None:
    split_config_equals()
    say_if_the_host_name_does_not_resolve()
    drop_message("torch.distributed.elastic.multiprocessing.errors.error_handler", NO_PARENT_ERROR_FILE)
    if not hook_installed("failed_ranks_in_a_few_lines"):
        sys.excepthook = _failed_ranks_in_a_few_lines(sys.excepthook)
