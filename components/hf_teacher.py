"""Teacher format ``huggingface``: ``config.json`` + safetensors (one file, or shards with an
index; or, for older checkpoints, ``pytorch_model.bin``, loaded tensors-only) +
``tokenizer.json``, mapped onto :mod:`letrecipes.components.models` decoders.

Supported: the Llama family (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama: ``LlamaForCausalLM``),
Mistral (``MistralForCausalLM``: Llama's weights; a sliding window bounds the context),
Qwen2/2.5 (``Qwen2ForCausalLM``: biases on q, k, v), Qwen3 (``Qwen3ForCausalLM``: RMSNorm
on each head of q and k), OPT (``OPTForCausalLM``), GPT-NeoX (``GPTNeoXForCausalLM``:
Pythia; its fused q/k/v projection is split on load) and GPT-2 (``GPT2LMHeadModel``: gpt2,
distilgpt2; its Conv1D weights are transposed and its fused q/k/v split on load). The
architecture is read from ``config.json``; weights are checked against it tensor by tensor.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch

from letrecipes.components import transformers_teacher
from letrecipes.components.export import EXPORT_INFO
from letrecipes.components.files import json_cut_short, shortened, stand_in
from letrecipes.components.models import MAX_POSITIONS, ModelArgs
from letrecipes.components.teachers import (
    Teacher, TeacherError, TeacherFormat, build_frozen, folder_tokenizer, read_json, register_format, resolve_path,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Older checkpoints (OPT, early TinyLlama, many fine-tunes) ship PyTorch pickles only.
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "OPTForCausalLM": "opt", "GPTNeoXForCausalLM": "gpt_neox",
                 "GPT2LMHeadModel": "gpt2"}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "opt": "opt",
               "gpt_neox": "gpt_neox", "gpt2": "gpt2"}
# transformers' names for GELU -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh form)
GELU_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TeacherError(f"teacher.path: {str(path)!r} has no config.json, so it is not a Hugging Face model "
                           "folder. Fix: point teacher.path at the folder that holds config.json and the *.safetensors.")
    return read_json(path)


# The files and tensor names that quantizers add beside or instead of a layer's ``weight``:
# GPTQ/AWQ (qweight, qzeros, scales, g_idx), bitsandbytes (SCB, absmax, quant_map, weight.quant_state.*),
# FP8 and compressed-tensors (weight_scale, weight_scale_inv, input_scale, weight_packed, weight_shape).
QUANTIZER_CONFIG_FILES = ("quantize_config.json", "quant_config.json", "quantization_config.json")
QUANTIZED_TENSOR_PARTS = ("qweight", "qzeros", "scales", "g_idx", "SCB", "absmax", "quant_map", "weight_format",
                          "weight_scale", "weight_scale_inv", "input_scale", "weight_packed", "weight_shape",
                          "weight_zero_point")
FULL_PRECISION = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
QUANTIZED_FIX = ("Fix: use the full-precision model these weights were quantized from (bf16/fp16/fp32 "
                 "safetensors; the model card names it), or a GGUF file of the model (its tensors are dequantized "
                 "on load).")


def quantization(config: dict, folder: Optional[Path] = None) -> Optional[str]:
    """How a Hugging Face folder's weights are quantized ("gptq, 4 bits"), from config.json's
    ``quantization_config`` (transformers), ``compression_config`` (compressed-tensors) or a
    quantizer's own config file (AutoGPTQ's ``quantize_config.json``); None when they are not."""
    setting = config.get("quantization_config") or config.get("compression_config")
    if not setting and folder is not None:
        for name in QUANTIZER_CONFIG_FILES:
            if (folder / name).is_file():
                try:
                    setting = json.loads((folder / name).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    setting = None
                setting = {"quant_method": name, **(setting if isinstance(setting, dict) else {})}
                break
    if not setting:
        return None
    if not isinstance(setting, dict):
        return "quantized"
    if setting.get("quant_method") == "gguf":  # transformers dequantizes a GGUF on load: saved, it is full precision
        return None
    method = setting.get("quant_method") or setting.get("format") or ("bitsandbytes" if (
        setting.get("load_in_4bit") or setting.get("load_in_8bit")) else "quantized")
    bits = setting.get("bits") or setting.get("w_bit") or (4 if setting.get("load_in_4bit") else 8 if setting.get(
        "load_in_8bit") else None)
    return str(method) + (f", {bits} bits" if bits else "")


def _refuse_quantized(config: dict, where: str, folder: Optional[Path] = None) -> None:
    found = quantization(config, folder)
    if found:
        raise TeacherError(f"{where}: the weights are quantized ({found}), and this loader reads "
                           f"full-precision weights only. {QUANTIZED_FIX}")


def architecture(config: dict, config_file: str) -> str:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config["model_type"]]
    found = names or config.get("model_type")
    raise TeacherError(
        f"{config_file}: architecture {found!r} is not a causal language model: a teacher is one of "
        f"{', '.join(ARCHITECTURES)} (built here), or any other *ForCausalLM that transformers implements, or the "
        "language model of a *ForConditionalGeneration with a text_config (run by transformers). Fix: a causal "
        "language model's checkpoint, or register a teacher loader for this one (docs/extending.md)."
    )


def by_transformers(config: dict) -> bool:
    """Whether transformers runs this config.json's model (components/transformers_teacher.py):
    a causal language model of a family not built here, or one of a family built here with a
    feature this project's decoder lacks (Qwen2.5's yarn RoPE scaling, OPT-350m's
    post-LayerNorm, a GELU Llama), when transformers is installed and has its class."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return False  # the native path names the key and the kind it wants
    native = any(name in ARCHITECTURES for name in names) or (not names and config.get("model_type") in MODEL_TYPES)
    if not native:
        return transformers_teacher.teacher_architecture(config) is not None
    return unsupported_here(config) is not None and transformers_teacher.runs(native_class(config))


