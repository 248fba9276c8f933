"""Reading pretraining corpora as documents, in the formats they ship in.

| what ``data.source`` names | read with | one document is |
|---|---|---|
| ``.txt``, ``.md``, ``.rst``, ``.text`` (or any file named directly) | Python | the whole file |
| ``.jsonl``, ``.ndjson``, ``.json`` (JSON Lines, or one JSON array of records) | Python, streamed | a record's ``text_field`` |
| ``.csv``, ``.tsv`` | ``pyarrow.csv``, streamed in blocks | a row's ``text_field`` column |
| ``.parquet`` (FineWeb-Edu style shards) | ``pyarrow``, one row group at a time | a row's ``text_field`` |
| a Hugging Face ``datasets`` folder (``save_to_disk``) | ``datasets.load_from_disk`` (memory-mapped) | a row's ``text_field`` |

Text, JSON and CSV files may be compressed: ``.gz``, ``.zst``, ``.bz2``, ``.xz`` after the
format's suffix (C4 and Dolma ship ``.json.gz``, the Pile and SlimPajama ``.jsonl.zst``).

A folder is searched recursively for all of these. The corpus is cut into *units*: a
group of small text files, one JSON or CSV file, one parquet row group, a range of rows of
a ``datasets`` folder. A unit is the prepare step's piece of work and becomes one token
shard, so preparing is deterministic whatever the number of worker processes, and a
killed prepare redoes only unfinished units.

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
import gzip
import io
import json
import lzma
import os
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from letrecipes.components.errors import LetRecipesError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
# What a folder is searched for, as error messages name it.
FORMATS = (f"text ({' '.join(TEXT_SUFFIXES)}), JSON ({' '.join(JSON_SUFFIXES)}), CSV ({' '.join(CSV_SUFFIXES)}) "
           f"files, each optionally compressed ({' '.join(COMPRESSIONS)}), .parquet files or datasets folders")
BINARY_SNIFF = 8000  # bytes looked at for a NUL byte, as git does
# Raised when the same files read as other documents, so that caches are prepared again
# (2: byte-order marks honoured, binary files and empty documents skipped).
READER_VERSION = 2
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
    """A piece of the corpus: ``kind`` text (``paths`` read whole), jsonl (any JSON file),
    csv, parquet (row group ``part``) or dataset (rows ``part * DATASET_UNIT_ROWS`` onwards of a folder)."""

    kind: str
    paths: Tuple[str, ...]
    part: int = 0
    size: int = 0  # bytes, for progress and ETA

    def describe(self) -> str:
        where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"
        return where + (f" [part {self.part}]" if self.kind in ("parquet", "dataset") else "")

    def to_dict(self) -> dict:
        return asdict(self)


def _compression(path: Path) -> str:
    return next((c for c in COMPRESSIONS if path.name.lower().endswith(c)), "")


def _format_base(path: Path) -> str:
    """The format's suffix, under any compression suffix: ``.json`` for ``c4.json.gz``."""
    name = path.name.lower()
    return Path(name[:len(name) - len(_compression(path))]).suffix


