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

import copy
import dataclasses
import functools
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn

from letrecipes.components.files import file_identity, shortened
from letrecipes.components.models import MAX_BLOCKS, ModelArgs
from letrecipes.components.run_info import outdated
from letrecipes.components.teachers import Teacher, TeacherError, folder_tokenizer, parse_dtype

FAMILY = "transformers"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# a vision-language release (Gemma 3 from 4B up, Mistral Small 3.1, Qwen2.5-VL, LLaVA) names this class; its
# language model, read out of it, is the teacher
MULTIMODAL_SUFFIX = "ForConditionalGeneration"
# each field of ModelArgs under the names Hugging Face configs give it, most common first
CONFIG_NAMES = {
    "embed_dim": ("hidden_size", "n_embd", "d_model", "model_dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}


def causal_architecture(config: dict) -> Optional[str]:
    """The causal language model class a config.json names, if any (``GemmaForCausalLM``); for
    a config without ``architectures`` (older releases), the one transformers has for its
    ``model_type``."""
    names = config.get("architectures")
    if not names and isinstance(config.get("model_type"), str):
        try:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        except ImportError:
            return None
        names = [name for name in [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config["model_type"])]
                 if isinstance(name, str) and name.endswith("ForCausalLM")]  # not BERT's LMHeadModel
    return next((name for name in names or [] if isinstance(name, str) and name.endswith(CAUSAL_SUFFIXES)), None)


def multimodal_architecture(config: dict) -> Optional[str]:
    """The vision-language class a config.json names (``Gemma3ForConditionalGeneration``), if
    any: one whose config holds a ``text_config``, the language model a teacher is read from
    (an encoder-decoder's ``T5ForConditionalGeneration`` has none)."""
    names = config.get("architectures")
    if not isinstance(config.get("text_config"), dict) or not isinstance(names, list):
        return None
    return next((name for name in names if isinstance(name, str) and name.endswith(MULTIMODAL_SUFFIX)), None)


def vision_language_class(config: dict) -> Optional[str]:
    """The class a teacher of this config.json is loaded by when it is a vision-language model
    (no causal language model class named): transformers' auto classes map some, not all."""
    return None if causal_architecture(config) else multimodal_architecture(config)


def teacher_architecture(config: dict) -> Optional[str]:
    """The class transformers builds for a teacher of this config.json: a causal language
    model's, else a vision-language model's (whose language model is then the teacher)."""
    return causal_architecture(config) or multimodal_architecture(config)


def runs(architecture: Optional[str]) -> bool:
    """Whether the installed transformers has this class (False without transformers)."""
    if not architecture:
        return False
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, architecture)


def _first(config: dict, names: Iterable[str]) -> Any:
    return next((config[n] for n in names if isinstance(config.get(n), int) and config[n] > 0), None)


