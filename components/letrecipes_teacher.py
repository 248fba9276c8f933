"""Teacher format ``letrecipes``: a folder this project's recipes exported (``<output_dir>/final``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from letrecipes.components.export import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS
from letrecipes.components.files import stand_in
from letrecipes.components.models import ModelArgs
from letrecipes.components.teachers import (
    Teacher, TeacherError, TeacherFormat, build_frozen, folder_tokenizer, read_json, register_format, resolve_path,
)

FIX = ("Fix: train one with `tune run letrecipes/pretrain --config pretrain_tiny` (it writes "
       "outputs/pretrain_tiny/final), or set teacher.path to a folder exported by letrecipes/pretrain.")


@register_format("letrecipes")
class LetrecipesFormat(TeacherFormat):
    looks_like = "a folder exported by letrecipes/pretrain (<output_dir>/final)"

    @classmethod
    def detect(cls, path: Path) -> bool:
        meta = read_json(path)
        # exports say so ({"format": "letrecipes", "model": {...}}); Hugging Face configs have no "model" key
        return meta is not None and (meta.get("format") == EXPORT_FORMAT or "model" in meta)

    def bos(self, path: Path) -> Optional[Tuple[int, str]]:
        return None  # trained here, on windows without a BOS, whatever its tokenizer does

    def describe(self, path: Path) -> ModelArgs:
        config = path / EXPORT_CONFIG
        if not config.is_file():
            raise TeacherError(f"teacher.path: {str(path)!r} has no {EXPORT_CONFIG}. {FIX}")
        try:
            return ModelArgs.from_dict(json.loads(config.read_text())["model"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise TeacherError(f"teacher.path: {str(config)!r} is not a letrecipes model config ({err}). {FIX}") from err

    def tokenizer(self, path: Path) -> Optional[Path]:
        return folder_tokenizer(path)

    def load(self, path: Path, dtype: str = "bfloat16", device: Union[str, torch.device] = "cpu") -> Teacher:
        from safetensors.torch import load_file

        path = resolve_path(path)
        if not path.is_dir():
            raise TeacherError(f"teacher.path: no teacher checkpoint folder at {str(path)!r}. {FIX}")
        args = self.describe(path)
        weights = path / EXPORT_WEIGHTS
        if not weights.is_file():
            raise TeacherError(f"teacher.path: {str(path)!r} has no {EXPORT_WEIGHTS}. {FIX}")

        def load_state(expected, cast):
            try:
                state = load_file(str(weights))
            except Exception as err:  # safetensors raises its own error types
                instead = stand_in(weights, "a safetensors file")
                raise TeacherError(f"teacher.path: {instead}" if instead else
                                   f"teacher.path: cannot read {str(weights)!r} ({err}). {FIX}") from err
            return {k: cast(v) for k, v in state.items()}

        return Teacher(build_frozen(args, load_state, dtype, device), tokenizer_path=folder_tokenizer(path),
                       source=str(path))
