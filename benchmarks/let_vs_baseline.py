"""LET against its baseline on the same student, data and steps; writes JSON.

    python benchmarks/let_vs_baseline.py                      # the tiny demo configs
    python benchmarks/let_vs_baseline.py --timing-only        # just the per-step cost
    python benchmarks/let_vs_baseline.py --baseline-config baseline_tiny --let-config let_tiny \
        [key=value ...]                                       # overrides go to both runs

Two measurements:
1. cost: a baseline recipe and a LET recipe are built in this process and their training
   steps are interleaved (one baseline step, one LET step, ...) while the teacher runs,
   so both see the same machine load; the median step-time ratio LET/baseline is the
   overhead of LET (teacher forward + projector + alignment loss).
2. quality: both configs are trained to the end, one after the other, and compared:
   final validation losses and the step speedup to the baseline's final validation loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import header, write_json
from omegaconf import OmegaConf

from letrecipes.components.metrics import compare_runs, read_metrics
from letrecipes._config import load_config
from letrecipes.let_pretrain import LETPretrainRecipe
from letrecipes.pretrain import PretrainRecipe


def build(recipe_class, config: str, overrides, output_dir: Path):
    cfg = load_config(config, [*overrides, f"output_dir={output_dir}", "overwrite=true", "save_every=0",
                               "progress_bar=false"])
    recipe = recipe_class(cfg)
    recipe.setup()
    recipe.trainable.train()
    return recipe


def measure_cost(args, overrides, workdir: Path) -> dict:
    base = build(PretrainRecipe, args.baseline_config, overrides, workdir / "cost_baseline")
    let = build(LETPretrainRecipe, args.let_config, overrides, workdir / "cost_let")
    if let.aligner.finished(args.warmup_steps + args.timing_steps):
        sys.exit("error: the teacher would be released during timing; lower --timing-steps")
    for _ in range(args.warmup_steps):
        base.timed_step()
        let.timed_step()
    base_times, let_times, teacher_shares = [], [], []
    for _ in range(args.timing_steps):
        base_times.append(base.timed_step()["step_time_s"])
        record = let.timed_step()
        let_times.append(record["step_time_s"])
        teacher_shares.append(record["teacher_time_share"])
    for recipe in (base, let):
        recipe.cleanup()
    return {
        "timed_steps": args.timing_steps,
        "baseline_step_s_median": statistics.median(base_times),
        "let_step_s_median": statistics.median(let_times),
        "let_over_baseline_step_time": statistics.median(let_times) / statistics.median(base_times),
        "teacher_share_of_let_step_median": statistics.median(teacher_shares),
        "tokens_per_step": base.tokens_per_step,
    }


def measure_quality(args, overrides, workdir: Path) -> dict:
    from letrecipes import let_pretrain, pretrain

    base_dir, let_dir = workdir / "quality_baseline", workdir / "quality_let"
    start = time.perf_counter()
    pretrain.recipe_main(["--config", args.baseline_config, *overrides, f"output_dir={base_dir}", "overwrite=true",
                          "save_every=0"])
    base_s = time.perf_counter() - start
    start = time.perf_counter()
    let_pretrain.recipe_main(["--config", args.let_config, *overrides, f"output_dir={let_dir}", "overwrite=true",
                              "save_every=0"])
    let_s = time.perf_counter() - start
    result = compare_runs(read_metrics(base_dir / "metrics.jsonl"), read_metrics(let_dir / "metrics.jsonl"))
    result.update({"baseline_wall_s": base_s, "let_wall_s": let_s})
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-config", default="baseline_tiny")
    parser.add_argument("--let-config", default="let_tiny")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/let_vs_baseline.json")
    args, overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="letbench-") as tmp:
        workdir = Path(tmp)
        result = {
            **header("let_vs_baseline.py", argv),
            "baseline_config": OmegaConf.to_container(load_config(args.baseline_config, overrides)),
            "let_alignment": OmegaConf.to_container(load_config(args.let_config, overrides).alignment),
            "cost": measure_cost(args, overrides, workdir),
        }
        print(json.dumps(result["cost"], indent=2), flush=True)
        if not args.timing_only:
            result["quality"] = measure_quality(args, overrides, workdir)
            print(json.dumps(result["quality"], indent=2))
    write_json(result, args.out)


if __name__ == "__main__":
    main()
