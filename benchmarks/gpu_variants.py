"""Where gpu_check's slice loses against its targets: the same slice with one thing changed
at a time, side by side in one process on one GPU (issue 14's follow-up).

Arms: the check's bf16 arm again (the reference on this machine); without activation
checkpointing (what the recompute costs); 16 blocks instead of 4 in bf16 and float8 (the
output head's share falls from about 65% to 30% of the linear FLOPs, as it does towards 7B);
LET with the teacher compiled. Each arm's tokens/s, MFU, peak memory and the dry run's
estimate go into benchmarks/results/gpu_variants.json after every arm.
    device run (carry [".whl"]):  bash benchmarks/gpu_check.sh --variants
    python benchmarks/gpu_variants.py --cpu   # tiny sizes, what the tests run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._common import header  # noqa: E402
from benchmarks.gpu_check import (PEAK_BF16_TFLOPS, SIZES, common_overrides, demo_data,  # noqa: E402
                                  model_overrides, report_saver, run)
from letrecipes import let_pretrain, pretrain  # noqa: E402
from letrecipes.components.estimate import forward_flops_per_token, memory_per_gpu  # noqa: E402
from letrecipes.components.models import ModelArgs, llama_model  # noqa: E402

ARMS = {  # name: (blocks multiplier over the slice, overrides)
    "bf16_full_ac": (1, ["float8.enabled=false", "activation_checkpointing.mode=full"]),
    "bf16_no_ac": (1, ["float8.enabled=false", "activation_checkpointing.mode=none"]),
    "float8_no_ac": (1, ["float8.enabled=true", "activation_checkpointing.mode=none"]),
    "bf16_4x_blocks": (4, ["float8.enabled=false", "activation_checkpointing.mode=full"]),
    "float8_4x_blocks": (4, ["float8.enabled=true", "activation_checkpointing.mode=full"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--work", default="outputs/gpu_variants")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    size = SIZES["cpu" if args.cpu else "gpu"]
    corpus, tokenizer, tok, vocab = demo_data(args)
    work = Path(args.work)
    gpu = torch.cuda.is_available() and not args.cpu
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    common = [*common_overrides(size, corpus, tokenizer, work), f"max_steps={size['steps']}",
              f"compile={str(size['compile']).lower()}", "export.enabled=false"]
    report = {**header("gpu_variants.py", argv), "device_name": device_name, "arms": {}, "errors": {}}
    out_path = args.out or f"benchmarks/results/gpu_variants{'' if gpu else '_cpu'}.json"
    started = time.perf_counter()

    save = report_saver(report, out_path)

    def measure(name: str, recipe, config: str, shape: Dict, extra: List[str]) -> None:
        model_args = ModelArgs(**{**shape, "vocab_size": vocab(shape), "max_seq_len": size["seq_len"]})
        ac = next(o.split("=")[1] for o in [*extra, "activation_checkpointing.mode=full"]
                  if o.startswith("activation_checkpointing.mode="))
        estimate = memory_per_gpu(model_args, 1, size["micro_batch"], size["seq_len"], ac, fsdp=True)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        records = run(recipe, config, work / name, [*common, *model_overrides(shape, vocab(shape)), *extra])
        records = records[size["warmup"]:]
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
        flops = 3 * forward_flops_per_token(model_args, size["seq_len"])
        peak_gib = max(r["peak_memory_mb"] for r in records) / 1024
        report["arms"][name] = {
            "blocks": shape["num_layers"], "overrides": extra, "tokens_per_s": tokens_per_s,
            "step_s": statistics.median(r["step_time_s"] for r in records),
            "mfu": tokens_per_s * flops / (peak_tflops * 1e12) if peak_tflops else None,
            "peak_memory_gib": peak_gib, "estimate": estimate.__dict__,
            "estimate_gib": estimate.total_gb - estimate.context_gb,
            "teacher_time_share": statistics.median(r.get("teacher_time_share", 0.0) for r in records)}
        print(f"[{name}] {report['arms'][name]}", flush=True)

    def arm(name, fn):
        try:
            fn()
        except (Exception, SystemExit) as err:  # one arm's failure must not cost the others
            traceback.print_exc()
            report["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
        save()

    for name, (times, extra) in ARMS.items():
        shape = {**size["slice"], "num_layers": size["slice"]["num_layers"] * times}
        arm(name, lambda name=name, shape=shape, extra=extra: measure(name, pretrain, "pretrain_7b", shape, extra))

    def let_compiled_teacher():
        teacher_shape = {**size["teacher"], "vocab_size": max(vocab(size["teacher"]), vocab(size["slice"]))}
        from letrecipes.components.export import export_model

        with torch.device(size["device"]):
            teacher = llama_model(max_seq_len=size["seq_len"], **teacher_shape)
        export_model(teacher, teacher.model_args, work / "teacher", tok, torch.bfloat16)
        del teacher
        for compiled in ("false", "true"):
            measure(f"let_teacher_compile_{compiled}", let_pretrain, "let_7b", size["slice"],
                    ["float8.enabled=false", "activation_checkpointing.mode=full", f"teacher.path={work / 'teacher'}",
                     "tokenizer.source=path", "alignment.schedule.stop=1.0", f"teacher.compile={compiled}",
                     f"teacher.dtype={'bf16' if gpu else 'fp32'}"])

    arm("let", let_compiled_teacher)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
