"""lambda(step): the weight of the alignment loss, a pure function of the global step.

``step`` counts optimizer steps from 0. ``stop`` (S_stop) is either a number of steps
(an int, ``stop: 500``) or a fraction of the run (a float in (0, 1], ``stop: 0.25``),
which needs ``total_steps`` (the recipe passes its ``max_steps``).
``end_step`` is the first step from which lambda is 0 for good (None: never), so the
recipe knows when the teacher can be released. Because lambda depends on the step
alone, resuming a run needs no schedule state.
"""

from __future__ import annotations

import math
from typing import Optional, Union

from letrecipes.components.registry import ComponentError, register


def resolve_stop(stop: Union[int, float], total_steps: Optional[int]) -> int:
    if isinstance(stop, bool) or not isinstance(stop, (int, float)):
        raise ComponentError(f"alignment.schedule.stop must be steps (int) or a fraction (float), got {stop!r}")
    if isinstance(stop, float):
        if not 0.0 < stop <= 1.0:
            raise ComponentError(
                f"alignment.schedule.stop={stop}: a fraction must lie in (0, 1]. "
                "Fix: use e.g. 0.25, or an integer number of steps."
            )
        if total_steps is None:
            raise ComponentError("alignment.schedule.stop is a fraction but total_steps is unknown.")
        return max(1, round(stop * total_steps))
    if stop < 1:
        raise ComponentError(f"alignment.schedule.stop={stop}: must be >= 1 step. Fix: a number of steps >= 1, or a "
                             "fraction of max_steps in (0, 1] such as 0.25.")
    return stop


class Schedule:
    lambda0: float
    end_step: Optional[int]

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lambda0={self.lambda0}, end_step={self.end_step})"


def _check_lambda0(lambda0: float) -> float:
    if not math.isfinite(float(lambda0)) or lambda0 < 0:
        raise ComponentError(f"alignment.schedule.lambda0={lambda0} must be a finite number >= 0. Fix: 0.1 is the "
                             "paper's value.")
    return float(lambda0)


class EndsAtStop(Schedule):
    """A schedule that is 0 from S_stop (``stop``) on."""

    def __init__(self, lambda0: float = 0.1, stop: Union[int, float] = 0.25, total_steps: Optional[int] = None):
        self.lambda0 = _check_lambda0(lambda0)
        self.end_step = resolve_stop(stop, total_steps)


@register("schedule", "linear")
class LinearDecay(EndsAtStop):
    """The paper's: lambda0 * max(0, (S - step) / S)."""

    def __call__(self, step: int) -> float:
        return self.lambda0 * max(0.0, (self.end_step - step) / self.end_step)


@register("schedule", "cosine")
class CosineDecay(EndsAtStop):
    """lambda0 * (1 + cos(pi * step / S)) / 2 until S, then 0."""

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return 0.0
        return self.lambda0 * 0.5 * (1.0 + math.cos(math.pi * step / self.end_step))


@register("schedule", "step")
class StepCutoff(EndsAtStop):
    """lambda0 until S, then 0 (a hard cut-off)."""

    def __call__(self, step: int) -> float:
        return self.lambda0 if step < self.end_step else 0.0


@register("schedule", "constant")
class Constant(Schedule):
    """lambda0 for the whole run (REPA-style); the teacher is never released."""

    def __init__(self, lambda0: float = 0.1, total_steps: Optional[int] = None):
        self.lambda0 = _check_lambda0(lambda0)
        self.end_step = None if self.lambda0 > 0 else 0

    def __call__(self, step: int) -> float:
        return self.lambda0
