"""What to do when a step's loss or gradient norm is not finite: skip the update or stop.

``divergence.policy: skip`` drops the update (the step still counts, so the LR schedule
and data order stay as planned) and stops after ``divergence.max_skips`` skips in a row;
``stop`` (the default) ends the run at once, naming the last good checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

from letrecipes.components.errors import LetRecipesError


class DivergenceError(LetRecipesError, RuntimeError):
    """Training produced a non-finite loss or gradient norm and the policy says stop."""


class DivergenceGuard:
    def __init__(self, policy: str = "stop", max_skips: int = 5):
        self.policy, self.max_skips = policy, int(max_skips)
        self.skipped_in_a_row = 0

    def ok(self) -> None:
        """A good update: the run of skips is over."""
        self.skipped_in_a_row = 0

    def skip_or_stop(self, step: int, figures: Dict[str, Any], grad_norm: Optional[float],
                     last_good: Callable[[], Optional[Path]]) -> str:
        """Called for a non-finite step: the message to log if the update is skipped;
        raises :class:`DivergenceError` if the run must stop, naming ``last_good()`` (asked
        only then: finding it verifies checkpoints)."""
        what = f"non-finite loss or gradient norm at step {step} ({figures}, grad_norm={grad_norm})"
        self.skipped_in_a_row += 1
        if self.policy == "skip" and self.skipped_in_a_row <= self.max_skips:
            return f"{what}: update skipped ({self.skipped_in_a_row} in a row; divergence.max_skips={self.max_skips})"
        last_checkpoint = last_good()
        raise DivergenceError(
            f"{what}{f', after {self.max_skips} skipped updates in a row' if self.policy == 'skip' else ''}. The "
            f"last good checkpoint is {last_checkpoint or 'none (no checkpoint was saved yet)'}. Fix: resume from it "
            "with a lower optimizer.lr or a smaller clip_grad_norm, or set divergence.policy=skip to drop such updates."
        )
