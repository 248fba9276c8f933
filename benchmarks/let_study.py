"""The LET study: does LET speed pretraining up here, and which settings matter?

    python -m benchmarks.let_study --suite main            # 50 min on 2 CPU cores (measured: 2,968 s)
    python -m benchmarks.let_study --suite lambda          # ablations: layers | layers_strong | lambda | sstop |
                                                           #   projector | block (8-17 min each once main has run)
    python -m benchmarks.let_study --suite longer          # the 1500-step regime, 5 arms (28 min per seed)
    python -m benchmarks.let_study --suite main --report   # tables and plots from finished runs only

Every run is the ordinary recipe (``tune run letrecipes/pretrain`` or ``let_pretrain``)
with overrides, in its own folder under ``--out``: a finished run (``final/`` exported) is
skipped, an interrupted one resumes from its last checkpoint, and one run with other
overrides or against a teacher trained since (an arm or a scale edited) runs again. All runs share the corpus
(the demo's Shakespeare minus two held-out plays), the tokenizer, the data order and the
seeds. Students are evaluated at 25/50/75/100% of their steps on the BIG-bench tasks
(``benchmarks/fetch_eval_tasks.py``) and on a next-line cloze built from the held-out plays.

Regimes (``REGIMES``): ``long`` and ``longer``, where the student trains long enough to end
below its teacher (the paper's setting; ``longer`` by a clear margin), and ``short``, where
the teacher stays stronger throughout. The report says whether each regime's condition
actually held, and by how much.

Output: ``<out>/study_<suite>.json`` and ``.md`` (tables), PNG plots in ``--plot-dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header  # noqa: E402
from letrecipes.components.checkpointing import is_complete  # noqa: E402
from letrecipes.components.evaluation import Item, write_task  # noqa: E402
from letrecipes.components.files import replace_atomically  # noqa: E402
from letrecipes.components.metrics import read_metrics  # noqa: E402

STUDENT = ["model.num_layers=6", "model.embed_dim=192", "model.num_heads=3", "model.num_kv_heads=3",
           "model.intermediate_dim=512"]  # 3.44M parameters with the 4096-token tokenizer
TEACHER = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=2", "model.num_kv_heads=2",
           "model.intermediate_dim=172"]  # 0.36M: about 10x smaller
TEACHER_STEPS = 2000  # 4.1M tokens, longer than any student budget (the "late training phase" model)
REGIMES = {"short": 150, "long": 1000, "longer": 1500}  # student steps of 16 x 128 tokens
OVERTAKING = {"long", "longer"}  # regimes whose condition is that the student ends below its teacher
HELD_OUT_PLAYS = 2
CLOZE_ITEMS = 300
ACCURACY = "acc_norm"  # lm-eval's; the accuracy the tables and plots show (acc is in the JSON too)
SCORER = "lm-evaluation-harness"  # cached scores from another scorer are computed again

LET = ["alignment.layer_map=L2E", "alignment.projector=linear", "alignment.loss=negative_cosine",
       "alignment.schedule._component_=linear", "alignment.schedule.lambda0=0.1", "alignment.schedule.stop=0.25"]


def let_with(**changes) -> List[str]:
    """The LET arm's overrides with some keys changed (``alignment.`` prefix implied)."""
    out = list(LET)
    for key, value in changes.items():
        key = "alignment." + key.replace("__", ".")
        out = [o for o in out if not o.startswith(key + "=")] + [f"{key}={value}"]
    return out


@dataclass
class Arm:
    name: str
    recipe: str  # pretrain | let_pretrain
    overrides: List[str] = field(default_factory=list)
    seeds: Optional[Tuple[int, ...]] = None  # only these of the suite's seeds (None: all)


def let_lambda(value: float, **changes) -> Arm:
    """LET at another lambda0 (named so that suites sharing an arm share its runs)."""
    suffix = "".join(f"_{v}" for v in changes.values())
    return Arm(f"let_lambda{value}{suffix}", "let_pretrain", let_with(schedule__lambda0=value, **changes))


