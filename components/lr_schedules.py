"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from letrecipes.components.registry import ComponentError, register


@register("lr_scheduler", "warmup_cosine")
def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    if warmup_steps < 0:
        raise ComponentError(f"lr_scheduler.warmup_steps={warmup_steps} must be >= 0. Fix: 0 for no warmup, "
                             "or the steps to ramp the rate up over (about 1% of max_steps is common).")
    if total_steps < 1:
        raise ComponentError(f"lr_scheduler: total_steps={total_steps} must be >= 1 (it follows max_steps).")
    if not 0 <= min_lr_ratio <= 1:
        raise ComponentError(f"lr_scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1]: the share of "
                             "optimizer.lr the cosine ends at. Fix: 0.1 is usual.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
