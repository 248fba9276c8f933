"""The keys the recipes read, their types and ranges: checked before anything is built.

A typo (``max_step``), a wrong type (``batch_size: sixteen``) or an impossible value
(``data.val_fraction: 1.5``) is one clear error naming the key and the fix, instead of a
traceback from deep inside torch minutes later. Sections that configure a component
(``model``, ``optimizer``, ``lr_scheduler``, ``teacher``, each part of ``alignment``) are
checked against the component's own arguments (:func:`check_components`, a user's
registered components included), also before anything is built.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from letrecipes.components.errors import LetRecipesError, closest_name
from letrecipes.components.registry import text_of_a_value


class ConfigValueError(LetRecipesError):
    pass


def _int(minimum: int, maximum: Optional[int] = None) -> Tuple[str, Callable[[Any], bool]]:
    text = f"an integer >= {minimum}" + (f" and <= {maximum:,}" if maximum is not None else "")
    return text, lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                            and (maximum is None or v <= maximum))


def _number(low: float, high: Optional[float] = None, open_low: bool = True) -> Tuple[str, Callable[[Any], bool]]:
    text = f"a number {'>' if open_low else '>='} {low}" + (f" and < {high}" if high is not None else "")
    return text, lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if open_low else v >= low)
                            and (high is None or v < high))


def _choice(*options) -> Tuple[str, Callable[[Any], bool]]:
    return f"one of {', '.join(map(str, options))}", lambda v: v in options


BOOL = ("true or false", lambda v: isinstance(v, bool))
TEXT = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
OPTIONAL_TEXT = ("a string or null", lambda v: v is None or isinstance(v, str))
SECTION = ("a mapping", lambda v: isinstance(v, dict))
ANY = ("anything", lambda v: True)
COMPONENT = ("a component name or a mapping with _component_",
             lambda v: (isinstance(v, str) and v != "") or (isinstance(v, dict) and bool(v.get("_component_"))))

TOP: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "output_dir": TEXT, "overwrite": BOOL, "seed": _int(0, 2**32 - 1),  # numpy's legacy seeding takes 32 bits
    "device": ("cpu, cuda or null", lambda v: v in (None, "cpu", "cuda")),
    "dtype": _choice("bf16", "bfloat16", "fp32", "float32", "auto"), "max_steps": _int(1), "save_every": _int(0),
    "resume": ("true, false or a checkpoint path", lambda v: isinstance(v, (bool, str))),
    "keep_last_checkpoints": ("an integer >= 1 (0 would keep none to resume from), or all (every checkpoint, as an "
                              "evaluation of each step wants)", lambda v: v == "all" or _int(1)[1](v)),
    "async_checkpoint": BOOL, "log_every": _int(1), "eval_every": _int(0),
    "eval_batches": _int(1), "imports": ("a list of module names", lambda v: v is None or isinstance(v, list)),
    "batch_size": _int(1), "gradient_accumulation_steps": _int(1), "loss_chunk_tokens": _int(0),
    "clip_grad_norm": ("a number > 0 or null", lambda v: v is None or _number(0)[1](v)),
    "compile": BOOL, "deterministic": BOOL, "cpu_malloc_tuning": BOOL, "memory_check": BOOL,
    "process_group_timeout_s": _int(1), "progress_bar": BOOL, "dry_run": BOOL, "dry_run_world_size": _int(1),
    "dry_run_interconnect_gbps": _number(0), "dry_run_intra_node_gbps": _number(0), "dry_run_gpus_per_node": _int(1),
    "dry_run_gpu_tflops": _number(0), "dry_run_mfu": _number(0, 1), "dry_run_gpu_memory_gib": _number(0),
    "init_from": OPTIONAL_TEXT,
    "metric_logger": ("a logger's short name (disk, stdout, wandb, tensorboard, comet, mlflow), a torchtune metric "
                      "logger ({_component_: wandb, project: ...}), or a list of them",
                      lambda v: v is None or all((isinstance(x, dict) and x.get("_component_"))
                                                 or (isinstance(x, str) and x != "")
                                                 for x in (v if isinstance(v, list) else [v]))),
    "tokenizer": SECTION, "data": SECTION, "model": SECTION, "optimizer": SECTION, "lr_scheduler": SECTION,
    "fsdp": SECTION, "float8": SECTION, "activation_checkpointing": SECTION, "metrics": SECTION,
    "divergence": SECTION, "debug": SECTION, "teacher": SECTION, "alignment": SECTION, "export": SECTION,
    "profiler": SECTION,
}
SECTIONS: Dict[str, Dict[str, Tuple[str, Callable[[Any], bool]]]] = {
    # either of source and sources may be null, the other naming the data (a null for both is "missing")
    "data": {"source": ("a path or a list of paths", lambda v: v is None or (isinstance(v, (str, list)) and bool(v))),
             "text_field": TEXT, "document_separator": OPTIONAL_TEXT, "drop_copies": BOOL,
             "seq_len": _int(2, 2**24),  # RoPE's table has a row per position
             "val_fraction": _number(0, 0.5, open_low=False), "cache_dir": TEXT,
             "val_source": ("a path or a list of paths", lambda v: v is None or (isinstance(v, (str, list)) and bool(v))),
             "prepare_workers": _int(1), "prepare_timeout_s": _number(0), "num_workers": _int(0),
             # each entry is checked by _check_sources, which names the entry and its key
             "sources": ("a list of {source, weight, name, text_field} mappings",
                         lambda v: v is None or (isinstance(v, list) and bool(v)))},
    "tokenizer": {"path": OPTIONAL_TEXT, "source": _choice("path", "teacher"), "eos_token": OPTIONAL_TEXT},
    "divergence": {"policy": _choice("stop", "skip"), "max_skips": _int(0)},
    "fsdp": {"enabled": ("auto, true or false", lambda v: v == "auto" or isinstance(v, bool)),
             "reshard_after_forward": BOOL, "replicate_degree": _int(1), "reduce_every_micro_batch": BOOL},
    "export": {"enabled": BOOL, "dtype": _choice("bf16", "bfloat16", "fp32", "float32", "fp16", "float16"),
               "max_shard_mb": _int(1)},
    "alignment": {"layer_map": (COMPONENT[0] + ", or a list of [student, teacher] layer pairs",
                                lambda v: COMPONENT[1](v) or (isinstance(v, list) and bool(v))),
                  "projector": COMPONENT, "loss": COMPONENT, "schedule": COMPONENT,
                  "pooling": COMPONENT, "cross_tokenizer": ("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))},
    "float8": {"enabled": BOOL, "recipe": _choice("tensorwise", "rowwise"), "fsdp_float8_all_gather": BOOL,
               "emulate": BOOL},
    "activation_checkpointing": {"mode": _choice("none", "full", "selective"), "every": _int(1)},
    "metrics": {"wandb": SECTION, "peak_tflops": ("a number > 0 or null", lambda v: v is None or _number(0)[1](v))},
    "profiler": {"enabled": BOOL, "first_step": _int(1), "steps": _int(1),
                 "ranks": ("a list of ranks or all", lambda v: v == "all" or (
                     isinstance(v, list) and bool(v) and all(_int(0)[1](r) for r in v))),
                 "record_shapes": BOOL, "profile_memory": BOOL, "with_stack": BOOL, "with_flops": BOOL},
    "debug": {"nan_loss_at_step": _int(1), "kill_at_step": _int(1), "kill_during_save_at_step": _int(1),
              "hang_at_step": _int(1), "sigterm_at_step": _int(1), "sigterm_during_save_at_step": _int(1),
              "slow_batches_s": _number(0), "slow_save_s": _number(0), "slow_export_s": _number(0), "rank": _int(0)},
}
TEACHER = {"path": TEXT, "dtype": _choice("bf16", "bfloat16", "fp32", "float32", "fp16", "float16", "auto"),
           "placement": _choice("replicated", "sharded"), "compile": BOOL, "shape": SECTION,
           "prepend_bos": ("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))}
REQUIRED = ("output_dir", "max_steps", "batch_size", "tokenizer", "data", "model", "optimizer", "lr_scheduler")
# The eval recipe's keys (recipes/configs/eval.yaml)
EVAL: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "checkpoint": TEXT, "tokenizer_path": OPTIONAL_TEXT,
    "tasks": ("a list of task files or lm-eval task names",
              lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    "task_data": ("a mapping of lm-eval task name to the folder of its data",
                  lambda v: isinstance(v, dict) and all(isinstance(x, str) and x for x in v.values())),
    "num_fewshot": _int(0),
    "perplexity": ("a list of held-out corpora (files or folders)",
                   lambda v: isinstance(v, list) and all(isinstance(t, str) and t for t in v)),
    "perplexity_documents": _int(0), "perplexity_text_field": TEXT,
    "limit": _int(0), "batch_size": ("an integer >= 1 or auto", lambda v: v == "auto" or _int(1)[1](v)),
    "max_len": ("an integer >= 2 or null", lambda v: v is None or _int(2)[1](v)),
    "dtype": _choice("bf16", "bfloat16", "fp32", "float32", "fp16", "float16", "auto"),
    "device": ("cpu, cuda or null", lambda v: v in (None, "cpu", "cuda")), "export_dir": OPTIONAL_TEXT,
    "output": OPTIONAL_TEXT, "overwrite": BOOL, "imports": ("a list of module names", lambda v: v is None or isinstance(v, list)),
    "contamination": ("auto, false, or a prepared folder or run output_dir (or a list of them)",
                      lambda v: v is False or (isinstance(v, str) and v != "")
                      or (isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v))),
    "contamination_ngram": _int(8), "contamination_workers": _int(1), "contamination_cache_dir": OPTIONAL_TEXT,
}


def is_eval_config(cfg: DictConfig) -> bool:
    return "tasks" in cfg and "checkpoint" in cfg and "model" not in cfg


def resolved(cfg: DictConfig) -> Dict[str, Any]:
    """The config as plain values, every ``${...}`` interpolation resolved; one that does
    not resolve (an unset environment variable, a key that does not exist) is one error
    naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        env = re.search(r"Environment variable '([^']+)' not found", cause)
        fix = (f"export {env.group(1)}=... before the run, or give {key} a value" if env
               else f"correct the ${{...}} in {key}, or give it a value")
        raise ConfigValueError(f"config key {key} does not resolve: {cause}. Fix: {fix}.") from None


