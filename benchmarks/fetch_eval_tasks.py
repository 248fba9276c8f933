"""Fetch BIG-bench multiple-choice tasks once and convert them to JSON-lines task files.

    python -m benchmarks.fetch_eval_tasks [--out outputs/eval_tasks] [--items 500]

The `bigbench` 1.0.0 source archive (358 MB, Apache-2.0) comes from PyPI through pip
(no other network access is needed); only the task files below are extracted, each
checked against its SHA-256, and a fixed seeded sample of ``--items`` items is written
per task, with an lm-eval task definition beside each file (``lm_eval --include_path
outputs/eval_tasks --tasks letrecipes``). Nothing large is kept: the archive is deleted
unless ``--keep-archive``.

Tasks (chance level in brackets):

- ``hyperbaton`` [0.5]: which of two adjective orders is right. Scored BLiMP-style: each
  of the two phrases is a continuation of an empty context, the likelier one wins;
- ``goal_step_wikihow_step`` [0.25]: the most reasonable step towards a goal;
- ``goal_step_wikihow_goal`` [0.25]: the most reasonable goal of a step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List

from letrecipes.components.evaluation import Item, write_lm_eval_tasks, write_task

ARCHIVE = "bigbench-1.0.0.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS = {  # our name: (path inside the archive, sha256 of that task.json)
    "hyperbaton": ("bigbench/benchmark_tasks/hyperbaton/task.json",
                   "8cd85fac8281210a1276a82fddd493a27b0484b84ddf65f0b4f9b4476d6233e2"),
    "goal_step_wikihow_step": ("bigbench/benchmark_tasks/goal_step_wikihow/step_inference/task.json",
                               "e3cba757d9f6050a90f4a9d7b32d0159f2c0d69a4b6656588f56593f85193494"),
    "goal_step_wikihow_goal": ("bigbench/benchmark_tasks/goal_step_wikihow/goal_inference/task.json",
                               "ae9d68546ae17707034b284444169b6035ea291dfab15826edaa867888090de6"),
}
HYPERBATON = re.compile(r'a " (.+?) " b " (.+?) " \?')


def convert(name: str, task: dict) -> List[Item]:
    items = []
    for example in task["examples"]:
        scores: Dict[str, int] = example["target_scores"]
        if name == "hyperbaton":
            match = HYPERBATON.search(example["input"])
            if match is None:
                raise ValueError(f"hyperbaton: unexpected input {example['input'][:80]!r}")
            first, second = match.groups()
            items.append(Item("", [first.capitalize() + ".", second.capitalize() + "."], 0 if scores["a"] else 1))
        else:
            choices = list(scores)
            items.append(Item(example["input"].rstrip(), [" " + c for c in choices],
                              next(i for i, c in enumerate(choices) if scores[c])))
    return items


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_archive(where: Path) -> Path:
    archive = where / ARCHIVE
    if not archive.is_file():
        print(f"downloading {ARCHIVE} (358 MB) from PyPI with pip ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-q", "bigbench==1.0.0", "-d", str(where)], check=True)
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != ARCHIVE_SHA256:
        raise SystemExit(f"error: {archive} has SHA-256 {digest.hexdigest()}, expected {ARCHIVE_SHA256}.")
    return archive


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/eval_tasks")
    parser.add_argument("--items", type=int, default=500, help="items sampled per task (seed 0); 0 = all")
    parser.add_argument("--archive-dir", default=None, help="where the archive is (or goes); default a temp dir")
    parser.add_argument("--keep-archive", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    todo = [n for n in TASKS if not (out / f"{n}.jsonl").is_file()]
    if not todo:
        print(f"eval tasks already in {out}: {', '.join(TASKS)}")
        write_definitions(out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.archive_dir or tmp)
        where.mkdir(parents=True, exist_ok=True)
        archive = download_archive(where)
        members = {f"bigbench-1.0.0/{TASKS[n][0]}": n for n in todo}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = members.get(member.name)
                if name is None:
                    continue
                data = tar.extractfile(member).read()
                if sha256(data) != TASKS[name][1]:
                    raise SystemExit(f"error: {member.name} has SHA-256 {sha256(data)}, expected {TASKS[name][1]}.")
                items = convert(name, json.loads(data))
                if args.items and len(items) > args.items:
                    items = random.Random(0).sample(items, args.items)
                write_task(out / f"{name}.jsonl", items)
                print(f"{name}: {len(items)} items -> {out / (name + '.jsonl')}")
        if not args.keep_archive and args.archive_dir:
            archive.unlink()
    write_definitions(out)
    return 0


def write_definitions(out: Path) -> None:
    """lm-eval task YAMLs beside the files: `lm_eval --include_path <out> --tasks letrecipes`."""
    names = write_lm_eval_tasks([out / f"{n}.jsonl" for n in TASKS], out)
    print(f"lm-eval tasks {', '.join(names.values())} (tag letrecipes) -> {out}/*.yaml")


if __name__ == "__main__":
    sys.exit(main())
