"""Eval items found in the training data: n-grams of tokens shared with a prepared corpus.

A score means little on items the model trained on. An item's text (its context followed
by its right choice) is cut into every run of ``NGRAM`` consecutive tokens, in the
tokenizer the corpus was prepared with; the item is *contaminated* when any of those
n-grams occurs anywhere in the corpus's tokens (GPT-3's rule: one shared 13-gram is
enough). An item shorter than ``NGRAM`` tokens is looked for whole, down to
``MIN_NGRAM`` tokens; a shorter one is reported as not checked. Each item is tokenized as
it stands and with a leading space (its first word mid-document), so that neither form is
missed, and so is each of its other spellings: whitespace runs as one space, lowercased
(:func:`spellings`). An n-gram that more than ``TEMPLATE_SHARE`` of a task's items hold (3 or more) is
the task's template (an instruction, a fixed question) and is not looked for: the
template in the corpus says nothing about any one item. Nor is one with fewer distinct
tokens than half its length (a row of dots, table rules, blank lines): any corpus has those.

The scan hashes every window of the corpus (a polynomial hash modulo 2**64, computed for
all windows of a chunk from one prefix sum), keeps the windows whose hash falls in a bit
table of the items' hashes, and compares those few token by token: a reported match is
exact, never a hash collision.

Why our own: lm-evaluation-harness's decontamination reads 13-gram files of the training
text built by its own scripts (a second pass over the corpus as text, word by word); the
corpora here are token shards already, and one vectorised pass over them is all it takes.
The match is on tokens: a copy whose spacing or case differs from the item's is found
when the corpus writes it in one of the spellings looked for (single spaces, lowercase);
other near-copies (punctuation changed, words replaced, an item's spacing kept and the
corpus's reflowed differently) are not.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from letrecipes.components.corpus import DOCUMENT_SEPARATOR, DataError, run_folder
from letrecipes.components.files import replace_atomically, usable_cores
from letrecipes.components.prepare import (cache_folder, in_workers, is_prepared, read_manifest,
                                           workers_within_cores)
from letrecipes.components.progress import PROGRESS_EVERY_S, elapsed_and_eta

NGRAM = 13  # tokens; GPT-3 and lm-eval use 13 words (a token is about 0.75 of a word: a little stricter)
QUIET_TASKS_SUMMED = 8  # above this many tasks, those with nothing found are one line of the log
MIN_NGRAM = 8  # an item shorter than this is not checked: such short runs recur in any text
TEMPLATE_SHARE = 0.05  # an n-gram in more than this share of a task's items is its template
CHUNK = 1 << 22  # corpus tokens hashed at a time: about 100 MB of temporaries
EXAMPLES = 3  # contaminated items shown per task in the report
_LOOKUPS: Dict[str, "_Lookup"] = {}
_P = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)


def _powers(base: int, count: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        factors = np.full(count, base, dtype=np.uint64)
        factors[0] = 1
        return np.cumprod(factors, dtype=np.uint64)


class _Hasher:
    """Hashes of every window of a token array, any window length, from one prefix sum:
    ``h(i, L) = sum_j tokens[i + j] * P**(L - 1 - j)`` modulo 2**64. Its arrays are written
    into buffers made once (fresh 32 MB temporaries for every chunk made the scan three
    times slower, in page faults): what :meth:`prefix` and :meth:`windows` return is
    overwritten by the next call."""

    def __init__(self, size: int):
        self.up, self.down = _powers(_P, size + 1), _powers(_P_INV, size + 1)
        self._scaled, self._prefix = np.empty(size, np.uint64), np.empty(size + 1, np.uint64)
        self._windows, self.scratch = np.empty(size, np.uint64), np.empty(size, np.uint64)

    def prefix(self, tokens: np.ndarray) -> np.ndarray:
        scaled, prefix = self._scaled[:len(tokens)], self._prefix[:len(tokens) + 1]
        scaled[:] = tokens
        with np.errstate(over="ignore"):
            np.multiply(scaled, self.down[:len(tokens)], out=scaled)
            prefix[0] = 0
            np.cumsum(scaled, out=prefix[1:])
        return prefix

    def windows(self, prefix: np.ndarray, length: int) -> np.ndarray:
        """Hashes of the windows of ``length`` tokens starting at 0, 1, ... (``prefix`` from :meth:`prefix`)."""
        count = len(prefix) - length
        if count <= 0:
            return np.zeros(0, np.uint64)
        out = self._windows[:count]
        with np.errstate(over="ignore"):
            np.subtract(prefix[length:], prefix[:count], out=out)
            np.multiply(out, self.up[length - 1:length - 1 + count], out=out)
        return out


def ngram_hash(tokens: Sequence[int]) -> int:
    """The hash :class:`_Hasher` gives a window of these tokens, one n-gram at a time (the
    definition the vectorised form is checked against)."""
    value = 0
    for token in tokens:
        value = (value * _P + int(token)) & ((1 << 64) - 1)
    return value


@dataclass
class ItemNgrams:
    """The n-grams looked for, by length L: ``lengths[L]`` their hashes (sorted, unique) and
    tokens ``[k, L]``; ``owners[L]`` which items hold each, as CSR arrays (``offsets``
    ``[k + 1]``, then the task index and the item of each holder: a task of 14,000 items of
    hundreds of tokens has millions of n-grams, too many for Python objects)."""

    ngram: int
    tasks: List[str] = field(default_factory=list)
    lengths: Dict[int, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    owners: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    items: Dict[str, int] = field(default_factory=dict)  # task -> items
    unchecked: Dict[str, List[int]] = field(default_factory=dict)  # task -> items too short to check
    template: Dict[str, int] = field(default_factory=dict)  # task -> n-grams left out as its template

    def __len__(self) -> int:
        return sum(len(hashes) for hashes, _ in self.lengths.values())

    def holders(self, length: int, gram: int) -> List[Tuple[str, int]]:
        offsets, task, item = self.owners[length]
        span = slice(int(offsets[gram]), int(offsets[gram + 1]))
        return [(self.tasks[t], int(i)) for t, i in zip(task[span], item[span])]


def _windows_of(tokens: np.ndarray, length: int) -> np.ndarray:
    """Starts of the windows worth looking for: those with at least half their tokens
    distinct (a run of dots, a row of table rules or blank lines is in every corpus)."""
    views = np.sort(np.lib.stride_tricks.sliding_window_view(tokens, length), axis=1)
    distinct = 1 + (views[:, 1:] != views[:, :-1]).sum(axis=1)
    return np.flatnonzero(distinct * 2 >= length)


def spellings(text: str) -> List[str]:
    """The forms an item is looked for in (each once): as written, with every run of
    whitespace one space (a page that reflowed it: "Question:\n\nWho" read as "Question: Who"),
    and both lowercased (a corpus, or a copy of a benchmark, that lowercases). Matching is on
    tokens, so a copy in the corpus is found only in a spelling looked for."""
    single = " ".join(text.split())
    return list(dict.fromkeys((text, single, text.lower(), single.lower())))


def item_ngrams(texts: Mapping[str, Sequence[str]], encode: Callable[[List[str]], List[List[int]]],
                ngram: int = NGRAM) -> ItemNgrams:
    """The n-grams of every item's text, ``texts`` being ``{task: [item text, ...]}``."""
    if ngram < MIN_NGRAM:
        raise DataError(f"contamination ngram={ngram}: give {MIN_NGRAM} or more tokens (shorter runs recur in any "
                        f"text by chance; {NGRAM} is the usual).")
    found = ItemNgrams(ngram, tasks=list(texts))
    pieces, flat, offset = [], [], 0  # per window: hash, length, task, item, where its tokens start in `flat`
    for t, (task, task_texts) in enumerate(texts.items()):
        forms = [text.strip() for text in task_texts]
        variants, owner = [], []  # each spelling of each item, as it stands and with a space before it
        for i, text in enumerate(forms):
            for spelling in spellings(text):
                variants += [spelling, " " + spelling]
                owner += [i, i]
        encoded = [np.asarray(tokens, dtype=np.int64) for tokens in encode(variants)]
        hasher = _Hasher(max(len(tokens) for tokens in encoded))
        rows = []
        for v, tokens in enumerate(encoded):
            length = min(ngram, len(tokens))
            if length >= MIN_NGRAM:
                starts = _windows_of(tokens, length)
                hashes = hasher.windows(hasher.prefix(tokens), length)[starts]
                rows.append((hashes, np.full(len(starts), length), np.full(len(starts), owner[v]),
                             starts + offset))
            flat.append(tokens)
            offset += len(tokens)
        hashes, lengths, items, refs = (np.concatenate([r[k] for r in rows]) if rows else np.zeros(0, np.int64)
                                        for k in range(4))
        hashes = hashes.astype(np.uint64)
        # once per item (its two forms share most windows), then: how many of the task's items hold each
        order = np.lexsort((hashes, items))
        first = np.ones(len(order), dtype=bool)
        first[1:] = (hashes[order][1:] != hashes[order][:-1]) | (items[order][1:] != items[order][:-1])
        keep = order[first]
        unique, counts = np.unique(hashes[keep], return_counts=True)
        template = unique[counts > max(2, int(TEMPLATE_SHARE * len(forms)))]
        found.items[task], found.template[task] = len(forms), len(template)
        found.unchecked[task] = sorted(set(range(len(forms))) - set(items[keep].tolist()))
        keep = keep[~np.isin(hashes[keep], template)]
        pieces.append((hashes[keep], lengths[keep], np.full(len(keep), t), items[keep], refs[keep]))
    hashes, lengths, tasks, items, refs = (np.concatenate([p[k] for p in pieces]) for k in range(5))
    hashes = hashes.astype(np.uint64)
    tokens = np.concatenate(flat).astype(np.int32)  # vocabularies stay below 2**31
    for length in np.unique(lengths).tolist():
        mine = np.flatnonzero(lengths == length)
        order = mine[np.argsort(hashes[mine], kind="stable")]
        ordered = hashes[order]
        new = np.ones(len(order), dtype=bool)
        new[1:] = ordered[1:] != ordered[:-1]
        firsts = order[new]
        found.lengths[length] = (ordered[new], tokens[refs[firsts][:, None] + np.arange(length)])
        found.owners[length] = (np.append(np.flatnonzero(new), len(order)), tasks[order].astype(np.int32),
                                items[order].astype(np.int64))
    return found


