"""Learning-rate schedules: a linear warmup, then a decay to ``min_lr_ratio * lr``.

- ``warmup_cosine``: cosine decay over every step after the warmup (the shipped configs').
- ``warmup_linear``: linear decay over the same steps.
- ``warmup_stable_decay`` (WSD): the full rate until the last ``decay_fraction`` of the
  steps, then a decay (``linear``, ``cosine`` or ``sqrt``, 1 - sqrt of the progress). The
  decay is placed from ``max_steps``, so a run resumed with a larger ``max_steps`` during the
  stable phase goes on at the same rate and decays at its new end: training can be extended
  without the jump in the rate that a cosine's longer horizon gives.
- ``warmup_constant``: the full rate after the warmup, no decay.

All are ``LambdaLR`` factors of the optimizer's ``lr``; the recipe passes ``total_steps``
(``max_steps``). Any other schedule works by its dotted path: torch's
(``torch.optim.lr_scheduler.StepLR``, ``OneCycleLR``), torchtune's
(``torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup``), your own; the
recipe gives it the run's length under the name it takes for it (:func:`run_length`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Mapping

from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from letrecipes.components.registry import RUN_LENGTHS, ComponentError, register, resolve

# RUN_LENGTHS: ours and torch's OneCycleLR take total_steps, torchtune's and transformers'
# get_*_schedule functions num_training_steps. Passing total_steps to every schedule made
# torch's StepLR or torchtune's cosine unusable ("got an unexpected keyword argument
# 'total_steps'", which no config key could remove).


def run_length(spec: Any, max_steps: int) -> Dict[str, int]:
    """``{name: max_steps}`` under the name by which ``spec``'s schedule takes the run's
    length; empty for one that takes none (StepLR, CosineAnnealingLR with its own T_max)."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    name = spec if isinstance(spec, str) else spec.get("_component_") if isinstance(spec, Mapping) else None
    if not isinstance(name, str) or not name:
        return {"total_steps": max_steps}  # the build that follows names what is wrong with the spec
    try:
        parameters = inspect.signature(resolve("lr_scheduler", name, key="lr_scheduler._component_")).parameters
    except (TypeError, ValueError):
        return {"total_steps": max_steps}
    for length in RUN_LENGTHS:
        if length in parameters:
            return {length: max_steps}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {"total_steps": max_steps} if takes_any else {}

# how the rate falls as the decay's progress p goes from 0 to 1 (1 at its start, 0 at its end)
DECAYS = {"cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)), "linear": lambda p: 1.0 - p,
          "sqrt": lambda p: 1.0 - math.sqrt(p)}


def _check(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    if warmup_steps < 0:
        raise ComponentError(f"lr_scheduler.warmup_steps={warmup_steps} must be >= 0. Fix: 0 for no warmup, "
                             "or the steps to ramp the rate up over (about 1% of max_steps is common).")
    if total_steps < 1:
        raise ComponentError(f"lr_scheduler: total_steps={total_steps} must be >= 1 (it follows max_steps).")
    if not 0 <= min_lr_ratio <= 1:
        raise ComponentError(f"lr_scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1]: the share of "
                             "optimizer.lr the decay ends at. Fix: 0.1 is usual for a cosine, 0 for a WSD decay.")


def _warmup_then_decay(warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_start: int,
                       decay: Callable[[float], float]) -> Callable[[int], float]:
    """The factor for step ``step``: warmup, the full rate until ``decay_start``, then ``decay``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay(progress)

    return factor


@register("lr_scheduler", "warmup_cosine")
def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    _check(warmup_steps, total_steps, min_lr_ratio)
    return LambdaLR(optimizer, _warmup_then_decay(warmup_steps, total_steps, min_lr_ratio, warmup_steps,
                                                  DECAYS["cosine"]))


@register("lr_scheduler", "warmup_linear")
def warmup_linear(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    _check(warmup_steps, total_steps, min_lr_ratio)
    return LambdaLR(optimizer, _warmup_then_decay(warmup_steps, total_steps, min_lr_ratio, warmup_steps,
                                                  DECAYS["linear"]))


@register("lr_scheduler", "warmup_stable_decay")
def warmup_stable_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2,
                        decay: str = "linear", min_lr_ratio: float = 0.0) -> LambdaLR:
    _check(warmup_steps, total_steps, min_lr_ratio)
    if not 0 < decay_fraction <= 1:
        raise ComponentError(f"lr_scheduler.decay_fraction={decay_fraction} must be in (0, 1]: the share of "
                             "max_steps the rate decays over, at the end. Fix: 0.1-0.2 is usual.")
    if decay not in DECAYS:
        raise ComponentError(f"lr_scheduler.decay={decay!r} must be one of {', '.join(DECAYS)}. Fix: linear (the "
                             "usual WSD decay), sqrt (1 - sqrt of the progress) or cosine.")
    # a fraction of a step is rounded up: the decay is never shorter than asked
    decay_start = max(warmup_steps, total_steps - math.ceil(decay_fraction * total_steps))
    return LambdaLR(optimizer, _warmup_then_decay(warmup_steps, total_steps, min_lr_ratio, decay_start,
                                                  DECAYS[decay]))


@register("lr_scheduler", "warmup_constant")
def warmup_constant(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    _check(warmup_steps, total_steps, 0.0)
    return LambdaLR(optimizer, _warmup_then_decay(warmup_steps, total_steps, 1.0, total_steps, DECAYS["linear"]))