def describe(config: dict, config_file: str, what: Optional[str] = None) -> ModelArgs:
    """The shape the dry run and the recipe's checks read, from config.json alone (or the
    config transformers reads from a GGUF file's metadata: ``what`` names it). Its MLP is
    counted as a gated one (three matrices), as in most of these families."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = {field: _first(text, names) for field, names in CONFIG_NAMES.items()}
    if found["num_heads"] is None and attention_free(text):
        found["num_heads"] = 1  # the cost model's attention terms then stand for its token mixing (docs/teachers.md)
    missing = [CONFIG_NAMES[field][0] for field, value in found.items() if value is None]
    if missing:
        raise TeacherError(f"{config_file}: {what or teacher_architecture(config)} without {', '.join(missing)} (a "
                           "positive integer each). Fix: use the config.json released with these weights.")
    if found["num_layers"] > MAX_BLOCKS:  # transformers would build each, even on the meta device, before any check
        raise TeacherError(f"{config_file}: {found['num_layers']:,} blocks ({CONFIG_NAMES['num_layers'][0]}) is past "
                           f"the {MAX_BLOCKS:,} a teacher is read with (Llama 3.1 405B has 126). Fix: use the "
                           "config.json released with these weights.")
    heads = found["num_heads"]
    kv_heads = _first(text, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")) or heads
    inner = _first(text, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")) or 4 * found["embed_dim"]
    active = _first(text, ("num_experts_per_tok", "num_selected_experts", "moe_topk", "top_k"))
    if active:  # a mixture of experts: the MLP a token runs is its experts' (and any shared one's), for the FLOPs
        expert = _first(text, ("moe_intermediate_size", "expert_intermediate_size")) or inner
        shared = _first(text, ("shared_expert_intermediate_size",)) or expert * (_first(text, ("n_shared_experts",))
                                                                                   or 0)
        sparse = moe_blocks(text, found["num_layers"])
        # the blocks' mean: dense ones (DeepSeek's first k, Qwen2-MoE's mlp_only_layers) run intermediate_size
        inner = round((sparse * (active * expert + shared) + (found["num_layers"] - sparse) * inner)
                      / found["num_layers"])
    context = _first(text, ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"))
    return ModelArgs(vocab_size=found["vocab_size"], num_layers=found["num_layers"], num_heads=heads,
                     num_kv_heads=kv_heads, embed_dim=found["embed_dim"], intermediate_dim=inner,
                     max_seq_len=context or 0, tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
                     family=FAMILY, head_dim=_first(text, ("head_dim",)))


def moe_blocks(config: dict, depth: int) -> int:
    """How many of a mixture of experts' blocks route to experts, by the rules of the families
    that mix in dense ones: Qwen2/3-MoE's ``mlp_only_layers`` and ``decoder_sparse_step`` (block
    i is sparse when (i + 1) is a multiple of it), DeepSeek's ``first_k_dense_replace`` and
    ``moe_layer_freq`` (i a multiple of it). A config stating none of them: every block."""
    dense = config.get("mlp_only_layers")
    dense = {i for i in dense if isinstance(i, int)} if isinstance(dense, list) else set()
    first = _first(config, ("first_k_dense_replace",)) or 0
    step, freq = _first(config, ("decoder_sparse_step",)) or 1, _first(config, ("moe_layer_freq",)) or 1
    return sum(1 for i in range(depth) if i not in dense and i >= first and (i + 1) % step == 0 and i % freq == 0)


# config keys of the attention-free families transformers implements (Mamba 1/2, RWKV, xLSTM):
# a state-space model's state size, RWKV's attention_hidden_size (its time mixing, not attention heads)
ATTENTION_FREE_KEYS = ("state_size", "ssm_state_size", "d_state", "attention_hidden_size", "num_blocks")


def attention_free(config: dict) -> bool:
    return any(key in config for key in ATTENTION_FREE_KEYS)


# The oldest transformers these loaders were run against (tests/test_transformers_teachers.py
# passes whole with 5.17.0 to 5.25.0; constraints.txt pins 5.23.0): 5.0.0, 5.12.1 and 5.16.1
# pass its folder tests and fail the GGUF ones (no GgufConfig); 4.57.6 failed 19 tests in
# assorted ways: tracebacks, "its list of blocks was not found. Fix: teacher.compile=false", a
# Qwen2.5-VL release "not a causal language model" (each family's modules and config fields
# as 5.x has them).
TRANSFORMERS_MIN, TRANSFORMERS_GGUF_MIN = (5, 0), (5, 17)


def _transformers(path: Path, gguf: bool = False):
    try:
        import transformers
    except ImportError:
        raise TeacherError(f"{path}: a Hugging Face model of a family letrecipes does not build itself is run by "
                           "transformers, which is not installed here. Fix: pip install transformers (or "
                           "letrecipes[eval]), or a teacher of the Llama, Mistral, Qwen2/3, OPT, GPT-NeoX or GPT-2 "
                           "families.") from None
    problem = outdated("transformers", TRANSFORMERS_GGUF_MIN if gguf else TRANSFORMERS_MIN, transformers.__version__)
    if problem:
        raise TeacherError(f"{path}: a {'GGUF file' if gguf else 'teacher'} run by transformers {problem}, or a "
                           "teacher of the Llama, Mistral, Qwen2/3, OPT, GPT-NeoX or GPT-2 families.")
    return transformers


def load(path: Path, config: dict, dtype: str, device: Union[str, torch.device],
         because: Optional[str] = None, architecture: Optional[str] = None) -> "TransformersTeacher":
    """``because``: for a family letrecipes builds, the feature its decoder lacks (the log says
    it); ``architecture``: its class, where config.json names it by model_type only."""
    torch_dtype = parse_dtype(dtype, "teacher.dtype")
    architecture = teacher_architecture(config) or architecture
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
    multimodal = vision_language_class(config) is not None
    model_class = getattr(transformers, architecture) if multimodal else transformers.AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TeacherError(f"{path}: transformers could not load {architecture}: {first}. Fix: a complete Hugging "
                           "Face folder (config.json and its weights, as released).") from err
    source = f"{path} ({architecture}, run by transformers" + (f": {because} is not built here)" if because else ")")
    if multimodal:
        dropped = drop_vision(model, str(path / "config.json"), architecture)
        source = f"{path} ({architecture}'s language model, run by transformers; {dropped:,} parameters of its " \
                 "vision encoder freed)"
    return _teacher(model, describe(model.config.to_dict(), str(path / "config.json")), device, folder_tokenizer(path),
                    source)


def drop_vision(model: nn.Module, config_file: str, architecture: str) -> int:
    """Frees what a vision-language model holds besides its language model (the vision
    encoder, its projector), and returns how many parameters that was. A teacher reads text:
    the model's forward given ``input_ids`` alone runs the language model alone, and its
    logits keep whatever the family does after the head (Gemma's soft-capping) because the
    model's own forward still computes them. Up to 0.7B parameters of a 3-4B release would
    otherwise sit in every rank's memory, uncounted by the dry run (which reads text_config)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    holder = getattr(model, "model", None)
    if not isinstance(decoder, nn.Module) or not isinstance(holder, nn.Module) or not any(
            child is decoder for child in holder.children()):
        raise TeacherError(f"{config_file}: the language model of {architecture} was not found beside its vision "
                           "encoder. Fix: the text-only release of the model, or register a teacher loader for this "
                           "one (docs/extending.md).")
    dropped = 0
    for name, child in list(holder.named_children()):
        if child is not decoder:
            dropped += sum(p.numel() for p in child.parameters())
            setattr(holder, name, VisionDropped(name))
    return dropped


class VisionDropped(nn.Module):
    """Where a teacher's vision encoder was: text never reaches it; an image would."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise TeacherError(f"the teacher's {self.name} was freed at load: a teacher reads text only.")


def _teacher(model: nn.Module, args: ModelArgs, device: Union[str, torch.device], tokenizer_path: Optional[Path],
             source: str) -> "TransformersTeacher":
    args = dataclasses.replace(args, stated_params=sum(p.numel() for p in model.parameters()))
    model.to(device)
    model.model_args = args  # the memory estimate reads the teacher's shape from here
    teacher = TransformersTeacher(model, args, tokenizer_path=tokenizer_path, source=source)
    # LET reads hidden_states[i] as the input of block i, which holds when the model returns one state per block and
    # the embeddings'; a family that skips some blocks on text (Llama 3.2 Vision's cross-attention blocks) returns
    # fewer, and block i would silently be another block. Two tokens through the model say which it is.
    try:
        with torch.no_grad():
            states = model.base_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                                      output_hidden_states=True, use_cache=False).hidden_states
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:  # a value transformers took
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TeacherError(f"{source}: the model does not run on two tokens ({type(err).__name__}: {first[:200]}): a "
                           "value of its config.json it was built with (a dropout probability of NaN) or damaged "
                           "weights. Fix: the config.json and weights as released.") from err
    if states is None or len(states) != teacher.depth + 1:
        raise TeacherError(f"{source}: the model returns {len(states or ())} hidden states for its {teacher.depth} "
                           "blocks on text, not one per block and the embeddings' (blocks it skips without an image "
                           "or of another kind), so a teacher layer would not name its block. Fix: a teacher of "
                           "another family, or its text-only release.")
    broken = next((i for i, state in enumerate(states) if not torch.isfinite(state).all()), None)
    if broken is not None:  # a config value transformers takes and computes NaN from (a rope_theta of NaN)
        raise TeacherError(f"{source}: its hidden state {broken} is not finite on two tokens (NaN or inf): a value of "
                           "its config.json the model computes with, or its weights, are damaged. Fix: the "
                           "config.json and weights as released.")
    teacher.layer_widths = [state.shape[-1] for state in states]  # OPT-350m's last is projected: 512 against 1,024
    return teacher


# ------------------------------------------------------------------ GGUF files
# transformers reads GGUF files of more families than gguf_teacher builds (its GGUF_CONFIG_MAPPING,
# by the names llama.cpp gives them). Not teachers among them: metadata sections, encoder-decoders,
# and Mamba, which has no attention heads to describe.
GGUF_NOT_TEACHERS = {"general", "tokenizer", "t5", "umt5", "mamba"}
# transformers' key -> llama.cpp's name of the architecture, where the two differ
GGUF_NAMES = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2"}
GGUF_FIX = "Fix: re-download the file, or use the model's Hugging Face folder with teacher._component_=huggingface."


def gguf_architectures() -> Tuple[str, ...]:
    """The GGUF architectures (llama.cpp's names) the installed transformers reads; none without it."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return ()
    return tuple(sorted(GGUF_NAMES.get(name, name) for name in set(GGUF_CONFIG_MAPPING) - GGUF_NOT_TEACHERS))


def _gguf_config(path: Path, reader, arch: str):
    """The transformers config of the GGUF file at ``path``, read from its metadata by transformers."""
    if getattr(reader, "first", None) is not None:  # gguf_teacher's SplitGGUF: transformers reads one file
        raise TeacherError(f"{path}: a {arch} GGUF model split in parts, which transformers (that runs {arch} "
                           f"models here) reads as one file only. Fix: merge the parts: llama-gguf-split --merge "
                           f"{path} <name>.gguf, and point teacher.path at it.")
    _transformers(path, gguf=True)
    try:  # a copy: transformers sets attributes on the configs it builds models from
        config = copy.deepcopy(_read_gguf_config(str(path), file_identity(path)))
    except Exception as err:  # transformers' GGUF reader raises what its parsing meets (ValueError, KeyError, ...)
        raise TeacherError(f"{path}: transformers could not read its {arch} metadata ({type(err).__name__}: "
                           f"{shortened(str(err), 200)}). {GGUF_FIX}") from err
    for key, field in GGUF_KEYS_LEFT_OUT.items():
        value = reader.fields.get(f"{arch}.{key}")
        if value is not None and hasattr(config, field):
            try:
                setattr(config, field, int(value.contents()))
            except (TypeError, ValueError, IndexError, UnicodeDecodeError) as err:
                raise TeacherError(f"{path}: GGUF metadata key '{arch}.{key}' does not read as a count "
                                   f"({type(err).__name__}). {GGUF_FIX}") from err
    return config


# Metadata llama.cpp writes for a mixture of experts that transformers' GGUF reader (5.x) does
# not map, leaving its config class's default: the expert's width (768 in Qwen3MoeConfig, right
# for Qwen3-30B-A3B only; Qwen3-235B-A22B's is 1536) and the shared expert's (Qwen2-57B-A14B).
# Such a file was "the metadata and the weights are of two models"; read here, the model
# transformers builds (given this config) is the file's.
GGUF_KEYS_LEFT_OUT = {"expert_feed_forward_length": "moe_intermediate_size",
                      "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


@functools.lru_cache(maxsize=4)
def _read_gguf_config(path: str, identity: str):
    """transformers parses every metadata value of the file, its vocabulary included (seconds
    for a large one), and the recipe asks for the shape, the check and the load. Keyed by the
    file's identity (:func:`files.file_identity`): a file rewritten at its path is read again."""
    import transformers

    return transformers.AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                   local_files_only=True)


def describe_gguf(path: Path, reader, arch: str) -> ModelArgs:
    """The shape of a GGUF file of a family transformers runs, from its metadata alone."""
    config = _gguf_config(path, reader, arch)
    args = describe(config.to_dict(), str(path), what=f"the {arch} model its metadata describes")
    return dataclasses.replace(args, stated_params=counted_params(config))


def counted_params(config, multimodal: Optional[str] = None) -> Optional[int]:
    """The parameters of the model a transformers config describes, counted on the meta device
    (no memory; 0.5 s for OLMoE-1B-7B): the dry run's shape describes one dense block, which
    for a mixture of experts is one expert's MLP (OLMoE-1B-7B counted 0.58B of its 6.92B,
    Mixtral-8x7B 7.24B of 46.70B). A vision-language model's language model only. None where
    transformers does not build it (the load then says why)."""
    try:
        import transformers

        with torch.device("meta"):
            model = getattr(transformers, multimodal)(config) if multimodal else \
                transformers.AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - transformers raises many types here; the load names the fault
        return None
    decoder = model.get_decoder() if multimodal else None
    vision = [child for child in getattr(model, "model", model).children() if child is not decoder] \
        if multimodal else []
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for child in vision for p in child.parameters())


def describe_folder(path: Path, config: dict) -> ModelArgs:
    """The shape of a Hugging Face folder of a model transformers runs, its parameters counted.

    Read as transformers reads config.json, every value it leaves out filled with its class's
    default: Gemma 3 4B's names its text model's width and depth and leaves out its heads and
    vocabulary (8 and 262,208, Gemma3TextConfig's defaults). A config that does not state its
    width and depth itself is not filled in (its class's defaults would describe some other
    model, 7B wide), nor one transformers does not read: as written, and the description
    names what it lacks."""
    _transformers(path)  # absent or too old: said here, before the corpus is prepared (not at the load)
    try:
        from transformers import AutoConfig

        parsed = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - transformers raises many types here; check_model_config names the fault
        parsed = None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    states_shape = all(_first(text, CONFIG_NAMES[field]) is not None for field in ("embed_dim", "num_layers"))
    args = describe(parsed.to_dict() if parsed is not None and states_shape else config, str(path / "config.json"))
    if parsed is None:
        return args
    return dataclasses.replace(args, stated_params=counted_params(parsed, vision_language_class(config)))


def check_gguf_tensors(path: Path, reader, arch: str) -> None:
    """Every tensor of the file against the model its metadata describes, built on the meta
    device (no memory): each one transformers reads by name, of the size the model gives it.
    Otherwise transformers builds the model first (a vocabulary of 10**9 in the metadata takes
    all the memory there is) and skips the tensors it has no name for (Phi-3's long-context
    RoPE factors: it would run another model than the file's) with a log line."""
    config = _gguf_config(path, reader, arch)
    transformers = _transformers(path, gguf=True)
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        names = get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict()))
    except Exception as err:  # a config transformers' own code refuses (heads that do not divide the width, ...)
        raise TeacherError(f"{path}: transformers cannot build the {arch} model its metadata describes "
                           f"({type(err).__name__}: {shortened(str(err), 200)}). {GGUF_FIX}") from err
    # the experts of a mixture (qwen2moe, qwen3moe) are mapped without their .weight, as the reader looks them up
    names = {t.name: names.get(t.name, names.get(t.name.removesuffix(".weight"))) for t in reader.tensors}
    unread = [name for name, hf_name in names.items() if hf_name is None]
    if unread:
        raise TeacherError(f"{path}: transformers' GGUF reader has no place in a {arch} model for "
                           f"{len(unread)} of its tensors ({', '.join(unread[:3])}{' ...' if len(unread) > 3 else ''}):"
                           " the model it would run is not the one in the file. Fix: use the model's Hugging Face "
                           "folder with teacher._component_=huggingface.")
    read = {names[t.name] for t in reader.tensors}
    # a fused tensor (MoE experts) maps to the module its parameters are in; a tied head is the embedding
    missing = [name for name, _ in model.named_parameters() if name not in read and
               not any(name.startswith(module + ".") for module in read)]
    if missing:
        raise TeacherError(f"{path}: {len(missing)} weight(s) of the {arch} model its metadata describes are not in "
                           f"the file ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): transformers "
                           f"would leave them random (a damaged or cut file). {GGUF_FIX}")
    params, sources = model.state_dict(), Counter(names[t.name] for t in reader.tensors)
    for tensor in reader.tensors:
        expected = params.get(names[tensor.name])  # transformers fuses some of them (MoE gate and up): not compared
        if expected is not None and sources[names[tensor.name]] == 1 and expected.numel() != int(tensor.n_elements):
            raise TeacherError(f"{path}: its tensor {tensor.name} holds {int(tensor.n_elements):,} values, and the "
                               f"{arch} model its metadata describes gives it {expected.numel():,} "
                               f"({names[tensor.name]}, {tuple(expected.shape)}): the metadata and the weights are "
                               f"of two models, or the file is damaged. {GGUF_FIX}")