class _Lookup:
    """One bit table over the hashes of every length, and each length's sorted hashes and
    tokens: what a scanning process needs, read once from the file :func:`scan` writes
    (each shard's job names the file rather than carrying megabytes of n-grams)."""

    def __init__(self, lengths: Mapping[int, Tuple[np.ndarray, np.ndarray]]):
        total = max(1, sum(len(hashes) for hashes, _ in lengths.values()))
        self.bits = int(min(26, max(20, np.ceil(np.log2(total)) + 6)))  # about 1/64 of the table set
        self.shift = np.uint64(64 - self.bits)
        self.table = np.zeros(1 << self.bits, dtype=bool)
        for hashes, _ in lengths.values():
            self.table[(hashes >> self.shift).astype(np.int64)] = True
        self.lengths = dict(lengths)
        self.longest = max(lengths, default=0)

    @classmethod
    def load(cls, path: str) -> "_Lookup":
        if path not in _LOOKUPS:
            with np.load(path) as saved:
                lengths = {int(name[1:]): (saved[name], saved["t" + name[1:]]) for name in saved.files
                           if name.startswith("h")}
            _LOOKUPS.clear()  # one scan at a time per process
            _LOOKUPS[path] = cls(lengths)
        return _LOOKUPS[path]

    def matches(self, tokens: np.ndarray, prefix: np.ndarray, hasher: _Hasher, length: int,
                counted: int) -> Tuple[np.ndarray, np.ndarray]:
        """(window starts, n-gram index) of the exact matches among the first ``counted`` windows."""
        hashes_all = hasher.windows(prefix, length)[:counted]
        slots = np.right_shift(hashes_all, self.shift, out=hasher.scratch[:counted]).view(np.int64)
        starts = np.flatnonzero(self.table[slots])
        if not len(starts):
            return starts, starts
        keys, grams = self.lengths[length]
        wanted = hashes_all[starts]
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        hit = keys[at] == wanted
        starts, at = starts[hit], at[hit]
        if len(starts):  # token by token: a hash collision is not a match
            same = (tokens[starts[:, None] + np.arange(length)] == grams[at]).all(axis=1)
            starts, at = starts[same], at[same]
        return starts, at


