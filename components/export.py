"""The final export, in Hugging Face format: ``<output_dir>/final`` loads with
``AutoModelForCausalLM.from_pretrained`` and with this project's own teacher loaders.

    final/config.json                  LlamaConfig (model_type llama, RoPE, tying, norms, vocabulary)
    final/model.safetensors            Hugging Face tensor names; bf16 unless told otherwise
      (or model-0000k-of-0000n.safetensors + model.safetensors.index.json above max_shard_mb)
    final/tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json

Tensors are renamed (and q/k rows permuted for RoPE) by torchtune's own converter
(``convert_weights.tune_to_hf``), one tensor at a time, and written shard by shard, so a
conversion never holds more than one output shard: the same writer serves a model in
memory (single process) and a DCP step checkpoint on disk (:func:`export_checkpoint`,
``letrecipes export``, and the end of a sharded run, which therefore never gathers the
whole model on one rank). Written into ``final.tmp`` and renamed: never half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.files import environment_errors, first_names, new_file_mode, replace_atomically
from letrecipes.components.models import ModelArgs
from letrecipes.components.progress import ByteProgress
from letrecipes.components.run_folder import EXPORT_INFO
from letrecipes.components.tokenizer import Tokenizer, bos_id

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_INDEX = "model.safetensors.index.json"
EXPORT_TOKENIZER = "tokenizer.json"
EXPORT_FORMAT = "letrecipes"  # the "format" key of exports written before 0.2 (read by letrecipes_teacher)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULT_MAX_SHARD_MB = 5 * 1024


class ExportError(LetRecipesError):
    """The export cannot be written (bad input, an existing folder)."""


def export_dtype(name: str, key: str = "export.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ExportError(f"{key}={name!r}: use bf16 (the default), fp32 or fp16.")
    return DTYPES[name]


def hf_config(args: ModelArgs, tokenizer: Optional[Tokenizer], dtype: torch.dtype) -> dict:
    """The ``config.json`` of a Hugging Face ``LlamaForCausalLM`` with ``args``' shape."""
    if args.family != "llama" or args.qkv_bias or args.output_bias or args.qk_norm:
        raise ExportError(f"export: only Llama-family students without attention biases or q/k norms are exported "
                          f"to Hugging Face format (this model: family={args.family!r}, qkv_bias={args.qkv_bias}, "
                          f"qk_norm={args.qk_norm}).")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": args.vocab_size, "hidden_size": args.embed_dim, "intermediate_size": args.intermediate_dim,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "head_dim": args.dim_per_head, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_base,
        "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "initializer_range": 0.02,
    }
    if args.rope_scaling and "frequency_factors" in args.rope_scaling:
        raise ExportError("export: this model's RoPE comes as one factor per frequency (a GGUF file's rope_freqs), "
                          "which a Hugging Face config.json cannot state. Fix: use the model's own Hugging Face "
                          "folder, from which the GGUF file was converted.")
    if args.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    if tokenizer is not None:
        config["eos_token_id"] = tokenizer.eos_id
    return config


def to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> Tuple[str, torch.Tensor]:
    """One tensor of ours as Hugging Face's (torchtune's converter, applied to one tensor)."""
    from torchtune.models.convert_weights import tune_to_hf

    (hf_name, hf_tensor), = tune_to_hf({name: tensor}, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                       dim=args.embed_dim, head_dim=args.dim_per_head).items()
    return hf_name, hf_tensor