# the eval recipe's keys as lm-evaluation-harness's command line and other evaluators spell them
EVAL_OTHER_NAMES = {
    **dict.fromkeys(("model", "model_path", "pretrained", "model_args", "model_name_or_path", "checkpoint_dir",
                     "checkpoint_path", "ckpt", "path"), "checkpoint"),
    **dict.fromkeys(("task", "task_names", "benchmarks"), "tasks"),
    **dict.fromkeys(("fewshot", "num_fewshots", "n_shot", "shots", "few_shot"), "num_fewshot"),
    **dict.fromkeys(("output_path", "output_file", "results_path", "out"), "output"),
    **dict.fromkeys(("tokenizer", "tokenizer_file"), "tokenizer_path"),
    **dict.fromkeys(("max_length", "max_seq_len", "seq_len", "context_length"), "max_len"),
    **dict.fromkeys(("data_dir", "task_data_dir", "dataset_path"), "task_data"),
}


def validate_eval(cfg: DictConfig) -> None:
    """The eval recipe's config: every key known, of its kind; checkpoint and tasks given."""
    values = resolved(cfg)
    for key in ("checkpoint", "tasks"):
        if key not in values:
            raise ConfigValueError(f"config key {key} is missing. Fix: add it (see recipes/configs/eval.yaml).")
    for key, value in values.items():
        if key not in EVAL:
            if key in EVAL_OTHER_NAMES:
                ours = EVAL_OTHER_NAMES[key]
                raise ConfigValueError(f"config key {key} is unknown. Did you mean {ours}? ({key} is what lm-eval or "
                                       f"other tools call it.) Fix: replace it with {ours}={_as_override(value)}.")
            raise _unknown(key, EVAL, "")
        if value is not None or key in ("checkpoint", "tasks"):
            _check("", key, value, EVAL[key])
    if not values["tasks"] and not values.get("perplexity"):
        raise ConfigValueError("config keys tasks and perplexity are both empty: nothing to score. Fix: tasks=[<task "
                               "file>, ...] (multiple choice) or perplexity=[<held-out corpus>, ...].")
    _check_path_values(values, eval_config=True)


SHELL_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _path_values(values: Dict[str, Any], eval_config: bool = False):
    """(key, value) of every string the recipes read as a path."""
    def listed(key, value):
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, str):
                yield (f"{key}[{i}]" if isinstance(value, list) else key), item

    if eval_config:
        for key in ("checkpoint", "tokenizer_path", "export_dir", "output", "tasks", "contamination", "perplexity",
                    "contamination_cache_dir"):
            yield from listed(key, values.get(key))
        for name, folder in (values.get("task_data") or {}).items():
            yield from listed(f"task_data.{name}", folder)
        return
    for key in ("output_dir", "init_from", "resume"):
        yield from listed(key, values.get(key))
    from letrecipes.components.metrics import metric_logger_entries
    from letrecipes.components.run_info import config_paths

    for section, key, name in config_paths(values):
        yield from listed(name, section[key])

    for logger in metric_logger_entries(values.get("metric_logger")):
        yield from listed("metric_logger.log_dir", logger.get("log_dir"))


