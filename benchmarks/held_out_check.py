"""Time and memory of the held-out document check (components/held_out.py) on a synthetic
training corpus: random tokens in documents of about 1,000, and a held-out set of 5,000
documents of which 600 are copies of training documents.

    python benchmarks/held_out_check.py [--tokens 100000000 1000000000]

Each size is measured in this process, one after the other: the seconds ``check_documents``
takes (it refuses this held-out set: 12% copied) and the peak resident memory it adds
(``VmHWM`` before and after; the corpus itself is counted before). JSON in
benchmarks/results/held_out_check.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components import held_out  # noqa: E402
from letrecipes.components.corpus import DataError  # noqa: E402


class Tokens:
    """A token array as the check reads a prepared corpus: ``len`` and slices."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: slice) -> np.ndarray:
        return self.array[index]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    corpus = rng.integers(1, 50_000, size=tokens, dtype=np.uint16)
    corpus[rng.integers(0, tokens, size=tokens // 1000)] = 0  # end-of-text: documents of about 1,000 tokens
    ends = np.flatnonzero(corpus == 0) + 1
    copied = [corpus[ends[i]:ends[i + 1]] for i in range(100, 700)]
    fresh = [np.append(rng.integers(1, 50_000, size=500), 0).astype(np.uint16) for _ in range(4_400)]
    held = Tokens(np.concatenate([*copied, *fresh]))
    before = peak_mb()
    began = time.perf_counter()
    try:
        held_out.check_documents(held, [("data.source", Tokens(corpus))], 0, log=lambda _: None)
        refused = False
    except DataError:
        refused = True
    seconds = time.perf_counter() - began
    read = min(tokens, held_out.SCAN_TOKENS)
    return {"training_tokens": tokens, "tokens_read": read, "held_out_documents": 5_000, "copied": 600,
            "refused": refused, "seconds": round(seconds, 2), "seconds_per_100M_read": round(seconds * 1e8 / read, 2),
            "peak_added_mb": round(peak_mb() - before, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000_000])
    parser.add_argument("--out", default="benchmarks/results/held_out_check.json")
    args = parser.parse_args(argv)
    rows = []
    for tokens in args.tokens:
        rows.append(measure(tokens))
        print(rows[-1], flush=True)
    write_json({**header("held_out_check.py", argv), "chunk_tokens": held_out.CHUNK, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