class ShardedWriter:
    """safetensors files of at most ``max_bytes`` each (one ``model.safetensors`` if it all fits)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[Tuple[Path, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        # safetensors >= 0.8 writes through a temporary file made 0600 whatever the umask
        # (safetensors#782): the weights would be the one file of the export a colleague cannot read
        os.chmod(path, new_file_mode())
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / EXPORT_WEIGHTS)
            return
        weight_map = {}
        for k, (path, names) in enumerate(self.files, 1):
            final = self.folder / f"model-{k:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        replace_atomically(self.folder / EXPORT_INDEX, json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def write_hf_folder(tensors: Iterable[Tuple[str, torch.Tensor]], args: ModelArgs, out_dir: Union[str, Path],
                    tokenizer: Optional[Tokenizer], dtype: torch.dtype = torch.bfloat16,
                    max_shard_mb: int = DEFAULT_MAX_SHARD_MB, log: Optional[Callable[[str], None]] = None,
                    key: str = "export", then: str = "run the same command again",
                    step: Optional[int] = None, bos: Optional[Tuple[int, str]] = None) -> Path:
    """Write ``tensors`` (our names, any order) as a Hugging Face folder at ``out_dir``, with
    the training ``step`` they are from where it is known (:func:`exported_step`),
    atomically; every ``progress.PROGRESS_EVERY_S`` seconds, a line with the bytes written and an ETA.
    A write that fails (a full disk) removes the partial folder and is one line naming ``key``.
    An earlier export at ``out_dir`` that another process reads is left to it, and the new one
    dropped, in one line. ``bos``: the token the model reads before a text (None for a model
    trained here), which the folder's tokenizer then puts there (:func:`tokenizer_as_read`)."""
    out_dir = Path(out_dir)
    return _write_atomically(out_dir, tokenizer, key, then, step, lambda tmp: _write_hf_folder(
        tensors, args, out_dir, tmp, tokenizer, dtype, max_shard_mb, log or print, bos))


def _write_atomically(out_dir: Path, tokenizer: Optional[Tokenizer], key: str, then: str, step: Optional[int],
                      fill: Callable[[Path], None]) -> Path:
    """``fill`` writes the folder into ``<out_dir>.tmp``, which then replaces ``out_dir`` whole."""
    from letrecipes.components.checkpointing import remove_unless_read

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    kept = f"{out_dir} is as it was." if out_dir.exists() else "Nothing was left behind."
    # a read of the tokenizer failing (it is copied in) names its own key, not the export's
    keys = {key: out_dir.parent, "tokenizer.path": Path(tokenizer.path)} if tokenizer is not None else key
    try:
        with environment_errors(keys, f"writing the export into {tmp}", kept, then=then):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            fill(tmp)
            if step is not None:
                (tmp / EXPORT_INFO).write_text(json.dumps({"step": step}))
            if out_dir.exists() and not remove_unless_read(out_dir):  # held while removed: no reader begins half-way
                raise ExportError(f"{key}: {out_dir} is being read by another process (an evaluation or an export "
                                  f"holds it while it reads): it was left as it was, and the new export was not kept. "
                                  f"Fix: {then} once that reader is done.")
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # half a model, on a disk that may be full
        raise
    return out_dir


def _check_float16_range(name: str, tensor: torch.Tensor, cast: torch.Tensor) -> None:
    if cast.dtype == torch.float16 and not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
        largest = tensor.detach().abs().max().item()  # bf16 and fp32 reach 3e38; fp16 stops at 65504
        raise ExportError(f"export: {name} holds values up to {largest:.4g}, beyond float16's 65504: in fp16 they "
                          "would be inf and the model would give NaN. Fix: --dtype bf16 (export.dtype=bf16), which "
                          "has fp32's range, or fp32.")


def _write_tokenizer(folder: Path, tokenizer: Tokenizer, max_length: Optional[int],
                     bos: Optional[Tuple[int, str]]) -> None:
    text = tokenizer_as_read(Path(tokenizer.path), bos)
    if text is None:
        shutil.copyfile(tokenizer.path, folder / EXPORT_TOKENIZER)
    else:
        (folder / EXPORT_TOKENIZER).write_text(text, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
        "model_max_length": max_length, "clean_up_tokenization_spaces": False}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": tokenizer.eos_token}, indent=2))


