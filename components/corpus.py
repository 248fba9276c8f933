"""Reading pretraining corpora as documents, in the formats they ship in.

| what ``data.source`` names | read with | one document is |
|---|---|---|
| ``.txt``, ``.md``, ``.rst``, ``.text`` (or any file named directly) | Python | the whole file |
| ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` | ``gzip`` / ``zstandard``, streamed | a line's ``text_field`` |
| ``.parquet`` (FineWeb-Edu style shards) | ``pyarrow``, one row group at a time | a row's ``text_field`` |
| a Hugging Face ``datasets`` folder (``save_to_disk``) | ``datasets.load_from_disk`` (memory-mapped) | a row's ``text_field`` |

A folder is searched recursively for all of these. The corpus is cut into *units*: a
group of small text files, one JSONL file, one parquet row group, a range of rows of a
``datasets`` folder. A unit is the prepare step's piece of work and becomes one token
shard, so preparing is deterministic whatever the number of worker processes, and a
killed prepare redoes only unfinished units.

Why our own JSONL reader: a line-by-line stream over a compressed file needs constant
memory and can say at which line a damaged stream broke; ``datasets``' JSON builder
would first convert the whole file to Arrow in its cache.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from letrecipes.components.errors import LetRecipesError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
# Small text files are grouped into units of about this many bytes (one shard each).
TEXT_UNIT_BYTES = 64 * 2**20
READ_BLOCK = 4 * 2**20  # bytes read at a time from a text file
DATASET_UNIT_ROWS = 50_000


class DataError(LetRecipesError):
    """Bad data input, raised before training starts."""


class DataWarning(UserWarning):
    """Data was read with a documented recovery (e.g. non-UTF-8 bytes replaced)."""


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus: ``kind`` text (``paths`` read whole), jsonl, parquet (row
    group ``part``) or dataset (rows ``part * DATASET_UNIT_ROWS`` onwards of a folder)."""

    kind: str
    paths: Tuple[str, ...]
    part: int = 0
    size: int = 0  # bytes, for progress and ETA

    def describe(self) -> str:
        where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"
        return where + (f" [part {self.part}]" if self.kind in ("parquet", "dataset") else "")

    def to_dict(self) -> dict:
        return asdict(self)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in JSONL_SUFFIXES + (".parquet",):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _files(item: Path, key: str) -> List[Path]:
    if is_dataset_folder(item) or item.is_file():
        return [item]
    if not item.exists():
        raise DataError(
            f"{key}: {str(item)!r} does not exist (working directory {os.getcwd()!r}). Fix: set it to an existing "
            "text file, folder, .jsonl(.gz/.zst) or .parquet file, or a datasets folder"
            " (the demo corpus is made by `python -m letrecipes.demo --prepare-only`)."
        )
    found, dataset_dirs, other = [], [], {}
    for path in sorted(item.rglob("*")):
        if any(path.is_relative_to(d) for d in dataset_dirs):
            continue
        if is_dataset_folder(path):
            dataset_dirs.append(path)
            found.append(path)
        elif path.is_file() and _suffix(path) in TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",):
            found.append(path)
        elif path.is_file() and not any(part.startswith(".") for part in path.relative_to(item).parts):
            other.setdefault(path.suffix or "(no suffix)", []).append(path)
    if not found:
        raise DataError(f"{key}: folder {str(item)!r} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, "
                        ".parquet files or datasets folders.")
    if other:  # a folder of .csv files beside one .txt would otherwise train on the .txt alone, silently
        kinds = ", ".join(f"{len(paths)} {suffix}" for suffix, paths in sorted(other.items()))
        first = min(p for paths in other.values() for p in paths)
        warnings.warn(f"{key}: {sum(map(len, other.values()))} file(s) in {str(item)!r} are not read ({kinds}; "
                      f"first: {first.relative_to(item)}): only {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, .parquet "
                      "files and datasets folders are. Fix: none, if they are not text; otherwise convert them.",
                      DataWarning, stacklevel=2)
    return found


