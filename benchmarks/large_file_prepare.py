"""Preparing one large file: read whole by one worker (as before 2026-12-05) against cut
into byte ranges (components/corpus.py, SPLIT_FILE_BYTES) that every worker shares; and a
datasets folder of book-length rows in units of 50,000 rows (one unit here, as before
2026-12-05) against units cut at TEXT_UNIT_BYTES of rows.

    python benchmarks/large_file_prepare.py              # 128 MB, about 8 minutes on 2 cores
    python benchmarks/large_file_prepare.py --mb 64      # a quick look

The same text as one JSON Lines file and as one text file of documents ended by
<|endoftext|> (TinyStories' layout), SmolLM2-135M's tokenizer, ``--workers`` processes,
the two ways side by side in one run; the token streams must be equal. Writes
benchmarks/results/large_file_prepare.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import header, write_json
from data import SMOLLM2, synthetic_jsonl

from letrecipes.components import corpus
from letrecipes.components.data import TokenShards
from letrecipes.components.gguf_teacher import GGUFFormat
from letrecipes.components.teachers import tokenizer_file
from letrecipes.components.tokenizer import Tokenizer


def one_file(parts: Path, jsonl: Path, text: Path, books: Path) -> None:
    """The same documents as one JSONL file, one text file, and a datasets folder of book-length
    rows (40 documents a row: about 130 KB, so 50,000 rows would be 6 GB)."""
    from datasets import Dataset

    rows, book = [], []
    with open(jsonl, "w") as lines, open(text, "w") as stories:
        for part in sorted(parts.glob("*.jsonl")):
            for line in open(part):
                lines.write(line)
                stories.write(json.loads(line)["text"] + "<|endoftext|>\n")
                book.append(json.loads(line)["text"])
                if len(book) == 40:
                    rows.append("\n\n".join(book))
                    book = []
    Dataset.from_dict({"text": rows}).save_to_disk(str(books))


PREPARE = """
import json, sys, time
from letrecipes.components import corpus
from letrecipes.components.prepare import prepare_corpus
from letrecipes.components.tokenizer import Tokenizer
source, tokenizer, out, workers, split = sys.argv[1:]
corpus.SPLIT_FILE_BYTES = int(split)  # the units are listed in this process
if int(split) > corpus.TEXT_UNIT_BYTES:  # "whole": a datasets folder's units of 50,000 rows, as before 2026-12-05
    corpus.TEXT_UNIT_BYTES = int(split)
start = time.perf_counter()
manifest = prepare_corpus(source, Tokenizer(tokenizer), out, workers=int(workers), log=lambda _: None)
print(json.dumps({"seconds": time.perf_counter() - start, "units": len(manifest["shards"]), "tokens": manifest["tokens"]}))
"""


def timed_prepare(source: Path, tokenizer: Tokenizer, out: Path, workers: int, split_bytes: int,
                  one_thread: bool = False) -> dict:
    """A prepare in a process of its own; ``one_thread``: the tokenizer's own thread pool off,
    which with one unit (read in the calling process) leaves one core at work."""
    env = {**os.environ, **({"TOKENIZERS_PARALLELISM": "false"} if one_thread else {})}
    done = subprocess.run([sys.executable, "-c", PREPARE, str(source), str(tokenizer.path), str(out), str(workers),
                           str(split_bytes)], env=env, check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["seconds"] = round(row["seconds"], 2)
    size = sum(f.stat().st_size for f in ([source] if source.is_file() else source.glob("*.arrow")))
    row["mb_per_s"] = round(size / 2**20 / row["seconds"], 2)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=128.0, help="MB of text in the one file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/large_file_prepare.json")
    args = parser.parse_args(argv)
    report = {**header("large_file_prepare.py", argv), "split_file_bytes": corpus.SPLIT_FILE_BYTES, "rows": []}
    default_split = corpus.SPLIT_FILE_BYTES
    with tempfile.TemporaryDirectory(prefix="letbig-") as tmp:
        tmp = Path(tmp)
        tokenizer = Tokenizer(tokenizer_file(SMOLLM2, key="tokenizer", fmt=GGUFFormat(tokenizer_dir=tmp / "tok")))
        synthetic_jsonl(tmp / "parts", args.mb)
        one_file(tmp / "parts", tmp / "one.jsonl", tmp / "one.txt", tmp / "books")
        for source in (tmp / "one.jsonl", tmp / "one.txt", tmp / "books"):
            whole = timed_prepare(source, tokenizer, tmp / f"{source.name}.whole", args.workers, 10**15)
            whole_one_core = timed_prepare(source, tokenizer, tmp / f"{source.name}.whole1", args.workers, 10**15,
                                           one_thread=True)
            cut = timed_prepare(source, tokenizer, tmp / f"{source.name}.cut", args.workers, default_split)
            same = np.array_equal(TokenShards(tmp / f"{source.name}.whole", tokenizer)[0:whole["tokens"]],
                                  TokenShards(tmp / f"{source.name}.cut", tokenizer)[0:cut["tokens"]])
            # One unit runs in the calling process, where only the tokenizer's encode uses more cores:
            # T(c) = serial + parallel / c. Two measured points (1 and the machine's cores) give both
            # parts, and so an estimate for a larger machine, where cut units scale with the workers.
            cores = os.cpu_count() or 2
            parallel = (whole_one_core["seconds"] - whole["seconds"]) * cores / (cores - 1)
            serial = whole_one_core["seconds"] - parallel
            # Cut: each unit is 1/units of the work with the same serial share; min(32, units) workers,
            # each with 32 // workers tokenizer threads (prepare.in_workers), in ceil(units / workers) rounds.
            units = cut["units"]
            per_worker = min(32, units)
            cut_32 = -(-units // per_worker) * (serial + parallel / (32 // per_worker)) / units
            row = {"file": source.suffix or "datasets folder", "mb": round(whole["mb_per_s"] * whole["seconds"], 1),
                   "workers": args.workers,
                   "whole": whole, "whole_tokenizer_one_thread": whole_one_core, "cut": cut,
                   "speedup": round(whole["seconds"] / cut["seconds"], 2), "same_tokens": bool(same),
                   "whole_serial_fraction": round(serial / whole_one_core["seconds"], 3),
                   "estimate_32_cores": {"whole_s": round(serial + parallel / 32, 1),
                                         "cut_s": round(cut_32, 1)},
                   # the same text 2 GB long: 32 units of 64 MB, one thread each on 32 workers
                   "estimate_32_cores_2gb": {"whole_s": round((serial + parallel / 32) * 2048 / args.mb, 1),
                                             "cut_s": round(whole_one_core["seconds"] * 2048 / args.mb / 32, 1)}}
            report["rows"].append(row)
            print(f"{source.name}: {row['mb']} MB, {args.workers} workers: whole {whole['seconds']} s (1 unit; "
                  f"{whole_one_core['seconds']} s with the tokenizer on one thread: serial part "
                  f"{row['whole_serial_fraction']:.0%}), cut {cut['seconds']} s ({cut['units']} units): "
                  f"{row['speedup']}x; same tokens: {same}; estimated on 32 cores: whole "
                  f"{row['estimate_32_cores']['whole_s']} s, cut {row['estimate_32_cores']['cut_s']} s; 2 GB of it: "
                  f"{row['estimate_32_cores_2gb']['whole_s']} s against {row['estimate_32_cores_2gb']['cut_s']} s",
                  flush=True)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
