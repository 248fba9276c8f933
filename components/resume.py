"""What a resume may change: the config of the run that wrote a checkpoint against the
config it is resumed with.

A resumed run is the same run going on. Changes that make it another run (the model,
the tokenizer, the data, the teacher and alignment, the seed) are refused in one line
listing them. Changes meant for a run in progress (learning rate and the rest of the
optimizer's hyperparameters, the schedule and its length, logging, evaluation and save
cadence, the divergence policy, the number of processes and the batch: a node lost, a
smaller allocation) are applied, and each is logged as ``resume: optimizer.lr 0.003 -> 3e-05``.

Keys not listed as changeable are refused: a key this module does not know (a user
component's argument, a new section) is assumed to change the run, which errs on the
side of telling the user.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.files import shortened

# Keys a run may change when it resumes (fnmatch patterns over dotted keys).
CHANGEABLE = (
    "optimizer.*", "lr_scheduler.*", "max_steps", "clip_grad_norm",
    "log_every", "eval_every", "eval_batches", "save_every", "keep_last_checkpoints", "async_checkpoint",
    "metrics.*", "metric_logger*", "divergence.*", "progress_bar", "debug.*", "export.*", "dry_run*",
    "resume", "overwrite", "output_dir", "process_group_timeout_s", "cpu_malloc_tuning", "memory_check", "imports",
    "data.cache_dir", "data.prepare_timeout_s", "data.prepare_workers", "data.num_workers",
    "compile", "deterministic", "activation_checkpointing.*", "teacher.compile", "loss_chunk_tokens",
    "fsdp.reduce_every_micro_batch", "profiler*",
    # DCP reshards weights and optimizer; the data goes on after the sequences read (BatchStream)
    "world_size", "batch_size", "gradient_accumulation_steps", "fsdp.replicate_degree",
)
# ... except these, which change what the optimizer state or the schedule state mean.
NOT_CHANGEABLE = ("optimizer._component_", "lr_scheduler._component_")
ABSENT = "<absent>"
# What run_info.json records besides the config, of the content of the files a run reads:
# (its key, what it vouches for, the config key that names it). A resume compares them, and
# the processes of a job must find them alike (their nodes may hold other files by one name).
FINGERPRINTS = (("tokenizer_fingerprint", "tokenizer", "tokenizer.path"),
                ("data_fingerprint", "training tokens", "data.source, as prepared"),
                ("teacher_fingerprint", "teacher", "teacher.path"))
# a key that only says where something lies, and the fingerprint that vouches for its content
LOCATIONS = {"data.source": "data_fingerprint", "data.sources": "data_fingerprint",
             "teacher.path": "teacher_fingerprint"}
IGNORED = ("resume", "overwrite", "init_from")  # how this launch started, not what the run is


class ResumeChangeError(LetRecipesError):
    pass


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def changeable(key: str) -> bool:
    if any(fnmatch.fnmatchcase(key, p) for p in NOT_CHANGEABLE):
        return False
    return any(fnmatch.fnmatchcase(key, p) for p in CHANGEABLE)


def differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every identity field or config key that differs."""
    names = {field: field.replace("_", " ") for field, _, _ in FINGERPRINTS}  # "data fingerprint"
    old = {**flatten(saved.get("config") or {}), "world_size": saved.get("world_size"),
           **{name: saved.get(field) for field, name in names.items()}}
    new = {**flatten(current.get("config") or {}), "world_size": current.get("world_size"),
           **{name: current.get(field) for field, name in names.items()}}
    for name in names.values():
        if old[name] is None:  # written before this fingerprint was recorded
            old.pop(name), new.pop(name)
    keys = sorted((set(old) | set(new)) - set(IGNORED))
    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in keys
            if old.get(k, ABSENT) != new.get(k, ABSENT) and not same_component(k, old.get(k), new.get(k))]


# which registry a `_component_` key names (a short name and its dotted path are one component)
COMPONENT_KINDS = {"model._component_": "model", "optimizer._component_": "optimizer",
                   "lr_scheduler._component_": "lr_scheduler", "teacher._component_": "teacher_loader",
                   "alignment.schedule._component_": "schedule", "alignment.projector._component_": "projector",
                   "alignment.loss._component_": "alignment_loss", "alignment.layer_map._component_": "layer_map",
                   "alignment.pooling._component_": "pooling"}


def same_component(key: str, old: Any, new: Any) -> bool:
    """``llama`` then ``letrecipes.components.models.llama_model``: the same model, not a change."""
    if key not in COMPONENT_KINDS or not (isinstance(old, str) and isinstance(new, str)):
        return False
    from letrecipes.components import registry

    try:
        return registry.resolve(COMPONENT_KINDS[key], old) is registry.resolve(COMPONENT_KINDS[key], new)
    except LetRecipesError:
        return False