def native_class(config: dict) -> Optional[str]:
    """The class of a family built here that a config.json names, or names by its model_type."""
    names = [name for name in config.get("architectures") or [] if name in ARCHITECTURES]
    family = MODEL_TYPES.get(config.get("model_type"))
    return names[0] if names else next((name for name, kind in ARCHITECTURES.items() if kind == family), None)


def unsupported_here(config: dict) -> Optional[str]:
    """What this project's decoder lacks to build a native family's config.json, if anything
    (``rope scaling type 'yarn'``)."""
    try:
        _model_args(config, "config.json")
    except Unsupported as err:
        return err.what
    except TeacherError:  # a damaged or incomplete config: the native path names the key
        return None
    return None


class Unsupported(TeacherError):
    """A feature of a family built here that this project's decoder does not build (``what``)."""

    def __init__(self, message: str, what: str = ""):  # a default: pickled errors are rebuilt from the message
        super().__init__(message)
        self.what = what


def _require(condition: bool, config_file: str, what: str, fix: str = "") -> None:
    if not condition:
        raise Unsupported(f"{config_file}: {what} is not supported by this loader. Fix: "
                          + (fix or "pip install transformers (or letrecipes[eval]), which then runs it as a teacher; "
                                    "or use a checkpoint of the family without it, or register a teacher loader that "
                                    "builds it (docs/extending.md)."), what.split(" (")[0])


