"""Plain causal-LM pretraining from scratch: the LET baseline, and how teachers are made.

    tune run letrecipes/pretrain --config pretrain_tiny [key=value ...]

One file, torchtune style: ``setup()`` builds every part from the config, ``train()`` runs
the loop, ``cleanup()`` closes the sinks. ``letrecipes/let_pretrain.py`` is this recipe
plus a teacher and an alignment term; the methods it overrides are ``setup_extra`` and
``compute_loss`` (and ``after_step``, to release the teacher).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config
from tqdm import tqdm

from components import parallel, registry, run_info
from components.checkpointing import Checkpointer, export_model
from components.data import PackedDataset, Tokenizer, build_dataloader, tokenize_corpus
from components.metrics import MetricLogger
from components.models import ModelArgs, count_parameters, forward_with_hidden, padded_vocab_size
from components.teachers import GGUF_TOKENIZER_DIR, tokenizer_file
from letrecipes._config import parse
from letrecipes._schema import validate as validate_config

# Known-harmless library warnings that would otherwise repeat in every run's log.
for _pattern in (".*set_vital.*", ".*torch.distributed is disabled.*", ".*Mismatch dtype between input and weight.*"):
    warnings.filterwarnings("ignore", message=_pattern)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": None, "float32": None}


class RecipeError(ValueError):
    """Bad configuration found before the first training step."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm and the policy says stop."""


def build(section: str, node: DictConfig, *args, **kwargs):
    """``config.instantiate`` with a wrong or misspelt argument reported as one line naming the section."""
    from torchtune.config._errors import InstantiationError

    try:
        return config.instantiate(node, *args, **kwargs)
    except (TypeError, InstantiationError) as err:
        raise RecipeError(f"{section}: cannot build {node.get('_component_')!r}: {str(err).splitlines()[0]}. "
                          f"Fix: check {section}._component_ and its keys (docs/configs.md).") from err


def load_tokenizer(cfg: DictConfig) -> Tokenizer:
    """The run's tokenizer: ``tokenizer.path`` (source: path, the default), or the teacher's own
    (``tokenizer.source: teacher``, read from ``teacher.path`` without loading the weights).

    A path may be a tokenizer.json, a model folder that holds one, or a .gguf file.
    """
    spec = cfg.tokenizer
    source = spec.get("source", "path")
    if source == "teacher":
        teacher = cfg.get("teacher") or {}
        if not teacher.get("path"):
            raise RecipeError("tokenizer.source=teacher but there is no teacher.path. Fix: set teacher.path, "
                              "or use tokenizer.source=path with tokenizer.path.")
        path = tokenizer_file(teacher.path, tokenizer_dir=teacher.get("tokenizer_dir", GGUF_TOKENIZER_DIR),
                              key="teacher.path")
    elif source == "path":
        if not spec.get("path"):
            raise RecipeError("tokenizer.path is not set. Fix: point it at a tokenizer.json (or a model folder or "
                              ".gguf file), or set tokenizer.source=teacher.")
        path = tokenizer_file(spec.path, key="tokenizer.path")
    else:
        raise RecipeError(f"tokenizer.source={source!r}: use path (tokenizer.path) or teacher (the teacher's own).")
    return Tokenizer(path, eos_token=spec.get("eos_token"))