def scan_shard(job: dict) -> Dict[Tuple[int, int], List[int]]:
    """``{(length, n-gram index): [matches, first token offset]}`` for one shard (a worker's job)."""
    lookup = _Lookup.load(job["lookup"])
    path, dtype, size = Path(job["path"]), np.dtype(job["dtype"]), int(job["tokens"])
    overlap = max(lookup.longest - 1, 0)
    hasher = _Hasher(CHUNK + overlap)
    found: Dict[Tuple[int, int], List[int]] = {}
    for start in range(0, size, CHUNK):
        count = min(CHUNK + overlap, size - start)
        tokens = np.fromfile(path, dtype=dtype, count=count, offset=start * dtype.itemsize)
        if len(tokens) != count:
            raise DataError(f"{path} is shorter than its manifest says ({start + len(tokens):,} tokens of {size:,}). "
                            "Fix: rerun the `letrecipes prepare-data` command that made its folder.")
        prefix = hasher.prefix(tokens)
        last = start + CHUNK >= size  # windows that start past CHUNK are the next chunk's
        for length in lookup.lengths:
            counted = len(tokens) - length + 1 if last else min(CHUNK, len(tokens) - length + 1)
            if counted <= 0:
                continue
            starts, grams = lookup.matches(tokens, prefix, hasher, length, counted)
            for gram, first, times in zip(*np.unique(grams, return_index=True, return_counts=True)):
                entry = found.setdefault((length, int(gram)), [0, start + int(starts[first])])
                entry[0] += int(times)
    return found


