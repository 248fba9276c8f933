"""Random combinations of valid settings on tiny LET runs, on 1, 2 or 4 processes: each must
train to its last step and write final/ (and, where it saved, resume two steps further), or
end in one error line (a launcher's summary for several processes). Anything else, a
traceback, a hang, a run that ends early without a word, is a finding.

Combinations are where a mature code base still breaks: each setting is tested on its own,
and the product of two dozen of them is not. The first run of this harness (2026-12-07)
found async checkpoints on 2 ranks aborting or hanging at their first save (fixed in
components/checkpointing.py) and `~key` removals answered with the fix for a malformed
override (letrecipes/_config.py).

    python benchmarks/settings_fuzz.py --runs 40 --seed 1            # about 10 s a run on 2 cores
    python benchmarks/settings_fuzz.py --runs 30 --seed 5 --max-processes 4   # HSDP (2 x 2) too

Writes benchmarks/results/settings_fuzz.json: every run's settings, outcome and seconds.
Data: the demo's corpus and tokenizer (prepared once, as `python -m letrecipes.demo --prepare-only`).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components.metrics import read_metrics  # noqa: E402
from tests.launch import free_port  # noqa: E402

TINY = ["data.seq_len=32", "batch_size=4", "eval_every=4", "eval_batches=2", "log_every=1", "save_every=0",
        "device=cpu", "dtype=fp32", "lr_scheduler.warmup_steps=2", "model.num_layers=4", "model.num_heads=2",
        "model.num_kv_heads=1", "model.embed_dim=32", "model.intermediate_dim=64", "progress_bar=false"]
# each key's values are valid on their own; what is tried is their combinations
CHOICES: Dict[str, list] = {
    "activation_checkpointing.mode": ["none", "full", "selective"],
    "loss_chunk_tokens": [0, 16, 40],
    "gradient_accumulation_steps": [1, 2, 3],
    "fsdp.reduce_every_micro_batch": ["true", "false"],
    "fsdp.reshard_after_forward": ["true", "false"],
    "dtype": ["fp32", "bf16", "auto"],
    "model.tie_word_embeddings": ["true", "false"],
    "model.num_heads": [2, 4],
    "model.num_kv_heads": [1, 2],
    "model.init_std": [0.02, 0.006],
    "data.seq_len": [16, 32],
    "data.num_workers": [0, 1, 2],
    "data.drop_copies": ["true", "false"],
    "batch_size": [1, 3, 4],
    "max_steps": [1, 4, 5],
    "eval_every": [0, 2, 3],
    "eval_batches": [1, 2],
    "save_every": [0, 1, 2, 3],
    "keep_last_checkpoints": [1, 2, "all"],
    "async_checkpoint": ["true", "false"],
    "log_every": [1, 3],
    "seed": [0, 7, 123456],
    "clip_grad_norm": ["1.0", "null"],
    "compile": ["false", "false", "false", "true"],  # about 20 s more a run on a CPU
    "optimizer._component_": ["adamw", "torch.optim.AdamW", "sgd"],
    "lr_scheduler._component_": ["warmup_cosine", "warmup_linear", "warmup_stable_decay", "warmup_constant"],
    "alignment.layer_map": ["L2E", "L2M", "M2E", "L2L", "[[1,-1],[3,1]]"],
    "alignment.projector": ["linear", "mlp", "interpolate"],
    "alignment.loss": ["negative_cosine", "mse", "normalized_mse", "smooth_l1", "kl_logits"],
    "alignment.schedule.stop": [2, 3],  # steps: a fraction of max_steps moves on a longer resume (refused)
    "teacher.placement": ["replicated", "sharded"],
    "teacher.dtype": ["fp32", "bf16", "auto"],
    "teacher.compile": ["false", "false", "true"],
}
# another schedule than the config's (auto), with what the new one needs and drops
SCHEDULES = [[], ["alignment.schedule._component_=linear", "alignment.schedule.lambda0=0.5"],
             ["alignment.schedule._component_=cosine", "alignment.schedule.lambda0=0.5"],
             ["alignment.schedule._component_=step", "alignment.schedule.lambda0=0.3"]]
# options of the component picked, given on the command line to a component the file names by
# its short name (`projector: linear`); each added half the time
OPTIONS = {("alignment.projector", "mlp"): ["alignment.projector.hidden_dim=48", "alignment.projector.num_layers=3"],
           ("alignment.projector", "linear"): ["alignment.projector.bias=true"],
           ("alignment.loss", "smooth_l1"): ["alignment.loss.beta=0.5"]}
# keys the config file gives the component it had, which the one picked does not take
DROPPED = {("lr_scheduler._component_", "warmup_constant"): ["~lr_scheduler.min_lr_ratio"],
           ("optimizer._component_", "sgd"): ["~optimizer.betas"]}


def pick_settings(rng: random.Random, max_processes: int) -> tuple:
    """One combination: (overrides, number of processes)."""
    pick = {key: rng.choice(values) for key, values in CHOICES.items()}
    processes = rng.choice([n for n in (1, 2, 4) if n <= max_processes])
    if processes == 4:
        pick["fsdp.replicate_degree"] = rng.choice([1, 2])
    overrides = [f"{key}={value}" for key, value in pick.items()] + rng.choice(SCHEDULES)
    overrides += [drop for item in pick.items() for drop in DROPPED.get(item, [])]
    overrides += [option for item in pick.items() for option in OPTIONS.get(item, []) if rng.random() < 0.5]
    return overrides, processes


def launch(processes: int, args: List[str], timeout: int) -> subprocess.CompletedProcess:
    python = sys.executable
    if processes > 1:
        cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(REPO / "letrecipes" / "let_pretrain.py"), *args]
    else:
        cmd = [python, "-m", "letrecipes.let_pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, -1, err.stdout or "", f"no end within {timeout} s (a hang?)")


def finding(result: subprocess.CompletedProcess, processes: int) -> bool:
    """A failure that is not one error line (several processes: the launcher's summary)."""
    if result.returncode == 0:
        return False
    if "Traceback" in result.stderr or result.returncode == -1:
        return True
    lines = result.stderr.strip().splitlines()
    if processes > 1:
        return "failed on" not in result.stderr
    return not lines or not lines[-1].startswith("error:")


def last_step(out: Path) -> int:
    return max((r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r), default=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-processes", type=int, choices=(1, 2, 4), default=2)
    parser.add_argument("--timeout", type=int, default=400, help="seconds a launch may take")
    parser.add_argument("--work", default="outputs/settings_fuzz")
    parser.add_argument("--out", default="benchmarks/results/settings_fuzz.json")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare

    prepare()
    work = Path(args.work)
    data = [f"tokenizer.path={REPO / 'outputs/demo/tokenizer.json'}", f"data.source={REPO / 'outputs/demo/corpus'}",
            f"data.cache_dir={work / 'cache'}"]
    teacher = work / "teacher"
    if not (teacher / "final" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "letrecipes.pretrain", "--config", "pretrain_tiny", *TINY, *data,
                        f"output_dir={teacher}", "max_steps=4", "model.num_layers=2", "model.embed_dim=24",
                        "model.num_heads=2", "model.intermediate_dim=48", "overwrite=true"], cwd=REPO, check=True,
                       env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True)
    rng = random.Random(args.seed)
    report = {**header("settings_fuzz.py", argv), "runs": []}
    for i in range(args.runs):
        overrides, processes = pick_settings(rng, args.max_processes)
        out = work / f"run_{i}"
        common = ["--config", "let_tiny", *TINY, *data, f"teacher.path={teacher / 'final'}", f"output_dir={out}"]
        start = time.perf_counter()
        result = launch(processes, [*common, *overrides, "overwrite=true"], args.timeout)
        run = {"processes": processes, "overrides": overrides, "returncode": result.returncode,
               "seconds": round(time.perf_counter() - start, 1),
               "last_line": (result.stderr.strip().splitlines() or [""])[-1][:300]}
        if finding(result, processes):
            run["finding"] = result.stderr[-4000:]
        elif result.returncode == 0:
            steps = int(next(o for o in overrides if o.startswith("max_steps=")).split("=")[1])
            if last_step(out) != steps or not (out / "final" / "config.json").is_file():
                run["finding"] = f"ended with exit 0 at step {last_step(out)} of {steps}, or without final/"
            elif not any(o == "save_every=0" for o in overrides):
                again = [o for o in overrides if not o.startswith("max_steps=")] + [f"max_steps={steps + 2}"]
                resumed = launch(processes, [*common, *again, "resume=true"], args.timeout)
                run["resume_returncode"] = resumed.returncode
                if finding(resumed, processes) or (resumed.returncode == 0 and last_step(out) != steps + 2):
                    run["finding"] = "resume: " + resumed.stderr[-4000:]
        report["runs"].append(run)
        print(f"run {i}: {processes} process(es), exit {run['returncode']}, {run['seconds']} s"
              + (" FINDING" if "finding" in run else ""), flush=True)
        if "finding" in run:
            print(" ".join(overrides), "\n", run["finding"][-2000:], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    report["findings"] = sum("finding" in run for run in report["runs"])
    report["trained"] = sum(run["returncode"] == 0 for run in report["runs"])
    write_json(report, args.out)
    print(f"{report['findings']} finding(s) in {args.runs} runs ({report['trained']} trained; the others ended in "
          f"one error line); {args.out}")
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
