"""``dry_run=true``: check a config and estimate its cost without allocating weights.

Both models are built on the meta device, the layer map and projector are resolved
against them (so a bad index or width fails here, in seconds, on a laptop), and the
report gives parameters, FLOPs per token, the teacher's overhead and memory per GPU.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from letrecipes.components import parallel, registry
from letrecipes.components.aligner import build_aligner
from letrecipes.components.tokenizer import load_tokenizer
from letrecipes.components.errors import LetRecipesError
from letrecipes.components.estimate import (USABLE_SHARE, MemoryEstimate, dtype_bytes, forward_flops_per_token,
                                           memory_per_gpu, micro_batch_time, total_params, train_flops_per_token)
from letrecipes.components.models import (ModelArgs, check_built_student, count_parameters, model_max_seq_len,
                                          padded_vocab_size)
from letrecipes.components.progress import clock
from letrecipes.components.teachers import TeacherError, describe_teacher, resolve_path


class DryRunError(LetRecipesError):
    pass


def _exists(path: str) -> bool:
    try:
        return resolve_path(path).exists()
    except TeacherError:  # pkg: path whose package is not installed
        return False


def _teacher_args(cfg: DictConfig, seq_len: int) -> ModelArgs:
    """The teacher's real shape, from its format's ``describe`` (config.json or GGUF
    metadata, no weights read) when ``teacher.path`` exists here; otherwise ``teacher.shape``."""
    section = OmegaConf.to_container(cfg.teacher, resolve=True)
    path = str(section.get("path", ""))
    described = describe_teacher(section) if _exists(path) else None
    if described is not None:
        return described
    shape = cfg.teacher.get("shape")
    if shape is None:
        where = ("its format cannot describe it without loading" if _exists(path)
                 else "it does not exist on this machine")
        raise DryRunError(
            f"teacher.path={path!r}: {where}. Fix: run the dry run where the checkpoint is, or "
            "describe the teacher under teacher.shape (num_layers, num_heads, num_kv_heads, embed_dim, "
            "intermediate_dim, vocab_size)."
        )
    values = OmegaConf.to_container(shape, resolve=True)
    values.setdefault("max_seq_len", seq_len)
    return ModelArgs.from_dict(values)


def config_memory(cfg: DictConfig, args: ModelArgs, world_size: int, teacher_args: Optional[ModelArgs] = None,
                  teacher_sharded: bool = False) -> MemoryEstimate:
    """The cost model's memory per process at the settings ``cfg`` gives: the one place
    that reads them, for the dry run and for a recipe's memory check and out-of-memory line."""
    fsdp, shards = parallel.fsdp_layout(cfg.get("fsdp") or {}, world_size)
    checkpointing = cfg.get("activation_checkpointing") or {}
    return memory_per_gpu(args, shards, int(cfg.batch_size), int(cfg.data.seq_len),
                          checkpointing.get("mode", "none") or "none", teacher_args,
                          teacher_sharded=teacher_sharded and fsdp, fsdp=fsdp,
                          gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps", 1)),
                          checkpoint_every=int(checkpointing.get("every", 2)),
                          loss_chunk_tokens=int(cfg.get("loss_chunk_tokens", 0) or 0),
                          compute_bytes=dtype_bytes(cfg.get("dtype", "bf16")),
                          teacher_bytes_per_param=dtype_bytes((cfg.get("teacher") or {}).get("dtype", "bf16")),
                          reduce_every_micro_batch=bool((cfg.get("fsdp") or {}).get("reduce_every_micro_batch", True)))


# An H100 80GB's memory as torch.cuda reports it (81,559 MiB): the GPU dry_run_gpu_tflops' 989 belongs to
H100_GIB = 79.6
# the largest world size the fit search tries: 256 nodes of 8
MAX_WORLD = 2048


def world_sizes(gpus_per_node: int, replicate_degree: int):
    """The world sizes a job is laid out in, smallest first: powers of two within a node, then
    whole nodes; under HSDP only those the replicate degree divides."""
    within = [2 ** i for i in range(gpus_per_node.bit_length()) if 2 ** i < gpus_per_node]
    for world in within + list(range(gpus_per_node, MAX_WORLD + 1, gpus_per_node)):
        if world % replicate_degree == 0:
            yield world