def _rope(config: dict, config_file: str) -> Tuple[float, Optional[dict]]:
    """(base, llama3 scaling or None), from either the hub's keys or transformers 5's ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    base = float(config.get("rope_theta") or params.get("rope_theta") or 10_000.0)
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return base, None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "default":
        return base, None
    _require(kind == "llama3", config_file, f"rope scaling type {kind!r} (only llama3 is)",
             "pip install transformers (or letrecipes[eval]), which then runs it as a teacher; or, where the model "
             "was pretrained without it and the scaling only stretches its context at inference (Qwen2.5's yarn "
             "entry, for one), a copy of the folder whose config.json lacks rope_scaling is the model as pretrained.")
    return base, {k: float(scaling[k]) if k != "original_max_position_embeddings" else int(scaling[k])
                  for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


# config.json's keys, across the families read: what each must hold. A key that may be
# null in a released config (num_key_value_heads, head_dim, n_inner, sliding_window, the
# rope entries) falls back to its default. A count past 2**31 is no model's: it overflows
# the tensor sizes before any shape is compared with the weights.
CONFIG_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "head_dim", "ffn_dim", "n_embd", "n_layer",
                 "n_head", "n_positions", "n_inner", "sliding_window", "word_embed_proj_dim")
CONFIG_NULLABLE = ("num_key_value_heads", "head_dim", "n_inner", "sliding_window", "rope_theta", "rope_scaling",
                   "rope_parameters", "architectures", "model_type", "hidden_act", "rotary_emb_base", "rotary_pct")
CONFIG_POSITIVE = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_emb_base",
                   "rotary_pct")
CONFIG_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_parallel_residual",
                "do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine", "_remove_final_layer_norm",
                "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention")
CONFIG_NAMES = ("model_type", "hidden_act", "activation_function")
CONFIG_MAPS = ("rope_scaling", "rope_parameters")
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "partial_rotary_factor")
ROPE_NULLABLE = ("rope_theta", "partial_rotary_factor")
MAX_COUNT = 2**31 - 1


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT


def _is_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value != float("inf")


def _config_value_problems(config: dict, config_file: str) -> None:
    """Each key of a config.json the loader reads of the kind it must be, and heads that
    divide: one error naming the key (a hand-edited or converted config gave a TypeError
    from deep in the loader, or an error about the student's ``model.*`` keys)."""
    def bad(key: str, value, what: str) -> TeacherError:
        return TeacherError(f"{config_file}: {key}={shortened(repr(value), 80)} must be {what}. Fix: use the "
                            "config.json the checkpoint was released with.")

    checks = [(CONFIG_COUNTS, _is_count, f"an integer from 1 to {MAX_COUNT:,}"),
              (CONFIG_POSITIVE, _is_positive, "a finite number > 0"),
              (CONFIG_FLAGS, lambda v: isinstance(v, bool), "true or false"),
              (CONFIG_NAMES, lambda v: isinstance(v, str), "a name (a string)"),
              (CONFIG_MAPS, lambda v: isinstance(v, dict), "a map of rope settings, or null"),
              (("architectures",), lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
               "a list of class names")]
    for keys, fits, what in checks:
        for key in keys:
            value = config.get(key)
            if key in config and not (value is None and key in CONFIG_NULLABLE) and not fits(value):
                raise bad(key, value, what)
    for section in CONFIG_MAPS:
        for key, value in (config.get(section) or {}).items():
            if key in ROPE_NUMBERS and not (value is None and key in ROPE_NULLABLE) and not _is_positive(value):
                raise bad(f"{section}.{key}", value, "a finite number > 0")
            if key == "original_max_position_embeddings" and not _is_count(value):
                raise bad(f"{section}.{key}", value, f"an integer from 1 to {MAX_COUNT:,}")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise bad("num_attention_heads", heads, f"a multiple of num_key_value_heads={kv}")
    hidden = config.get("hidden_size")
    if heads and hidden and hidden % heads:  # torchtune's attention asks it even with a head_dim of its own
        raise bad("hidden_size", hidden, f"a multiple of num_attention_heads={heads}")


def model_args(config: dict, config_file: str) -> ModelArgs:
    """The :class:`ModelArgs` a ``config.json`` describes (validating what the loader can map)."""
    args = _model_args(config, config_file)
    if args.max_seq_len > MAX_POSITIONS:  # its RoPE or position table would be built whole: 32 GB at 10**9
        raise TeacherError(f"{config_file}: {args.max_seq_len:,} positions (max_position_embeddings) is past the "
                           f"{MAX_POSITIONS:,} a teacher is built for. Fix: use the config.json released with these "
                           "weights.")
    return args


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # model.layers.3., transformer.h.3., h.3. (GPT-2)


def check_depth(args: ModelArgs, names: Iterable[str], config_file: str) -> None:
    """config.json's number of blocks against the blocks the weights hold, before the model is
    built: `num_hidden_layers: 1000000000` built a billion blocks (on the meta device, still
    Python objects) before any weight was compared, and ran out of memory."""
    found = {int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))}
    if found and max(found) + 1 != args.num_layers:
        raise TeacherError(f"{config_file}: {args.num_layers:,} blocks (num_hidden_layers), but the weights hold "
                           f"{max(found) + 1}. Fix: use the config.json released with these weights.")


