"""What cross-tokenizer LET costs per step, against the same teacher read with the student's
own tokenizer; steps interleaved in one process so that every arm sees the same load.

    python benchmarks/cross_tokenizer_cost.py [--timing-steps 10] [key=value ...]

Arms (SmolLM2-135M GGUF teacher, all with the same student shape):
- ``same_tokenizer``: ``let_smollm2_cpu``, the student reads SmolLM2's tokenizer;
- ``same_tokenizer_cross_path``: the same, forced through the cross-tokenizer path
  (``alignment.cross_tokenizer=true``): what the mapping and pooling cost, nothing else;
- ``cross_tokenizer``: ``let_smollm2_xtok_cpu``, the student reads the demo's 4k BPE (its
  embedding table is 12x smaller, so its own step is cheaper too).

The step time includes the loader's collate (``data.num_workers=0``: the mapping runs on
the training process, the worst case); the collate's own time per batch is reported too.
JSON in benchmarks/results/cross_tokenizer_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, write_json  # noqa: E402
from let_vs_baseline import build  # noqa: E402

from letrecipes.let_pretrain import LETPretrainRecipe  # noqa: E402

ARMS = {"same_tokenizer": ("let_smollm2_cpu", []),
        "same_tokenizer_cross_path": ("let_smollm2_cpu", ["alignment.cross_tokenizer=true"]),
        "cross_tokenizer": ("let_smollm2_xtok_cpu", [])}


def collate_seconds(recipe, batches: int = 20) -> float:
    """Median time of the training loader's collate for one batch (the mapping included)."""
    collate = recipe.collate
    if collate is None:
        return 0.0
    size = int(recipe.cfg.batch_size)
    times = []
    for b in range(batches):
        items = [recipe.train_set[b * size + i] for i in range(size)]
        start = time.perf_counter()
        collate(items)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/cross_tokenizer_cost.json")
    args, overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="letrecipes-xtokcost-") as tmp:
        recipes = {name: build(LETPretrainRecipe, config, [*overrides, *extra, "export.enabled=false"],
                               Path(tmp) / name) for name, (config, extra) in ARMS.items()}
        for _ in range(args.warmup_steps):
            for recipe in recipes.values():
                recipe.timed_step()
        times = {name: [] for name in recipes}
        shares = {name: [] for name in recipes}
        for _ in range(args.timing_steps):
            for name, recipe in recipes.items():
                record = recipe.timed_step()
                times[name].append(record["step_time_s"])
                shares[name].append(record["teacher_time_share"])
        collate = {name: collate_seconds(recipe) for name, recipe in recipes.items()}
        tokens = {name: recipe.tokens_per_step for name, recipe in recipes.items()}
        for recipe in recipes.values():
            recipe.cleanup()
    reference = statistics.median(times["same_tokenizer"])
    arms = {name: {"step_s_median": statistics.median(t), "over_same_tokenizer": statistics.median(t) / reference,
                   "teacher_share_median": statistics.median(shares[name]), "collate_s_median": collate[name],
                   "collate_share_of_step": collate[name] / statistics.median(t), "tokens_per_step": tokens[name]}
            for name, t in times.items()}
    result = {**header("cross_tokenizer_cost.py", argv if argv is not None else sys.argv[1:]),
              "timing_steps": args.timing_steps, "arms": arms}
    write_json(result, args.out)
    for name, arm in arms.items():
        print(f"{name:28s} step {arm['step_s_median']:.3f} s  x{arm['over_same_tokenizer']:.3f}  "
              f"teacher {arm['teacher_share_median']:.0%}  collate {arm['collate_s_median'] * 1e3:.1f} ms "
              f"({arm['collate_share_of_step']:.1%} of a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