def gpu_fit(cfg: DictConfig, args: ModelArgs, world: int, teacher_args: Optional[ModelArgs], teacher_sharded: bool,
            memory: MemoryEstimate, gpu_gib: float, gpus_per_node: int) -> Dict[str, Any]:
    """Whether the estimate fits a GPU of ``gpu_gib`` at this world size and, where it does not,
    the smallest world size at which FSDP2 leaves each GPU little enough (None: none up to
    MAX_WORLD, because what sharding does not divide, the activations, the loss and the
    teacher, is too much alone)."""
    usable = USABLE_SHARE * gpu_gib
    fit: Dict[str, Any] = {"gpu_memory_gib": gpu_gib, "usable_gib": usable, "fits": memory.total_gb <= usable,
                           "spare_gib": usable - memory.total_gb}
    if fit["fits"]:
        return fit
    fsdp_options = cfg.get("fsdp") or {}
    replicate = max(1, int(fsdp_options.get("replicate_degree", 1) or 1))
    fit["fsdp_off"] = fsdp_options.get("enabled", "auto") is False  # sharding is the fix it names then
    sharded = OmegaConf.merge(cfg, {"fsdp": {"enabled": "auto"}}) if fit["fsdp_off"] else cfg
    for candidate in world_sizes(gpus_per_node, replicate):
        if candidate < world or (candidate == world and not fit["fsdp_off"]):
            continue
        at = config_memory(sharded, args, candidate, teacher_args, teacher_sharded=teacher_sharded)
        if at.total_gb <= usable:
            return {**fit, "smallest_world_size": candidate, "memory_at_smallest_gib": at.total_gb}
    unsharded = memory.activations_gb + memory.loss_gb + memory.teacher_gb + memory.context_gb
    return {**fit, "smallest_world_size": None, "unsharded_gib": unsharded}