def _check_path_values(values: Dict[str, Any], eval_config: bool = False) -> None:
    """A path this process cannot write as a file name (its locale's encoding lacks a
    character of it) is one line. So is ``output_dir: $SCRATCH/run`` in a YAML file: the
    literal text, the run would write into a folder named ``$SCRATCH`` under the working
    directory, and a corpus path would "not exist". OmegaConf reads the environment as
    ``${oc.env:SCRATCH}``. So with ``~/runs`` (also on a command line, where bash leaves
    ``data.source=~/x`` as it is)."""
    import os

    from letrecipes.components.files import LOCALE_FIX, names_encoding, unwritable_as_name

    for key, value in _path_values(values, eval_config):
        unwritable = unwritable_as_name(value)
        if unwritable is not None:  # else a UnicodeEncodeError traceback at the first mkdir or open
            raise ConfigValueError(
                f"config key {key}={value!r} cannot be a file name here: this process writes file names in "
                f"{names_encoding()}, which has no {unwritable!r}. Fix: {LOCALE_FIX}; or a name without those "
                "characters.")
        if value.startswith("~"):  # bash expands ~ only before a word or after name=, never inside a YAML value
            home = os.path.expanduser(value)
            expanded = (f"{key}={home}" if home != value else "the full path, from /")
            in_yaml = ("${oc.env:HOME}" + value[1:]) if value[1:2] in ("", "/") else None
            raise ConfigValueError(
                f"config key {key}={value!r} starts with ~, which a config does not expand (it would be read "
                f"as a file or folder named '~' in the working directory). Fix: write {expanded}"
                + (f", or {key}={in_yaml} in a YAML file." if in_yaml else "."))
        found = SHELL_VARIABLE.search(value)
        if found is None:
            continue
        name = found[1]
        now = (f"here {name}={os.environ[name]!r}" if name in os.environ else f"{name} is not set here either")
        fixed = SHELL_VARIABLE.sub(lambda m: "${oc.env:" + m[1] + "}", value)
        raise ConfigValueError(
            f"config key {key}={value!r} holds ${name}, a shell variable, which a config does not expand (the path "
            f"would be read as the literal text '${name}'; {now}). Fix: write {key}={fixed} (OmegaConf reads the "
            "environment; on a command line, in single quotes), or the path itself.")


# Keys as other trainers spell them (Hugging Face Trainer and TRL, nanoGPT, torchtune, torchtitan,
# Megatron, Lightning), by what they mean: spelling alone points `checkpoint_every` at
# async_checkpoint and `lr`, `block_size` or `hidden_size` nowhere. A value: the key it becomes.
OTHER_NAMES: Dict[str, str] = {
    **dict.fromkeys(("save_steps", "checkpoint_every", "checkpoint_interval", "save_interval", "ckpt_every",
                     "save_freq", "save_every_n_steps", "checkpoint_every_n_steps"), "save_every"),
    **dict.fromkeys(("logging_steps", "log_interval", "log_every_n_steps", "log_freq", "log_steps"), "log_every"),
    **dict.fromkeys(("eval_steps", "eval_interval", "eval_freq", "val_check_interval", "eval_every_n_steps",
                     "validation_interval"), "eval_every"),
    **dict.fromkeys(("eval_iters", "eval_steps_count", "val_batches", "limit_val_batches"), "eval_batches"),
    **dict.fromkeys(("max_iters", "num_steps", "total_steps", "train_steps", "training_steps", "steps",
                     "num_train_steps", "train_iters", "max_train_steps", "total_iters"), "max_steps"),
    **dict.fromkeys(("save_total_limit", "keep_checkpoints", "max_checkpoints", "keep_latest_k", "keep_last_n",
                     "max_checkpoints_to_keep"), "keep_last_checkpoints"),
    **dict.fromkeys(("max_grad_norm", "grad_clip", "gradient_clipping", "clip_grad", "gradient_clip_val",
                     "clip_grad_norm_"), "clip_grad_norm"),
    **dict.fromkeys(("per_device_train_batch_size", "micro_batch_size", "train_batch_size", "local_batch_size",
                     "batch_size_per_device", "micro_batch"), "batch_size"),
    **dict.fromkeys(("grad_accum_steps", "gradient_accumulation", "accumulate_grad_batches", "grad_accum",
                     "gradient_accumulation_step"), "gradient_accumulation_steps"),
    **dict.fromkeys(("out_dir", "output_path", "save_dir", "checkpoint_dir", "ckpt_dir", "run_dir", "outdir",
                     "log_dir", "dump_folder"), "output_dir"),
    **dict.fromkeys(("resume_from_checkpoint", "resume_from", "resume_checkpoint", "auto_resume"), "resume"),
    **dict.fromkeys(("torch_compile", "use_compile", "compile_model"), "compile"),
    **dict.fromkeys(("random_seed", "seed_everything", "data_seed"), "seed"),
    **dict.fromkeys(("report_to", "wandb_log", "wandb", "logger", "loggers", "tracker"), "metric_logger"),
    **dict.fromkeys(("learning_rate", "lr", "max_lr", "peak_lr"), "optimizer.lr"),
    "weight_decay": "optimizer.weight_decay", "betas": "optimizer.betas",
    **dict.fromkeys(("adam_beta1", "adam_beta2", "beta1", "beta2"), "optimizer.betas"),
    **dict.fromkeys(("warmup_steps", "warmup_iters", "num_warmup_steps", "warmup", "lr_warmup_steps"),
                    "lr_scheduler.warmup_steps"),
    **dict.fromkeys(("min_lr", "min_lr_ratio", "lr_decay_min"), "lr_scheduler.min_lr_ratio"),
    **dict.fromkeys(("seq_len", "seq_length", "block_size", "max_seq_len", "max_seq_length", "context_length",
                     "sequence_length", "max_length", "ctx_len"), "data.seq_len"),
    **dict.fromkeys(("dataset", "data_path", "dataset_path", "train_data", "data_dir", "train_file", "train_files",
                     "dataset_name", "corpus", "source"), "data.source"),
    **dict.fromkeys(("num_workers", "dataloader_num_workers"), "data.num_workers"),
    **dict.fromkeys(("tokenizer_path", "tokenizer_name", "tokenizer_file"), "tokenizer.path"),
    **dict.fromkeys(("teacher_path", "teacher_model", "teacher_model_name_or_path", "teacher_checkpoint"),
                    "teacher.path"),
    **dict.fromkeys(("gradient_checkpointing", "enable_activation_checkpointing", "activation_checkpoint"),
                    "activation_checkpointing.mode"),
    **dict.fromkeys(("bf16", "fp16", "mixed_precision", "precision", "torch_dtype"), "dtype"),
    **dict.fromkeys(("epochs", "num_train_epochs", "max_epochs", "num_epochs", "max_steps_per_epoch"), "max_steps"),
    **dict.fromkeys(("run_val_every_n_steps", "val_every_n_steps"), "eval_every"),
    **dict.fromkeys(("data_parallel_replicate_dim", "data_parallel_replicate_degree"), "fsdp.replicate_degree"),
    **dict.fromkeys(("data.path", "data.dataset", "data.files", "data.data_files", "data.train_files",
                     "data.data_dir", "data.dataset_path", "data.paths"), "data.source"),
    **dict.fromkeys(("data.block_size", "data.max_seq_len", "data.seq_length", "data.max_seq_length",
                     "data.context_length", "data.sequence_length", "data.max_length"), "data.seq_len"),
    **dict.fromkeys(("data.text_column", "data.column", "data.field", "data.dataset_text_field", "data.text_key",
                     "data.column_name", "data.text_col"), "data.text_field"),
    "data.micro_batch_size": "batch_size",
    **dict.fromkeys(("data.eos_token", "data.eos"), "tokenizer.eos_token"),
    **dict.fromkeys(("data.tokenizer", "data.tokenizer_path"), "tokenizer.path"),
    **dict.fromkeys(("data.workers", "data.dataloader_num_workers"), "data.num_workers"),
    **dict.fromkeys(("tokenizer.name", "tokenizer.tokenizer_path", "tokenizer.file", "tokenizer.name_or_path",
                     "tokenizer.pretrained_model_name_or_path"), "tokenizer.path"),
    **dict.fromkeys(("teacher.model", "teacher.name", "teacher.checkpoint", "teacher.model_name_or_path",
                     "teacher.checkpoint_dir", "teacher.pretrained_model_name_or_path", "teacher.model_path"),
                    "teacher.path"),
    **dict.fromkeys(("teacher.torch_dtype", "teacher.precision"), "teacher.dtype"),
    **dict.fromkeys(("fsdp.replicate", "fsdp.dp_replicate", "fsdp.data_parallel_replicate_degree",
                     "fsdp.num_replicas"), "fsdp.replicate_degree"),
    **dict.fromkeys(("float8.enable", "float8.use_float8"), "float8.enabled"),
    **dict.fromkeys(("activation_checkpointing.enabled", "activation_checkpointing.enable", "ac_mode"),
                    "activation_checkpointing.mode"),
    "ac_option": "activation_checkpointing.every",
    "datasets": "data.sources",
}