def let_auto(rho0: float) -> Arm:
    """LET with the auto alignment weight (components/auto_weight.py) at target ratio rho0."""
    # lambda0 is no argument of auto: pass none (let_tiny, the study's base, sets no lambda0)
    overrides = [o for o in let_with(schedule___component_="auto", schedule__rho0=rho0)
                 if not o.startswith("alignment.schedule.lambda0=")]
    return Arm(f"let_auto{rho0}", "let_pretrain", overrides)


AUTO_RHO0 = 1.0  # the one default of `schedule: auto` (components/auto_weight.py), used in every regime
BASELINE = Arm("baseline", "pretrain")
LET_ARM = Arm("let", "let_pretrain", LET)
RKD = Arm("rkd", "let_pretrain", let_with(loss="kl_logits"))
SALT = Arm("salt", "let_pretrain", let_with(loss="kl_logits", schedule___component_="step"))
SUITES: Dict[str, Dict] = {
    "smoke": {"regimes": ["short"], "seeds": [0], "arms": [BASELINE, LET_ARM]},  # the tests' plumbing check
    "main": {"regimes": ["short", "long"], "seeds": [0, 1], "arms": [
        BASELINE, LET_ARM, RKD, SALT]},
    # the paper's regime with a clear margin, and the strongest lambda0 of the lambda ablation
    "longer": {"regimes": ["longer"], "seeds": [0], "arms": [BASELINE, LET_ARM, let_lambda(1.0), RKD, SALT]},
    "layers": {"regimes": ["long"], "seeds": [0], "arms": [
        BASELINE, LET_ARM, *[Arm(f"let_{m}", "let_pretrain", let_with(layer_map=m)) for m in ("L2M", "L2L", "M2E")]]},
    # the layer pairs again at a lambda0 that has an effect at this scale
    "layers_strong": {"regimes": ["long"], "seeds": [0], "arms": [
        BASELINE, let_lambda(1.0), *[let_lambda(1.0, layer_map=m) for m in ("L2M", "L2L", "M2E")]]},
    "lambda": {"regimes": ["long"], "seeds": [0], "arms": [
        BASELINE, LET_ARM, *[let_lambda(v) for v in (0.01, 0.3, 1.0, 3.0)]]},
    "sstop": {"regimes": ["long"], "seeds": [0], "arms": [
        BASELINE, LET_ARM, *[Arm(f"let_stop{v}", "let_pretrain", let_with(schedule__stop=v)) for v in (0.1, 0.5)]]},
    "projector": {"regimes": ["long"], "seeds": [0], "arms": [
        BASELINE, LET_ARM, *[Arm(f"let_{p}", "let_pretrain", let_with(projector=p)) for p in ("interpolate", "mlp")]]},
    # issue 16: auto against the best fixed lambda0 of the lambda sweep, in both long regimes
    # (no downstream scoring: every arm is within noise of chance at this scale, see the main suite)
    "auto": {"regimes": ["long", "longer"], "seeds": [0, 1], "evaluate": False, "arms": [
        # lambda0 0.1 for its lambda and cosine curves only (its speedup is in the main suite)
        BASELINE, let_auto(AUTO_RHO0), let_lambda(3.0), let_lambda(1.0), replace(LET_ARM, seeds=(0,))]},
    "block": {"regimes": ["long"], "seeds": [0], "arms": [
        BASELINE, *[Arm(f"let_block{k}", "let_pretrain",
                        let_with(layer_map=f"{{_component_: pairs, pairs: [[{k}, -1]]}}")) for k in (1, 2, 3, 4)]]},
}


# ----------------------------------------------------------------- metrics
def steps_to_reach(curve: Sequence[Tuple[float, float]], target: float) -> Optional[float]:
    """First x at which a (x, loss) curve reaches ``target``, interpolating linearly
    between evaluations; None if it never does."""
    previous = None
    for x, loss in curve:
        if loss <= target:
            if previous is None:
                return x
            x0, loss0 = previous
            return x0 + (loss0 - target) / (loss0 - loss) * (x - x0)
        previous = (x, loss)
    return None


