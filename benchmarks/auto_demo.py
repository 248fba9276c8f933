"""Issue 16's demo-scale evidence: `schedule: auto` against fixed lambda0 on the CPU demo.

    python -m benchmarks.auto_demo                      # teacher + 5 arms x seeds 0 and 1
    python -m benchmarks.auto_demo --seeds 1            # one seed (two processes can share the cores:
                                                        #   OMP_NUM_THREADS=1 each, one --seeds each)
    python -m benchmarks.auto_demo --report             # the table from finished runs only

The demo's own configs (``pretrain_tiny`` teacher, ``baseline_tiny`` and ``let_tiny``: an
11.2M student, 300 steps of 16 x 256 tokens, alignment over the first half), run as
ordinary ``tune run`` commands in ``--out``: a finished run is skipped, an interrupted one
resumes. The arms differ only in ``alignment.schedule``: the demo's fixed lambda0 1.0 and
``auto`` at the one default rho0 (``benchmarks.let_study.AUTO_RHO0``), against the lambda
sweep 0.1 / 1.0 / 3.0 of the study. Speedup = the baseline's steps to its own final
validation loss / the arm's steps to reach it (the study's measure, interpolated between
evaluations). Output: ``<out>/auto_demo.json`` and ``.md``, and a plot in ``--plot-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, save_figure  # noqa: E402
from benchmarks.let_study import AUTO_RHO0, alignment_summary, fmt, speedups, tune_run, val_curve  # noqa: E402
from letrecipes.components.files import replace_atomically  # noqa: E402
from letrecipes.components.metrics import read_metrics  # noqa: E402

AUTO = ["alignment.schedule._component_=auto", f"alignment.schedule.rho0={AUTO_RHO0}"]  # let_tiny's own schedule
ARMS = {  # name -> (recipe, config, overrides on top of the demo's config)
    "baseline": ("pretrain", "baseline_tiny", []),
    f"let_auto{AUTO_RHO0}": ("let_pretrain", "let_tiny", AUTO),
    # the study's lambda sweep at demo scale: 1.0 is the demo's fixed weight, 3.0 the study's best
    **{f"let_lambda{v}": ("let_pretrain", "let_tiny", ["alignment.schedule._component_=linear",
                                                       f"alignment.schedule.lambda0={v}"]) for v in (1.0, 3.0, 0.1)},
}
ONLY_SEEDS = {"let_lambda0.1": (1,)}  # for its curves: one seed, as in the study (weakest arm by far there)


def run_all(out: Path, seeds: List[int], report_only: bool) -> Dict:
    teacher = out / "runs" / "teacher"
    common = [f"data.cache_dir={out / 'cache'}", "progress_bar=false"]
    wall: Dict[str, float] = {}
    if not report_only:
        wall["teacher"] = tune_run("pretrain", "pretrain_tiny", [*common, "seed=0"], teacher, out / "logs" / "teacher.log")
    report = {**header("auto_demo.py", sys.argv[1:]), "rho0": AUTO_RHO0, "seeds": seeds, "arms": {}}
    for seed in seeds:
        for name, (recipe, config, overrides) in ARMS.items():
            if seed not in ONLY_SEEDS.get(name, (seed,)):
                continue
            run_dir = out / "runs" / f"seed{seed}" / name
            extra = [f"teacher.path={teacher / 'final'}"] if recipe == "let_pretrain" else []
            if not report_only:
                wall[f"seed{seed}/{name}"] = tune_run(recipe, config, [*common, f"seed={seed}", *extra, *overrides],
                                                      run_dir, out / "logs" / f"{seed}_{name}.log")
    for seed in seeds:
        base = read_metrics(out / "runs" / f"seed{seed}" / "baseline" / "metrics.jsonl")
        for name in ARMS:
            if seed not in ONLY_SEEDS.get(name, (seed,)):
                continue
            records = read_metrics(out / "runs" / f"seed{seed}" / name / "metrics.jsonl")
            report["arms"].setdefault(name, []).append({
                "seed": seed, "final_val_loss": val_curve(records)[-1][1], **speedups(base, records),
                **alignment_summary(records), "curve": val_curve(records),
                "lambda_cosine_rho": [(r["step"], r.get("lambda"), r.get("cosine"), r.get("rho"), r.get("rho_measured"))
                                      for r in records if "lambda" in r and "loss" in r],
                "run_wall_s": wall.get(f"seed{seed}/{name}")})
    teacher_records = read_metrics(teacher / "metrics.jsonl")
    report["teacher_val_loss"] = val_curve(teacher_records)[-1][1]
    return report


def markdown(report: Dict) -> str:
    lines = [f"Teacher (pretrain_tiny): val loss {report['teacher_val_loss']:.4f}. Seeds: "
             f"{', '.join(map(str, report['seeds']))} (mean [min, max]).", "",
             "| arm | seeds | final val loss | speedup (steps) | lambda0 equivalent | cosine at release |",
             "|---|---|---|---|---|---|"]
    for name, rows in report["arms"].items():
        aligned = all(r["lambda0_equivalent"] is not None for r in rows)
        seeds = ",".join(str(r["seed"]) for r in rows)
        lines.append(f"| {name} | {seeds} | {fmt([r['final_val_loss'] for r in rows], 4)} | "
                     f"{fmt([r['speedup_steps'] for r in rows])} | "
                     f"{fmt([r['lambda0_equivalent'] for r in rows]) if aligned else '-'} | "
                     f"{fmt([r['cosine_end'] for r in rows], 3) if aligned else '-'} |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for number, (name, rows) in enumerate(report["arms"].items()):
        color = f"C{number}"
        steps = [s for s, _ in rows[0]["curve"]]
        axes[0].plot(steps, [statistics.mean(r["curve"][i][1] for r in rows) for i in range(len(steps))], label=name,
                     color=color)
        logged = [x for x in rows[0]["lambda_cosine_rho"] if x[1] is not None]
        if name != "baseline" and logged:
            axes[1].plot([x[0] for x in logged], [x[1] for x in logged], label=name, color=color)
            axes[2].plot([x[0] for x in logged if x[2] is not None], [x[2] for x in logged if x[2] is not None],
                         label=name, color=color)
    axes[0].axhline(report["teacher_val_loss"], color="gray", linestyle=":", label="teacher")
    axes[0].set(title="demo: validation loss (mean over seeds)", xlabel="step", ylabel="loss")
    axes[1].set(title="alignment weight lambda (first seed)", xlabel="step", ylabel="lambda", ylim=(0, None))
    axes[2].set(title="cosine, student block 2 vs teacher (first seed)", xlabel="step", ylabel="cosine")
    return save_figure(fig, axes, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/auto_demo")
    parser.add_argument("--seeds", default="0,1", help="comma-separated")
    parser.add_argument("--plot-dir", default="docs/img")
    parser.add_argument("--report", action="store_true", help="no training: the table from finished runs")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare

    prepare()
    out = Path(args.out)
    start = time.perf_counter()
    report = run_all(out, [int(s) for s in args.seeds.split(",")], args.report)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    name = "auto_demo" if args.seeds == "0,1" else f"auto_demo_seeds{args.seeds.replace(',', '_')}"
    replace_atomically(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    replace_atomically(out / f"{name}.md", markdown(report))
    figure = plot(report, Path(args.plot_dir) / f"{name}.png")
    print(markdown(report))
    print(f"wrote {out / (name + '.json')}, {out / (name + '.md')}, {figure}; {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