def source_files(source: Union[str, os.PathLike, Sequence], key: str = "data.source") -> List[Path]:
    """Every file (or datasets folder) a source names, in a fixed order."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise DataError(f"{key} is empty. Fix: point it at a text file, a folder, a .jsonl or .parquet file.")
    files: List[Path] = []
    for item in sources:
        files.extend(_files(Path(item).expanduser(), key))
    return files


def list_units(source, key: str = "data.source") -> List[Unit]:
    """The corpus as units, in the order their tokens are concatenated."""
    units: List[Unit] = []
    text_group: List[Path] = []

    def flush() -> None:
        if text_group:
            units.append(Unit("text", tuple(map(str, text_group)), size=sum(p.stat().st_size for p in text_group)))
            text_group.clear()

    for path in source_files(source, key):
        suffix = _suffix(path)
        if is_dataset_folder(path):
            flush()
            rows = _dataset_rows(path, key)
            units += [Unit("dataset", (str(path),), part, size=0) for part in range(-(-rows // DATASET_UNIT_ROWS))]
        elif suffix == ".parquet":
            flush()
            metadata = _parquet(path, key).metadata
            units += [Unit("parquet", (str(path),), i, size=metadata.row_group(i).total_byte_size)
                      for i in range(metadata.num_row_groups)]
        elif suffix in JSONL_SUFFIXES:
            flush()
            units.append(Unit("jsonl", (str(path),), size=path.stat().st_size))
        else:
            text_group.append(path)
            if sum(p.stat().st_size for p in text_group) >= TEXT_UNIT_BYTES:
                flush()
    flush()
    return units


def read_unit(unit: Unit, text_field: str = "text", key: str = "data.source",
              warn: Optional[list] = None) -> Iterator[str]:
    """The documents of ``unit``, in order. Recoveries (bad UTF-8) are appended to ``warn``
    as messages (workers send them back to the main process, which shows them)."""
    warn = [] if warn is None else warn
    if unit.kind == "text":
        for path in unit.paths:
            yield _decode(Path(path).read_bytes(), Path(path), key, warn)
    elif unit.kind == "jsonl":
        yield from _jsonl(Path(unit.paths[0]), text_field, key, warn)
    elif unit.kind == "parquet":
        path = Path(unit.paths[0])
        table = _parquet(path, key).read_row_group(unit.part, columns=[_column(path, text_field, key)])
        yield from _strings(table.column(0).to_pylist(), path, text_field, key, warn, f" (row group {unit.part})")
    elif unit.kind == "dataset":
        path = Path(unit.paths[0])
        dataset = _load_dataset(path, key)
        if text_field not in dataset.column_names:
            raise DataError(f"{key}: the datasets folder {str(path)!r} has no column {text_field!r} (it has "
                            f"{dataset.column_names}). Fix: set data.text_field to the column holding the text.")
        start = unit.part * DATASET_UNIT_ROWS
        rows = dataset.select_columns([text_field])[start:start + DATASET_UNIT_ROWS][text_field]
        yield from _strings(rows, path, text_field, key, warn, f" (rows {start:,}-)")
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def read_unit_in_pieces(unit: Unit, text_field: str = "text", key: str = "data.source",
                        warn: Optional[list] = None, piece_chars: Optional[int] = None) -> Iterator[Tuple[str, bool]]:
    """``(piece, ends_document)`` for the documents of ``unit``, in order. With
    ``piece_chars``, a document longer than that comes in pieces cut by
    :func:`safe_cuts`, and a text file is read in blocks: memory stays flat whatever the
    document's length (a JSONL or parquet record is still read whole). Without it, each
    document is one piece."""
    warn = [] if warn is None else warn
    if unit.kind == "text" and piece_chars:
        for path in unit.paths:
            yield from _stream_text(Path(path), key, warn, piece_chars)
        return
    for text in read_unit(unit, text_field, key, warn):
        pieces = safe_cuts(text, piece_chars) if piece_chars and len(text) > piece_chars else [text]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def _stream_text(path: Path, key: str, warn: list, piece_chars: int) -> Iterator[Tuple[str, bool]]:
    """A text file as pieces of one document, read and decoded a block at a time. Bad
    UTF-8 is replaced (U+FFFD) and reported as :func:`_decode` reports it."""
    strict, lenient = codecs.getincrementaldecoder("utf-8")(), None
    consumed, replaced, first_bad, carry = 0, 0, None, ""
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            final = not block
            if lenient is None:
                pending = strict.getstate()[0]
                try:
                    text = strict.decode(block, final=final)
                except UnicodeDecodeError as err:
                    first_bad = consumed - len(pending) + err.start
                    lenient = codecs.getincrementaldecoder("utf-8")(errors="replace")
                    text = lenient.decode(pending + block, final=final)
                    replaced += text.count("\ufffd")
            else:
                text = lenient.decode(block, final=final)
                replaced += text.count("\ufffd")
            consumed += len(block)
            carry += text
            if len(carry) > 2 * piece_chars or final:
                pieces = safe_cuts(carry, piece_chars)
                carry = "" if final else pieces.pop()
                for i, piece in enumerate(pieces):
                    yield piece, final and i == len(pieces) - 1
            if final:
                break
    if first_bad is not None:
        warn.append(f"{key}: {path} is not valid UTF-8 (first bad byte at offset {first_bad}); {replaced} "
                    "undecodable byte sequence(s) were replaced by U+FFFD.")


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


def read_documents(source, text_field: str = "text", key: str = "data.source") -> Iterator[str]:
    """Every document of a source, in order (for small corpora and tests)."""
    for unit in list_units(source, key):
        messages: list = []
        yield from read_unit(unit, text_field, key, messages)
        for message in messages:
            warnings.warn(message, DataWarning, stacklevel=2)


# ---------------------------------------------------------------- formats
def _decode(data: bytes, path: Path, key: str, warn: list, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        text = data.decode("utf-8", errors="replace")
        warn.append(f"{key}: {path}{where} is not valid UTF-8 (first bad byte at offset {err.start}); "
                    f"{text.count(chr(0xFFFD))} undecodable byte sequence(s) were replaced by U+FFFD.")
        return text


def _open_stream(path: Path, key: str):
    suffix = _suffix(path)
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix == ".jsonl.zst":
        try:
            import zstandard
        except ImportError as err:
            raise DataError(f"{key}: {path} is zstd-compressed, which needs the `zstandard` package. "
                            "Fix: pip install zstandard.") from err
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


class SkippedRecords:
    """Records that hold no text, counted per file (per row group for parquet) instead of
    stopping a long preparation: a JSONL line that does not parse (a file cut off mid-write
    ends in one), a record without the text field, a null text. They are reported once, as
    one warning with the counts and the first place. A file made mostly of such records is
    in another format, or its text is under another field: that is one error (after 100 bad
    records with none good, at once)."""

    FAST_FAIL = 100

    def __init__(self, path: Path, key: str, where: str = "line"):
        self.path, self.key, self.where = path, key, where
        self.counts: Dict[str, int] = {}
        self.fatal: Dict[str, int] = {}  # the kinds that say the file is misread, with their error
        self.first_at: Optional[int] = None
        self.first_error: Optional[str] = None

    def skip(self, reason: str, at: int, kept: int, error: Optional[str] = None) -> None:
        """Count one record; ``error`` is the message for when such records are (nearly) all
        the file holds. A null text never is: an empty record is valid data."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first_at = at if self.first_at is None else self.first_at
        if error is not None:
            self.fatal[reason] = self.fatal.get(reason, 0) + 1
            self.first_error = self.first_error or error
            if kept == 0 and sum(self.fatal.values()) >= self.FAST_FAIL:
                raise DataError(self.first_error)

    def finish(self, kept: int, warn: list) -> None:
        bad, fatal = sum(self.counts.values()), sum(self.fatal.values())
        if fatal and (kept == 0 or fatal > kept):
            raise DataError(f"{self.first_error} ({fatal:,} of {bad + kept:,} records are like this.)")
        if bad:
            parts = ", ".join(f"{n:,} {reason}" for reason, n in self.counts.items())
            warn.append(f"{self.key}: {self.path}: skipped {bad:,} of {bad + kept:,} records that hold no text "
                        f"({parts}; the first at {self.where} {self.first_at}). Fix: none, if they are meant to be "
                        "skipped; otherwise repair those records.")


