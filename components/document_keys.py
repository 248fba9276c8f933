"""Documents as keys: each document of a prepared corpus as a length and a 64-bit hash of
its tokens in order (a document ends at an end-of-text token).

The prepare step stores every shard's keys beside it (``shard_000000.keys.npy``: rows of
``[key, length]`` sorted by key, 16 bytes a document, under 1% of the shard) and counts
the documents that repeat across the whole corpus (:func:`count_repeats`, kept in the
manifest); the held-out check (``held_out.py``) looks its documents up in those keys.

Why our own: the hashing is a few numpy passes over token arrays this project already
writes; deduplication libraries work on text, over the whole corpus again, and decide
what to drop; here nothing is dropped: the user is told, with the files named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from letrecipes.components.files import unique_tmp

MIN_TOKENS = 32  # shorter documents (a cookie notice, "page not found") recur in any crawl by chance
MAX_TOKENS = 1 << 20  # longer ones (a whole book as one document) are left out: their carry would grow unbounded
CHUNK = 1 << 22  # tokens hashed at a time: about 150 MB of temporaries
KEYS_SUFFIX = ".keys.npy"
PASS_KEYS = 1 << 24  # keys sorted at a time when counting repeats: about 450 MB with their temporaries
TOP_PAIRS = 3  # pairs of units sharing the most documents, named in the report


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


def corpus_keys(tokens, eos_id: int, longest: int = MAX_TOKENS,
                spans: Optional[Sequence[Tuple[int, int]]] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The document keys and lengths of a prepared corpus (anything sliced as ``tokens[a:b]``, with a
    length), span by span (all of it by default) and chunk by chunk. A document that runs on past
    the end of a chunk is carried into the next one, unless it is already longer than ``longest``:
    it could match nothing, and one document can be a whole corpus."""
    for start, stop in spans or [(0, len(tokens))]:
        carry, whole, at = np.zeros(0, tokens[0:0].dtype), start == 0, start
        while at < stop:
            chunk = np.concatenate([carry, tokens[at:min(at + CHUNK, stop)]])
            at = min(at + CHUNK, stop)
            keys, lengths, rest = document_keys(chunk, eos_id, whole)
            yield keys, lengths
            carry, whole = (chunk[:0], False) if rest < 0 else (chunk[rest:], True)
            if len(carry) > longest:
                carry, whole = carry[:0], False  # skipped to its end


def keys_path(shard_bin: Path) -> Path:
    return Path(shard_bin).with_suffix(KEYS_SUFFIX)


