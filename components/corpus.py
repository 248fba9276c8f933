"""Reading pretraining corpora as documents, in the formats they ship in.

| what ``data.source`` names | read with | one document is |
|---|---|---|
| ``.txt``, ``.md``, ``.rst``, ``.text`` (or any file named directly) | Python | the whole file |
| ``.jsonl``, ``.ndjson``, ``.json`` (JSON Lines, or one JSON array of records) | Python, streamed | a record's ``text_field`` |
| ``.csv``, ``.tsv`` | ``pyarrow.csv``, streamed in blocks | a row's ``text_field`` column |
| ``.parquet`` (FineWeb-Edu style shards) | ``pyarrow``, one row group at a time, in batches of rows | a row's ``text_field`` |
| ``.arrow``, ``.feather`` (``datasets``' cache files, Arrow IPC; pandas' ``to_feather``) | ``pyarrow.ipc``, one record batch at a time | a row's ``text_field`` |
| a Hugging Face ``datasets`` folder (``save_to_disk``) | ``datasets.load_from_disk`` (memory-mapped) | a row's ``text_field`` |
| ``.tar`` (``.tar.gz``, ``.tgz``, ``.tar.zst``, ...), ``.zip`` | ``tarfile`` streamed, ``zipfile`` | its members, each by its own format |

Text, JSON and CSV files may be compressed: ``.gz``, ``.zst``, ``.bz2``, ``.xz`` after the
format's suffix (C4 and Dolma ship ``.json.gz``, the Pile and SlimPajama ``.jsonl.zst``).
Compression is read from the content's magic number, not the name, so a gzip file named
``.txt`` reads as its text. ``data.source`` may also be a glob pattern (``data/*.parquet``)
or a list of any of these.

A folder is searched recursively for all of these. The corpus is cut into *units*: a
group of small text files, one JSON or CSV file, one parquet row group, a range of rows of
a ``datasets`` folder, and a byte range of a large plain JSON Lines file (the lines that
begin in it) or of a large plain text file (cut where a document separator begins), so
that one 10 GB file is prepared by every worker, not one. A unit is the prepare step's
piece of work and becomes one token shard, so preparing is deterministic whatever the
number of worker processes, and a killed prepare redoes only unfinished units.

Text files are decoded as UTF-8 (a byte-order mark is honoured: UTF-8, UTF-16 and UTF-32
files with one read right); a file with a NUL byte in its first 8,000 bytes and no
byte-order mark is binary (git's test) and is skipped with a warning. Empty documents
are skipped: they would add a lone end-of-text token.

Why our own JSON Lines reader: a line-by-line stream over a compressed file needs
constant memory and can say at which line a damaged stream broke; ``datasets``' JSON
builder would first convert the whole file to Arrow in its cache.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import errno
import functools
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import shlex
import stat
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from letrecipes.components.errors import LetRecipesError, LetRecipesWarning
from letrecipes.components.files import (LOCALE_FIX, as_given, hub_id_hint, hub_snapshot, in_outputs, is_utf8,
                                         misread_as_utf8, names_encoding, nearby, refuse_special_file, stand_in)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz", ".lz4")
ARCHIVE_SUFFIXES = (".tar", ".tgz", ".zip")  # and .tar.gz, .tar.zst, ...
WARC_SUFFIXES = (".warc", ".wet")  # web archives: Common Crawl's CC-MAIN-*.warc.wet.gz hold each page's text
MARKUP_SUFFIXES = (".xml", ".html", ".htm", ".xhtml")  # named directly, read as text with a warning
# Where a text file's documents end (data.document_separator): TinyStories' and many text dumps'
# marker, never meant as text. None reads each text file as one document.
DOCUMENT_SEPARATOR = "<|endoftext|>"
# What a folder is searched for, as error messages name it.
FORMATS = (f"text ({' '.join(TEXT_SUFFIXES)}), JSON ({' '.join(JSON_SUFFIXES)}), CSV ({' '.join(CSV_SUFFIXES)}) "
           f"files, each optionally compressed ({' '.join(COMPRESSIONS)}), archives of them (.tar, .tar.gz, .tgz, "
           ".zip), WARC files (.warc .wet, compressed or not), .parquet, .arrow and .feather files, or datasets "
           "folders")
BINARY_SNIFF = 8000  # bytes looked at for a NUL byte, as git does
# Raised when the same files read as other documents, so that caches are prepared again
# (2: byte-order marks honoured, binary files and empty documents skipped; 3: compression
# read from the content, archives).
READER_VERSION = 6  # 4: text split at data.document_separator; 5: blank documents skipped; 6: LZ4, WARC read
# Small text files are grouped into units of about this many bytes (one shard each).
TEXT_UNIT_BYTES = 64 * 2**20
READ_BLOCK = 4 * 2**20  # bytes read at a time from a text file
DATASET_UNIT_ROWS = 50_000
# A parquet row group, or a datasets folder's unit, is made Python strings in batches of at most these
ROW_BATCH_ROWS, ROW_BATCH_BYTES = 1024, 32 * 2**20
# A plain (uncompressed) JSON Lines file, or a text file of documents ended by the separator,
# larger than this is cut into byte ranges of about this size, one unit each: one 10 GB file
# is prepared by every worker instead of one. Compressed streams cannot be entered midway.
SPLIT_FILE_BYTES = 64 * 2**20
SEPARATOR_SCAN_BLOCK = 1 << 20


class DataError(LetRecipesError):
    """Bad data input, raised before training starts."""


class DataWarning(LetRecipesWarning):
    """Data was read with a documented recovery (e.g. non-UTF-8 bytes replaced)."""


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus: ``kind`` text (``paths`` read whole), jsonl (any JSON file),
    csv, parquet (row group ``part``) or dataset (rows ``[start, stop)`` of a folder; a unit
    listed before 2026-12-05, without them, rows ``part * DATASET_UNIT_ROWS`` onwards)."""

    kind: str
    paths: Tuple[str, ...]
    part: int = 0
    size: int = 0  # bytes, for progress and ETA
    # A part of one large file (SPLIT_FILE_BYTES): a JSON Lines unit holds the lines that begin in
    # [start, stop); a text unit the bytes [start, stop), cut where a document separator begins;
    # a dataset unit the rows [start, stop). stop None: the whole file (a dataset: DATASET_UNIT_ROWS).
    start: int = 0
    stop: Optional[int] = None

    @property
    def is_range(self) -> bool:
        return self.stop is not None

    def describe(self) -> str:
        where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"
        if self.is_range:
            return f"{where} [{'rows' if self.kind == 'dataset' else 'bytes'} {self.start:,}-{self.stop:,}]"
        return where + (f" [part {self.part}]" if self.kind in ("parquet", "dataset") else "")

    def to_dict(self) -> dict:
        entry = asdict(self)
        if not self.is_range:  # as units were written before files were cut: earlier plans still match
            del entry["start"], entry["stop"]
        return entry

    @classmethod
    def from_dict(cls, entry: dict) -> "Unit":
        return cls(**{**entry, "paths": tuple(entry["paths"])})


def _file_name(source) -> str:
    """The name a file's format is read from: a path's last part, an archive member's own name."""
    # os.path, not Path: called for every file of a folder, where building Paths cost half the listing
    return os.path.basename(os.fspath(source.member if isinstance(source, _Member) else source)).lower()


def _compression(name: str) -> str:
    return next((c for c in COMPRESSIONS if name.endswith(c)), "")


def _format_base(name: str) -> str:
    """The format's suffix, under any compression suffix: ``.json`` for ``c4.json.gz``."""
    stem = name[:len(name) - len(_compression(name))]
    return os.path.splitext(os.path.basename(stem))[1]


def _format(path) -> Tuple[Optional[str], str]:
    """``(kind, compression)`` of a file from its name: kind is text, jsonl, csv, parquet,
    arrow, archive or None (not a corpus format); compression is one of COMPRESSIONS or ""."""
    name = _file_name(path)
    parts = name.split(".")
    if parts[0]:  # every suffix read has at most two dots: the name's last three parts decide, once per kind of name
        return _format_of_name("x." + ".".join(parts[1:][-3:]) if len(parts) > 1 else "x")
    return _format_of_name.__wrapped__(name)  # a dot-file: splitext reads a leading dot otherwise


@functools.lru_cache(maxsize=4096)
def _format_of_name(name: str) -> Tuple[Optional[str], str]:
    compression, base = _compression(name), _format_base(name)
    if base in (".parquet", ".arrow") and not compression:
        return base[1:], ""
    if base == ".feather" and not compression:  # pandas' to_feather: Arrow's IPC file format (Feather V2)
        return "arrow", ""
    if base == ".tar" or name.endswith(ARCHIVE_SUFFIXES):
        return "archive", compression
    if base in WARC_SUFFIXES:
        return "warc", compression
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSON_SUFFIXES), ("csv", CSV_SUFFIXES)):
        if base in suffixes:
            return kind, compression
    return None, compression


# What ``datasets`` calls each split in file and folder names (datasets.data_files.SPLIT_KEYWORDS;
# a test checks they agree), and the metadata files it writes beside the data (FILES_TO_IGNORE,
# less README.md, which a folder walk reports as a text file beside records).
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_SPLIT_WORD = re.compile(r"(?:^|[-._ 0-9])(" + "|".join(w for ws in SPLIT_KEYWORDS.values() for w in ws)
                         + r")(?=[-._ 0-9]|$)", re.IGNORECASE)
