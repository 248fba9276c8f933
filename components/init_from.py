"""``init_from``: start a new run from a finished model's weights (continued pretraining).

``resume=true`` continues the *same* run (optimizer, schedule, data position, step).
``init_from=<path>`` starts a *new* run whose student begins with another model's weights,
with a fresh optimizer, schedule and data order from step 0. The path is read by the
teacher loaders (``components/teachers.py``), so any format they read works: a letrecipes
export, a Hugging Face folder, a GGUF file; with the same checks (a damaged file, an
unsupported architecture are one error naming ``init_from``).

Before any weight is read, the checkpoint's shape (its ``config.json`` or GGUF metadata)
is compared with the run's ``model`` section, and its tokenizer with ``tokenizer.path``:
a mismatch is one error that lists the differing keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, List, Optional

from torch import nn

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.models import ModelArgs
from letrecipes.components.parallel import on_rank0, world_size
from letrecipes.components.teachers import existing_path, load_teacher, teacher_format
from letrecipes.components.tokenizer import Tokenizer

KEY = "init_from"
IGNORED_FIELDS = ("max_seq_len",)  # RoPE tables are rebuilt for the run's sequence length


class InitFromError(LetRecipesError):
    pass


def shape_differences(source: ModelArgs, student: ModelArgs) -> List[str]:
    """``model.num_layers: 4 in the checkpoint, 8 here`` for every field that differs."""
    out = []
    for field in dataclasses.fields(ModelArgs):
        if field.name in IGNORED_FIELDS:
            continue
        theirs, ours = getattr(source, field.name), getattr(student, field.name)
        if theirs != ours:
            out.append(f"model.{field.name}: {theirs} in the checkpoint, {ours} here")
    return out


def check_initial_weights(path: str, model_args: ModelArgs, tokenizer: Optional[Tokenizer]) -> Path:
    """The model at ``path``, resolved, once its family, shape and tokenizer are found to fit a
    student of ``model_args`` (read from its metadata: no weights). The recipe calls it before
    the corpus is prepared; :func:`load_initial_weights` then reads the weights."""
    resolved = existing_path(path, key=KEY)
    fmt = teacher_format({"_component_": "auto"}, key=KEY, path_key=KEY)
    with _format_errors(path):
        source = fmt.describe(resolved)
    if source.family != model_args.family:  # no model.* key can bridge two architectures
        what = "a model of a family transformers runs" if source.family == "transformers" else \
            f"a {source.family} model"
        raise InitFromError(f"{KEY}={path!r} is {what}; this run's student is a {model_args.family} "
                            "model, another architecture (its weights have other names and roles). Fix: init_from a "
                            f"{model_args.family} checkpoint (a letrecipes export, or a Hugging Face folder of that "
                            f"family); {what} can guide this run as its teacher (teacher.path).")
    differences = shape_differences(source, model_args)
    if differences:
        raise InitFromError(f"{KEY}={path!r} has another shape than this run's model: {'; '.join(differences)}. "
                            "Fix: set those model.* keys to the checkpoint's values, or init_from a checkpoint "
                            "of this shape.")
    their_tokenizer = fmt.tokenizer(resolved)
    if tokenizer is not None and their_tokenizer is not None and not Tokenizer(their_tokenizer).reads_like(tokenizer):
        raise InitFromError(f"{KEY}={path!r} was trained with another tokenizer ({their_tokenizer}) than "
                            f"tokenizer.path={str(tokenizer.path)!r}: its embeddings would mean other tokens. Fix: "
                            f"tokenizer.path={their_tokenizer}.")
    with _format_errors(path):  # last: what the metadata rules out is said first, whatever the weights
        fmt.check_weights(resolved)  # cut-short files found now, from their headers
    return resolved


@contextlib.contextmanager
def _format_errors(path: str):
    try:
        yield
    except LetRecipesError as err:
        message = str(err)  # the format's errors already begin with the key (path_key above)...
        if message.startswith("teacher.path: "):  # ...but for the weight files, which the teacher's loaders name
            message = f"{KEY}: " + message[len("teacher.path: "):]
        raise InitFromError(message if message.startswith(f"{KEY}:") else f"{KEY}={path!r}: {message}") from err


def load_initial_weights(resolved: Path, model: nn.Module, log: Callable[[str], None] = print) -> None:
    """Copy the weights of the model at ``resolved`` (what :func:`check_initial_weights`
    returned for it, before the corpus was prepared) into ``model``, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # Rank 0 alone reads the checkpoint; the others receive it tensor by tensor, each
    # keeping its shard (eight ranks on a node reading a 7B model in fp32 would hold 240 GB)
    broadcast = world_size() > 1
    state = on_rank0(lambda: load_teacher({"_component_": "auto", "path": str(resolved), "dtype": "fp32"},
                                          device="cpu", key=KEY).model.state_dict(), share=False) or {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True,
                                                                broadcast_from_rank0=broadcast))
    del state
    log(f"init_from: the student starts from the weights of {resolved}"
        + (f" (read by rank 0, sent to all {world_size()} ranks)" if broadcast else "")
        + "; optimizer, lr schedule and data order start fresh at step 0")