def saved_run_info(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """The run_info.json a checkpoint was written with; None for one written before it existed
    (and for one that is no record: not JSON, or JSON that is not an object)."""
    try:
        saved = json.loads((Path(checkpoint) / "run_info.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def check(checkpoint: Path, current: Dict[str, Any],
          settled: Iterable[str] = ()) -> Optional[List[Tuple[str, Any, Any]]]:
    """The changes a resume from ``checkpoint`` applies; raises :class:`ResumeChangeError`
    listing the ones that would make it another run. ``settled``: keys that no longer shape
    the run at the checkpoint's step (the teacher's content past S_stop): applied and
    logged, not refused. None when the checkpoint carries no record of its config (written
    before run_info.json existed)."""
    saved = saved_run_info(checkpoint)
    if saved is None:
        return None
    was_let, is_let = (uses_teacher(info) for info in (saved, current))
    if was_let != is_let:  # before the key list: the recipe is what differs
        raise ResumeChangeError(
            f"resume: {checkpoint} was written by " + (
                "a LET run (it has a teacher and an aligner), and this run has none (plain pretraining). Fix: resume it "
                "with the recipe that wrote it, `tune run letrecipes/let_pretrain` (after S_stop it neither loads nor "
                "needs the teacher), or start a new run from its weights: "
                if was_let else
                "plain pretraining (it has no teacher), and this run is LET. Fix: start LET from its weights: ")
            + f"`letrecipes export {checkpoint} <folder>`, then init_from=<folder> in another output_dir.")
    changes = differences(saved, current)
    refused = [c for c in changes if not changeable(c[0]) and c[0] not in settled
               and not (c[0] in LOCATIONS and saved.get(LOCATIONS[c[0]]) and moved(*c))]
    if refused:
        listed = "; ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in refused[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ResumeChangeError(
            f"resume: {checkpoint} was written by a different run: {listed}{more}. These keys define the run (model, "
            "tokenizer, data, teacher, alignment, seed). Fix: resume with the values it was written "
            "with (its run_info.json holds them), or start a new run in another output_dir (or overwrite=true)."
            + (" The data fingerprint is the prepared corpus's token counts, shard by shard: the corpus changed since "
               "(a file edited, added or removed), so the data position saved would point into other text; to go on "
               f"with new data, export it (letrecipes export {checkpoint} <folder>) and start a new run with "
               "init_from=<folder>."
               if any(k == "data fingerprint" for k, _, _ in refused) else "")
            + (" The teacher fingerprint samples the teacher's files: they changed since (retrained or replaced at "
               "that path), so the rest of the run would be guided by another model; point teacher.path at the one "
               "the run began with."
               if any(k == "teacher fingerprint" for k, _, _ in refused) else ""))
    return changes


def uses_teacher(info: Dict[str, Any]) -> bool:
    """Whether a run_info.json is a LET run's (recorded now; an older one had a teacher section in its config)."""
    if "uses_teacher" in info:
        return bool(info["uses_teacher"])
    return "teacher" in (info.get("config") or {})


def moved(key: str, old: Any, new: Any) -> bool:
    """Whether a change only says where the data lies (another mount, a node's scratch disk):
    ``data.source``, or the ``source`` of mixture entries that are otherwise the same. With
    the corpus's content on record (the data fingerprint), that is no other run; so for
    ``teacher.path`` with the teacher's (the teacher fingerprint)."""
    if key in ("data.source", "teacher.path"):
        return True
    if key != "data.sources" or not (isinstance(old, list) and isinstance(new, list)) or len(old) != len(new):
        return False

    def same_but_where(a: Any, b: Any) -> bool:  # an unnamed source is named after its last path part
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return False
        named = a.get("name") or Path(str(a.get("source"))).name == Path(str(b.get("source"))).name
        rest_a, rest_b = ({k: v for k, v in x.items() if k != "source"} for x in (a, b))
        return bool(named) and rest_a == rest_b

    return all(same_but_where(a, b) for a, b in zip(old, new))


def _short(value: Any) -> str:
    return shortened(json.dumps(value, default=str) if value != ABSENT else ABSENT)


def describe(changes: List[Tuple[str, Any, Any]]) -> List[str]:
    return [f"resume: {k} {_short(a)} -> {_short(b)}" for k, a, b in changes]


def optimizer_settings(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """The hyperparameters of each param group as the config built them (before a load)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def check_schedule_length(lr_scheduler: Any, max_steps: int) -> None:
    """A schedule that keeps its length in its state (torch's OneCycleLR: ``total_steps``)
    comes back from the checkpoint with the old one; trained past it, torch raised "Tried to
    step 5 times" at the first step beyond. Ours, and torchtune's, read the length from the
    config, so their rate follows a new ``max_steps``."""
    kept = getattr(lr_scheduler, "total_steps", None)
    if isinstance(kept, int) and not isinstance(kept, bool) and kept != max_steps:
        raise ResumeChangeError(
            f"resume: lr_scheduler ({type(lr_scheduler).__name__}) keeps its length in the checkpoint, "
            f"total_steps={kept}, and this resume trains to max_steps={max_steps}. Fix: max_steps={kept}, or a "
            "schedule whose length follows max_steps (warmup_cosine, warmup_stable_decay) for a run that changes it.")


def apply_settings(optimizer: torch.optim.Optimizer, settings: List[Dict[str, Any]], lr_scheduler: Any) -> None:
    """After a resume loaded the old hyperparameters: put the config's back, and move the
    schedule onto the new base rates at the step it reached (its state keeps the step)."""
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
    if hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups if "initial_lr" in group] \
            or lr_scheduler.base_lrs
    rates = None
    if hasattr(lr_scheduler, "lr_lambdas"):  # LambdaLR (ours, torchtune's): the rate is a closed form of the step
        rates = [base * factor(lr_scheduler.last_epoch)
                 for base, factor in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    elif hasattr(lr_scheduler, "_get_closed_form_lr"):  # torch's StepLR, CosineAnnealingLR, LinearLR, ...
        # they step from the group's current rate; their closed form gives the new base's rate at this step
        rates = list(lr_scheduler._get_closed_form_lr())
    for group, rate in zip(optimizer.param_groups, rates or []):
        group["lr"] = rate
    if hasattr(lr_scheduler, "_last_lr"):  # what the log reports: the rate the next step uses
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