def _format(path: Path) -> Tuple[Optional[str], str]:
    """``(kind, compression)`` of a file from its name: kind is text, jsonl, csv, parquet or
    None (not a corpus format); compression is one of COMPRESSIONS or ""."""
    compression, base = _compression(path), _format_base(path)
    if base == ".parquet" and not compression:
        return "parquet", ""
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSON_SUFFIXES), ("csv", CSV_SUFFIXES)):
        if base in suffixes:
            return kind, compression
    return None, compression


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _files(item: Path, key: str) -> List[Path]:
    if is_dataset_folder(item) or item.is_file():
        return [item]
    if not item.exists():
        raise DataError(
            f"{key}: {str(item)!r} does not exist (working directory {os.getcwd()!r}). Fix: set it to an existing "
            "text, JSON, CSV or parquet file, a folder of them, or a datasets folder"
            " (the demo corpus is made by `python -m letrecipes.demo --prepare-only`)."
        )
    found, dataset_dirs, other = [], [], {}
    for path in sorted(item.rglob("*")):
        if any(path.is_relative_to(d) for d in dataset_dirs):
            continue
        if is_dataset_folder(path):
            dataset_dirs.append(path)
            found.append(path)
        elif not path.is_file() or any(part.startswith(".") for part in path.relative_to(item).parts):
            continue  # hidden: macOS's ._name.txt resource forks, caches, version control
        elif _format(path)[0]:
            found.append(path)
        else:
            other.setdefault(path.suffix or "(no suffix)", []).append(path)
    if not found:
        raise DataError(f"{key}: folder {str(item)!r} holds none of the formats read: {FORMATS}. Fix: point "
                        f"{key} at the folder holding the corpus, or convert it to one of them.")
    if other:  # a folder of .doc files beside one .txt would otherwise train on the .txt alone, silently
        kinds = ", ".join(f"{len(paths)} {suffix}" for suffix, paths in sorted(other.items()))
        first = min(p for paths in other.values() for p in paths)
        warnings.warn(f"{key}: {sum(map(len, other.values()))} file(s) in {str(item)!r} are not read ({kinds}; "
                      f"first: {first.relative_to(item)}): only {FORMATS} are. Fix: none, if they are not text; "
                      "otherwise convert them.",
                      DataWarning, stacklevel=2)
    return found


def source_files(source: Union[str, os.PathLike, Sequence], key: str = "data.source") -> List[Path]:
    """Every file (or datasets folder) a source names, in a fixed order."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise DataError(f"{key} is empty. Fix: point it at a corpus: {FORMATS}, or a folder of them.")
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
        kind, _ = _format(path)
        if is_dataset_folder(path):
            flush()
            rows = _dataset_rows(path, key)
            units += [Unit("dataset", (str(path),), part, size=0) for part in range(-(-rows // DATASET_UNIT_ROWS))]
        elif kind == "parquet":
            flush()
            metadata = _parquet(path, key).metadata
            units += [Unit("parquet", (str(path),), i, size=metadata.row_group(i).total_byte_size)
                      for i in range(metadata.num_row_groups)]
        elif kind in ("jsonl", "csv"):
            flush()
            units.append(Unit(kind, (str(path),), size=path.stat().st_size))
        else:
            text_group.append(path)
            if sum(p.stat().st_size for p in text_group) >= TEXT_UNIT_BYTES:
                flush()
    flush()
    return units


def read_unit(unit: Unit, text_field: str = "text", key: str = "data.source",
              warn: Optional[list] = None) -> Iterator[str]:
    """The documents of ``unit``, in order. Recoveries (bad UTF-8, skipped records) are
    appended to ``warn`` as messages (workers send them back to the main process, which
    shows them)."""
    warn = [] if warn is None else warn
    if unit.kind == "text":
        for path in unit.paths:
            text = _read_text(Path(path), key, warn)
            if text:
                yield text
    elif unit.kind == "jsonl":
        yield from _json_records(Path(unit.paths[0]), text_field, key, warn)
    elif unit.kind == "csv":
        yield from _csv(Path(unit.paths[0]), text_field, key, warn)
    elif unit.kind == "parquet":
        path = Path(unit.paths[0])
        column = _column(path, text_field, key)
        try:
            table = _parquet(path, key).read_row_group(unit.part, columns=[column])
        except Exception as err:  # pyarrow raises OSError / ArrowInvalid for damaged pages
            raise DataError(f"{key}: {path} is damaged: row group {unit.part} does not read ({err}). Fix: "
                            "re-download the file, or remove it from the source.") from err
        yield from _strings(table.column(0).to_pylist(), path, text_field, key, warn, f" (row group {unit.part})")
    elif unit.kind == "dataset":
        path = Path(unit.paths[0])
        dataset = _load_dataset(path, key)
        if text_field not in dataset.column_names:
            raise DataError(f"{key}: the datasets folder {str(path)!r} has no column {text_field!r} (it has "
                            f"{dataset.column_names}). Fix: set data.text_field to the column holding the text.")
        start = unit.part * DATASET_UNIT_ROWS
        try:
            rows = dataset.select_columns([text_field])[start:start + DATASET_UNIT_ROWS][text_field]
        except Exception as err:  # a damaged Arrow file fails here, not at load_from_disk
            raise DataError(f"{key}: the datasets folder {str(path)!r} is damaged: rows {start:,}- do not read "
                            f"({err}). Fix: save it again, or remove it from the source.") from err
        yield from _strings(rows, path, text_field, key, warn, f" (rows {start:,}-)")
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def read_unit_in_pieces(unit: Unit, text_field: str = "text", key: str = "data.source",
                        warn: Optional[list] = None, piece_chars: Optional[int] = None) -> Iterator[Tuple[str, bool]]:
    """``(piece, ends_document)`` for the documents of ``unit``, in order. With
    ``piece_chars``, a document longer than that comes in pieces cut by
    :func:`safe_cuts`, and a text file is read in blocks: memory stays flat whatever the
    document's length (a JSON, CSV or parquet record is still read whole). Without it,
    each document is one piece."""
    warn = [] if warn is None else warn
    if unit.kind == "text" and piece_chars:
        for path in unit.paths:
            yield from _stream_text(Path(path), key, warn, piece_chars)
        return
    for text in read_unit(unit, text_field, key, warn):
        pieces = safe_cuts(text, piece_chars) if piece_chars and len(text) > piece_chars else [text]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def _text_encoding(head: bytes) -> Optional[str]:
    """The codec of a text file that starts with ``head``; None when it is binary."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE starts both
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if b"\0" in head[:BINARY_SNIFF]:
        return None
    return "utf-8-sig"  # UTF-8, its byte-order mark dropped when there is one


