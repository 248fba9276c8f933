"""Fault injection for the reliability tests and ``benchmarks/fault_injection.py``.

A testing aid, not a training feature: the config's ``debug`` section asks for a fault at
a given step, and :func:`install` wraps the recipe's methods so that the training
loop itself carries no trace of it::

    debug:
      kill_at_step: 7               # SIGKILL as step 7 starts
      nan_loss_at_step: 3           # step 3's loss becomes NaN (the divergence guard must act)
      kill_during_save_at_step: 4   # SIGKILL inside step 4's checkpoint save, shards written
      sigterm_at_step: 5            # SIGTERM (a scheduler's notice) as step 5 starts: a graceful stop
      sigterm_during_save_at_step: 6  # SIGTERM inside step 6's checkpoint save, shards written
      hang_at_step: 4               # SIGSTOP as step 4 starts: a process that hangs without dying
      slow_batches_s: 0.05          # every batch is handed over this much later (a loader that cannot keep up)
      slow_save_s: 30               # every save waits this long with its shards written (a slow filesystem)
      slow_export_s: 30             # the final export waits this long before it writes (a 7B one takes minutes)
      rank: 1                       # only on this rank (default: every rank)

A torchrun restart of the job (``--max-restarts``) injects nothing: it is the recovery.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Mapping, Optional

from letrecipes.components.run_info import torchrun_attempt


def _kill(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _sigterm(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def install(recipe: Any, debug: Optional[Mapping[str, Any]], rank: int) -> None:
    """Wrap ``recipe.train_step``, ``compute_loss`` and ``save_checkpoint`` on this instance
    to inject the faults ``debug`` asks for. Nothing is wrapped when it asks for none."""
    debug = dict(debug or {})
    if debug.get("rank") is not None and debug["rank"] != rank:
        return
    if torchrun_attempt() > 0:  # a torchrun restart must get past it
        return
    kill_at, nan_at, kill_saving_at, term_at, term_saving_at, hang_at = (debug.get(k) for k in (
        "kill_at_step", "nan_loss_at_step", "kill_during_save_at_step", "sigterm_at_step",
        "sigterm_during_save_at_step", "hang_at_step"))
    if kill_at is not None or term_at is not None or hang_at is not None:
        train_step = recipe.train_step

        @functools.wraps(train_step)
        def train_step_or_die(*args, **kwargs):
            if recipe.step + 1 == kill_at:
                _kill()
            if recipe.step + 1 == term_at:
                os.kill(os.getpid(), signal.SIGTERM)  # handled between statements: lands mid-step
            if recipe.step + 1 == hang_at:
                os.kill(os.getpid(), signal.SIGSTOP)  # alive and silent: the others wait in their next collective
            return train_step(*args, **kwargs)

        recipe.train_step = train_step_or_die
    if debug.get("slow_batches_s"):
        next_batch, delay = recipe.batches.next, float(debug["slow_batches_s"])

        @functools.wraps(next_batch)
        def late_batch(*args, **kwargs):
            time.sleep(delay)
            return next_batch(*args, **kwargs)

        recipe.batches.next = late_batch
    if nan_at is not None:
        compute_loss = recipe.compute_loss

        @functools.wraps(compute_loss)
        def poisoned_loss(*args, **kwargs):
            loss, figures = compute_loss(*args, **kwargs)
            return (loss * float("nan"), figures) if recipe.step + 1 == nan_at else (loss, figures)

        recipe.compute_loss = poisoned_loss
    slow_save_s = float(debug.get("slow_save_s") or 0)
    if kill_saving_at is not None or term_saving_at is not None or slow_save_s:
        save_checkpoint = recipe.save_checkpoint

        @functools.wraps(save_checkpoint)
        def save_with_fault(*args, **kwargs):
            if recipe.step == kill_saving_at:
                recipe.checkpointer.before_complete = _kill
            elif recipe.step == term_saving_at:
                recipe.checkpointer.before_complete = _sigterm
            elif slow_save_s:
                recipe.checkpointer.before_complete = lambda tmp: time.sleep(slow_save_s)
            else:
                recipe.checkpointer.before_complete = None
            return save_checkpoint(*args, **kwargs)

        recipe.save_checkpoint = save_with_fault
    if debug.get("slow_export_s"):
        export, export_delay = recipe.export, float(debug["slow_export_s"])

        @functools.wraps(export)
        def slow_export(*args, **kwargs):
            time.sleep(export_delay)
            return export(*args, **kwargs)

        recipe.export = slow_export