def _model_args(config: dict, config_file: str) -> ModelArgs:
    _config_value_problems(config, config_file)
    arch = architecture(config, config_file)
    try:
        if arch == "opt":
            _require(config.get("do_layer_norm_before", True), config_file, "post-LayerNorm OPT (opt-350m)")
            _require(config.get("word_embed_proj_dim", config["hidden_size"]) == config["hidden_size"],
                     config_file, "word_embed_proj_dim != hidden_size (opt-350m)")
            _require(config.get("activation_function", "relu") == "relu", config_file,
                     f"activation_function={config.get('activation_function')!r}")
            _require(config.get("enable_bias", True) and config.get("layer_norm_elementwise_affine", True)
                     and not config.get("_remove_final_layer_norm", False), config_file, "OPT without biases or norms")
            return ModelArgs(
                family="opt", vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"], num_kv_heads=config["num_attention_heads"],
                embed_dim=config["hidden_size"], intermediate_dim=config["ffn_dim"],
                max_seq_len=config["max_position_embeddings"], norm_eps=1e-5,
                tie_word_embeddings=config.get("tie_word_embeddings", True), qkv_bias=True, output_bias=True,
            )
        if arch == "gpt_neox":
            return _gpt_neox_args(config, config_file)
        if arch == "gpt2":
            return _gpt2_args(config, config_file)
        _require(config.get("hidden_act", "silu") == "silu", config_file, f"hidden_act={config.get('hidden_act')!r}")
        _require(not config.get("mlp_bias", False), config_file, "mlp_bias=true")
        _require(not config.get("use_sliding_window", False), config_file, "use_sliding_window=true")
        base, scaling = _rope(config, config_file)
        attention_bias = bool(config.get("attention_bias", False))
        heads = config["num_attention_heads"]
        context = config.get("max_position_embeddings", 2048)
        if arch == "mistral" and config.get("sliding_window"):
            # Within the window, sliding-window attention is full causal attention: the teacher
            # is exact on sequences up to the window, and the recipe refuses longer ones.
            context = min(context, int(config["sliding_window"]))
        return ModelArgs(
            vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads, embed_dim=config["hidden_size"],
            intermediate_dim=config["intermediate_size"], max_seq_len=context,
            rope_base=base, rope_scaling=scaling, norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") if config.get("head_dim") not in (None, config["hidden_size"] // heads) else None,
            qkv_bias=arch == "qwen2" or attention_bias, output_bias=attention_bias, qk_norm=arch == "qwen3",
        )
    except KeyError as err:
        raise TeacherError(f"{config_file}: missing key {err.args[0]!r} that a {arch} config must have. Fix: use the "
                           "config.json the checkpoint was released with.") from err


def _gpt_neox_args(config: dict, config_file: str) -> ModelArgs:
    """Pythia's keys (``rotary_pct``, ``rotary_emb_base``) or transformers 5's ``rope_parameters``."""
    act = config.get("hidden_act", "gelu")
    _require(act in GELU_ACTIVATIONS, config_file, f"hidden_act={act!r}")
    params = config.get("rope_parameters") or {}
    _require(params.get("rope_type", "default") == "default" and not config.get("rope_scaling"), config_file,
             f"rope scaling {params.get('rope_type') or config.get('rope_scaling')!r}")
    heads, bias = config["num_attention_heads"], bool(config.get("attention_bias", True))
    return ModelArgs(
        family="gpt_neox", vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=heads, embed_dim=config["hidden_size"], intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_base=float(config.get("rotary_emb_base") or params.get("rope_theta") or 10_000.0),
        rotary_fraction=float(config.get("rotary_pct") or params.get("partial_rotary_factor") or 0.25),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=bias, output_bias=bias,
        parallel_residual=bool(config.get("use_parallel_residual", True)), mlp_activation=GELU_ACTIVATIONS[act],
    )


def _gpt2_args(config: dict, config_file: str) -> ModelArgs:
    """GPT-2's keys (``n_embd``, ``n_layer``, ``n_inner``: None is 4 x n_embd)."""
    act = config.get("activation_function", "gelu_new")
    _require(act in GELU_ACTIVATIONS, config_file, f"activation_function={act!r}")
    _require(config.get("scale_attn_weights", True), config_file, "scale_attn_weights=false")
    _require(not config.get("scale_attn_by_inverse_layer_idx", False), config_file,
             "scale_attn_by_inverse_layer_idx=true")
    _require(not config.get("add_cross_attention", False), config_file, "add_cross_attention=true")
    width, heads = config["n_embd"], config["n_head"]
    return ModelArgs(
        family="gpt2", vocab_size=config["vocab_size"], num_layers=config["n_layer"], num_heads=heads,
        num_kv_heads=heads, embed_dim=width, intermediate_dim=config.get("n_inner") or 4 * width,
        max_seq_len=config.get("n_positions", 1024), norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)), qkv_bias=True, output_bias=True,
        mlp_activation=GELU_ACTIVATIONS[act],
    )


