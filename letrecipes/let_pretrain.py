"""Pretraining with Late-to-Early Training (LET).

    tune run letrecipes/let_pretrain --config let_tiny [key=value ...]

This is ``letrecipes/pretrain.py`` plus three things:

1. ``setup_extra``: load the frozen teacher and build the aligner (layer map,
   projector, alignment loss, lambda schedule) from the ``teacher`` and ``alignment``
   config sections;
2. ``compute_loss``: ``loss = NLL + lambda(step) * align(P(h_student[k]), h_teacher[L])``,
   teacher and student fed the same token ids;
3. ``after_step``: once lambda is 0 for good, drop the teacher and free its memory; the
   rest of the run is exactly plain pretraining (a run resumed from there never loads it).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from letrecipes._config import parse, run
from letrecipes.components import parallel, registry
from letrecipes.components.checkpointing import step_of
from letrecipes.components.resume import saved_run_info, uses_teacher as ran_with_teacher
from letrecipes.components.aligner import build_aligner
from letrecipes.components.tokenizer import Tokenizer
from letrecipes.components.metrics import current_memory_mb
from letrecipes.components.models import ModelArgs, forward_with_hidden, forward_with_loss, nll_loss
from letrecipes.components.cross_tokenizer import CrossTokenizerCollate, check_encodable, spread_indices
from letrecipes.components.errors import LetRecipesError
from letrecipes.components.teachers import (TeacherError, check_shardable, content_fingerprint, describe_teacher,
                                            existing_path, load_teacher, load_teacher_sharded, teacher_format,
                                            teacher_bos, tokenizer_file)
from letrecipes.pretrain import PretrainRecipe, RecipeError

MISSING = object()  # a key a run_info.json does not hold (written before it was recorded)


class LETPretrainRecipe(PretrainRecipe):
    uses_teacher = True
    teacher_bos: Optional[Tuple[int, str]] = None  # the BOS the teacher reads first (_teacher_bos)
    # the plain recipe's fields, with LET's after loss and nll (progress fields stay in one place)
    console_fields = (*PretrainRecipe.console_fields[:2], ("align_loss", ".4f"), ("lambda", ".3g"), ("rho", ".3g"),
                      ("rho_measured", ".3g"), ("cosine", ".3f"), *PretrainRecipe.console_fields[2:])

    def setup_data(self) -> None:
        self._check_alignment_end()
        self.teacher_shape = self._shape_past_stop()
        if self.teacher_shape is not None:  # resumed past S_stop: plain pretraining, the teacher is not read
            self.log(f"resume: {self.resume_from.name} is past S_stop; the teacher is not loaded (its shape for the "
                     f"aligner's saved state comes from the checkpoint's run_info.json: {self.teacher_shape})")
            super().setup_data()
            return
        # The teacher's config.json or GGUF header is read now, not after hours of preparing data: an
        # unsupported family, too short a context or too small a vocabulary stops the run here.
        described = self.described_teacher()
        if self.cfg.teacher.get("placement") == "sharded" and self.fsdp:
            check_shardable(described, self.cfg.teacher)
        teacher_file = self._teacher_tokenizer_file()
        self.teacher_bos = self._teacher_bos()
        self.collate = self._cross_tokenizer_collate(teacher_file)  # before the loader is built: it collates with it
        if described is not None and self.collate is None:
            # 0: a config.json that states no context (ALiBi models, run by transformers)
            self._check_teacher_reads_the_ids(described.max_seq_len or None, described.vocab_size,
                                              str(self.cfg.teacher.path))
        if described is not None:
            self._rehearse_alignment(described)
        super().setup_data()

    def _rehearse_alignment(self, teacher_args: ModelArgs) -> None:
        """The alignment section built for the student's and the teacher's shapes (the teacher's
        read from its header) and rehearsed, as it is again once the teacher is loaded: a
        layer outside either model's depth, a projector that cannot join the two widths or a
        part of one's own that fails is named before hours of preparing the corpus. The random
        state is left as it was, so the student starts from the same weights as without it."""
        student = self.planned_args  # the shape check_resources planned (and check_student vouched for)
        with torch.random.fork_rng(devices=[]):
            build_aligner(self.cfg.alignment, student_dim=student.embed_dim,
                          student_depth=student.num_layers, teacher_dim=teacher_args.embed_dim,
                          teacher_depth=teacher_args.num_layers, total_steps=self.max_steps,
                          vocab_size=self.tokenizer.vocab_size, cross_tokenizer=self.collate is not None)

    def _teacher_tokenizer_file(self) -> Optional[Path]:
        """The teacher's own tokenizer.json, read without its weights; None for a teacher without one."""
        teacher_path = self.cfg.teacher.get("path")
        if not teacher_path:
            return None  # load_teacher names the missing key
        existing_path(teacher_path, key="teacher.path")
        try:
            found = tokenizer_file(teacher_path, key="teacher.path", fmt=teacher_format(self.cfg.teacher))
        except TeacherError:
            return None  # a teacher without a tokenizer of its own: it must read the student's ids
        return found if found is not None and found.is_file() else None

    def _teacher_bos(self) -> Optional[Tuple[int, str]]:
        """The BOS put before each window the teacher reads (``teacher.prepend_bos``). A resumed
        run goes on as it began: one begun before the BOS was put there (its run_info.json does
        not say) goes on without it."""
        if not self.cfg.teacher.get("path"):
            return None  # load_teacher names the missing key
        bos = teacher_bos(self.cfg.teacher)
        saved = saved_run_info(self.resume_from) if self.resume_from is not None else None
        if not saved or not ran_with_teacher(saved):
            return bos
        began = saved.get("teacher_bos", MISSING)
        if began is MISSING:
            if bos is not None:
                self.log(f"resume: {self.resume_from.name} began before the teacher read its tokenizer's BOS "
                         f"{bos[1]!r} before each window (teacher.prepend_bos=auto since 2026-12-07); the run goes on "
                         "without it, as it began")
            return None
        if isinstance(began, list) and len(began) == 2 and isinstance(began[0], int):
            return began[0], str(began[1])
        return None if began is None else bos  # a record edited by hand: what the files say

    def _cross_tokenizer_collate(self, teacher_file: Optional[Path]):
        """``alignment.cross_tokenizer``: true, false, or auto (the default: on exactly when
        the teacher's own tokenizer reads text differently from the student's)."""
        cfg = self.cfg
        setting = cfg.alignment.get("cross_tokenizer", "auto")
        if setting not in (True, False, "auto"):
            raise RecipeError(f"alignment.cross_tokenizer={setting!r}: use auto, true or false.")
        teacher_path = cfg.teacher.get("path")
        if not teacher_path:
            return None  # load_teacher names the missing key
        if teacher_file is None:
            if setting is True:
                raise RecipeError(f"alignment.cross_tokenizer=true, but teacher.path={teacher_path!r} has no "
                                  "tokenizer.json of its own to read the text with. Fix: put the teacher's "
                                  "tokenizer.json next to its weights, or set alignment.cross_tokenizer=auto.")
            return None
        teacher_tokenizer = Tokenizer(teacher_file)
        same = teacher_tokenizer.reads_like(self.tokenizer)
        if setting is False or (setting == "auto" and same):
            self.log("alignment: the teacher reads the student's token ids (same tokenizer"
                     + (")" if same else "; alignment.cross_tokenizer=false)"))
            return None
        self.log(f"alignment: cross-tokenizer: the teacher reads its own tokens ({teacher_file}) of the student's "
                 "text, each student position aligned to the teacher tokens that end by its own end ("
                 + ("alignment.cross_tokenizer=true)" if setting is True else
                    "the tokenizers differ; alignment.cross_tokenizer=auto)"))
        return CrossTokenizerCollate(self.tokenizer.hf, teacher_tokenizer.hf, teacher_context=None,
                                     teacher_eos_id=teacher_tokenizer.eos_id)

    def fingerprints(self) -> Dict[str, str]:
        if self.teacher_shape is not None:
            # past S_stop the teacher's files are not read (they may be gone): the checkpoint's record of the
            # teacher that guided the run goes on into the next checkpoints, not a null that reads as a change
            saved = (saved_run_info(self.resume_from) or {}).get("teacher_fingerprint")
            return {"teacher_fingerprint": saved} if saved else {}
        if not self.cfg.teacher.get("path"):
            return {}  # load_teacher names the missing key
        return {"teacher_fingerprint": content_fingerprint(existing_path(self.cfg.teacher.path, key="teacher.path"))}

    def settled_at(self, checkpoint: Path) -> List[str]:
        # the stop may be restated (0.25 of 400 steps as 100): _check_alignment_end has judged where the end moves
        return ["alignment.schedule.stop"] + (["teacher fingerprint"] if self._past_stop(checkpoint) else [])

    @staticmethod
    def _alignment_end(schedule_cfg: Any, max_steps: int) -> Optional[int]:
        """S_stop in steps: the first step from which lambda is 0 for good (None: never)."""
        return registry.build("schedule", schedule_cfg, key="alignment.schedule", total_steps=max_steps).end_step

    def _past_stop(self, checkpoint: Optional[Path]) -> bool:
        """Whether ``checkpoint`` was written at or after S_stop (lambda 0 from there on)."""
        step = step_of(checkpoint) if checkpoint is not None else None
        if step is None:
            return False
        end = self._alignment_end(self.cfg.alignment.get("schedule", "linear"), self.max_steps)
        return end is not None and step >= end

    def _check_alignment_end(self) -> None:
        """A resume that moves S_stop (a new max_steps with ``stop`` a fraction of it, or a new
        ``stop``) is logged; one that would bring back a teacher the run has released (LET
        guides the early steps only, and its files may be gone) is refused, with the stop
        that keeps the end where it was."""
        step = step_of(self.resume_from) if self.resume_from is not None else None
        saved = (saved_run_info(self.resume_from) or {}).get("config") if step is not None else None
        if not saved or "max_steps" not in saved or not saved.get("alignment"):
            return  # no record, or not a LET run's checkpoint: resume.check names that
        before_cfg = saved["alignment"].get("schedule", "linear")
        now_cfg = self.cfg.alignment.get("schedule", "linear")
        try:
            before = self._alignment_end(before_cfg, int(saved["max_steps"]))
        except (LetRecipesError, TypeError, ValueError):  # a schedule of one's own no longer importable: not judged
            return
        now = self._alignment_end(now_cfg, self.max_steps)
        if before == now:
            return

        def said(end: Optional[int], cfg: Any, max_steps: int) -> str:
            stop = cfg.get("stop") if isinstance(cfg, (dict, DictConfig)) else None
            where = "never" if end is None else f"step {end}"
            return f"{where} (alignment.schedule.stop={stop} of max_steps={max_steps})" if stop is not None else where

        if before is not None and step >= before and (now is None or now > step):
            raise RecipeError(
                f"resume: {self.resume_from.name} is at step {step}, past the alignment's end at "
                f"{said(before, before_cfg, int(saved['max_steps']))}, where the teacher was released; this config "
                f"ends it at {said(now, now_cfg, self.max_steps)}, so the teacher would guide steps after {step} "
                f"again. Fix: alignment.schedule.stop={before} (a number of steps) keeps the end where it was; to "
                f"align again on purpose, start a new run from its weights (letrecipes export {self.resume_from} "
                "<folder>, then init_from=<folder>).")
        self.log(f"resume: the alignment's end (S_stop) moves from {said(before, before_cfg, int(saved['max_steps']))} "
                 f"to {said(now, now_cfg, self.max_steps)}")

    def _shape_past_stop(self) -> Optional[Dict[str, Any]]:
        """The teacher's shape as the checkpoint resumed from recorded it, when that is past
        S_stop: the aligner is rebuilt from it to load its saved state, and the teacher (a
        file that may no longer be on this node) is not read. None otherwise, and for a
        checkpoint written before the shape was recorded."""
        if not self._past_stop(self.resume_from):
            return None
        return (saved_run_info(self.resume_from) or {}).get("teacher_shape")

    def setup_extra(self) -> None:
        cfg = self.cfg
        self.placement = cfg.teacher.get("placement", "replicated")
        if self.placement not in ("replicated", "sharded"):
            raise RecipeError(f"teacher.placement={self.placement!r}: use replicated or sharded.")
        if self.teacher_shape is not None:
            self.teacher = None
            self.run_info["teacher_shape"] = self.teacher_shape  # for the next resume
            self.run_info["teacher_bos"] = (saved_run_info(self.resume_from) or {}).get("teacher_bos")
            self.aligner = self._build_aligner(**self.teacher_shape)
            return
        section = OmegaConf.to_container(cfg.teacher, resolve=True)
        section["dtype"] = self.resolved_dtypes["teacher.dtype"]  # teacher.dtype=auto, made concrete at setup
        compile_teacher = bool(cfg.teacher.get("compile", False))
        if self.placement == "sharded" and self.fsdp:
            def compile_and_shard(model):  # compile before sharding: the order that composes, as for the student
                if compile_teacher:
                    parallel.compile_blocks(model)
                parallel.shard_teacher(model, mesh=self.mesh)

            self.teacher = load_teacher_sharded(section, self.device, compile_and_shard)
        else:
            if self.placement == "sharded":
                self.log("note: teacher.placement=sharded shards the teacher over FSDP2's processes; FSDP2 is off in "
                         "this run (one process, or fsdp.enabled=false), so each process holds it whole")
            self.teacher = load_teacher(section, device=self.device)
            if compile_teacher:
                parallel.compile_blocks(self.teacher.blocks)
        self.teacher.bos = self.teacher_bos  # a resumed run's own (_teacher_bos)
        self.run_info["teacher_bos"] = list(self.teacher_bos) if self.teacher_bos else None
        self._check_teacher()
        self.run_info["teacher_shape"] = {"width": self.teacher.width, "depth": self.teacher.depth,
                                          "cross_tokenizer": self.collate is not None}
        self.aligner = self._build_aligner(**self.run_info["teacher_shape"])
        widths = getattr(self.teacher, "layer_widths", None)  # a model whose layers are not all one width
        other = [layer for layer in self.aligner.teacher_layers if widths and widths[layer] != self.teacher.width]
        if other:
            raise RecipeError(f"alignment: teacher layer {other[0]} of {self.teacher.source} is {widths[other[0]]} "
                              f"wide where its last is {self.teacher.width} (a projection after its last block), and "
                              "the projector is built for the last. Fix: align the teacher's last layer (the LET "
                              "default), or a teacher of one width throughout.")
        if self.loss_chunk_tokens and self.aligner.target == "logits":
            self.log(f"loss_chunk_tokens={self.loss_chunk_tokens}: not while the teacher runs (logit distillation "
                     "compares the student's whole logits); from S_stop on, the loss is chunked")
        self.log(f"teacher: {self.teacher.source} ({sum(p.numel() for p in self.teacher.parameters()) / 1e6:.2f}M "
                 f"parameters, {self.teacher.depth} blocks, width {self.teacher.width}"
                 + (f"; sharded over {parallel.world_size()} ranks" if self.placement == "sharded" and self.fsdp
                    else "") + "); aligning (student, teacher) "
                 f"layers {self.aligner.pairs}; schedule {self.aligner.schedule}"
                 + (f"; cross-tokenizer pooling {type(self.aligner.pooling).__name__}" if self.collate else "")
                 + (f"; it reads its BOS {self.teacher.bos[1]!r} (id {self.teacher.bos[0]}) before each window, as its "
                    f"tokenizer puts it before every text (teacher.prepend_bos)" if self.teacher.bos else ""))
        end = getattr(self.aligner.schedule, "end_step", None)
        if self._weighs_nothing(end):
            self.log(f"warning: alignment.schedule gives lambda 0 at every step the teacher runs ({self.aligner.schedule}"
                     "): the teacher costs its forward passes and teaches nothing. Fix: a lambda0 above 0 (0.1 is the "
                     "paper's), or tune run letrecipes/pretrain for a run without a teacher, if that is not meant.")
        if end is not None and end > self.max_steps:
            self.log(f"warning: alignment.schedule.stop={end} > max_steps={self.max_steps}: the teacher guides every "
                     "step and is never released (LET is an early-phase guide). Fix: a stop within the run, such as "
                     "0.25 (a fraction of max_steps), if that is not meant.")

    def _weighs_nothing(self, end: Optional[int]) -> bool:
        """Whether a schedule of plain numbers is 0 at every step before ``end`` (a measuring
        schedule, whose lambda is a device tensor, is not judged)."""
        steps = range(min(end if end is not None else self.max_steps, self.max_steps, 100_000))
        try:
            return len(steps) > 0 and all(float(self.aligner.schedule(step)) == 0.0 for step in steps)
        except (TypeError, RuntimeError):
            return False

    def _build_aligner(self, width: int, depth: int, cross_tokenizer: bool):
        aligner = build_aligner(
            self.cfg.alignment,
            student_dim=self.model.tok_embeddings.embedding_dim, student_depth=len(self.model.layers),
            teacher_dim=width, teacher_depth=depth, total_steps=self.max_steps,
            vocab_size=self.tokenizer.vocab_size, cross_tokenizer=cross_tokenizer,
        ).to(self.device)
        if self.fsdp:
            parallel.shard_module(aligner, self.mp_policy, mesh=self.mesh)
        self.trainable["aligner"] = aligner
        return aligner

    def setup(self) -> None:
        super().setup()
        if self.teacher is not None and self.aligner.finished(self.step):  # resumed past S_stop (an older checkpoint)
            self.release_teacher()

    def _check_teacher(self) -> None:
        teacher, tokenizer = self.teacher, self.tokenizer
        if self.collate is not None:
            self._check_cross_tokenizer()
            return
        self._check_teacher_reads_the_ids(teacher.context, teacher.vocab_size, teacher.source)
        if teacher.tokenizer_path is not None and not Tokenizer(teacher.tokenizer_path).reads_like(tokenizer):
            raise RecipeError(
                f"tokenizer.path={str(tokenizer.path)!r} differs from the teacher's own tokenizer "
                f"({str(teacher.tokenizer_path)!r}): teacher and student must read the same token ids "
                "(alignment.cross_tokenizer=false). Fix: alignment.cross_tokenizer=auto to align across the two "
                f"tokenizers, or tokenizer.source=teacher (tokenizer.path={teacher.tokenizer_path})."
            )

    def _check_teacher_reads_the_ids(self, context: Optional[int], vocab_size: int, source: str) -> None:
        """A teacher fed the student's token ids reads a whole training sequence (after its BOS)
        and knows every id."""
        seq_len, tokenizer, bos = int(self.cfg.data.seq_len), self.tokenizer, self.teacher_bos
        if context is not None and seq_len + (bos is not None) > context:
            raise RecipeError(
                f"data.seq_len={seq_len} is longer than the teacher's context ({context} tokens, {source}"
                + (f"; {context - 1} after the BOS {bos[1]!r} it reads first" if bos else "")
                + f"): it cannot read a whole training sequence. Fix: data.seq_len <= {context - (bos is not None)}"
                + (", or teacher.prepend_bos=false." if bos else "."))
        if vocab_size < tokenizer.vocab_size:
            raise RecipeError(
                f"teacher.path: the teacher's vocabulary ({vocab_size}) is smaller than the tokenizer's "
                f"({tokenizer.vocab_size}, tokenizer.path={str(tokenizer.path)!r}): teacher and student must read "
                "the same token ids. Fix: use the tokenizer the teacher was trained with."
            )

    def _check_cross_tokenizer(self) -> None:
        """Before training: the teacher can read the text, and how many student positions
        get a target (measured on training sequences spread over the whole set: its first
        ones all come from the first file, and a corpus's later sources may be in another
        script)."""
        collate, teacher = self.collate, self.teacher
        if teacher.vocab_size < collate.teacher.get_vocab_size():
            raise RecipeError(f"teacher.path: the teacher's vocabulary ({teacher.vocab_size}) is smaller than its own "
                              f"tokenizer's ({collate.teacher.get_vocab_size()}). Fix: the tokenizer.json that "
                              "belongs to these weights.")
        collate.context = teacher.context - (teacher.bos is not None) if teacher.context else teacher.context
        sample = [self.train_set[i] for i in spread_indices(len(self.train_set), 64)]
        texts = [self.tokenizer.decode(item["tokens"].tolist()) for item in sample]
        check_encodable(collate.teacher, texts, key="teacher.path")
        mapped = collate.map_rows(torch.stack([item["tokens"] for item in sample]).numpy())
        covered = float((mapped["teacher_last"] >= 0).mean())
        ratio = mapped["teacher_tokens"].shape[1] / sample[0]["tokens"].numel()
        self.log(f"alignment: cross-tokenizer on {len(sample)} training sequences: {covered:.1%} of student positions "
                 f"have a teacher target (the rest are masked); the teacher reads up to {ratio:.2f} tokens per "
                 "student token")

    def teacher_targets(self, tokens: torch.Tensor):
        """What the aligner needs from the frozen teacher for these tokens, timed. Their
        finiteness is queued with the step's figures and read at the next sync point."""
        with self.timer.part("teacher"):
            targets = self.aligner.teacher_targets(self.teacher, tokens)
        outputs = targets.values() if isinstance(targets, dict) else [targets]
        what = "hidden states" if isinstance(targets, dict) else "logits"
        self.step_checks.append((torch.stack([torch.isfinite(t).all() for t in outputs]).all(), (
            f"the teacher ({self.teacher.source}) produced non-finite {what} at step {self.step + 1}: its weights "
            f"are broken or overflow in teacher.dtype={self.cfg.teacher.get('dtype', 'bfloat16')}. Fix: check the "
            "checkpoint, or set teacher.dtype=fp32.")))
        return targets

    def compute_loss(self, tokens: torch.Tensor, labels: torch.Tensor, teacher_tokens=None, teacher_first=None,
                     teacher_last=None) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if self.teacher is None:  # past S_stop: plain pretraining
            loss, figures = super().compute_loss(tokens, labels)
            return loss, {**figures, "lambda": 0.0}
        weight = self.aligner.weight(self.step)
        if teacher_tokens is None:
            targets, mask = self.teacher_targets(tokens), None
        else:  # cross-tokenizer: the teacher read its own tokens of the same text
            targets, mask = self.aligner.pool(self.teacher_targets(teacher_tokens), teacher_first, teacher_last)
        if self.aligner.target == "logits":  # logit distillation compares the student's whole logits
            hidden, logits = forward_with_hidden(self.model, tokens, self.aligner.student_layers)
            nll = nll_loss(logits, labels)
        else:
            logits = None
            hidden, nll = forward_with_loss(self.model, tokens, labels, self.aligner.student_layers,
                                            chunk_tokens=self.loss_chunk_tokens)
        measured = None
        if self.aligner.measuring(self.step):  # auto: the aligner sees tapped copies, the NLL the originals
            tapped, measured = self.aligner.schedule.probe(self.aligner.meeting_points(hidden, logits))
            logits = tapped.pop("logits", logits)
            hidden = {**hidden, **tapped}
        align, cosine = self.aligner(hidden, targets, mask=mask, logits=logits)
        loss = nll + weight * align
        figures = {"nll": nll.detach(), "align_loss": align.detach(), "lambda": weight}
        if cosine is not None:
            figures["cosine"] = cosine
        if measured is not None:  # filled in place during backward, before the figures are summed
            figures.update(measured)
        return loss, figures

    def reduced(self, figures: Dict[str, Any]) -> None:
        """A measuring schedule folds this step's gradient measurement into lambda."""
        if "_g_total_sq" in figures:
            figures.update(self.aligner.schedule.update(figures, weight=figures["lambda"]))
        if hasattr(self.aligner.schedule, "rho") and self.teacher is not None:
            figures["rho"] = self.aligner.schedule.rho(self.step)

    def after_step(self) -> None:
        if self.teacher is not None and self.aligner.finished(self.step):
            self.release_teacher()

    def dtype_keys(self) -> List[str]:
        return [*super().dtype_keys(), "teacher.dtype"]

    def memory_estimate(self, teacher_args=None, teacher_sharded: bool = False, model_args=None):
        if self.teacher is not None:  # until it is released
            teacher_args = getattr(self.teacher.model, "model_args", None)
        return super().memory_estimate(teacher_args, self.placement == "sharded" and self.fsdp, model_args)

    def described_teacher(self) -> Optional[ModelArgs]:
        """The teacher's shape from its config.json or GGUF header (no weights), read once for
        the memory check and the checks before the data; None without a teacher.path, or for a
        format that cannot say without loading. A read that fails raises (and is not kept)."""
        if not hasattr(self, "_described_teacher"):
            section = OmegaConf.to_container(self.cfg.teacher, resolve=True)
            self._described_teacher = describe_teacher(section, check_weights=True) if section.get("path") else None
        return self._described_teacher

    def compiled_keys(self) -> List[str]:
        keys = super().compiled_keys()
        if self.cfg.teacher.get("compile", False) and not self._past_stop(self.resume_from) and not keys:
            keys.append("teacher.compile")  # one probe serves both: the same compiler builds both
        return keys

    def planned_teacher(self):
        if self._past_stop(self.resume_from):
            return None, False  # not loaded (or released at once)
        try:
            args = self.described_teacher()
        except LetRecipesError:  # a missing or broken teacher is reported by its loader, with its fix
            args = None
        return args, self.cfg.teacher.get("placement", "replicated") == "sharded" and self.fsdp

    def release_teacher(self) -> None:
        teacher_mb = sum(p.numel() * p.element_size() for p in self.teacher.parameters()) / 2**20
        before = current_memory_mb(self.device)
        self.teacher = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        after = current_memory_mb(self.device)
        what = "allocated" if self.device.type == "cuda" else "resident"
        change = f"; {what} memory {before:.0f} -> {after:.0f} MiB" if before is not None and after is not None else ""
        self.log(f"step {self.step}: lambda is 0 from here on; teacher released ({teacher_mb:.1f} MiB of weights"
                 f"{change})")
        self.metrics.log({"step": self.step, "event": "teacher_released", "teacher_mb": teacher_mb,
                          "memory_before_mb": before, "memory_after_mb": after})


@parse
def recipe_main(cfg: DictConfig) -> None:
    """Pretraining with Late-to-Early Training."""
    run(LETPretrainRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