@dataclass
class Corpus:
    """A prepared folder and its manifest (read and checked: every shard at its size)."""

    folder: Path
    manifest: dict

    @classmethod
    def read(cls, folder, key: str) -> "Corpus":
        return cls(Path(folder), read_manifest(folder, key=key))


def scan(corpora: Sequence[Corpus], grams: ItemNgrams, workers: int = 1, log: Callable[[str], None] = print,
         decode: Optional[Callable[[List[int]], str]] = None) -> dict:
    """Look for ``grams`` in every shard of ``corpora`` (shards spread over ``workers``
    processes); returns the report (see :func:`report`), examples as text with ``decode``."""
    workers = workers_within_cores(workers, "contamination", log)
    work = Path(tempfile.mkdtemp(prefix="letrecipes-contamination-"))
    try:
        lookup = str(work / "ngrams.npz")
        np.savez(lookup, **{f"{kind}{length}": array for length, pair in grams.lengths.items()
                            for kind, array in zip("ht", pair)})
        return _scan(corpora, grams, lookup, workers, log, decode)
    finally:
        _LOOKUPS.clear()
        shutil.rmtree(work, ignore_errors=True)


def _scan(corpora: Sequence[Corpus], grams: ItemNgrams, lookup: str, workers: int,
          log: Callable[[str], None], decode: Optional[Callable[[List[int]], str]]) -> dict:
    jobs = {}
    for c, corpus in enumerate(corpora):
        for s, shard in enumerate(corpus.manifest["shards"]):
            jobs[(c, s)] = {"lookup": lookup, "path": str(corpus.folder / shard["file"]),
                            "dtype": corpus.manifest["dtype"], "tokens": int(shard["tokens"])}
    total = sum(job["tokens"] for job in jobs.values()) or 1
    found: Dict[Tuple[int, int], Tuple[int, Tuple[int, int, int]]] = {}
    progress = {"tokens": 0, "said": time.perf_counter()}
    begin = time.perf_counter()

    def finished(where: Tuple[int, int], shard_found: dict) -> None:
        for gram, (times, offset) in shard_found.items():
            held = found.get(gram)
            location = (where[0], where[1], offset)
            found[gram] = (times + (held[0] if held else 0), min(location, held[1]) if held else location)
        progress["tokens"] += jobs[where]["tokens"]
        now = time.perf_counter()
        if now - progress["said"] >= PROGRESS_EVERY_S:
            progress["said"] = now
            log(f"contamination: {progress['tokens']:,} of {total:,} tokens scanned "
                f"({elapsed_and_eta(now - begin, progress['tokens'], total)})")

    in_workers(scan_shard, jobs, workers, finished)
    return report(corpora, grams, found, time.perf_counter() - begin, decode)