def dry_run(cfg: DictConfig, with_teacher: bool) -> Dict[str, Any]:
    registry.import_modules(cfg.get("imports"))
    seq_len = int(cfg.data.seq_len)
    vocab_size = cfg.model.get("vocab_size")
    if vocab_size is None:
        try:
            vocab_size = padded_vocab_size(load_tokenizer(cfg.tokenizer, cfg.get("teacher")).vocab_size)
        except LetRecipesError as err:
            raise DryRunError(f"dry_run: set model.vocab_size, or make the tokenizer readable here ({err})") from err
    with torch.device("meta"):
        student = registry.build("model", cfg.model, "model", vocab_size=vocab_size,
                                 max_seq_len=model_max_seq_len(cfg.model, seq_len))
    check_built_student(student, cfg.model)
    args: ModelArgs = student.model_args
    world = int(cfg.get("dry_run_world_size") or os.environ.get("WORLD_SIZE", 1))
    micro_batch = int(cfg.batch_size)
    ac = (cfg.get("activation_checkpointing") or {}).get("mode", "none") or "none"
    every = int((cfg.get("activation_checkpointing") or {}).get("every", 2))
    train_flops = 3 * forward_flops_per_token(args, seq_len)
    step_flops = train_flops_per_token(args, seq_len, ac, every)  # what the GPU runs, recompute included
    report: Dict[str, Any] = {
        "student_params": count_parameters(student),
        "student_non_embedding_params": count_parameters(student, exclude_embeddings=True),
        "student_train_flops_per_token": train_flops,
        "student_step_flops_per_token": step_flops,
        "world_size": world,
    }
    teacher_args = None
    if with_teacher:
        teacher_args = _teacher_args(cfg, seq_len)
        # (with alignment.cross_tokenizer auto or true the teacher may read a smaller vocabulary of its own)
        if teacher_args.vocab_size < vocab_size and cfg.alignment.get("cross_tokenizer", "auto") is False:
            raise DryRunError(f"teacher vocabulary ({teacher_args.vocab_size}) is smaller than the student's "
                              f"({vocab_size}) and alignment.cross_tokenizer=false: they must read the same token "
                              "ids. Fix: alignment.cross_tokenizer=auto.")
        with torch.device("meta"):
            aligner = build_aligner(cfg.alignment, args.embed_dim, args.num_layers, teacher_args.embed_dim,
                                    teacher_args.num_layers, total_steps=int(cfg.max_steps), vocab_size=vocab_size)
        logit_kd = aligner.teacher_blocks_run is None  # the teacher runs whole, output head included
        deepest = teacher_args.num_layers if logit_kd else aligner.teacher_blocks_run
        teacher_flops = forward_flops_per_token(teacher_args, seq_len, layers=deepest, head=logit_kd)
        report.update({
            "teacher_params": total_params(teacher_args),
            "teacher_blocks_run": deepest,
            "aligned_pairs_student_teacher": aligner.pairs,
            "projector_params": sum(p.numel() for p in aligner.parameters()),
            "teacher_forward_flops_per_token": teacher_flops,
            "teacher_overhead": teacher_flops / step_flops,
            "schedule": repr(aligner.schedule),
            "teacher_end_step": aligner.schedule.end_step,
        })
    placement = cfg.get("teacher", {}).get("placement", "replicated") if with_teacher else "replicated"
    accumulation = int(cfg.get("gradient_accumulation_steps", 1))
    reduce_every = bool((cfg.get("fsdp") or {}).get("reduce_every_micro_batch", True))
    memory = config_memory(cfg, args, world, teacher_args, teacher_sharded=placement == "sharded")
    report["memory_per_gpu_gb"] = {
        "weights_and_adamw_moments": memory.weights_and_moments_gb, "gradients": memory.gradients_gb,
        "activations": memory.activations_gb, "loss": memory.loss_gb, "gathered_fsdp_units": memory.gathered_gb,
        "root_gradient_buffer": memory.root_gradient_buffer_gb, "teacher": memory.teacher_gb,
        "cuda_context": memory.context_gb, "forward_backward": memory.forward_backward_gb,
        "optimizer_step": memory.optimizer_step_gb, "peak_phase": memory.peak_phase, "total": memory.total_gb,
        "gradients_beside_loss": memory.accumulating,  # earlier micro-batches' gradients, with accumulation
        "accumulated_gradients": memory.accumulated_gradients_gb,
        "compute_dtype": "fp32" if dtype_bytes(cfg.get("dtype", "bf16")) == 4 else "bf16",
    }
    rates = {"interconnect_gbps": float(cfg.get("dry_run_interconnect_gbps", 400)),
             "intra_node_gbps": float(cfg.get("dry_run_intra_node_gbps", 3600)),
             "gpus_per_node": int(cfg.get("dry_run_gpus_per_node", 8)),
             "gpu_tflops": float(cfg.get("dry_run_gpu_tflops", 989)), "mfu": float(cfg.get("dry_run_mfu", 0.4))}
    report["fit"] = gpu_fit(cfg, args, world, teacher_args, placement == "sharded", memory,
                            float(cfg.get("dry_run_gpu_memory_gib", H100_GIB)), rates["gpus_per_node"])
    fsdp_options = cfg.get("fsdp") or {}
    replicate = int(fsdp_options.get("replicate_degree", 1) or 1) if parallel.fsdp_layout(fsdp_options, world)[0] else 1

    def timing_at(replicate_degree: int):
        return micro_batch_time(args, world, micro_batch, seq_len, ac, **rates,
                                reshard_after_forward=bool(fsdp_options.get("reshard_after_forward", True)),
                                checkpoint_every=every,
                                reductions_per_micro_batch=1.0 if reduce_every else 1.0 / max(1, accumulation),
                                replicate_degree=replicate_degree, gradient_accumulation_steps=accumulation)

    timing = timing_at(replicate)
    report["micro_batch_time"] = {
        "communication_gb": timing.communication_gb, "communication_s": timing.communication_s,
        "compute_s": timing.compute_s, "communication_bound": timing.communication_bound,
        "smallest_compute_bound_micro_batch": timing.smallest_compute_bound_micro_batch,
        "intra_node_gb": timing.intra_node_gb, "intra_node_s": timing.intra_node_s,
        "inter_node_gb": timing.inter_node_gb, "inter_node_s": timing.inter_node_s,
        "shard_group": timing.shard_group, "replicate_degree": replicate, **rates,
    }
    nodes = world // rates["gpus_per_node"]
    if timing.inter_node_gb and replicate == 1 and world % rates["gpus_per_node"] == 0 and nodes > 1:
        # plain FSDP2 over several nodes: what HSDP with one replica per node would move instead
        hsdp = timing_at(nodes)
        hsdp_memory = config_memory(OmegaConf.merge(cfg, {"fsdp": {"replicate_degree": nodes}}), args, world,
                                    teacher_args, teacher_sharded=placement == "sharded")
        report["micro_batch_time"]["with_hsdp"] = {"replicate_degree": nodes, "communication_s": hsdp.communication_s,
                                                   "communication_bound": hsdp.communication_bound,
                                                   "memory_per_gpu_gb": hsdp_memory.total_gb}
    report["run_time"] = run_time(report, timing, int(cfg.max_steps), world, micro_batch * seq_len, accumulation,
                                  rates["gpu_tflops"] * 1e12 * rates["mfu"])
    print(format_report(report, args, teacher_args, micro_batch, seq_len, ac))
    return report