class PretrainRecipe:
    """Causal-LM pretraining; subclasses add terms to the loss (see let_pretrain)."""

    uses_teacher = False

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.max_steps = int(cfg.max_steps)
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        self.log_every = int(cfg.get("log_every", 10))
        self.eval_every = int(cfg.get("eval_every", 0) or 0)
        self.save_every = int(cfg.get("save_every", 0) or 0)
        self.step = 0
        self.epoch = 0
        self.skipped_in_a_row = 0  # updates dropped by divergence.policy=skip since the last good one
        self.train_time = 0.0  # seconds inside optimizer steps (teacher included; eval and saves not), over resumes
        self._data_iter = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        registry.import_modules(cfg.get("imports"))
        self.device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError("device=cuda but torch sees no CUDA device. Fix: device=cpu, or leave device unset.")
        self.cpu_malloc_tuned = (self.device.type == "cpu" and cfg.get("cpu_malloc_tuning", True)
                                 and parallel.keep_freed_memory_in_process())
        self.rank, self.world_size = parallel.init_distributed(self.device)
        self.device = parallel.local_device(self.device)
        self.is_main = self.rank == 0
        dtype_name = cfg.get("dtype", "bf16")
        if dtype_name not in AUTOCAST_DTYPES:
            raise RecipeError(f"dtype={dtype_name!r}: use bf16 or fp32.")
        self.autocast_dtype = AUTOCAST_DTYPES[dtype_name]
        self.checkpointer = Checkpointer(self.output_dir, keep_last=int(cfg.get("keep_last_checkpoints", 2)),
                                         async_save=bool(cfg.get("async_checkpoint", False)))
        resumed_from = self._resume_point()
        self._check_output_dir(resumed_from)
        if self.world_size > 1:  # every rank has looked before rank 0 writes anything
            torch.distributed.barrier()
        self._seed_everything(int(cfg.seed))
        self.run_info = run_info.collect(cfg, self.world_size)
        self.log(run_info.summary(self.run_info))

        self.tokenizer = load_tokenizer(cfg)
        self.setup_data()
        fsdp_enabled = (cfg.get("fsdp") or {}).get("enabled", "auto")
        self.fsdp = self.world_size > 1 if fsdp_enabled == "auto" else bool(fsdp_enabled)
        if self.fsdp and self.world_size == 1:
            raise RecipeError("fsdp.enabled=true needs several processes. Fix: launch with "
                              "`tune run --nproc_per_node N ...`, or set fsdp.enabled=auto.")
        # Sharded runs build on the meta device and initialise after sharding: no rank ever
        # holds the full model (a 7B fp32 model is 30 GB per process otherwise).
        with torch.device("meta") if self.fsdp else contextlib.nullcontext():
            self.model = build(
                "model", cfg.model, vocab_size=cfg.model.get("vocab_size") or padded_vocab_size(self.tokenizer.vocab_size),
                max_seq_len=cfg.data.seq_len,
            )
        if self.model.tok_embeddings.num_embeddings < self.tokenizer.vocab_size:
            raise RecipeError(
                f"model.vocab_size={self.model.tok_embeddings.num_embeddings} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens. Fix: remove model.vocab_size (it then follows the tokenizer)."
            )
        if not isinstance(getattr(self.model, "model_args", None), ModelArgs):
            raise RecipeError("model._component_ must build a model carrying `model_args` (the export needs them). "
                              "Fix: use components.models.llama_model, or set model.model_args in your builder.")
        self.model_args = self.model.model_args
        self.n_params = (count_parameters(self.model), count_parameters(self.model, exclude_embeddings=True))
        self.parallelize()
        # Everything the optimizer trains and the checkpoint holds; LET adds its aligner.
        self.trainable = nn.ModuleDict({"model": self.model})
        self.setup_extra()
        self.optimizer = build("optimizer", cfg.optimizer, self._param_groups(float(cfg.optimizer.get("weight_decay", 0.0))))
        self.lr_scheduler = build("lr_scheduler", cfg.lr_scheduler, self.optimizer, total_steps=self.max_steps)
        if resumed_from is not None:
            self._load_checkpoint(resumed_from)
        elif self.is_main:  # a fresh start (overwrite=true) must never resume the old run's checkpoints later
            for name in ("checkpoints", "final"):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.output_dir / "config.yaml")
            (self.output_dir / "run_info.json").write_text(json.dumps(self.run_info, indent=2, default=str))
        self.metrics = MetricLogger(
            self.output_dir, enabled=self.is_main,
            wandb=OmegaConf.to_container(cfg.get("metrics", {}).get("wandb", {}) or {}),
            run_config=OmegaConf.to_container(cfg, resolve=True), append=resumed_from is not None,
        )
        self.log(f"model: {self.n_params[0] / 1e6:.2f}M parameters ({self.n_params[1] / 1e6:.2f}M non-embedding), "
                 f"{self.model_args.num_layers} blocks, width {self.model_args.embed_dim}; device {self.device}, "
                 f"compute {dtype_name}, {self.world_size} process(es){self.parallel_summary}; "
                 f"{len(self.train_set)} training sequences of {cfg.data.seq_len} tokens")

    def parallelize(self) -> None:
        """float8 -> activation checkpointing -> compile -> FSDP2 (the order that composes)."""
        cfg, notes = self.cfg, []
        model = self.model if self.fsdp else self.model.to(self.device)
        float8 = cfg.get("float8") or {}
        if float8.get("enabled", False):
            skipped = parallel.apply_float8(model, recipe=float8.get("recipe", "tensorwise"),
                                            fsdp_float8_all_gather=float8.get("fsdp_float8_all_gather", False),
                                            emulate=float8.get("emulate", False))
            notes.append(f"float8 {float8.get('recipe', 'tensorwise')} (kept high precision: "
                         f"{', '.join(skipped) if skipped else 'none'})")
        ac = cfg.get("activation_checkpointing") or {}
        if ac.get("mode", "none") not in ("none", None):
            wrapped = parallel.apply_activation_checkpointing(model, ac.mode, int(ac.get("every", 2)))
            notes.append(f"activation checkpointing {ac.mode} ({wrapped} blocks)")
        if cfg.get("compile", False):
            parallel.compile_blocks(model)
            notes.append("compiled blocks")
        fsdp = cfg.get("fsdp") or {}
        self.mp_policy = None
        if self.fsdp:
            if self.autocast_dtype is not None:  # FSDP2 casts parameters itself; no autocast on top
                self.mp_policy = parallel.mixed_precision_policy(self.autocast_dtype)
                self.autocast_dtype = None
            parallel.shard_model(model, self.mp_policy, bool(fsdp.get("reshard_after_forward", True)))
            notes.append("FSDP2" + (" bf16 params / fp32 reduce" if self.mp_policy else " fp32"))
            parallel.materialize(model, self.device, seed=int(cfg.seed), init_std=cfg.model.get("init_std", 0.02))
            notes.append("initialised after sharding")
        if self.cpu_malloc_tuned:
            notes.append("malloc keeps freed memory")
        self.parallel_summary = "".join(f", {n}" for n in notes)

    def setup_data(self) -> None:
        cfg = self.cfg.data
        tokens = tokenize_corpus(cfg.source, self.tokenizer, cfg.get("cache_dir", "outputs/cache"),
                                 text_field=cfg.get("text_field", "text"))
        val_fraction = float(cfg.get("val_fraction", 0.02))
        self.train_set = PackedDataset(tokens, int(cfg.seq_len), "train", val_fraction)
        self.val_set = PackedDataset(tokens, int(cfg.seq_len), "val", val_fraction)
        batch_size = int(self.cfg.batch_size)
        self.dataloader = build_dataloader(self.train_set, batch_size, seed=int(self.cfg.seed),
                                           rank=self.rank, world_size=self.world_size)
        self.val_loader = build_dataloader(self.val_set, batch_size, seed=0, shuffle=False,
                                           rank=self.rank, world_size=self.world_size)
        self.tokens_per_step = batch_size * int(cfg.seq_len) * self.grad_accum * self.world_size

    def setup_extra(self) -> None:
        """Hook for subclasses: build more parts (a teacher, an aligner) before the optimizer."""

    def _param_groups(self, weight_decay: float):
        # No decay on norms and biases (1-D tensors): decaying them only fights the init.
        decay = [p for p in self.trainable.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.trainable.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ---------------------------------------------------------- checkpoints
    def _resume_point(self) -> Optional[Path]:
        resume = self.cfg.get("resume", False)
        if resume in (False, None, "false", "False"):
            return None
        if resume in (True, "true", "True"):
            for broken in self.checkpointer.incomplete_checkpoints():
                self.log(f"resume: ignoring {broken} (its save never finished)")
            latest = self.checkpointer.latest()
            if latest is None:
                self.log(f"resume=true but {self.output_dir}/checkpoints holds no complete checkpoint: starting fresh")
            return latest
        path = Path(str(resume))
        if not path.is_dir():
            raise RecipeError(f"resume={resume!r}: no such checkpoint folder. Fix: resume=true for the latest, "
                              "or a path like <output_dir>/checkpoints/step_00000100.")
        return path

    def _check_output_dir(self, resumed_from: Optional[Path]) -> None:
        """Refuse to overwrite a finished or running run's files unless told to."""
        existing = [p for p in ("metrics.jsonl", "checkpoints", "final") if (self.output_dir / p).exists()]
        if existing and resumed_from is None and not self.cfg.get("overwrite", False):
            raise RecipeError(
                f"output_dir={str(self.output_dir)!r} already holds a run ({', '.join(existing)}). Fix: resume=true "
                "to continue it, overwrite=true to start over (its files are replaced), or another output_dir."
            )

    def _trainer_state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "train_time": self.train_time,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "dataloader": self.dataloader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save_checkpoint(self) -> None:
        if self._fault_now("kill_during_save_at_step", offset=0):
            self.checkpointer.before_complete = lambda folder: os.kill(os.getpid(), signal.SIGKILL)
        path = self.checkpointer.save(self.step, self.trainable, self.optimizer, self._trainer_state(),
                                      run_info=self.run_info)
        self.log(f"checkpoint: {path}")

    def _load_checkpoint(self, path: Path) -> None:
        state = self.checkpointer.load(path, self.trainable, self.optimizer)
        self.step, self.epoch = state["step"], state["epoch"]
        self.train_time = state.get("train_time", 0.0)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.dataloader.sampler.set_epoch(self.epoch)
        self.dataloader.load_state_dict(state["dataloader"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        metrics = self.output_dir / "metrics.jsonl"
        if self.is_main and metrics.is_file():  # drop records the interrupted run wrote after this checkpoint
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if record.get("step", 0) <= self.step:
                    kept.append(line)
            metrics.write_text("".join(line + "\n" for line in kept))
        self.log(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------- train
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def next_batch(self) -> Dict[str, torch.Tensor]:
        while True:
            if self._data_iter is None:
                self.dataloader.sampler.set_epoch(self.epoch)
                self._data_iter = iter(self.dataloader)
            try:
                batch = next(self._data_iter)
                return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            except StopIteration:
                self.epoch += 1
                self._data_iter = None

    def compute_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one micro-batch and the figures to log about it. LET overrides this."""
        _, logits = forward_with_hidden(self.model, tokens)
        nll = nll_loss(logits, labels)
        return nll, {"nll": nll.item()}

    def after_step(self) -> None:
        """Hook for subclasses, called after each optimizer step."""

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step (over ``gradient_accumulation_steps`` micro-batches); its record."""
        start = time.perf_counter()
        self.step_timing = {}  # seconds spent in named parts of this step (LET: "teacher")
        sums: Dict[str, float] = {}
        if self._fault_now("kill_at_step"):  # fault injection for the reliability tests
            os.kill(os.getpid(), signal.SIGKILL)
        for _ in range(self.grad_accum):
            batch = self.next_batch()
            with self.autocast():
                loss, figures = self.compute_loss(batch["tokens"], batch["labels"])
            if self._fault_now("nan_loss_at_step"):
                loss = loss * float("nan")
            (loss / self.grad_accum).backward()
            figures["loss"] = loss.item()
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + v / self.grad_accum
        sums = parallel.all_reduce_mean(sums, self.device)  # a NaN on any rank reaches every rank
        grad_norm = None
        if self.cfg.get("clip_grad_norm"):
            norm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), float(self.cfg.clip_grad_norm))
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        finite = all(math.isfinite(v) for v in sums.values()) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self.on_divergence(sums, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step += 1
        self.train_time += elapsed
        record = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm, **({} if finite else {"skipped": True}),
                  "tokens_per_s": self.tokens_per_step / elapsed, "step_time_s": elapsed,
                  "train_time_s": self.train_time,
                  "peak_memory_mb": peak_memory_mb(self.device)}
        for name, seconds in self.step_timing.items():
            record[f"{name}_time_share"] = seconds / elapsed
        return record

    def _fault_now(self, kind: str, offset: int = 1) -> bool:
        """``debug.<kind>: N`` (and ``debug.rank``, default every rank): inject a fault at step N
        (the step about to run, or with ``offset=0`` the one just finished). Testing aid only:
        the kill/resume and NaN-guard tests use it."""
        debug = self.cfg.get("debug") or {}
        rank = debug.get("rank")
        return debug.get(kind) == self.step + offset and (rank is None or rank == self.rank)

    def on_divergence(self, figures: Dict[str, float], grad_norm: Optional[float]) -> None:
        """A non-finite loss or gradient norm (seen identically on every rank): skip or stop.

        ``divergence.policy: skip`` drops this update (the step still counts, so the LR
        schedule and data order stay as planned) and stops after ``divergence.max_skips``
        skips in a row; ``stop`` (the default) ends the run at once.
        """
        spec = self.cfg.get("divergence") or {}
        policy, max_skips = spec.get("policy", "stop"), int(spec.get("max_skips", 5))
        step = self.step + 1
        what = f"non-finite loss or gradient norm at step {step} ({figures}, grad_norm={grad_norm})"
        self.skipped_in_a_row += 1
        if policy == "skip" and self.skipped_in_a_row <= max_skips:
            self.log(f"{what}: update skipped ({self.skipped_in_a_row} in a row; divergence.max_skips={max_skips})")
            self.metrics.log({"step": step, "event": "skipped_update", **figures, "grad_norm": grad_norm})
            return
        latest = self.checkpointer.latest()
        raise DivergenceError(
            f"{what}{f', after {max_skips} skipped updates in a row' if policy == 'skip' else ''}. The last good "
            f"checkpoint is {latest or 'none (no checkpoint was saved yet)'}. Fix: resume from it with a lower "
            "optimizer.lr or a smaller clip_grad_norm, or set divergence.policy=skip to drop such updates."
        )

    def train(self) -> None:
        self.trainable.train()
        progress = tqdm(total=self.max_steps, initial=self.step, desc=self.__class__.__name__, dynamic_ncols=True,
                        disable=not (self.is_main and sys.stderr.isatty() and self.cfg.get("progress_bar", True)))
        while self.step < self.max_steps:
            record = self.train_step()
            progress.update(1)
            if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.max_steps):
                record["val_loss"] = self.evaluate()
            if self.step % self.log_every == 0 or self.step == self.max_steps or "val_loss" in record:
                self.metrics.log(record)
                self.log(format_record(record, self.max_steps), progress)
            self.after_step()
            if self.save_every and self.step % self.save_every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
        progress.close()
        if self.save_every:
            self.save_checkpoint()
        self.checkpointer.wait()
        export_model(self.model, self.model_args, self.output_dir / "final", self.tokenizer.path)
        self.log(f"exported {self.output_dir / 'final'}")

    @torch.no_grad()
    def evaluate(self) -> float:
        self.trainable.eval()
        total, count = 0.0, 0
        for i, batch in enumerate(self.val_loader):
            if i >= int(self.cfg.get("eval_batches", 8)):
                break
            tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
            with self.autocast():
                _, logits = forward_with_hidden(self.model, tokens)
            total += nll_loss(logits, labels).item() * labels.numel()
            count += labels.numel()
        self.trainable.train()
        total, count = parallel.all_reduce_sum([total, count], self.device)
        return total / count

    def log(self, message: str, progress: Optional[tqdm] = None) -> None:
        if not getattr(self, "is_main", True):
            return
        if progress is not None and not progress.disable:
            progress.write(message)  # keeps the bar below the log lines
        else:
            print(message, flush=True)

    def cleanup(self) -> None:
        self.checkpointer.wait()
        self.metrics.close()
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mb(device: torch.device) -> float:
    """Allocated CUDA memory, or this process's resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def format_record(record: Dict[str, Any], max_steps: int) -> str:
    parts = [f"step {record['step']}/{max_steps}"]
    for key, fmt in (("loss", ".4f"), ("nll", ".4f"), ("align_loss", ".4f"), ("lambda", ".3g"), ("cosine", ".3f"),
                     ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".2f"), ("tokens_per_s", ".0f")):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    return " | ".join(parts)


@parse
def recipe_main(cfg: DictConfig) -> None:
    """Plain causal-LM pretraining."""
    run(PretrainRecipe, cfg)


@contextlib.contextmanager
def errors_as_one_line(*kinds):
    """Turn the expected failures (bad config, data, checkpoint, divergence) into one
    ``error: ...`` line and exit status 1; ``LETRECIPES_TRACEBACK=1`` keeps the traceback."""
    try:
        yield
    except kinds as err:
        if os.environ.get("LETRECIPES_TRACEBACK"):
            raise
        sys.exit(f"error: {err}")


def run(recipe_class, cfg: DictConfig) -> None:
    """setup / train / cleanup, with configuration errors reported as one line.

    ``dry_run=true`` only checks the config and prints the cost estimate.
    """
    # ValueError covers RecipeError, ComponentError, DataError, TeacherError, ...
    with errors_as_one_line(ValueError):
        validate_config(cfg)  # before anything is built or written
        recipe = recipe_class(cfg)
        if cfg.get("dry_run", False):
            from letrecipes._dry_run import dry_run

            dry_run(cfg, with_teacher=recipe_class.uses_teacher)
            return
        recipe.setup()
    try:
        with errors_as_one_line(DivergenceError):
            recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
