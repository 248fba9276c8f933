"""Teachers of the Hugging Face families letrecipes does not build itself (Gemma, Phi-3,
OLMo, StableLM, ...), run by ``transformers``' own implementation.

The ``huggingface`` format maps the families it knows onto this project's decoder, which
is what makes ``teacher.placement: sharded``, the export and ``init_from`` possible. Any
other causal language model in a Hugging Face folder is read here instead, with
``AutoModelForCausalLM``: transformers is the reference implementation of those models,
so writing our own copy of each would only add ways to be wrong. What LET needs of a
teacher is its hidden states, which transformers returns in the convention this project
uses (``hidden_states[i]`` is the input of block ``i``; the last one comes after the final
norm), and its logits.

What such a teacher cannot do: be sharded (``teacher.placement: sharded`` builds the
project's decoder), be exported or start a student (``init_from``): each is one error.
transformers is an optional dependency here (the ``eval`` extra brings it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch import nn

from letrecipes.components.models import ModelArgs
from letrecipes.components.teachers import Teacher, TeacherError, folder_tokenizer, parse_dtype

FAMILY = "transformers"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# each field of ModelArgs under the names Hugging Face configs give it, most common first
CONFIG_NAMES = {
    "embed_dim": ("hidden_size", "n_embd", "d_model", "model_dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}


def causal_architecture(config: dict) -> Optional[str]:
    """The causal language model class a config.json names, if any (``GemmaForCausalLM``)."""
    return next((name for name in config.get("architectures") or [] if isinstance(name, str)
                 and name.endswith(CAUSAL_SUFFIXES)), None)


def _first(config: dict, names: Iterable[str]) -> Any:
    return next((config[n] for n in names if isinstance(config.get(n), int) and config[n] > 0), None)


def describe(config: dict, config_file: str) -> ModelArgs:
    """The shape the dry run and the recipe's checks read, from config.json alone. Its MLP
    is counted as a gated one (three matrices), as in most of these families."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = {field: _first(text, names) for field, names in CONFIG_NAMES.items()}
    missing = [CONFIG_NAMES[field][0] for field, value in found.items() if value is None]
    if missing:
        raise TeacherError(f"{config_file}: {causal_architecture(config)} without {', '.join(missing)} (a positive "
                           "integer each). Fix: use the config.json released with these weights.")
    heads = found["num_heads"]
    kv_heads = _first(text, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")) or heads
    inner = _first(text, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")) or 4 * found["embed_dim"]
    context = _first(text, ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"))
    return ModelArgs(vocab_size=found["vocab_size"], num_layers=found["num_layers"], num_heads=heads,
                     num_kv_heads=kv_heads, embed_dim=found["embed_dim"], intermediate_dim=inner,
                     max_seq_len=context or 0, tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
                     family=FAMILY, head_dim=_first(text, ("head_dim",)))


def _transformers(path: Path):
    try:
        import transformers
    except ImportError:
        raise TeacherError(f"{path}: a Hugging Face model of a family letrecipes does not build itself is run by "
                           "transformers, which is not installed here. Fix: pip install transformers (or "
                           "letrecipes[eval]), or a teacher of the Llama, Mistral, Qwen2/3, OPT, GPT-NeoX or GPT-2 "
                           "families.") from None
    return transformers


def load(path: Path, config: dict, dtype: str, device: Union[str, torch.device]) -> "TransformersTeacher":
    torch_dtype = parse_dtype(dtype, "teacher.dtype")
    architecture = causal_architecture(config)
    if config.get("auto_map"):
        raise TeacherError(f"{path / 'config.json'}: {architecture} comes with code of its own (auto_map), and "
                           "letrecipes never runs a checkpoint's own code. Fix: a release of the model that "
                           "transformers implements, or a teacher of another family.")
    transformers = _transformers(path)
    if not hasattr(transformers, architecture):
        raise TeacherError(f"{path / 'config.json'}: {architecture} is not a model class of transformers "
                           f"{transformers.__version__}. Fix: a transformers version that has it (pip install -U "
                           "transformers), or a teacher of another family.")
    from letrecipes.components.evaluation import check_model_config, check_model_weights

    # config.json against the weights' headers, the model built on the meta device, before transformers allocates
    # it: a config of other sizes than its weights (a vocabulary of 10**9) took all 24 GB of memory and more
    check_model_config(path, key="teacher.path")
    check_model_weights(path, key="teacher.path")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TeacherError(f"{path}: transformers could not load {architecture}: {first}. Fix: a complete Hugging "
                           "Face folder (config.json and its weights, as released).") from err
    model.to(device)
    args = describe(config, str(path / "config.json"))
    model.model_args = args  # the memory estimate reads the teacher's shape from here
    return TransformersTeacher(model, args, tokenizer_path=folder_tokenizer(path),
                               source=f"{path} ({architecture}, run by transformers)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """A transformers model's list of blocks, wherever its family keeps it."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks", "block"):
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise TeacherError(f"{type(model).__name__}: its list of blocks was not found (looked for layers, h, blocks). "
                       "Fix: teacher.compile=false.")


class TransformersTeacher(Teacher):
    """A frozen transformers model with the interface the recipe reads of a teacher."""

    def __init__(self, model: nn.Module, args: ModelArgs, tokenizer_path: Optional[Path] = None, source: str = ""):
        super().__init__(model, tokenizer_path=tokenizer_path, source=source)
        self.args = args

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def depth(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def context(self) -> Optional[int]:
        return self.args.max_seq_len or None

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, layers: Iterable[int]) -> Dict[int, torch.Tensor]:
        # the base model alone: the output head, a vocabulary-wide matmul, is not needed for hidden states
        out = self.model.base_model(input_ids=tokens, output_hidden_states=True, use_cache=False)
        return {i: out.hidden_states[i] for i in layers}