# keys of torchtune's recipes (and other trainers) for what letrecipes does otherwise or not at all:
# what the key is there, and the line to write here
NOT_HERE: Dict[str, str] = {
    "loss": "torchtune's language-model loss; here that loss is always cross-entropy, taken from the output layer in "
            "chunks when loss_chunk_tokens is set (as torchtune's CEWithChunkedOutputLoss does), and alignment.loss "
            "is LET's term. Fix: remove it; loss_chunk_tokens=1024 for the chunked form",
    "optimizer_in_bwd": "torchtune's optimizer step inside the backward pass, which keeps no gradients; here they "
                        "are kept for clip_grad_norm, gradient_accumulation_steps and the logged grad_norm. Fix: remove "
                        "it; FSDP2 (fsdp.enabled) divides gradients over the processes",
    "enable_activation_offloading": "torchtune's offload of activations to CPU memory, which letrecipes does not do. "
                                    "Fix: remove it; activation_checkpointing.mode=full (or selective) saves "
                                    "activation memory",
    "fsdp_cpu_offload": "FSDP2's offload of parameters to CPU memory, which letrecipes does not do. Fix: remove it; "
                        "more processes (FSDP2 divides weights over them), activation_checkpointing.mode=full or a "
                        "smaller batch_size; `dry_run=true` prints the memory per GPU",
    "custom_sharded_layers": "torchtune's list of extra FSDP2 units; here each block is a unit and the root (embedding, "
                             "final norm, output head) another. Fix: remove it",
    "shuffle": "a dataset's shuffle switch; here training sequences are always read in a permutation drawn from seed, "
               "which a resume continues. Fix: remove it; seed=<n> for another order",
    "checkpointer": "torchtune's checkpointer, which reads and writes model weights; here step checkpoints are DCP "
                    "folders in <output_dir>/checkpoints (resume=true reads them), the final model is written in "
                    "Hugging Face format, and init_from starts a run from a model's weights. Fix: remove it; "
                    "init_from=<a model folder or file> to start from weights (docs/configs.md)",
    **dict.fromkeys(("tensor_parallel_dim", "tensor_parallel_plan", "tensor_parallel_degree", "context_parallel_dim",
                     "context_parallel_degree", "pipeline_parallel_degree"),
                    "a model-parallel setting, which letrecipes does not have: it shards with FSDP2, and with HSDP "
                    "across nodes (fsdp.replicate_degree). Fix: remove it"),
    "log_peak_memory_stats": "torchtune's switch for memory logs; here every log record has peak_memory_mb. Fix: "
                             "remove it",
    # torchtune's knowledge-distillation recipe, the nearest thing it has to LET
    "teacher_model": "the teacher's architecture as torchtune builds it; here the teacher is read from its files, "
                     "architecture and weights together. Fix: remove it; teacher.path={checkpoint_dir}",
    "teacher_checkpointer": "torchtune's reader of the teacher's weights; here teacher.path names the teacher's "
                            "folder or file (Hugging Face, GGUF or a letrecipes export). Fix: replace it with "
                            "teacher.path={checkpoint_dir}",
    "kd_loss": "torchtune's distillation loss over logits; LET aligns hidden states instead (alignment.loss, "
               "negative_cosine by default), and alignment.loss=kl_logits distils logits as kd_loss does. Fix: remove "
               "it; alignment.loss=kl_logits for logit distillation",
    "kd_ratio": "torchtune's fixed weight of the distillation loss, (1 - kd_ratio) x ce + kd_ratio x kd; here the loss "
                "is nll + lambda x alignment, and alignment.schedule gives lambda at each step (0 from its stop on, "
                "where the teacher is released). Fix: remove it; alignment.schedule._component_=constant "
                "alignment.schedule.lambda0=<lambda> for a fixed weight (docs/configs.md)",
    **dict.fromkeys(("save_adapter_weights_only", "lora_rank", "lora_alpha", "lora_attn_modules"),
                    "a LoRA setting; letrecipes pretrains every weight and has no adapters. Fix: remove it"),
    "quantizer": "torchtune's quantization-aware training; here float8.enabled trains the blocks' matmuls in float8. "
                 "Fix: remove it",
    **dict.fromkeys(("enable_kv_cache", "temperature", "top_k", "top_p", "prompt", "max_new_tokens",
                     "max_generated_tokens"),
                    "a generation setting; letrecipes trains, and its final model is a Hugging Face folder that "
                    "transformers' generate() reads (docs/guide.md). Fix: remove it"),
    **dict.fromkeys(("tasks", "limit"), "an evaluation setting: the eval recipe takes it (tune run letrecipes/eval "
                                        "--config eval, docs/evaluation.md). Fix: remove it here"),
    "memory_efficient_fsdp_wrap": "torchtune's FSDP units for the embedding and output head; here the root unit holds "
                                  "them. Fix: remove it",
    "low_cpu_ram": "torchtune's low-memory loading of a checkpoint for QLoRA, which letrecipes does not have. Fix: "
                   "remove it",
    "dataloader": "torchtune's data loader section; here data.num_workers sets the loader's processes and batch_size "
                  "its micro-batch. Fix: remove it",
    "collate_fn": "a dataset's batching function; here training sequences are packed to data.seq_len tokens, "
                  "documents ended by EOS. Fix: remove it",
}