def _jsonl(path: Path, text_field: str, key: str, warn: list) -> Iterator[str]:
    line_no, kept = 0, 0
    skipped = SkippedRecords(path, key)
    missing = f"without the field {text_field!r}"
    try:
        with _open_stream(path, key) as stream:
            for line_no, raw in enumerate(stream, 1):
                if not raw.strip():
                    continue
                line = _decode(raw, path, key, warn, where=f":{line_no}")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    skipped.skip("not valid JSON", line_no, kept, f"{key}: {path}:{line_no} is not valid JSON ({err}). "
                                 "Fix: a file of one JSON object per line, or rename it to .txt to read it as text.")
                    continue
                if not isinstance(record, dict) or text_field not in record:
                    skipped.skip(missing, line_no, kept, f"{key}: {path}:{line_no} has no field {text_field!r}. "
                                 "Fix: set data.text_field to the field holding the text.")
                    continue
                value = record[text_field]
                if value is None:
                    skipped.skip(f"with a null {text_field!r}", line_no, kept)
                    continue
                if not isinstance(value, str):
                    raise DataError(f"{key}: {path}:{line_no}: {text_field!r} is "
                                    f"{type(value).__name__}, not text. Fix: make it a string in that "
                                    "record, or set data.text_field to the field holding the text.")
                kept += 1
                yield value
        skipped.finish(kept, warn)
    except (OSError, EOFError, zlib.error) as err:
        yield from _stream_error(path, line_no, err, key)
    except Exception as err:  # zstandard.ZstdError is not an OSError
        if type(err).__name__ != "ZstdError":
            raise
        yield from _stream_error(path, line_no, err, key)


