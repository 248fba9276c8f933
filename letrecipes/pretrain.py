"""Plain causal-LM pretraining from scratch: the LET baseline, and how teachers are made.

    tune run letrecipes/pretrain --config pretrain_tiny [key=value ...]

One file, torchtune style: ``setup()`` builds every part from the config, ``train()`` runs
the loop, ``cleanup()`` closes the sinks. Policy lives in components: the checkpointer owns
the run folder and resume, the metric logger owns metrics.jsonl, ``parallel`` owns
devices and sharding, ``divergence`` what a non-finite step does. ``letrecipes/let_pretrain.py``
is this recipe plus a teacher and an alignment term; the methods it overrides are
``setup_extra``, ``compute_loss``, ``reduced`` and ``after_step``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from letrecipes._config import parse, path_keys, run
from letrecipes._dry_run import config_memory
from letrecipes.components import faults, parallel, registry, resume, run_info, tasks
from letrecipes.components.checkpointing import HASH_THREADS, Checkpointer, Progress, RNGState, step_of
from letrecipes.components.corpus import DataError, DataWarning
from letrecipes.components.data import (SHARED_MEMORY, BatchStream, build_dataloader, build_datasets,
                                        corpus_fingerprint, shared_memory_exhausted, training_folders)
from letrecipes.components.divergence import DivergenceError, DivergenceGuard
from letrecipes.components.estimate import USABLE_SHARE, forward_flops_per_token, peak_bf16_tflops
from letrecipes.components.errors import LetRecipesError, LetRecipesWarning, in_words
from letrecipes.components.export import export_checkpoint, export_dtype, export_model
from letrecipes.components.files import environment_errors, nearest_existing, replace_atomically, usable_cores
from letrecipes.components.lr_schedules import run_length
from letrecipes.components.preemption import GracefulStop, RunStopped, StopVote, forgive_console_errors
from letrecipes.components.init_from import check_initial_weights, load_initial_weights
from letrecipes.components.metrics import (METRICS_FILE, MetricLogger, StepTimer, build_metric_loggers,
                                          format_record, peak_memory_mb, to_python)
from letrecipes.components.profiling import PROFILE_FOLDER, build_profiler
from letrecipes.components.run_folder import exported_step
from letrecipes.components.progress import ProgressClock
from letrecipes.components.models import (ModelArgs, check_built_student, count_parameters, forward_with_loss,
                                          model_max_seq_len, padded_vocab_size)
from letrecipes.components.tokenizer import load_tokenizer

# Known-harmless library warnings that would otherwise repeat in every run's log. DTensor's
# "random operators may not have complete support on cpu device mesh": the sharded init on
# CPU draws each shard on its own, with the statistics the tests check
# (test_sharded_init_has_the_from_scratch_statistics).
for _pattern in (".*set_vital.*", ".*torch.distributed is disabled.*", ".*Mismatch dtype between input and weight.*",
                 ".*DTensor random operators may not have complete support on cpu.*"):
    warnings.filterwarnings("ignore", message=_pattern)

CHECKS = "_checks_passed"  # the queued checks' flag, reduced with the figures
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": None, "float32": None}


class RecipeError(LetRecipesError):
    """Bad configuration found before the first training step."""


class OutOfMemory(LetRecipesError):
    """The device (or the host) ran out of memory: what the cost model expected, and the fix."""


class CollectiveFailed(LetRecipesError):
    """A collective gave up on another process (it hung past the timeout, or went away)."""


def schedule_warnings(cfg: DictConfig, max_steps: int) -> List[str]:
    """Settings that are valid but almost never meant: the run goes ahead, and says so."""
    lines = []
    warmup = (cfg.get("lr_scheduler") or {}).get("warmup_steps")
    if warmup is not None and int(warmup) > max_steps:
        lines.append(f"warning: lr_scheduler.warmup_steps={warmup} > max_steps={max_steps}: the learning rate rises for "
                     f"the whole run and ends at {max_steps / int(warmup):.0%} of optimizer.lr. Fix: fewer warmup steps, "
                     "if that is not meant.")
    optimizer = cfg.get("optimizer") or {}
    lr = optimizer.get("lr")
    if lr is not None and float(lr) == 0:
        lines.append("warning: optimizer.lr=0: the weights never change. Fix: a learning rate > 0, if that is not "
                     "meant.")
    # Adam's update is lr * m / (sqrt(v) + eps): sizes that only a slipped exponent gives (1e8 for 1e-8, 3 for 3e-4)
    if "adam" in str(optimizer.get("_component_", "")).lower():
        eps = optimizer.get("eps")
        if _is_number(eps) and eps >= ADAM_EPS_WARN:
            lines.append(f"warning: optimizer.eps={eps:g}: Adam divides each update by sqrt(v) + eps, and gradients' "
                         f"second moments are far below {eps:g}, so every update shrinks toward lr * m / {eps:g} and "
                         "the model barely learns. Fix: eps=1e-8 (the default), if that is not meant.")
        if _is_number(lr) and lr >= ADAM_LR_WARN:
            lines.append(f"warning: optimizer.lr={lr:g} for {optimizer.get('_component_')}: each step moves every "
                         f"weight by up to {lr:g}, where pretraining uses 1e-4 to 3e-3; the loss will diverge. Fix: "
                         "lr=3e-4 (or the 1e-3 of a small model), if that is not meant.")
    return lines


ADAM_EPS_WARN, ADAM_LR_WARN = 1e-2, 0.1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _size(n_bytes: float) -> str:
    """``1.2 GB``, ``340 MB``, ``1 kB``: decimal units, as disks are sold and `df -H` shows."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes / 1e3:,.0f} kB"


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, CPU tensors the allocator refused, or Python's MemoryError."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


# a share of the time between log lines spent waiting for batches that is said once (a warning)
DATA_WAIT_WARN_SHARE = 0.10


