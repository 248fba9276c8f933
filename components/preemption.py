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
from typing import Dict, Optional

from letrecipes.components.errors import LetRecipesError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(LetRecipesError):
    """The run was asked to stop and saved its state first."""


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