def _binary(path: Path, key: str) -> str:
    return (f"{key}: {path} is skipped: it looks binary (a NUL byte in its first {BINARY_SNIFF:,} bytes and no "
            "byte-order mark). Fix: none, if it is not text; if it is UTF-16 or UTF-32 without a byte-order mark, "
            "convert it to UTF-8.")


def _read_text(path: Path, key: str, warn: list) -> str:
    """A whole text file, decoded ("" for a binary one, with a warning)."""
    try:
        with _open_stream(path, key) as stream:
            data = stream.read()
    except Exception as err:
        _raise_if_damaged(path, err, "", key)
        raise
    encoding = _text_encoding(data)
    if encoding is None:
        warn.append(_binary(path, key))
        return ""
    return _decode(data, path, key, warn, encoding=encoding)


def _stream_text(path: Path, key: str, warn: list, piece_chars: int) -> Iterator[Tuple[str, bool]]:
    """A text file as pieces of one document, read and decoded a block at a time. Bad
    bytes are replaced (U+FFFD) and reported as :func:`_decode` reports them; a binary file
    or an empty one yields nothing."""
    strict = lenient = None
    consumed, replaced, first_bad, carry, chars = 0, 0, None, "", 0
    try:
        with _open_stream(path, key) as f:
            while True:
                block = f.read(READ_BLOCK)
                final = not block
                if strict is None:
                    encoding = _text_encoding(block)
                    if encoding is None:
                        warn.append(_binary(path, key))
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
                else:
                    text = lenient.decode(block, final=final)
                    replaced += text.count("\ufffd")
                consumed += len(block)
                carry += text
                chars += len(text)
                if final and not chars:
                    break  # an empty file is no document
                if len(carry) > 2 * piece_chars or final:
                    pieces = safe_cuts(carry, piece_chars)
                    carry = "" if final else pieces.pop()
                    for i, piece in enumerate(pieces):
                        yield piece, final and i == len(pieces) - 1
                if final:
                    break
    except Exception as err:
        _raise_if_damaged(path, err, f" after {consumed:,} bytes", key)
        raise
    if first_bad is not None:
        warn.append(f"{key}: {path} is not valid {_codec_name(encoding)} (first bad byte at offset {first_bad}); "
                    f"{replaced} undecodable byte sequence(s) were replaced by U+FFFD.")


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
def _codec_name(encoding: str) -> str:
    return {"utf-8-sig": "UTF-8", "utf-8": "UTF-8"}.get(encoding, encoding.upper())


