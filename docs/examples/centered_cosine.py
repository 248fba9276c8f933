"""A custom alignment loss, registered from a module of your own.

Use it without editing letrecipes:

    tune run letrecipes/let_pretrain --config let_tiny \
        'imports=[centered_cosine]' alignment.loss=centered_cosine

(run from this folder, or put it anywhere on PYTHONPATH). Without registering, the
dotted path works too: ``alignment.loss=centered_cosine.CenteredCosine``.
"""

import torch
import torch.nn.functional as F

from letrecipes.components.alignment import AlignmentLoss
from letrecipes.components.registry import register


@register("alignment_loss", "centered_cosine")
class CenteredCosine(AlignmentLoss):
    """Negative cosine after removing each vector's mean feature.

    Hidden states often share a large common direction; centering makes the loss
    look at the rest. ``per_token`` returns one value per token; the base class
    masks padding and averages.
    """

    def per_token(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = pred - pred.mean(-1, keepdim=True)
        target = target - target.mean(-1, keepdim=True)
        return -F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