# ----------------------------------------------------------------- weight names
def _rotary_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotates (j, j + d/2) pairs of each head; torchtune rotates (2j, 2j + 1). Reorder the rows."""
    return _partial_rotary_to_interleaved(w, heads, w.shape[0] // heads)


def _llama_names(args: ModelArgs, hf_key: str) -> Optional[Tuple[str, Optional[Callable]]]:
    key = hf_key[len("model."):] if hf_key.startswith("model.") else hf_key
    if key == "embed_tokens.weight":
        return "tok_embeddings.weight", None
    if key == "norm.weight":
        return "norm.scale", None
    if key == "lm_head.weight":
        return ("output.weight", None) if not args.tie_word_embeddings else None
    parts = key.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        return "?" + hf_key, None
    i, rest = parts[1], ".".join(parts[2:])
    if rest.endswith("rotary_emb.inv_freq"):
        return None
    simple = {
        "input_layernorm.weight": "sa_norm.scale", "post_attention_layernorm.weight": "mlp_norm.scale",
        "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.v_proj.bias": "attn.v_proj.bias",
        "self_attn.o_proj.weight": "attn.output_proj.weight", "self_attn.o_proj.bias": "attn.output_proj.bias",
        "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
        "mlp.down_proj.weight": "mlp.w2.weight",
    }
    if rest in simple:
        return f"layers.{i}.{simple[rest]}", None
    for proj, heads in (("q_proj", args.num_heads), ("k_proj", args.num_kv_heads)):
        linear = f"{proj}.linear" if args.qk_norm else proj
        for kind in ("weight", "bias"):
            if rest == f"self_attn.{proj}.{kind}":
                return f"layers.{i}.attn.{linear}.{kind}", lambda w, h=heads: _rotary_to_interleaved(w, h)
        if args.qk_norm and rest == f"self_attn.{proj[0]}_norm.weight":  # one head's scale, in RoPE's order too
            return f"layers.{i}.attn.{proj}.norm.scale", lambda w: _rotary_to_interleaved(w, 1)
    return "?" + hf_key, None


def _block_parts(key: str) -> Optional[Tuple[str, str, str]]:
    """``layers.3.fc1.weight`` -> ("3", "fc1", "weight"); None for a name outside the blocks."""
    parts = key.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        return None
    return parts[1], ".".join(parts[2:-1]), parts[-1]


def _opt_names(args: ModelArgs, hf_key: str) -> Optional[Tuple[str, Optional[Callable]]]:
    key = hf_key[len("model."):] if hf_key.startswith("model.") else hf_key
    if key == "lm_head.weight":
        return ("output.weight", None) if not args.tie_word_embeddings else None
    if not key.startswith("decoder."):
        return "?" + hf_key, None
    key = key[len("decoder."):]
    top = {"embed_tokens.weight": "tok_embeddings.weight", "embed_positions.weight": "tok_embeddings.positions.weight",
           "final_layer_norm.weight": "norm.weight", "final_layer_norm.bias": "norm.bias"}
    if key in top:
        return top[key], None
    block = _block_parts(key)
    if block is None:
        return "?" + hf_key, None
    i, module, kind = block
    modules = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
               "self_attn.out_proj": "attn.output_proj", "self_attn_layer_norm": "sa_norm",
               "final_layer_norm": "mlp_norm", "fc1": "mlp.w1", "fc2": "mlp.w2"}
    if module in modules:
        return f"layers.{i}.{modules[module]}.{kind}", None
    return "?" + hf_key, None


def _partial_rotary_to_interleaved(w: torch.Tensor, heads: int, rotary_dim: int) -> torch.Tensor:
    """As :func:`_rotary_to_interleaved`, for the first ``rotary_dim`` rows of each head only
    (GPT-NeoX turns a part of each head; the rest keep their order)."""
    rows, rest = w.shape[0], w.shape[1:]
    w = w.reshape(heads, rows // heads, *rest)
    turned = w[:, :rotary_dim].reshape(heads, 2, rotary_dim // 2, *rest).transpose(1, 2).reshape(heads, rotary_dim, *rest)
    return torch.cat([turned, w[:, rotary_dim:]], dim=1).reshape(rows, *rest)


def _neox_names(args: ModelArgs, hf_key: str):
    """GPT-NeoX's names; its fused ``query_key_value`` (rows grouped head by head as
    [q, k, v]) becomes three tensors, q and k reordered for RoPE."""
    if hf_key == "embed_out.weight":
        return ("output.weight", None) if not args.tie_word_embeddings else None
    key = hf_key[len("gpt_neox."):] if hf_key.startswith("gpt_neox.") else hf_key
    top = {"embed_in.weight": "tok_embeddings.weight", "final_layer_norm.weight": "norm.weight",
           "final_layer_norm.bias": "norm.bias"}
    if key in top:
        return top[key], None
    block = _block_parts(key)
    if block is None:
        return "?" + hf_key, None
    i, module, kind = block
    if module in ("attention", "attention.rotary_emb"):  # the causal-mask buffers and inv_freq of older checkpoints
        return None
    if module == "attention.query_key_value":
        heads, head_dim = args.num_heads, args.dim_per_head

        def part(w: torch.Tensor, which: int, turn: bool) -> torch.Tensor:
            one = w.reshape(heads, 3, head_dim, *w.shape[1:])[:, which].reshape(heads * head_dim, *w.shape[1:])
            return _partial_rotary_to_interleaved(one, heads, args.rotary_dim) if turn else one

        return [(f"layers.{i}.attn.{proj}.{kind}", lambda w, n=n: part(w, n, n < 2))
                for n, proj in enumerate(("q_proj", "k_proj", "v_proj"))]
    modules = {"attention.dense": "attn.output_proj", "input_layernorm": "sa_norm",
               "post_attention_layernorm": "mlp_norm", "mlp.dense_h_to_4h": "mlp.w1", "mlp.dense_4h_to_h": "mlp.w2"}
    if module in modules:
        return f"layers.{i}.{modules[module]}.{kind}", None
    return "?" + hf_key, None


def _gpt2_names(args: ModelArgs, hf_key: str):
    """GPT-2's names (with or without the ``transformer.`` prefix). Its linear layers are
    ``Conv1D``s, weights stored (in, out): transposed here. The fused ``c_attn`` holds q, k
    and v one after another along its output features."""
    key = hf_key[len("transformer."):] if hf_key.startswith("transformer.") else hf_key
    if key == "lm_head.weight":
        return ("output.weight", None) if not args.tie_word_embeddings else None
    top = {"wte.weight": "tok_embeddings.weight", "wpe.weight": "tok_embeddings.positions.weight",
           "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}
    if key in top:
        return top[key], None
    block = _block_parts("layers" + key[1:]) if key.startswith("h.") else None
    if block is None:
        return "?" + hf_key, None
    i, module, kind = block
    if module == "attn" and kind in ("bias", "masked_bias"):  # the causal-mask buffers of older checkpoints
        return None
    linear = kind == "weight" and module not in ("ln_1", "ln_2")

    def stored(w: torch.Tensor) -> torch.Tensor:
        return w.t().contiguous() if linear else w

    if module == "attn.c_attn":
        width = args.embed_dim
        return [(f"layers.{i}.attn.{proj}.{kind}", lambda w, n=n: stored(w)[n * width:(n + 1) * width])
                for n, proj in enumerate(("q_proj", "k_proj", "v_proj"))]
    modules = {"ln_1": "sa_norm", "ln_2": "mlp_norm", "attn.c_proj": "attn.output_proj", "mlp.c_fc": "mlp.w1",
               "mlp.c_proj": "mlp.w2"}
    if module in modules:
        return f"layers.{i}.{modules[module]}.{kind}", stored if linear else None
    return "?" + hf_key, None


NAMES = {"opt": _opt_names, "gpt_neox": _neox_names, "gpt2": _gpt2_names}


# ----------------------------------------------------------------- files
# Weights of a model in a layout other than transformers' PyTorch one, and the way from each.
FOREIGN_WEIGHTS = (
    ("consolidated*", "the original release's weights (Meta's or Mistral's own layout, not Hugging Face's)",
     "use the model's Hugging Face folder: the repository's top folder, not its original/ (it holds config.json "
     "with model.safetensors)."),
    ("tf_model*.h5", "TensorFlow weights only",
     "download the model's PyTorch weights (model.safetensors), or convert these once with transformers: "
     "AutoModelForCausalLM.from_pretrained(folder, from_tf=True).save_pretrained(folder)."),
    ("flax_model*.msgpack", "Flax weights only",
     "download the model's PyTorch weights (model.safetensors), or convert these once with transformers: "
     "AutoModelForCausalLM.from_pretrained(folder, from_flax=True).save_pretrained(folder)."),
)


def weight_files(path: Path) -> Dict[str, Path]:
    """Tensor name -> the file that holds it: safetensors (one file, or shards named by
    the index), else PyTorch's ``pytorch_model.bin`` (one, or sharded the same way)."""
    for index_name, single_name in ((INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_FILE)):
        index, single = path / index_name, path / single_name
        if index.is_file():
            return _indexed_files(path, index)
        if single.is_file():
            return {name: single for name in _tensor_names(single)}
    others = sorted(p.name for p in [*path.glob("*.safetensors"), *path.glob("*.bin")])
    hint = (f"found {others} but no index to say what is in them" if others
            else "no *.safetensors or pytorch_model.bin at all")
    fix = "copy the model's weight files into the folder."
    for pattern, whose, other_fix in FOREIGN_WEIGHTS:
        found = sorted(p.name for p in path.glob(pattern))
        if found:
            hint, fix = f"it holds {', '.join(found[:3])}: {whose}", other_fix
            break
    raise TeacherError(f"teacher.path: {str(path)!r} has no {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or "
                       f"{BIN_INDEX_FILE}: {hint}. Fix: {fix}")


