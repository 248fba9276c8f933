"""Frozen teachers and the loaders that make them.

Every loader returns a :class:`Teacher`: a frozen model (eval mode, no gradients) that
exposes the hidden states of any layer, its width, depth and vocabulary size, and the
path of its tokenizer when it has one. New loaders (Hugging Face, GGUF, ...) register
under the kind ``teacher_loader`` and return the same object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from components.models import ModelArgs, forward_with_hidden, llama
from components.registry import register

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TeacherError(ValueError):
    """The teacher cannot be loaded; raised before training starts."""


def parse_dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} is not a dtype. Fix: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


class Teacher(nn.Module):
    """A frozen model that supplies hidden states. It never trains, whatever ``.train()`` says."""

    def __init__(self, model: nn.Module, tokenizer_path: Optional[Path] = None, source: str = ""):
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.eval()
        self.tokenizer_path = tokenizer_path
        self.source = source

    @property
    def width(self) -> int:
        return self.model.tok_embeddings.embedding_dim

    @property
    def depth(self) -> int:
        return len(self.model.layers)

    @property
    def vocab_size(self) -> int:
        return self.model.tok_embeddings.num_embeddings

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, layers: Iterable[int]) -> Dict[int, torch.Tensor]:
        hidden, _ = forward_with_hidden(self.model, tokens, layers, logits=False)
        return hidden


EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_TOKENIZER = "tokenizer.json"


@register("teacher_loader", "letrecipes")
def load_letrecipes_checkpoint(
    path: Union[str, Path],
    dtype: str = "bfloat16",
    device: Union[str, torch.device] = "cpu",
) -> Teacher:
    """Load a model exported by ``letrecipes/pretrain`` (its ``<output_dir>/final`` folder)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    fix = (
        "Fix: train one with `tune run letrecipes/pretrain --config pretrain_tiny` (it writes "
        "outputs/pretrain_tiny/final), or set teacher.path to a folder exported by letrecipes/pretrain."
    )
    if not path.is_dir():
        raise TeacherError(f"teacher.path: no teacher checkpoint folder at {str(path)!r}. {fix}")
    weights, config = path / EXPORT_WEIGHTS, path / EXPORT_CONFIG
    for needed in (weights, config):
        if not needed.is_file():
            raise TeacherError(f"teacher.path: {str(path)!r} has no {needed.name}. {fix}")
    try:
        meta = json.loads(config.read_text())
        args = ModelArgs.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise TeacherError(f"teacher.path: {str(config)!r} is not a letrecipes model config ({err}). {fix}") from err
    with torch.device("meta"):
        model = llama(args)
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise TeacherError(f"teacher.path: cannot read {str(weights)!r} ({err}). {fix}") from err
    torch_dtype = parse_dtype(dtype, "teacher.dtype")
    state = {k: v.to(device=device, dtype=torch_dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise TeacherError(f"teacher.path: weights in {str(weights)!r} do not match its config: {err}") from err
    # RoPE caches are non-persistent buffers that `assign` left on meta: rebuild them in
    # float32 (rope_init allocates on the default device), then move them.
    for rope in {id(layer.attn.pos_embeddings): layer.attn.pos_embeddings for layer in model.layers}.values():
        rope.rope_init()
    model.to(device=device)
    tokenizer = path / EXPORT_TOKENIZER
    return Teacher(model, tokenizer_path=tokenizer if tokenizer.is_file() else None, source=str(path))
