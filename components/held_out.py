"""Held-out documents that are in the training data too.

``data.val_source`` is text the model must never train on, or ``val_loss`` measures what it
memorised and nothing in the figures shows it. ``data._check_held_out`` refuses the same
files (or byte-identical copies) before any preparation; this finds the same *documents*
after it, whatever files carry them: a validation shard re-sharded, converted to parquet or
recompressed on its way into a training folder, or a mixture that drew from a corpus
holding it. Documents are compared by their tokens (each ends at an end-of-text token in
a prepared corpus), as a length and a 64-bit hash.

Why our own: the hashing is a few numpy passes over token arrays this project already
holds; deduplication libraries work on text and on the whole corpus, which at pretraining
scale is a job of its own. A training corpus larger than ``SCAN_TOKENS`` is read in evenly
spread windows (the log states the share read), so the check costs seconds at any scale.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np

from letrecipes.components.corpus import DataError, DataWarning

MIN_TOKENS = 32  # shorter documents (a cookie notice, "page not found") recur in any crawl by chance
MAX_TOKENS = 1 << 20  # longer ones (a whole book as one document) are left out: their carry would grow unbounded
SCAN_TOKENS = 500_000_000  # training tokens read at most (2-3 s per 100M on one core: benchmarks/held_out_check.py)
WINDOWS = 64  # a larger corpus is read in this many evenly spread windows
CHUNK = 1 << 22  # tokens hashed at a time: about 150 MB of temporaries
REFUSED_SHARE = 0.1  # of the held-out documents found in training: not chance, a copy


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise (arithmetic modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_keys(tokens: np.ndarray, eos_id: int, first_is_whole: bool) -> Tuple[np.ndarray, np.ndarray, int]:
    """One 64-bit key (a hash of the tokens in order, and the length) and the length of each
    document of ``MIN_TOKENS`` or more that ends in ``tokens``; and where the unfinished last
    one starts (-1: none does, the tokens all belong to a document whose start was not seen).
    The text before the first end-of-text token is a document only if ``first_is_whole``."""
    ends = np.flatnonzero(tokens == eos_id) + 1
    rest = int(ends[-1]) if len(ends) else (0 if first_is_whole else -1)
    starts = np.concatenate([[0], ends[:-1]])
    if not first_is_whole:
        starts, ends = starts[1:], ends[1:]
    lengths = ends - starts
    keep = lengths >= MIN_TOKENS
    if not keep.any():
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), rest
    with np.errstate(over="ignore"):
        span = slice(int(starts[0]), int(ends[-1]))
        position = np.arange(span.start, span.stop, dtype=np.int64) - np.repeat(starts, lengths)
        mixed = _mix(tokens[span].astype(np.uint64) + _mix(position.astype(np.uint64) + np.uint64(1)))
        total = np.concatenate([[np.uint64(0)], np.cumsum(mixed, dtype=np.uint64)])
        kept = lengths[keep]
        keys = (total[ends[keep] - span.start] - total[starts[keep] - span.start]) ^ _mix(kept.astype(np.uint64))
    return keys, kept, rest


def _windows(size: int) -> List[Tuple[int, int]]:
    if size <= SCAN_TOKENS:
        return [(0, size)]
    width, gap = SCAN_TOKENS // WINDOWS, size // WINDOWS
    return [(i * gap, i * gap + width) for i in range(WINDOWS)]


def corpus_keys(tokens, eos_id: int, longest: int = MAX_TOKENS) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The document keys and lengths of a prepared corpus (anything sliced as ``tokens[a:b]``, with a
    length), window by window and chunk by chunk. A document that runs on past the end of a
    chunk is carried into the next one, unless it is already longer than ``longest``: it
    could match nothing, and one document can be a whole corpus."""
    for start, stop in _windows(len(tokens)):
        carry, whole, at = np.zeros(0, tokens[0:0].dtype), start == 0, start
        while at < stop:
            chunk = np.concatenate([carry, tokens[at:min(at + CHUNK, stop)]])
            at = min(at + CHUNK, stop)
            keys, lengths, rest = document_keys(chunk, eos_id, whole)
            yield keys, lengths
            carry, whole = (chunk[:0], False) if rest < 0 else (chunk[rest:], True)
            if len(carry) > longest:
                carry, whole = carry[:0], False  # skipped to its end


def check_documents(held_out, training: Sequence[Tuple[str, object]], eos_id: int,
                    log: Callable[[str], None] = print) -> None:
    """Refuse a held-out corpus whose documents are in ``training`` (``(key, tokens)`` pairs)
    in a share no chance repeat explains; warn about a few; say what was read."""
    began = time.monotonic()
    pieces = list(corpus_keys(held_out, eos_id))
    held = np.unique(np.concatenate([np.zeros(0, np.uint64), *(keys for keys, _ in pieces)]))
    if not len(held):
        return
    longest = max(int(lengths.max()) for _, lengths in pieces if len(lengths))
    found, read, total, per_source = np.zeros(len(held), bool), 0, 0, []
    for key, tokens in training:
        total += len(tokens)
        read += sum(b - a for a, b in _windows(len(tokens)))
        here = np.zeros(len(held), bool)
        for keys, _ in corpus_keys(tokens, eos_id, longest):
            at = np.searchsorted(held, keys)
            hit = at < len(held)
            hit[hit] = held[at[hit]] == keys[hit]
            here[at[hit]] = True
        if here.any():
            per_source.append(f"{key}: {int(here.sum()):,}")
        found |= here
    if not total:
        return
    count, share = int(found.sum()), read / total
    where = "; ".join(per_source) if len(training) > 1 else training[0][0]
    scope = "all its tokens read" if share >= 1 else f"{share:.1%} of its tokens read, in {WINDOWS} windows"
    seconds = time.monotonic() - began
    if count / share >= REFUSED_SHARE * len(held):
        raise DataError(
            f"data.val_source: {count:,} of its {len(held):,} documents (of {MIN_TOKENS}+ tokens) are in the training "
            f"data ({where}; {scope}) under other files (a re-sharded, converted or recompressed copy), so the "
            "validation loss would measure what the model memorised. Fix: take those documents out of the training "
            "corpus, or hold out another corpus (or drop data.val_source and use data.val_fraction).")
    if count:
        warnings.warn(DataWarning(
            f"data.val_source: {count:,} of its {len(held):,} documents (of {MIN_TOKENS}+ tokens) are in the training "
            f"data too ({where}; {scope}): repeats of that order happen by chance in a crawl, and val_loss is "
            "slightly optimistic on them. Fix: none needed; deduplicate the corpora to remove them."), stacklevel=2)
    log(f"validation: data.val_source's {len(held):,} documents (of {MIN_TOKENS}+ tokens) checked against the "
        f"training data ({scope}): {count:,} found, {seconds:.1f} s")
