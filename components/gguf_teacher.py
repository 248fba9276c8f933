"""Teacher format ``gguf``: llama.cpp GGUF files, shape from the metadata, weights dequantized with the
``gguf`` package, the embedded tokenizer exported as a ``tokenizer.json``.

Architectures: ``llama`` (SmolLM/SmolLM2, TinyLlama, Llama-2 style models, Mistral, which
llama.cpp files as llama), ``qwen2`` (biases on q, k, v), ``qwen3`` (q/k norms),
``gptneox`` (Pythia: LayerNorm, partial RoPE, parallel residual, one fused qkv tensor) and
``gpt2`` (learned positions; llama.cpp stores its Conv1D weights as linear ones).
For ``llama`` llama.cpp's converter stores Q and K with each head's rows interleaved for
its RoPE kernel; we undo that to get the Hugging Face layout. ``qwen2``/``qwen3`` use
llama.cpp's NEOX RoPE, which turns halves as Hugging Face does: their rows are stored
as they are. For ``gptneox`` the converter regroups the fused qkv rows from head by head
([q, k, v] per head, Hugging Face's) to all q, all k, all v; we group them back. Then the
same name mapping and checks as a Hugging Face folder (``letrecipes.components.hf_teacher``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from letrecipes.components import transformers_teacher
from letrecipes.components.hf_teacher import MAX_COUNT, _is_count, _is_positive, convert_state_dict
from letrecipes.components.files import file_identity, gguf_parts, shortened, stand_in
from letrecipes.components.models import MAX_POSITIONS, ModelArgs
from letrecipes.components.run_info import outdated
from letrecipes.components.teachers import Teacher, TeacherError, TeacherFormat, build_frozen, register_format, resolve_path

# Where embedded tokenizers are exported (one tokenizer.json per distinct tokenizer).
GGUF_TOKENIZER_DIR = "outputs/cache/gguf_tokenizers"
GGUF_MAGIC = b"GGUF"

# What gguf.quants.dequantize handles and this loader has been checked with; anything
# else (the IQ* codebook formats, ternary types) is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def supported_types() -> Tuple[str, ...]:
    """The tensor types read: every one the installed gguf package dequantizes (0.19: also
    the IQ1-IQ4 "i-quants" many releases use, TQ1_0/TQ2_0, MXFP4), else the list above."""
    try:
        from gguf.quants import _type_traits  # its registry of dequantizers (F32 and F16 are read apart)
    except ImportError:
        return SUPPORTED_TYPES
    return tuple(dict.fromkeys([*SUPPORTED_TYPES, *(kind.name for kind in _type_traits)]))
# llama.cpp's pre-tokenizer names -> the `tokenizers` pre-tokenizer that splits the same way.
# Qwen2's split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2, the Split in Qwen2's tokenizer.json):
# GPT-2's, with case-insensitive contractions, letters after one non-letter, and digits one by one.
# Llama 3's (llama-bpe) is the same with digits in runs of up to three.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
REGEX_SPLITS = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT}
# GPT-2's own split: llama.cpp names it gpt2, or olmo / mpt for the GPT-NeoX-20B tokenizer (Pythia's).
GPT2_SPLIT_NAMES = ("gpt2", "gpt-2", "olmo", "mpt")
PRE_TOKENIZERS = ("smollm", *GPT2_SPLIT_NAMES, *REGEX_SPLITS)
# Each GGUF architecture: whether its q/k rows are stored permuted for llama.cpp's
# interleaved RoPE (llama) or as Hugging Face has them (the NEOX RoPE of qwen2, qwen3, gptneox).
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False, "gptneox": False, "gpt2": False}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
# The LayerNorm architectures (weights and biases alike): (their top tensors, the prefix of
# their blocks, GGUF's block part -> the Hugging Face module).
LAYER_NORM_LAYOUTS = {
    "gptneox": ({"token_embd.weight": "gpt_neox.embed_in.weight", "output_norm.weight": "gpt_neox.final_layer_norm.weight",
                 "output_norm.bias": "gpt_neox.final_layer_norm.bias", "output.weight": "embed_out.weight"},
                "gpt_neox.layers", {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                                    "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                                    "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}),
    "gpt2": ({"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
              "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
              "output.weight": "lm_head.weight"},
             "transformer.h", {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}),
}


# The oldest gguf package this loader was run against whole (tests/test_gguf_teacher.py,
# test_gguf_architectures.py, test_transformers_teachers.py pass with 0.17.1, 0.18.0, 0.19.0;
# constraints.txt pins 0.19.0). 0.14 has no ReaderField.contents(); 0.10 and 0.11 cannot read
# a file under numpy 2 ('memmap' object has no attribute 'newbyteorder'), which was said as
# "not a readable GGUF file. Fix: re-download or re-convert it".
GGUF_MIN = (0, 17)


def open_gguf(path: Path):
    """A reader of the GGUF model at ``path``: one file, or every part of a model that
    llama.cpp's gguf-split cut into several (:class:`SplitGGUF`), whichever part is named."""
    if importlib.util.find_spec("gguf") is None:
        raise TeacherError(f"teacher.path={str(path)!r} is a GGUF file, which needs the `gguf` package. "
                           "Fix: pip install gguf.")
    problem = outdated("gguf", GGUF_MIN)
    if problem:
        raise TeacherError(f"teacher.path={str(path)!r} is a GGUF file, whose reader {problem}.")
    if not path.is_file():
        raise TeacherError(f"teacher.path: no GGUF file at {str(path)!r}. Fix: point teacher.path at the .gguf file.")
    reader = _read_gguf(path)
    count = _field(reader, "split.count", str(path), 1)
    if count == 1:
        return reader
    parts = gguf_parts(path)
    merge = "(or merge them into one: llama-gguf-split --merge <its first part> <name>.gguf)"
    if not _is_count(count) or parts is None or len(parts) != count:
        raise TeacherError(f"teacher.path: {path.name} is one part of a GGUF model split in {count!r} files, but "
                           "its name is not the one llama.cpp's gguf-split gives such a part (<name>-00001-of-"
                           f"{count if _is_count(count) else 'N':05}.gguf, ...), by which the others are found. Fix: "
                           f"give the parts their names back {merge}.")
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise TeacherError(f"teacher.path: {path.name} is one part of a GGUF model split in {count} files, and "
                           f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                           f"{'is' if len(missing) == 1 else 'are'} not beside it in {path.parent}. Fix: download "
                           f"every part into that folder {merge}.")
    readers = [reader if part == path else _read_gguf(part) for part in parts]
    for number, (part, one) in enumerate(zip(parts, readers)):
        if (_field(one, "split.no", str(part), -1), _field(one, "split.count", str(part), -1)) != (number, count):
            raise TeacherError(f"teacher.path: {part} is not part {number + 1} of the {count} that {parts[0].name} "
                               "belongs to (its split metadata says otherwise): parts of two models, or a damaged "
                               f"one. Fix: download the parts of one model again {merge}.")
    split = SplitGGUF(readers, parts[0])
    expected = _field(readers[0], "split.tensors.count", str(parts[0]), len(split.tensors))
    if expected != len(split.tensors):
        raise TeacherError(f"teacher.path: the {count} parts of {parts[0].name} hold {len(split.tensors)} tensors; "
                           f"its metadata says {expected!r}: a part is of another model or damaged. Fix: download "
                           f"the parts again {merge}.")
    return split


