"""See gpu_check.sh. bf16 vs float8 LET steps on one GPU: tokens/s, MFU, peak memory."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from _common import header, write_json

from letrecipes.components.estimate import forward_flops_per_token
from letrecipes.components.metrics import read_metrics
from letrecipes import let_pretrain, pretrain
from letrecipes._config import load_config
from letrecipes.demo import prepare

# Dense bf16 peak of the card, for MFU (float8 arms are still reported against bf16 peak).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

SMOLLM2_SHAPE = ["model.num_layers=30", "model.num_heads=9", "model.num_kv_heads=3", "model.embed_dim=576",
                 "model.intermediate_dim=1536", "model.rope_base=100000"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    prepare()
    root = Path("outputs/gpu_check")
    data = ["tokenizer.path=outputs/demo/tokenizer.json", "data.source=outputs/demo/corpus",
            f"data.seq_len={args.seq_len}", "data.cache_dir=outputs/cache", "overwrite=true", "save_every=0",
            "device=cuda", "progress_bar=false"]
    pretrain.recipe_main(["--config", "pretrain_tiny", *data, *SMOLLM2_SHAPE, "max_steps=1", "eval_every=0",
                          f"output_dir={root / 'teacher'}"])
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    student = load_config("let_1b4", ["~model.vocab_size", *data])
    results = {**header("gpu_check.py", argv), "steps": args.steps, "micro_batch": args.batch_size, "seq_len": args.seq_len}
    for arm, extra in (("bf16", ["float8.enabled=false"]), ("float8", ["float8.enabled=true"])):
        out = root / arm
        torch.cuda.reset_peak_memory_stats()
        let_pretrain.recipe_main(["--config", "let_1b4", "~model.vocab_size", *data, *extra, "compile=true",
                                  f"batch_size={args.batch_size}", "gradient_accumulation_steps=1",
                                  f"max_steps={args.steps}", "log_every=1", "eval_every=0",
                                  f"teacher.path={root / 'teacher' / 'final'}", f"output_dir={out}",
                                  "alignment.schedule.stop=1.0", "lr_scheduler.warmup_steps=5"])
        records = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r][5:]  # skip compile warm-up
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
        vocab = json.loads((out / "final" / "config.json").read_text())["vocab_size"]
        from letrecipes.components.models import ModelArgs

        shape = {k: v for k, v in student.model.items() if k not in ("_component_", "init_std")}
        args_s = ModelArgs.from_dict({**shape, "vocab_size": vocab, "max_seq_len": args.seq_len})
        flops = 3 * forward_flops_per_token(args_s, args.seq_len)
        results[arm] = {
            "tokens_per_s": tokens_per_s,
            "mfu_vs_bf16_peak": tokens_per_s * flops / (peak * 1e12) if peak else None,
            "peak_memory_gib": max(r["peak_memory_mb"] for r in records) / 1024,
            "teacher_time_share": statistics.median(r.get("teacher_time_share", 0.0) for r in records),
        }
        print(arm, json.dumps(results[arm]), flush=True)
    results["float8_over_bf16_tokens_per_s"] = results["float8"]["tokens_per_s"] / results["bf16"]["tokens_per_s"]
    print(json.dumps(results, indent=2))
    write_json(results, args.out)


if __name__ == "__main__":
    main()
