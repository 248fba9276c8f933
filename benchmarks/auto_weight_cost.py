"""What the auto alignment weight costs per step: LET with a fixed lambda schedule and LET
with ``schedule: auto`` (measuring every step, and every 10th), steps interleaved in one
process so that all arms see the same machine load.

    python benchmarks/auto_weight_cost.py [--config let_tiny] [--timing-steps 30] [key=value ...]

Reports each arm's median step time and its ratio to the fixed schedule's. JSON in
benchmarks/results/auto_weight_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, write_json  # noqa: E402
from let_vs_baseline import build  # noqa: E402

from letrecipes.let_pretrain import LETPretrainRecipe  # noqa: E402

# let_tiny's schedule is auto (no lambda0 key), so each arm names its schedule whole
FIXED = ["alignment.schedule._component_=linear", "alignment.schedule.lambda0=1.0"]
AUTO = ["alignment.schedule._component_=auto", "alignment.schedule.rho0=1.0"]
ARMS = {"fixed": FIXED, "auto_every_step": [*AUTO, "alignment.schedule.measure_every=1"],
        "auto_every_10": [*AUTO, "alignment.schedule.measure_every=10"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="let_tiny")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/auto_weight_cost.json")
    args, overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="letrecipes-autocost-") as tmp:
        recipes = {name: build(LETPretrainRecipe, args.config, [*overrides, *extra, "export.enabled=false"],
                               Path(tmp) / name) for name, extra in ARMS.items()}
        if any(r.aligner.finished(args.warmup_steps + args.timing_steps) for r in recipes.values()):
            sys.exit("error: lambda reaches 0 during timing (the teacher would be released); lower --timing-steps")
        times = {name: [] for name in recipes}
        order = list(recipes)
        for i in range(args.warmup_steps + args.timing_steps):
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotated: no arm always goes first
                seconds = recipes[name].timed_step()["step_time_s"]
                if i >= args.warmup_steps:
                    times[name].append(seconds)
        for recipe in recipes.values():
            recipe.cleanup()
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {**header("auto_weight_cost.py", argv), "config": args.config, "timed_steps": args.timing_steps,
              "step_s_median": medians,
              "over_fixed": {name: medians[name] / medians["fixed"] for name in medians if name != "fixed"}}
    print(json.dumps({k: report[k] for k in ("step_s_median", "over_fixed")}, indent=2))
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