def _indexed_files(path: Path, index: Path) -> Dict[str, Path]:
    fix = "Fix: download the index again with the model's shards."
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        cut_short = json_cut_short(index)
        what = cut_short if cut_short else f"not a weight index (needs a 'weight_map'): {err}"
        raise TeacherError(f"{index}: {what}. {fix}") from err
    if not isinstance(weight_map, dict):
        raise TeacherError(f"{index}: its 'weight_map' is not a map of tensor name to shard file (it is "
                           f"{shortened(repr(weight_map))}). {fix}")
    for name, file in weight_map.items():
        # a shard is a file of this folder: a path elsewhere (absolute, '..') is a damaged or foreign index
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise TeacherError(f"{index}: 'weight_map' gives tensor {name!r} the shard {file!r}, which is not the "
                               f"name of a file in the folder. {fix}")
    files = {name: path / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        try:
            found = file.is_file()
        except OSError as err:  # a name longer than the filesystem allows
            if err.errno != errno.ENAMETOOLONG:
                raise
            found = False
        if not found:
            raise TeacherError(f"{index} lists the shard {file.name[:80]!r}, but {str(path)!r} holds no such file. "
                               "Fix: copy every shard the index names into the folder.")
    return files


def _tensor_names(file: Path) -> list:
    if file.suffix == ".bin":
        return list(_load_pickle(file))
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises its own error types
        raise TeacherError(_unreadable(file, err)) from err


def _load_pickle(file: Path) -> Dict[str, torch.Tensor]:
    """A ``pytorch_model.bin``: tensors only (``weights_only``: a pickle that would run code
    is refused), memory-mapped when its format allows."""
    import pickle

    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except pickle.UnpicklingError as err:
        if stand_in(file, "a PyTorch checkpoint"):
            raise TeacherError(_unreadable(file, err)) from err
        if "Unsupported global" not in str(err):  # not a pickle at all, or a damaged one
            detail = next((line for line in str(err).splitlines()[1:] if line.strip() and "WeightsUnpickler" not in line),
                          str(err).splitlines()[0])
            raise TeacherError(f"teacher.path: cannot read {str(file)!r}: not a PyTorch checkpoint, or a damaged one "
                               f"({detail.strip()}). Fix: re-download the file.") from err
        raise TeacherError(f"teacher.path: {str(file)!r} holds Python objects besides tensors, which are not loaded "
                           "(they could run code). Fix: convert it to safetensors where it is trusted: "
                           "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder). "
                           f"({next(line for line in str(err).splitlines() if 'Unsupported global' in line).strip()})"
                           ) from err
    except Exception as err:  # a truncated or foreign file: zip/pickle errors of several types
        raise TeacherError(_unreadable(file, f"{type(err).__name__}: {err}")) from err


def iter_tensors(files: Dict[str, Path]) -> Iterator[Tuple[str, Path, torch.Tensor]]:
    from safetensors import safe_open

    by_file: Dict[Path, list] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if file.suffix == ".bin":
            tensors = _load_pickle(file)
            for name in names:
                if name not in tensors:
                    raise _not_in_shard(name, file)
                yield name, file, tensors[name]
            del tensors
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                held = set(f.keys())
                for name in names:
                    if name not in held:
                        raise _not_in_shard(name, file)
                    yield name, file, f.get_tensor(name)
        except TeacherError:
            raise
        except Exception as err:  # safetensors raises its own error types
            raise TeacherError(_unreadable(file, err)) from err


def _not_in_shard(name: str, file: Path) -> TeacherError:
    return TeacherError(f"teacher.path: the index names {name!r} in {str(file)!r}, which does not hold it. "
                        "Fix: re-download the shards and their index together.")


def _unreadable(file: Path, err: Exception) -> str:
    """The error for a weights file that does not read: what it is, when it is a stand-in
    for the file (a Git LFS pointer, a saved error page)."""
    instead = stand_in(file, "a PyTorch checkpoint" if file.suffix == ".bin" else "a safetensors file")
    return (f"teacher.path: {instead}" if instead else
            f"teacher.path: cannot read {str(file)!r} ({err}). Fix: re-download or re-export the file.")


def _quantized_tensor(file: Path, hf_key: str, tensor: torch.Tensor, what: str) -> str:
    return (f"{file}: tensor {hf_key!r} ({str(tensor.dtype).replace('torch.', '')}, shape {tuple(tensor.shape)}) "
            f"is part of a quantized checkpoint; {what} does not say so, and this loader reads full-precision "
            f"weights only. {QUANTIZED_FIX}")


def convert_state_dict(
    args: ModelArgs,
    tensors: Iterator[Tuple[str, Path, torch.Tensor]],
    expected: Dict[str, torch.Size],
    cast: Callable[[torch.Tensor], torch.Tensor],
    what: str,
    fix: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Rename (and for RoPE, reorder) HF tensors into this project's names, checking shapes.

    ``expected`` maps each of our parameter names to its shape; any tensor left over,
    missing or of another shape is an error naming the file it came from. ``fix`` replaces
    the advice, which names config.json, for a format whose shape comes from elsewhere.
    """
    names = NAMES.get(args.family, _llama_names)
    state: Dict[str, torch.Tensor] = {}
    for hf_key, file, tensor in tensors:
        if hf_key.rsplit(".", 1)[-1] in QUANTIZED_TENSOR_PARTS or ".quant_state." in hf_key:  # bitsandbytes 4-bit
            raise TeacherError(_quantized_tensor(file, hf_key, tensor, what))
        mapped = names(args, hf_key)
        if mapped is None:
            continue
        for ours, transform in mapped if isinstance(mapped, list) else [mapped]:  # a fused tensor maps to several
            if ours.startswith("?") or ours not in expected:
                raise TeacherError(f"{file}: unexpected tensor {hf_key!r} for the {args.family} layout that {what} "
                                   "describes. " + (fix or "Fix: check that config.json belongs to these weights."))
            if tensor.dtype not in FULL_PRECISION:  # int8/fp8 cast to float as it is: a model of noise
                raise TeacherError(_quantized_tensor(file, hf_key, tensor, what))
            try:
                value = transform(tensor) if transform else tensor
            except RuntimeError:  # a reshape that the tensor's size does not allow
                value = None
            if value is None or tuple(value.shape) != tuple(expected[ours]):
                raise TeacherError(f"{file}: tensor {hf_key!r} has shape {tuple(tensor.shape)}, but {what} implies "
                                   f"{tuple(expected[ours])}" + (f" for {ours}" if transform else "")
                                   + ". " + (fix or "Fix: use the config.json that came with these weights."))
            state[ours] = cast(value)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TeacherError(f"{what}: the weights lack {len(missing)} tensor(s) the model needs, e.g. "
                           f"{missing[:3]}. " + (fix or "Fix: check that every shard is complete and belongs to this config."))
    return state


@register_format("huggingface")
class HuggingFaceFormat(TeacherFormat):
    looks_like = "a Hugging Face model folder (config.json with model_type, *.safetensors or pytorch_model.bin, tokenizer.json)"

    @classmethod
    def detect(cls, path: Path) -> bool:
        meta = read_json(path)
        return meta is not None and "model" not in meta and bool(meta.get("model_type") or meta.get("architectures"))

    def describe(self, path: Path) -> ModelArgs:
        config = read_config(path)
        _refuse_quantized(config, str(path), folder=path)  # config.json's record, or a quantizer's own file
        if by_transformers(config):
            return transformers_teacher.describe_folder(path, config)
        return model_args(config, str(path / "config.json"))

    def tokenizer(self, path: Path) -> Optional[Path]:
        return folder_tokenizer(path)

    def bos(self, path: Path) -> Optional[Tuple[int, str]]:
        if (path / EXPORT_INFO).is_file():  # trained here, on windows without a BOS, whatever its tokenizer does
            return None
        return super().bos(path)

    def check_weights(self, path: Path) -> None:
        files = weight_files(resolve_path(path))  # every shard the index names exists; one file's header is read
        args = self.describe(path)
        if args.family != transformers_teacher.FAMILY:  # transformers' own check compares every tensor (load)
            check_depth(args, files, str(path / "config.json"))
        for file in sorted(set(files.values())):
            if file.suffix == ".safetensors":
                _tensor_names(file)  # its header: a file cut short ("not fully covered") fails here

    def load(self, path: Path, dtype: str = "bfloat16", device: Union[str, torch.device] = "cpu") -> Teacher:
        path = resolve_path(path)
        args = self.describe(path)
        if args.family == transformers_teacher.FAMILY:
            config = read_config(path)
            # a family built here, with what its decoder lacks (None for the others: not one of ours)
            return transformers_teacher.load(path, config, dtype, device, because=unsupported_here(config),
                                             architecture=native_class(config))
        files = weight_files(path)
        check_depth(args, files, str(path / "config.json"))
        model = build_frozen(
            args, lambda expected, cast: convert_state_dict(args, iter_tensors(files), expected, cast,
                                                           what=str(path / "config.json")),
            dtype, device,
        )
        return Teacher(model, tokenizer_path=folder_tokenizer(path), source=str(path))
