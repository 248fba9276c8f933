"""Alignment losses between (projected) student and teacher hidden states.

Each loss takes ``(pred, target, mask)`` with shapes ``[b, s, d]``, ``[b, s, d]`` and
``[b, s]`` (bool, True = real token; ``None`` = all tokens) and returns a scalar: a mean
over the non-padding tokens. Subclass :class:`AlignmentLoss` and implement
``per_token`` to add your own (see docs/extending.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from letrecipes.components.registry import ComponentError, register


class AlignmentLoss(nn.Module):
    """Base class: ``per_token`` returns a ``[b, s]`` loss; masking and the mean are here."""

    def per_token(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"alignment loss: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
        values = self.per_token(pred.float(), target.float())
        if not isinstance(values, torch.Tensor) or values.shape != pred.shape[:-1] or not values.is_floating_point():
            if not isinstance(values, torch.Tensor):
                got, fix = f"a {type(values).__name__}", "return a tensor computed from pred and target"
            elif values.shape != pred.shape[:-1]:
                got, fix = f"shape {list(values.shape)}", "reduce the last dimension (e.g. .mean(-1))"
            else:  # integers carry no gradient: LET would train nothing
                got, fix = f"a {values.dtype} tensor", "compute it in floating point from pred and target"
            raise ComponentError(f"alignment.loss: {type(self).__name__}.per_token returned {got} for states "
                                 f"{list(pred.shape)}; it returns one loss per token, [b, s]. Fix: {fix}; the base "
                                 "class masks padding and takes the mean.")
        return masked_mean(values, mask)


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@register("alignment_loss", "negative_cosine")
class NegativeCosine(AlignmentLoss):
    """The paper's loss: ``-cos(pred, target)``; -1 when perfectly aligned."""

    def per_token(self, pred, target):
        return -F.cosine_similarity(pred, target, dim=-1, eps=1e-6)


@register("alignment_loss", "mse")
class MSE(AlignmentLoss):
    """Squared error averaged over features."""

    def per_token(self, pred, target):
        return (pred - target).pow(2).mean(-1)


@register("alignment_loss", "normalized_mse")
class NormalizedMSE(AlignmentLoss):
    """Squared distance between L2-normalised vectors (= 2 - 2 cos): scale-free."""

    def per_token(self, pred, target):
        return (F.normalize(pred, dim=-1, eps=1e-6) - F.normalize(target, dim=-1, eps=1e-6)).pow(2).sum(-1)


@register("alignment_loss", "smooth_l1")
class SmoothL1(AlignmentLoss):
    """Huber-style loss averaged over features; robust to outlier features."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def per_token(self, pred, target):
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta).mean(-1)


@register("alignment_loss", "kl_logits")
class LogitKL(AlignmentLoss):
    """Logit distillation, ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per token.

    Not LET: it aligns output distributions, not hidden states. ``target = "logits"`` makes
    the recipe feed it the student's and the teacher's logits (cut to the shared
    tokenizer's vocabulary) instead of projected hidden states, with no layer map or
    projector. With the LET schedule it is the paper's RKD baseline; with a constant
    weight that stops at S_stop it is SALT-like.
    """

    target = "logits"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, pred, target):
        t = self.temperature
        log_student = F.log_softmax(pred / t, dim=-1)
        log_teacher = F.log_softmax(target / t, dim=-1)
        return (t * t) * (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