class SplitGGUF:
    """A GGUF model that llama.cpp's gguf-split cut into parts, read as one file: the
    metadata of the first part (the others carry their split keys only), the tensors of all."""

    def __init__(self, readers: list, first: Path):
        self.first = first  # the part with the metadata
        self.fields = readers[0].fields
        self.tensors = [tensor for reader in readers for tensor in reader.tensors]


def _read_gguf(path: Path):
    return _cached_reader(str(path), file_identity(path))


@functools.lru_cache(maxsize=64)  # every part of a split model
def _cached_reader(name: str, identity: str):
    """gguf's reader parses every metadata value, the vocabulary's tokens and merges one by one
    (2.5 s for SmolLM2's 49k tokens: benchmarks/teacher_setup_cost.py), and a run asks for the
    file's shape, its tokenizer, its check and its weights: one reading serves them all, until
    the weights are loaded (:func:`forget_readers`)."""
    import gguf

    path = Path(name)
    try:
        return gguf.GGUFReader(name)
    except Exception as err:  # the reader raises ValueError/struct errors on a damaged file
        instead = stand_in(path, "a GGUF file")
        raise TeacherError(f"teacher.path: {instead}" if instead else
                           f"{path}: not a readable GGUF file ({err}). Fix: re-download or re-convert it.") from err


