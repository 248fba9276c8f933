"""Alignment losses between (projected) student and teacher hidden states.

Each loss takes ``(pred, target, mask)`` with shapes ``[b, s, d]``, ``[b, s, d]`` and
``[b, s]`` (bool, True = real token; ``None`` = all tokens) and returns a scalar: a mean
over the non-padding tokens. Subclass :class:`AlignmentLoss` and implement
``per_token`` to add your own (see docs/extending.md).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

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


class TorchLoss(nn.Module):
    """A ``torch.nn`` loss of ``(input, target)`` (``MSELoss``, ``L1Loss``, ``HuberLoss``, ...)
    as an alignment loss: the student's projected states are its input, the teacher's its
    target, over the real tokens only, so that its ``reduction='mean'`` is the mean over
    those tokens' features (``torch.nn.MSELoss`` gives what ``mse`` gives)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"alignment loss: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
        if mask is not None:  # [tokens, d]: the padded positions leave the mean (a mask: cross-tokenizer runs only)
            pred, target = pred[mask], target[mask]
            if pred.numel() == 0:  # no position has a target: 0, as masked_mean gives, not a mean of nothing (NaN)
                return pred.float().sum()
        return self.loss(pred.float(), target.float())


def as_alignment_loss(loss: Any, name: str) -> Any:
    """``loss`` as the recipe calls an alignment loss, ``loss(pred, target, mask)``: a
    ``torch.nn`` loss of two inputs is adapted (:class:`TorchLoss`)."""
    if not isinstance(loss, nn.modules.loss._Loss):
        return loss
    check_torch_loss(type(loss), name)
    return TorchLoss(loss)


def check_torch_loss(factory: Any, name: str) -> None:
    """Refuse a ``torch.nn`` loss of other than two inputs (a margin or triplet loss, or
    CosineEmbeddingLoss with its +1/-1 target): LET gives two states and nothing else."""
    if not (isinstance(factory, type) and issubclass(factory, nn.modules.loss._Loss)):
        return
    inputs = [p.name for p in inspect.signature(factory.forward).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if len(inputs) != 2:
        raise ComponentError(f"alignment.loss={name} takes ({', '.join(inputs)}); an alignment loss compares two "
                             "states, the student's (projected) and the teacher's, and nothing else. Fix: "
                             "alignment.loss=negative_cosine (the paper's cosine), or a torch loss of (input, target) "
                             "such as torch.nn.MSELoss or torch.nn.HuberLoss (docs/extending.md).")


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