class _ShardFile:
    """A shard file as ``len`` and slices, read with plain reads: a memory map's pages would
    count in the worker's resident memory (the whole shard, by its end)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.size = os.path.getsize(path) // self.dtype.itemsize

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.size)
        return np.fromfile(self.path, self.dtype, count=max(stop - start, 0), offset=start * self.dtype.itemsize)


def write_shard_keys(shard_bin: Path, dtype: np.dtype, eos_id: int) -> int:
    """Key every document of a written shard (it starts at a document's start) into its keys
    file; return how many were keyed."""
    pieces = list(corpus_keys(_ShardFile(shard_bin, dtype), eos_id))
    keys = np.concatenate([np.zeros(0, np.uint64), *(k for k, _ in pieces)])
    lengths = np.concatenate([np.zeros(0, np.int64), *(n for _, n in pieces)]).astype(np.uint64)
    order = np.argsort(keys, kind="stable")
    rows = np.stack([keys[order], lengths[order]], axis=1)
    target = keys_path(shard_bin)
    tmp = unique_tmp(target)
    try:
        with open(tmp, "wb") as f:
            np.save(f, rows)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)


class StoredKeys:
    """A shard's keys file, its ``[key, length]`` rows memory-mapped for each read and let go
    after it: a map held open per shard keeps a file descriptor each (mmap duplicates it),
    and a corpus of more shards than the open-file limit (``ulimit -n``, 1024 on many
    machines; a FineWeb-Edu snapshot is thousands of files) stopped its prepare with a
    TypeError once its keys "did not read"."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows = path, rows

    def __len__(self) -> int:
        return self.rows

    def read(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def _rows(keys) -> np.ndarray:
    return keys.read() if isinstance(keys, StoredKeys) else keys


def stored_keys(folder: Path, shards: Sequence[Mapping[str, Any]]) -> Optional[List[StoredKeys]]:
    """Each shard's keys file (``shards``: a manifest's shard records, each naming its
    ``file``), checked by its header and size; None when any shard has none (prepared before
    they were kept) or one does not read."""
    stored = []
    for shard in shards:
        path = keys_path(Path(folder) / shard["file"])
        try:
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                    np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(f)
                whole = f.tell() + int(np.prod(shape)) * dtype.itemsize == os.fstat(f.fileno()).st_size
        except (OSError, ValueError):
            return None
        if len(shape) != 2 or shape[1] != 2 or dtype != np.uint64 or fortran_order or not whole:
            return None
        stored.append(StoredKeys(path, shape[0]))
    return stored


def _sorted_passes(arrays: Sequence, groups: Sequence[int]) -> Iterator[Tuple[np.ndarray, ...]]:
    """The rows of every array (or :class:`StoredKeys`) as (keys, lengths, group of each),
    sorted by key (within a key, the arrays in order), a range of key values at a time:
    ``PASS_KEYS`` rows or so in memory; one keys file open at a time."""
    passes = max(1, -(-sum(len(a) for a in arrays) // PASS_KEYS))
    bounds = [np.uint64(((1 << 64) * p) // passes) for p in range(passes)]
    for p in range(passes):
        keys, lengths, group = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
        for item, g in zip(arrays, groups):
            rows = _rows(item)
            column = rows[:, 0]
            lo = int(np.searchsorted(column, bounds[p]))
            hi = int(np.searchsorted(column, bounds[p + 1])) if p + 1 < passes else len(rows)
            part = np.array(rows[lo:hi])  # a copy: the file's map closes with `rows`
            keys.append(part[:, 0])
            lengths.append(part[:, 1])
            group.append(np.full(hi - lo, g, np.int64))
            del rows, column
        keys_p = np.concatenate(keys)
        order = np.argsort(keys_p, kind="stable")
        yield keys_p[order], np.concatenate(lengths)[order], np.concatenate(group)[order]


def _first_of_group(same: np.ndarray, group: np.ndarray) -> np.ndarray:
    """For each sorted row, the group of the first row with its key (``same``: the row's key
    is the previous row's)."""
    new_key = ~same
    return group[np.flatnonzero(new_key)[np.cumsum(new_key) - 1]]


def count_repeats(arrays: Sequence, groups: Optional[Sequence[int]] = None,
                  top: int = TOP_PAIRS) -> Dict[str, object]:
    """How many documents (of ``MIN_TOKENS``+) are copies of another, and the tokens in those
    copies; and the ``top`` pairs of groups sharing the most, as ``[first, other, copies,
    tokens]``: the group holding a document first, one holding a copy (the same group twice
    for copies within it). A group is an array (a shard) unless ``groups`` gives each array's
    (the source of each shard of a mixture)."""
    groups = list(range(len(arrays))) if groups is None else list(groups)
    width = max(groups, default=0) + 1
    copies = copy_tokens = 0
    pairs: Dict[Tuple[int, int], List[int]] = {}
    for keys, lengths, group in _sorted_passes(arrays, groups):
        same = np.concatenate([[False], keys[1:] == keys[:-1]])
        if not same.any():
            continue
        copies += int(same.sum())
        copy_tokens += int(lengths[same].sum())
        first = _first_of_group(same, group)
        codes, where = np.unique(first[same] * width + group[same], return_inverse=True)
        counts = np.bincount(where)
        tokens = np.bincount(where, weights=lengths[same].astype(np.float64))
        for code, count, n in zip(codes.tolist(), counts.tolist(), tokens.tolist()):
            pair = pairs.setdefault(divmod(code, width), [0, 0])
            pair[0], pair[1] = pair[0] + count, pair[1] + int(n)
    ranked = sorted(pairs.items(), key=lambda item: -item[1][0])[:top]
    return {"documents": sum(len(a) for a in arrays), "copies": copies, "copy_tokens": copy_tokens,
            "shared": [[a, b, n, t] for (a, b), (n, t) in ranked]}


def copies_to_drop(arrays: Sequence) -> List[Tuple[np.ndarray, np.ndarray]]:
    """For each shard, in stream order, the keys of the documents that repeat one before them:
    ``(every copy, all but the first)``: keys whose first appearance is in an earlier shard
    (every copy here goes), and keys first seen in this shard (its later copies go). The first
    appearance of every document stays."""
    every: List[List[np.ndarray]] = [[] for _ in arrays]
    later: List[List[np.ndarray]] = [[] for _ in arrays]
    for keys, _, shard in _sorted_passes(arrays, range(len(arrays))):
        same = np.concatenate([[False], keys[1:] == keys[:-1]])
        if not same.any():
            continue
        owner = _first_of_group(same, shard)
        copy = np.flatnonzero(same)
        by_shard = copy[np.argsort(shard[copy], kind="stable")]
        shards, starts = np.unique(shard[by_shard], return_index=True)
        for i, rows in zip(shards.tolist(), np.split(by_shard, starts[1:])):
            elsewhere = owner[rows] != i
            every[i].append(keys[rows[elsewhere]])
            later[i].append(keys[rows[~elsewhere]])
    return [(np.unique(np.concatenate([np.zeros(0, np.uint64), *e])), np.unique(np.concatenate([np.zeros(0, np.uint64), *l])))
            for e, l in zip(every, later)]


def drop_from_shard(shard_bin: Path, dtype: np.dtype, eos_id: int, every: np.ndarray,
                    later: np.ndarray) -> Tuple[int, int, int, int]:
    """Rewrite a shard without the documents :func:`copies_to_drop` named (``every``: all of
    its copies of them; ``later``: all but the first), through a temporary file and a rename.
    Returns (tokens kept, documents kept, documents dropped, tokens dropped). Documents under
    ``MIN_TOKENS`` or over ``MAX_TOKENS`` tokens are not keyed, so never dropped."""
    source, target = _ShardFile(shard_bin, dtype), Path(shard_bin)
    every_set, later_set, seen = set(every.tolist()), set(later.tolist()), set()
    tmp = unique_tmp(target)
    kept = documents = dropped = dropped_tokens = 0
    try:
        with open(tmp, "wb") as out:
            carry, passing = np.zeros(0, dtype), False  # passing: inside a document too long to key
            for at in range(0, len(source), CHUNK):
                chunk = np.concatenate([carry, source[at:at + CHUNK]])
                if passing:  # written through, up to its end-of-text token
                    hit = np.flatnonzero(chunk == eos_id)
                    head = int(hit[0]) + 1 if len(hit) else len(chunk)
                    out.write(chunk[:head].tobytes())
                    kept, chunk, passing = kept + head, chunk[head:], not len(hit)
                    documents += not passing
                ends = (np.flatnonzero(chunk == eos_id) + 1).tolist()
                keys = iter(document_keys(chunk[:ends[-1]] if ends else chunk[:0], eos_id, True)[0].tolist())
                start = 0
                for end in ends:
                    key = next(keys) if end - start >= MIN_TOKENS else None
                    drop = key in every_set or (key in later_set and key in seen)
                    if key in later_set:
                        seen.add(key)
                    if drop:
                        dropped, dropped_tokens = dropped + 1, dropped_tokens + end - start
                    else:
                        out.write(chunk[start:end].tobytes())
                        kept, documents = kept + end - start, documents + 1
                    start = end
                carry = chunk[start:]
                if len(carry) > MAX_TOKENS:
                    out.write(carry.tobytes())
                    kept, carry, passing = kept + len(carry), carry[:0], True
            out.write(carry.tobytes())  # a shard ends its last document: nothing is left here but by damage
            kept += len(carry)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return kept, documents, dropped, dropped_tokens
