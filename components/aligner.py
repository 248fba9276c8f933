"""The LET objective: layer map + projectors + alignment loss + lambda schedule.

An aligner is what a recipe adds to plain pretraining. It says what it needs from the
teacher, and turns the student's outputs and those targets into one alignment term::

    targets = aligner.teacher_targets(teacher, tokens)
    hidden, logits = forward_with_hidden(student, tokens, aligner.student_layers)
    align, cosine = aligner(hidden, targets, logits=logits)
    loss = nll + aligner.weight(step) * align

:class:`Aligner` is LET (projected hidden states at the mapped layers);
:class:`LogitAligner` is logit distillation (the RKD/SALT baselines), chosen when the
alignment loss declares ``target = "logits"``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from letrecipes.components.alignment import TorchLoss, as_alignment_loss, masked_mean
from letrecipes.components.errors import LetRecipesWarning
from letrecipes.components.layer_maps import layer_map_spec
from letrecipes.components.registry import ComponentError, build, registered


class Aligner(nn.Module):
    """Hidden-state alignment: ``loss(P_k(h_student[s_k]), h_teacher[t_k])`` averaged over pairs."""

    target = "hidden"

    def __init__(self, pairs: List[Tuple[int, int]], projectors: nn.ModuleList, loss: nn.Module, schedule: Any,
                 pooling: Optional[nn.Module] = None):
        super().__init__()
        if len(pairs) != len(projectors):
            raise ValueError("one projector per (student, teacher) pair")
        self.pairs = list(pairs)
        self.projectors = projectors
        self.loss = loss
        self.schedule = schedule
        self.pooling = pooling  # cross-tokenizer mode: teacher states -> one target per student position

    @property
    def student_layers(self) -> List[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def teacher_layers(self) -> List[int]:
        return sorted({t for _, t in self.pairs})

    @property
    def teacher_blocks_run(self) -> Optional[int]:
        """How deep the teacher's forward goes (None: all of it, output head included)."""
        return max(self.teacher_layers)

    def weight(self, step: int):
        """lambda at ``step``: a number, or a device tensor for a measuring schedule (auto)."""
        return self.schedule(step)

    def measuring(self, step: int) -> bool:
        """Whether the schedule measures gradients at ``step`` (components/auto_weight.py)."""
        measuring = getattr(self.schedule, "measuring", None)
        return bool(measuring and measuring(step))

    def meeting_points(self, hidden: Dict[int, torch.Tensor], logits: Optional[torch.Tensor]) -> Dict[Any, torch.Tensor]:
        """Where the alignment term's gradient joins the language-modelling loss's: the
        aligned student hidden states (logits for a logit aligner)."""
        return {s: hidden[s] for s in self.student_layers}

    def finished(self, step: int) -> bool:
        """True when lambda is 0 at ``step`` and every later step: the teacher can go."""
        end = self.schedule.end_step
        return end is not None and step >= end

    def teacher_targets(self, teacher: nn.Module, tokens: torch.Tensor) -> Dict[int, torch.Tensor]:
        return teacher.hidden_states(tokens, self.teacher_layers)

    def pool(self, states: Dict[int, torch.Tensor], first: torch.Tensor, last: torch.Tensor
             ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
        """Cross-tokenizer mode: teacher states over the teacher's own tokens -> (targets at
        the student's positions, mask of positions that have one); components/cross_tokenizer.py."""
        pooled = {layer: self.pooling(h, first, last) for layer, h in states.items()}
        return {layer: target for layer, (target, _) in pooled.items()}, next(iter(pooled.values()))[1]

    def forward(
        self,
        student_hidden: Dict[int, torch.Tensor],
        targets: Dict[int, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        logits: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(alignment loss, mean cosine similarity), averaged over the layer pairs.

        The cosine is a detached diagnostic, logged whatever the loss is. ``logits`` (the
        student's) is for aligners that compare output distributions; this one ignores it.
        """
        losses, cosines = [], []
        for (s, t), projector in zip(self.pairs, self.projectors):
            pred, target = projector(student_hidden[s], targets[t].to(student_hidden[s].dtype))
            losses.append(self.loss(pred, target, mask))
            with torch.no_grad():
                cosines.append(masked_mean(F.cosine_similarity(pred.float(), target.float(), dim=-1), mask))
        return torch.stack(losses).mean(), torch.stack(cosines).mean()


class LogitAligner(Aligner):
    """Logit distillation: ``loss(student_logits, teacher_logits)`` over the shared tokenizer's
    ids only (the rest of either vocabulary is padding). No layer map, no projector."""

    target = "logits"

    def __init__(self, loss: nn.Module, schedule: Any, vocab_size: int):
        super().__init__([], nn.ModuleList(), loss, schedule)
        self.vocab_size = vocab_size

    @property
    def teacher_blocks_run(self) -> Optional[int]:
        return None

    def teacher_targets(self, teacher: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return teacher.logits(tokens)

    def meeting_points(self, hidden, logits):
        return {"logits": logits}

    def forward(self, student_hidden, targets, mask=None, logits=None):
        """(alignment loss, None): there is no hidden-state cosine to report."""
        vocab = self.vocab_size
        return self.loss(logits[..., :vocab], targets[..., :vocab], mask), None


def build_aligner(
    cfg: Any,
    student_dim: int,
    student_depth: int,
    teacher_dim: int,
    teacher_depth: int,
    total_steps: int,
    vocab_size: Optional[int] = None,
    cross_tokenizer: bool = False,
) -> Aligner:
    """Build the aligner from the ``alignment`` config section.

    A loss whose ``target`` is ``logits`` (``kl_logits``) gives a :class:`LogitAligner`
    over the first ``vocab_size`` ids (the shared tokenizer's).
    """
    loss = as_alignment_loss(build("alignment_loss", cfg.get("loss", "negative_cosine"), key="alignment.loss"),
                             _named(cfg, "loss", "negative_cosine"))
    schedule = build("schedule", cfg.get("schedule", "linear"), key="alignment.schedule", total_steps=total_steps)
    if getattr(loss, "target", "hidden") == "logits":
        if cross_tokenizer:
            raise ComponentError(f"alignment.loss={cfg.get('loss')!r} compares output distributions over one shared "
                                 "vocabulary, and this teacher reads another tokenizer. Fix: a hidden-state loss "
                                 "(negative_cosine, mse, ...), or a teacher with the student's tokenizer.")
        aligner = LogitAligner(loss, schedule, vocab_size)
        rehearse(aligner, cfg, vocab_size, vocab_size, total_steps)
        return aligner
    layer_map = build("layer_map", layer_map_spec(cfg.get("layer_map", "L2E")), key="alignment.layer_map")
    pairs = layer_map.resolve(student_depth, teacher_depth)
    projectors = nn.ModuleList(
        build("projector", cfg.get("projector", "linear"), key="alignment.projector",
              student_dim=student_dim, teacher_dim=teacher_dim)
        for _ in pairs
    )
    # mean, not last: measured in docs/results.md (cross-tokenizer LET: 1.21x against none)
    pooling = build("pooling", cfg.get("pooling", "mean"), key="alignment.pooling") if cross_tokenizer else None
    aligner = Aligner(pairs, projectors, loss, schedule, pooling)
    rehearse(aligner, cfg, student_dim, teacher_dim, total_steps)
    return aligner


EXTENDING = "docs/extending.md"
PROBE_SHAPE = (2, 3)  # [b, s] of the rehearsal's states: small, and s differs from any width


def rehearse(aligner: Aligner, cfg: Any, student_dim: int, teacher_dim: int, total_steps: int) -> None:
    """One alignment term on random states, before any step, so that a part of one's own
    (docs/extending.md) that cannot serve fails with its key named instead of in a
    traceback at step 1, or trains on without effect: the loss must be one finite number
    through which a gradient reaches the student's states; the projector must give two
    states of one shape; the schedule must give finite weights >= 0 that are 0 from its
    ``end_step`` (where the recipe drops the teacher). Parameters keep no gradient and the
    global random state is not drawn from."""
    # a dry run builds on the meta device: shapes and the gradient's path are checked, values cannot be
    device = next(aligner.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(0)

    def states(width: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*PROBE_SHAPE, width, generator=generator).to(device).requires_grad_(grad)

    pairs = aligner.pairs or [("logits", "logits")]
    student = {s: states(student_dim, grad=True) for s, _ in pairs}
    targets = {t: states(teacher_dim) for _, t in pairs}
    mask = torch.ones(PROBE_SHAPE, dtype=torch.bool, device=device)
    mask[0, -1] = False  # a padded position, as cross-tokenizer runs have
    loss_name, projector_name = _named(cfg, "loss", "negative_cosine"), _named(cfg, "projector", "linear")
    for (s, t), projector in zip(aligner.pairs, aligner.projectors):
        try:
            out = projector(student[s], targets[t])
        except Exception as err:
            raise _failed("alignment.projector", projector_name, err, student_dim, teacher_dim,
                          (projector, 2, "projector(student_states, teacher_states)", "projector")) from err
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, torch.Tensor) for x in out)
                and out[0].shape == out[1].shape and out[0].shape[:-1] == PROBE_SHAPE):
            got = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in
                        (out if isinstance(out, tuple) else (out,)))
            raise ComponentError(f"alignment.projector={projector_name}: given student states "
                                 f"{[*PROBE_SHAPE, student_dim]} and teacher states {[*PROBE_SHAPE, teacher_dim]}, "
                                 f"it returned {got}. Fix: return (student, teacher) states of one shape [b, s, d] "
                                 f"({EXTENDING}).")
    try:
        logits = student.get("logits")  # a logit aligner compares whole logits, the teacher's as one tensor
        value = aligner(student, targets if logits is None else targets["logits"], mask=mask, logits=logits)[0]
    except ComponentError:
        raise
    except Exception as err:
        raise _failed("alignment.loss", loss_name, err, student_dim, teacher_dim,
                      (aligner.loss, 3, "loss(student_states, teacher_states, mask)", "alignment_loss")) from err
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ComponentError(f"alignment.loss={loss_name}: on random states it gave {value!r}, not one finite number. "
                             f"Fix: return a scalar tensor (AlignmentLoss.per_token returns [b, s]; {EXTENDING}).")
    if not value.is_meta and not value.isfinite().all():
        raise ComponentError(f"alignment.loss={loss_name}: on random, finite states it gave {value.item()}: a 0/0, "
                             "a log or a square root of 0, or a norm without an eps in it? Fix: keep it finite for any "
                             f"input (an eps, as F.cosine_similarity(..., eps=1e-6) has; {EXTENDING}).")
    if not _reaches(value, list(student.values())):
        width = out[0].shape[-1] if aligner.pairs else student_dim  # the projected states the loss compares
        pred = states(width, grad=True)
        loss_alone = aligner.loss(pred, states(width), mask)
        key, name = ("alignment.projector", projector_name) if _reaches(loss_alone, [pred]) else \
            ("alignment.loss", loss_name)
        raise ComponentError(f"{key}={name}: no gradient reaches the student's states through it (a .detach(), "
                             ".item() or torch.no_grad inside?), so LET would train nothing. Fix: keep the student's "
                             f"side differentiable ({EXTENDING}).")
    if not value.is_meta:
        width = out[0].shape[-1] if aligner.pairs else student_dim
        _warn_unless_least_at_agreement(aligner.loss, loss_name, states(width), states(width), mask)
    _rehearse_schedule(aligner.schedule, _named(cfg, "schedule", "linear"), total_steps)


def _warn_unless_least_at_agreement(loss: nn.Module, name: str, target: torch.Tensor, other: torch.Tensor,
                                    mask: torch.Tensor) -> None:
    """A distance (cosine, MSE, KL) has a zero gradient where the student's states equal the
    teacher's; a loss of classes or probabilities read on hidden states (torch.nn's
    CrossEntropyLoss, BCEWithLogitsLoss) does not, and would push agreeing states apart.
    A warning, not an error: a contrastive loss does that on purpose."""
    def gradient_norm(pred: torch.Tensor) -> float:
        pred = pred.detach().clone().requires_grad_(True)
        grad, = torch.autograd.grad(loss(pred, target, mask), pred, allow_unused=True)
        return 0.0 if grad is None else float(grad[mask].norm())

    at_agreement, elsewhere = gradient_norm(target), gradient_norm(other)
    if at_agreement > 1e-3 * elsewhere:
        warnings.warn(f"alignment.loss={name} is not least where the student's states equal the teacher's (its gradient "
                      f"there is {at_agreement / max(elsewhere, 1e-30):.2f}x its gradient at unrelated states): LET "
                      "would move states that agree apart. Meant for a contrastive loss; otherwise a distance such as "
                      "negative_cosine, mse or torch.nn.MSELoss (docs/extending.md).", LetRecipesWarning)


def _reaches(value: torch.Tensor, inputs: List[torch.Tensor]) -> bool:
    """Whether ``value``'s graph leads back to any of ``inputs`` (a gradient that is zero on
    random states, as a hinge's may be, still reaches them)."""
    if not value.requires_grad:
        return False
    return any(g is not None for g in torch.autograd.grad(value.sum(), inputs, allow_unused=True))


def _rehearse_schedule(schedule: Any, name: str, total_steps: int) -> None:
    if getattr(schedule, "measuring", None) is not None:
        return  # its weight is measured during the run (auto); auto_weight.py checks its own
    end = getattr(schedule, "end_step", None)
    for step in sorted({0, 1, total_steps // 2, max(0, total_steps - 1)} | ({end} if end is not None else set())):
        try:
            weight = float(schedule(step))
        except Exception as err:
            raise ComponentError(f"alignment.schedule={name}: lambda({step}) failed ({type(err).__name__}: {err}). "
                                 f"Fix: __call__(step) returns a number ({EXTENDING}).") from err
        if not weight >= 0 or weight == float("inf"):
            raise ComponentError(f"alignment.schedule={name}: lambda({step}) = {weight}; a weight is a finite number "
                                 ">= 0. Fix: the schedule's __call__.")
        if end is not None and step >= end and weight != 0:
            raise ComponentError(f"alignment.schedule={name}: end_step is {end} (the teacher is dropped there) but "
                                 f"lambda({step}) = {weight}. Fix: return 0 from end_step on, or set end_step to None "
                                 "(the teacher stays to the end).")


def _unbindable(component: Any, given: int) -> Optional[str]:
    """The parameters of ``component``'s call when ``given`` positional arguments cannot bind to them."""
    target = component.forward if isinstance(component, nn.Module) else component
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(given))
    except TypeError:
        return ", ".join(signature.parameters) or "no arguments"
    return None


def _named(cfg: Any, key: str, default: str) -> str:
    spec = cfg.get(key, default)
    return str(spec.get("_component_", spec) if hasattr(spec, "get") else spec)


def _failed(key: str, name: str, err: Exception, student_dim: int, teacher_dim: int,
            call: Tuple[Any, int, str, str]) -> ComponentError:
    """``call``: (the component, how many arguments the recipe gives it, how it is called, its
    registry kind). A module of another interface (torch.nn.Identity as a projector) or one
    of torch's own that refuses hidden states (torch.nn.BCELoss) is named as such; only a
    component of one's own is sent back to its code."""
    component, given, called_as, kind = call
    built_in = f"a built-in one ({', '.join(sorted(registered(kind)))})"
    takes = _unbindable(component, given) if isinstance(err, TypeError) else None
    if takes is not None:
        return ComponentError(f"{key}={name} is called as {called_as}, and {type(component).__name__} takes "
                              f"({takes}). Fix: a {key.split('.')[-1]} of that interface: {built_in} or your own "
                              f"({EXTENDING}).")
    first = str(err).splitlines()[0] if str(err) else ""
    inner = component.loss if isinstance(component, TorchLoss) else component
    fix = (f"another {key}, one that takes any real-valued states: {built_in}" if
           type(inner).__module__.split(".")[0] == "torch" else f"the component's code ({EXTENDING} shows the interface)")
    return ComponentError(f"{key}={name} failed on random states (student {[*PROBE_SHAPE, student_dim]}, teacher "
                          f"{[*PROBE_SHAPE, teacher_dim]}): {type(err).__name__}: {first}. Fix: {fix}.")