class PretrainRecipe:
    """Causal-LM pretraining; subclasses add terms to the loss (see let_pretrain)."""

    uses_teacher = False
    collate = None  # the training loader's collate_fn (None: stack the items); LET's cross-tokenizer mode sets one
    # What a log line shows, in order, and how (LET adds its own figures).
    console_fields = (("loss", ".4f"), ("nll", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".2f"),
                      ("tokens_per_s", ".0f"), ("tokens_per_s_avg", ".0f"), ("mfu", ".1%"), ("elapsed_s", "clock"),
                      ("eta_s", "clock"))

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.max_steps = int(cfg.max_steps)
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        # > 0: the output layer and the loss run this many tokens at a time (components/loss.py)
        self.loss_chunk_tokens = int(cfg.get("loss_chunk_tokens", 0) or 0)
        self.log_every = int(cfg.get("log_every", 10))
        self.eval_every = int(cfg.get("eval_every", 0) or 0)
        self.save_every = int(cfg.get("save_every", 0) or 0)
        self.progress = Progress()
        self.resume_from: Optional[Path] = None  # the checkpoint this launch resumes from, once setup found it
        self.rank_hosts: List[str] = []  # each rank's host, for lines that name a rank
        self.data_wait_laps, self.data_wait_said = 0, False
        self.resolved_dtypes: Dict[str, Any] = {}  # dtype (and teacher.dtype) as auto came out on this device

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        registry.import_modules(cfg.get("imports"))
        self.check_tasks()  # before the process group, whose threads abort the process when they cannot start
        fsdp_enabled = (cfg.get("fsdp") or {}).get("enabled", "auto")
        self.device, self.rank, self.world_size, device_notes = parallel.setup_device(
            cfg.get("device"), cfg.get("cpu_malloc_tuning", True), int(cfg.get("process_group_timeout_s", 600)),
            single_process_group=fsdp_enabled is True)  # FSDP2 in one process shards over a group of one
        self.is_main = self.rank == 0
        # before any rank looks at the folder: nodes started with other overrides or code are named, not trained
        self.rank_hosts = parallel.check_ranks_agree(run_info.what_every_rank_must_share(cfg))
        if not self.is_main:  # every rank reads the same data: its warnings are rank 0's to give, once, not per rank
            warnings.filterwarnings("ignore", category=DataWarning)
        if cfg.get("dtype", "bf16") not in (*AUTOCAST_DTYPES, "auto"):
            raise RecipeError(f"dtype={cfg.dtype!r}: use bf16, fp32 or auto.")
        said: Dict[Tuple[str, Optional[str]], List[str]] = {}  # one line for keys that auto made the same
        for key in self.dtype_keys():  # auto: bf16 where this device runs it at speed, else fp32
            asked = OmegaConf.select(cfg, key, default="bf16")
            self.resolved_dtypes[key], slow = parallel.resolve_dtype(asked, self.device, key)
            if asked == "auto":
                said.setdefault((self.resolved_dtypes[key], slow), []).append(f"{key}=auto")
        for (name, slow), keys in said.items():
            self.log(parallel.auto_line(", ".join(keys), slow))
        dtype_name = self.resolved_dtypes["dtype"]
        self.autocast_dtype = AUTOCAST_DTYPES[dtype_name]
        if self.autocast_dtype == torch.bfloat16 and cfg.get("dtype", "bf16") != "auto":
            parallel.check_bf16_device(self.device, "dtype")

        self.checkpointer = Checkpointer(self.output_dir, keep_last=self.kept_checkpoints() or 0,  # 0: every one
                                         async_save=bool(cfg.get("async_checkpoint", False)), log=self.log,
                                         timeout_s=int(cfg.get("process_group_timeout_s", 600)))
        self.checkpointer.lock()  # before looking: another live run could be writing the folder
        resume_setting, overwrite = cfg.get("resume", False), bool(cfg.get("overwrite", False))
        restart = parallel.on_rank0(lambda: run_info.restart_of(self.output_dir))  # one answer for every rank
        if restart and not Checkpointer.resume_requested(resume_setting):
            self.log(f"torchrun restart {restart} of this job: its run in {self.output_dir} goes on from its latest "
                     "checkpoint, as with resume=true" + (" (overwrite=true applied to its first start only)"
                                                         if overwrite else ""))
            resume_setting, overwrite = True, False
        resume_from = self.resume_from = self.checkpointer.resume_point(resume_setting)
        self.checkpointer.guard(resume_setting, overwrite=overwrite)
        if self.world_size > 1:  # every rank has looked before rank 0 writes anything
            torch.distributed.barrier()
        seed_everything(int(cfg.seed))
        if cfg.get("deterministic", False):
            self.settings_before_deterministic = use_deterministic_algorithms()
            self.log("deterministic: torch's deterministic algorithms only (an op without one stops the run)")
        self.run_info = run_info.collect(cfg, self.world_size)
        self.run_info["uses_teacher"] = self.uses_teacher  # a resume by the other recipe is named as such
        self.run_info["dtypes"] = dict(self.resolved_dtypes)  # what auto came to, which a resume elsewhere may change
        self.log(run_info.summary(self.run_info))
        if not self.uses_teacher and (cfg.get("teacher") or cfg.get("alignment")):
            self.log("note: this recipe is plain pretraining: the config's teacher and alignment sections are not "
                     "used (LET is tune run letrecipes/let_pretrain)")

        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.get("teacher"))
        self.run_info["tokenizer_fingerprint"] = self.tokenizer.fingerprint()
        self.fsdp, self.shards = parallel.fsdp_layout(cfg.get("fsdp") or {}, self.world_size)
        self.reduce_every_micro_batch = bool((cfg.get("fsdp") or {}).get("reduce_every_micro_batch", True))
        self.check_resources()  # before hours of preparing data for a run that cannot fit
        for key in self.compiled_keys():  # a machine that cannot compile, named before the data and the first step
            parallel.rehearse_compile(self.device, key)
        # init_from's shape and tokenizer, from its metadata (a resumed run has its own weights)
        init_source = check_initial_weights(str(cfg.init_from), self.planned_args, self.tokenizer) \
            if cfg.get("init_from") and resume_from is None else None
        self.setup_data()
        self.setup_model()  # first: a typo in its arguments is named as such, not as a change
        if init_source is not None:
            load_initial_weights(init_source, self.model, log=self.log)
        self.run_info.update(self.fingerprints())
        # the same names may hold other files on each node's own disk (a tokenizer, a teacher, a corpus prepared there)
        inputs = {f"{what} ({where})": self.run_info.get(key) for key, what, where in resume.FINGERPRINTS
                  if key in self.run_info}
        parallel.check_ranks_agree(inputs,
                                   fix="give every node the same files: read them from the shared filesystem, or copy "
                                       "them to every node again (and prepare the corpus once, into a shared "
                                       "data.cache_dir).")
        # Before the teacher is loaded and anything is written: a resume that would be another run stops here.
        changes = resume.check(resume_from, self.run_info, self.settled_at(resume_from)) \
            if resume_from is not None else None
        resumed_at = step_of(resume_from) if resume_from is not None else None
        if resumed_at is not None and resumed_at > self.max_steps:  # going on would re-export final/ from the past
            raise resume.ResumeChangeError(
                f"resume: {resume_from} is at step {resumed_at}, past max_steps={self.max_steps}. Fix: "
                f"max_steps={resumed_at} or more to go on from it; for the model of an earlier step, `letrecipes "
                "export <its checkpoint> <folder>` converts any checkpoint (final/ is left as it is).")
        # Everything the optimizer trains and the checkpoint holds; LET adds its aligner.
        self.trainable = nn.ModuleDict({"model": self.model})
        self.setup_extra()
        self.optimizer = registry.build("optimizer", cfg.optimizer, "optimizer",
                                        self._param_groups(float(cfg.optimizer.get("weight_decay", 0.0))))
        self.lr_scheduler = registry.build("lr_scheduler", cfg.lr_scheduler, "lr_scheduler", self.optimizer,
                                           **run_length(cfg.lr_scheduler, self.max_steps))
        for line in schedule_warnings(cfg, self.max_steps):
            self.log(line)
        self.divergence = DivergenceGuard(**(cfg.get("divergence") or {}))
        self.unresolved: List[Tuple] = []  # steps whose finiteness is still on the device
        self.timer = StepTimer(self.device)

        self.checkpointer.track(self.trainable, self.optimizer, progress=self.progress,
                                lr_scheduler=self.lr_scheduler, dataloader=self.batches, rng=RNGState())
        if resume_from is not None:
            settings = resume.optimizer_settings(self.optimizer)
            self.checkpointer.load(resume_from)
            resume.check_schedule_length(self.lr_scheduler, self.max_steps)
            self.log(f"resumed from {resume_from} at step {self.step}")
            before = (resume.saved_run_info(resume_from) or {}).get("dtypes") or {}
            for key, now in self.resolved_dtypes.items():  # dtype=auto on a device that answers otherwise
                if before.get(key) not in (None, now):
                    self.log(f"resume: {key}=auto computes in {now} on this device; the run computed in "
                             f"{before[key]} until step {self.step}")
            self.checkpointer.set_aside_later(resume_from)  # the run goes on from here, not from a later one
            if cfg.get("init_from"):  # a requeued job repeats its first command: said, not refused
                self.log(f"init_from={cfg.init_from} not used: a resumed run goes on from its checkpoint's weights")
            if self.progress.tokens is None:  # saved before tokens were counted
                self.progress.tokens = self.step * self.tokens_per_step
                self.log(f"resume: {resume_from} predates the count of trained tokens; counted from "
                         f"{self.progress.tokens:,} (its steps x this launch's {self.tokens_per_step:,} tokens per step)")
            for line in resume.describe(changes or []):
                self.log(line)
            self.log_batch_change(changes or [])
            if any(key.startswith(("optimizer.", "lr_scheduler.")) or key == "max_steps" for key, _, _ in changes or []):
                saved_lr = self.optimizer.param_groups[0]["lr"]
                resume.apply_settings(self.optimizer, settings, self.lr_scheduler)
                new_lr = self.optimizer.param_groups[0]["lr"]
                # a schedule over a new length jumps, unannounced (not said where no step is left to train)
                if abs(new_lr - saved_lr) > 0.01 * abs(saved_lr) and self.step < self.max_steps:
                    self.log(f"resume: the learning rate for step {self.step + 1} is {new_lr:.3g} on this config's "
                             f"schedule, where the run had {saved_lr:.3g}")
        else:
            self.checkpointer.clear()
            if self.is_main:  # a replaced run's traces are not this run's
                shutil.rmtree(self.output_dir / PROFILE_FOLDER, ignore_errors=True)
        # a full disk or a read-only folder here is one line, before any step (what is intact: the checkpoints)
        with environment_errors("output_dir", f"starting the run in {self.output_dir}",
                                kept=self.checkpointer.what_is_kept, then="run the same command with resume=true"):
            if self.is_main:
                # run_info.json first: it marks the folder as a run's, so a start that fails on the
                # next write leaves a folder the same command takes up again
                self.output_dir.mkdir(parents=True, exist_ok=True)
                replace_atomically(self.output_dir / "run_info.json", json.dumps(self.run_info, indent=2, default=str))
                replace_atomically(self.output_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            plain = OmegaConf.to_container(cfg, resolve=True)
            loggers = build_metric_loggers(plain.get("metric_logger"), (plain.get("metrics") or {}).get("wandb"),
                                           self.output_dir, log=self.log) if self.is_main else []
            self.metrics = MetricLogger(self.output_dir, enabled=self.is_main, loggers=loggers, run_config=cfg,
                                        resume_step=self.step if resume_from is not None else None)
            faults.install(self, cfg.get("debug"), self.rank)
            self.profiler = build_profiler(cfg.get("profiler"), self.output_dir, self.step, self.max_steps,
                                           self.device, self.rank, log=self.log if self.is_main else self.node_log)
        notes = "".join(f", {n}" for n in self.parallel_notes + device_notes)
        self.log(f"model: {self.n_params[0] / 1e6:.2f}M parameters ({self.n_params[1] / 1e6:.2f}M non-embedding), "
                 f"{self.model_args.num_layers} blocks, width {self.model_args.embed_dim}; device {self.device}, "
                 f"compute {dtype_name}, {self.world_size} process(es){notes}; "
                 f"{len(self.train_set)} training sequences of {cfg.data.seq_len} tokens{self.passes_planned()}")

    def log_batch_change(self, changes) -> None:
        """A resume on another number of processes or batch: where the data goes on, and what
        a step now holds (the schedules count steps, so a step of other size changes them)."""
        now = {"world_size": self.world_size, "batch_size": int(self.cfg.batch_size),
               "gradient_accumulation_steps": self.grad_accum}
        before = {**now, **{key: int(old) for key, old, _ in changes if key in now}}
        if before == now:
            return
        tokens = math.prod(before.values()) * int(self.cfg.data.seq_len)
        self.log(f"resume: the data goes on after the {self.batches.sequences_read():,} sequences of epoch "
                 f"{self.batches.epoch + 1} read before (each once); tokens per step {tokens:,} -> "
                 f"{self.tokens_per_step:,}" + ("" if tokens == self.tokens_per_step else
                                                " (keep them with batch_size x gradient_accumulation_steps x "
                                                "processes as before, if that is not meant)"))

    def validation_batch_size(self, batch_size: int) -> int:
        """``batch_size``, or what a validation split smaller than a batch on every process
        holds (a small corpus, or a 7B config's val_fraction on a test corpus): a split that
        gives each process at least one sequence is evaluated whole, with a warning that its
        val_loss is a noisy figure, rather than stopping a run over its figure."""
        each = len(self.val_set) // self.world_size
        if each >= batch_size:
            return batch_size
        if each == 0:  # not one sequence per process: build_dataloader names the split and the fix
            return 1
        cfg = self.cfg.data
        held_out = f"data.val_source={cfg.val_source}" if cfg.get("val_source") else \
            f"data.val_fraction={cfg.get('val_fraction', 0.02)}"
        if self.is_main:  # every rank has the same split: said once
            warnings.warn(f"the validation split ({held_out}) holds {len(self.val_set)} sequence(s) of "
                          f"{int(cfg.seq_len)} tokens, fewer than a batch of {batch_size}" +
                          (f" on each of {self.world_size} processes" if self.world_size > 1 else "") +
                          f": it is evaluated whole, in batches of {each}, and its val_loss over "
                          f"{each * self.world_size * int(cfg.seq_len):,} tokens is a noisy figure. Fix: a larger "
                          "data.val_fraction, or a held-out corpus in data.val_source, for a steadier one.",
                          LetRecipesWarning, stacklevel=2)
        return each

    def passes_planned(self) -> str:
        """How much of the training set max_steps reads: repeating data is a choice to see made."""
        read = self.max_steps * self.tokens_per_step // int(self.cfg.data.seq_len)
        return f"; {self.max_steps} steps read {read} of them ({read / max(1, len(self.train_set)):.2f} epochs)"

    def setup_data(self) -> None:
        cfg = self.cfg.data
        # Prepared folders are read as they are; a raw corpus is prepared once into the cache
        # (by each node's first process, while the others wait for it).
        # Without evaluation the validation split is not built, so too small a one is no error.
        # Another node's first process may be the one preparing (it won a shared cache's lock,
        # or each node has a cache of its own) while rank 0 waits: its node's log says so.
        local_rank = parallel.local_rank(self.rank)
        log = self.log if self.is_main or local_rank != 0 else self.node_log
        self.train_set, self.val_set, sources = build_datasets(cfg, self.tokenizer, seed=int(self.cfg.seed),
                                                               local_rank=local_rank, log=log,
                                                               validation=bool(self.eval_every))
        self.run_info["data_fingerprint"] = corpus_fingerprint(self.train_set)  # a resume on changed data is refused
        # where the training tokens lie: the eval recipe looks its items up there (components/contamination.py)
        self.run_info["data_folders"] = training_folders(self.train_set)
        batch_size, workers = int(self.cfg.batch_size), int(cfg.get("num_workers", 0))
        self.batches = BatchStream(build_dataloader(self.train_set, batch_size, seed=int(self.cfg.seed),
                                                    rank=self.rank, world_size=self.world_size, num_workers=workers,
                                                    collate_fn=self.collate),
                                   self.device, source_names=sources)
        self.val_loader = build_dataloader(self.val_set, self.validation_batch_size(batch_size), seed=0,
                                           shuffle=False, rank=self.rank, world_size=self.world_size,
                                           what="the validation split") if self.eval_every else None
        self.tokens_per_step = batch_size * int(cfg.seq_len) * self.grad_accum * self.world_size

    def build_student(self) -> nn.Module:
        """The student as the config describes it (on the current default device)."""
        return registry.build("model", self.cfg.model, "model",
                              max_seq_len=model_max_seq_len(self.cfg.model, int(self.cfg.data.seq_len)),
                              vocab_size=self.cfg.model.get("vocab_size") or padded_vocab_size(self.tokenizer.vocab_size))

    def check_student(self, model: nn.Module) -> None:
        """What the student's build must give whatever its builder: room for every token id,
        and ``model_args`` (the export and the checks read them)."""
        check_built_student(model, self.cfg.model)
        if model.tok_embeddings.num_embeddings < self.tokenizer.vocab_size:
            raise RecipeError(
                f"model.vocab_size={model.tok_embeddings.num_embeddings} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens. Fix: remove model.vocab_size (it then follows the tokenizer)."
            )

    def compiled_keys(self) -> List[str]:
        """The config keys that ask for torch.compile (the LET recipe adds its teacher's)."""
        return ["compile"] if self.cfg.get("compile", False) else []

    def planned_teacher(self) -> Tuple[Optional[ModelArgs], bool]:
        """Hook for subclasses: (the teacher's shape, whether it is sharded), read without
        loading it, for the memory check."""
        return None, False

    def dtype_keys(self) -> List[str]:
        """Hook for subclasses: the config keys naming a dtype whose ``auto`` setup makes concrete."""
        return ["dtype"]

    def check_resources(self) -> None:
        """Memory (refused when it cannot fit) and disk (a warning), from the student's
        shape built on the meta device: nothing allocated."""
        with torch.device("meta"):
            planned = self.build_student()
        self.check_student(planned)  # at plan time: before the corpus is prepared
        self.planned_args = planned.model_args
        self.check_memory(planned)
        self.check_disk(count_parameters(planned))

    def kept_checkpoints(self) -> Optional[int]:
        """``keep_last_checkpoints``: how many step checkpoints are kept; None keeps every one (``all``)."""
        keep = self.cfg.get("keep_last_checkpoints", 2)
        return None if keep == "all" else int(keep)

    def check_disk(self, n_params: int) -> None:
        """Warn at the start, not at the first save hours later, when ``output_dir``'s disk
        cannot hold the checkpoints the run will keep (12 bytes a parameter: fp32 weights and
        two AdamW moments; ``keep_last_checkpoints`` of them, one more while a save
        completes) and the bf16 export."""
        if not self.is_main:
            return
        try:
            free = shutil.disk_usage(nearest_existing(self.output_dir)).free
        except (OSError, TypeError):  # TypeError: not even the root exists (a path of another system)
            return
        kept = self.kept_checkpoints()
        if not self.save_every:
            keep = 0
        elif kept is None:  # every save, the last step's included
            keep = -(-self.max_steps // self.save_every)
        else:  # the newest N, and the one being saved
            keep = kept + 1
        checkpoint, export = 12 * n_params, 2 * n_params
        needed = keep * checkpoint + export
        if needed > free:
            counted = (f"{keep} at a time: keep_last_checkpoints and the one being saved" if kept
                       else f"keep_last_checkpoints=all keeps all {keep}")
            self.log(f"warning: disk: output_dir's filesystem has {_size(free)} free; this run writes checkpoints "
                     f"of about {_size(checkpoint)} ({counted}) "
                     f"and a {_size(export)} export, {_size(needed)} in all. Fix: free space, "
                     "keep_last_checkpoints=1, or an output_dir on a larger disk.")

    def check_tasks(self) -> None:
        """Warn at the start when the limit on threads and processes (a container's pids
        limit, ``ulimit -u``) leaves fewer than this run starts: short of them, it failed
        wherever it next started one, or hung in its data loader (components/tasks.py)."""
        room = tasks.headroom()
        if room is None:
            return
        compile_threads = 0
        if self.compiled_keys():
            import torch._inductor.config as inductor_config

            compile_threads = int(inductor_config.compile_threads or 1)
        workers = int(self.cfg.data.get("num_workers", 0) or 0)
        per_process = tasks.needed(torch.get_num_threads(), workers, usable_cores(), HASH_THREADS, compile_threads)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's; the process group is not up yet
        more = max(0, per_process - tasks.own_tasks()) * local
        if more > room[0] and int(os.environ.get("RANK", 0)) == 0:
            each = " each" if local > 1 else ""
            self.log(f"warning: {tasks.limit_name(room)}: this run starts about {per_process} threads and processes"
                     f"{each} ({torch.get_num_threads()} of torch's, {workers} data loader worker(s) with theirs"
                     + (f", {compile_threads} compile workers" if compile_threads else "") + f"), and {max(0, room[0])} "
                     f"more may start ({room[1]}): short of them, a thread that cannot start ends the run"
                     + (", or leaves it waiting in the data loader" if workers else "") + f". Fix: {tasks.FIX}.")

    def check_memory(self, planned: nn.Module) -> None:
        """Refuse, in one line, a run whose weights, gradients and AdamW moments alone (16
        bytes a parameter, shared by the FSDP2 shards) exceed what this process may
        allocate: at 7B on a laptop the kernel would otherwise kill it mid-build, without a
        word. A run the cost model puts above it in total gets a warning and goes ahead
        (the estimate is a model). ``memory_check: false`` skips this check."""
        if not self.cfg.get("memory_check", True):
            return
        available = parallel.memory_per_process_gb(self.device)
        if available is None:
            return
        teacher_args, teacher_sharded = self.planned_teacher()
        estimate = PretrainRecipe.memory_estimate(self, teacher_args, teacher_sharded, model_args=planned.model_args)
        where = "the GPU has" if self.device.type == "cuda" else "this host has"
        share = "" if self.device.type == "cuda" or self.local_processes == 1 else \
            f" (its available memory shared by {self.local_processes} processes)"
        limited = parallel.rlimit_left_gb() if self.device.type == "cpu" else None
        raise_limit = ""
        if limited is not None and limited[0] <= available:  # the process's own limit binds, not the host
            where, share = "this process's limit leaves", f" (its {limited[1]})"
            raise_limit = f"`{limited[1]} unlimited` (or higher) before the command, "
        resident = estimate.optimizer_step_gb
        if resident > available:
            raise RecipeError(
                f"memory: this run needs at least {resident:.1f} GiB per process for its weights, gradients and "
                f"AdamW moments ({count_parameters(planned) / 1e9:.2f}B parameters, 16 bytes each"
                + (f", over {self.shards} shards" if self.shards > 1 else "") + f"), and {where} {available:.1f} GiB "
                f"free{share}. Fix: {raise_limit}a smaller model, more processes with FSDP2 (each holds 1/N of these), "
                "or `memory_check=false` to try anyway; `dry_run=true` prints every term of the estimate.")
        # a GPU's free memory counted as the dry run counts a GPU's: the caching allocator keeps more than tensors hold
        usable, counted = (USABLE_SHARE * available, f" ({USABLE_SHARE:.0%} of it counted, as the dry run counts it)") \
            if self.device.type == "cuda" else (available, "")
        if estimate.total_gb > usable:
            self.log(f"warning: memory: the cost model puts this run at {estimate.total_gb:.1f} GiB per process (peak "
                     f"at the {estimate.peak_phase}) and {where} {available:.1f} GiB free{share}{counted}: it may run "
                     "out of memory. Fix: a smaller batch_size with more gradient_accumulation_steps, "
                     "activation_checkpointing.mode=full, loss_chunk_tokens; `dry_run=true` prints every term.")

    @property
    def local_processes(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.world_size > 1 else 1

    def setup_model(self) -> None:
        cfg = self.cfg
        # Sharded runs build on the meta device and initialise after sharding: no rank ever
        # holds the full model (a 7B fp32 model is 30 GB per process otherwise).
        with torch.device("meta") if self.fsdp else nullcontext():
            self.model = self.build_student()
        self.check_student(self.model)
        self.model_args = self.model.model_args
        # MFU's numerator: the student's model FLOPs (forward and backward, no recompute, no teacher), as the
        # dry run and torchtitan count them; the denominator: metrics.peak_tflops, or the GPU's bf16 peak by name
        self.flops_per_token = 3 * forward_flops_per_token(self.model_args, int(cfg.data.seq_len))
        peak = (cfg.get("metrics") or {}).get("peak_tflops")
        if peak is None and self.device.type == "cuda" and self.autocast_dtype == torch.bfloat16:
            peak = peak_bf16_tflops(torch.cuda.get_device_name(self.device))
        self.peak_tflops = float(peak) if peak else None
        self.n_params = (count_parameters(self.model), count_parameters(self.model, exclude_embeddings=True))
        fsdp_options = cfg.get("fsdp") or {}
        self.mesh = parallel.device_mesh(self.device, int(fsdp_options.get("replicate_degree", 1))) \
            if self.fsdp else None
        self.mp_policy, self.parallel_notes = parallel.parallelize(
            self.model, self.device, self.fsdp, self.autocast_dtype, float8=cfg.get("float8") or {},
            activation_checkpointing=cfg.get("activation_checkpointing") or {}, compile=bool(cfg.get("compile", False)),
            fsdp_options=fsdp_options, seed=int(cfg.seed), init_std=cfg.model.get("init_std", 0.02), mesh=self.mesh)
        if self.mp_policy is not None:  # FSDP2 casts parameters itself; no autocast on top
            self.autocast_dtype = None

    def fingerprints(self) -> Dict[str, str]:
        """Hook for subclasses: fingerprints of more inputs the run reads (LET's teacher), recorded in
        run_info.json so that a resume on changed ones is refused (components/resume.py)."""
        return {}

    def settled_at(self, checkpoint: Path) -> List[str]:
        """Hook for subclasses: what no longer shapes the run from this checkpoint's step on
        (LET's teacher past S_stop), so that a resume may find it changed."""
        return []

    def setup_extra(self) -> None:
        """Hook for subclasses: build more parts (a teacher, an aligner) before the optimizer."""

    def _param_groups(self, weight_decay: float):
        # No decay on norms and biases (1-D tensors): decaying them only fights the init.
        decay = [p for p in self.trainable.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.trainable.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---------------------------------------------------------------- train
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, tokens: torch.Tensor, labels: torch.Tensor, **extra: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Loss of one micro-batch and the figures to log about it (tensors stay on the
        device: they are read only on log steps). ``extra``: what a ``collate`` added to
        the batch (LET's cross-tokenizer mapping). LET overrides this."""
        _, nll = forward_with_loss(self.model, tokens, labels, chunk_tokens=self.loss_chunk_tokens)
        return nll, {"nll": nll.detach()}

    def reduced(self, figures: Dict[str, Any]) -> None:
        """Hook for subclasses: the step's figures, averaged over ranks and micro-batches,
        before the update (LET's auto schedule reads its gradient measurement here)."""

    def after_step(self) -> None:
        """Hook for subclasses, called after each optimizer step."""

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step (over ``gradient_accumulation_steps`` micro-batches); its record.

        No host sync unless ``divergence.policy=skip`` (which must decide before updating):
        the step's finiteness is queued and read at the next sync point (:meth:`resolve`).
        """
        self.step_checks: List[Tuple[torch.Tensor, str]] = []  # (flag on the device, error if it is false)
        sums: Dict[str, Any] = {}
        replicated = self.mesh is not None and self.mesh.ndim == 2 and self.grad_accum > 1
        deferred = self.fsdp and self.grad_accum > 1 and not self.reduce_every_micro_batch
        for micro in range(self.grad_accum):
            if deferred:  # one reduction per step, of the summed unsharded gradients
                parallel.reduce_gradients(self.trainable, micro == self.grad_accum - 1)
            elif replicated:  # HSDP: one all-reduce across replicas per step, at its last micro-batch
                parallel.all_reduce_across_replicas(self.trainable, micro == self.grad_accum - 1)
            asked = time.perf_counter()
            batch = self.batches.next()
            self.timer.add_host_time("data_wait", time.perf_counter() - asked)
            with self.autocast():
                loss, figures = self.compute_loss(batch.pop("tokens"), batch.pop("labels"), **batch)
            (loss / self.grad_accum).backward()
            figures["loss"] = loss.detach()
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + v / self.grad_accum
        # Tensors are averaged over ranks (a NaN on any rank reaches every rank), queued checks
        # with them (a check failing on one rank fails on all: every rank decides alike);
        # numbers such as lambda are the same everywhere.
        shared = {k: v for k, v in sums.items() if isinstance(v, torch.Tensor)}
        if self.step_checks:
            shared[CHECKS] = torch.stack([flag.reshape(()).float() for flag, _ in self.step_checks]).min()
        sums.update(parallel.all_reduce_mean(shared))
        checks_passed = sums.pop(CHECKS, None)
        self.reduced(sums)
        grad_norm = None
        if self.cfg.get("clip_grad_norm"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), float(self.cfg.clip_grad_norm))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        finite = self.finite_flag(sums, grad_norm, checks_passed)
        skipped = False
        if self.divergence.policy == "skip":
            if bool(finite):  # the one host sync this policy needs
                self.optimizer.step()
                self.divergence.ok()
            else:
                skipped = True
                self.on_divergence(self.step + 1, sums, grad_norm, checks_passed, self.step_checks)
        else:  # stop: a bad step is caught at the next sync point, before any evaluation or save
            self.optimizer.step()
            self.unresolved.append((self.step + 1, finite, sums, grad_norm, checks_passed, self.step_checks))
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        self.timer.step_done()
        return {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm, **({"skipped": True} if skipped else {})}

    def finite_flag(self, figures: Dict[str, Any], grad_norm, checks_passed=None) -> torch.Tensor:
        """True on the device when every figure, the gradient norm and the queued checks
        (1.0 when they passed on every rank) are fine."""
        values = [v.detach().reshape(()).float() for v in figures.values() if isinstance(v, torch.Tensor)]
        values += [grad_norm.reshape(()).float()] if grad_norm is not None else []
        flags = [torch.isfinite(torch.stack(values)).all()] if values else []
        flags += [checks_passed.reshape(()) == 1.0] if checks_passed is not None else []
        return torch.stack(flags).all() if flags else torch.tensor(True)

    def resolve(self) -> None:
        """A sync point: read the queued steps' finiteness in one transfer; the first bad
        step (on any rank) stops the run, named."""
        if not self.unresolved:
            return
        flags = torch.stack([entry[1] for entry in self.unresolved]).tolist()
        pending, self.unresolved = self.unresolved, []
        for ok, (step, _, figures, grad_norm, checks_passed, checks) in zip(flags, pending):
            if not ok:
                self.on_divergence(step, figures, grad_norm, checks_passed, checks)

    def on_divergence(self, step: int, figures: Dict[str, Any], grad_norm, checks_passed, checks) -> None:
        """A non-finite step (seen identically on every rank): a failed check stops the run
        with its own message; otherwise ``divergence.policy`` skips the update or stops."""
        if checks_passed is not None and float(checks_passed) < 1.0:  # here or on another rank: all stop
            failed = [message for flag, message in checks if not bool(flag)]
            raise DivergenceError(failed[0] if failed else f"{checks[0][1]} (seen on another rank)")
        figures = to_python(figures)
        grad_norm = None if grad_norm is None else float(grad_norm)
        note = self.divergence.skip_or_stop(step, figures, grad_norm, self.checkpointer.last_good)
        self.log(note)
        self.metrics.log({"step": step, "event": "skipped_update", **figures, "grad_norm": grad_norm})

    def lap(self) -> Dict[str, float]:
        """Timing figures since the last sync point (one device sync)."""
        elapsed, steps, parts = self.timer.lap()
        self.progress.train_time += elapsed
        record = {"tokens_per_s": self.tokens_per_step * steps / elapsed, "step_time_s": elapsed / steps,
                  "train_time_s": self.progress.train_time, "peak_memory_mb": peak_memory_mb(self.device)}
        record.update({f"{name}_time_share": seconds / elapsed for name, seconds in parts.items()})
        record["tflops_per_s"] = record["tokens_per_s"] / self.world_size * self.flops_per_token / 1e12  # per process
        if self.peak_tflops:
            record["mfu"] = record["tflops_per_s"] / self.peak_tflops
        self.data_wait(record)
        return record

    def data_wait(self, record: Dict[str, float]) -> None:
        """Every rank's share of the interval spent waiting for its next batch (host time,
        torchtitan's "data loading %"): the record keeps the mean over ranks and the largest;
        a rank whose loader cannot keep up holds every rank back in the next collective, so
        the first interval past DATA_WAIT_WARN_SHARE (the very first, with the loader's start,
        aside) is said once, naming it."""
        own = record.get("data_wait_time_share", 0.0)
        shares = parallel.gathered(own)
        record["data_wait_time_share"] = sum(shares) / len(shares)
        record["data_wait_time_share_max"] = max(shares)
        self.data_wait_laps += 1
        if self.data_wait_laps == 1 or self.data_wait_said or max(shares) <= DATA_WAIT_WARN_SHARE:
            return
        self.data_wait_said = True
        slowest = max(range(len(shares)), key=shares.__getitem__)
        who = (f"rank {slowest} (on {self.rank_hosts[slowest]}) waited for its batches {shares[slowest]:.0%} of the "
               f"time since the last log line (the mean over ranks: {record['data_wait_time_share']:.0%}): its data "
               "loading does not keep up with training, and every rank waits for it in the next collective"
               if self.world_size > 1 else
               f"this process waited for its batches {own:.0%} of the time since the last log line: data loading "
               "does not keep up with training")
        workers = int(self.cfg.data.get("num_workers", 0) or 0)
        self.log(f"warning: input: {who}. Fix: more loader processes (data.num_workers={max(2, 2 * workers)}; now "
                 f"{workers}), or the prepared folder on a faster disk. "
                 "metrics.jsonl follows it as data_wait_time_share (and _max, the slowest rank's).")

    def stop_requested(self, stopper: GracefulStop, at_sync_point: bool) -> bool:
        """Whether every rank stops after this step: one rank's signal reaches them all by the
        vote a step later, or at once at a sync point (the ranks call this at the same points)."""
        if self.world_size == 1:
            return stopper.requested
        voted = self.stop_vote.poll(stopper.requested)
        if not at_sync_point:
            return voted
        return voted or parallel.all_reduce_sum([float(stopper.requested)], self.device)[0] > 0

    def timed_step(self) -> Dict[str, Any]:
        """One step timed on its own, with its timing figures and one device sync (the
        benchmarks' step; ``train`` times whole intervals between sync points instead)."""
        self.timer.restart()
        record = self.train_step()
        self.resolve()
        record.update(self.lap())
        return record

    def train(self) -> None:
        self.trainable.train()
        progress = tqdm(total=self.max_steps, initial=self.step, desc=self.__class__.__name__, dynamic_ncols=True,
                        disable=not (self.is_main and sys.stderr.isatty() and self.cfg.get("progress_bar", True)))
        self.timer.restart()
        stopper = GracefulStop(log=self.log, at_once=lambda signal_name: (
            f"stopped at once by a second {signal_name} after step {self.step}, without saving. "
            f"{self.checkpointer.what_is_kept()} Fix: run the same command with resume=true to continue from it."
        )).install()
        restore_console = forgive_console_errors(on_failure=stopper.request)  # a console that closes: save, stop
        self.stop_vote = StopVote()
        folders = {"output_dir": self.output_dir,
                   "data.cache_dir": Path(self.cfg.data.get("cache_dir", "outputs/cache")),
                   **path_keys(self.cfg)}  # a failing read of the corpus or the teacher names its key
        try:  # a full disk or a lost mount: one line that says what is intact
            with environment_errors(folders, "training", kept=self.checkpointer.what_is_kept,
                                    then="run the same command with resume=true"):
                self._train_loop(progress, stopper)
        except (RuntimeError, MemoryError) as err:
            if is_out_of_memory(err):
                raise self.out_of_memory(err) from err
            shared = shared_memory_exhausted(err, int(self.cfg.data.get("num_workers", 0) or 0))
            if shared is not None:
                raise DataError(f"{shared} {self.checkpointer.what_is_kept()} Fix: free it (ls {SHARED_MEMORY}), give "
                                "it more room (--shm-size=1g), or data.num_workers=0 (batches read in this process), "
                                "then run the same command with resume=true.") from err
            failure = parallel.collective_failure(err)
            if failure is None:
                raise
            raise self.collective_failed(failure, err) from err
        finally:
            if self.profiler is not None:  # a window cut short is written with the steps it holds
                self.profiler.close()
            self.stop_vote.close()
            stopper.uninstall()
            if not stopper.requested:  # else the console may be gone: its last lines are dropped, not fatal
                restore_console()

    def memory_estimate(self, teacher_args=None, teacher_sharded: bool = False, model_args=None):
        """The cost model's memory per process for this run (``dry_run=true`` prints its terms)."""
        cfg = OmegaConf.merge(self.cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in self.resolved_dtypes.items()]))
        return config_memory(cfg, model_args or self.model_args, self.world_size, teacher_args, teacher_sharded)

    def collective_failed(self, failure: str, err: BaseException) -> "CollectiveFailed":
        """One line for a collective that gave up on another process: which, when, and what to do."""
        cause = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        timeout = int(self.cfg.get("process_group_timeout_s", 600))
        what = (f"waited {timeout} s (process_group_timeout_s) for another process that never joined the collective: "
                "one hung (a stopped process, a stuck GPU or filesystem) or died unseen"
                if failure == "timeout" else "lost another process in a collective: it died or its node went away")
        return CollectiveFailed(
            f"rank {self.rank} {what}, at step {self.step + 1} ({cause}). {self.checkpointer.what_is_kept()} Fix: look "
            "for the process that stopped (the launcher's summary names the ranks that failed; `py-spy dump --pid` "
            "shows where a live one waits), then run the same command with resume=true"
            + ("; if a step can take that long (a first step that compiles, a save to a slow filesystem), a larger "
               "process_group_timeout_s." if failure == "timeout" else "."))

    def out_of_memory(self, err: BaseException) -> OutOfMemory:
        """One line for a step that ran out of memory: where, how much the device has, what
        the cost model expected, and what to change (checkpoints already written are intact)."""
        where = f"at step {self.step + 1}" + (f" on rank {self.rank}" if self.world_size > 1 else "")
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        figures = ""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            figures = (f" The device has {total:.1f} GiB; the run's peak allocation was "
                       f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB.")
        try:
            estimate = self.memory_estimate()
            figures += (f" The cost model gives {estimate.total_gb:.1f} GiB per process for this config (peak at the "
                        f"{estimate.peak_phase}; `dry_run=true` prints every term).")
        except Exception:  # noqa: BLE001 - the advice below stands without the figure
            pass
        batch = int(self.cfg.batch_size)
        half = max(1, batch // 2)
        chunking = "" if self.loss_chunk_tokens else "loss_chunk_tokens=1024 (the logits are then never whole), "
        return OutOfMemory(
            f"out of memory {where} ({type(err).__name__}: {cause}).{figures} Fix: batch_size={half} with "
            f"gradient_accumulation_steps={-(-batch * self.grad_accum // half)} (the same tokens per step), "
            f"activation_checkpointing.mode=full, {chunking}or more processes (FSDP2 divides weights, gradients and "
            f"optimizer state among them). {self.checkpointer.what_is_kept()}")


    def _train_loop(self, progress: tqdm, stopper: GracefulStop) -> None:
        trained_from = self.step
        clock = ProgressClock(self.max_steps, self.step, self.tokens_per_step)
        if self.cfg.get("compile", False) and self.step < self.max_steps:  # a silent first step would look hung
            self.log(f"step {self.step + 1} compiles the blocks first (minutes for a 7B model on a GPU); the ETA "
                     "settles from the second log line")
        first_pass = self.batches.epoch == 0  # its end is logged once: later passes are the metric `epoch`
        if self.profiler is not None:
            self.profiler.start()
        while self.step < self.max_steps:
            record = self.train_step()
            if self.profiler is not None:
                self.timer.exclude(self.profiler.step_done(self.step))  # writing a trace is not training time
            progress.update(1)
            if first_pass and self.batches.epoch > 0:
                first_pass = False
                self.log(f"step {self.step}: all {len(self.train_set)} training sequences are read; epoch 2 begins "
                         "and they repeat, reshuffled", progress)
            last = self.step == self.max_steps
            evaluate = bool(self.eval_every) and (self.step % self.eval_every == 0 or last)
            save = bool(self.save_every) and self.step % self.save_every == 0 and not last
            log = evaluate or last or self.step % self.log_every == 0
            # one process reads the flag every step; ranks agree on it at their sync points
            stopping = not last and self.stop_requested(stopper, at_sync_point=log or save)
            save = save or stopping
            if log or save:  # a sync point: nothing is evaluated, saved or logged past a bad step
                self.resolve()
                record.update(self.lap())
            if evaluate:
                record["val_loss"] = self.evaluate()
            if log:
                record = {**to_python(record), "tokens": self.progress.tokens,
                          "epoch": round(self.batches.epochs_read, 4), **self.source_tokens(),
                          **clock.update(self.step)}
                self.metrics.log(record)
                self.log(format_record(record, self.max_steps, self.console_fields), progress)
            self.after_step()
            if save:
                self.save_checkpoint()
                # a signal that came during the save: this step is saved, stop here
                stopping = stopping or self.stop_requested(stopper, at_sync_point=True)
            if stopping:
                self.checkpointer.wait()
                raise RunStopped(
                    f"stopped by {stopper.cause() or 'a signal on another rank'} after step {self.step}; its "
                    f"checkpoint {self.checkpointer.latest()} is complete. Fix: run the same command with "
                    "resume=true to continue.")
            if log or save:
                self.timer.restart()  # evaluation, logging and saving are not training time
        progress.close()
        self.resolve()
        final = self.output_dir / "final"
        if trained_from == self.max_steps and final.is_dir() and exported_step(final) == self.step:
            # a finished run launched again (a scheduler's requeue): its checkpoint and export stand as they are.
            # An export of an earlier step (a resumed run whose own export failed or was stopped) is written anew
            self.log(f"step {self.step} is max_steps: the run is complete, nothing to train; its checkpoint and "
                     f"{self.output_dir / 'final'} are left as they are")
            return
        latest = self.checkpointer.latest()
        if self.save_every and (latest is None or step_of(latest) != self.step):
            self.save_checkpoint()
        self.checkpointer.wait()
        self.export_unless_stopped(stopper)

    def export_unless_stopped(self, stopper: GracefulStop) -> None:
        """The final export, after the last step's checkpoint. Once that checkpoint is complete
        a signal has nothing left to wait for: the export (minutes for a 7B model) stops at once
        and ``resume=true`` writes it later (a finished run only exports). Before, the signal's
        "finishing this step, then saving a checkpoint" was followed by the whole export and a
        success. With save_every=0 the export is the weights' only copy: it is finished first."""
        final = self.output_dir / "final"
        if not (self.cfg.get("export") or {}).get("enabled", True):
            self.export()
            return
        self.restore_run_records("export")  # with save_every=0 no save came before to see a removed folder
        latest = self.checkpointer.latest()
        if self.fsdp and (latest is None or step_of(latest) != self.step):  # FSDP exports from a checkpoint
            self.save_checkpoint()
            self.checkpointer.wait()
            latest = self.checkpointer.latest()
        if latest is None or step_of(latest) != self.step:
            stopper.notice = (f"step {self.step}, the last, is trained: finishing the export to {final} first (with "
                              "save_every=0 it is the weights' only copy)")
            self.export()
            if stopper.requested:  # it came during the last step, when "saving a checkpoint" was said
                self.log(f"{stopper.cause()} asked for a stop at the last step: with save_every=0 the export was the "
                         "weights' only copy, so it was written; the run is complete")
            return
        then = (f"its checkpoint {latest} is complete; " + (f"{final} is as it was" if final.exists() else
                                                            f"no {final} was written")
                + ". Fix: run the same command with resume=true to write the export (a finished run only exports).")
        def at_once(signal_name: str) -> str:
            return f"stopped by {signal_name} during the final export, after step {self.step}, the last: {then}"

        # one process sets it first: a signal from here on stops at once, one before it is the request read
        # below. With several, after the collective that reads it: a rank raising inside it would leave the
        # others waiting in it for process_group_timeout_s
        if self.world_size == 1:
            stopper.first_at_once = at_once
        if self.stop_requested(stopper, at_sync_point=True):  # asked for during the last step or its save
            raise RunStopped(f"stopped by {stopper.cause() or 'a signal on another rank'} after step {self.step}, "
                             f"the last: {then}")
        stopper.first_at_once = at_once
        self.export()

    def export(self) -> None:
        """``<output_dir>/final`` in Hugging Face format. A sharded model is never gathered:
        rank 0 converts the final DCP checkpoint tensor by tensor while the others finish."""
        spec, final = self.cfg.get("export") or {}, self.output_dir / "final"
        if not spec.get("enabled", True):  # benchmarks: no final checkpoint or conversion to wait for
            self.log("export.enabled=false: no final export")
            return
        dtype, max_shard_mb = export_dtype(spec.get("dtype", "bf16")), int(spec.get("max_shard_mb", 5120))
        # a failed export (a full disk) is redone by a relaunch of a finished run, from its last checkpoint
        kept_a_checkpoint = bool(self.save_every) or self.fsdp  # FSDP exports from a checkpoint it saves
        then = ("run the same command with resume=true (a finished run only exports)" if kept_a_checkpoint else
                "train again (save_every=0 kept no checkpoint to export from)")
        if not self.fsdp:
            export_model(self.model, self.model_args, final, self.tokenizer, dtype, max_shard_mb, key="output_dir",
                         then=then, step=self.step)
        else:
            latest = self.checkpointer.latest()
            if latest is None or step_of(latest) != self.step:
                self.save_checkpoint()
                self.checkpointer.wait()
            if self.is_main:
                export_checkpoint(self.checkpointer.latest(), final, dtype, overwrite=True, max_shard_mb=max_shard_mb,
                                  verify=False, key="output_dir", then=then)  # written and hashed moments ago
        self.log(f"exported {final} (Hugging Face format, {dtype})")

    def source_tokens(self) -> Dict[str, int]:
        """Tokens each mixture source has given, summed over ranks (empty for one source)."""
        counts = self.batches.figures()
        totals = parallel.all_reduce_sum([float(v) for v in counts.values()], self.device) if counts else []
        return {name: int(total) for name, total in zip(counts, totals)}

    def restore_run_records(self, moment: str = "save") -> None:
        """The run folder removed while the run trains (an ``rm -r`` of the wrong folder, a
        scratch filesystem's purge of old files) took the run's records with it; the saves went
        on into a folder that resume and ``letrecipes status`` took for no run's, without a lock
        that kept a second launch out. Before each save the records are written again, said.
        Rank 0 writes them; if that fails, every rank stops alike (not in the save's collective)."""
        parallel.on_rank0(lambda: self._restore_run_records(moment))

    def _restore_run_records(self, moment: str) -> None:
        gone = [name for name in ("run_info.json", "config.yaml", METRICS_FILE)
                if not (self.output_dir / name).exists()]
        if self.checkpointer.take_back_lock():
            gone.append("the run lock")
        if not gone:
            return
        with environment_errors("output_dir", f"writing the run's records in {self.output_dir} again",
                                kept=self.checkpointer.what_is_kept, then="run the same command with resume=true"):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            replace_atomically(self.output_dir / "run_info.json", json.dumps(self.run_info, indent=2, default=str))
            replace_atomically(self.output_dir / "config.yaml", OmegaConf.to_yaml(self.cfg))
            self.metrics.jsonl.reopen_if_gone()
        warnings.warn(f"output_dir: {in_words(gone)} {'were' if len(gone) > 1 else 'was'} gone at step {self.step}'s {moment} (the "
                      f"folder {self.output_dir} was removed, or purged, while the run trained): written again, so the "
                      "folder stays this run's (resume=true, letrecipes status)" + (
                          f"; the records logged before are lost: {METRICS_FILE} holds those from here on"
                          if METRICS_FILE in gone else "") + ".", LetRecipesWarning, stacklevel=2)

    def save_checkpoint(self) -> None:
        self.restore_run_records()
        # the tokens beside the weights: an evaluation of the checkpoint reads where it lies on the run
        path = self.checkpointer.save(self.step, run_info={**self.run_info, "trained_tokens": self.progress.tokens})
        timing = self.checkpointer.last_save
        self.log(f"checkpoint: {path}" + (f" ({timing['bytes'] / 2**20:,.1f} MB, {timing['save_s']:.2f} s, of which "
                                          f"checksums {timing['checksum_s']:.2f} s)" if timing else " (async)"))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.trainable.eval()
        total, count = 0.0, 0
        for i, batch in enumerate(self.val_loader):
            if i >= int(self.cfg.get("eval_batches", 8)):
                break
            tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
            with self.autocast():
                _, nll = forward_with_loss(self.model, tokens, labels, chunk_tokens=self.loss_chunk_tokens)
            total += nll.item() * labels.numel()
            count += labels.numel()
        self.trainable.train()
        total, count = parallel.all_reduce_sum([total, count], self.device)
        return total / count

    def log(self, message: str, progress: tqdm = None) -> None:
        if not getattr(self, "is_main", True):
            return
        if progress is not None and not progress.disable:
            progress.write(message)  # keeps the bar below the log lines
        else:
            print(message, flush=True)

    def node_log(self, message: str) -> None:
        """The log of another node's first process (rank 0 logs the run)."""
        import socket

        print(f"[rank {self.rank} on {socket.gethostname()}] {message}", flush=True)

    def cleanup(self) -> None:
        """Close what setup opened, however far it got (it also runs after a failed setup)."""
        try:
            if hasattr(self, "metrics"):
                self.checkpointer.wait()
                self.metrics.close()
        finally:
            if hasattr(self, "checkpointer"):
                self.checkpointer.release()
        if hasattr(self, "settings_before_deterministic"):  # process-wide switches: hand them back as found
            apply_determinism_settings(*self.settings_before_deterministic)
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def use_deterministic_algorithms() -> Tuple[bool, bool, bool]:
    """Bit-identical reruns on a GPU, at some speed. CUDA's fastest kernels for attention's
    backward and for scatter-adds accumulate with atomics, so two runs of the same step can
    differ in the last bits and drift apart (seen on an H200: equal losses for three steps,
    then 7.8828 against 7.8834). cuBLAS needs a fixed workspace to repeat its reductions
    (that variable is left set: cuBLAS reads it once per process). Returns the settings it
    replaced, for :func:`apply_determinism_settings` to put back."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    apply_determinism_settings(True, True, False)
    return before


def apply_determinism_settings(algorithms: bool, cudnn_deterministic: bool, cudnn_benchmark: bool) -> None:
    torch.use_deterministic_algorithms(algorithms)
    torch.backends.cudnn.deterministic = cudnn_deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@parse
def recipe_main(cfg: DictConfig) -> None:
    """Plain causal-LM pretraining."""
    run(PretrainRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