def report(corpora: Sequence[Corpus], grams: ItemNgrams, found: Mapping[Tuple[int, int], tuple],
           seconds: float, decode: Optional[Callable[[List[int]], str]] = None) -> dict:
    """``{ngram, corpora, tokens, seconds, tasks: {task: {items, checked, contaminated,
    contaminated_items, template_ngrams, examples}}}``; an example names the item, the
    n-gram's tokens and where the corpus holds it first (folder, shard file, token)."""
    hits: Dict[Tuple[str, int], Tuple[tuple, int, Tuple[int, int]]] = {}
    for (length, gram), (times, location) in sorted(found.items(), key=lambda kv: kv[1][1]):
        for owner in grams.holders(length, gram):
            held = hits.get(owner)
            hits[owner] = (held[0], held[1] + times, held[2]) if held else (location, times, (length, gram))
    tasks = {}
    for task, count in grams.items.items():
        dirty = sorted(i for t, i in hits if t == task)
        examples = []
        for i in dirty[:EXAMPLES]:
            (c, s, offset), times, (length, gram) = hits[(task, i)]
            tokens = grams.lengths[length][1][gram].tolist()
            examples.append({"item": i, "tokens": tokens, **({"text": decode(tokens)} if decode else {}),
                             "ngram_matches": times, "folder": str(corpora[c].folder),
                             "file": corpora[c].manifest["shards"][s]["file"], "token": offset})
        tasks[task] = {"items": count, "checked": count - len(grams.unchecked[task]), "contaminated": len(dirty),
                       "contaminated_items": dirty, "template_ngrams": grams.template[task], "examples": examples}
    return {"ngram": grams.ngram, "corpora": [str(c.folder) for c in corpora],
            "tokens": sum(int(c.manifest["tokens"]) for c in corpora), "seconds": round(seconds, 2), "tasks": tasks}


# ----------------------------------------------------------------- where a checkpoint's training data lies
def recorded_data(run: Path) -> Optional[List[str]]:
    """The prepared folders the run's ``run_info.json`` names (None: a run from before they were recorded)."""
    from letrecipes.components.resume import saved_run_info  # imports torch: not in the scan's workers

    folders = (saved_run_info(run) or {}).get("data_folders")
    return list(folders) if isinstance(folders, list) and all(isinstance(f, str) for f in folders) else None


def configured_folders(cfg: Mapping) -> List[Tuple[str, bool]]:
    """The prepared folder each training source of a resolved config reads, and whether it
    is there yet: data.source when it is a prepared folder, else the cache folder named
    after the source (``prepare.cache_key``) in data.cache_dir."""
    from letrecipes.components.tokenizer import load_tokenizer

    data = cfg["data"]
    tokenizer = load_tokenizer(cfg["tokenizer"], cfg.get("teacher"))
    folders = []
    for spec in data.get("sources") or [{"source": data["source"]}]:
        source = spec["source"]
        if isinstance(source, str) and is_prepared(Path(source)):
            folders.append((source, True))
            continue
        folder = cache_folder(source, tokenizer, data.get("cache_dir", "outputs/cache"),
                              spec.get("text_field") or data.get("text_field", "text"),
                              document_separator=data.get("document_separator", DOCUMENT_SEPARATOR),
                              drop_copies=bool(data.get("drop_copies", False)))
        folders.append((str(folder), is_prepared(folder)))
    return folders


def configured_data(run: Path) -> Optional[List[str]]:
    """For a run from before ``run_info.json`` recorded its data: the prepared folders its
    ``config.yaml`` leads to, when they are all still there; None otherwise."""
    from letrecipes.components.run_info import saved_config

    config = saved_config(run)
    try:
        folders = configured_folders(config) if config is not None else None
    except Exception:  # anything amiss (a file moved, a key renamed): not found, and the caller says so
        return None
    if folders is None:
        return None
    return [folder for folder, _ in folders] if all(ready for _, ready in folders) else None


def training_corpora(specs: Sequence[str], key: str) -> List[Corpus]:
    """Each of ``specs`` is a prepared folder or a run (its output_dir, final/ or a step
    checkpoint: the folders its run_info.json records); an error names the key and the fix."""
    corpora: List[Corpus] = []
    for spec in specs:
        path = Path(spec)
        if is_prepared(path):
            corpora.append(Corpus.read(path, key))
            continue
        run = run_folder(path) if path.exists() else None
        if run is None:
            raise DataError(f"{key}: {spec!r} is neither a prepared folder (no manifest.json) nor a run's output_dir. "
                            "Fix: give the folder `letrecipes prepare-data` wrote (or the run's data.cache_dir/"
                            "prepared-...), or the output_dir of the run that trained on it; a raw corpus is prepared "
                            "first: `letrecipes prepare-data --config <config> --out <folder>`.")
        folders = recorded_data(run) or configured_data(run)
        if folders is None:
            raise DataError(f"{key}: the run {str(run)!r} does not record its training data (its run_info.json "
                            "predates letrecipes' data_folders), and the folders its config.yaml leads to are not "
                            "there. Fix: give its prepared folders instead: data.source if it was one, else the "
                            "data.cache_dir/prepared-* folder its log names.")
        missing = [f for f in folders if not is_prepared(Path(f))]
        if missing:
            raise DataError(f"{key}: the run {str(run)!r} trained on {missing[0]!r}, which is gone (a cache deleted, "
                            "another machine). Fix: prepare the same data again (`letrecipes prepare-data --config "
                            f"{run / 'config.yaml'} --out <folder>`) and give that folder.")
        corpora.extend(Corpus.read(folder, key) for folder in folders)
    return corpora


