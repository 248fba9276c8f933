"""Held-out documents that are in the training data too.

``data.val_source`` is text the model must never train on, or ``val_loss`` measures what it
memorised and nothing in the figures shows it. ``data._check_held_out`` refuses the same
files (or byte-identical copies) before any preparation; this finds the same *documents*
after it, whatever files carry them: a validation shard re-sharded, converted to parquet or
recompressed on its way into a training folder, or a mixture that drew from a corpus
holding it. Documents are compared by their tokens (each ends at an end-of-text token in
a prepared corpus), as a length and a 64-bit hash (``document_keys.py``).

The training corpus's keys are those its prepare stored: every document is looked up, in
milliseconds. A folder prepared before keys were kept is hashed here from its tokens; one
larger than ``SCAN_TOKENS`` in evenly spread windows (the log states the share read), so
the check costs seconds at any scale.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np

from letrecipes.components.corpus import DataError, DataWarning
from letrecipes.components.document_keys import MIN_TOKENS, corpus_keys, stored_keys

SCAN_TOKENS = 500_000_000  # training tokens read at most (2-3 s per 100M on one core: benchmarks/held_out_check.py)
WINDOWS = 64  # a larger corpus is read in this many evenly spread windows
REFUSED_SHARE = 0.1  # of the held-out documents found in training: not chance, a copy


def _windows(size: int) -> List[Tuple[int, int]]:
    if size <= SCAN_TOKENS:
        return [(0, size)]
    width, gap = SCAN_TOKENS // WINDOWS, size // WINDOWS
    return [(i * gap, i * gap + width) for i in range(WINDOWS)]


def _training_keys(tokens, eos_id: int, longest: int) -> Tuple[Iterator[np.ndarray], float]:
    """A training corpus's document keys, and the share of it they cover: the keys its
    prepare stored (all of it, read in milliseconds), else hashed from its tokens, in
    windows past ``SCAN_TOKENS`` (a folder prepared before keys were kept)."""
    manifest = getattr(tokens, "manifest", None)
    stored = stored_keys(tokens.folder, manifest["shards"]) if manifest else None
    if stored is not None:
        return (keys.read()[:, 0] for keys in stored), 1.0  # one file open at a time
    spans = _windows(len(tokens))
    return (keys for keys, _ in corpus_keys(tokens, eos_id, longest, spans)), sum(b - a for a, b in spans) / len(tokens)


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
    found, read, total, per_source = np.zeros(len(held), bool), 0.0, 0, []
    for key, tokens in training:
        total += len(tokens)
        every_keys, covered = _training_keys(tokens, eos_id, longest)
        read += covered * len(tokens)
        here = np.zeros(len(held), bool)
        for keys in every_keys:
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