def _stream_error(path: Path, line_no: int, err: Exception, key: str) -> Iterator[str]:
    raise DataError(f"{key}: {path} is damaged: the compressed stream breaks after line {line_no} ({err}). "
                    "Fix: re-download the file, or remove it from the source.") from err
    yield  # a generator, so that the error is raised where the documents are read


def _parquet(path: Path, key: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError
        raise DataError(f"{key}: {path} is not a readable parquet file ({err}). Fix: re-download it.") from err


def _column(path: Path, text_field: str, key: str) -> str:
    names = _parquet(path, key).schema_arrow.names
    if text_field not in names:
        raise DataError(f"{key}: {path} has no column {text_field!r} (it has {names}). "
                        "Fix: set data.text_field to the column holding the text.")
    return text_field


def _load_dataset(path: Path, key: str):
    try:
        from datasets import load_from_disk

        return load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / assorted errors
        raise DataError(f"{key}: {str(path)!r} is not a readable datasets folder ({err}).") from err


def _dataset_rows(path: Path, key: str) -> int:
    return _load_dataset(path, key).num_rows


def _strings(values, path: Path, text_field: str, key: str, warn: list, part: str = "") -> Iterator[str]:
    """The text of a column; nulls are skipped and counted (one warning), any other
    non-string is one error."""
    skipped, kept = SkippedRecords(Path(f"{path}{part}"), key, where="row"), 0
    for row, value in enumerate(values):
        if value is None:
            skipped.skip(f"with a null {text_field!r}", row, kept)
            continue
        if not isinstance(value, str):
            raise DataError(f"{key}: {path} row {row}: {text_field!r} is {type(value).__name__}, not text. "
                            "Fix: set data.text_field to a text column.")
        kept += 1
        yield value
    skipped.finish(kept, warn)