def _decode(data: bytes, path: Path, key: str, warn: list, where: str = "", encoding: str = "utf-8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        text = data.decode(encoding, errors="replace")
        warn.append(f"{key}: {path}{where} is not valid {_codec_name(encoding)} (first bad byte at offset "
                    f"{err.start}); {text.count(chr(0xFFFD))} undecodable byte sequence(s) were replaced by U+FFFD.")
        return text


def _open_stream(path: Path, key: str):
    """``path`` opened for reading bytes, decompressed as its name says."""
    compression = _compression(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raise DataError(f"{key}: {path} is zstd-compressed, which needs the `zstandard` package. "
                            "Fix: pip install zstandard.") from err
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _raise_if_damaged(path: Path, err: Exception, where: str, key: str) -> None:
    """One error for a compressed stream that breaks (truncated, corrupt); other errors
    are left to the caller."""
    broken = isinstance(err, (EOFError, zlib.error, lzma.LZMAError)) or type(err).__name__ == "ZstdError" or (
        isinstance(err, OSError) and _compression(path) and err.errno is None)  # gzip/bz2's own errors carry no errno
    if broken:
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

    def __init__(self, path: Path, key: str, where: str = "line"):
        self.path, self.key, self.where = path, key, where
        self.counts: Dict[str, int] = {}
        self.fatal: Dict[str, int] = {}  # the kinds that say the file is misread, with their error
        self.first_at: Optional[int] = None
        self.first_error: Optional[str] = None

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

    def finish(self, kept: int, warn: list) -> None:
        bad, fatal = sum(self.counts.values()), sum(self.fatal.values())
        if fatal and (kept == 0 or fatal > kept):
            raise DataError(f"{self.first_error} ({fatal:,} of {bad + kept:,} records are like this.)")
        if bad:
            parts = ", ".join(f"{n:,} {reason}" for reason, n in self.counts.items())
            warn.append(f"{self.key}: {self.path}: skipped {bad:,} of {bad + kept:,} records that hold no text "
                        f"({parts}; the first at {self.where} {self.first_at}). Fix: none, if they are meant to be "
                        "skipped; otherwise repair those records.")


def _record_text(record, text_field: str, place: str, at: int, skipped: "SkippedRecords", kept: int,
                 key: str) -> Optional[str]:
    """The text of one JSON record; None when it holds none (counted in ``skipped``)."""
    if not isinstance(record, dict) or text_field not in record:
        has = f"its fields are {list(record)[:8]}" if isinstance(record, dict) else f"it is a JSON {type(record).__name__}"
        skipped.skip(f"without the field {text_field!r}", at, kept, f"{key}: {place} has no field {text_field!r} "
                     f"({has}). Fix: set data.text_field to the field holding the text.")
        return None
    value = record[text_field]
    if value is None:
        skipped.skip(f"with a null {text_field!r}", at, kept)
        return None
    if not isinstance(value, str):
        raise DataError(f"{key}: {place}: {text_field!r} is {type(value).__name__}, not text. Fix: make it a "
                        "string in that record, or set data.text_field to the field holding the text.")
    if not value:
        skipped.skip(f"with an empty {text_field!r}", at, kept)
        return None
    return value


def _json_records(path: Path, text_field: str, key: str, warn: list) -> Iterator[str]:
    """JSON Lines, streamed; a file whose first character is ``[`` is one JSON array of
    records instead (read whole: it cannot be streamed without a parser of our own)."""
    line_no, kept = 0, 0
    skipped = SkippedRecords(path, key)
    try:
        with _open_stream(path, key) as stream:
            for line_no, raw in enumerate(stream, 1):
                if line_no == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue
                if not kept and not skipped.counts and raw.lstrip().startswith(b"["):
                    yield from _json_array(path, raw + stream.read(), text_field, key, warn)
                    return
                line = _decode(raw, path, key, warn, where=f":{line_no}")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    skipped.skip("not valid JSON", line_no, kept, f"{key}: {path}:{line_no} is not valid JSON ({err}). "
                                 "Fix: JSON Lines (one object per line) or one JSON array of objects; or rename the "
                                 "file to .txt to read it as text.")
                    continue
                text = _record_text(record, text_field, f"{path}:{line_no}", line_no, skipped, kept, key)
                if text is not None:
                    kept += 1
                    yield text
        skipped.finish(kept, warn)
    except Exception as err:
        _raise_if_damaged(path, err, f" after line {line_no}", key)
        raise


def _json_array(path: Path, data: bytes, text_field: str, key: str, warn: list) -> Iterator[str]:
    try:
        records = json.loads(_decode(data, path, key, warn))
    except json.JSONDecodeError as err:
        raise DataError(f"{key}: {path} starts like a JSON array but is not valid JSON ({err}). Fix: repair or "
                        "re-download it; JSON Lines (one object per line) can also be read.") from err
    skipped, kept = SkippedRecords(path, key, where="record"), 0
    for i, record in enumerate(records):
        text = _record_text(record, text_field, f"{path} record {i}", i, skipped, kept, key)
        if text is not None:
            kept += 1
            yield text
    skipped.finish(kept, warn)


def _csv(path: Path, text_field: str, key: str, warn: list) -> Iterator[str]:
    """A CSV (TSV) file's ``text_field`` column, streamed in blocks by pyarrow. Quoted
    values may hold newlines; an empty value is skipped (CSV cannot tell it from null)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    delimiter = "\t" if _format_base(path) == ".tsv" else ","
    parse = pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    read = pa_csv.ReadOptions(block_size=16 << 20)
    skipped, kept, row = SkippedRecords(path, key, where="row"), 0, 0
    try:
        with _open_stream(path, key) as stream:
            reader = pa_csv.open_csv(stream, read_options=read, parse_options=parse, convert_options=pa_csv.ConvertOptions(
                column_types={text_field: pa.string()}, include_columns=[text_field]))
            for batch in reader:
                for value in batch.column(0).to_pylist():
                    if value:
                        kept += 1
                        yield value
                    else:
                        skipped.skip(f"with an empty {text_field!r}", row, kept)
                    row += 1
    except (pa.ArrowInvalid, KeyError) as err:
        if row == 0 and text_field in str(err):
            raise DataError(f"{key}: {path} has no column {text_field!r} (it has {_csv_header(path, parse, key)}). "
                            "Fix: set data.text_field to the column holding the text.") from err
        what = " ".join(str(err).split())[:300]  # pyarrow quotes the offending row, newlines and all
        raise DataError(f"{key}: {path} does not read as {'TSV' if delimiter == chr(9) else 'CSV'} after row {row:,} "
                        f"({what}). Fix: repair or re-download it.") from err
    except Exception as err:
        _raise_if_damaged(path, err, f" after row {row:,}", key)
        raise
    skipped.finish(kept, warn)


def _csv_header(path: Path, parse, key: str) -> List[str]:
    import pyarrow.csv as pa_csv

    with _open_stream(path, key) as stream:
        return pa_csv.open_csv(stream, parse_options=parse).schema.names


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
    """The text of a column; nulls and empty strings are skipped and counted (one
    warning), any other non-string is one error."""
    skipped, kept = SkippedRecords(Path(f"{path}{part}"), key, where="row"), 0
    for row, value in enumerate(values):
        if value is None:
            skipped.skip(f"with a null {text_field!r}", row, kept)
            continue
        if not isinstance(value, str):
            raise DataError(f"{key}: {path} row {row}: {text_field!r} is {type(value).__name__}, not text. "
                            "Fix: set data.text_field to a text column.")
        if not value:
            skipped.skip(f"with an empty {text_field!r}", row, kept)
            continue
        kept += 1
        yield value
    skipped.finish(kept, warn)