DATASETS_METADATA = ("config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "dummy_data.zip")
DATASET_CARDS = ("readme.md", "readme")


def split_named(relative: Union[Path, str]) -> Optional[str]:
    """The split a path names as ``datasets`` names them (``data/train-00000-of-00004.parquet``,
    ``c4-validation.00000-of-00008.json.gz``, ``json-test.arrow``, ``train/a.txt``): the file's
    own name first, then its folders upward; None when none does."""
    parts = relative.split(os.sep) if isinstance(relative, str) else relative.parts
    for part in reversed(parts):
        match = _SPLIT_WORD.search(part)
        if match:
            word = match.group(1).lower()
            return next(split for split, words in SPLIT_KEYWORDS.items() if word in words)
    return None


def _train_split(item: Path, found: List[Path], key: str) -> List[Path]:
    """The files of a folder laid out in splits, as ``datasets`` writes or the Hub ships them
    (a DatasetDict's train/ and test/, a cache's json-train.arrow beside json-test.arrow,
    data/train-*.parquet beside data/validation-*.parquet): the train split alone, as
    ``load_dataset(folder, split="train")`` reads. A folder is laid out so when every file
    but a dataset card names a split, train among them and another beside it: a corpus of
    books of which one is called "the-test-pilot.txt" is read whole."""
    prefix = len(str(item).rstrip(os.sep)) + 1  # paths below item, as strings: relative_to cost 1 s in 200,000
    splits = {path: split_named(str(path)[prefix:]) for path in found}
    named = set(splits.values()) - {None}
    unnamed = [p for p, split in splits.items() if split is None and p.name.lower() not in DATASET_CARDS]
    if "train" not in named or len(named) < 2 or unnamed:
        return found
    others = {split: [p for p, s in splits.items() if s == split] for split in sorted(named - {"train"})}
    kept = [p for p in found if splits[p] == "train"]
    counts = ", ".join(f"{split} ({len(paths)})" for split, paths in others.items())
    first = min(p for paths in others.values() for p in paths).relative_to(item)
    warnings.warn(f"{key}: {str(item)!r} is laid out in splits as datasets names them: the train split is read "
                  f"({len(kept)} file(s) or folder(s)), {counts} not, as with load_dataset(..., split='train'). Fix: "
                  f"none, to train on the train split; for another, point {key} at its files ({str(item / first)!r}); "
                  "to evaluate on a held-out split, name its files in data.val_source.",
                  DataWarning, stacklevel=3)
    return kept


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _matches(pattern: str, key: str) -> List[Path]:
    """The files a glob names (``/data/fineweb/**/*.parquet``), sorted; one error if none."""
    found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    if not found:
        raise DataError(f"{key}: the pattern {pattern!r} matches no file (working directory {os.getcwd()!r}). "
                        "Fix: correct the pattern; `ls` it in a shell to see what it names.")
    return found


# what `letrecipes prepare-data` writes (components/prepare.py, which takes the names from here)
PREPARED_MANIFEST = "manifest.json"
PREPARED_PLAN = "plan.json"  # written first: without the manifest, a prepare that has not finished


def is_token_shards(folder: Union[str, Path]) -> bool:
    """A folder of prepared token shards, not text: its manifest beside its first shard
    (prepare.shard_name(0)); a corpus may hold a data file named manifest.json of its own."""
    folder = Path(folder)
    return (folder / PREPARED_MANIFEST).is_file() and (folder / "shard_000000.bin").is_file()


def unfinished_prepare(folder: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The plan of a folder that `letrecipes prepare-data` began and has not finished (it
    stopped, or is still running): its plan.json and no manifest. None for any other folder,
    a corpus's own plan.json included."""
    folder = Path(folder)
    if (folder / PREPARED_MANIFEST).is_file() or not (folder / PREPARED_PLAN).is_file():
        return None
    try:
        plan = json.loads((folder / PREPARED_PLAN).read_text(errors="replace"))
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and "format_version" in plan else None  # its units may be damaged


def unfinished_prepare_error(item: Path, folder: Path, plan: Dict[str, Any], key: str) -> DataError:
    """What a corpus that is (or holds) an unfinished prepare folder is told: read as text, its
    plan.json would be one bad JSON record and its shards binary files."""
    units = plan["units"] if isinstance(plan.get("units"), list) else []
    written = sum(1 for path in folder.glob("shard_*.json") if path.with_suffix(".bin").is_file())
    paths = [p for unit in units if isinstance(unit, dict) and isinstance(unit.get("paths"), list)
             for p in unit["paths"] if isinstance(p, str)]
    try:
        source = os.path.commonpath(paths) if paths else None
    except ValueError:  # relative beside absolute paths
        source = None
    again = (f"finish it with the command that began it (letrecipes prepare-data --config <yours> --out {folder}"
             + (f" data.source={source}" if source else "") + ": it goes on from the shards written)")
    if folder == item:
        where, fix = "is", f"{again}, then train on it" + (f"; or point {key} at the corpus itself, {source}"
                                                           if source else "")
    else:
        where = f"holds one, {str(folder)!r}, which is"
        fix = (f"move it out of {str(item)!r} (a prepared folder is given alone, as data.source or one entry of "
               f"data.sources); to train on it, {again}")
    return DataError(f"{key}: {str(item)!r} {where} a folder that `letrecipes prepare-data` began and has not finished "
                     f"({PREPARED_PLAN} and no {PREPARED_MANIFEST}: {written} of {len(units) or '?'} shards written; it "
                     f"stopped, or "
                     f"is still running), not text. Fix: {fix}.")


def _files(item: Path, key: str, log: Optional[Callable[[str], None]] = None) -> List[Path]:
    item = hub_snapshot(item) or item  # a Hugging Face cache folder (datasets--org--name): the snapshot it serves
    refuse_special_file(item, key, DataError, why=": a corpus is read more than once (listed and sized, then "
                        "tokenized by several workers), which a stream allows only once",
                        fix="write it to a file first (zstdcat corpus.jsonl.zst > corpus.jsonl) and point "
                            f"{key} at that, or at the compressed file itself: {' '.join(COMPRESSIONS)} and archives "
                            "are read as they are.")
    if is_dataset_folder(item) or item.is_file():
        if item.is_file() and _format(item)[0] is None and _format_base(item.name.lower()) in MARKUP_SUFFIXES:
            warnings.warn(f"{key}: {item} is read as plain text, its markup (tags, attributes, entities) included. "
                          "Fix: extract the text first (a Wikipedia dump: `wikiextractor --json`, then "
                          f"{key}=<its output folder>, JSON Lines); none, if the markup is meant to be learnt.",
                          DataWarning, stacklevel=3)
        return [item]
    if not item.exists() and glob.has_magic(str(item)):
        return [path for match in _matches(str(item), key) for path in _files(match, key, log)]
    if not item.exists():
        seen = nearby(item)
        # the big configs name a folder that `letrecipes prepare-data` writes, once, before the run
        made_by = " (the demo corpus is made by `python -m letrecipes.demo --prepare-only`)" if in_outputs(item) \
            else "" if _format(item)[0] or _format(item)[1] else (
                f"; or write token shards there: letrecipes prepare-data --config <yours> --out {item} "
                "data.source=<the raw corpus>")
        fix = hub_id_hint(item, key, "dataset") or ((seen + " " if seen else "") +
            "Fix: set it to an existing text, JSON, CSV, parquet or arrow file, an archive or a folder of them, a glob "
            f"pattern, or a datasets folder{made_by}.")
        raise DataError(f"{key}: {as_given(item)!r} does not exist (working directory {os.getcwd()!r}). {fix}")
    found, other, broken, kinds = [], {}, [], {}
    listing = _ListingProgress(item, key, log)
    for path, kind in _folder_entries(item):
        listing.step()
        if kind == "dataset":
            found.append(path)
            kinds[path] = "dataset"
        elif kind == "model output":
            raise model_output_error(item, path, key)
        elif kind == "broken":
            broken.append(path)  # a Hugging Face cache whose download stopped: links to blobs never written
        elif kind == "special":  # read once at most, and a reader of a pipe could wait for ever
            other.setdefault("(pipes, sockets, devices)", []).append(path)
        elif path.name == PREPARED_MANIFEST and is_token_shards(path.parent):
            # token shards are not text: read as a corpus, the manifest would be one bad JSON record
            where = "is" if path.parent == item else f"holds one, {str(path.parent)!r}, which is"
            raise DataError(f"{key}: {str(item)!r} {where} a prepared folder (token shards of `letrecipes "
                            "prepare-data`), not text. Fix: give a prepared folder alone as data.source, or as one "
                            "entry of data.sources, where it is read as it is; keep it out of the folders of text.")
        elif path.name == PREPARED_PLAN and (plan := unfinished_prepare(path.parent)) is not None:
            raise unfinished_prepare_error(item, path.parent, plan, key)
        elif path.name in DATASETS_METADATA:
            continue  # datasets' description of the files beside it, not records
        elif (read_as := _format(path)[0]) is not None:
            found.append(path)
            kinds[path] = read_as
        else:
            compression = _compression(path.name.lower())
            suffix = _format_base(path.name.lower()) + compression if compression else path.suffix.lower()
            other.setdefault(suffix or "(no suffix)", []).append(path)
    listing.done()
    undecodable = [path for path in found if not is_utf8(str(path))]
    meant = misread_as_utf8(str(undecodable[0].relative_to(item))) if undecodable else None
    if meant is not None:  # UTF-8 names under an ASCII locale
        raise DataError(f"{key}: {len(undecodable)} file name(s) in {str(item)!r} are UTF-8 (first: {meant!r}), but "
                        f"this process reads file names as {names_encoding()}. Fix: {LOCALE_FIX}.")
    if undecodable:  # its name goes into the cache's key, the manifest and the log, all UTF-8
        raise DataError(f"{key}: {len(undecodable)} file name(s) in {str(item)!r} are not UTF-8 (first: "
                        f"{os.fsencode(undecodable[0].relative_to(item))!r}), which the prepared corpus's records and "
                        f"the log cannot hold. Fix: rename them to UTF-8 (convmv -f latin1 -t utf8 -r --notest "
                        f"{str(item)!r}, if they are Latin-1), or move them out of the folder.")
    links = (f"{len(broken)} file(s) in {str(item)!r} are links to files that do not exist (first: "
             f"{broken[0].relative_to(item)} -> {os.readlink(broken[0])}), as a Hugging Face download that stopped "
             "leaves them") if broken else ""
    if not found:
        skipped = f"{_not_read({s: [p.relative_to(item) for p in ps] for s, ps in other.items()}, 'file(s) in it')}. " \
            if other else ""
        if broken:
            raise DataError(f"{key}: {links}, and it holds nothing else that is read. Fix: finish the download "
                            f"(run `hf download` again), or point {key} at a complete copy.")
        raise DataError(f"{key}: folder {str(item)!r} holds none of the formats read. {skipped}Read are: {FORMATS}. "
                        f"Fix: point {key} at the folder holding the corpus, or convert it to one of them.")
    if broken:  # training on the part that arrived, without a word, would be a smaller corpus than meant
        warnings.warn(f"{key}: {links}; they are not read. Fix: finish the download (run `hf download` again), or "
                      "delete the links if those files are not wanted.", DataWarning, stacklevel=2)
    found = _train_split(item, found, key)
    texts = [p for p in found if kinds[p] == "text"]
    records = [p for p in found if kinds[p] in ("dataset", "jsonl", "csv", "parquet", "arrow")]
    if texts and records:  # a downloaded dataset's README.md would be trained on as a document
        warnings.warn(f"{key}: {len(texts)} text file(s) in {str(item)!r} (first: {texts[0].relative_to(item)}) are "
                      f"read as documents beside {len(records)} file(s) of records. Fix: none, if they are "
                      f"part of the corpus; if they are notes or dataset cards, point {key} at the records' own "
                      "folder, or at a glob pattern of them (data/*.parquet).", DataWarning, stacklevel=2)
    if other:  # a folder of .doc files beside one .txt would otherwise train on the .txt alone, silently
        relative = {suffix: [p.relative_to(item) for p in paths] for suffix, paths in other.items()}
        warnings.warn(f"{key}: {_not_read(relative, f'file(s) in {str(item)!r}')}: only {FORMATS} are. Fix: none, "
                      "if they are not text; otherwise convert them.", DataWarning, stacklevel=2)
    return found


# a folder whose listing takes longer says how far it has got, every this many seconds
LISTING_PROGRESS_S = 10.0


class _ListingProgress:
    """Lines while a folder of very many files is listed (about 18 s a million names), which
    every launch on a raw corpus does again: silent, it would look like a hang."""

    def __init__(self, folder: Path, key: str, log: Optional[Callable[[str], None]]):
        self.folder, self.key, self.log = folder, key, log
        self.count, self.start, self.said = 0, time.monotonic(), 0.0

    def step(self) -> None:
        self.count += 1
        if self.log is None or self.count % 4096:
            return
        elapsed = time.monotonic() - self.start
        if elapsed >= self.said + LISTING_PROGRESS_S:
            self.said = elapsed
            self.log(f"{self.key}: listing {self.folder}: {self.count:,} names so far, {elapsed:.0f} s")

    def done(self) -> None:
        if self.said:
            self.log(f"{self.key}: listed {self.count:,} names in {self.folder} in {time.monotonic() - self.start:.0f} s, "
                     "as each launch on it does; `letrecipes prepare-data` once, with data.source=<its --out>, "
                     "lists nothing at launch")


def _folder_entries(folder: Path) -> Iterator[Tuple[Path, str]]:
    """Every file under ``folder`` as ``(path, "file")``, a ``datasets`` folder as
    ``(path, "dataset")`` (not entered), a link to nothing as ``(path, "broken")`` and a pipe,
    socket or device as ``(path, "special")``, in the
    order of ``sorted(folder.rglob("*"))`` (each folder's names sorted, its subfolders read where
    their names fall). Hidden names (``.git``, ``.cache``, macOS's ``._x.txt``) are left out
    with all they hold. Written on ``os.scandir`` rather than ``rglob``: a launch on a raw corpus
    lists it each time, and the file types a directory read already gives spare a ``stat`` per
    file (200,000 files: 6.4 s before, see docs/data.md)."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError:
        return
    names = {e.name for e in entries}
    if "state.json" in names and "dataset_info.json" in names and is_dataset_folder(folder):
        yield folder, "dataset"  # only reached for a subfolder: the top one is checked by _files
        return
    if model_output(names):
        yield folder, "model output"  # checkpoints, weights, a run's records: never text, and not entered
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _folder_entries(path)
            elif entry.is_file():
                yield path, "file"
            elif entry.is_symlink():
                if entry.is_dir():  # a link to a folder is not followed (rglob does not), unless it is a dataset
                    if is_dataset_folder(path):
                        yield path, "dataset"
                elif not os.path.exists(path):
                    yield path, "broken"
            else:  # a pipe, socket or device: never read, but said to be left out
                yield path, "special"
        except OSError:  # gone or unreadable while listed: as rglob, left out
            continue


def model_output(names: Iterable[str]) -> Optional[str]:
    """What a folder holding ``names`` is when it is what training writes rather than a corpus:
    a run's ``output_dir``, a DCP checkpoint, a model's weights with its config.json; None
    otherwise. Read from the names alone (a corpus is listed at every launch)."""
    names = set(names)
    if {"run_info.json", "config.yaml"} <= names:
        return "a training run's folder"
    if ".metadata" in names and any(name.endswith(".distcp") for name in names):
        return "a training checkpoint (sharded DCP files)"
    if "config.json" in names and any(name.endswith(".safetensors") or name in ("pytorch_model.bin",
                                                                               "model.safetensors.index.json")
                                      for name in names):
        return "a model (config.json and weights)"
    return None


def run_folder(path: Path) -> Optional[Path]:
    """The run (``output_dir``) a path belongs to: the run itself, its checkpoints folder, its
    ``final`` export or a step checkpoint (``checkpoints/step_N``); None for anything else (a
    GGUF file, a model from elsewhere)."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "run_info.json").is_file() and (candidate / "config.yaml").is_file():
            return candidate
    return None


def model_output_error(item: Path, folder: Path, key: str) -> DataError:
    """A model output where a corpus is read, said with what it is and, for a run's own
    folders, the corpus that run trained on (its config.yaml's)."""
    with os.scandir(folder) as listing:
        what = model_output(entry.name for entry in listing) or "model output"
    if folder != item and run_folder(item) is not None and item.name == "checkpoints":
        folder, what = item, "a training run's checkpoints folder"
    if folder != item:
        return DataError(f"{key}: {str(item)!r} holds {what}, {str(folder)!r}, which is not text. Fix: move it out "
                         f"of {str(item)!r}, or point {key} at the corpus's own folder (or a glob pattern of its "
                         "files).")
    trained_on, run = None, run_folder(folder)
    if run is not None:
        from letrecipes.components.run_info import saved_config

        data = (saved_config(run) or {}).get("data")
        trained_on = data.get("source") if isinstance(data, dict) and isinstance(data.get("source"), str) else None
    use = ("a run goes on with resume=true and its output_dir; its export, final/, is read as teacher.path= or "
           "init_from=" if what == "a training run's folder" else
           "a model is read as teacher.path=, init_from= or the eval recipe's checkpoint=" if what.startswith("a model")
           else "a step checkpoint is read by resume=<its path>, or made a model by letrecipes export")
    return DataError(f"{key}: {str(item)!r} is {what}, not a corpus. Fix: point {key} at the text to train on"
                     + (f" (the run it belongs to trained on data.source={trained_on})" if trained_on else "")
                     + f"; {use}.")


def _not_read(by_suffix: Dict[str, list], where: str) -> str:
    """'N <where> are not read (2 .pdf, 1 .doc; first: ...)': files skipped by their names."""
    kinds = ", ".join(f"{len(names)} {suffix}" for suffix, names in sorted(by_suffix.items()))
    first = min(name for names in by_suffix.values() for name in names)
    return f"{sum(map(len, by_suffix.values()))} {where} are not read ({kinds}; first: {first})"


def source_files(source: Union[str, os.PathLike, Sequence], key: str = "data.source",
                 log: Optional[Callable[[str], None]] = None) -> List[Path]:
    """Every file (or datasets folder) a source names, in a fixed order."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise DataError(f"{key} is empty. Fix: point it at a corpus: {FORMATS}, or a folder of them.")
    files: List[Path] = []
    for item in sources:
        files.extend(_files(Path(item).expanduser(), key, log))
    return files


def list_units(source, key: str = "data.source", separator: Optional[str] = DOCUMENT_SEPARATOR,
               log: Optional[Callable[[str], None]] = None) -> List[Unit]:
    """The corpus as units, in the order their tokens are concatenated. ``separator``: where a
    text file's documents end (a large text file is cut only there)."""
    units: List[Unit] = []
    text_group: List[Path] = []
    group_bytes = 0  # kept as files join: summing the group at each file was quadratic (50,000 files: minutes)

    def flush() -> None:
        nonlocal group_bytes
        if text_group:
            units.append(Unit("text", tuple(map(str, text_group)), size=group_bytes))
            text_group.clear()
            group_bytes = 0

    for path in source_files(source, key, log):
        kind, _ = _format(path)
        try:  # one stat a file: a folder of a million files is listed at each launch
            info = os.stat(path)
        except OSError as err:
            raise DataError(f"{key}: cannot read {str(path)!r} ({err.strerror or err}). Fix: check it is still there "
                            "and readable (a corpus changing while a run lists it).") from err
        if stat.S_ISDIR(info.st_mode) and is_dataset_folder(path):
            flush()
            units += _dataset_units(path, key)
        elif kind == "parquet":
            flush()
            metadata = _parquet(path, key).metadata
            units += [Unit("parquet", (str(path),), i, size=metadata.row_group(i).total_byte_size)
                      for i in range(metadata.num_row_groups)]
        elif kind in ("jsonl", "csv", "arrow", "archive", "warc"):
            flush()
            size = info.st_size
            ranges = _json_lines_ranges(path, size) if kind == "jsonl" else None
            units += _range_units(kind, path, ranges) if ranges else [Unit(kind, (str(path),), size=size)]
        elif (ranges := _text_ranges(path, separator, info.st_size)) is not None:
            flush()
            units += _range_units("text", path, ranges)
        else:
            text_group.append(path)
            group_bytes += info.st_size
            if group_bytes >= TEXT_UNIT_BYTES:
                flush()
    flush()
    return units


def _range_units(kind: str, path: Path, ranges: List[Tuple[int, int]]) -> List[Unit]:
    return [Unit(kind, (str(path),), part, size=stop - start, start=start, stop=stop)
            for part, (start, stop) in enumerate(ranges)]


def _even_ranges(size: int) -> List[Tuple[int, int]]:
    bounds = [min(size, i * SPLIT_FILE_BYTES) for i in range(-(-size // SPLIT_FILE_BYTES) + 1)]
    return list(zip(bounds, bounds[1:]))


def _json_lines_ranges(path: Path, size: int) -> Optional[List[Tuple[int, int]]]:
    """Byte ranges for a large plain JSON Lines file (each unit reads the lines that begin in
    its range); None for a small, compressed or non-UTF-8 file, or JSON laid out otherwise
    (one array, pretty-printed objects: read whole, streamed)."""
    if size <= SPLIT_FILE_BYTES:
        return None
    head = _file_head(path)
    if sniff(head) is not None or _text_encoding(head) != "utf-8-sig":
        return None
    with open(path, "rb") as f:
        if _json_layout(f)[0] != "lines":
            return None
    return _even_ranges(size)


def _cuts_at(separator: Optional[str]) -> bool:
    """Whether a text file may be cut where ``separator`` begins: not when there is none, nor
    when it can overlap itself ("\n\n" in "\n\n\n"), which is found where a read from the
    file's start finds it only by such a read."""
    return bool(separator) and not any(separator[:k] == separator[-k:] for k in range(1, len(separator)))


def _text_ranges(path: Path, separator: Optional[str], size: int) -> Optional[List[Tuple[int, int]]]:
    """Byte ranges for a large plain UTF-8 text file of ``size`` bytes, each after the first
    beginning where a ``separator`` does (so no document is cut and no character split);
    None where the file stays one unit: small, compressed, another encoding, or no separator."""
    if size <= SPLIT_FILE_BYTES or not _cuts_at(separator) or _format(path)[1]:  # the size first: every file comes here
        return None
    head = _file_head(path)
    if sniff(head) is not None or _text_encoding(head) != "utf-8-sig":
        return None
    marker = separator.encode()
    starts, searched_to = [0], 0
    with open(path, "rb") as f:
        for _, planned in _even_ranges(size)[:-1]:
            at = max(planned, searched_to)
            found = _find_from(f, marker, at, size)
            if found is None:
                break
            searched_to = found + 1
            if found > starts[-1]:
                starts.append(found)
    if len(starts) == 1:
        return None
    return list(zip(starts, starts[1:] + [size]))


def _find_from(f, marker: bytes, at: int, size: int) -> Optional[int]:
    """The offset of the first ``marker`` at or after ``at``; None to the file's end. Each
    search starts where the last one stopped, so a file is read at most once."""
    f.seek(at)
    carry = b""
    while at < size:
        block = f.read(SEPARATOR_SCAN_BLOCK)
        if not block:
            return None
        found = (carry + block).find(marker)
        if found != -1:
            return at - len(carry) + found
        carry = (carry + block)[-(len(marker) - 1):] if len(marker) > 1 else b""
        at += len(block)
    return None


def read_unit(unit: Unit, text_field: str = "text", key: str = "data.source",
              warn: Optional[list] = None, separator: Optional[str] = DOCUMENT_SEPARATOR) -> Iterator[str]:
    """The documents of ``unit``, in order. Recoveries (bad UTF-8, skipped records) are
    appended to ``warn`` as messages (workers send them back to the main process, which
    shows them)."""
    warn = [] if warn is None else warn
    if unit.kind == "text" and unit.is_range:
        text = "".join(piece for piece, _ in _stream_text(Path(unit.paths[0]), key, warn, READ_BLOCK,
                                                          unit.start, unit.stop))
        yield from (document for document, _ in split_at([(text, True)], separator))
    elif unit.kind == "text":
        for path in unit.paths:
            text = _read_text(Path(path), key, warn)
            if text:
                yield from (document for document, _ in split_at([(text, True)], separator))
    elif unit.kind == "jsonl":
        yield from _json_records(Path(unit.paths[0]), text_field, key, warn, unit.start, unit.stop)
    elif unit.kind == "csv":
        yield from _csv(Path(unit.paths[0]), text_field, key, warn)
    elif unit.kind == "parquet":
        path = Path(unit.paths[0])
        yield from _strings(_row_group_values(path, unit.part, text_field, key), path, text_field, key, warn,
                            f" (row group {unit.part})")
    elif unit.kind == "arrow":
        yield from _arrow(Path(unit.paths[0]), text_field, key, warn)
    elif unit.kind == "warc":
        yield from _warc_texts(Path(unit.paths[0]), key, warn)
    elif unit.kind == "archive":
        document: List[str] = []
        for piece, ends in _archive(Path(unit.paths[0]), text_field, key, warn, None, separator):
            document.append(piece)
            if ends:
                yield "".join(document)
                document.clear()
    elif unit.kind == "dataset":
        path = Path(unit.paths[0])
        dataset = _load_dataset(path, key)
        names = _text_path(dataset.features.arrow_schema, f"the datasets folder {str(path)!r}", text_field, key)
        start = unit.start if unit.is_range else unit.part * DATASET_UNIT_ROWS
        stop = unit.stop if unit.is_range else start + DATASET_UNIT_ROWS
        yield from _strings(_dataset_values(dataset, names, start, stop, path, key), path, text_field, key, warn,
                            f" (rows {start:,}-)")
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def read_unit_in_pieces(unit: Unit, text_field: str = "text", key: str = "data.source",
                        warn: Optional[list] = None, piece_chars: Optional[int] = None,
                        separator: Optional[str] = DOCUMENT_SEPARATOR) -> Iterator[Tuple[str, bool]]:
    """``(piece, ends_document)`` for the documents of ``unit``, in order. With
    ``piece_chars``, a document longer than that comes in pieces cut by
    :func:`safe_cuts`, and a text file is read in blocks: memory stays flat whatever the
    document's length (a JSON, CSV or parquet record is still read whole). Without it,
    each document is one piece. A text file's documents end at each ``separator``."""
    warn = [] if warn is None else warn
    if unit.kind == "text" and piece_chars:
        for path in unit.paths:
            yield from split_at(_stream_text(Path(path), key, warn, piece_chars, unit.start, unit.stop), separator)
        return
    if unit.kind == "archive":
        yield from _archive(Path(unit.paths[0]), text_field, key, warn, piece_chars, separator)
        return
    yield from _in_pieces(read_unit(unit, text_field, key, warn, separator), piece_chars)


def split_at(pieces: Iterable[Tuple[str, bool]], separator: Optional[str]) -> Iterator[Tuple[str, bool]]:
    """A text file's ``(piece, ends_document)`` pairs (the whole file one document) split
    into a document at each ``separator``: the separator and the line breaks after it (which
    would begin every document) are dropped, empty documents left out; what precedes a
    separator is kept as written. A separator cut in two by a piece boundary is found: the
    piece's end that could begin one is held back for the next (only then does a cut move,
    so pieces stay where :func:`safe_cuts` put them)."""
    if not separator:
        yield from pieces
        return
    held, started, after_separator = "", False, False  # started: a piece of the open document was yielded

    def opening(text: str) -> str:  # the first text of a document that follows a separator
        return text.lstrip("\r\n") if after_separator and not started else text

    for piece, ends in pieces:
        *ended, tail = (held + piece).split(separator)
        held = ""
        for part in ended:
            part = opening(part)
            if part.strip() or started:  # a document of only blank space is none
                yield part, True
            started, after_separator = False, True
        if ends:  # the file's end closes its last document
            tail = opening(tail)
            if tail.strip() or started:
                yield tail, True
            started, after_separator = False, False
            continue
        keep = next((n for n in range(min(len(separator) - 1, len(tail)), 0, -1) if separator.startswith(tail[-n:])), 0)
        tail, held = (tail[:-keep], tail[-keep:]) if keep else (tail, "")
        tail = opening(tail)
        if tail:
            yield tail, False
            started = True
    if held:  # pieces that never said the file ended (not from this module's readers)
        yield opening(held), True


def _in_pieces(documents: Iterator[str], piece_chars: Optional[int]) -> Iterator[Tuple[str, bool]]:
    for text in documents:
        pieces = safe_cuts(text, piece_chars) if piece_chars and len(text) > piece_chars else [text]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


# ---------------------------------------------------------------- archives
def _archive(path: Path, text_field: str, key: str, warn: list, piece_chars: Optional[int],
             separator: Optional[str]) -> Iterator[Tuple[str, bool]]:
    """The documents of a tar (plain or compressed) or zip archive, as pieces: its members
    in the archive's order, each read by its own name's format (a member that is itself
    an archive, or compressed, is opened in turn: OpenWebText ships tars of ``.xz`` tars).
    Members are streamed; a zip inside a tar is read into memory (zip needs to seek)."""
    not_read: Dict[str, List[str]] = {}
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open_counted(path))
        stream, kind = _decompressed(raw, path, key, stack)
        if kind not in ("tar", "zip"):
            raise DataError(f"{key}: {path} is named as an archive but is {'a ' + kind + ' file' if kind else 'not one'} "
                            "(no tar or zip header). Fix: rename it, or re-download it.")
        if kind == "zip" and sniff(_file_head(path)) == "zip":
            stream = path  # an uncompressed zip on disk is read in place
        yield from _archive_members(stream, kind, str(path), text_field, key, warn, piece_chars, not_read, separator)
    if not_read:
        warn.append(f"{key}: {_not_read(not_read, f'member(s) of {path}')}: only {FORMATS} are. Fix: none, if they "
                    "are not text; otherwise extract and convert them.")


def _archive_members(stream, kind: str, name: str, text_field: str, key: str, warn: list,
                     piece_chars: Optional[int], not_read: Dict[str, List[str]],
                     separator: Optional[str]) -> Iterator[Tuple[str, bool]]:
    import tarfile
    import zipfile

    if kind == "tar":
        try:
            archive = tarfile.open(fileobj=stream, mode="r|")  # a stream: members in order, nothing seeks
            members = ((m.name, lambda m=m: archive.extractfile(m)) for m in archive if m.isfile())
            yield from _members(members, name, text_field, key, warn, piece_chars, not_read, separator)
        except Exception as err:
            _raise_if_damaged(name, err, "", key)
            raise
        return
    if not isinstance(stream, Path):  # inside another archive, or compressed: a zip must seek
        stream = io.BytesIO(stream.read())
    try:
        archive = zipfile.ZipFile(stream)
    except zipfile.BadZipFile as err:
        raise DataError(f"{key}: {name} is damaged: not a readable zip archive ({err}). Fix: re-download it, or "
                        "remove it from the source.") from err
    with archive:
        members = ((i.filename, lambda i=i: archive.open(i)) for i in archive.infolist() if not i.is_dir())
        try:
            yield from _members(members, name, text_field, key, warn, piece_chars, not_read, separator)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as err:
            # a damaged member: a bad CRC, a header that does not match the directory, an offset past
            # the file (seek: EINVAL), an unknown compression; the disk's own errors are not this
            if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):
                raise
            raise DataError(f"{key}: {name} is damaged: a member does not read ({type(err).__name__}: {err}). Fix: "
                            "re-download it, or remove it from the source.") from err


def _members(members, archive: str, text_field: str, key: str, warn: list, piece_chars: Optional[int],
             not_read: Dict[str, List[str]], separator: Optional[str]) -> Iterator[Tuple[str, bool]]:
    for member_name, open_member in members:
        parts = Path(member_name).parts
        if any(part.startswith(".") or part == "__MACOSX" for part in parts):
            continue  # hidden files, macOS's resource forks
        source = _Member(f"{archive}[{member_name}]", open_member(), member_name)
        kind, _ = _format(source)
        if kind in ("parquet", "arrow", "archive", None):
            # By its content: OpenWebText's members are tars named .xz. Only one named as an archive must be one.
            with contextlib.ExitStack() as stack:
                stream, content = _decompressed(source.fileobj, source, key, stack)
                if content in ("tar", "zip"):
                    yield from _archive_members(stream, content, source.name, text_field, key, warn, piece_chars,
                                                not_read, separator)
                    continue
                data = stream.read() if kind in ("parquet", "arrow") else b""  # both need to seek: in memory
            if kind == "parquet":
                yield from _in_pieces(_parquet_values(source, data, text_field, key, warn), piece_chars)
                continue
            if kind == "arrow":
                yield from _in_pieces(_arrow(source, text_field, key, warn, data=data), piece_chars)
                continue
            if kind == "archive":
                raise DataError(f"{key}: {source} is named as an archive but is not one. Fix: re-download it.")
            suffix = Path(member_name).suffix.lower() or "(no suffix)"
            not_read.setdefault(suffix, []).append(f"{archive}[{member_name}]")
        elif kind == "text" and piece_chars:
            yield from split_at(_stream_text(source, key, warn, piece_chars), separator)
        elif kind == "text":
            text = _read_text(source, key, warn)
            if text:
                yield from split_at([(text, True)], separator)
        elif kind == "jsonl":
            yield from _in_pieces(_json_records(source, text_field, key, warn), piece_chars)
        elif kind == "warc":
            yield from _in_pieces(_warc_texts(source, key, warn), piece_chars)
        else:
            yield from _in_pieces(_csv(source, text_field, key, warn), piece_chars)


def _parquet_values(path: _Member, data: bytes, text_field: str, key: str, warn: list) -> Iterator[str]:
    """A parquet file inside an archive, read from memory one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except Exception as err:  # ArrowInvalid / OSError
        raise DataError(f"{key}: {path} is not a readable parquet file ({err}). Fix: re-download it.") from err
    names = _text_path(parquet.schema_arrow, path, text_field, key)
    batches = parquet.iter_batches(columns=[names[0]])
    yield from _strings(_batch_values(batches, names, path, key), path, text_field, key, warn)


def _text_path(schema, where, text_field: str, key: str) -> List[str]:
    """The names that lead from a table's top to its text: ``[text_field]`` for a column of
    that name, else the parts of a dotted path into struct columns (``meta.text``, the name
    ``datasets``' flatten gives that field). A path that leads nowhere is one error naming
    what there is where it stopped."""
    if text_field in schema.names:
        return [text_field]
    import pyarrow as pa

    parts, fields, there = text_field.split("."), list(schema), f"it has {schema.names}"
    for depth, name in enumerate(parts):
        found = next((f for f in fields if f.name == name), None)
        if found is None or (depth < len(parts) - 1 and not pa.types.is_struct(found.type)):
            strings, chat = _string_paths(list(schema)), _schema_chat_field(list(schema))
            if chat is not None:
                raise DataError(f"{key}: {where} has no column {text_field!r} ({there}); {_chat_fix(chat)}")
            fix = _text_field_fix(strings, "column", " (a field inside a struct column as column.field)")
            raise DataError(f"{key}: {where} has no column {text_field!r} ({there}). Fix: {fix}.")
        fields = list(found.type) if pa.types.is_struct(found.type) else []
        there += f"; {'.'.join(parts[:depth + 1])} has {[f.name for f in fields]}"
    return parts


def _string_paths(fields, prefix: str = "", depth: int = 0) -> List[str]:
    """The dotted paths of a schema's string columns and string fields of struct columns (two
    levels deep): the candidates for ``data.text_field``."""
    import pyarrow as pa

    found = []
    for field in fields:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            found.append(prefix + field.name)
        elif pa.types.is_struct(field.type) and depth < 2:
            found.extend(_string_paths(list(field.type), f"{prefix}{field.name}.", depth + 1))
    return found


CHAT_TURN_TEXT = ("content", "value", "text")  # {role, content}: OpenAI style; {from, value}: ShareGPT
CHAT_TURN_ROLE = ("role", "from")  # without one, a list of {text} objects is a list of records, not a chat


def _text_field_fix(candidates: List[str], noun: str, hint: str = "") -> str:
    """What to set ``data.text_field`` to, from the string fields or columns a record or
    table has (``noun``: field or column; ``hint`` where it has none); no final period."""
    if len(candidates) == 1:
        return f"data.text_field={candidates[0]}, its one text {noun}"
    if candidates:
        return f"set data.text_field to the {noun} holding the text, one of its text {noun}s {candidates[:8]}"
    return f"set data.text_field to the {noun} holding the text{hint}"


def _chat_fix(name: str) -> str:
    return (f"{name!r} holds chat turns (a list of {{role, content}} or {{from, value}} objects), and pretraining "
            "reads one text per record. "
            "Fix: join each record's turns into one text field first (rendered as your chat template renders them, "
            "or their contents one after another) and set data.text_field to it.")


def _is_conversation(value) -> bool:
    """A list of turns, each an object with a role (``role``/``from``) and its text under
    ``content``/``value``/``text``."""
    return isinstance(value, list) and bool(value) and all(_is_turn(turn) for turn in value)


def _is_turn(value) -> bool:
    return (isinstance(value, dict) and any(k in value for k in CHAT_TURN_ROLE)
            and any(isinstance(value.get(k), str) for k in CHAT_TURN_TEXT))


def _record_chat_field(record) -> Optional[str]:
    """The name of a JSON record's field that holds a conversation, if any."""
    return next((name for name, value in record.items() if _is_conversation(value)), None) \
        if isinstance(record, dict) else None


def _schema_chat_field(fields) -> Optional[str]:
    """The name of a table's column that holds conversations: a list of structs with a
    string ``content``/``value``/``text`` field."""
    import pyarrow as pa

    for field in fields:
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            turn = field.type.value_type
            if (pa.types.is_struct(turn) and any(t.name in CHAT_TURN_ROLE for t in turn)
                    and any(t.name in CHAT_TURN_TEXT and pa.types.is_string(t.type) for t in turn)):
                return field.name
    return None


def _record_string_paths(record, prefix: str = "", depth: int = 0) -> List[str]:
    """A JSON record's string fields as dotted paths (two levels into nested objects)."""
    found = []
    for name, value in (record.items() if isinstance(record, dict) else ()):
        if isinstance(value, str):
            found.append(prefix + name)
        elif isinstance(value, dict) and depth < 2:
            found.extend(_record_string_paths(value, f"{prefix}{name}.", depth + 1))
    return found


def _leaf(column, names: List[str]):
    """The text values of an Arrow column reached by :func:`_text_path`'s ``names``."""
    import pyarrow.compute as pc

    for name in names[1:]:
        column = pc.struct_field(column, name)  # a null struct gives a null text, as a missing field does
    return column


def _python_values(column) -> list:
    """A column's values; a string column holding bytes that are not UTF-8 (a parquet writer
    need not check, nor does Arrow's reader) comes as bytes, which :func:`_strings` decodes
    with U+FFFD for the bad ones and counts, where ``to_pylist`` stops at the first."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        return column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()).to_pylist()


def _walk(value, names: List[str], missing=None):
    """A nested record's field by ``names``: ``missing`` where a level is not there, None
    where one is null."""
    for name in names:
        if value is None:
            return None
        if not isinstance(value, dict) or name not in value:
            return missing
        value = value[name]
    return value


def _batch_values(batches, names: List[str], path, key: str) -> Iterator:
    """One column's values, record batch after record batch; a batch that does not read is one error."""
    try:
        for batch in batches:
            yield from _python_values(_leaf(batch.column(names[0]), names))
    except Exception as err:  # ArrowInvalid / OSError on a damaged page or batch
        raise DataError(f"{key}: {path} is damaged: a record batch does not read ({err}). Fix: re-download or "
                        "re-save it, or remove it from the source.") from err


def _arrow(path, text_field: str, key: str, warn: list, data: Optional[bytes] = None) -> Iterator[str]:
    """An Arrow IPC file, as ``datasets`` writes its cache (``...-train-00000-of-00004.arrow``,
    the stream format) or as ``pyarrow`` writes files: one record batch at a time, memory-mapped
    (from ``data`` in memory for an archive's member)."""
    import pyarrow as pa

    try:
        source = pa.BufferReader(data) if data is not None else pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except Exception as err:  # ArrowInvalid / OSError
        instead = stand_in(path, "an Arrow file") if data is None else None
        head = b""
        with contextlib.suppress(OSError):
            head = data if data is not None else _file_head(path)
        if sniff(head) == "Feather V1":  # before Arrow 0.17; not the IPC format, and pyarrow deprecates reading it
            instead = (f"{path} is Feather V1, an older layout than Arrow's IPC format read here. Fix: save it again as "
                       "V2 (python -c \"import pyarrow.feather as f; f.write_feather(f.read_table('old.feather'), "
                       "'new.feather')\") and read that.")
        raise DataError(f"{key}: {instead}" if instead else
                        f"{key}: {path} is not a readable Arrow file ({err}). Fix: re-download or re-save it.") from err
    names = _text_path(reader.schema, path, text_field, key)
    with source:
        yield from _strings(_batch_values(batches, names, path, key), path, text_field, key, warn)


def _text_encoding(head: bytes) -> Optional[str]:
    """The codec of a text file that starts with ``head``; None when it is binary."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE starts both
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if b"\0" in head[:BINARY_SNIFF]:
        return None
    return "utf-8-sig"  # UTF-8, its byte-order mark dropped when there is one


def _binary(path, key: str, head: bytes) -> str:
    kind = sniff(head)
    if kind in ("tar", "zip", "parquet", "arrow"):
        suffix = {"tar": ".tar", "zip": ".zip", "parquet": ".parquet", "arrow": ".arrow"}[kind]
        return (f"{key}: {path} is skipped: it is a {kind} file, named as text. Fix: rename it to end in {suffix}, "
                "and it is read as one.")
    if kind in UNREAD_PACKINGS:
        command = UNREAD_PACKINGS[kind].format(path=shlex.quote(str(path)))
        return (f"{key}: {path} is skipped: it is a {kind} file, a packing not read here (gzip, zstd, bzip2, xz and "
                f"LZ4 files are, and tar and zip archives). Fix: unpack it first ({command}) and point {key} at what "
                "it holds.")
    what = f"it is a {kind} file" if kind else (f"it looks binary (a NUL byte in its first {BINARY_SNIFF:,} bytes "
                                                "and no byte-order mark)")
    return (f"{key}: {path} is skipped: {what}. Fix: none, if it is not text; if it is UTF-16 or UTF-32 without "
            "a byte-order mark, convert it to UTF-8.")


def _read_text(path: Union[Path, _Member], key: str, warn: list) -> str:
    """A whole text file, decoded ("" for a binary one, with a warning)."""
    try:
        with _open_stream(path, key) as stream:
            data = stream.read()
    except Exception as err:
        _raise_if_damaged(path, err, "", key)
        raise
    encoding = _text_encoding(data)
    if encoding is None:
        warn.append(_binary(path, key, data[:SNIFF_BYTES]))
        return ""
    return _decode(data, path, key, warn, encoding=encoding)


def _stream_text(path: Union[Path, _Member], key: str, warn: list, piece_chars: int, start: int = 0,
                 stop: Optional[int] = None) -> Iterator[Tuple[str, bool]]:
    """A text file as pieces of one document, read and decoded a block at a time. Bad
    bytes are replaced (U+FFFD) and reported as :func:`_decode` reports them; a binary file
    or an empty one yields nothing. ``start``/``stop``: only those bytes of a plain file
    (a :class:`Unit`'s range, which :func:`list_units` found to be UTF-8 text)."""
    strict = lenient = None
    consumed, replaced, first_bad, carry, chars = start, 0, None, "", 0
    blank, yielded = True, False  # only blank space so far; a piece given out already
    valid_non_ascii, cp1252 = 0, True
    try:
        with (_open_range(path, start, stop) if stop is not None else _open_stream(path, key)) as f:
            while True:
                block = f.read(READ_BLOCK)
                final = not block
                if strict is None:
                    encoding = "utf-8" if start else _text_encoding(block)
                    if encoding is None:
                        warn.append(_binary(path, key, block[:SNIFF_BYTES]))
                        return
                    strict = codecs.getincrementaldecoder(encoding)()
                if lenient is None:
                    pending = strict.getstate()[0]
                    try:
                        text = strict.decode(block, final=final)
                    except UnicodeDecodeError as err:
                        first_bad = consumed - len(pending) + err.start
                        lenient = codecs.getincrementaldecoder(encoding)(errors="replace")
                        text = lenient.decode(pending + block, final=final)
                        replaced += text.count("\ufffd")
                        cp1252 = cp1252 and _reads_as_cp1252(pending + block)
                else:
                    text = lenient.decode(block, final=final)
                    replaced += text.count("\ufffd")
                    cp1252 = cp1252 and _reads_as_cp1252(block)
                if len(text) != len(block):  # what tells cp1252 text from damaged UTF-8: valid multi-byte characters
                    valid_non_ascii += _count_non_ascii(text)
                consumed += len(block)
                carry += text
                chars += len(text)
                blank = blank and not text.strip()
                if final and (not chars or (blank and not yielded)):
                    break  # an empty file, or one of only blank space, is no document
                if len(carry) > 2 * piece_chars or final:
                    pieces = safe_cuts(carry, piece_chars)
                    carry = "" if final else pieces.pop()
                    for i, piece in enumerate(pieces):
                        yielded = True
                        yield piece, final and i == len(pieces) - 1
                if final:
                    break
    except Exception as err:
        _raise_if_damaged(path, err, f" after {consumed:,} bytes", key)
        raise
    if first_bad is not None:
        hint = _legacy_encoding_hint(path, replaced, valid_non_ascii, cp1252) if encoding.startswith("utf-8") else ""
        warn.append(f"{key}: {path} is not valid {_codec_name(encoding)} (first bad byte at offset {first_bad:,}); "
                    f"{replaced:,} undecodable byte sequence(s) were replaced by U+FFFD.{hint}")


def safe_cuts(text: str, size: int) -> List[str]:
    """``text`` in pieces of about ``size`` characters, cut after a single newline between
    two non-space characters (else before a space followed by a letter): places where a
    byte-level BPE pre-tokenizer starts a new word anyway, so the pieces encode to the
    same ids as the whole (tests/test_prepare.py and tests/test_gguf_teacher.py check two
    tokenizers). A stretch with no such place stays whole: its piece ends at the first
    place after it."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _last_cut(text, start, start + size) or _next_cut(text, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _last_cut(text: str, start: int, stop: int) -> Optional[int]:
    j = text.rfind("\n", start + 1, stop)
    while j != -1:
        if j + 1 < len(text) and not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.rfind("\n", start + 1, j)
    j = text.rfind(" ", start + 1, stop)
    while j != -1:
        if j + 1 < len(text) and not text[j - 1].isspace() and text[j + 1].isalpha():
            return j
        j = text.rfind(" ", start + 1, j)
    return None


def _next_cut(text: str, start: int) -> Optional[int]:
    """The first place at or after ``start`` that :func:`_last_cut` would accept."""
    found = []
    j = text.find("\n", start)
    while j != -1 and j + 1 < len(text):
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            found.append(j + 1)
            break
        j = text.find("\n", j + 1)
    j = text.find(" ", start)
    while j != -1 and j + 1 < len(text):
        if not text[j - 1].isspace() and text[j + 1].isalpha():
            found.append(j)
            break
        j = text.find(" ", j + 1)
    return min(found) if found else None


def read_documents(source, text_field: str = "text", key: str = "data.source",
                   separator: Optional[str] = DOCUMENT_SEPARATOR) -> Iterator[str]:
    """Every document of a source, in order (for small corpora and tests)."""
    for unit in list_units(source, key, separator):
        messages: list = []
        yield from read_unit(unit, text_field, key, messages, separator)
        for message in messages:
            warnings.warn(message, DataWarning, stacklevel=2)


# ---------------------------------------------------------------- formats
def _codec_name(encoding: str) -> str:
    return {"utf-8-sig": "UTF-8", "utf-8": "UTF-8"}.get(encoding, encoding.upper())


def _decode(data: bytes, path: Path, key: str, warn: list, encoding: str = "utf-8") -> str:
    """A whole file's text; undecodable bytes replaced by U+FFFD, said once."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        text = data.decode(encoding, errors="replace")
        replaced = text.count(chr(0xFFFD))
        hint = _legacy_encoding_hint(path, replaced, _count_non_ascii(text), _reads_as_cp1252(data)) \
            if encoding.startswith("utf-8") else ""
        warn.append(f"{key}: {path} is not valid {_codec_name(encoding)} (first bad byte at offset "
                    f"{err.start:,}); {replaced:,} undecodable byte sequence(s) were replaced by U+FFFD.{hint}")
        return text


def _count_non_ascii(text: str) -> int:
    """The characters of ``text`` that took more than one byte of valid UTF-8 (U+FFFD aside)."""
    return len(text) - len(text.encode("ascii", "ignore")) - text.count("\ufffd")


CP1252_UNDEFINED = re.compile(b"[\x81\x8d\x8f\x90\x9d]")  # the five bytes Windows-1252 leaves undefined


def _reads_as_cp1252(data: bytes) -> bool:
    return CP1252_UNDEFINED.search(data) is None


def _legacy_encoding_hint(path, undecodable: int, valid_non_ascii: int, cp1252: bool, table: bool = False) -> str:
    """For a file that is not UTF-8: when its bytes read as Windows-1252 (Latin-1's letters,
    what older Windows and web text is in) and hardly any of its non-ASCII characters are
    valid UTF-8, the conversion to make first ("" when the bytes look like damage instead:
    a UTF-8 file with a few bad bytes keeps valid multi-byte characters around them, and a
    handful of bad bytes says nothing either way)."""
    if not cp1252 or undecodable < 10 or valid_non_ascii * 10 > undecodable:  # a few bad bytes tell nothing
        return ""
    compression = _format(path)[1] if isinstance(path, Path) else ""
    if table:  # parquet, arrow, a datasets folder: its column's bytes were written from cp1252 text
        command = "rewrite its text column decoded as cp1252, e.g. bytes.decode('cp1252') in the script that wrote it"
    elif isinstance(path, Path) and not compression and path.is_file():
        target = path.with_name(path.stem + ".utf8" + path.suffix)
        command = f"iconv -f cp1252 -t utf-8 {shlex.quote(str(path))} > {shlex.quote(str(target))}"
    else:  # compressed, or a member of an archive: the conversion is of its decompressed text
        command = "iconv -f cp1252 -t utf-8 on its decompressed text"
    return (" It reads as Windows-1252 (Latin-1) text, not damaged UTF-8: convert it to UTF-8 first "
            f"({command}), or those characters are lost to training.")


def _decode_counted(raw: bytes, skipped: "SkippedRecords", at: int) -> str:
    """One line of a JSON Lines file (or a CSV or parquet row's bytes); undecodable bytes
    replaced by U+FFFD and counted in ``skipped``, which says so once for the file (a Latin-1
    JSON Lines file of a million lines was a million warnings)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.decode("utf-8", errors="replace")
        skipped.undecodable(at, err.start, line.count("\ufffd"), _reads_as_cp1252(raw))
        return line
    if len(line) != len(raw):
        skipped.valid_non_ascii_lines += 1
    return line


# What a file holds, by its first bytes, whatever its name says: (offset, bytes, name).
MAGIC = ((0, b"\x1f\x8b", "gzip"), (0, b"\x28\xb5\x2f\xfd", "zstd"), (0, b"\xfd7zXZ\x00", "xz"),
         (0, b"\x04\x22\x4d\x18", "LZ4"), (0, b"LZIP\x01", "lzip"), (0, b"\x1f\x9d", "compress (.Z)"),
         (0, b"\xff\x06\x00\x00sNaPpY", "Snappy"),
         (0, b"PK\x03\x04", "zip"), (0, b"PK\x05\x06", "zip"), (257, b"ustar", "tar"), (0, b"PAR1", "parquet"),
         (0, b"ARROW1", "arrow"), (0, b"FEA1", "Feather V1"),
         (0, b"%PDF-", "PDF"), (0, b"\x89PNG", "PNG"), (0, b"\xff\xd8\xff", "JPEG"),
         (0, b"7z\xbc\xaf\x27\x1c", "7-Zip"), (0, b"Rar!", "RAR"), (0, b"\x7fELF", "ELF executable"),
         (0, b"SQLite format 3\x00", "SQLite database"), (0, b"\x93NUMPY", "NumPy array"))
# Packings known by their first bytes and not read: each with the command that unpacks it
UNREAD_PACKINGS = {"7-Zip": "7z x {path}", "RAR": "unrar x {path}", "lzip": "lzip -dk {path}",
                   "compress (.Z)": "uncompress -k {path}", "Snappy": "python -m snappy -d {path} <out>"}
ZSTD_MAX_WINDOW = 2**31  # `zstd --long=31`, the largest window the format allows
DECOMPRESSED = ("gzip", "zstd", "bzip2", "xz", "LZ4")  # content magic names of the compressions read
SNIFF_BYTES = 512  # a tar header: its magic is at byte 257


def sniff(head: bytes) -> Optional[str]:
    """What bytes starting with ``head`` are, by their magic number (``gzip``, ``tar``,
    ``zip``, ``parquet``, ``PDF``, ...); None for anything else, text included."""
    if head.startswith(b"BZh") and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):  # a block, or an empty stream
        return "bzip2"
    return next((name for at, magic, name in MAGIC if head[at:at + len(magic)] == magic), None)


class _Replayed(io.RawIOBase):
    """A stream whose first bytes were read (to sniff them), served again from the start."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:  # one read of the rest, not RawIOBase's 8 KB loop
        head, self.head = self.head, b""
        return head + self.rest.read()


def _file_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def _read_head(stream, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _decompressed(raw, name, key: str, stack: contextlib.ExitStack) -> Tuple[io.BufferedReader, Optional[str]]:
    """``raw`` decompressed as its content says (gzip, zstd, bzip2, xz, layer by layer: a
    ``.txt`` that is really gzip reads as text), and what the decompressed bytes are by their
    magic number (``tar``, ``zip``, ``parquet``, ... or None: text, JSON, CSV)."""
    first = not isinstance(name, _Member)
    while True:
        head = _read_head(raw, SNIFF_BYTES)
        if first:
            _refuse_stand_in(name, head, key)
            first = False
        kind = sniff(head)
        stream = io.BufferedReader(_Replayed(head, raw), buffer_size=1 << 20)
        if kind not in DECOMPRESSED:
            return stream, kind
        if kind == "gzip":
            raw = stack.enter_context(gzip.GzipFile(fileobj=stream))
        elif kind == "bzip2":
            raw = stack.enter_context(bz2.BZ2File(stream))
        elif kind == "xz":
            raw = stack.enter_context(lzma.LZMAFile(stream))
        elif kind == "LZ4":  # the frame format the `lz4` command writes; pyarrow's codec, no package of its own
            import pyarrow

            raw = stack.enter_context(pyarrow.CompressedInputStream(pyarrow.PythonFile(stream, mode="r"), "lz4"))
        else:
            try:
                import zstandard
            except ImportError as err:
                raise DataError(f"{key}: {name} is zstd-compressed, which needs the `zstandard` package. "
                                "Fix: pip install zstandard.") from err
            # zstandard refuses frames whose window passes 128 MiB unless told the limit: files made
            # with `zstd --long` (up to 2 GiB windows) would read as damaged. The window is only
            # as large as the file made it, so the higher limit costs nothing for ordinary files.
            decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
            raw = stack.enter_context(decompressor.stream_reader(stream, read_across_frames=True))


def _refuse_stand_in(path, head: bytes, key: str) -> None:
    """A Git LFS pointer in place of a corpus file (a dataset repository cloned without Git
    LFS), or a web page saved under a JSON, CSV, archive or compressed name (a download
    that got an error page), is one error saying so, not a file of garbage read as text or
    "not valid JSON"."""
    kind, compression = _format(path)
    instead = stand_in(path, f"a {(kind or 'corpus').replace('jsonl', 'JSON').replace('csv', 'CSV')} file",
                       html=bool(kind not in ("text", None) or compression), head=head)
    if instead:
        raise DataError(f"{key}: {instead}")


@dataclass
class _Member:
    """A file inside an archive (``name`` is ``archive[member]``): a stream read once, in order."""

    name: str
    fileobj: object
    member: str

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------- bytes read
# A unit can take hours (a 15 GB .jsonl.zst is one: a compressed stream cannot be entered
# midway), so the prepare step says how far the units under way are: by the bytes of the
# corpus's files this process has read, counted where the readers above open them (the
# compressed bytes, for a compressed file: what a unit's size counts). Parquet files and
# datasets folders are read by pyarrow and not counted: their units are a row group or
# DATASET_UNIT_ROWS rows, minutes at most.
_BYTES_READ = [0]


def bytes_read() -> int:
    """Bytes of corpus files read by this process so far."""
    return _BYTES_READ[0]


class _CountedFile(io.FileIO):
    def readinto(self, buffer) -> int:
        got = super().readinto(buffer)
        _BYTES_READ[0] += got or 0
        return got

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        _BYTES_READ[0] += len(data or b"")
        return data

    def readall(self) -> bytes:
        data = super().readall()
        _BYTES_READ[0] += len(data)
        return data


def open_counted(path) -> io.BufferedReader:
    """``open(path, "rb")``, its reads counted in :func:`bytes_read`."""
    return io.BufferedReader(_CountedFile(path))


@contextlib.contextmanager
def _open_range(path: Path, start: int, stop: int):
    """The bytes ``[start, stop)`` of a plain file, as a stream."""
    with open_counted(path) as f:
        f.seek(start)
        yield io.BufferedReader(_Bounded(f, stop - start), buffer_size=1 << 20)


class _Bounded(io.RawIOBase):
    """At most ``left`` bytes of ``raw``, from where it stands."""

    def __init__(self, raw, left: int):
        self.raw, self.left = raw, left

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(min(len(buffer), self.left))
        buffer[:len(data)] = data
        self.left -= len(data)
        return len(data)


@contextlib.contextmanager
def _open_stream(source: Union[Path, _Member], key: str):
    """A file (or an archive's member) opened for reading bytes, decompressed as its content says."""
    with contextlib.ExitStack() as stack:
        raw = source.fileobj if isinstance(source, _Member) else stack.enter_context(open_counted(source))
        stream, _ = _decompressed(raw, source, key, stack)
        yield stream


def _raise_if_damaged(path, err: Exception, where: str, key: str) -> None:
    """One error for a compressed stream or an archive that breaks (truncated, corrupt);
    other errors are left to the caller."""
    import tarfile

    broken = isinstance(err, (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, tarfile.ReadError)) or (
        type(err).__name__ == "ZstdError") or (isinstance(err, OSError) and err.errno is None and (
            "data stream" in str(err) or "compressed stream" in str(err) or str(err).startswith("LZ4 ")))
    if broken:  # bz2 says "Invalid data stream", pyarrow's LZ4 "Truncated compressed stream", with no errno
        raise DataError(f"{key}: {path} is damaged: the compressed stream breaks{where} ({err}). "
                        "Fix: re-download the file, or remove it from the source.") from err


class SkippedRecords:
    """Records that hold no text, counted per file (per row group for parquet) instead of
    stopping a long preparation: a JSONL line that does not parse (a file cut off mid-write
    ends in one), a record without the text field, a null or empty text. They are reported once, as
    one warning with the counts and the first place. A file made mostly of such records is
    in another format, or its text is under another field: that is one error (after 100 bad
    records with none good, at once)."""

    FAST_FAIL = 100

    def __init__(self, path: Path, key: str, where: str = "line", table: bool = False):
        self.path, self.key, self.where, self.table = path, key, where, table  # table: parquet, arrow, datasets
        self.counts: Dict[str, int] = {}
        self.fatal: Dict[str, int] = {}  # the kinds that say the file is misread, with their error
        self.first_at: Optional[int] = None
        self.first_error: Optional[str] = None
        self.surrogates, self.first_surrogate = 0, None  # lone surrogates made U+FFFD, and where the first was
        # lines with bytes that are not UTF-8: how many, their replaced sequences, the first (at, byte in it)
        self.undecodable_lines = self.undecodable_sequences = self.valid_non_ascii_lines = 0
        self.first_undecodable: Optional[Tuple[int, int]] = None
        self.cp1252 = True

    def skip(self, reason: str, at: int, kept: int, error: Optional[str] = None) -> None:
        """Count one record; ``error`` is the message for when such records are (nearly) all
        the file holds. A null or empty text never is: an empty record is valid data."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first_at = at if self.first_at is None else self.first_at
        if error is not None:
            self.fatal[reason] = self.fatal.get(reason, 0) + 1
            self.first_error = self.first_error or error
            if kept == 0 and sum(self.fatal.values()) >= self.FAST_FAIL:
                raise DataError(self.first_error)

    def undecodable(self, at: int, offset: int, sequences: int, cp1252: bool) -> None:
        self.undecodable_lines += 1
        self.undecodable_sequences += sequences
        self.first_undecodable = self.first_undecodable or (at, offset)
        self.cp1252 = self.cp1252 and cp1252

    def repair(self, at: int, count: int) -> None:
        self.surrogates += count
        self.first_surrogate = at if self.first_surrogate is None else self.first_surrogate

    def finish(self, kept: int, warn: list) -> None:
        bad, fatal = sum(self.counts.values()), sum(self.fatal.values())
        if self.undecodable_lines:
            at, offset = self.first_undecodable
            first = f"the line at byte {at:,}" if self.where == "byte" else f"{self.where} {at:,}"
            units = "rows" if self.where == "row" else "lines"
            hint = _legacy_encoding_hint(self.path, self.undecodable_lines, self.valid_non_ascii_lines, self.cp1252,
                                         self.table)
            warn.append(f"{self.key}: {self.path} is not valid UTF-8: {self.undecodable_lines:,} of its {units} hold "
                        f"undecodable bytes (the first, {first}, at its byte {offset:,}); "
                        f"{self.undecodable_sequences:,} byte sequence(s) were replaced by U+FFFD.{hint}")
        if self.surrogates:
            warn.append(_surrogates_replaced(self.key, self.path, self.surrogates, f"{self.where} {self.first_surrogate}"))
        if fatal and (kept == 0 or fatal > kept):
            raise DataError(f"{self.first_error} ({fatal:,} of {bad + kept:,} records are like this.)")
        if bad:
            parts = ", ".join(f"{n:,} {reason}" for reason, n in self.counts.items())
            warn.append(f"{self.key}: {self.path}: skipped {bad:,} of {bad + kept:,} records that hold no text "
                        f"({parts}; the first at {self.where} {self.first_at}). Fix: none, if they are meant to be "
                        "skipped; otherwise repair those records.")


_ABSENT = object()
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair into one character
# In JSON text: an escaped backslash (skipped whole, so its next character is no escape), a
# valid surrogate pair (kept), or a lone surrogate's escape, which ijson's C parser cannot decode
JSON_SURROGATE_ESCAPE = re.compile(r"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|"
                                   r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _json_field(record, text_field: str):
    """``record[text_field]``; for a dotted name that is no key of its own, the field it
    names inside nested objects (``meta.text``); ``_ABSENT`` where there is none."""
    if isinstance(record, dict) and text_field in record:
        return record[text_field]
    return _walk(record, text_field.split("."), missing=_ABSENT) if isinstance(record, dict) else _ABSENT


def _record_text(record, text_field: str, place: str, at: int, skipped: "SkippedRecords", kept: int,
                 key: str) -> Optional[str]:
    """The text of one JSON record; None when it holds none (counted in ``skipped``). A
    record that is a JSON string (a JSON Lines file of strings) is the text itself."""
    value = record if isinstance(record, str) else _json_field(record, text_field)
    if value is _ABSENT:
        has = f"its fields are {list(record)[:8]}" if isinstance(record, dict) else f"it is a JSON {type(record).__name__}"
        inner, parts = record, text_field.split(".")
        for depth, name in enumerate(parts[:-1]):  # a dotted name: what each level it reaches holds
            inner = inner.get(name) if isinstance(inner, dict) else None
            if not isinstance(inner, dict):
                break
            has += f"; {'.'.join(parts[:depth + 1])} has {list(inner)[:8]}"
        nested = isinstance(record, dict) and any(isinstance(v, dict) for v in record.values())
        pandas = _pandas_layout(record, text_field)
        if pandas:
            said, orient = pandas
            skipped.skip(f"without the field {text_field!r}", at, kept, f"{key}: {place} {said} (as pandas' "
                         f"DataFrame.to_json writes a table with orient={orient}); a record here is a JSON object "
                         "with its text in a field, or a JSON string. Fix: write it as JSON Lines: "
                         "df.to_json(path, orient='records', lines=True).")
            return None
        strings, chat = _record_string_paths(record), _record_chat_field(record)
        fix = (_chat_fix(chat) if chat is not None else  # its other fields (an id) would not do
               _text_field_fix(strings, "field", " (inside a nested object: outer.inner)" if nested else "") + ".")
        skipped.skip(f"without the field {text_field!r}", at, kept, f"{key}: {place} has no field {text_field!r} "
                     f"({has}){'; ' if chat is not None else '. Fix: '}{fix}")
        return None
    if value is None:
        skipped.skip(f"with a null {text_field!r}", at, kept)
        return None
    if not isinstance(value, str):
        if _is_conversation(value):
            raise DataError(f"{key}: {place}: {_chat_fix(text_field)}")
        inside = [f"{text_field}.{name}" for name in _record_string_paths(value)]
        if isinstance(value, dict) and len(value) > 1 and all(str(k).isdigit() for k in value):
            raise DataError(f"{key}: {place}: {text_field!r} maps row numbers to {len(value):,} values, as pandas' "
                            "DataFrame.to_json writes a table by default (orient='columns'). Fix: write it as JSON "
                            "Lines instead: df.to_json(path, orient='records', lines=True).")
        fix = (_text_field_fix(inside, "field") + "." if inside else
               "make it a string in that record, or set data.text_field to the field holding the text.")
        raise DataError(f"{key}: {place}: {text_field!r} is {type(value).__name__}, not text. Fix: {fix}")
    if not value.strip():  # nothing to learn from but an end-of-text token
        skipped.skip(f"with an empty or blank {text_field!r}", at, kept)
        return None
    if not value.isascii() and LONE_SURROGATE.search(value):  # JSON's \ud83d alone: no character, no UTF-8
        value, count = LONE_SURROGATE.subn("\ufffd", value)
        skipped.repair(at, count)
    return value


def _holds_record(value, text_field: str) -> bool:
    """Whether ``value`` is a record with the text field (a chat turn is not one)."""
    return isinstance(value, dict) and _json_field(value, text_field) is not _ABSENT and not _is_turn(value)


def _record_lists(record, text_field: str) -> List[str]:
    """The fields of a JSON object that hold its records: lists of objects with the text
    field (``{"version": 2, "data": [{"text": ...}, ...]}``), for an object without it."""
    if not isinstance(record, dict) or _json_field(record, text_field) is not _ABSENT:
        return []
    return [name for name, value in record.items()
            if isinstance(value, list) and value and _holds_record(value[0], text_field)]


def _several_lists(key: str, place: str, names: List[str], path) -> DataError:
    pick = "train" if "train" in names else names[0]
    return DataError(f"{key}: {place} holds lists of records under several keys {names[:8]}, and which to train on "
                     f"is not for letrecipes to guess. Fix: write the one to train on as JSON Lines, e.g. "
                     f"jq -c {shlex.quote('.' + json.dumps(pick) + '[]')} {shlex.quote(str(path))} > {pick}.jsonl, "
                     "and point data.source at that file.")


def _record_texts(record, text_field: str, place: str, at: int, skipped: "SkippedRecords", kept: int,
                  key: str, path) -> Iterator[str]:
    """The texts of one JSON value: a record's text, or, for an object that holds its
    records in a list (``{"data": [...]}``), theirs."""
    lists = _record_lists(record, text_field)
    if len(lists) > 1:
        raise _several_lists(key, place, lists, path)
    if not lists:
        text = _record_text(record, text_field, place, at, skipped, kept, key)
        if text is not None:
            yield text
        return
    for i, item in enumerate(record[lists[0]]):
        text = _record_text(item, text_field, f"{place} {lists[0]}[{i}]", at, skipped, kept, key)
        if text is not None:
            kept += 1
            yield text


def _pandas_layout(record, text_field: str) -> Optional[Tuple[str, str]]:
    """(what the value holds, pandas' orient) for a value laid out as one of the tables
    ``DataFrame.to_json`` writes other than as records; None for any other."""
    if isinstance(record, list):
        return "holds a row as a list, without field names", "values"
    if not isinstance(record, dict) or len(record) < 2:
        return None
    if all(str(k).isdigit() and _holds_record(v, text_field) for k, v in record.items()):
        return "maps row numbers to records", "index"
    if {"columns", "data"} <= set(record) <= {"columns", "index", "data"}:
        return "holds its rows as lists beside their column names", "split"
    return None


def _surrogates_replaced(key: str, path, count: int, first: str) -> str:
    return (f"{key}: {path}: {count:,} lone UTF-16 surrogate(s) (a \\ud800-\\udfff escape that is half a "
            f"character, as a crawl that cut an emoji in two leaves; the first at {first}) were replaced by U+FFFD. "
            "Fix: none needed; repair those records to keep the characters.")


JSON_PEEK_BYTES = 1 << 20  # a first line longer than this is not read whole to tell JSON's layout


def _json_layout(stream) -> Tuple[str, List[bytes]]:
    """How a JSON file is laid out, told from its first two non-blank lines (each read up to
    ``JSON_PEEK_BYTES``): ``array`` (one array of records), ``lines`` (JSON Lines: the first
    line, or the second after a broken first, is a whole JSON value) or ``values``
    (pretty-printed objects, one object holding every record, or a first line too long to
    read whole): the last two are parsed as a stream. Returns it with the lines read."""
    head: List[bytes] = []

    def next_line() -> bytes:
        while True:
            raw = stream.readline(JSON_PEEK_BYTES)
            head.append(raw)
            if not raw or raw.strip(codecs.BOM_UTF8 + b" \t\r\n"):
                return raw

    first = next_line()
    lead = first.lstrip(codecs.BOM_UTF8).lstrip()
    if lead.startswith(b"["):
        return "array", head
    if not lead.startswith(b"{") or _parses(first):
        return "lines", head
    if _line_cut(first):
        return "values", head
    second = next_line()
    if not second:  # one line, and broken: JSON Lines' reader says where
        return "lines", head
    return ("lines" if not _line_cut(second) and _parses(second) else "values"), head


def _line_cut(raw: bytes) -> bool:
    """Whether a line read by :func:`_json_layout` is only the start of its line."""
    return len(raw) >= JSON_PEEK_BYTES and not raw.endswith(b"\n")


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw.lstrip(codecs.BOM_UTF8).decode("utf-8", "replace"))
    except ValueError:
        return False
    return True


# WARC record types whose body is a page's text: Common Crawl's WET files hold one `conversion`
# record a page; a `resource` record may hold a text file as it was archived
WARC_TEXT_RECORDS = ("conversion", "resource")


def _warc_texts(path: Union[Path, _Member], key: str, warn: list) -> Iterator[str]:
    """A web archive's texts, read by ``warcio``: the body of each record that holds text
    (WET files' ``conversion`` records, a ``text/plain`` resource), one document each. The
    records around them (warcinfo, requests, metadata) hold none. Pages as fetched
    (``response`` records: HTTP headers and HTML) are not text: a file of them is one error,
    as tokenizing their markup would train on it."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    skipped = SkippedRecords(path, key, where="record")
    number, kept, pages = 0, 0, 0
    try:
        with _open_stream(path, key) as stream:
            head = stream.peek(64)[:64]
            if not head:  # an empty file: no documents, as an empty text file
                return
            if not head.startswith(b"WARC/"):  # warcio reads other text as records of the older ARC format
                shown = head.split(b"\n")[0].decode("utf-8", "replace")[:40]
                raise DataError(f"{key}: {path} is named as a web archive but is not one (a WARC file begins with "
                                f"'WARC/'; this one with {shown!r}). Fix: rename it to what it holds (.txt for text), "
                                "or re-download it.")
            for number, record in enumerate(ArchiveIterator(_EndsLoudly(stream), check_digests=False), 1):
                content_type = (record.rec_headers.get_header("Content-Type") or "").lower()
                if record.rec_type == "response":
                    pages += 1
                    if kept == 0 and pages >= SkippedRecords.FAST_FAIL:
                        break
                if record.rec_type not in WARC_TEXT_RECORDS or not content_type.startswith("text/plain"):
                    continue
                body = record.content_stream().read()
                if record.http_headers is None and len(body) < record.length:  # warcio returns what is there
                    raise DataError(f"{key}: {path} is damaged: it ends inside WARC record {number:,} ({len(body):,} "
                                    f"of its {record.length:,} bytes). Fix: re-download the file, or remove it from "
                                    "the source.")
                text = _decode_counted(body, skipped, number)
                if not text.strip():
                    skipped.skip("empty", number, kept)
                    continue
                kept += 1
                yield text
        if pages and kept == 0:
            raise DataError(f"{key}: {path} holds web pages as they were fetched (WARC response records: HTTP headers "
                            "and HTML), not text: a model trained on them learns the markup. Fix: use the text "
                            "extracted from them (Common Crawl publishes it as WET files, CC-MAIN-*.warc.wet.gz), or "
                            "extract it yourself (trafilatura, resiliparse) into JSON Lines.")
        skipped.finish(kept, warn)
    except ArchiveLoadFailed as err:
        raise DataError(f"{key}: {path} is damaged: WARC record {number + 1:,} does not read ({err}). Fix: "
                        "re-download the file, or remove it from the source.") from err
    except DataError:
        raise
    except Exception as err:
        _raise_if_damaged(path, err.__cause__ if isinstance(err, _StreamBroke) else err,
                          f" after WARC record {number:,}" if number else "", key)
        raise


class _StreamBroke(Exception):
    """A compressed stream's EOFError (cut short), passed through a reader that takes EOFError
    for the end of its records (warcio: a truncated .warc.gz read as a shorter whole one)."""


class _EndsLoudly:
    """``stream``'s reads, its EOFError raised as :class:`_StreamBroke`."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except EOFError as err:
            raise _StreamBroke(str(err)) from err

    def readline(self, size: int = -1) -> bytes:
        try:
            return self.stream.readline(size)
        except EOFError as err:
            raise _StreamBroke(str(err)) from err


def _json_records(path: Union[Path, _Member], text_field: str, key: str, warn: list, start: int = 0,
                  stop: Optional[int] = None) -> Iterator[str]:
    """A JSON file's texts, as :func:`_json_layout` finds it laid out: JSON Lines, read a line
    at a time; one array of records, or pretty-printed objects, parsed as a stream (a
    many-GB file never sits in memory). ``start``/``stop`` (a :class:`Unit`'s range of a
    plain JSON Lines file): only the lines that begin in those bytes; records are then
    named by their byte offset, as a line's number is not known without the bytes before."""
    if stop is not None and start > 0:
        yield from _json_lines_range(Path(path), text_field, key, warn, start, stop)
        return
    line_no, kept = 0, 0
    skipped = SkippedRecords(path, key)
    try:
        line_start = 0  # the byte a line begins at: a range's first unit ends at the first line that begins at stop
        with _open_stream(path, key) as stream:
            layout, head = _json_layout(stream)
            if stop is None and layout != "lines":  # a range is planned only for JSON Lines
                joined = b"".join(head)
                bom = len(codecs.BOM_UTF8) if joined.startswith(codecs.BOM_UTF8) else 0
                replayed = io.BufferedReader(_Replayed(joined[bom:], stream))
                reader = _json_array if layout == "array" else _json_values
                yield from reader(path, replayed, text_field, key, warn, bom)
                return
            if head and _line_cut(head[-1]):
                head[-1] += stream.readline()  # the rest of that line
            for line_no, raw in enumerate(itertools.chain(head, stream), 1):
                if stop is not None:
                    if line_start >= stop:
                        break
                    line_start += len(raw)
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if not raw.strip():
                    continue
                line = _decode_counted(raw, skipped, line_no)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    skipped.skip("not valid JSON", line_no, kept, f"{key}: {path}:{line_no} is not valid JSON ({err}). "
                                 "Fix: JSON Lines (one object per line) or one JSON array of objects; or rename the "
                                 "file to .txt to read it as text.")
                    continue
                for text in _record_texts(record, text_field, f"{path}:{line_no}", line_no, skipped, kept, key, path):
                    kept += 1
                    yield text
        skipped.finish(kept, warn)
    except Exception as err:
        _raise_if_damaged(path, err, f" after line {line_no:,}" if line_no else "", key)
        raise


def _json_lines_range(path: Path, text_field: str, key: str, warn: list, start: int, stop: int) -> Iterator[str]:
    """The records of the lines of a plain JSON Lines file that begin in ``[start, stop)``
    (``start`` > 0): the line under way at ``start`` belongs to the range before."""
    kept = 0
    skipped = SkippedRecords(path, key, where="byte")
    with open_counted(path) as f:
        f.seek(start - 1)
        at = start - 1 + len(f.readline())  # to the end of the line that byte start - 1 is on
        while at < stop:
            raw = f.readline()
            if not raw:
                break
            line_at, at = at, at + len(raw)
            if not raw.strip():
                continue
            place = f"{path} (the line at byte {line_at:,})"
            line = _decode_counted(raw, skipped, line_at)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                skipped.skip("not valid JSON", line_at, kept, f"{key}: {place} is not valid JSON ({err}). "
                             "Fix: JSON Lines (one object per line); or rename the file to .txt to read it as text.")
                continue
            for text in _record_texts(record, text_field, place, line_at, skipped, kept, key, path):
                kept += 1
                yield text
    skipped.finish(kept, warn)


def _json_array(path: Union[Path, _Member], stream, text_field: str, key: str, warn: list,
                offset: int) -> Iterator[str]:
    """The records of a file that is one JSON array, parsed one at a time by ijson (a
    many-GB array never sits in memory; ``json.load`` would hold it several times over).
    ``stream`` starts at the file's byte ``offset`` (after a byte-order mark, blank lines)."""
    ijson = _ijson(path, key, "is one JSON array")
    utf8 = _Utf8Repaired(stream, offset)
    skipped, kept, i = SkippedRecords(path, key, where="record"), 0, -1
    try:
        for i, record in enumerate(ijson.items(io.BufferedReader(utf8, 1 << 20), "item", use_float=True)):
            for text in _record_texts(record, text_field, f"{path} record {i}", i, skipped, kept, key, path):
                kept += 1
                yield text
    except ijson.JSONError as err:
        what = str(err).splitlines()[0]  # yajl quotes the text around the error on the next lines
        raise DataError(f"{key}: {path} starts like a JSON array but is not valid JSON after record {i + 1:,} "
                        f"({what}). Fix: repair or re-download it; JSON Lines (one object per line) can also be "
                        "read.") from err
    except Exception as err:
        _raise_if_damaged(path, err, f" after record {i + 1:,}", key)
        raise
    _utf8_repairs(utf8, path, key, warn)
    skipped.finish(kept, warn)


def _ijson(path, key: str, what: str):
    try:
        import ijson
    except ImportError as err:  # a dependency of letrecipes; an environment built before it was one
        raise DataError(f"{key}: {path} {what}, which is read with the ijson package. Fix: pip install "
                        "ijson (or rerun scripts/setup.sh).") from err
    return ijson


def _utf8_repairs(utf8: "_Utf8Repaired", path, key: str, warn: list) -> None:
    if utf8.replaced:
        hint = _legacy_encoding_hint(path, utf8.replaced, utf8.valid_non_ascii, utf8.cp1252)
        warn.append(f"{key}: {path} is not valid UTF-8 (first bad byte at offset {utf8.first_bad:,}); {utf8.replaced:,} "
                    f"undecodable byte sequence(s) were replaced by U+FFFD.{hint}")
    if utf8.surrogates:
        warn.append(_surrogates_replaced(key, path, utf8.surrogates, f"byte {utf8.first_surrogate:,}"))


def _json_values(path: Union[Path, _Member], stream, text_field: str, key: str, warn: list,
                 offset: int) -> Iterator[str]:
    """The records of a JSON file that is not one record per line: pretty-printed objects
    one after another, or an object that holds its records in a list (``{"version": 2,
    "data": [...]}``, as SQuAD-style exports and ``json.dump({"data": rows})`` write),
    parsed as a stream: a list of records is read one record at a time, never whole."""
    ijson = _ijson(path, key, "is pretty-printed JSON")
    utf8 = _Utf8Repaired(stream, offset)
    events = ijson.basic_parse(io.BufferedReader(utf8, 1 << 20), multiple_values=True, use_float=True)
    skipped, kept, read = SkippedRecords(path, key, where="record"), 0, 0
    try:
        for place, record, items in _json_value_records(events, text_field, path, key, ijson):
            if items:
                text = _record_text(record, text_field, place, read, skipped, kept, key)
                texts = () if text is None else (text,)
            else:
                texts = _record_texts(record, text_field, place, read, skipped, kept, key, path)
            for text in texts:
                kept += 1
                yield text
            read += 1
    except ijson.JSONError as err:
        what = str(err).splitlines()[0]
        raise DataError(f"{key}: {path} is not valid JSON after record {read:,} ({what}). Fix: repair or re-download "
                        "it; JSON Lines (one object per line) or one JSON array of objects can also be read.") from err
    except Exception as err:
        _raise_if_damaged(path, err, f" after record {read:,}", key)
        raise
    _utf8_repairs(utf8, path, key, warn)
    skipped.finish(kept, warn)


def _json_value_records(events, text_field: str, path, key: str, ijson) -> Iterator[Tuple[str, object, bool]]:
    """(where, record, from a list) for each top-level value of ``events`` (ijson's
    ``basic_parse``); an object whose fields include lists of records gives those records,
    streamed, instead of itself."""
    for n, (event, value) in enumerate(events):
        place = f"{path} value {n}"
        if event == "start_array":
            for j, item in enumerate(_array_items(events, ijson)):
                yield f"{place}[{j}]", item, True
        elif event != "start_map":
            yield place, value, False
        else:
            whole = ijson.ObjectBuilder()
            whole.event("start_map", None)
            lists: List[str] = []
            name = None
            for event, value in events:
                if event == "end_map":
                    break
                name = value if event == "map_key" else name
                if event != "start_array":  # a key, or a field's value, whole
                    for inner in _value_events(events, event, value):
                        whole.event(*inner)
                    continue
                first = list(_value_events(events, *next(events)))
                item = _built(first, ijson) if first[0][0] != "end_array" else None
                if item is None or not _holds_record(item, text_field):  # a field that is a list (tags, turns)
                    for inner in [("start_array", None)] + first + ([] if item is None else
                                                                   list(_rest_of_array(events))):
                        whole.event(*inner)
                    continue
                lists.append(name)
                if len(lists) > 1:
                    raise _several_lists(key, place, lists, path)
                whole.event("null", None)
                yield f"{place} {name}[0]", item, True
                for j, item in enumerate(_array_items(events, ijson), 1):
                    yield f"{place} {name}[{j}]", item, True
            if not lists:
                yield place, whole.value, False


def _value_events(events, event, value) -> Iterator[Tuple[str, object]]:
    """The events of one JSON value that begins with ``(event, value)``, to its end."""
    yield event, value
    depth = 1 if event in ("start_map", "start_array") else 0
    while depth:
        event, value = next(events)
        depth += event in ("start_map", "start_array")
        depth -= event in ("end_map", "end_array")
        yield event, value


def _rest_of_array(events) -> Iterator[Tuple[str, object]]:
    """An array's events after its first item, to its ``end_array``."""
    for event, value in events:
        yield from _value_events(events, event, value)
        if event == "end_array":
            return


def _array_items(events, ijson) -> Iterator:
    """The items of an array whose ``start_array`` (and any items before) were read."""
    for event, value in events:
        if event == "end_array":
            return
        yield _built(_value_events(events, event, value), ijson)


def _built(events, ijson):
    builder = ijson.ObjectBuilder()
    for event, value in events:
        builder.event(event, value)
    return builder.value


class _Utf8Repaired(io.RawIOBase):
    """A byte stream passed on as valid UTF-8: each run of undecodable bytes becomes one
    U+FFFD, counted, as the JSON Lines path decodes (ijson's parser stops at the first)."""

    def __init__(self, stream, offset: int):
        self.stream, self.pending = stream, b""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.read_bytes, self.replaced, self.first_bad = offset, 0, None  # read_bytes: the file's offset
        self.held = ""  # the last characters read: an escape or a pair the next read completes may start there
        self.emitted, self.surrogates, self.first_surrogate = offset, 0, None
        self.valid_non_ascii, self.cp1252 = 0, True  # what tells Windows-1252 text from damaged UTF-8

    def _lone_escapes_replaced(self, text: str, final: bool) -> str:
        r"""``\ud83d`` alone becomes ``\ufffd``, of the same length (ijson's C parser stops
        at a lone surrogate); a valid pair stays. The last 11 characters wait for the next
        read unless ``final``."""
        text = self.held + text
        cut = len(text) if final else max(0, len(text) - 11)
        parts, done = [], 0
        for found in JSON_SURROGATE_ESCAPE.finditer(text):
            if found.end() > cut:
                cut = min(cut, found.start())
                break
            if len(found[0]) == 6:
                parts.append(text[done:found.start()])
                if self.first_surrogate is None:
                    self.first_surrogate = self.emitted + len("".join(parts).encode("utf-8", "surrogateescape"))
                parts.append("\\ufffd")
                done = found.end()
                self.surrogates += 1
        parts.append(text[done:cut])
        self.held, out = text[cut:], "".join(parts)
        self.emitted += len(out.encode("utf-8", "surrogateescape"))
        return out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.stream.read(len(buffer))
            text = self.decoder.decode(chunk, final=not chunk)
            text = self._lone_escapes_replaced(text, final=not chunk)
            bad = _ESCAPED_BYTES.search(text)
            if bad:  # surrogateescape turned each undecodable byte into one lone surrogate
                if self.first_bad is None:
                    self.first_bad = self.read_bytes + len(text[:bad.start()].encode("utf-8", "surrogateescape"))
                self.cp1252 = self.cp1252 and CP1252_UNDEFINED_ESCAPED.search(text) is None
                text, count = _ESCAPED_BYTES.subn("\ufffd", text)
                self.replaced += count
            if len(text) != len(chunk):  # valid multi-byte characters (or a replaced run) in this chunk
                self.valid_non_ascii += _count_non_ascii(text)
            self.read_bytes += len(chunk)
            self.pending = text.encode("utf-8")
            if not chunk:
                break
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
CP1252_UNDEFINED_ESCAPED = re.compile("[\udc81\udc8d\udc8f\udc90\udc9d]")  # CP1252_UNDEFINED, surrogate-escaped


CSV_DELIMITERS = (",", "\t", ";", "|")  # ";": the CSV of spreadsheets where the comma is the decimal mark


def _csv_delimiter(header: str, default: str) -> str:
    """The delimiter of a CSV file from its header line: the one its name says (``,``;
    ``.tsv``: tab) when the header holds it, else whichever of the others it holds most
    (a European spreadsheet's CSV is separated by ``;``)."""
    counts = {d: len(next(csv.reader([header], delimiter=d))) - 1 for d in CSV_DELIMITERS}
    if counts[default] or not any(counts.values()):
        return default
    return max(counts, key=counts.get)


def _csv(path: Union[Path, _Member], text_field: str, key: str, warn: list) -> Iterator[str]:
    """A CSV (TSV) file's ``text_field`` column, streamed in blocks by pyarrow. Quoted
    values may hold newlines; an empty value is skipped (CSV cannot tell it from null)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    delimiter = "\t" if _format_base(_file_name(path)) == ".tsv" else ","
    read = pa_csv.ReadOptions(block_size=16 << 20)
    skipped, kept, row = SkippedRecords(path, key, where="row"), 0, 0
    try:
        with _open_stream(path, key) as stream:
            head = stream.read(1 << 16)  # the header line: the delimiter, and the columns an error names
            while b"\n" not in head and len(head) < 1 << 24:  # a table of thousands of columns
                more = stream.read(1 << 16)
                if not more:
                    break
                head += more
            header = head.split(b"\n", 1)[0].decode("utf-8-sig", "replace").rstrip("\r")
            if not head.strip(codecs.BOM_UTF8 + b" \t\r\n"):
                return  # an empty file holds no rows, as an empty JSON Lines file holds no records
            delimiter = _csv_delimiter(header, delimiter)
            parse = pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
            names = next(csv.reader([header], delimiter=delimiter), [])
            if text_field not in names:
                raise DataError(_no_text_column(path, text_field, names, head, parse, key))
            stream = io.BufferedReader(_Replayed(head, stream))
            reader = pa_csv.open_csv(stream, read_options=read, parse_options=parse, convert_options=pa_csv.ConvertOptions(
                column_types={text_field: pa.binary()}, include_columns=[text_field]))  # bytes: a bad one is no stop
            for batch in reader:
                for value in batch.column(0).to_pylist():
                    value = value if value is None else _decode_counted(value, skipped, row)
                    if value and value.strip():
                        kept += 1
                        yield value
                    else:
                        skipped.skip(f"with an empty or blank {text_field!r}", row, kept)
                    row += 1
    except (pa.ArrowInvalid, KeyError) as err:
        what = " ".join(str(err).split())[:300]  # pyarrow quotes the offending row, newlines and all
        kind = {"\t": "TSV", ",": "CSV"}.get(delimiter, f"CSV separated by {delimiter!r}")
        raise DataError(f"{key}: {path} does not read as {kind} after row {row:,} ({what}). "
                        "Fix: repair or re-download it.") from err
    except Exception as err:
        _raise_if_damaged(path, err, f" after row {row:,}", key)
        raise
    skipped.finish(kept, warn)


def _no_text_column(path, text_field: str, names: List[str], head: bytes, parse, key: str) -> str:
    """The error for a CSV file without the text column: its text columns (the types pyarrow
    infers from the first 64 KB) as the fix, and a header row that looks like data named."""
    import pyarrow.csv as pa_csv

    try:
        schema = pa_csv.open_csv(io.BytesIO(head[:head.rfind(b"\n") + 1] or head), parse_options=parse).schema
        strings = [f.name for f in schema if str(f.type) in ("string", "large_string")]
    except Exception:  # a first block that does not parse: the names alone
        strings = []
    same = [n for n in names if n.lower() == text_field.lower()]
    fix = f"data.text_field={same[0]}." if len(same) == 1 else _text_field_fix(strings, "column") + "."
    data_like = [n for n in names if n.strip().lstrip("-").replace(".", "", 1).isdigit() or len(n) > 64]
    if data_like and not same:
        fix = (f"its first row looks like data, not column names ({data_like[0][:40]!r}): if the file has no "
               f"header row, add one naming the columns ({text_field} for the text) as its first line; "
               f"otherwise {fix[0].lower()}{fix[1:]}")
    return f"{key}: {path} has no column {text_field!r} (it has {[n[:64] for n in names[:16]]}). Fix: {fix}"


def _batch_rows(row_bytes: float) -> int:
    return int(min(ROW_BATCH_ROWS, max(1, ROW_BATCH_BYTES // max(1.0, row_bytes))))


def _dataset_values(dataset, names: List[str], start: int, stop: int, path: Path, key: str) -> Iterator:
    """Rows ``start`` to ``stop`` of a datasets folder's text column, made Python strings a
    batch at a time (the folder is memory-mapped; 50,000 books at once would be tens of GB of
    strings)."""
    try:
        table = dataset.select_columns([names[0]]).with_format("arrow")[start:stop]
        column = _leaf(table.column(0), names)
        step = _batch_rows(column.nbytes / max(1, len(column)))
        for first in range(0, len(column), step):
            yield from _python_values(column.slice(first, step))  # as parquet's: Arrow checks no UTF-8
    except Exception as err:  # a damaged Arrow file fails here, not at load_from_disk
        raise DataError(f"{key}: the datasets folder {str(path)!r} is damaged: rows {start:,}- do not read "
                        f"({err}). Fix: save it again, or remove it from the source.") from err


def _row_group_values(path: Path, group: int, text_field: str, key: str) -> Iterator:
    """The text column of one row group, a batch of rows at a time. Read whole, a row group
    cost about five times its text in memory (1.05 GB for one of 204 MB of text; pandas'
    ``to_parquet`` writes a million rows a group): streamed, 95 MB."""
    parquet = _parquet(path, key, streamed=True)
    names = _text_path(parquet.schema_arrow, path, text_field, key)
    meta = parquet.metadata.row_group(group)
    row_bytes = meta.total_byte_size / max(1, meta.num_rows)
    rows = _batch_rows(row_bytes)
    try:
        for batch in parquet.iter_batches(batch_size=rows, row_groups=[group], columns=[names[0]]):
            yield from _python_values(_leaf(batch.column(0), names))
    except Exception as err:  # pyarrow raises OSError / ArrowInvalid for damaged pages
        raise DataError(f"{key}: {path} is damaged: row group {group} does not read ({err}). Fix: "
                        "re-download the file, or remove it from the source.") from err


def _parquet(path: Path, key: str, streamed: bool = False):
    """A parquet file opened; ``streamed``: read through a 1 MiB buffer, column chunks not
    fetched whole ahead of the rows (pyarrow's pre-buffering holds a row group's column)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) if streamed else pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError
        instead = stand_in(path, "a parquet file")
        raise DataError(f"{key}: {instead}" if instead else
                        f"{key}: {path} is not a readable parquet file ({err}). Fix: re-download it.") from err


def _load_dataset(path: Path, key: str):
    try:
        from datasets import load_from_disk

        return load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / assorted errors
        raise DataError(f"{key}: {str(path)!r} is not a readable datasets folder ({err}). Fix: point {key} at the "
                        "folder save_to_disk wrote (it holds dataset_info.json or dataset_dict.json).") from err


def _dataset_units(path: Path, key: str) -> List[Unit]:
    """A datasets folder's units: DATASET_UNIT_ROWS rows each, or fewer where its rows are long
    enough that this many would pass TEXT_UNIT_BYTES (a folder of 28,000 books, 11 GB, was one
    unit, prepared by one worker whatever the number of cores). Row sizes are read from the
    Arrow buffers' sizes (all columns), not from the rows; units of DATASET_UNIT_ROWS rows are
    listed as they were before 2026-12-05, so those plans are unchanged."""
    dataset = _load_dataset(path, key)
    rows = dataset.num_rows
    try:
        row_bytes = dataset.data.nbytes / max(1, rows)
    except Exception:  # no size to be had: the rows' count alone, as before
        row_bytes = 0.0
    per_unit = max(1, min(DATASET_UNIT_ROWS, int(TEXT_UNIT_BYTES // max(1.0, row_bytes))))
    if per_unit == DATASET_UNIT_ROWS or rows <= per_unit:
        return [Unit("dataset", (str(path),), part, size=0) for part in range(-(-rows // DATASET_UNIT_ROWS))]
    return [Unit("dataset", (str(path),), part, size=0, start=first, stop=min(rows, first + per_unit))
            for part, first in enumerate(range(0, rows, per_unit))]


def _strings(values, path: Path, text_field: str, key: str, warn: list, part: str = "") -> Iterator[str]:
    """The text of a column; nulls and empty strings are skipped and counted (one
    warning). A binary column (crawls that keep a page's bytes) is read as UTF-8, its
    undecodable bytes replaced and counted in one warning, as are those of a string column
    that holds bytes that are not UTF-8; any other non-string is one error."""
    skipped, kept = SkippedRecords(Path(f"{path}{part}"), key, where="row", table=True), 0
    for row, value in enumerate(values):
        if value is None:
            skipped.skip(f"with a null {text_field!r}", row, kept)
            continue
        if isinstance(value, bytes):
            value = _decode_counted(value, skipped, row)
        if not isinstance(value, str):
            if _is_conversation(value):
                raise DataError(f"{key}: {path} row {row}: {_chat_fix(text_field)}")
            hint = " (a list: join its items into one string per row first)" if isinstance(value, list) else ""
            raise DataError(f"{key}: {path} row {row}: {text_field!r} is {type(value).__name__}, not text{hint}. "
                            "Fix: set data.text_field to a text column.")
        if not value.strip():
            skipped.skip(f"with an empty or blank {text_field!r}", row, kept)
            continue
        kept += 1
        yield value
    skipped.finish(kept, warn)


