"""Graceful stop: SIGTERM (what schedulers send before they kill a job) or Ctrl-C asks the
run to finish its step, save a checkpoint and exit non-zero with the command to resume.
A second signal stops at once.

The handler only sets a flag; the recipe reads it between steps (every step in one
process; at its sync points with several, where the ranks agree on it with one
collective so they all save the same step).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from letrecipes.components.errors import LetRecipesError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(LetRecipesError):
    """The run was asked to stop and saved its state first."""


class StoppedBeforeTraining(LetRecipesError):
    """A signal arrived while there was nothing to save yet (setup, preparing the corpus)."""


@contextmanager
def stop_at_once_on_signals(during: str, kept: str) -> Iterator[None]:
    """While there is no step to finish and nothing to save (a run's setup: preparing the
    corpus, loading the teacher, compiling; ``letrecipes prepare-data``), SIGTERM or Ctrl-C
    stops at once with one line saying what is kept (``kept``), instead of a
    KeyboardInterrupt traceback or a silent kill. The exception unwinds through every
    ``finally``, so locks are released and half-written files removed as on any error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise StoppedBeforeTraining(f"stopped by {signal.Signals(signum).name} {during}. {kept}")

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class GracefulStop:
    def __init__(self, log=print):
        self.log = log
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second signal: no more waiting
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.received = name
        self.log(f"{name} received: finishing this step, then saving a checkpoint (send it again to stop at once)")

    @property
    def requested(self) -> bool:
        return self.received is not None
