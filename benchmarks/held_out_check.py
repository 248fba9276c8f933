"""Time and memory of document keys (components/document_keys.py): what keying adds to a
prepare, counting the copies across a corpus, ``data.drop_copies``'s pass (every shard holds
copies here), and the held-out check (components/held_out.py) with the keys a prepare stored
against the same check hashing the tokens (a folder prepared before keys were kept). The
training corpus is synthetic: random tokens in documents of about 1,000, written as a prepared folder of 100M-token shards, with 1% of its documents
copied; the held-out set has 5,000 documents of which 600 are training documents.

    python benchmarks/held_out_check.py [--tokens 100000000 1000000000] [--dir /tmp]

Each size is measured in this process, one after the other; ``peak_added_mb`` is the growth
of ``VmHWM`` over the step (0: within an earlier peak). JSON in
benchmarks/results/held_out_check.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components import document_keys, held_out  # noqa: E402
from letrecipes.components.corpus import DataError  # noqa: E402


class Shards:
    """A prepared folder as the check reads it (``TokenShards``'s folder, manifest, ``len`` and
    slices), without a tokenizer."""

    def __init__(self, folder: Path, manifest: dict, array: np.ndarray):
        self.folder, self.manifest, self.array = folder, manifest, array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: slice) -> np.ndarray:
        return self.array[index]


class Tokens(Shards):
    """The same corpus, with no stored keys to use."""

    def __init__(self, array: np.ndarray):
        super().__init__(Path("."), None, array)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, *args):
    before, began = peak_mb(), time.perf_counter()
    try:
        result = step(*args)
    except DataError:
        result = "refused"
    return result, round(time.perf_counter() - began, 2), round(peak_mb() - before, 1)


def measure(tokens: int, folder: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1 / 1000, size=tokens // 900)
    lengths[100::100] = lengths[99:-1:100]  # every hundredth document is a copy of the one before it
    ends = np.cumsum(lengths)
    ends = ends[ends <= tokens]
    starts = np.concatenate([[0], ends[:-1]])
    corpus = rng.integers(1, 50_000, size=int(ends[-1]), dtype=np.uint16)
    corpus[ends - 1] = 0  # end-of-text
    for j in range(100, len(ends), 100):
        corpus[starts[j]:ends[j]] = corpus[starts[j - 1]:ends[j - 1]]
    cuts = np.unique(np.concatenate([[0], starts[np.searchsorted(starts, np.arange(1, len(corpus) // 10**8 + 1) * 10**8)
                                                 .clip(max=len(starts) - 1)], [len(corpus)]]))
    files = []  # shards of about 100M tokens, each cut at a document's start
    for n, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:])):
        part = corpus[start:stop]
        files.append(f"shard_{n:06d}.bin")
        part.tofile(folder / files[-1])
    manifest = {"shards": [{"file": f} for f in files]}
    copied = [corpus[starts[i]:ends[i]] for i in range(1, 601)]
    fresh = [np.append(rng.integers(1, 50_000, size=500), 0).astype(np.uint16) for _ in range(4_400)]
    held = Tokens(np.concatenate([*copied, *fresh]))

    def key_all():
        return sum(document_keys.write_shard_keys(folder / f, np.uint16, 0) for f in files)

    def check(training):
        held_out.check_documents(held, [("data.source", training)], 0, log=lambda _: None)

    keyed, key_s, key_mb = timed(key_all)
    repeats, count_s, count_mb = timed(
        lambda: document_keys.count_repeats(document_keys.stored_keys(folder, manifest["shards"])))
    stored, stored_s, stored_mb = timed(check, Shards(folder, manifest, corpus))
    scanned, scan_s, scan_mb = timed(check, Tokens(corpus))

    def drop_all():  # data.drop_copies: which documents, then the shards rewritten without them
        plan = document_keys.copies_to_drop(document_keys.stored_keys(folder, manifest["shards"]))
        return sum(document_keys.drop_from_shard(folder / f, np.uint16, 0, every, later)[2]
                   for f, (every, later) in zip(files, plan) if len(every) or len(later))

    dropped, drop_s, drop_mb = timed(drop_all)
    for f in files:
        (folder / f).unlink(), document_keys.keys_path(folder / f).unlink()
    read = min(tokens, held_out.SCAN_TOKENS)
    return {"training_tokens": tokens, "documents_keyed": keyed, "copies_counted": repeats["copies"],
            "keying_seconds": key_s, "keying_seconds_per_100M": round(key_s * 1e8 / tokens, 2),
            "keying_peak_added_mb": key_mb, "count_repeats_seconds": count_s, "count_repeats_peak_added_mb": count_mb,
            "drop_copies": {"dropped": dropped, "seconds": drop_s, "seconds_per_100M": round(drop_s * 1e8 / tokens, 2),
                            "peak_added_mb": drop_mb},
            "held_out_documents": 5_000, "copied": 600,
            "check_with_stored_keys": {"refused": stored == "refused", "seconds": stored_s, "peak_added_mb": stored_mb},
            "check_hashing_tokens": {"refused": scanned == "refused", "tokens_read": read, "seconds": scan_s,
                                     "seconds_per_100M_read": round(scan_s * 1e8 / read, 2), "peak_added_mb": scan_mb}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000_000])
    parser.add_argument("--dir", default=None, help="where the shards are written (a temporary folder in it)")
    parser.add_argument("--out", default="benchmarks/results/held_out_check.json")
    args = parser.parse_args(argv)
    rows = []
    for tokens in args.tokens:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            rows.append(measure(tokens, Path(folder)))
        print(rows[-1], flush=True)
    write_json({**header("held_out_check.py", argv), "chunk_tokens": document_keys.CHUNK, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