def _fix_for_other_name(name: str, ours: str, value: Any) -> str:
    """The line a user writes instead, from the value they gave where it carries over."""
    if ours == "max_steps" and "epoch" in name:
        return ("max_steps=<steps>: a run counts steps, not epochs (one step reads batch_size x "
                "gradient_accumulation_steps x data.seq_len tokens on each process; the log names the step at which "
                "each epoch begins)")
    if ours == "dtype":
        if name == "fp16" or str(value).lower() in ("fp16", "float16", "16", "16-mixed", "half"):
            return "dtype=bf16 (float16 would need loss scaling, which letrecipes does not do; bf16 does not)"
        return "dtype=bf16 (or fp32)" if value in (True, False, None) or name in ("bf16",) else f"dtype={value}"
    if ours == "activation_checkpointing.mode":
        return ("activation_checkpointing.mode=full" if value not in (False, "none", None, 0)
                else "activation_checkpointing.mode=none")
    if ours == "optimizer.betas":
        return "optimizer.betas=[beta1, beta2] (both in one list, like [0.9, 0.95])"
    if ours == "resume":
        return ("resume=true (the newest sound checkpoint in output_dir), or resume=<a step checkpoint's folder>"
                if value in (True, None, "", "latest", "auto") else f"resume={value}")
    if ours == "metric_logger":
        return "metric_logger=wandb (or disk, stdout, tensorboard, comet, mlflow, or a list of them)"
    if ours == "lr_scheduler.min_lr_ratio" and name != "min_lr_ratio":
        return "lr_scheduler.min_lr_ratio=<the final LR as a fraction of optimizer.lr, like 0.1>"
    if value is None or isinstance(value, (dict, list)):
        return f"{ours}=<value>"
    return f"{ours}={_as_override(value)}"