def corpus_tokenizer(corpora: Sequence[Corpus], candidates: Sequence[Path], key: str):
    """The tokenizer (a ``tokenizers.Tokenizer``) the corpora were prepared with: the one
    their manifest names, or any of ``candidates`` (the checkpoint's own tokenizer.json, a
    ``tokenizer_path``) with the same content. The items must be cut into the corpus's
    tokens, not another vocabulary's."""
    from tokenizers import Tokenizer as HFTokenizer

    from letrecipes.components.tokenizer import file_fingerprint

    wanted = {c.manifest["tokenizer"]["fingerprint"] for c in corpora}
    if len(wanted) > 1:
        raise DataError(f"{key}: the folders were prepared with {len(wanted)} different tokenizers "
                        f"({', '.join(sorted(wanted))}). Fix: check them one tokenizer at a time.")
    fingerprint = wanted.pop()
    named = [Path(c.manifest["tokenizer"]["path"]) for c in corpora]
    for path in [*named, *candidates]:
        path = path / "tokenizer.json" if path.is_dir() else path  # a Hugging Face model or tokenizer folder
        if path.is_file() and file_fingerprint(path) == fingerprint:
            return HFTokenizer.from_file(str(path))
    raise DataError(f"{key}: the tokenizer {str(named[0])!r} that {corpora[0].folder} was prepared with (fingerprint "
                    f"{fingerprint}) is not there, and no other tokenizer at hand has its content. Fix: set "
                    "tokenizer_path=<that tokenizer.json>.")


def encoder(tokenizer) -> Callable[[List[str]], List[List[int]]]:
    """Items encoded as the prepare encodes corpus text (special tokens as the text they are)."""
    from letrecipes.components.tokenizer import encode_as_text

    return lambda texts: [e.ids for e in encode_as_text(tokenizer, texts, offsets=False)]


def default_workers() -> int:
    """Scanning processes when none are asked for: every core but one (as ``prepare-data``)."""
    return max(1, usable_cores() - 1)


def item_text(item) -> str:
    """What a model that trained on a multiple-choice item read: its context and its right choice."""
    return item.context + item.choices[item.gold]


def cache_name(corpora: Sequence[Corpus], grams: ItemNgrams) -> str:
    """What decides a scan's report: each corpus (its folder, manifest, and every shard's size
    and modification time) and the n-grams looked for, with the items holding each."""
    digest = hashlib.sha256(f"v2|{grams.ngram}|{json.dumps(grams.items)}|{json.dumps(grams.unchecked)}|"
                            f"{json.dumps(grams.template)}".encode())
    for corpus in corpora:
        digest.update(f"|{corpus.folder.resolve()}|{json.dumps(corpus.manifest, sort_keys=True)}".encode())
        for shard in corpus.manifest["shards"]:
            stat = (corpus.folder / shard["file"]).stat()
            digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for length in sorted(grams.lengths):
        for array in (*grams.lengths[length], *grams.owners[length]):
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(grams.tasks).encode())
    return f"contamination-{digest.hexdigest()[:20]}.json"