def forget_readers() -> None:
    """Let the parsed metadata go (tens of MB for a large vocabulary) once a teacher is loaded."""
    _cached_reader.cache_clear()


_ABSENT = object()  # a default of _field's that says "absent" without being a value


def _field(reader, key: str, source: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise TeacherError(f"{source}: GGUF metadata key {key!r} is missing. Fix: use a file written by llama.cpp's "
                               "convert_hf_to_gguf.py (an older or another converter's file lacks it).")
        return default
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as err:  # its bytes changed since it was written
        raise TeacherError(f"{source}: GGUF metadata key {key!r} does not read ({type(err).__name__}: {err}): the file "
                           "is damaged. Fix: re-download or re-convert it.") from err


# The metadata keys the loader reads (after the architecture's name for its own) and what
# each must hold. llama.cpp writes counts as integers; a float, a flag or a list there came
# from an edit or another tool, and int() would read 1e30 as a size or -0.5 as 0.
METADATA_COUNTS = ("embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length",
                   "rope.dimension_count", "vocab_size", "block_count", "feed_forward_length", "context_length")
PER_BLOCK_COUNTS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
METADATA_POSITIVE = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
METADATA_FLAGS = ("use_parallel_residual",)
METADATA_NAMES = ("rope.scaling.type",)
TOKENIZER_NAMES = ("tokenizer.ggml.model", "tokenizer.ggml.pre")
TOKENIZER_LISTS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
REFIT_STEPS = "re-download the file, or convert the model again with llama.cpp's convert_hf_to_gguf.py."
REFIT = f"Fix: {REFIT_STEPS}"


def _bad_value(source: str, key: str, value, what: str) -> TeacherError:
    shown = f"a list of {len(value)} values" if isinstance(value, list) else shortened(repr(value), 60)
    return TeacherError(f"{source}: GGUF metadata key {key!r} is {shown}, where {what} is expected: the file was "
                        f"damaged or edited, or written by another tool. {REFIT}")


def _metadata_problems(reader, arch: str, source: str) -> None:
    """Each metadata key the shape is read from of the kind llama.cpp writes, and heads that
    divide the width: one error naming the key (before: a TypeError from int() of a list, a
    reshape error from the q/k permutation, or an error naming the student's ``model.*`` keys)."""
    checks = [(METADATA_COUNTS, _is_count, f"an integer from 1 to {MAX_COUNT:,}"),
              (METADATA_POSITIVE, _is_positive, "a finite number > 0"),
              (METADATA_FLAGS, lambda v: isinstance(v, bool), "true or false"),
              (METADATA_NAMES, lambda v: isinstance(v, str), "a name (a string)")]
    values = {}
    for keys, fits, what in checks:
        for key in keys:
            value = values[key] = _field(reader, f"{arch}.{key}", source, _ABSENT)
            if value is not _ABSENT and not fits(value):
                if isinstance(value, list) and key in PER_BLOCK_COUNTS:  # llama.cpp's per-block counts (OpenELM)
                    raise TeacherError(f"{source}: GGUF metadata key '{arch}.{key}' gives one value per block; this "
                                       "loader reads models whose blocks are all alike. Fix: use a teacher of one of "
                                       f"the architectures it reads ({', '.join(ARCHITECTURES)}).")
                raise _bad_value(source, f"{arch}.{key}", value, what)
    width, heads = values["embedding_length"], values["attention.head_count"]
    kv = values["attention.head_count_kv"]
    if heads is not _ABSENT and kv is not _ABSENT and heads % kv:
        raise _bad_value(source, f"{arch}.attention.head_count", heads, f"a multiple of attention.head_count_kv={kv}")
    if width is not _ABSENT and heads is not _ABSENT and width % heads:  # torchtune's attention asks it
        raise _bad_value(source, f"{arch}.embedding_length", width, f"a multiple of attention.head_count={heads}")


def _tokenizer_problems(reader, source: str) -> None:
    """The embedded tokenizer's keys of the kinds llama.cpp writes, checked before it is built
    or found in the cache (whose key is its content)."""
    for key in TOKENIZER_NAMES:
        value = _field(reader, key, source, _ABSENT)
        if value is not _ABSENT and not isinstance(value, str):
            raise _bad_value(source, key, value, "a name (a string)")
    byte_level = _field(reader, "tokenizer.ggml.model", source, _ABSENT) == "gpt2"
    for key in TOKENIZER_LISTS:  # a SentencePiece vocabulary may have no merges (they follow from the scores)
        value = _field(reader, key, source, None if byte_level or key.endswith("tokens") else _ABSENT)
        if value is not _ABSENT and (not isinstance(value, list) or not value
                                     or not all(isinstance(v, str) for v in value)):
            raise _bad_value(source, key, value, "a list of strings")
    tokens = _field(reader, "tokenizer.ggml.tokens", source)
    for key, fits, what in (("tokenizer.ggml.token_type", _is_whole, "integers"),
                            ("tokenizer.ggml.scores", _is_number, "numbers")):
        value = _field(reader, key, source, _ABSENT)
        if value is not _ABSENT and not (isinstance(value, list) and len(value) == len(tokens)
                                         and all(map(fits, value))):
            raise _bad_value(source, key, value, f"a list of {len(tokens)} {what}, one per token")


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_args(reader, source: str) -> ModelArgs:
    args = _model_args(reader, source)
    if args.max_seq_len > MAX_POSITIONS:  # the RoPE table is built whole: 32 GB at 10**9 positions
        raise TeacherError(f"{source}: {args.max_seq_len:,} positions (context_length) is past the {MAX_POSITIONS:,} "
                           f"a teacher is built for. {REFIT}")
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if blocks and max(blocks) + 1 != args.num_layers:  # before a model of block_count blocks is built
        raise TeacherError(f"{source}: {args.num_layers:,} blocks (block_count), but the file's tensors hold "
                           f"{max(blocks) + 1}. {REFIT}")
    return args


def _model_args(reader, source: str) -> ModelArgs:
    arch = _field(reader, "general.architecture", source)
    if not isinstance(arch, str):
        raise _bad_value(source, "general.architecture", arch, "a name (a string)")
    if arch not in ARCHITECTURES and arch in transformers_teacher.gguf_architectures():
        _metadata_problems(reader, arch, source)
        return transformers_teacher.describe_gguf(Path(source), reader, arch)
    if arch not in ARCHITECTURES:
        others = transformers_teacher.gguf_architectures()
        run_by = f" or, run by transformers, one of {', '.join(a for a in others if a not in ARCHITECTURES)}" \
            if others else " (transformers, not installed here, reads more: pip install transformers)"
        raise TeacherError(f"{source}: GGUF architecture {arch!r} is not supported; expected one of "
                           f"{', '.join(ARCHITECTURES)}{run_by}. Fix: use the model's Hugging Face folder with "
                           "teacher._component_=huggingface.")
    _metadata_problems(reader, arch, source)
    names = {t.name for t in reader.tensors}

    def meta(key: str, default=None):
        return _field(reader, f"{arch}.{key}", source, default)

    if meta("rope.scaling.type", "none") not in ("none", ""):  # linear / yarn scaling: not mapped
        raise TeacherError(f"{source}: RoPE scaling {meta('rope.scaling.type')!r} in GGUF is not supported. Fix: use "
                           "the model's Hugging Face folder with teacher._component_=huggingface.")
    width = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", width // heads))  # Qwen3's heads are wider than width / heads
    rope_dim = int(meta("rope.dimension_count", head_dim))
    vocab_size = meta("vocab_size", 0) or _rows(reader, "token_embd.weight") or \
        len(_field(reader, "tokenizer.ggml.tokens", source))
    if arch == "gptneox":
        return _gptneox_args(meta, names, int(vocab_size), rope_dim, source)
    if arch == "gpt2":  # learned positions; llama.cpp computes its MLP with the tanh GELU, as GPT-2's gelu_new
        return ModelArgs(
            family="gpt2", vocab_size=int(vocab_size), num_layers=int(meta("block_count")), num_heads=heads,
            num_kv_heads=heads, embed_dim=width, intermediate_dim=int(meta("feed_forward_length")),
            max_seq_len=_rows(reader, "position_embd.weight") or int(meta("context_length", 1024)),
            norm_eps=float(meta("attention.layer_norm_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in names, qkv_bias=True, output_bias=True,
            mlp_activation="gelu_tanh")
    if rope_dim != head_dim:
        raise TeacherError(f"{source}: GGUF metadata key '{arch}.rope.dimension_count' is {rope_dim}, but its heads "
                           f"have {head_dim} features (attention.key_length, or embedding_length / head_count): a "
                           f"{arch} model turns all of them. {REFIT}")
    return ModelArgs(
        vocab_size=int(vocab_size),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        embed_dim=width,
        intermediate_dim=int(meta("feed_forward_length")),
        max_seq_len=int(meta("context_length", 2048)),
        rope_base=float(meta("rope.freq_base", 10_000.0)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        head_dim=head_dim if head_dim != width // heads else None,
        rope_scaling=_rope_factors(reader, source, head_dim),
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
    )


def _rows(reader, name: str) -> Optional[int]:
    """The rows of a 2-D tensor (GGUF lists dims innermost first); None when it is absent."""
    tensor = next((t for t in reader.tensors if t.name == name), None)
    return int(tensor.shape[-1]) if tensor is not None else None


def _gptneox_args(meta: Callable, names: set, vocab_size: int, rope_dim: int, source: str) -> ModelArgs:
    """Pythia's shape as llama.cpp's converter keeps it. The MLP is the exact GELU that
    GPT-NeoX models are trained with (``hidden_act: gelu``); llama.cpp itself computes the
    tanh approximation, up to 1e-3 away."""
    width, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = width // heads
    if not 2 <= rope_dim <= head_dim or rope_dim % 2:
        raise TeacherError(f"{source}: rope.dimension_count={rope_dim} does not fit a head of {head_dim} features "
                           "(an even number up to it). Fix: re-convert the file.")
    return ModelArgs(
        family="gpt_neox", vocab_size=vocab_size, num_layers=int(meta("block_count")), num_heads=heads,
        num_kv_heads=heads, embed_dim=width, intermediate_dim=int(meta("feed_forward_length")),
        max_seq_len=int(meta("context_length", 2048)), rope_base=float(meta("rope.freq_base", 10_000.0)),
        rotary_fraction=rope_dim / head_dim, norm_eps=float(meta("attention.layer_norm_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_qkv.bias" in names,
        output_bias="blk.0.attn_output.bias" in names, parallel_residual=bool(meta("use_parallel_residual", True)),
        mlp_activation="gelu",
    )


def _rope_factors(reader, source: str, head_dim: int) -> Optional[dict]:
    """Llama-3.1+'s scaled RoPE as llama.cpp stores it: a ``rope_freqs`` tensor dividing each
    pair's frequency (the original factor, low/high frequency factors and context are not kept)."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if len(factors) != head_dim // 2:
        raise TeacherError(f"{source}: rope_freqs.weight has {len(factors)} factors; a head of {head_dim} features "
                           f"needs {head_dim // 2}. Fix: re-convert the file.")
    return {"frequency_factors": [float(f) for f in factors]}


def _undo_rotary_permutation(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp orders each head's rows as rotary pairs (2j, 2j+1); HF as halves (j, j + d/2).
    Rows that the heads do not split into pairs are left as they are: the shape check that
    follows names the tensor and the shape the metadata implies."""
    head_dim = w.shape[0] // heads
    if w.shape[0] % heads or head_dim % 2:
        return w
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(reader, args: ModelArgs, source: str) -> Iterator[Tuple[str, Path, torch.Tensor]]:
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture", source)
    permuted = ARCHITECTURES[arch]
    names = check_tensors(reader, source)
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # read with the shape (model_args): it is a RoPE setting, not a weight
        hf_name = names[tensor.name]
        # a copy: the file is memory-mapped read-only
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        rows_cols = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        values = values.reshape(rows_cols if len(rows_cols) > 1 else (-1,))
        if permuted and tensor.name.endswith("attn_q.weight"):
            values = _undo_rotary_permutation(values, args.num_heads)
        elif permuted and tensor.name.endswith("attn_k.weight"):
            values = _undo_rotary_permutation(values, args.num_kv_heads)
        elif arch == "gptneox" and ".attn_qkv." in tensor.name and not len(values) % (3 * args.num_heads):
            # [all q; all k; all v] -> [q, k, v] per head (rows that do not split so fail the shape check)
            values = values.reshape(3, args.num_heads, -1, *values.shape[1:]).swapaxes(0, 1).reshape(values.shape)
        elif arch == "gpt2" and values.ndim == 2 and tensor.name.startswith("blk."):
            values = values.T  # llama.cpp stores GPT-2's Conv1D weights as linear ones: back to (in, out)
        yield hf_name, source, torch.from_numpy(values)  # a transposed view stays one: the HF mapping copies it once


def check_tensors(reader, source: str) -> Dict[str, str]:
    """Each tensor of a file of a family built here named and of a type read, from the
    metadata alone (before the corpus is prepared); GGUF name -> Hugging Face name."""
    arch = _field(reader, "general.architecture", source)
    names, readable = {}, supported_types()
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        names[tensor.name] = _hf_name(tensor.name, arch)
        if names[tensor.name] is None:
            raise TeacherError(f"{source}: unexpected tensor {tensor.name!r} for a {arch} GGUF. Fix: use a plain "
                               f"{arch} model's file (not a merged adapter or multimodal projector), or register a "
                               "teacher format for it (docs/extending.md).")
        if tensor.tensor_type.name not in readable:
            raise TeacherError(f"{source}: tensor {tensor.name!r} is quantized as {tensor.tensor_type.name}, which "
                               f"the installed gguf package does not dequantize. Read: {', '.join(readable)}. Fix: "
                               "pip install -U gguf, or a file quantized to one of those (e.g. Q8_0, Q4_K_M) or the "
                               "F16 file.")
    return names


def _hf_name(name: str, arch: str) -> Optional[str]:
    """The Hugging Face name of a GGUF tensor; None for one this architecture does not have."""
    top, blocks, modules = LAYER_NORM_LAYOUTS.get(arch, (TOP_NAMES, "model.layers", None))
    if name in top:
        return top[name]
    parts = name.split(".", 2)
    if parts[0] != "blk" or len(parts) < 3:
        return None
    if modules is not None:
        module, _, kind = parts[2].rpartition(".")
        return f"{blocks}.{parts[1]}.{modules[module]}.{kind}" if module in modules and kind in ("weight", "bias") \
            else None
    return f"{blocks}.{parts[1]}.{LAYER_NAMES[parts[2]]}" if parts[2] in LAYER_NAMES else None


def state_dict(reader, args: ModelArgs, expected: Dict[str, torch.Size], cast: Callable, source: str):
    return convert_state_dict(args, _hf_tensors(reader, args, source), expected, cast, what=source,
                              fix=f"Fix: its metadata and its tensors disagree: {REFIT_STEPS}")


# ----------------------------------------------------------------- tokenizer
def build_tokenizer(reader, source: str):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's embedded byte-level BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model", source)
    if kind != "gpt2":
        raise TeacherError(f"{source}: embedded tokenizer type {kind!r} is not supported; expected 'gpt2' "
                           "(byte-level BPE). Fix: set tokenizer.path to the model's tokenizer.json.")
    pre = _field(reader, "tokenizer.ggml.pre", source, "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise TeacherError(f"{source}: pre-tokenizer {pre!r} is not supported; expected one of {PRE_TOKENIZERS}. "
                           "Fix: set tokenizer.path to the model's tokenizer.json.")
    tokens = _field(reader, "tokenizer.ggml.tokens", source)
    types = _field(reader, "tokenizer.ggml.token_type", source, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", source)]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp's smollm pre-tokenizer: every digit alone, then the GPT-2 split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in REGEX_SPLITS:
        if pre == "qwen2":  # Unicode-normalised (NFC) first, as Qwen2's own tokenizer.json does
            tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(REGEX_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    control, user_defined = 3, 4  # llama.cpp token types
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == control])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == user_defined])
    return tokenizer


def converted_by_transformers(metadata_file: Path, kind: str, source: str):
    """The ``tokenizers.Tokenizer`` that transformers' GGUF reader builds from the file: for
    the vocabularies that are not byte-level BPE (llama.cpp's ``llama``, SentencePiece's
    BPE with byte fallback: Llama 2, TinyLlama, Mistral), whose normalizer, merges recovered
    from the scores and byte fallback transformers keeps, as a library of the field, where
    :func:`build_tokenizer` is ours. transformers is optional here (the eval extra)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise TeacherError(f"{source}: its embedded tokenizer is of llama.cpp's type {kind!r} (not byte-level BPE), "
                           "which letrecipes converts with transformers, not installed here. Fix: pip install "
                           "transformers (or letrecipes[eval]), or set tokenizer.path to the model's "
                           "tokenizer.json.") from err
    try:
        return AutoTokenizer.from_pretrained(str(metadata_file.parent), gguf_file=metadata_file.name).backend_tokenizer
    except Exception as err:  # transformers raises what it meets: a type it has no converter for, a damaged value
        raise TeacherError(f"{source}: transformers could not convert its embedded {kind!r} tokenizer "
                           f"({type(err).__name__}: {shortened(str(err), 200)}). Fix: set tokenizer.path to the "
                           "model's tokenizer.json.") from err


def export_tokenizer(reader, source: str, out_dir: Path, metadata_file: Optional[Path] = None) -> Path:
    """Write the embedded tokenizer once to ``out_dir/<fingerprint>/tokenizer.json``.

    The fingerprint covers the vocabulary, merges, scores and pre-tokenizer, so two GGUF
    files with the same tokenizer share one file, and the data cache (keyed on the
    tokenizer file's content) is reused across them. ``metadata_file``: the file that
    holds the metadata (a split model's first part; ``source`` when None).
    """
    _tokenizer_problems(reader, source)
    h = hashlib.sha256()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        h.update(json.dumps(_field(reader, key, source, "")).encode())
    target = out_dir / h.hexdigest()[:16] / "tokenizer.json"
    if target.is_file():
        return target
    kind = _field(reader, "tokenizer.ggml.model", source)
    try:
        tokenizer = build_tokenizer(reader, source) if kind == "gpt2" else \
            converted_by_transformers(Path(metadata_file or source), kind, source)
    except TeacherError:
        raise
    except Exception as err:  # tokenizers' bare Exception: merges that name tokens the vocabulary lacks
        raise TeacherError(f"{source}: its embedded tokenizer does not build ({err}): the file is damaged. Fix: "
                           "re-download or re-convert it, or set tokenizer.path to the model's tokenizer.json.") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"tokenizer.json.{socket.gethostname()}.{os.getpid()}.tmp")  # unique across hosts
    tokenizer.save(str(tmp))
    tmp.replace(target)  # atomic: concurrent ranks or a killed run never leave half a file
    return target


@register_format("gguf")
class GGUFFormat(TeacherFormat):
    """Weights dequantized on load; the embedded tokenizer exported to
    ``<tokenizer_dir>/<fingerprint>/tokenizer.json`` for the data pipeline."""

    looks_like = "a llama.cpp .gguf file (llama, qwen2, qwen3, gptneox, gpt2; phi3, gemma2/3 ... by transformers)"

    def __init__(self, tokenizer_dir: Union[str, Path] = GGUF_TOKENIZER_DIR):
        self.tokenizer_dir = Path(tokenizer_dir)

    @classmethod
    def detect(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix == ".gguf":
            return True
        try:
            with open(path, "rb") as f:
                return f.read(4) == GGUF_MAGIC
        except OSError:
            return False

    def describe(self, path: Path) -> ModelArgs:
        return model_args(open_gguf(path), str(path))

    def tokenizer(self, path: Path) -> Optional[Path]:
        reader = open_gguf(path)
        return export_tokenizer(reader, str(path), self.tokenizer_dir, getattr(reader, "first", path))

    def bos(self, path: Path) -> Optional[Tuple[int, str]]:
        """As llama.cpp reads the file: ``tokenizer.ggml.add_bos_token``, or where it is absent,
        llama.cpp's default for the vocabulary (SentencePiece's and Llama 3's BPE put one)."""
        reader = open_gguf(path)
        source = str(path)
        tokens, kind, pre, bos = (_field(reader, f"tokenizer.ggml.{key}", source, _ABSENT)
                                  for key in ("tokens", "model", "pre", "bos_token_id"))
        add = _field(reader, "tokenizer.ggml.add_bos_token", source, kind == "llama" or pre == "llama-bpe")
        if add is not True or not _is_whole(bos) or not isinstance(tokens, list) or not 0 <= bos < len(tokens):
            return None
        return bos, tokens[bos]

    def check_weights(self, path: Path) -> None:
        reader = open_gguf(path)
        if model_args(reader, str(path)).family == transformers_teacher.FAMILY:
            transformers_teacher.check_gguf_tensors(path, reader, _field(reader, "general.architecture", str(path)))
        else:  # names and types here; shapes as the weights are read (convert_state_dict)
            check_tensors(reader, str(path))

    def load(self, path: Path, dtype: str = "bfloat16", device: Union[str, torch.device] = "cpu") -> Teacher:
        try:
            return self._load(resolve_path(path), dtype, device)
        finally:
            forget_readers()

    def _load(self, path: Path, dtype: str, device: Union[str, torch.device]) -> Teacher:
        reader = open_gguf(path)
        args = model_args(reader, str(path))
        if args.family == transformers_teacher.FAMILY:
            arch = _field(reader, "general.architecture", str(path))
            return transformers_teacher.load_gguf(path, reader, arch, dtype, device, export_tokenizer(
                reader, str(path), self.tokenizer_dir, getattr(reader, "first", path)))
        model = build_frozen(args, lambda expected, cast: state_dict(reader, args, expected, cast, str(path)),
                             dtype, device)
        return Teacher(model, tokenizer_path=export_tokenizer(reader, str(path), self.tokenizer_dir,
                                                              getattr(reader, "first", path)), source=str(path))