def _as_override(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _component_arguments(values: Dict[str, Any]) -> Dict[str, list]:
    """The arguments the config's model, optimizer and LR schedule take, by section, and those
    of its alignment components (``alignment.schedule``: its stop, ...). Those that do not
    resolve are left to check_components, which names them."""
    from letrecipes.components import registry

    alignment = values.get("alignment") if isinstance(values.get("alignment"), dict) else {}
    taken = {}
    for key, kind, spec in [*((key, kind, values.get(key)) for key, kind in COMPONENTS.items()),
                            *((f"alignment.{key}", kind, alignment.get(key)) for key, kind in ALIGNMENT_COMPONENTS.items()
                              if kind != "layer_map")]:
        name = spec if isinstance(spec, str) else spec.get("_component_") if isinstance(spec, dict) else None
        try:
            factory = registry.resolve(kind, name, key=f"{key}._component_") if isinstance(name, str) else None
            taken[key] = [n for n in registry.named_arguments(registry.signature(factory).parameters)
                          if n not in registry.FILLED_BY_THE_RECIPE] if factory else []
        except Exception:  # an unknown or broken component: check_components says so in its own words
            taken[key] = []
    return taken


def _homes(name: str, values: Optional[Dict[str, Any]]) -> list:
    """Every place of the config where a key ``name`` belongs: a section's key, the teacher's,
    or an argument of one of the config's components."""
    homes = [f"{section}.{name}" for section, keys in SECTIONS.items() if name in keys]
    homes += [f"teacher.{name}"] if name in TEACHER else []
    homes += [f"{section}.{name}" for section, taken in _component_arguments(values or {}).items() if name in taken]
    return homes


def _other_name(full_key: str, value: Any, values: Optional[Dict[str, Any]] = None) -> Optional[ConfigValueError]:
    """An unknown key that another trainer spells so, or one of ours one level off (a top-level
    key inside a section, a section's key or a component's argument at the top): the key it
    means, and the line to write."""
    if full_key in NOT_HERE:
        folder = value.get("checkpoint_dir") if isinstance(value, dict) else None
        return ConfigValueError(f"config key {full_key} is "
                                f"{NOT_HERE[full_key].replace('{checkpoint_dir}', folder or '<its folder>')}.")
    ours = OTHER_NAMES.get(full_key)
    if ours is None:
        where, _, name = full_key.rpartition(".")
        if where and name in TOP and TOP[name] is not SECTION:
            ours = name  # data.batch_size, model.dtype: a top-level key inside a section
        else:  # `replicate_degree` alone, `teacher.layer_map`, `optimizer.warmup_steps`: where it belongs
            homes = [home for home in _homes(name, values) if home.rpartition(".")[0] != where]
            if where and len(homes) > 2:  # optimizer.enabled: a name of too many places to point at one
                return None
            if len(homes) > 1:  # `enabled`: fsdp's, float8's, ...
                return ConfigValueError(f"config key {full_key} is unknown{'' if where else ' at the top level'}. "
                                        f"Did you mean {' or '.join(homes)}? Fix: replace it with the one you mean, "
                                        f"like {homes[0]}={_as_override(value)}.")
            ours = homes[0] if homes else None
    if ours is None:
        return None
    name = full_key.rpartition(".")[2]
    why = (f"{full_key} is what other trainers call it" if full_key in OTHER_NAMES else
           f"{ours} is a top-level key" if "." not in ours else f"{name} belongs in {ours.rpartition('.')[0]}")
    return ConfigValueError(f"config key {full_key} is unknown. Did you mean {ours}? ({why}.) Fix: replace it with "
                            f"{_fix_for_other_name(name, ours, value)}.")


# torchtune's profiler section (setup_torch_profiler) counts a schedule from the launch's first step
TORCHTUNE_PROFILER_KEYS = ("_component_", "output_dir", "cpu", "cuda", "xpu", "wait_steps", "warmup_steps",
                           "active_steps", "num_cycles")


def _unknown(key: str, known, where: str) -> ConfigValueError:
    if where == "profiler." and key in TORCHTUNE_PROFILER_KEYS:
        return ConfigValueError(
            f"config key profiler.{key} is torchtune's (setup_torch_profiler); here the profiler traces the run's own "
            "steps, whichever launch reaches them, into <output_dir>/profile, on the GPU when the run has one. Fix: "
            "remove it; profiler.first_step=<the first step to trace> (torchtune's wait_steps + warmup_steps + 1) "
            "and profiler.steps=<how many> (its active_steps) say what is traced (docs/configs.md).")
    if key == "_component_":  # torchtune's configs build their tokenizer and dataset from components
        return ConfigValueError(f"config key {where}{key}: the {where.rstrip('.') or 'top'} section builds no component "
                                f"here (its keys: {', '.join(sorted(known))}). Fix: remove it"
                                + ("; the tokenizer is a Hugging Face tokenizer.json named by tokenizer.path (torchtune's "
                                   "tokenizer.model files: docs/guide.md)." if where == "tokenizer." else "."))
    name, colon, value = str(key).partition(":")
    if colon and name.strip() in known:  # YAML's {source:/data/a}: with no space after the colon, one key
        return ConfigValueError(f"config key {where}{key} is unknown: YAML reads '{key}' as one key, as the colon has "
                                f"no space after it. Fix: write '{name.strip()}: {value.strip()}' (a space after the "
                                "colon).")
    close = closest_name(key, known)
    hint = f" Did you mean {where}{close}?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigValueError(f"config key {where}{key} is unknown.{hint} Fix: correct or remove it.")


def _null_refused(section: str, key: str, spec) -> ConfigValueError:
    return ConfigValueError(f"config key {section}.{key} is null, and it takes {spec[0]}. Fix: remove it for its "
                            f"default (~{section}.{key} on the command line), or give it a value.")


def _takes_null(spec) -> bool:
    if spec is SECTION:
        return True  # a section's own keys are checked one by one
    try:
        return spec[1](None) is True
    except Exception:  # a check written for values only (len(), comparisons)
        return False


def _check(where: str, key: str, value: Any, spec) -> None:
    text, ok = spec
    if not ok(value):
        # `key=[SEP]` on a command line is a list to omegaconf: the string needs its own quotes
        quoting = (f" (a value in brackets is read as a list: quote it, '{where}{key}=\"[{value[0]}]\"')"
                   if "string" in text and isinstance(value, (list, ListConfig)) and len(value) == 1 else "")
        if text.startswith("an integer") and isinstance(value, float) and value.is_integer() and ok(int(value)):
            # YAML reads 1e5 and 1000.0 as floats
            raise ConfigValueError(f"config key {where}{key}={value!r} must be an integer (YAML reads 1e5 or "
                                   f"{int(value)}.0 as a float). Fix: write it as {where}{key}={int(value)}.")
        said = _value_meant(where + key, value) or text_of_a_value(where + key, value, ok)
        if said:
            raise ConfigValueError(f"config key {where}{key}={value!r} must be {text}: {said}")
        meant = next((v for v in (value.strip().lower(), value.strip()) if ok(v)), None) \
            if isinstance(value, str) else None
        if meant is not None:  # CPU, BF16, Full, ' sharded': the value with another case or stray spaces
            raise ConfigValueError(f"config key {where}{key}={value!r} must be {text}: values are lowercase, without "
                                   f"spaces. Fix: {where}{key}={meant}.")
        raise ConfigValueError(f"config key {where}{key}={value!r} must be {text}{quoting}. Fix: set {where}{key} to "
                               f"{re.sub(r' [(][^()]*[)]', '', text)}.")  # the reasons were said once


def _value_meant(key: str, value: Any) -> Optional[str]:
    """For a refused value that other trainers accept (``device=cuda:1``, ``dtype=fp16``),
    why it is not one here and what does the same; None for any other."""
    said = str(value).strip().lower()
    if key in ("device", "eval.device") or key.endswith(".device"):
        if said.startswith("cuda:") or said.isdigit():
            return ("a process uses one GPU, chosen by CUDA_VISIBLE_DEVICES (torchrun gives each process of "
                    "--nproc_per_node its own). Fix: device=cuda, with CUDA_VISIBLE_DEVICES="
                    f"{said.rpartition(':')[2]} before the command.")
        if said in ("gpu", "cuda0", "nvidia"):
            return "Did you mean cuda? Fix: device=cuda."
        if said in ("mps", "xpu", "tpu", "xla", "hpu", "npu", "rocm", "hip"):
            return (f"{value} is not a device these recipes run on (their FSDP2, float8 and NCCL paths are CUDA's; "
                    "torch's ROCm build is device=cuda too). Fix: device=cpu, or device=cuda on an NVIDIA or AMD GPU.")
    if key == "dtype" and said in ("fp16", "float16", "half", "16", "16-mixed"):
        return ("fp16 training needs loss scaling, which the recipes do not do (bf16 has fp32's range and needs "
                "none). Fix: dtype=bf16; on a GPU without bf16 (before NVIDIA's Ampere), dtype=fp32.")
    if key == "dtype" and said in ("fp8", "float8", "e4m3", "float8_e4m3fn"):
        return ("float8 is float8.enabled=true (torchao's float8 matmuls inside bf16 autocast). Fix: dtype=bf16 "
                "float8.enabled=true.")
    return None


SOURCE_ENTRY = {"source": ("a path or a list of paths", lambda v: isinstance(v, (str, list)) and bool(v)),
                "weight": ("a number >= 0 (0 leaves the source out)",
                           lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
                "name": TEXT, "text_field": TEXT}


def _check_sources(entries: list) -> None:
    """``data.sources``, entry by entry: the error names ``data.sources[i].key``."""
    for i, entry in enumerate(entries):
        where = f"data.sources[{i}]."
        if not isinstance(entry, dict):
            raise ConfigValueError(f"config key data.sources[{i}]={entry!r} must be a mapping {{source, weight, name, "
                                   f"text_field}}. Fix: write it as {{source: {entry!r}, weight: 1.0}}.")
        for key, value in entry.items():
            if key not in SOURCE_ENTRY:
                raise _unknown(key, SOURCE_ENTRY, where)
            _check(where, key, value, SOURCE_ENTRY[key])
        if not entry.get("source"):
            raise ConfigValueError(f"config key {where}source is missing. Fix: give each entry of data.sources the "
                                   "corpus it reads (source: /data/corpus).")


def validate(cfg: DictConfig, with_teacher: bool = True) -> None:
    """Raise :class:`ConfigValueError` (or the registry's ``ComponentError``) for the first
    unknown key, wrong type or bad value, component arguments included. ``with_teacher``:
    the recipe reads the ``teacher`` and ``alignment`` sections (LET; plain pretraining
    ignores them)."""
    values = resolved(cfg)
    for key in REQUIRED:
        if key not in values and not values.get("dry_run"):
            raise ConfigValueError(f"config key {key} is missing. Fix: add it (see docs/configs.md).")
    if with_teacher:
        missing = [key for key in ("teacher", "alignment") if not values.get(key)]
        if missing:
            raise ConfigValueError(f"config key {missing[0]} is missing: the LET recipe trains against a teacher and "
                                   "needs a teacher and an alignment section. Fix: start from a LET config (let_tiny, "
                                   "let_1b4, let_7b), or run letrecipes/pretrain for plain pretraining.")
    for key, value in values.items():
        if key not in TOP:
            raise _other_name(key, value, values) or _unknown(key, TOP, "")
        _check("", key, value, TOP[key])
        for inner, inner_value in (value.items() if key in SECTIONS else ()):
            if inner not in SECTIONS[key]:
                raise _other_name(f"{key}.{inner}", inner_value, values) or _unknown(inner, SECTIONS[key], f"{key}.")
            if inner_value is None and key != "tokenizer" and not _takes_null(SECTIONS[key][inner]):
                # read as "its default" by some of the code and as a value by the rest: int(None) tracebacks
                raise _null_refused(key, inner, SECTIONS[key][inner])
            _check(f"{key}.", inner, inner_value, SECTIONS[key][inner])
    data = values.get("data") or {}
    if data.get("sources"):
        _check_sources(data["sources"])
    if data.get("source") and data.get("sources"):
        raise ConfigValueError("config keys data.source and data.sources are both set. Fix: keep one (on the command "
                               "line, `~data.source` removes the config file's data.source).")
    if data.get("val_fraction") == 0 and values.get("eval_every") and not data.get("val_source"):
        raise ConfigValueError(f"config key eval_every={values['eval_every']} evaluates on the validation split, but "
                               "data.val_fraction is 0 (no validation split). Fix: eval_every=0 to train on all the "
                               "data, a data.val_fraction above 0, or a held-out corpus as data.val_source.")
    if "data" in values and not (data.get("source") or data.get("sources")) and not values.get("dry_run"):
        raise ConfigValueError("config key data.source is missing. Fix: set data.source (a corpus or a prepared "
                               "folder) or data.sources (a mixture; docs/data.md).")
    profiler = values.get("profiler") or {}
    if profiler.get("enabled") and int(profiler.get("first_step", 10)) > int(values.get("max_steps", 0) or 0) > 0:
        raise ConfigValueError(f"config key profiler.first_step={profiler.get('first_step', 10)} is past "
                               f"max_steps={values['max_steps']}: nothing would be traced. Fix: a profiler.first_step "
                               f"of {values['max_steps']} or less (after the first steps, which compile and warm up).")
    _check_path_values(values)
    _check_outputs_outside_sources(values)
    _check_inputs_outside_what_the_run_replaces(values)
    check_components(values, with_teacher)


# section key -> registry kind, for the parts built from a `_component_`
COMPONENTS = {"model": "model", "optimizer": "optimizer", "lr_scheduler": "lr_scheduler"}
ALIGNMENT_COMPONENTS = {"layer_map": "layer_map", "projector": "projector", "loss": "alignment_loss",
                        "schedule": "schedule", "pooling": "pooling"}


def _torchtune_model_builder(name: str, factory) -> ConfigValueError:
    """torchtune's builders fix a shape and build torchtune's model; a student here is built
    from shape keys, which its checkpoints, LET's layer choice and the export read back."""
    from letrecipes.components.models import torchtune_builder_equivalent

    equivalent = torchtune_builder_equivalent(factory)
    fix = (f"model: {equivalent} (its shape, read from the builder; the vocabulary follows tokenizer.path, and "
           "RoPE scaling, which pretraining from scratch does not need, is not carried)") if equivalent else \
        "model: {_component_: llama, num_layers: ..., num_heads: ..., embed_dim: ...} (docs/configs.md)"
    return ConfigValueError(f"config key model._component_={name!r} is a torchtune model builder; letrecipes "
                            f"builds its students from shape keys. Fix: {fix}.")


def _check_outputs_outside_sources(values: Dict[str, Any]) -> None:
    """A run's folders must not lie inside a corpus folder it reads: the next launch would
    read its own checkpoints, metrics and export (or the token cache) as training text,
    and a resume would find the corpus changed."""
    import glob
    import os

    from letrecipes.components.corpus import is_token_shards

    data = values.get("data") or {}
    sources = [e.get("source") for e in data.get("sources") or [] if isinstance(e, dict)] or [data.get("source")]
    folders = []
    for source in sources:
        for item in (source if isinstance(source, list) else [source]):
            # a glob reads only what it matches, and a prepared folder is read through its manifest
            if isinstance(item, str) and item and not glob.has_magic(item):
                path = Path(os.path.abspath(os.path.expanduser(item)))
                if path.is_dir() and not is_token_shards(path):
                    folders.append(path)
    written = {"output_dir": values.get("output_dir"), "data.cache_dir": data.get("cache_dir", "outputs/cache")}
    for key, folder in written.items():
        if not isinstance(folder, str) or not folder:
            continue
        target = Path(os.path.abspath(os.path.expanduser(folder)))
        for source in folders:
            if target == source or source in target.parents:
                raise ConfigValueError(
                    f"config key {key}={folder!r} lies inside the corpus folder data.source={str(source)!r}: what the "
                    "run writes there (checkpoints, metrics, the export, token caches) would be read as training text "
                    f"by its next launch, and a resume would find the corpus changed. Fix: put {key} outside it.")


def _check_inputs_outside_what_the_run_replaces(values: Dict[str, Any]) -> None:
    """A teacher, tokenizer, init_from or corpus inside ``<output_dir>/final`` or its
    ``checkpoints``: the run deletes or replaces those (its export, old checkpoints, all of
    them with overwrite=true, before the export reads the tokenizer file), so an input there
    is lost, or changes under a resume."""
    import os

    output_dir = values.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        return
    run = Path(os.path.abspath(output_dir))
    replaced = [run / "final", run / "checkpoints"]
    for key, value in _path_values(values):
        if key in ("output_dir", "resume", "data.cache_dir", "metric_logger.log_dir") or value.startswith("pkg:"):
            continue
        path = Path(os.path.abspath(value))
        for folder in replaced:
            if path == folder or folder in path.parents:
                where = "is" if path == folder else "lies inside"
                raise ConfigValueError(
                    f"config key {key}={value!r} {where} {folder}, which this run (output_dir={output_dir!r}) "
                    f"{'replaces with its own export' if folder.name == 'final' else 'deletes checkpoints from'}: "
                    f"what {key} names would be lost, or change under a resume. Fix: copy it out of the run folder "
                    f"(cp -r {folder} <elsewhere>) and point {key} there, or choose another output_dir.")


def _rehearse_model(values: Dict[str, Any]) -> None:
    """The student built as the recipe builds it, on the meta device (no memory, 0.2 s for
    let_7b): a head count that does not divide the width, KV heads that do not divide the
    heads, ``init_std=0`` passed `letrecipes validate` and were refused by the run. A recipe
    builds it on the meta device once more for its memory check (0.2 s again at 7B). The
    vocabulary follows the tokenizer, which is not read here: a stand-in size takes its
    place. What a builder of the user's own raises that is not an error of ours is left to
    the run, which calls it on a real device."""
    import torch

    from letrecipes.components import registry
    from letrecipes.components.models import check_built_student, model_max_seq_len

    spec, seq_len = values.get("model"), (values.get("data") or {}).get("seq_len")
    if not isinstance(spec, (dict, str)) or not isinstance(seq_len, int):
        return
    shape = spec if isinstance(spec, dict) else {}
    try:
        with torch.device("meta"):
            model = registry.build("model", spec, "model", max_seq_len=model_max_seq_len(shape, seq_len),
                                   vocab_size=shape.get("vocab_size") or 2**15)
    except LetRecipesError:
        raise
    except Exception:  # noqa: BLE001 (the run reports it)
        return
    check_built_student(model, shape)


def _rehearse_optimizer(values: Dict[str, Any]) -> None:
    """The optimizer and LR schedule built on two stand-in parameters, as the recipe builds
    them: a value they refuse (a negative lr, a beta of 1.5) is named now, not after hours
    of preparing data."""
    import torch

    from letrecipes.components import registry
    from letrecipes.components.lr_schedules import run_length

    if not (isinstance(values.get("optimizer"), (dict, str)) and isinstance(values.get("lr_scheduler"), (dict, str))):
        return
    optimizer_spec = values["optimizer"]
    decay = float(optimizer_spec.get("weight_decay", 0.0)) if isinstance(optimizer_spec, dict) else 0.0
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "weight_decay": decay},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}]
    optimizer = registry.build("optimizer", optimizer_spec, "optimizer", groups)
    eps = optimizer.param_groups[0].get("eps")
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps == 0:
        # torch takes it; a row of the embedding whose token has not been in a batch yet has a
        # zero gradient, and Adam's update of it is 0 / (sqrt(0) + 0): NaN from the first step
        raise ConfigValueError("config key optimizer.eps=0: the update divides by sqrt(v) + eps, and a weight whose "
                               "gradient has been 0 so far (the embedding row of a token not yet seen) becomes NaN at "
                               "the first step. Fix: optimizer.eps=1e-8 (torch's default), or any number > 0.")
    registry.build("lr_scheduler", values["lr_scheduler"], "lr_scheduler", optimizer,
                   **run_length(values["lr_scheduler"], int(values.get("max_steps") or 1)))