def val_curve(records: List[dict], x_key: str = "step") -> List[Tuple[float, float]]:
    return [(r[x_key], r["val_loss"]) for r in records if "val_loss" in r]


def speedups(baseline: List[dict], arm: List[dict]) -> Dict[str, Optional[float]]:
    """Baseline cost to reach its own final validation loss / the arm's cost to reach it,
    in steps (= tokens: same tokens per step) and in training wall-clock (teacher included)."""
    target = val_curve(baseline)[-1][1]
    out: Dict[str, Optional[float]] = {"target_val_loss": target}
    for unit, key in (("steps", "step"), ("wall_clock", "train_time_s")):
        base_cost = steps_to_reach(val_curve(baseline, key), target)
        arm_cost = steps_to_reach(val_curve(arm, key), target)
        out[f"{unit}_to_target"] = arm_cost
        out[f"speedup_{unit}"] = base_cost / arm_cost if arm_cost else None
    out["speedup_tokens"] = out["speedup_steps"]
    return out


# ----------------------------------------------------------------- data
def prepare_data(out: Path, corpus: Path, tokenizer: Path) -> Tuple[Path, Path]:
    """Training corpus (all plays but the last ``HELD_OUT_PLAYS``) and the held-out cloze task."""
    plays = sorted(corpus.glob("*.txt"))
    if len(plays) <= HELD_OUT_PLAYS:
        raise SystemExit(f"error: {corpus} has {len(plays)} text files; the study needs more than {HELD_OUT_PLAYS}.")
    train_dir, cloze = out / "corpus", out / "cloze_heldout.jsonl"
    if not train_dir.is_dir():
        tmp = out / "corpus.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for play in plays[:-HELD_OUT_PLAYS]:
            shutil.copyfile(play, tmp / play.name)
        tmp.rename(train_dir)
    if not cloze.is_file():
        write_task(cloze, next_line_cloze([p.read_text(encoding="utf-8") for p in plays[-HELD_OUT_PLAYS:]]))
    return train_dir, cloze


def next_line_cloze(texts: Sequence[str], n: int = CLOZE_ITEMS, seed: int = 0) -> List[Item]:
    """Given two lines of a held-out play, which of four lines comes next? (chance 0.25;
    the three wrong lines are drawn from the same play)."""
    rng = random.Random(seed)
    per_text = [[line.strip() for line in t.splitlines() if len(line.split()) >= 3] for t in texts]
    items = []
    while len(items) < n:
        lines = rng.choice(per_text)
        i = rng.randrange(2, len(lines))
        wrong = rng.sample([line for j, line in enumerate(lines) if abs(j - i) > 2], 3)
        choices = [lines[i], *wrong]
        rng.shuffle(choices)
        items.append(Item(lines[i - 2] + "\n" + lines[i - 1] + "\n", choices, choices.index(lines[i])))
    return items


