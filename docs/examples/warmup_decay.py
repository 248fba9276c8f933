"""A lambda schedule of your own, registered from a module of your own.

lambda rises linearly from 0 to lambda0 over ``warmup`` steps (the student's first
blocks are random noise at step 0: aligning them hard from the start may fight the
language-modelling loss), then decays linearly to 0 at S_stop like the paper's::

    tune run letrecipes/let_pretrain --config let_tiny 'imports=[warmup_decay]' \\
        alignment.schedule._component_=warmup_decay alignment.schedule.warmup=20 ...

A schedule is a pure function of the step (so resuming needs no state) with an
``end_step`` (the first step from which it is 0 for good: the recipe then releases the
teacher). ``EndsAtStop`` resolves ``stop`` (steps, or a fraction of ``total_steps``) and
checks ``lambda0``.
"""

from letrecipes.components.registry import register
from letrecipes.components.schedules import EndsAtStop


@register("schedule", "warmup_decay")
class WarmupDecay(EndsAtStop):
    def __init__(self, lambda0: float = 0.1, stop=0.25, warmup: int = 10, total_steps=None):
        super().__init__(lambda0, stop, total_steps)
        self.warmup = min(int(warmup), self.end_step - 1)

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return 0.0
        if step < self.warmup:
            return self.lambda0 * (step + 1) / (self.warmup + 1)
        return self.lambda0 * (self.end_step - step) / (self.end_step - self.warmup)