def load_gguf(path: Path, reader, arch: str, dtype: str, device: Union[str, torch.device],
              tokenizer_path: Optional[Path]) -> "TransformersTeacher":
    """A GGUF file of a family transformers runs (dequantized by transformers' GGUF reader)."""
    torch_dtype = parse_dtype(dtype, "teacher.dtype")
    check_gguf_tensors(path, reader, arch)
    transformers = _transformers(path, gguf=True)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, config=_gguf_config(path, reader, arch), dtype=torch_dtype,
            local_files_only=True, output_loading_info=True,
            # every weight dequantized to teacher.dtype, as the GGUF files built here are: the same model on
            # every machine (transformers keeps quantized blocks where it finds a kernel for them)
            quantization_config=transformers.GgufConfig(dequantize=True))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TeacherError(f"{path}: transformers could not load this {arch} GGUF file: {first}. {GGUF_FIX}") from err
    missing = sorted(set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                              for k in info.get("mismatched_keys") or ()})
    if missing:  # transformers would run them as it initialised them: random
        raise TeacherError(f"{path}: the {arch} model transformers builds from it lacks {len(missing)} of its "
                           f"weights in the file ({', '.join(missing[:3])}): they would be random. Fix: use the "
                           "model's Hugging Face folder with teacher._component_=huggingface.")
    return _teacher(model, describe(model.config.to_dict(), str(path)), device, tokenizer_path,
                    f"{path} (GGUF {arch}, run by transformers)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """A transformers model's list of blocks, wherever its family keeps it (a vision-language
    model: its language model's)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):  # a family of no decoder by transformers' rule
        decoder = None
    base = decoder if isinstance(decoder, nn.Module) else getattr(model, "base_model", model)
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
        return self.without_bos(self.model(input_ids=self.with_bos(tokens), use_cache=False).logits)

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, layers: Iterable[int]) -> Dict[int, torch.Tensor]:
        # the base model alone: the output head, a vocabulary-wide matmul, is not needed for hidden states
        out = self.model.base_model(input_ids=self.with_bos(tokens), output_hidden_states=True, use_cache=False)
        return {i: self.without_bos(out.hidden_states[i]) for i in layers}