# ----------------------------------------------------------------- runs
def tune_run(recipe: str, config: str, overrides: List[str], run_dir: Path, log: Path) -> float:
    """Run (or finish) one recipe run; return this call's wall-clock seconds (0 if already done).
    A run finished or begun with other overrides (an arm edited since) is run again from the start."""
    asked = run_dir.parent / f".{run_dir.name}.overrides.json"  # beside the run: its folder is the recipe's
    wanted = {"recipe": recipe, "config": config, "overrides": list(overrides)}
    teacher = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("teacher.path=")), None)
    if teacher is not None and (teacher / "config.json").is_file():  # a teacher trained anew is another teacher
        wanted["teacher_written_ns"] = (teacher / "config.json").stat().st_mtime_ns
    try:
        earlier = json.loads(asked.read_text())
    except (OSError, ValueError):
        earlier = wanted  # a run of a study older than the record: taken as it is
    if earlier != wanted and run_dir.exists():
        print(f"{run_dir} was run with other overrides ({earlier}): running it again", flush=True)
        shutil.rmtree(run_dir)
    if (run_dir / "final" / "config.json").is_file():
        return 0.0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(asked, json.dumps(wanted))  # a cut record would read as absent: the run taken as it is
    checkpoints = run_dir / "checkpoints"
    resume = checkpoints.is_dir() and any(is_complete(c) for c in checkpoints.iterdir())
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", f"letrecipes/{recipe}", "--config", config,
           *overrides, f"output_dir={run_dir}", "resume=true" if resume else "overwrite=true"]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(("resuming " if resume else "running ") + str(run_dir), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: {run_dir} failed (exit {done.returncode}); its log: {log}")
    return time.perf_counter() - start


def accuracy_of(scores: Dict) -> float:
    """The shown accuracy of a task's scores; runs scored before lm-eval (``--report`` over an
    old study) kept it as acc_norm_chars, the same quantity (per-byte = per-character on ASCII)."""
    return scores[ACCURACY] if ACCURACY in scores else scores["acc_norm_chars"]


def evaluate_run(run_dir: Path, tasks: List[Path], checkpoint_paths: List[Path]) -> Dict[int, Dict]:
    """lm-eval's scores per step of each step checkpoint (converted to a Hugging Face folder
    by the eval recipe); cached in ``<run>/eval/step_N.json``."""
    from omegaconf import OmegaConf

    from letrecipes.eval import EvalRecipe

    results = {}
    for ckpt in checkpoint_paths:
        step = int(ckpt.name.split("_")[-1])
        out = run_dir / "eval" / f"step_{step}.json"
        if not out.is_file() or json.loads(out.read_text()).get("scorer") != SCORER:
            recipe = EvalRecipe(OmegaConf.create({"checkpoint": str(ckpt), "tasks": [str(t) for t in tasks],
                                                 "device": "cpu", "dtype": "fp32", "batch_size": 32,
                                                 "max_len": 128, "output": str(out)}))
            print(f"eval {ckpt} (lm-evaluation-harness)", flush=True)
            try:
                recipe.setup()
                recipe.evaluate()
            finally:
                recipe.cleanup()
        results[step] = json.loads(out.read_text())["tasks"]
    return results


@dataclass
class Study:
    out: Path
    suite: str
    corpus: Path
    tokenizer: Path
    tasks: List[Path]
    teacher_steps: int = TEACHER_STEPS
    regime_steps: Dict[str, int] = field(default_factory=lambda: dict(REGIMES))
    student: List[str] = field(default_factory=lambda: list(STUDENT))
    teacher: List[str] = field(default_factory=lambda: list(TEACHER))
    seeds: Optional[List[int]] = None
    regimes: Optional[List[str]] = None  # only these of the suite's regimes (None: all)
    seq_len: int = 128
    batch_size: int = 16

    def common(self, steps: int) -> List[str]:
        return [f"tokenizer.path={self.tokenizer}", f"data.source={self.train_dir}", f"data.seq_len={self.seq_len}",
                f"data.cache_dir={self.out / 'cache'}", f"batch_size={self.batch_size}", f"max_steps={steps}",
                "log_every=10",
                f"eval_every={max(1, steps // 20)}", "eval_batches=16", f"save_every={max(1, steps // 4)}",
                "keep_last_checkpoints=8", "progress_bar=false", "lr_scheduler.warmup_steps=" + str(max(1, steps // 20))]

    def run(self, report_only: bool = False) -> Dict:
        spec = dict(SUITES[self.suite])
        if self.regimes:
            unknown = sorted(set(self.regimes) - set(spec["regimes"]))
            if unknown:
                raise SystemExit(f"error: --regimes {','.join(unknown)}: the {self.suite} suite runs "
                                 f"{', '.join(spec['regimes'])}.")
            spec["regimes"] = [r for r in spec["regimes"] if r in self.regimes]
        self.train_dir, cloze = prepare_data(self.out, self.corpus, self.tokenizer)
        tasks = [*self.tasks, cloze]
        teacher_dir = self.out / "runs" / "teacher"
        wall: Dict[str, float] = {}
        if not report_only:
            wall["teacher"] = tune_run("pretrain", "pretrain_tiny", [*self.common(self.teacher_steps), *self.teacher,
                                                                     "seed=0"], teacher_dir, self.out / "logs" / "teacher.log")
        teacher_final = teacher_dir / "final"
        runs: Dict[str, Dict] = {}
        planned = [(regime, seed, arm) for regime in spec["regimes"] for seed in self.seeds or spec["seeds"]
                   for arm in spec["arms"] if arm.seeds is None or seed in arm.seeds]
        for number, (regime, seed, arm) in enumerate(planned, 1):
            steps = self.regime_steps[regime]
            run_dir = self.out / "runs" / regime / f"seed{seed}" / arm.name
            overrides = [*self.common(steps), *self.student, f"seed={seed}", *arm.overrides]
            config = "baseline_tiny"
            if arm.recipe == "let_pretrain":
                config = "let_tiny"
                overrides += [f"teacher.path={teacher_final}", "teacher._component_=auto"]
            if not report_only:
                print(f"[{number}/{len(planned)}] {regime} regime, seed {seed}, {arm.name}", flush=True)
                wall[f"{regime}/seed{seed}/{arm.name}"] = tune_run(arm.recipe, config, overrides, run_dir,
                                                                   self.out / "logs" / f"{regime}_{seed}_{arm.name}.log")
            runs[f"{regime}/seed{seed}/{arm.name}"] = {"dir": run_dir, "regime": regime, "seed": seed,
                                                       "arm": arm.name}
        if not spec.get("evaluate", True):
            for info in runs.values():
                info["eval"] = {}
            teacher_eval = {}
        elif not report_only:  # evaluation after training: a killed study loses no training
            for info in runs.values():
                ckpts = sorted((info["dir"] / "checkpoints").glob("step_*"))
                info["eval"] = evaluate_run(info["dir"], tasks, [c for c in ckpts if is_complete(c)])
            teacher_eval = evaluate_run(teacher_dir, tasks, sorted((teacher_dir / "checkpoints").glob("step_*"))[-1:])
        else:
            for info in runs.values():
                info["eval"] = {int(p.stem.split("_")[1]): json.loads(p.read_text())["tasks"]
                                for p in (info["dir"] / "eval").glob("step_*.json")}
            teacher_eval = {int(p.stem.split("_")[1]): json.loads(p.read_text())["tasks"]
                            for p in (teacher_dir / "eval").glob("step_*.json")}
        return self.summarize(spec, runs, teacher_dir, teacher_eval, wall)

    # ------------------------------------------------------------- report
    def summarize(self, spec, runs, teacher_dir, teacher_eval, wall) -> Dict:
        teacher_records = read_metrics(teacher_dir / "metrics.jsonl")
        teacher_val = val_curve(teacher_records)[-1][1]
        report = {**header("let_study.py", sys.argv[1:]), "suite": self.suite, "teacher": {
            "val_loss": teacher_val, "steps": self.teacher_steps, "eval": teacher_eval}, "regimes": {}}
        for regime in spec["regimes"]:
            per_arm: Dict[str, List[Dict]] = {}
            for key, info in runs.items():
                if info["regime"] != regime:
                    continue
                records = read_metrics(info["dir"] / "metrics.jsonl")
                base = read_metrics(runs[f"{regime}/seed{info['seed']}/baseline"]["dir"] / "metrics.jsonl")
                last_eval = info["eval"][max(info["eval"])] if info["eval"] else {}
                per_arm.setdefault(info["arm"], []).append({
                    "seed": info["seed"], "final_val_loss": val_curve(records)[-1][1],
                    "train_time_s": [r for r in records if "train_time_s" in r][-1]["train_time_s"],
                    "run_wall_s": wall.get(key), **speedups(base, records),
                    # acc_norm (per character): unnormalised sums favour the shortest choice
                    "accuracy": {t: accuracy_of(s) for t, s in last_eval.items()},
                    "eval_final": last_eval,
                    "accuracy_by_step": {step: statistics.mean(accuracy_of(s) for s in ev.values())
                                         for step, ev in sorted(info["eval"].items())},
                    "curve": val_curve(records),
                    "lambda_cosine": [(r["step"], r.get("lambda"), r.get("cosine")) for r in records
                                      if "lambda" in r and "loss" in r],
                    **alignment_summary(records),
                })
            base_final = statistics.mean(r["final_val_loss"] for r in per_arm["baseline"])
            overtakes = regime in OVERTAKING
            report["regimes"][regime] = {
                "steps": self.regime_steps[regime], "arms": per_arm,
                "condition": "student ends below the teacher" if overtakes else "teacher stronger throughout",
                "condition_holds": (base_final < teacher_val) if overtakes else (base_final > teacher_val),
                "baseline_minus_teacher": base_final - teacher_val,
            }
        return report


def alignment_summary(records: List[dict]) -> Dict[str, Optional[float]]:
    """What the alignment weight did: its mean over the alignment window, the lambda0 of
    the linear schedule with the same area (2 x that mean: a linear decay to 0 averages
    lambda0 / 2), and the cosine the student reached. None for arms without alignment."""
    logged = [r for r in records if r.get("lambda") is not None and "loss" in r]
    window = [r for r in logged if r["lambda"] > 0]
    if not window:
        return {"lambda_mean": None, "lambda0_equivalent": None, "cosine_end": None}
    lambda_mean = statistics.mean(r["lambda"] for r in window)
    cosines = [r["cosine"] for r in window if r.get("cosine") is not None]
    return {"lambda_mean": lambda_mean, "lambda0_equivalent": 2 * lambda_mean,
            "cosine_end": cosines[-1] if cosines else None}


def fmt(values: List[Optional[float]], digits: int = 2) -> str:
    """mean, with [min, max] over seeds when there are several; '-' for a target never reached."""
    if any(v is None for v in values):
        reached = [v for v in values if v is not None]
        return f"not reached ({len(reached)}/{len(values)})" if len(values) > 1 else "not reached"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def markdown(report: Dict) -> str:
    lines = [f"Teacher: val loss {report['teacher']['val_loss']:.4f} after {report['teacher']['steps']} steps."]
    for regime, r in report["regimes"].items():
        arms = r["arms"]
        tasks = sorted(next(iter(arms.values()))[0]["accuracy"])
        lines += ["", f"**{regime}** ({r['steps']} steps; condition: {r['condition']}: "
                      f"{'holds' if r['condition_holds'] else 'DOES NOT hold'}; baseline's final val loss minus "
                      f"the teacher's: {r['baseline_minus_teacher']:+.4f})", "",
                  "| " + " | ".join(["arm", "seeds", "final val loss", "speedup (steps = tokens)",
                                      "speedup (wall-clock)", "lambda0 equivalent", "cosine at release",
                                      *(f"{t} ({ACCURACY})" for t in tasks)]) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
        for name, rows in arms.items():
            aligned = all(x.get("lambda0_equivalent") is not None for x in rows)
            cells = [name, str(len(rows)), fmt([x["final_val_loss"] for x in rows], 4),
                     fmt([x["speedup_steps"] for x in rows]), fmt([x["speedup_wall_clock"] for x in rows]),
                     fmt([x["lambda0_equivalent"] for x in rows]) if aligned else "-",
                     fmt([x["cosine_end"] for x in rows], 3) if aligned else "-"]
            cells += [fmt([x["accuracy"].get(t) for x in rows], 3) for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
        if not tasks:
            continue
        chance = {t: s["chance"] for t, s in report["teacher"]["eval"][max(report["teacher"]["eval"])].items()}
        lines.append("| chance | | | | | | | " + " | ".join(f"{chance.get(t, float('nan')):.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, plot_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for regime, r in report["regimes"].items():
        scored = any(rows[0]["accuracy_by_step"] for rows in r["arms"].values())
        fig, axes = plt.subplots(1, 4 if scored else 3, figsize=(20 if scored else 15, 4))
        for number, (name, rows) in enumerate(r["arms"].items()):
            color = f"C{number}"  # one colour per arm in every panel
            steps = [s for s, _ in rows[0]["curve"]]
            mean = [statistics.mean(row["curve"][i][1] for row in rows) for i in range(len(steps))]
            axes[0].plot(steps, mean, label=name, color=color)
            acc = rows[0]["accuracy_by_step"]
            if acc:
                xs = sorted(acc)
                axes[3].plot(xs, [statistics.mean(row["accuracy_by_step"].get(x, float("nan")) for row in rows)
                                  for x in xs], marker="o", label=name, color=color)
            lc = [(s, lam, cos) for s, lam, cos in rows[0]["lambda_cosine"] if lam is not None]
            if name != "baseline" and lc:
                axes[1].plot([s for s, _, _ in lc], [lam for _, lam, _ in lc], label=name, color=color)
                if any(c is not None for _, _, c in lc):
                    axes[2].plot([s for s, _, c in lc if c is not None], [c for _, _, c in lc if c is not None],
                                 label=name, color=color)
        axes[0].axhline(report["teacher"]["val_loss"], color="gray", linestyle=":", label="teacher")
        axes[0].set(title=f"{regime}: validation loss (mean over seeds)", xlabel="step", ylabel="loss")
        axes[1].set(title="alignment weight lambda (first seed)", xlabel="step", ylabel="lambda",
                    ylim=(0, None))
        axes[2].set(title="cosine, student block vs teacher (first seed)", xlabel="step", ylabel="cosine")
        if scored:
            axes[3].set(title=f"mean {ACCURACY} over tasks", xlabel="step", ylabel="accuracy")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"study_{report['suite']}_{regime}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="main")
    parser.add_argument("--out", default="outputs/study")
    parser.add_argument("--corpus", default="outputs/demo/corpus")
    parser.add_argument("--tokenizer", default="outputs/demo/tokenizer.json")
    parser.add_argument("--tasks", default="outputs/eval_tasks", help="a folder of *.jsonl task files")
    parser.add_argument("--plot-dir", default="docs/img")
    parser.add_argument("--seeds", default=None, help="comma-separated; default: the suite's")
    parser.add_argument("--regimes", default=None, help="comma-separated; default: the suite's")
    parser.add_argument("--report", action="store_true", help="no training: tables and plots from finished runs")
    parser.add_argument("--scale", default=None, help=argparse.SUPPRESS)  # JSON: tests shrink the study
    args = parser.parse_args(argv)
    out = Path(args.out)
    if Path(args.corpus) == Path("outputs/demo/corpus") and not Path(args.corpus).is_dir():
        from letrecipes.demo import prepare

        prepare()
    tasks_dir = Path(args.tasks)
    if not tasks_dir.is_dir() and Path(args.tasks) == Path("outputs/eval_tasks"):
        from benchmarks.fetch_eval_tasks import main as fetch

        fetch(["--out", str(tasks_dir)])
    study = Study(out=out, suite=args.suite, corpus=Path(args.corpus), tokenizer=Path(args.tokenizer),
                  tasks=sorted(tasks_dir.glob("*.jsonl")),
                  seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
                  regimes=args.regimes.split(",") if args.regimes else None)
    for key, value in json.loads(args.scale or "{}").items():
        setattr(study, key, value)
    start = time.perf_counter()
    report = study.run(report_only=args.report)
    report["study_wall_s"] = round(time.perf_counter() - start, 1)
    name = f"study_{args.suite}" + (f"_{args.regimes.replace(',', '_')}" if args.regimes else "")
    replace_atomically(out / f"{name}.json", json.dumps(report, indent=2, default=str) + "\n")
    replace_atomically(out / f"{name}.md", markdown(report))
    plots = plot(report, Path(args.plot_dir))
    print(markdown(report))
    print(f"wrote {out / (name + '.json')}, {out / (name + '.md')}, {', '.join(map(str, plots))}; "
          f"{report['study_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
