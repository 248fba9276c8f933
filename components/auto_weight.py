"""lambda(step) chosen by measurement: ``schedule: {_component_: auto, rho0: ...}``.

A fixed lambda0 means different things at different scales: what the alignment term does
to the student depends on how large its gradient is next to the language-modelling
loss's, and that ratio moves with the model, the data, the projector and the step. This
schedule holds the ratio itself at a target, at the place where the two terms meet, the
aligned student block's hidden state ``h``::

    rho(step)    = rho0 * max(0, 1 - step / S_stop)          (the paper's linear decay)
    ratio        = EMA of ||dNLL/dh|| / ||d align/dh||        (measured)
    lambda(step) = rho(step) * ratio

so that ``||d(lambda * align)/dh|| / ||dNLL/dh||`` is about ``rho(step)``: rho0 is the one
knob, and it means the same at 1M and at 7B parameters.

Measuring costs no extra pass. On a measuring step the aligned hidden state reaches the
projector through an identity ``_Tap`` whose backward keeps the gradient the alignment
term sends to ``h``; a hook on ``h`` sees the total (both terms, summed by autograd).
The language-modelling part is their difference. Three sums over ``h`` (two squared
norms and a dot product) go into the step's figures, which the recipe already averages
over ranks and micro-batches in one collective: the norms are global, the same on every
rank, with FSDP2 and with gradient accumulation. The moving average is updated on the
device (no host sync) and lives in a buffer of this module, so it is in every checkpoint
and a resumed run continues exactly.

Before its first measurement lambda is ``lambda_start`` (tiny: the first step measures,
it does not align).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from letrecipes.components.registry import ComponentError, register
from letrecipes.components.schedules import Schedule, resolve_stop

MEASURED = ("_g_total_sq", "_g_align_sq", "_g_dot")  # the step's figures this schedule reads back


class _Tap(torch.autograd.Function):
    """Identity; its backward leaves the gradient passing through in ``align_grads[layer]``.

    What the node holds (``align_grads``) must never refer to the tapped output: the output
    holds the node, so that would be a cycle through autograd that Python's collector cannot
    see, and every measuring step would leak its graph (measured: 12 MB a step on let_tiny)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, align_grads: Dict[Any, torch.Tensor], layer: Any) -> torch.Tensor:
        ctx.align_grads, ctx.layer = align_grads, layer
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.align_grads[ctx.layer] = grad
        return grad, None, None


@register("schedule", "auto")
class GradientRatio(nn.Module, Schedule):
    def __init__(self, rho0: float = 1.0, stop: Union[int, float] = 0.5, total_steps: Optional[int] = None,
                 measure_every: int = 1, smoothing: float = 0.9, lambda_start: float = 1e-3):
        nn.Module.__init__(self)
        if not (isinstance(rho0, (int, float)) and 0 < rho0 < float("inf")):
            raise ComponentError(f"alignment.schedule.rho0={rho0} must be a finite number > 0. Fix: 1.0, the default "
                                 "(the two gradients equally strong at the start).")
        if not (isinstance(measure_every, int) and measure_every >= 1):
            raise ComponentError(f"alignment.schedule.measure_every={measure_every} must be an integer >= 1. Fix: "
                                 "1, the default (measuring costs no extra pass).")
        if not 0 <= smoothing < 1:
            raise ComponentError(f"alignment.schedule.smoothing={smoothing} must lie in [0, 1). Fix: 0.9, the "
                                 "default.")
        self.rho0, self.end_step = float(rho0), resolve_stop(stop, total_steps)
        self.measure_every, self.smoothing, self.lambda_start = measure_every, float(smoothing), float(lambda_start)
        # EMA of ||dNLL/dh|| / ||d align/dh||; 0 until the first measurement
        self.register_buffer("ratio", torch.zeros((), dtype=torch.float32))
        self.lambda0 = self.rho0  # what the aligner and its logs call the schedule's scale

    def __repr__(self) -> str:
        return (f"GradientRatio(rho0={self.rho0}, end_step={self.end_step}, measure_every={self.measure_every}, "
                f"smoothing={self.smoothing})")

    def rho(self, step: int) -> float:
        return self.rho0 * max(0.0, (self.end_step - step) / self.end_step)

    def __call__(self, step: int) -> torch.Tensor:
        """lambda at ``step``: a device tensor (read on log steps only)."""
        measured = self.ratio > 0
        return torch.where(measured, self.rho(step) * self.ratio, torch.full_like(self.ratio, self.lambda_start)) \
            if step < self.end_step else torch.zeros_like(self.ratio)

    def measuring(self, step: int) -> bool:
        return step < self.end_step and step % self.measure_every == 0

    # ------------------------------------------------------------------ the probe
    def probe(self, hidden: Dict[Any, torch.Tensor]) -> Tuple[Dict[Any, torch.Tensor], Dict[str, torch.Tensor]]:
        """Watch the aligned hidden states of one micro-batch. Returns the tapped states,
        which the aligner must use instead, and the figures, which fill during backward."""
        zero = torch.zeros((), dtype=torch.float64, device=next(iter(hidden.values())).device)
        figures = {k: zero.clone() for k in MEASURED}
        align_grads: Dict[Any, torch.Tensor] = {}
        tapped = {}
        for layer, h in hidden.items():
            if not h.requires_grad:
                continue
            tapped[layer] = _Tap.apply(h, align_grads, layer)
            h.register_hook(lambda grad, layer=layer: self._total(figures, align_grads, layer, grad))
        return tapped, figures

    @staticmethod
    def _total(figures: Dict[str, torch.Tensor], align_grads: Dict[Any, torch.Tensor], layer: Any,
               total: torch.Tensor) -> None:
        """``total``: the whole gradient at ``h``; the tap's part reached it first."""
        align = align_grads.pop(layer, None)
        total = total.detach().double()
        figures["_g_total_sq"].add_(total.pow(2).sum())
        if align is not None:
            align = align.detach().double()
            figures["_g_align_sq"].add_(align.pow(2).sum())
            figures["_g_dot"].add_((total * align).sum())

    def update(self, figures: Dict[str, Any], weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """After the step's figures were averaged over ranks and micro-batches: fold the
        measurement into the moving average (on the device) and return what to log."""
        total_sq, align_sq, dot = (figures.pop(k) for k in MEASURED)
        nll_sq = (total_sq - 2 * dot + align_sq).clamp_min(0)
        usable = (align_sq > 0) & (nll_sq > 0)
        # the align gradient seen at h is lambda * d align/dh: divide lambda back out
        ratio = torch.where(usable, weight.double() * nll_sq.sqrt() / align_sq.clamp_min(1e-300).sqrt(),
                            self.ratio.double()).float()
        smoothed = torch.where(self.ratio > 0, self.smoothing * self.ratio + (1 - self.smoothing) * ratio, ratio)
        self.ratio.copy_(torch.where(usable, smoothed, self.ratio))
        return {"rho_measured": torch.where(usable, align_sq.sqrt() / nll_sq.clamp_min(1e-300).sqrt(),
                                            torch.zeros_like(align_sq)),
                "grad_ratio": self.ratio.detach().clone(),
                # the lambda0 of the paper's linear schedule that would give this step's weight
                "lambda0_equivalent": self.rho0 * self.ratio.detach().clone()}
