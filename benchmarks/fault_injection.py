"""Interrupt a LET run at random moments, resume it each time, and compare it with an
uninterrupted run.

    python benchmarks/fault_injection.py [--kills 20] [--seed 0]

Each interruption is drawn from three faults: a SIGKILL (no warning), a SIGTERM (a
scheduler's notice: the run must save the step it is in and exit), and a SIGKILL after
which a byte of the newest complete checkpoint is flipped (the next launch must detect
it by its checksum and resume from the one before). Reports, per fault, the steps lost
(the last step the interrupted run logged minus the step the next launch resumed from),
whether each interruption was survived, and whether the final weights and every logged
figure equal the uninterrupted run's. JSON in benchmarks/results/fault_injection.json.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components.metrics import read_metrics  # noqa: E402

TINY = ["model.num_layers=4", "model.embed_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_dim=128", "data.seq_len=64", "batch_size=8", "log_every=1", "eval_every=20",
        "eval_batches=2", "dtype=fp32", "progress_bar=false"]
KEYS = ("loss", "nll", "lr", "val_loss", "align_loss", "lambda", "cosine")
FAULTS = ("sigkill", "sigterm", "corrupt_newest")


def launch(out: Path, teacher: Path, steps: int, log: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes/let_pretrain", "--config", "let_tiny",
           *TINY, f"max_steps={steps}", "save_every=10", "keep_last_checkpoints=2", "alignment.schedule.stop=0.5",
           f"teacher.path={teacher}", f"output_dir={out}", "resume=true" if resume else "overwrite=true"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "WANDB_MODE": "disabled"})


def last_logged_step(out: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(out / "metrics.jsonl")), default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def latest_checkpoint(out: Path):
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    return done[-1] if done else None


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def history(out: Path):
    return {r["step"]: {k: r[k] for k in KEYS if r.get(k) is not None}
            for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/fault_injection.json")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    from letrecipes.demo import prepare

    prepare(REPO / "outputs" / "demo")  # the demo corpus and tokenizer the tiny configs read
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="letrecipes-faults-"))
    teacher_run = work / "teacher"
    subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes/pretrain", "--config",
                    "pretrain_tiny", *TINY, "max_steps=30", "save_every=0", f"output_dir={teacher_run}"],
                   cwd=REPO, check=True, capture_output=True)
    teacher = teacher_run / "final"
    reference, killed = work / "reference", work / "killed"
    start = time.perf_counter()
    assert launch(reference, teacher, args.steps, work / "reference.log", resume=False).wait() == 0
    reference_s = time.perf_counter() - start

    kills = []
    done_steps = 0
    for attempt in range(args.kills):
        if done_steps >= args.steps - 2:
            break
        log = work / f"attempt{attempt}.log"
        proc = launch(killed, teacher, args.steps, log, resume=attempt > 0)
        fault = rng.choice(FAULTS)
        # interrupt once the run has logged a random step past where it resumed, plus a random
        # fraction of a step: lands anywhere in a step, and sometimes inside a checkpoint save
        target = min(args.steps - 1, done_steps + rng.randint(5, args.steps // max(1, args.kills)))
        while proc.poll() is None and last_logged_step(killed) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is not None:
            kills.append({"attempt": attempt, "finished_before_kill": True})
            break
        proc.send_signal(signal.SIGTERM if fault == "sigterm" else signal.SIGKILL)
        code = proc.wait(timeout=300)
        if (killed / "final").exists():  # the signal came after the run had finished its work
            kills.append({"attempt": attempt, "finished_before_kill": True})
            break
        entry = {"attempt": attempt, "fault": fault, "target_step": target, "exit_code": code}
        if fault == "sigterm":
            tail = log.read_text().strip().splitlines()[-1:]
            entry["stop_message"] = tail[0] if tail else ""
        if fault == "corrupt_newest":
            newest = latest_checkpoint(killed)
            if newest is not None:
                flip_a_byte(next(newest.glob("*.distcp")))
                entry["corrupted"] = newest.name
        done_steps = last_logged_step(killed)
        entry["last_logged_step"] = done_steps
        kills.append(entry)
    final_log = work / "final.log"
    assert launch(killed, teacher, args.steps, final_log, resume=True).wait() == 0, final_log.read_text()[-2000:]
    # steps lost: the last step an interrupted launch logged minus the step the next launch resumed from
    logs = [work / f"attempt{k['attempt']}.log" for k in kills] + [final_log]
    for k, next_log in zip(kills, logs[1:]):
        if "last_logged_step" in k:
            text = next_log.read_text()
            found = re.search(r"resumed from \S+ at step (\d+)", text)
            k["resumed_at_step"] = int(found.group(1)) if found else 0
            k["steps_lost"] = k["last_logged_step"] - k["resumed_at_step"]
            if "corrupted" in k:
                k["damage_detected"] = f"resume: skipping {killed / 'checkpoints' / k['corrupted']}" in text
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    real_kills = [k for k in kills if "steps_lost" in k]
    by_fault = {fault: [k["steps_lost"] for k in real_kills if k["fault"] == fault] for fault in FAULTS}
    report = {
        **header("fault_injection.py", argv),
        "steps": args.steps, "checkpoint_every": 10, "kills": len(real_kills), "kills_survived": len(real_kills),
        "steps_lost_per_kill": [k["steps_lost"] for k in real_kills],
        "mean_steps_lost": sum(k["steps_lost"] for k in real_kills) / max(1, len(real_kills)),
        "steps_lost_by_fault": by_fault,
        "sigterm_stops_saved_their_step": all(k["exit_code"] == 1 and "error: stopped by SIGTERM" in k["stop_message"]
                                              and k["steps_lost"] == 0 for k in real_kills if k["fault"] == "sigterm"),
        "corruptions_detected": [k.get("damage_detected") for k in real_kills if "corrupted" in k],
        "final_weights_equal": a.keys() == b.keys() and all(bool((a[n] == b[n]).all()) for n in a),
        "every_logged_figure_equal": history(reference) == history(killed),
        "uninterrupted_run_s": round(reference_s, 1), "attempts": kills, "work_dir": str(work),
    }
    write_json(report, args.out)
    print({k: report[k] for k in ("kills", "kills_survived", "steps_lost_by_fault", "sigterm_stops_saved_their_step",
                                  "corruptions_detected", "final_weights_equal", "every_logged_figure_equal")})
    sound = report["sigterm_stops_saved_their_step"] and all(report["corruptions_detected"])
    return 0 if sound and report["final_weights_equal"] and report["every_logged_figure_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