def _write_hf_folder(tensors: Iterable[Tuple[str, torch.Tensor]], args: ModelArgs, out_dir: Path, tmp: Path,
                     tokenizer: Optional[Tokenizer], dtype: torch.dtype, max_shard_mb: int,
                     log: Callable[[str], None], bos: Optional[Tuple[int, str]] = None) -> None:
    from letrecipes.components.estimate import total_params

    config = hf_config(args, tokenizer, dtype)
    writer = ShardedWriter(tmp, max_shard_mb * 2**20)
    expected = total_params(args) * torch.empty((), dtype=dtype).element_size()
    progress = ByteProgress("export", f"converted into {out_dir}", expected, log)
    for name, tensor in tensors:
        cast = tensor.detach().to("cpu", dtype)
        _check_float16_range(name, tensor, cast)
        hf_name, hf_tensor = to_hf(name, cast, args)
        before = writer.total_bytes
        writer.add(hf_name, hf_tensor)
        progress.add(writer.total_bytes - before)
    writer.close()
    (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    generation = {"_from_model_config": True, "eos_token_id": config.get("eos_token_id")}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        _write_tokenizer(tmp, tokenizer, args.max_seq_len, bos)


def _write_transformers_folder(model: torch.nn.Module, tmp: Path, tokenizer: Optional[Tokenizer],
                               dtype: torch.dtype, max_shard_mb: int, bos: Optional[Tuple[int, str]]) -> None:
    """A model transformers runs (a GGUF file of a family not built here), under its own
    parameter names and config. Not by ``save_pretrained``: transformers refuses it for a
    model read from a GGUF file, dequantized (as teachers are) or not."""
    writer, seen = ShardedWriter(tmp, max_shard_mb * 2**20), set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied output head: transformers ties it again on load
            continue
        seen.add(tensor.data_ptr())
        cast = tensor.detach().to("cpu", dtype)
        _check_float16_range(name, tensor, cast)
        writer.add(name, cast)
    writer.close()
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF file's: these weights are plain tensors
    config["architectures"] = [type(model).__name__]  # transformers' GGUF reader leaves it unset
    config["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        _write_tokenizer(tmp, tokenizer, model.model_args.max_seq_len or None, bos)


def export_model(model: torch.nn.Module, args: ModelArgs, out_dir: Union[str, Path], tokenizer: Optional[Tokenizer],
                 dtype: torch.dtype = torch.bfloat16, max_shard_mb: int = DEFAULT_MAX_SHARD_MB, key: str = "export",
                 then: str = "run the same command again", step: Optional[int] = None,
                 bos: Optional[Tuple[int, str]] = None) -> Path:
    """Export a model held whole by this process (a single-process run)."""
    return write_hf_folder(model.state_dict().items(), args, out_dir, tokenizer, dtype, max_shard_mb, key=key,
                           then=then, step=step, bos=bos)


def checkpoint_tensors(checkpoint: Path, prefix: str = "model.model.") -> Iterator[Tuple[str, torch.Tensor]]:
    """The student's tensors of a DCP step checkpoint, read one at a time without a process
    group (peak memory: one tensor)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    names = sorted(k for k, v in metadata.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata))
    if not names:
        raise ExportError(f"export: {checkpoint} holds no student weights ({prefix}*). Fix: give a step checkpoint "
                          "folder written by letrecipes (<output_dir>/checkpoints/step_N).")
    for key in names:
        meta = metadata[key]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # torch warns of the single process that no_dist asks for
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({key: tensor}, checkpoint_id=str(checkpoint), no_dist=True)
        yield key[len(prefix):], tensor


def check_destination(out_dir: Path, overwrite: bool, source: Optional[Path] = None, key: str = "export",
                      then: str = "run the same command") -> None:
    """Refuse, before any work, an export folder whose replacement would lose something: a
    file, the model being read, or (even with ``overwrite``) a folder that is not an earlier
    export: ``export step_N . --overwrite`` must never delete the working directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export: {out_dir} is a file, not a folder. Fix: give a folder path (the export writes "
                          "config.json, the safetensors and the tokenizer into it).")
    if source is not None and out_dir.resolve() in (source.resolve(), *source.resolve().parents):
        raise ExportError(f"export: {out_dir} holds the model being exported ({source}). Fix: write the export to "
                          "another folder.")
    if source is not None and source.is_dir() and source.resolve() in out_dir.resolve().parents:
        raise ExportError(f"export: {out_dir} lies inside the model being exported ({source}): its files would "
                          "mix with the model's, and deleting that folder (keep_last_checkpoints prunes a checkpoint "
                          "whole) would delete the export with it. Fix: write the export to a folder outside it.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"export: {out_dir} exists and is not empty. Fix: choose another folder, or pass "
                          "--overwrite to replace it.")
    if not is_hf_folder(out_dir):
        raise ExportError(f"export: {out_dir} holds files that are not a model export ({first_names(out_dir)}); "
                          "--overwrite replaces only a folder an earlier export wrote. Fix: choose another folder, or "
                          "empty that one yourself.")
    from letrecipes.components.checkpointing import being_read

    if being_read(out_dir):  # before the conversion: at 7B it takes minutes
        raise ExportError(f"{key}: {out_dir} is being read by another process (an evaluation or an export holds it "
                          f"while it reads); replacing it would delete it under that reader. Fix: {then} once that "
                          "reader is done.")


def is_hf_folder(path: Union[str, Path]) -> bool:
    """A folder that ``AutoModelForCausalLM.from_pretrained`` can read as it is."""
    config = Path(path) / EXPORT_CONFIG
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def is_step_checkpoint(path: Union[str, Path]) -> bool:
    from letrecipes.components.checkpointing import STEP_PREFIX

    path = Path(path)
    return path.is_dir() and (path.name.startswith(STEP_PREFIX) or (path / ".metadata").is_file())


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (
        (path / "metrics.jsonl").exists() or (path / "run_info.json").exists())


def run_folder_hint(path: Path, key: str, source: Optional[str] = None, wants_model: bool = False) -> Optional[str]:
    """The error for a run folder (or, with ``wants_model``, a step checkpoint) given where a
    model folder is read: the path a user meant is almost always inside it."""
    source = source or str(path)
    if path.is_file() and is_step_checkpoint(path.parent):  # a shard or the marker, where its folder was meant
        return run_folder_hint(path.parent, key, wants_model=wants_model) or (
            f"{key}: {source!r} is one file of the step checkpoint {path.parent}. Fix: give the folder, "
            f"{path.parent}.")
    run = path if is_run_folder(path) else \
        path.parent if path.name == "checkpoints" and is_run_folder(path.parent) else None
    if run is not None:
        steps = sorted(p for p in (run / "checkpoints").glob("step_*") if is_step_checkpoint(p))
        final = run / "final"
        what = "a training run's folder" if run == path else "a training run's checkpoints folder"
        if wants_model:
            exported = run / "exported"
            fix = (f"{key}={final}, its exported model" if final.is_dir() else
                   f"export a checkpoint first: letrecipes export {steps[-1]} {exported}, then {key}={exported}"
                   if steps else "let the run finish (it exports final/) or point at another model")
            return f"{key}: {source!r} is {what}, not a model. Fix: {fix}."
        return (f"{key}: {source!r} is {what}, not a checkpoint. Fix: give one of its step checkpoints "
                f"({steps[-1] if steps else f'{run}/checkpoints/step_N'})"
                + (f", or use {final}, which is already a Hugging Face folder" if final.is_dir() else "") + ".")
    if wants_model and is_step_checkpoint(path):
        return (f"{key}: {source!r} is a training checkpoint (sharded DCP files), which is read only to resume. "
                f"Fix: letrecipes export {path} {path}-hf, then {key}={path}-hf.")
    return None


def export_teacher(source: Union[str, Path], out_dir: Union[str, Path], dtype: torch.dtype = torch.bfloat16,
                   overwrite: bool = False, max_shard_mb: int = DEFAULT_MAX_SHARD_MB, key: str = "export",
                   out_key: Optional[str] = None) -> Path:
    """Any model the teacher loaders read (a GGUF file, a pre-0.2 letrecipes export, a
    Llama-shaped Hugging Face folder) -> a Hugging Face folder. The model is held whole,
    in ``dtype``: these are teacher-sized models."""
    from letrecipes.components.teachers import load_teacher
    from letrecipes.components.transformers_teacher import FAMILY as TRANSFORMERS_FAMILY

    out_dir = Path(out_dir)
    check_destination(out_dir, overwrite, Path(source))
    name = next(k for k, v in DTYPES.items() if v == dtype)
    teacher = load_teacher({"_component_": "auto", "path": str(source), "dtype": name}, device="cpu",
                           key="checkpoint", path_key=key, computes=False)
    tokenizer = Tokenizer(teacher.tokenizer_path) if teacher.tokenizer_path is not None else None
    if teacher.model.model_args.family == TRANSFORMERS_FAMILY:
        return _write_atomically(out_dir, tokenizer, out_key or key, "run the same command again", None,
                                 lambda tmp: _write_transformers_folder(teacher.model, tmp, tokenizer, dtype,
                                                                        max_shard_mb, teacher.bos))
    return export_model(teacher.model, teacher.model.model_args, out_dir, tokenizer, dtype, max_shard_mb,
                        key=out_key or key, bos=teacher.bos)


def tokenizer_as_read(tokenizer_path: Path, bos: Optional[Tuple[int, str]]) -> Optional[str]:
    """An exported model's tokenizer.json, as text, made to encode a text as the model read
    its training windows: after ``bos``, or (a model trained here, ``bos`` None) after nothing;
    None where the file does that already. A student trained on windows without a BOS that
    kept Llama 3's tokenizer put ``<|begin_of_text|>`` before every prompt in transformers, a
    token whose embedding never trained; a GGUF file's model that reads one got a tokenizer
    (built from the file's vocabulary) that put none."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    from letrecipes.components.teachers import tokenizer_bos

    found = tokenizer_bos(tokenizer_path)
    if found == bos:
        return None
    if bos is not None:
        hf = HFTokenizer.from_file(str(tokenizer_path))
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos[1]} $A", pair=f"{bos[1]} $A {bos[1]}:1 $B:1", special_tokens=[(bos[1], bos[0])])
        return hf.to_str(pretty=True)
    spec = json.loads(Path(tokenizer_path).read_text(encoding="utf-8"))
    for node in _template_processors(spec.get("post_processor")):  # the BOS out of its templates, the rest kept
        for template in ("single", "pair"):
            node[template] = [item for item in node.get(template) or []
                              if item.get("SpecialToken", {}).get("id") != found[1]]
    text = json.dumps(spec, ensure_ascii=False, indent=2)
    return text if bos_id(HFTokenizer.from_str(text)) is None else None  # a processor of another kind: as it is


def _template_processors(node: Any) -> Iterator[Dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "TemplateProcessing":
            yield node
        for child in node.get("processors") or []:
            yield from _template_processors(child)


def existing_source(source: Union[str, Path], key: str = "export") -> Path:
    """``source`` (a step checkpoint, a run, a model folder or file) resolved as the teacher
    loaders resolve paths; where nothing is there, one error that names the fix (a run's step
    checkpoint that is gone: the ones its run still holds)."""
    from letrecipes.components.files import nearby
    from letrecipes.components.teachers import resolve_path

    path = resolve_path(str(source), key="checkpoint")
    if path.exists():
        return path
    from letrecipes.components.checkpointing import STEP_PREFIX, removed_checkpoint

    if path.parent.name == "checkpoints" and path.name.startswith(STEP_PREFIX) and \
            (path.parent.parent / "run_info.json").is_file():  # a run's step checkpoint, by its name
        raise ExportError(removed_checkpoint(path, key, "is not there: never saved, or removed by its run"))
    seen = nearby(path)
    raise ExportError(f"{key}: nothing at {str(source)!r}.{' ' + seen if seen else ''} Fix: give a step checkpoint "
                      "(<output_dir>/checkpoints/step_N), a .gguf file or a model folder.")


def export_any(source: Union[str, Path], out_dir: Union[str, Path], dtype: torch.dtype = torch.bfloat16,
               overwrite: bool = False, max_shard_mb: int = DEFAULT_MAX_SHARD_MB, key: str = "export",
               out_key: Optional[str] = None) -> Path:
    """``letrecipes export``: a step checkpoint (read tensor by tensor) or any model file the
    teacher loaders read -> a Hugging Face folder. ``key`` begins the errors about ``source``
    (the eval recipe's is ``checkpoint``), ``out_key`` those about writing ``out_dir`` (the
    eval's: ``export_dir``, or ``TMPDIR`` for its temporary copy); by default ``key`` too."""
    path = existing_source(source, key)
    if is_step_checkpoint(path):
        return export_checkpoint(path, out_dir, dtype, overwrite, max_shard_mb, key=key, out_key=out_key)
    hint = run_folder_hint(path, key, source=str(source))
    if hint:
        raise ExportError(hint)
    if is_hf_folder(path):
        from letrecipes.components.hf_teacher import by_transformers

        config = json.loads((path / EXPORT_CONFIG).read_text())
        if by_transformers(config):  # the converter writes letrecipes' decoder families only
            raise ExportError(f"{key}: {str(source)!r} is a Hugging Face folder already ({config['architectures'][0]}, "
                              "a family transformers runs): there is nothing to convert. Fix: use the folder as it is "
                              "(transformers, lm-eval and teacher.path read it).")
    return export_teacher(path, out_dir, dtype, overwrite, max_shard_mb, key=key, out_key=out_key)


def export_checkpoint(checkpoint: Union[str, Path], out_dir: Union[str, Path], dtype: torch.dtype = torch.bfloat16,
                      overwrite: bool = False, max_shard_mb: int = DEFAULT_MAX_SHARD_MB, key: str = "export",
                      verify: bool = True, then: str = "run the same command again",
                      out_key: Optional[str] = None) -> Path:
    """A DCP step checkpoint -> a Hugging Face folder, offline (``letrecipes export``).

    The model's shape and tokenizer come from the run's ``config.yaml`` (two folders up);
    tensors are read and written one at a time (peak memory: about one output shard).
    ``verify`` checks the files against the checkpoint's checksums first (a recipe
    exporting the checkpoint it has just written skips that).
    """
    from letrecipes.components.checkpointing import held_for_reading, is_complete

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    run_config = checkpoint.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ExportError(f"{key}: {run_config} (the run's config, which says the model's shape and tokenizer) "
                          "is missing. Fix: keep the checkpoint inside its run folder.")
    if not checkpoint.is_dir() or not is_complete(checkpoint):
        raise ExportError(f"{key}: {checkpoint} is not a complete step checkpoint (no COMPLETE marker or no DCP "
                          "metadata: its save never finished). Fix: give a folder like "
                          "<output_dir>/checkpoints/step_00000100 whose save completed.")
    with held_for_reading(checkpoint, key):  # a live run's rotation passes it over until this is done
        return _export_checkpoint(checkpoint, run_config, out_dir, dtype, overwrite, max_shard_mb, key, verify, then,
                                  out_key or key)


def _export_checkpoint(checkpoint: Path, run_config: Path, out_dir: Path, dtype: torch.dtype, overwrite: bool,
                       max_shard_mb: int, key: str, verify: bool, then: str, out_key: str) -> Path:
    from omegaconf import OmegaConf

    from letrecipes.components import registry
    from letrecipes.components.checkpointing import check_format, checkpoint_problems, step_of
    from letrecipes.components.models import model_max_seq_len, padded_vocab_size
    from letrecipes.components.tokenizer import load_tokenizer

    problems = checkpoint_problems(checkpoint) if verify else []
    if problems:  # before its format.json is read: a damaged one is said as damage
        raise ExportError(f"{key}: {checkpoint} is damaged: {'; '.join(problems[:3])}. Fix: export an older "
                          "checkpoint of the run (its checkpoints/ folder), one that verifies.")
    check_format(checkpoint)
    check_destination(out_dir, overwrite, checkpoint, key, then)
    from letrecipes.components.run_info import rebased_config

    # its relative paths as the run read them, wherever this runs from
    cfg = OmegaConf.create(rebased_config(run_config.parent, OmegaConf.to_container(OmegaConf.load(run_config),
                                                                                    resolve=True)))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.get("teacher"))
    with torch.device("meta"):
        model = registry.build("model", cfg.model, "model",
                               max_seq_len=model_max_seq_len(cfg.model, int(cfg.data.seq_len)),
                               vocab_size=cfg.model.get("vocab_size") or padded_vocab_size(tokenizer.vocab_size))
    return write_hf_folder(checkpoint_tensors(checkpoint), model.model_args, out_dir, tokenizer, dtype, max_shard_mb,
                           key=out_key, then=then, step=step_of(checkpoint))
