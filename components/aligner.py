"""The LET objective: layer map + projectors + alignment loss + lambda schedule.

``Aligner`` is what a recipe adds to plain pretraining::

    teacher_hidden = teacher.hidden_states(tokens, aligner.teacher_layers)
    hidden, logits = forward_with_hidden(student, tokens, aligner.student_layers)
    align, cosine = aligner(hidden, teacher_hidden)
    loss = nll + aligner.weight(step) * align
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from components.alignment import masked_mean
from components.layer_maps import PRESETS
from components.registry import build


class Aligner(nn.Module):
    def __init__(self, pairs: List[Tuple[int, int]], projectors: nn.ModuleList, loss: nn.Module, schedule: Any):
        super().__init__()
        if len(pairs) != len(projectors):
            raise ValueError("one projector per (student, teacher) pair")
        self.pairs = list(pairs)
        self.projectors = projectors
        self.loss = loss
        self.schedule = schedule

    @property
    def target(self) -> str:
        """``hidden`` (LET: projected hidden states) or ``logits`` (a logit-distillation loss)."""
        return getattr(self.loss, "target", "hidden")

    @property
    def student_layers(self) -> List[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def teacher_layers(self) -> List[int]:
        return sorted({t for _, t in self.pairs})

    def weight(self, step: int) -> float:
        return self.schedule(step)

    def finished(self, step: int) -> bool:
        """True when lambda is 0 at ``step`` and every later step: the teacher can go."""
        end = self.schedule.end_step
        return end is not None and step >= end

    def forward(
        self,
        student_hidden: Dict[int, torch.Tensor],
        teacher_hidden: Dict[int, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alignment loss, mean cosine similarity) averaged over the layer pairs.

        The cosine is a detached diagnostic, logged whatever the loss is.
        """
        losses, cosines = [], []
        for (s, t), projector in zip(self.pairs, self.projectors):
            pred, target = projector(student_hidden[s], teacher_hidden[t].to(student_hidden[s].dtype))
            losses.append(self.loss(pred, target, mask))
            with torch.no_grad():
                cosines.append(masked_mean(F.cosine_similarity(pred.float(), target.float(), dim=-1), mask))
        return torch.stack(losses).mean(), torch.stack(cosines).mean()


def build_aligner(
    cfg: Any,
    student_dim: int,
    student_depth: int,
    teacher_dim: int,
    teacher_depth: int,
    total_steps: int,
) -> Aligner:
    """Build the aligner from the ``alignment`` config section.

    A loss whose ``target`` is ``logits`` (``kl_logits``) needs no layer map or projector.
    """
    loss = build("alignment_loss", cfg.get("loss", "negative_cosine"), key="alignment.loss")
    schedule = build("schedule", cfg.get("schedule", "linear"), key="alignment.schedule", total_steps=total_steps)
    if getattr(loss, "target", "hidden") == "logits":
        return Aligner([], nn.ModuleList(), loss, schedule)
    map_spec = cfg.get("layer_map", "L2E")
    if isinstance(map_spec, str) and map_spec in PRESETS:  # `layer_map: L2E` is short for the preset
        map_spec = {"_component_": "preset", "name": map_spec}
    layer_map = build("layer_map", map_spec, key="alignment.layer_map")
    pairs = layer_map.resolve(student_depth, teacher_depth)
    projectors = nn.ModuleList(
        build("projector", cfg.get("projector", "linear"), key="alignment.projector",
              student_dim=student_dim, teacher_dim=teacher_dim)
        for _ in pairs
    )
    return Aligner(pairs, projectors, loss, schedule)
