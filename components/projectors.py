"""Make a student hidden state comparable to a teacher hidden state.

Every projector is called as ``projector(h_student, h_teacher) -> (a, b)`` and the
alignment loss compares ``a`` with ``b``. Built with ``(student_dim, teacher_dim)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from letrecipes.components.registry import ComponentError, register


@register("projector", "linear")
class LinearProjector(nn.Module):
    """Learned map student width -> teacher width (the usual choice)."""

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)

    def forward(self, h_student, h_teacher):
        return self.proj(h_student), h_teacher


@register("projector", "mlp")
class MLPProjector(nn.Module):
    """REPA's projector: Linear -> SiLU -> Linear (-> Linear ...), to the teacher width."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int | None = None, num_layers: int = 2):
        super().__init__()
        if num_layers < 2:
            raise ComponentError("alignment.projector.num_layers must be >= 2 for mlp; use linear for 1.")
        hidden_dim = hidden_dim or 2 * max(student_dim, teacher_dim)
        dims = [student_dim] + [hidden_dim] * (num_layers - 1) + [teacher_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.SiLU())
            layers.append(nn.Linear(d_in, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, h_student, h_teacher):
        return self.net(h_student), h_teacher


@register("projector", "interpolate")
class InterpolateProjector(nn.Module):
    """Parameter-free: resample the teacher vector to the student width (1-D linear)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_dim = student_dim

    def forward(self, h_student, h_teacher):
        if h_teacher.shape[-1] == self.student_dim:
            return h_student, h_teacher
        shape = h_teacher.shape[:-1]
        flat = h_teacher.reshape(-1, 1, h_teacher.shape[-1])
        resized = F.interpolate(flat, size=self.student_dim, mode="linear", align_corners=True)
        return h_student, resized.reshape(*shape, self.student_dim)


@register("projector", "identity")
class IdentityProjector(nn.Module):
    """No projection; only valid when the widths match."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        if student_dim != teacher_dim:
            raise ComponentError(
                f"alignment.projector: identity needs equal widths, got student {student_dim} "
                f"and teacher {teacher_dim}. Fix: use linear, mlp or interpolate."
            )

    def forward(self, h_student, h_teacher):
        return h_student, h_teacher


