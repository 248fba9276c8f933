"""Cross-tokenizer LET against its baseline: SmolLM2-135M guiding a student on the demo's 4k BPE.

    python -m benchmarks.cross_tokenizer_runs                  # baseline + LET (pooling last, mean)
    python -m benchmarks.cross_tokenizer_runs --arms let_last  # some arms (two processes can split them:
                                                               #   OMP_NUM_THREADS=1 each)
    python -m benchmarks.cross_tokenizer_runs --report         # the table from finished runs only

Every arm is ``let_smollm2_xtok_cpu`` run as an ordinary ``tune run`` in ``--out`` (the
baseline with the plain recipe, which ignores the teacher): a finished run is skipped, an
interrupted one resumes. Speedup = the baseline's steps to its own final validation loss /
the arm's steps to reach it (interpolated between evaluations), as in the study. Output:
``<out>/cross_tokenizer.json`` and ``.md``, and ``docs/img/cross_tokenizer.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, save_figure  # noqa: E402
from benchmarks.let_study import alignment_summary, speedups, tune_run, val_curve  # noqa: E402
from letrecipes.components.files import replace_atomically  # noqa: E402
from letrecipes.components.metrics import read_metrics  # noqa: E402

CONFIG = "let_smollm2_xtok_cpu"
ARMS = {"baseline": ("pretrain", []),
        "let_last": ("let_pretrain", ["alignment.pooling=last"]),
        "let_mean": ("let_pretrain", ["alignment.pooling=mean"])}


def report(out: Path, wall: dict) -> dict:
    base = read_metrics(out / "runs" / "baseline" / "metrics.jsonl")
    result = {**header("cross_tokenizer_runs.py", sys.argv[1:]), "config": CONFIG, "arms": {}}
    for name in ARMS:
        path = out / "runs" / name / "metrics.jsonl"
        if not path.is_file():
            continue
        records = read_metrics(path)
        setup = [r for r in records if "train_time_s" in r]
        result["arms"][name] = {"final_val_loss": val_curve(records)[-1][1], **speedups(base, records),
                                **alignment_summary(records), "curve": val_curve(records),
                                "cosine": [(r["step"], r["cosine"]) for r in records if r.get("cosine") is not None],
                                "train_time_s": setup[-1]["train_time_s"] if setup else None,
                                "run_wall_s": wall.get(name)}
    return result


def markdown(result: dict) -> str:
    lines = ["| arm | final val loss | speedup (steps) | speedup (wall-clock) | cosine at release | training time |",
             "|---|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        speed = f"{arm['speedup_steps']:.2f}x" if arm["speedup_steps"] else "not reached"
        wall = f"{arm['speedup_wall_clock']:.2f}x" if arm["speedup_wall_clock"] else "not reached"
        cosine = f"{arm['cosine_end']:.3f}" if arm["cosine_end"] is not None else "-"
        lines.append(f"| {name} | {arm['final_val_loss']:.4f} | {speed} | {wall} | {cosine} | "
                     f"{arm['train_time_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in result["arms"].items():
        axes[0].plot(*zip(*arm["curve"]), label=name)
        if arm["cosine"]:
            axes[1].plot(*zip(*arm["cosine"]), label=name)
    axes[0].set(title=f"{CONFIG}: validation loss", xlabel="step", ylabel="loss")
    axes[1].set(title="cosine, student block 2 vs pooled teacher states", xlabel="step", ylabel="cosine")
    return save_figure(fig, axes, path, legend_size=8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/cross_tokenizer")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    parser.add_argument("--plot", default="docs/img/cross_tokenizer.png")
    parser.add_argument("--report", action="store_true", help="no training: the table from finished runs")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare

    prepare()
    out, wall = Path(args.out), {}
    if not args.report:
        for name in args.arms.split(","):
            recipe, overrides = ARMS[name]
            start = time.perf_counter()
            tune_run(recipe, CONFIG, ["progress_bar=false", *overrides], out / "runs" / name, out / "logs" / f"{name}.log")
            wall[name] = round(time.perf_counter() - start, 1)
    if not (out / "runs" / "baseline" / "metrics.jsonl").is_file():
        print("the baseline has not run yet: no table")
        return 0
    result = report(out, wall)
    replace_atomically(out / "cross_tokenizer.json", json.dumps(result, indent=2) + "\n")
    replace_atomically(out / "cross_tokenizer.md", markdown(result))
    figure = plot(result, Path(args.plot))
    print(markdown(result))
    print(f"wrote {out / 'cross_tokenizer.json'}, {out / 'cross_tokenizer.md'}, {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