def check_components(values: Dict[str, Any], with_teacher: bool = True) -> None:
    """Every component section against its component's arguments: the name resolves (a
    user's module from ``imports`` included) and every key is one it takes, of its kind."""
    from letrecipes.components import registry  # torch: only for a recipe, `cat` or `validate`
    from letrecipes.components.metrics import check_logger_can_start, metric_logger_class, metric_logger_entries

    registry.import_modules(values.get("imports"))
    specs = [(kind, key, values[key]) for key, kind in COMPONENTS.items() if key in values]
    if with_teacher:
        alignment = values.get("alignment") or {}
        for key, kind in ALIGNMENT_COMPONENTS.items():
            spec = alignment.get(key)
            if kind == "layer_map" and spec is not None:
                from letrecipes.components.layer_maps import layer_map_spec

                spec = layer_map_spec(spec)  # the short forms: a preset name, a list of pairs
            if spec is not None:
                specs.append((kind, f"alignment.{key}", spec))
    for kind, key, spec in specs:
        spec = {"_component_": spec} if isinstance(spec, str) else dict(spec)
        if not spec.get("_component_"):
            raise ConfigValueError(f"config key {key}._component_ is missing. Fix: name the component (docs/configs.md).")
        if isinstance(spec["_component_"], dict):  # `model={...}` on the command line: torchtune's merge did this
            # {_component_:llama} (no space after a colon) is one key "_component_:llama" with no value
            pairs = [(k, v) if v is not None or ":" not in str(k) else tuple(p.strip() for p in str(k).split(":", 1))
                     for k, v in spec["_component_"].items()]
            dotted = " ".join(f"{key}.{k}={v}" for k, v in pairs[:3])
            raise ConfigValueError(f"config key {key}._component_ is a mapping: an override `{key}=...` names the "
                                   f"component only (torchtune's short form, `{key}=llama`). Fix: give its keys one by "
                                   f"one ({dotted} ...), or write the mapping in the YAML file.")
        if not isinstance(spec["_component_"], str):
            raise ConfigValueError(f"config key {key}._component_={spec['_component_']!r} must be a component name "
                                   "(a registered short name or a dotted path). Fix: name the component "
                                   "(docs/configs.md).")
        factory = registry.resolve(kind, spec["_component_"], key=f"{key}._component_")
        if kind == "model" and getattr(factory, "__module__", "").startswith("torchtune.models"):
            raise _torchtune_model_builder(spec["_component_"], factory)
        if kind == "alignment_loss":
            from letrecipes.components.alignment import check_torch_loss

            check_torch_loss(factory, spec["_component_"])
        options = {k: v for k, v in spec.items() if k != "_component_"}
        try:  # model.seq_len, teacher.layer_map: a key of another place
            parameters = registry.signature(factory).parameters
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
            parameters = {"": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            for option, value in options.items():
                if option not in parameters and not registry.others_taking(factory, option) and \
                        (misplaced := _other_name(f"{key}.{option}", value, values)):
                    raise misplaced
        registry.check_arguments(factory, options, key, spec["_component_"])
    _rehearse_model(values)
    _rehearse_optimizer(values)
    if with_teacher and isinstance(values.get("alignment"), dict) and isinstance(values.get("max_steps"), int):
        # built as the recipe builds it: stop=-1 or rho0=-1 is named by `letrecipes validate` too
        registry.build("schedule", values["alignment"].get("schedule", "linear"), key="alignment.schedule",
                       total_steps=values["max_steps"])
    if with_teacher and isinstance(values.get("teacher"), dict) and "path" in values["teacher"] \
            and not values["teacher"]["path"]:
        raise ConfigValueError("config key teacher.path is empty: the LET recipe trains against a teacher model. "
                               "Fix: teacher.path=<a Hugging Face model folder, a .gguf file or a letrecipes export "
                               "(<output_dir>/final)>.")
    if with_teacher and isinstance(values.get("teacher"), dict):
        from letrecipes.components.teachers import RECIPE_KEYS, AutoFormat, _accepted_options, formats

        section = values["teacher"]  # the recipe's keys (path, dtype, ...) and its format's own options
        for key, spec in TEACHER.items():
            if section.get(key) is not None:
                _check("teacher.", key, section[key], spec)
            elif key in section and key != "path" and not _takes_null(spec):  # an empty path has its own line
                raise _null_refused("teacher", key, spec)
        name = section.get("_component_") or "auto"
        factory = registry.resolve("teacher_loader", name, key="teacher._component_")
        taken = set(_accepted_options(factory) if isinstance(factory, type) else inspect.signature(factory).parameters)
        if factory is AutoFormat:  # options go to whichever format recognises the path
            taken = set().union(*(_accepted_options(f) for f in formats().values()))
        options = {k: v for k, v in section.items() if k not in RECIPE_KEYS}
        for key in options:
            if key not in taken:
                raise _other_name(f"teacher.{key}", options[key], values) or _unknown(key, [*RECIPE_KEYS[1:], *sorted(taken)],
                                                                               "teacher.")
        if factory is not AutoFormat:
            registry.check_arguments(factory, options, "teacher", name)
    listed = isinstance(values.get("metric_logger"), list)
    for i, entry in enumerate(metric_logger_entries(values.get("metric_logger"))):
        key = f"metric_logger[{i}]" if listed else "metric_logger"
        factory = metric_logger_class(entry["_component_"], key)
        options = {k: v for k, v in entry.items() if k != "_component_"}
        registry.check_arguments(factory, options, key, entry["_component_"])
        check_logger_can_start(factory, options, key)
    wandb = (values.get("metrics") or {}).get("wandb") or {}
    options = {k: v for k, v in wandb.items() if k != "enabled"}
    if options:
        import wandb as wandb_lib

        registry.check_arguments(wandb_lib.init, options, "metrics.wandb", "wandb.init")