def check_items(corpora: Sequence[Corpus], texts: Mapping[str, Sequence[str]], tokenizers: Sequence[Path],
                ngram: int = NGRAM, workers: int = 1, key: str = "contamination",
                log: Callable[[str], None] = print, cache_dir: Optional[Path] = None) -> dict:
    """The eval recipe's and ``letrecipes contamination``'s check: ``texts`` are ``{task:
    [item text, ...]}`` (:func:`item_text` of each item, or a held-out document);
    ``tokenizers`` are the tokenizer files at hand besides the one the corpora's manifest
    names. Logs a line per task and its first contaminated items; returns :func:`report`'s
    report. With ``cache_dir``, the report is kept there and given again while neither the
    corpora nor the items change: scoring each checkpoint of a run would otherwise scan
    its training data each time (minutes for billions of tokens)."""
    tokenizer = corpus_tokenizer(corpora, tokenizers, key)
    grams = item_ngrams(texts, encoder(tokenizer), ngram)
    cached = Path(cache_dir) / cache_name(corpora, grams) if cache_dir is not None else None
    found = _read_cached(cached, log)
    if found is None:
        found = scan(corpora, grams, workers=workers, log=log, decode=tokenizer.decode)
        scanned = f"{found['tokens']:,} training tokens scanned in {found['seconds']:.1f} s"
        if cached is not None:
            try:  # a cache that cannot be written costs the next scan, nothing else
                cached.parent.mkdir(parents=True, exist_ok=True)
                replace_atomically(cached, json.dumps({"sha256": _digest(found), "report": found}))
            except OSError as err:
                log(f"contamination: the findings could not be kept in {cached} ({err}); the next check scans again")
    else:
        scanned = f"{found['tokens']:,} training tokens, found as kept in {cached}"
    quiet = [task for task in found["tasks"].values() if not task["contaminated"]]
    if len(found["tasks"]) > QUIET_TASKS_SUMMED and quiet:  # a group of 57 subjects: one line for the clean ones
        log(f"contamination: {len(quiet)} task(s): none of their {sum(t['checked'] for t in quiet):,} items checked "
            f"holds a run of {ngram} tokens found in the training data; {scanned}")
    for name, task in found["tasks"].items():
        if len(found["tasks"]) > QUIET_TASKS_SUMMED and not task["contaminated"]:
            continue
        short = task["items"] - task["checked"]
        log(f"contamination: {name}: {task['contaminated']} of {task['checked']} items checked hold a run of "
            f"{ngram} tokens found in the training data" + (f" ({short} too short to check)" if short else "")
            + f"; {scanned}")
        for example in task["examples"]:
            log(f"  item {example['item']}: {example['text']!r} at token {example['token']:,} of "
                f"{example['folder']}/{example['file']}")
    return found


def _digest(report: dict) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()


def _read_cached(path: Optional[Path], log: Callable[[str], None]) -> Optional[dict]:
    """The report kept at ``path``, if it is there and is the one written: it carries a
    digest of itself, because a kept report that was edited or damaged and still parses
    (a count changed, an item list of the wrong kind) would otherwise be given as found,
    or fail in the lines printed from it. Anything else is scanned again (and replaced)."""
    try:
        kept = json.loads(path.read_text()) if path is not None else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log(f"contamination: the findings kept in {path} do not read ({err}): scanning again")
        return None
    if kept is None:
        return None
    report = kept.get("report") if isinstance(kept, dict) else None
    if not isinstance(report, dict) or kept.get("sha256") != _digest(report):
        log(f"contamination: the findings kept in {path} are not as they were written (edited or damaged): "
            "scanning again")
        return None
    return report


def clean_scores(samples: Sequence[Mapping], contaminated: Sequence[int]) -> Dict[str, float]:
    """Each metric over the items (or documents) not contaminated, from lm-eval's per-item
    samples, aggregated as lm-eval does: a mean (``acc``, ``acc_norm``), for the
    perplexities of documents the summed log-likelihood over the summed words or bytes,
    for lambada's ``perplexity`` the exponential of the mean negative log-likelihood."""
    dirty = set(contaminated)
    kept = [s for s in samples if int(s["doc_id"]) not in dirty]
    out: Dict[str, float] = {"n_clean": len(kept)}
    for metric in samples[0]["metrics"] if samples else ():
        if not kept:
            out[f"{metric}_clean"] = None
        elif isinstance(kept[0][metric], (tuple, list)):  # (log-likelihood, words or bytes)
            per_unit = -sum(float(s[metric][0]) for s in kept) / sum(float(s[metric][1]) for s in kept)
            out[f"{metric}_clean"] = per_unit / math.log(2) if metric == "bits_per_byte" else math.exp(per_unit)
        elif metric == "perplexity":  # lambada's: each item's log-likelihood, aggregated as exp(-mean)
            out[f"{metric}_clean"] = math.exp(-sum(float(s[metric]) for s in kept) / len(kept))
        else:
            out[f"{metric}_clean"] = sum(float(s[metric]) for s in kept) / len(kept)
    return out