def run_time(r: Dict[str, Any], timing, max_steps: int, world: int, micro_batch_tokens: int, accumulation: int,
             flops_per_s: float) -> Dict[str, Any]:
    """The whole run's length at the cost model's rates: each micro-batch takes the longer of
    its compute (the teacher's forward added while it runs) and its traffic, which overlap."""
    teacher_s = r.get("teacher_forward_flops_per_token", 0) * micro_batch_tokens / flops_per_s
    with_teacher = min(max_steps, r["teacher_end_step"] or max_steps) if "teacher_end_step" in r else 0
    step = accumulation * max(timing.compute_s, timing.communication_s)
    step_with_teacher = accumulation * max(timing.compute_s + teacher_s, timing.communication_s)
    seconds = with_teacher * step_with_teacher + (max_steps - with_teacher) * step
    return {"steps": max_steps, "tokens_per_step": micro_batch_tokens * accumulation * world,
            "tokens": max_steps * micro_batch_tokens * accumulation * world, "step_s": step,
            "steps_with_teacher": with_teacher, "step_with_teacher_s": step_with_teacher, "seconds": seconds,
            "gpu_hours": seconds * world / 3600}


def format_report(r: Dict[str, Any], args: ModelArgs, teacher: ModelArgs, micro_batch: int, seq_len: int,
                  ac: str) -> str:
    def shape(a: ModelArgs) -> str:
        return (f"{a.num_layers} blocks x {a.embed_dim}, {a.num_heads} heads ({a.num_kv_heads} KV), "
                f"FFN {a.intermediate_dim}, vocab {a.vocab_size}{', tied' if a.tie_word_embeddings else ''}")

    lines = ["dry run (nothing allocated, no step taken)",
             f"  student   {_count(r['student_params'])} params ({_count(r['student_non_embedding_params'])} "
             f"non-embedding): {shape(args)}",
             f"  student training FLOPs/token   {r['student_train_flops_per_token'] / 1e9:.3g} GFLOP"
             + (f" ({r['student_step_flops_per_token'] / 1e9:.3g} with activation checkpointing's recompute)"
                if r["student_step_flops_per_token"] != r["student_train_flops_per_token"] else "")]
    if teacher is not None:
        lines += [
            f"  teacher   {_count(r['teacher_params'])} params: {shape(teacher)}",
            f"  aligned (student, teacher) layers {r['aligned_pairs_student_teacher']}; teacher runs "
            f"{r['teacher_blocks_run']} of {teacher.num_layers} blocks; projector {r['projector_params']:,} params",
            f"  teacher forward FLOPs/token    {r['teacher_forward_flops_per_token'] / 1e9:.3g} GFLOP",
            f"  teacher overhead while it runs {100 * r['teacher_overhead']:.1f}% of a student step's FLOPs; "
            f"{r['schedule']}",
        ]
    m = r["memory_per_gpu_gb"]
    grads_beside_loss = f" + gradients {m['accumulated_gradients']:.1f}" if m["gradients_beside_loss"] else ""
    lines += [f"  memory per GPU (world size {r['world_size']}, micro-batch {micro_batch} x {seq_len}, activation "
              f"checkpointing {ac}, computing in {m['compute_dtype']}): {m['total']:.1f} GiB at the {m['peak_phase']} "
              "= the larger of",
              f"    forward/backward {m['forward_backward']:.1f} = weights+AdamW moments {m['weights_and_adamw_moments']:.1f}"
              f" + activations {m['activations']:.1f} + loss {m['loss']:.1f} + gathered FSDP units "
              f"{m['gathered_fsdp_units']:.1f} + teacher {m['teacher']:.1f}{grads_beside_loss}",
              f"    optimizer step   {m['optimizer_step']:.1f} = weights+AdamW moments {m['weights_and_adamw_moments']:.1f}"
              f" + gradients {m['gradients']:.1f} + root gradient buffer {m['root_gradient_buffer']:.1f} + teacher "
              f"{m['teacher']:.1f}",
              f"    plus CUDA context {m['cuda_context']:.1f}"]
    lines.append(_fit_line(r, ac))
    t = r["micro_batch_time"]
    links = []
    if t["intra_node_gb"]:
        links.append(f"{t['intra_node_gb']:.1f} GB inside a node = {t['intra_node_s']:.3f} s at "
                     f"{t['intra_node_gbps']:g} Gb/s")
    if t["inter_node_gb"]:
        links.append(f"{t['inter_node_gb']:.1f} GB between nodes = {t['inter_node_s']:.3f} s at "
                     f"{t['interconnect_gbps']:g} Gb/s")
    layout = (f"HSDP: {t['replicate_degree']} replicas of a shard group of {t['shard_group']}"
              if t["replicate_degree"] > 1 else f"shard group of {t['shard_group']}")
    lines.append(f"  per micro-batch and GPU ({layout}, {t['gpus_per_node']} GPUs a node): FSDP2 traffic "
                 f"{'; '.join(links) or '0 GB'}; compute {t['compute_s']:.3f} s at {t['mfu']:g} x "
                 f"{t['gpu_tflops']:g} TFLOP/s{_logged_mfu(r, t['mfu'])}")
    if t["communication_bound"]:
        hsdp = t.get("with_hsdp")
        instead = (f", or fsdp.replicate_degree={hsdp['replicate_degree']} (HSDP, one replica a node: the all-gathers "
                   f"stay inside the node: {hsdp['communication_s']:.3f} s of traffic, "
                   f"{hsdp['memory_per_gpu_gb']:.1f} GiB per GPU)" if hsdp else "")
        lines.append(f"  WARNING: communication-bound (the GPU waits on the network): the smallest micro-batch whose "
                     f"compute covers the traffic is {t['smallest_compute_bound_micro_batch']}. Fix: batch_size="
                     f"{t['smallest_compute_bound_micro_batch']} (fewer gradient_accumulation_steps for the same "
                     f"tokens per step){instead}, or set dry_run_interconnect_gbps and dry_run_intra_node_gbps to "
                     "your machines' real rates.")
    else:
        lines.append(f"  compute-bound (the smallest compute-bound micro-batch is "
                     f"{t['smallest_compute_bound_micro_batch']})")
    run = r["run_time"]
    teacher = (f"; the first {run['steps_with_teacher']:,} with the teacher, {run['step_with_teacher_s']:.3g} s "
               "each" if run["steps_with_teacher"] else "")
    hours = f", {run['gpu_hours']:,.0f} GPU-hours" if run["gpu_hours"] >= 1 else ""
    total = run["tokens"]
    total = f"{total / 1e9:.3g}B" if total >= 1e9 else f"{total / 1e6:.3g}M" if total >= 1e6 else f"{total:,}"
    lines.append(f"  the run at these rates: {run['steps']:,} steps x {run['tokens_per_step']:,} tokens "
                 f"({total} tokens) in about {clock(run['seconds'])} on {r['world_size']} GPU(s){hours} "
                 f"({run['step_s']:.3g} s a step{teacher})")
    return "\n".join(lines)


