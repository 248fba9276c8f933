"""Where gpu_check's slice loses against its targets: the slice with one thing changed per
arm, and let_7b's own depth (issue 14's follow-up). Each arm runs in a process of its own
(clean memory, nothing compiled before it) on one GPU, FSDP2 at world size 1.

The 4-block slice cannot show what the targets are about: its output head is 39% of its
linear FLOPs (7.5% at 32 blocks) and the teacher's forward is 21.8% of its step's FLOPs
(3.7% at 32 blocks; docs/scale.md). The ``let7b_*`` arms train let_7b's shape itself,
32 blocks x 4096 (7.5B parameters, about 116 GiB at world size 1: an H200 holds it, an
H100 does not), in bf16, in float8, as LET with the compiled teacher, and in bf16 with let_7b's 2
micro-batches per optimizer step. Three more arms put the slice at micro-batch 8, with and
without activation checkpointing, and without the chunked loss (``loss_chunk_tokens=0``:
the whole micro-batch's logits at once, what the chunks save), where the memory peak is the
loss and the activations at the start of the backward (the cost model's other phase; every
run so far peaked at the optimizer step). Every other arm runs the configs' chunked loss
(``loss_chunk_tokens``, components/loss.py). An arm whose
estimated memory exceeds the device's is skipped with the two figures, not run into an
out-of-memory error.
    device run (carry [".whl"]):  bash benchmarks/gpu_check.sh --variants            # let_7b's depth
    device run (carry [".whl"]):  bash benchmarks/gpu_check.sh --variants --arms all # every arm
    device run (carry [".whl"]):  bash benchmarks/gpu_check.sh --variants --arms deepest  # an H100's depth
    python benchmarks/gpu_variants.py --cpu   # tiny sizes (a 16-block model for let7b_*), what the tests run
Each arm's tokens/s, MFU, peak memory and the dry run's estimate go into
benchmarks/results/gpu_variants.json after every arm, and the LET arms' step against the
bf16 arm of the same depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._common import header  # noqa: E402
from benchmarks.gpu_check import (SIZES, arm_in_process, common_overrides,  # noqa: E402
                                  demo_data, model_overrides, random_teacher, report_saver, run,
                                  step_figures)
from letrecipes import let_pretrain, pretrain  # noqa: E402
from letrecipes.components.estimate import (MemoryEstimate, forward_flops_per_token, memory_per_gpu,  # noqa: E402
                                           peak_bf16_tflops)
from letrecipes.components.models import ModelArgs  # noqa: E402

LET_7B_BLOCKS_OVER_SLICE = 8  # let_7b's 32 blocks over the slice's 4 (16 over 2 at the CPU sizes)
FULL_AC = "activation_checkpointing.mode=full"
ARMS = {  # name: (blocks over the slice's, LET or not, overrides)
    "bf16_full_ac": (1, False, ["float8.enabled=false", FULL_AC]),
    "bf16_no_ac": (1, False, ["float8.enabled=false", "activation_checkpointing.mode=none"]),
    "float8_no_ac": (1, False, ["float8.enabled=true", "activation_checkpointing.mode=none"]),
    "bf16_4x_blocks": (4, False, ["float8.enabled=false", FULL_AC]),
    "float8_4x_blocks": (4, False, ["float8.enabled=true", FULL_AC]),
    "let_teacher_compile_false": (1, True, ["float8.enabled=false", FULL_AC, "teacher.compile=false"]),
    "let_teacher_compile_true": (1, True, ["float8.enabled=false", FULL_AC, "teacher.compile=true"]),
    "let7b_bf16": (LET_7B_BLOCKS_OVER_SLICE, False, ["float8.enabled=false", FULL_AC]),
    "let7b_float8": (LET_7B_BLOCKS_OVER_SLICE, False, ["float8.enabled=true", FULL_AC]),
    "let7b_let": (LET_7B_BLOCKS_OVER_SLICE, True, ["float8.enabled=false", FULL_AC, "teacher.compile=true"]),
    # LET at 16 blocks, beside bf16_4x_blocks: what an 80 GB GPU holds of let_7b's depth (71 GiB by the estimate)
    "let_4x_blocks": (4, True, ["float8.enabled=false", FULL_AC, "teacher.compile=true"]),
    # let_7b steps its optimizer every 2 micro-batches: at world size 1 the optimizer over all
    # 7.5B parameters is otherwise a large share of every 4,096-token step
    "let7b_bf16_accumulate_2": (LET_7B_BLOCKS_OVER_SLICE, False,
                                ["float8.enabled=false", FULL_AC, "gradient_accumulation_steps=2"]),
    # the same with one gradient reduction per optimizer step: one GPU has no reduce-scatter
    # traffic to save, so this arm checks the other side, the memory of unsharded accumulated
    # fp32 gradients (4 N bytes), against the dry run's estimate
    "let7b_bf16_accumulate_2_reduce_once": (LET_7B_BLOCKS_OVER_SLICE, False,
                                            ["float8.enabled=false", FULL_AC, "gradient_accumulation_steps=2",
                                             "fsdp.reduce_every_micro_batch=false"]),
    # the slice at micro-batch 8: the peak moves to the start of the backward (loss and
    # activations, 55-61 GiB by the estimate), the phase no run has measured yet
    "memory_micro_batch_8_full_ac": (1, False, ["float8.enabled=false", FULL_AC, "batch_size=8"]),
    "memory_micro_batch_8_no_ac": (1, False, ["float8.enabled=false", "activation_checkpointing.mode=none",
                                              "batch_size=8"]),
    "memory_micro_batch_8_full_ac_plain_loss": (1, False, ["float8.enabled=false", FULL_AC, "batch_size=8",
                                                           "loss_chunk_tokens=0"]),
}
DEFAULT_ARMS = ["let7b_bf16", "let7b_float8", "let7b_let", "let7b_bf16_accumulate_2",  # the slice's ran before
                "memory_micro_batch_8_full_ac", "memory_micro_batch_8_no_ac", "memory_micro_batch_8_full_ac_plain_loss"]
LET_BASELINES = {"let_teacher_compile_false": "bf16_full_ac", "let_teacher_compile_true": "bf16_full_ac",
                 "let7b_let": "let7b_bf16", "let_4x_blocks": "bf16_4x_blocks"}
# `--arms deepest`: bf16, LET and float8 at the greatest depth whose three arms this device holds:
# let_7b's 32 blocks on an H200 (119 GiB by the estimate), 16 on an 80 GB H100, whose let7b arms
# would all be skipped; the LET arm right after its baseline, so a cut-short call still has the ratio
DEEPEST = (["let7b_bf16", "let7b_let", "let7b_float8"], ["bf16_4x_blocks", "let_4x_blocks", "float8_4x_blocks"])
MEMORY_MARGIN = 0.97  # of the device's memory: fragmentation and what the estimate leaves out


def arm_shape(size: Dict, name: str) -> Dict:
    times = ARMS[name][0]
    return {**size["slice"], "num_layers": size["slice"]["num_layers"] * times}


def arm_estimate(name: str, size: Dict, vocab) -> Tuple[ModelArgs, MemoryEstimate]:
    """The arm's student shape and the cost model's memory for it at world size 1."""
    _, let, extra = ARMS[name]
    shape = arm_shape(size, name)
    model_args = ModelArgs(**{**shape, "vocab_size": vocab(shape), "max_seq_len": size["seq_len"]})
    teacher_shape = {**size["teacher"], "vocab_size": max(vocab(size["teacher"]), vocab(size["slice"]))}
    teacher_args = ModelArgs(**{**teacher_shape, "max_seq_len": size["seq_len"]}) if let else None

    def setting(key, default):
        return next(o.split("=")[1] for o in [*extra, f"{key}={default}"] if o.startswith(f"{key}="))

    return model_args, memory_per_gpu(
        model_args, 1, int(setting("batch_size", size["micro_batch"])), size["seq_len"],
        setting("activation_checkpointing.mode", "full"), teacher=teacher_args, fsdp=True,
        gradient_accumulation_steps=int(setting("gradient_accumulation_steps", 1)),
        reduce_every_micro_batch=setting("fsdp.reduce_every_micro_batch", "true") == "true",
        loss_chunk_tokens=int(setting("loss_chunk_tokens", size["loss_chunk_tokens"])))


def deepest_arms(size: Dict, vocab, device_gib: Optional[float]) -> List[str]:
    """The first of DEEPEST whose every arm fits ``device_gib`` (None: no limit, on a CPU);
    where none does, the last, whose arms then say why they were skipped."""
    for arms in DEEPEST:
        if device_gib is None or all(arm_estimate(name, size, vocab)[1].total_gb <= MEMORY_MARGIN * device_gib
                                     for name in arms):
            return list(arms)
    return list(DEEPEST[-1])


def measure(name: str, size: Dict, corpus: str, tokenizer: str, tok, vocab, work: Path) -> Dict:
    """One arm, in this process: its figures, or why it was skipped."""
    _, let, extra = ARMS[name]
    shape = arm_shape(size, name)
    gpu = size["device"] == "cuda"
    model_args, estimate = arm_estimate(name, size, vocab)
    if gpu:
        device_gib = torch.cuda.mem_get_info()[1] / 2**30
        if estimate.total_gb > MEMORY_MARGIN * device_gib:
            return {"blocks": shape["num_layers"], "skipped": f"estimated {estimate.total_gb:.1f} GiB (context "
                    f"included) > {MEMORY_MARGIN:.0%} of the device's {device_gib:.1f} GiB"}
    common = [*common_overrides(size, corpus, tokenizer, work), f"max_steps={size['steps']}",
              f"compile={str(size['compile']).lower()}", "export.enabled=false"]
    recipe, config = pretrain, "pretrain_7b"
    if let:
        recipe, config = let_pretrain, "let_7b"
        extra = [*extra, *random_teacher(size, vocab, tok, work)]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    records = run(recipe, config, work / name, [*common, *model_overrides(shape, vocab(shape)), *extra])
    figures = step_figures(records[size["warmup"]:])
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    peak_tflops = peak_bf16_tflops(device_name)
    flops = 3 * forward_flops_per_token(model_args, size["seq_len"])
    return {"blocks": shape["num_layers"], "overrides": extra, **figures,
            "mfu": figures["tokens_per_s"] * flops / (peak_tflops * 1e12) if peak_tflops else None,
            "estimate": estimate.__dict__, "estimate_gib": estimate.total_gb - estimate.context_gb,
            "estimate_phases_gib": {"forward_backward": estimate.forward_backward_gb,
                                    "optimizer_step": estimate.optimizer_step_gb},
            "peak_over_estimate": figures["peak_memory_gib"] / (estimate.total_gb - estimate.context_gb)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--work", default="outputs/gpu_variants")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--arms", default=None,
                        help=f"comma-separated arms, all, or deepest: bf16, LET and float8 at the greatest depth "
                        f"the device holds ({' or '.join(','.join(arms) for arms in DEEPEST)}) "
                        f"(default: {','.join(DEFAULT_ARMS)})")
    parser.add_argument("--arm", default=None, help="(internal) run one arm and print its JSON")
    args = parser.parse_args(argv)
    chosen = list(ARMS) if args.arms in ("all", "deepest") else (args.arms.split(",") if args.arms else DEFAULT_ARMS)
    unknown = sorted(set(chosen) - set(ARMS))
    if unknown:  # before the corpus is prepared: a typo costs nothing
        parser.error(f"--arms: unknown {unknown}; choose from {sorted(ARMS)}, all or deepest")
    size = SIZES["cpu" if args.cpu else "gpu"]
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_variants: no CUDA device (use --cpu for the tiny CPU version)")
    corpus, tokenizer, tok, vocab = demo_data(args)
    if args.arms == "deepest":
        chosen = deepest_arms(size, vocab, None if args.cpu else torch.cuda.mem_get_info()[1] / 2**30)
        print(f"gpu_variants: --arms deepest: {','.join(chosen)}", flush=True)
    work = Path(args.work)
    if args.arm:  # a child process: one arm, clean memory
        print("ARM " + json.dumps(measure(args.arm, size, corpus, tokenizer, tok, vocab, work)), flush=True)
        return 0

    report = {**header("gpu_variants.py", argv), "arms": {}, "errors": {}, "let_over_baseline": {}}
    out_path = args.out or f"benchmarks/results/gpu_variants{'_cpu' if args.cpu else ''}.json"
    save = report_saver(report, out_path)
    started = time.perf_counter()
    for name in chosen:
        arm_in_process(__file__, name, work, corpus, tokenizer, args.cpu, report)
        base = report["arms"].get(LET_BASELINES.get(name, ""), {})
        if "step_s" in report["arms"].get(name, {}) and "step_s" in base:
            report["let_over_baseline"][name] = report["arms"][name]["step_s"] / base["step_s"]
        save()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