def _fit_line(r: Dict[str, Any], ac: str) -> str:
    fit, total = r["fit"], r["memory_per_gpu_gb"]["total"]
    gpu = (f"a GPU of {fit['gpu_memory_gib']:g} GiB (dry_run_gpu_memory_gib; {fit['usable_gib']:.1f} of it counted, "
           f"the rest left to the allocator's cache)")
    if fit["fits"]:
        return f"  fits {gpu}: {fit['spare_gib']:.1f} GiB to spare"
    head = f"  WARNING: does not fit {gpu}: {total:.1f} GiB per GPU at world size {r['world_size']}."
    smaller = ("activation_checkpointing.mode=full, " if ac != "full" else "") + \
        "a smaller batch_size with more gradient_accumulation_steps (the same tokens per step), loss_chunk_tokens"
    if fit["smallest_world_size"] is not None:
        n, enable = fit["smallest_world_size"], "fsdp.enabled=auto and " if fit["fsdp_off"] else ""
        return (f"{head} Fix: {enable}FSDP2 over {n} GPUs or more ({fit['memory_at_smallest_gib']:.1f} GiB per GPU at "
                f"{n}: tune run --nproc_per_node ..., or dry_run_world_size={n} to see it), or {smaller}.")
    return (f"{head} No world size up to {MAX_WORLD} fits with these settings: what sharding does not divide "
            f"(activations, loss, teacher, CUDA context) is {fit['unsharded_gib']:.1f} GiB alone. Fix: {smaller}.")


def _logged_mfu(r: Dict[str, Any], share_of_peak: float) -> str:
    """dry_run_mfu is the share of peak on the FLOPs the GPU runs, recompute included; the
    training log's ``mfu`` counts the model's FLOPs alone, so under activation checkpointing
    the same speed reads lower there. Say what the log would show, so the two can be compared."""
    model, step = r["student_train_flops_per_token"], r["student_step_flops_per_token"]
    if step == model:
        return ""
    return (f" on the FLOPs it runs, recompute included (the training log's mfu, which counts the model's "
            f"FLOPs only, would read {100 * share_of_peak * model / step:.1f}%)")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
