"""The prepare step: a corpus in any supported format -> token shards + a manifest.

    letrecipes prepare-data --config let_7b --out /data/fineweb-smollm2 --workers 16

Layout of a prepared folder::

    manifest.json          written last: its presence means the folder is complete
    plan.json              the units to prepare and the settings (checked on a rerun)
    shard_000000.bin       the token ids of unit 0, each document followed by EOS
    shard_000000.keys.npy  its documents' keys (components/document_keys.py)
    shard_000000.json      its token and document counts (written after the .bin and keys)

Each unit of the corpus (``corpus.list_units``) becomes one shard, written to a temporary
file named after the host and process, then renamed: a killed prepare leaves finished
shards and temporary files only, and the same command finishes the job without redoing
finished shards. Shards are the same bytes whatever the number of workers.

Small corpora (a folder of text files, one JSONL) need no explicit step: the recipes
prepare them into ``data.cache_dir`` under a name derived from the tokenizer and the
files (:func:`cached_prepare`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from letrecipes.components.corpus import (DOCUMENT_SEPARATOR, PREPARED_MANIFEST, PREPARED_PLAN, READER_VERSION,
                                          DataError, DataWarning, Unit, bytes_read, list_units, read_unit_in_pieces,
                                          source_files)
from letrecipes.components.document_keys import (KEYS_SUFFIX, MIN_TOKENS, StoredKeys, copies_to_drop, count_repeats,
                                                 drop_from_shard, keys_path, stored_keys, write_shard_keys)
from letrecipes.components.errors import LetRecipesError
from letrecipes.components.files import (check_writable_folder, environment_errors, first_names, real_paths,
                                         replace_atomically, unique_tmp, usable_cores)
from letrecipes.components.preemption import NOTICE_SIGNALS
from letrecipes.components.progress import elapsed_and_eta
from letrecipes.components.tokenizer import Tokenizer

MANIFEST = PREPARED_MANIFEST
PLAN = PREPARED_PLAN
# A cache's shards as last found sound (read whole) or written: {vocab_size, files: {name: [size,
# mtime_ns]}}. A launch reads in full only the shards changed since, not the whole cache.
VERIFIED = "verified.json"
FORMAT_VERSION = 1
DOCS_PER_BATCH = 256
# The lock that lets one process of all the nodes sharing a cache folder prepare it: its holder
# touches it every LOCK_HEARTBEAT_S; one whose time has not moved for LOCK_STALE_S is taken over.
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 180.0
UNKNOWN_LIMIT = 0.01  # of a corpus's tokens that may be the unknown token before the prepare warns
# characters of the corpus's start encoded and decoded to see whether the tokenizer loses some, and
# the share of them it may lose (each not spelt, with no unknown token to say so) before it warns
VANISH_SAMPLE_CHARS, VANISH_LIMIT = 200_000, 0.01
REPEAT_LIMIT = 0.01  # of a corpus's tokens that may be in copies of its documents before the prepare warns
PIECE_CHARS = 1 << 18  # a longer document is encoded in pieces of about this many characters
KEPT_WARNINGS = 10  # warnings of a unit kept in its shard's .json
BATCH_CHARS = 1 << 22  # characters per encode call: ~700 MB of encodings at most
RANGE_CHECK_BLOCK = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """16-bit ids where the vocabulary fits, else 32-bit."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:06d}"


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _shard_done(out_dir: Path, index: int, itemsize: int) -> Optional[dict]:
    meta_path = out_dir / f"{shard_name(index)}.json"
    data_path = out_dir / f"{shard_name(index)}.bin"
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if _record_problem(meta) or "documents" not in meta:  # edited or damaged since: the shard is prepared again
        return None
    return meta if data_path.stat().st_size == meta["tokens"] * itemsize else None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _record_problem(record) -> Optional[str]:
    """What is wrong with a shard's record (``shard_N.json``, or its entry in the manifest)."""
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or not _count(record.get("tokens")) \
            or not _count(record.get("documents", 0)):
        return "is not {file, tokens, documents}"
    if not SHARD_NAME.fullmatch(record["file"]):
        return f"names {record['file']!r}, not a shard_N.bin of the folder"
    for key in ("unknown_tokens", "warning_count", "dropped_documents", "dropped_tokens"):
        if not _count(record.get(key, 0)):
            return f"has {key}={record[key]!r}, not a count"
    if not isinstance(record.get("first_warnings", []), list) or not all(
            isinstance(m, str) for m in record.get("first_warnings", [])):
        return "has first_warnings that are not a list of messages"
    return None


def size_problem(path: Path, expected: int) -> Optional[str]:
    """``is missing`` / ``has N bytes where the manifest says M``, or None when it fits."""
    size = path.stat().st_size if path.is_file() else None
    if size == expected:
        return None
    return "is missing" if size is None else f"has {size:,} bytes where the manifest says {expected:,}"


SHARD_NAME = re.compile(r"shard_\d+\.bin")


def load_manifest(folder: Union[str, Path]) -> Dict[str, Any]:
    """A prepared folder's ``manifest.json``, its shape checked (a hand-edited or foreign file
    that parses as JSON would otherwise fail later as a KeyError); ValueError says what is
    wrong. Shard names must be the folder's own ``shard_N.bin``: a manifest cannot point a
    run at files elsewhere."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(problem)
    return manifest


def _manifest_problem(manifest) -> Optional[str]:
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not a manifest's object"
    missing = [k for k in ("tokens", "dtype", "tokenizer", "shards") if k not in manifest]
    if missing:
        return f"it has no {', '.join(missing)} (its keys: {sorted(manifest)[:10]})"
    try:
        dtype = np.dtype(manifest["dtype"])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "ui":
        return f"its dtype {manifest['dtype']!r} is not an integer type"
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict) or not all(k in tokenizer for k in ("fingerprint", "path", "vocab_size", "eos_id")) \
            or not _count(tokenizer["vocab_size"]) or not _count(tokenizer["eos_id"]):
        return "its tokenizer entry is not {fingerprint, path, vocab_size, eos_id}"
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        return "its shards entry is not a list of shards"
    for i, shard in enumerate(shards):
        problem = _record_problem(shard)
        if problem:
            return f"shard {i} {problem}"
    if not _count(manifest["tokens"]) or manifest["tokens"] != sum(s["tokens"] for s in shards):
        return f"its tokens {manifest['tokens']!r} are not the sum of its shards' ({sum(s['tokens'] for s in shards):,})"
    if not _count(manifest.get("unknown_tokens", 0)):
        return f"its unknown_tokens {manifest['unknown_tokens']!r} is not a count"
    repeats = manifest.get("repeats")  # absent in folders prepared before 2026-12-04
    if repeats is not None:
        if not isinstance(repeats, dict) or not all(_count(repeats.get(k))
                                                    for k in ("documents", "copies", "copy_tokens")):
            return "its repeats entry is not {documents, copies, copy_tokens, shared}"
        shared = repeats.get("shared", [])
        if not isinstance(shared, list) or not all(
                isinstance(s, list) and len(s) == 4 and all(map(_count, s)) and max(s[:2]) < len(shards)
                for s in shared):
            return "its repeats.shared is not a list of [shard, shard, documents, tokens]"
    plan = manifest.get("plan") or {}
    if not isinstance(plan, dict) or not isinstance(plan.get("units", []), list):
        return "its plan entry is not {units: [...], ...}"
    return None


def damaged_shards(folder: Path, vocab_size: int, verified: Optional[dict] = None) -> List[str]:
    """What is wrong with a prepared folder's shards: a size other than the manifest's, an
    id outside the vocabulary (read in blocks: memory stays flat), a keys file that does not
    read (one that is missing is an older prepare's, not damage). Empty: it is sound.
    For caches, which are rebuilt when damaged; a full read, at disk speed, except of the
    shards ``verified`` (:func:`read_verified`) lists unchanged, whose sizes alone are checked."""
    try:
        manifest = load_manifest(folder)
        dtype = np.dtype(manifest["dtype"])
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{MANIFEST} is unreadable ({err})"]
    problems = []
    for shard in shards:
        path = Path(folder) / shard["file"]
        wrong_size = size_problem(path, shard["tokens"] * dtype.itemsize)
        if wrong_size:
            problems.append(f"{shard['file']} {wrong_size}")
            continue
        if verified and all(verified.get(p.name) == _stamp(p) for p in (path, keys_path(path)) if p.exists()):
            continue
        keys = keys_path(path)
        if keys.exists() and stored_keys(folder, [shard]) is None:
            problems.append(f"{keys.name} does not read")
        with open(path, "rb") as f:
            while block := f.read(RANGE_CHECK_BLOCK):
                if np.frombuffer(block, dtype=dtype).max(initial=0) >= vocab_size:
                    problems.append(f"{shard['file']} holds token ids >= the vocabulary size {vocab_size}")
                    break
    return problems


def _stamp(path: Path) -> Optional[List[int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def read_verified(folder: Path, vocab_size: int) -> dict:
    """``{file name: [size, mtime_ns]}`` of the shards and keys files last found sound for this
    vocabulary; empty when there is no record (every shard is then read in full)."""
    try:
        record = json.loads((Path(folder) / VERIFIED).read_text())
        return dict(record["files"]) if record.get("vocab_size") == vocab_size else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_verified(folder: Path, vocab_size: int) -> None:
    """Record the folder's shards as sound, as they are now. Kept from a read-only cache (a
    shared one that another user prepared): its launches then read it in full, as before."""
    try:
        manifest = load_manifest(folder)
        files = {}
        for shard in manifest["shards"]:
            for path in (Path(folder) / shard["file"], keys_path(Path(folder) / shard["file"])):
                if (stamp := _stamp(path)) is not None:
                    files[path.name] = stamp
        if read_verified(folder, vocab_size) != files:
            replace_atomically(Path(folder) / VERIFIED, json.dumps({"vocab_size": vocab_size, "files": files}))
    except (OSError, ValueError, KeyError):
        pass


_WORKER_TOKENIZER: Dict[tuple, Tokenizer] = {}


def _worker_threads(threads: int) -> None:
    # `tokenizers` batches on every core by itself; N workers each doing so would thrash. Each
    # worker gets its share of the --workers budget instead: one thread when there are units
    # for every worker, more when there are fewer units than workers (three units of a file on
    # 32 workers: 3 processes of 10 threads, not 3 single threads beside 29 idle cores).
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    # Ctrl-C reaches every process of the terminal's group (and Slurm's --signal=USR1 every
    # process of the job): the parent stops the workers (one line); each worker printing its own
    # KeyboardInterrupt traceback would bury it, and one killed by SIGUSR1 would be a broken pool
    for notice in (signal.SIGINT, *NOTICE_SIGNALS):
        signal.signal(notice, signal.SIG_IGN)


# This process's row of an UnitsUnderWay table, while it prepares units: (values, offset).
_UNDER_WAY_ROW: Optional[tuple] = None


class UnitsUnderWay:
    """How far the units being prepared have got, between finished shards (one unit can be
    a 15 GB compressed file: hours): a row per worker process of (unit index + 1, bytes of
    the corpus read, tokens written), in shared memory when the units run in spawned
    processes. A worker writes its row after each encode batch; the parent reads the rows."""

    WIDTH = 3

    def __init__(self, rows: int, shared: bool):
        context = get_context("spawn")
        size = self.WIDTH * rows
        self.values = context.Array("q", size, lock=False) if shared else [0] * size
        self.next_row = context.Value("i", 0) if shared else None

    def rows(self) -> List[tuple]:
        values = list(self.values)
        return [tuple(values[i:i + self.WIDTH]) for i in range(0, len(values), self.WIDTH)]


def _report_under_way(index: int, read: int, tokens: int) -> None:
    if _UNDER_WAY_ROW is not None:
        values, at = _UNDER_WAY_ROW
        values[at + 1], values[at + 2], values[at] = read, tokens, index + 1  # the unit last: it says the row is new


def _worker_init(threads: int, under_way_values, next_row) -> None:
    global _UNDER_WAY_ROW
    _worker_threads(threads)
    if under_way_values is not None:
        with next_row.get_lock():
            row, next_row.value = next_row.value, next_row.value + 1
        _UNDER_WAY_ROW = (under_way_values, UnitsUnderWay.WIDTH * row)


class _Every(threading.Thread):
    """Calls ``tick()`` every ``seconds`` from a thread of its own until stopped (a ``with``
    block), or until it raises OSError (a progress line's output gone, a lock file removed)."""

    def __init__(self, seconds: float, tick: Callable[[], None]):
        super().__init__(daemon=True, name="letrecipes-progress")
        self.seconds, self.tick, self.stopped = max(0.01, seconds), tick, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.tick()
            except OSError:  # e.g. `prepare-data | head`: the work goes on, and its own next line says so
                return

    def __enter__(self) -> "_Every":
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopped.set()
        self.join()


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the workers: ``shutdown(wait=True)``, what leaving a
    ``with`` block does, would finish every queued unit first (hours, after a Ctrl-C). A
    unit killed mid-way leaves only its temporary file, which the next prepare removes."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # the executor keeps them here
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            process.terminate()
    for process in workers:
        process.join(timeout=10)


def in_workers(work: Callable[[Any], Any], jobs: Dict[Any, Any], workers: int,
                finished: Callable[[Any, Any], None],
                under_way: Optional[Callable[[List[tuple]], None]] = None, every_s: float = 10.0) -> None:
    """``work(job)`` for every job: in this process with one worker (or one job), else in
    ``workers`` spawned processes (fewer when there are fewer jobs, each then with the
    threads of the rest: ``workers`` is a budget of cores); ``finished(key, result)`` runs here as each ends. An error
    or a signal stops the workers at once (the jobs in flight are not waited for). With
    ``under_way``, it is called every ``every_s`` from a thread with the rows of a
    :class:`UnitsUnderWay` that the work fills in (:func:`_report_under_way`)."""
    global _UNDER_WAY_ROW
    in_process = workers <= 1 or len(jobs) <= 1
    processes = 1 if in_process else min(workers, len(jobs))
    table = UnitsUnderWay(processes, shared=not in_process) if under_way else None
    with _Every(every_s, lambda: under_way(table.rows())) if under_way else contextlib.nullcontext():
        if in_process:
            _UNDER_WAY_ROW = (table.values, 0) if table else None
            try:
                for key, job in jobs.items():
                    finished(key, work(job))
            finally:
                _UNDER_WAY_ROW = None
            return
        pool = ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(max(1, workers // processes), table and table.values,
                                             table and table.next_row))
        try:
            futures = {pool.submit(work, job): key for key, job in jobs.items()}
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            _stop_now(pool)
            raise
        pool.shutdown()


def workers_within_cores(workers: int, what: str, log: Callable[[str], None]) -> int:
    """``workers``, or the cores this process may use where it asks for more: tokenizing and
    scanning are CPU-bound, so a process past the cores only shares them, and holds a tokenizer
    of its own (a cluster's ``--workers 64`` on an 8-core login node or allocation)."""
    cores = usable_cores()
    if workers <= cores:
        return workers
    log(f"{what}: {workers} workers asked for, more than the {cores} core{'s' if cores > 1 else ''} this process may "
        f"use (its CPU affinity): {cores} used (a process past the cores only shares them, with a tokenizer of its own "
        "in memory)")
    return cores


def _prepare_unit(job: dict) -> dict:
    """Tokenize one unit into its shard (in a worker process, or in-process for one worker)."""
    key = (job["tokenizer"], job["eos_token"])
    if key not in _WORKER_TOKENIZER:  # one per worker process, reused for its next units
        _WORKER_TOKENIZER[key] = Tokenizer(job["tokenizer"], eos_token=job["eos_token"])
    tokenizer = _WORKER_TOKENIZER[key]
    splits = tokenizer.splits_safely
    unit = Unit.from_dict(job["unit"])
    dtype, out_dir = np.dtype(job["dtype"]), Path(job["out_dir"])
    name = shard_name(job["index"])
    data_path = out_dir / f"{name}.bin"
    tmp = unique_tmp(data_path)
    messages: List[str] = []
    tokens = documents = unknown = 0
    read_before = bytes_read()
    _report_under_way(job["index"], 0, 0)
    try:
        with open(tmp, "wb") as out:
            # Encodings cost about 170 bytes of memory per byte of text: a batch is bounded in
            # characters as well as documents, and a long document is encoded in pieces.
            batch: List[str] = []
            ends: List[bool] = []  # whether each piece ends its document (an EOS follows)
            chars = 0

            def flush() -> None:
                nonlocal tokens, chars, unknown
                for ids, last in zip(tokenizer.encode_batch(batch), ends):
                    array = np.asarray(ids + [tokenizer.eos_id] if last else ids, dtype=dtype)
                    out.write(array.tobytes())
                    tokens += len(array)
                    if tokenizer.unk_id is not None:
                        unknown += int(np.count_nonzero(array == tokenizer.unk_id))
                batch.clear(), ends.clear()
                chars = 0
                _report_under_way(job["index"], bytes_read() - read_before, tokens)

            for piece, last in read_unit_in_pieces(unit, job["text_field"], job["key"], messages,
                                                   piece_chars=PIECE_CHARS if splits else None,
                                                   separator=job["document_separator"]):
                documents += last
                batch.append(piece)
                ends.append(last)
                chars += len(piece)
                if len(batch) == DOCS_PER_BATCH or chars >= BATCH_CHARS:
                    flush()
            flush()
            out.flush()
            os.fsync(out.fileno())
        _check_unchanged(unit, job["key"])
        os.replace(tmp, data_path)
    except BaseException:  # a failed or interrupted write leaves nothing behind
        tmp.unlink(missing_ok=True)
        raise
    write_shard_keys(data_path, dtype, tokenizer.eos_id)
    # The first warnings are kept with the shard: a later run that finds it done can still say why a
    # corpus came out empty.
    meta = {"file": f"{name}.bin", "tokens": tokens, "documents": documents, "unknown_tokens": unknown,
            "unit": unit.to_dict(),
            "warning_count": len(messages), "first_warnings": messages[:KEPT_WARNINGS]}
    replace_atomically(out_dir / f"{name}.json", json.dumps(meta))
    return {**meta, "warnings": messages}


def _check_unchanged(unit: Unit, key: str) -> None:
    """A whole-file unit's files must be the size they were listed at once read: a file still
    being written (a download or copy under way) would otherwise be prepared as whatever part
    of it had arrived, its last record cut, without a word. (A part of a cut file reads a fixed
    byte range; a parquet row group or a datasets folder is read by its own metadata.)"""
    if unit.is_range or unit.kind not in ("text", "jsonl", "csv", "arrow", "archive"):
        return
    try:
        now = sum(os.stat(path).st_size for path in unit.paths)
    except OSError as err:
        raise DataError(f"{key}: {err.filename} went away while it was being prepared. Fix: put it back, or "
                        "leave it out of the source, then run the command again.") from err
    if now != unit.size:
        where = unit.paths[0] if len(unit.paths) == 1 else f"one of {len(unit.paths)} files from {unit.paths[0]}"
        raise DataError(f"{key}: {where} changed while it was being prepared: {unit.size:,} bytes when the corpus was "
                        f"listed, {now:,} now (a download or a copy still under way?). Fix: wait until it is complete, "
                        "then run the command again.")


def _remove_dead_tmp_files(out_dir: Path) -> None:
    """Delete the half-written files of killed prepares on this host. Files of live
    processes, and of other hosts preparing the same folder, are left alone."""
    suffix = f".{socket.gethostname()}."
    for tmp in out_dir.glob(".*.tmp"):
        stem = tmp.name[:-len(".tmp")]
        head, _, pid = stem.rpartition(".")
        if not (pid.isdigit() and (head + ".").endswith(suffix)):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _plan(units: List[Unit], tokenizer: Tokenizer, text_field: str, dtype: np.dtype,
          document_separator: Optional[str], drop_copies: bool = False) -> dict:
    plan = {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer.fingerprint(),
            "tokenizer_vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name,
            "text_field": text_field, "document_separator": document_separator, "units": [u.to_dict() for u in units]}
    if drop_copies:  # recorded only when set: folders prepared before the option keep their plan
        plan["drop_copies"] = True
    return json.loads(json.dumps(plan))  # as it reads back from plan.json (tuples become lists)


def _earlier_plan(out_dir: Path) -> Optional[dict]:
    """The plan of an earlier prepare into ``out_dir``: a finished one's (in its manifest), else
    an unfinished one's (plan.json); None when there is none or it does not read."""
    for path, pick in ((out_dir / MANIFEST, lambda d: d.get("plan")), (out_dir / PLAN, lambda d: d)):
        try:
            plan = pick(json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if _plan_problem(plan) is None:
            return plan
    return None


def _plan_problem(plan) -> Optional[str]:
    """What is wrong with a plan read back (plan.json, or the manifest's copy), or None."""
    if not isinstance(plan, dict) or not isinstance(plan.get("units"), list):
        return "it is not {units: [...], ...}"
    for i, unit in enumerate(plan["units"]):
        if not isinstance(unit, dict) or not isinstance(unit.get("kind"), str) or not isinstance(
                unit.get("paths"), list) or not all(isinstance(path, str) for path in unit["paths"]):
            return f"its unit {i} is not {{kind, paths, ...}}"
    return None


def _plan_settings(plan: dict) -> dict:
    """A plan without its units: the tokenizer, dtype and reading settings."""
    return {k: v for k, v in plan.items() if k != "units"}


def plan_difference(earlier: dict, plan: dict) -> str:
    """What sets a folder's earlier plan apart from this one, in words: the tokenizer or
    another reading setting, files added or gone, or the same files with other sizes."""
    settings = [k for k in sorted(set(_plan_settings(earlier)) | set(_plan_settings(plan)))
                if earlier.get(k) != plan.get(k)]
    if settings:  # the token ids, their EOS and their dtype all follow from the tokenizer
        named = ["another tokenizer" if k.startswith("tokenizer") or k in ("eos_id", "dtype") else
                 f"{k} {earlier.get(k)!r} -> {plan.get(k)!r}" for k in settings]
        return "with " + ", ".join(dict.fromkeys(named))

    def sizes(units: List[dict]) -> Dict[str, int]:  # bytes by file (a cut file's parts summed), or by group
        found: Dict[str, int] = {}
        for unit in (u for u in units if u["paths"]):
            more = len(unit["paths"]) - 1
            name = unit["paths"][0] + (f" and the {more} file(s) read with it, together," if more else "")
            found[name] = found.get(name, 0) + unit.get("size", 0)
        return found

    before, now = (list(dict.fromkeys(p for u in plan_["units"] for p in u["paths"])) for plan_ in (earlier, plan))
    known, listed = set(before), set(now)
    added, gone = [p for p in now if p not in known], [p for p in before if p not in listed]
    if added or gone:
        return "from other files: " + "; ".join(part for part in (
            f"{len(added):,} not in it (first: {added[0]})" if added else "",
            f"{len(gone):,} gone or not read now (first: {gone[0]})" if gone else "") if part)
    was, is_now = sizes(earlier["units"]), sizes(plan["units"])
    changed = next(((name, size) for name, size in was.items() if is_now.get(name) != size), None)
    if changed:
        name, size = changed
        return (f"from the same files when they held other bytes: {name} was {size:,} bytes, is "
                + ("not a unit now" if is_now.get(name) is None else f"{is_now[name]:,}"))
    return "from the same files, read in another order or cut otherwise"


def _same_files_cut_otherwise(earlier: dict, plan: dict) -> bool:
    """Whether two plans read the same files in the same order with the same settings, and differ
    only in how the files are cut into units (SPLIT_FILE_BYTES, or the cutting of large files added)."""
    def files(units: List[dict]) -> List[str]:
        return list(dict.fromkeys(path for unit in units for path in unit["paths"]))

    def size(units: List[dict]) -> int:  # an edited file changes it, as it changed the old units' sizes
        return sum(unit.get("size", 0) for unit in units)

    try:
        return (_plan_settings(earlier) == _plan_settings(plan) and files(earlier["units"]) == files(plan["units"])
                and size(earlier["units"]) == size(plan["units"]))
    except (KeyError, TypeError):
        return False


def check_output_folder(out_dir: Path, units: List[Unit], out_key: str) -> None:
    """Refuse, before any tokenizing, an output folder that would mix shards with other files
    or replace the corpus itself. A folder an earlier prepare started is taken back up."""
    earlier_prepare = out_dir.is_dir() and ((out_dir / MANIFEST).exists() or (out_dir / PLAN).exists())
    if not earlier_prepare:
        resolved = out_dir.resolve()
        inside = [p for u in units for p in u.paths if resolved in (Path(p).resolve(), *Path(p).resolve().parents)]
        if inside:
            raise DataError(f"{out_key}: {out_dir} holds the corpus being prepared ({inside[0]}). Fix: write the "
                            "shards to a folder outside data.source.")
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise DataError(f"{out_key}: {out_dir} is not empty and is not a prepared folder ({first_names(out_dir)}). "
                            "Fix: choose a new or empty folder.")
    check_writable_folder(out_dir, out_key)


def prepare_corpus(source, tokenizer: Tokenizer, out_dir, text_field: str = "text", workers: int = 1,
                   key: str = "data.source", log: Callable[[str], None] = print, progress_every_s: float = 10.0,
                   out_key: str = "prepare", document_separator: Optional[str] = DOCUMENT_SEPARATOR,
                   drop_copies: bool = False) -> dict:
    """Prepare ``source`` into ``out_dir``; return the manifest. Resumable and deterministic.
    Text files are split into documents at ``document_separator`` (None: one per file). With
    ``drop_copies``, a document (of ``MIN_TOKENS``+) that repeats one before it in the corpus
    is left out: each trains once. A
    full disk, a lost mount or an unreadable file is one line naming ``out_key`` (or ``key``,
    for a file of the source) and what is kept."""
    folders = {out_key: Path(out_dir)}
    if isinstance(source, (str, os.PathLike)):
        folders[key] = Path(source)
    with environment_errors(folders, f"preparing {source} into {out_dir}",
                            "Finished shards are kept: the same command goes on from them."):
        return _prepare_corpus(source, tokenizer, out_dir, text_field, workers, key, log, progress_every_s, out_key,
                               document_separator, drop_copies)


def _prepare_corpus(source, tokenizer: Tokenizer, out_dir, text_field: str, workers: int, key: str,
                    log: Callable[[str], None], progress_every_s: float, out_key: str,
                    document_separator: Optional[str], drop_copies: bool) -> dict:
    out_dir = Path(out_dir)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"prepare: workers={workers!r} is not a number of processes. Fix: give 1 or more "
                        f"(this process may use {usable_cores()} cores).")
    workers = workers_within_cores(workers, "prepare", log)
    units = list_units(source, key, document_separator, log)
    dtype = token_dtype(tokenizer.vocab_size)
    plan = _plan(units, tokenizer, text_field, dtype, document_separator, drop_copies)
    earlier = _earlier_plan(out_dir)
    if earlier is not None and earlier != plan and _same_files_cut_otherwise(earlier, plan):
        # prepared (or begun) by a letrecipes that cut the files into other units: the same
        # documents in the same order, so its units are kept and its finished shards used
        units = [Unit.from_dict(u) for u in earlier["units"]]
        plan = earlier
    check_output_folder(out_dir, units, out_key)
    manifest = None
    if is_prepared(out_dir):
        try:
            manifest = load_manifest(out_dir)
        except ValueError as err:  # the shards' own records (and plan.json) say which are sound: those are kept
            log(f"prepare: {out_dir / MANIFEST} is damaged ({err}); writing it again")
            (out_dir / MANIFEST).unlink()
    if manifest is not None:
        damaged = [i for i in range(len(units)) if not _shard_done(out_dir, i, dtype.itemsize)]
        if manifest.get("plan") == plan and not damaged:
            if manifest.get("repeats") is None or stored_keys(out_dir, manifest["shards"]) is None:
                # prepared by a letrecipes that kept no document keys, or a keys file damaged since
                metas = [_shard_done(out_dir, i, dtype.itemsize) for i in range(len(units))]  # all sound, checked above
                manifest["repeats"] = _repeats(out_dir, metas, dtype, tokenizer.eos_id, log)
                replace_atomically(out_dir / MANIFEST, json.dumps(manifest, indent=1))
                warn_if_repeated(out_dir, manifest, key)
            log(f"prepare: {out_dir} is already prepared ({manifest['tokens']:,} tokens); nothing to do")
            return manifest
        if manifest.get("plan") == plan:
            log(f"prepare: {len(damaged)} shard(s) of {out_dir} are missing or truncated; redoing them")
            (out_dir / MANIFEST).unlink()
        else:
            raise DataError(f"prepare: {out_dir} already holds a corpus prepared {plan_difference(manifest['plan'], plan)}"
                            f". Fix: prepare into another folder (or delete that one first); it still serves as "
                            f"data.source for the corpus as it was then.")
    plan_path = out_dir / PLAN
    try:
        begun = json.loads(plan_path.read_text()) if plan_path.is_file() else plan
        damage = _plan_problem(begun)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        damage = f"it does not parse: {err}"
    if damage:  # which shard holds which unit can no longer be told
        raise DataError(f"prepare: {plan_path} is damaged ({damage}): the shards written cannot be matched to the "
                        "files. Fix: delete that folder and prepare again, or choose another.")
    if begun != plan:
        if _plan_settings(begun) == _plan_settings(plan) and \
                [u["paths"] for u in begun["units"]] == [u["paths"] for u in plan["units"]]:
            raise DataError(f"prepare: {out_dir} was begun {plan_difference(begun, plan)}: one changed since, or was "
                            "still being written then. Fix: delete that folder and prepare again, or choose another.")
        raise DataError(f"prepare: {out_dir} holds an unfinished prepare {plan_difference(begun, plan)} ({PLAN} "
                        "differs). Fix: rerun the command that started it, or choose another folder.")
    replace_atomically(plan_path, json.dumps(plan, indent=1))
    _remove_dead_tmp_files(out_dir)
    if units and not all(_shard_done(out_dir, i, dtype.itemsize) for i in range(len(units))):
        warn_if_text_vanishes(units[0], tokenizer, text_field, key, document_separator)

    done = {i: meta for i in range(len(units)) if (meta := _shard_done(out_dir, i, dtype.itemsize))}
    todo = [i for i in range(len(units)) if i not in done]
    total_bytes = sum(u.size for u in units) or 1
    jobs = [{"index": i, "unit": units[i].to_dict(), "tokenizer": str(tokenizer.path),
             "eos_token": tokenizer.eos_token, "text_field": text_field, "document_separator": document_separator,
             "dtype": dtype.name,
             "out_dir": str(out_dir), "key": key} for i in todo]
    log(f"prepare: {len(units)} unit(s), {total_bytes / 2**20:,.1f} MB of input -> {out_dir}"
        + (f"; {len(done)} already done, {len(todo)} to go" if done else "") + f"; {max(1, workers)} worker(s)")
    start = time.perf_counter()
    done_bytes = new_tokens = 0
    todo_bytes = sum(units[i].size for i in todo) or 1
    counting = threading.Lock()  # the progress thread reads what finished() adds to

    def say_how_far(rows: List[tuple]) -> None:
        with counting:
            # the units under way, by their workers' rows (a finished one's row may not be cleared yet)
            under_way = [(u - 1, read, tokens) for u, read, tokens in rows if u and u - 1 not in done]
            got_bytes = done_bytes + sum(min(read, units[i].size) for i, read, _ in under_way)
            got_tokens = new_tokens + sum(tokens for _, _, tokens in under_way)
            elapsed = time.perf_counter() - start
            log(f"prepare: {len(done)}/{len(units)} units" + (f" ({len(under_way)} under way)" if under_way else "")
                + f", {got_bytes / 2**20:,.1f}/{todo_bytes / 2**20:,.1f} MB, {got_tokens / max(elapsed, 1e-9):,.0f} "
                f"tokens/s, {elapsed_and_eta(elapsed, got_bytes, todo_bytes)}")

    said: List[str] = []  # every warning of this prepare; the first WARNINGS_SHOWN are shown as they come

    def finished(meta: dict) -> None:
        nonlocal done_bytes, new_tokens
        for message in meta.pop("warnings"):
            said.append(message)
            if len(said) <= WARNINGS_SHOWN:
                warnings.warn(message, DataWarning, stacklevel=3)
        index = int(meta["file"][len("shard_"):-len(".bin")])
        with counting:
            done[index] = meta
            done_bytes += units[index].size
            new_tokens += meta["tokens"]
        if len(done) == len(units):
            say_how_far([])

    in_workers(_prepare_unit, dict(enumerate(jobs)), workers, lambda _, meta: finished(meta),
               under_way=say_how_far, every_s=progress_every_s)

    shards = [done[i] for i in range(len(units))]
    if len(said) > WARNINGS_SHOWN:
        _write_all_warnings(out_dir, said, key)
    total, unknown = sum(s["tokens"] for s in shards), sum(s.get("unknown_tokens", 0) for s in shards)
    if total == 0:
        skipped = f"; the {len(said)} warning(s) above say what was skipped" if said else ""
        if len(said) > WARNINGS_SHOWN:
            skipped = f"; the {len(said):,} warning(s) in {out_dir / WARNINGS_FILE} say what was skipped"
        earlier = [m for shard in shards for m in shard.get("first_warnings", [])]
        if not said and earlier:  # every unit was read by an earlier run, whose warnings are gone from view
            earlier_note = (f" When it was read, {sum(s.get('warning_count', 0) for s in shards)} warning(s) said "
                            f"what was skipped; the first: {earlier[0]}")
        else:
            earlier_note = ""
        raise DataError(f"{key}: the source holds no text (0 documents{skipped}). Fix: point it at a corpus with "
                        f"text in it.{earlier_note}")
    warn_if_unspellable(out_dir, unknown, total, tokenizer, key)
    if drop_copies:
        shards = _drop_copies(out_dir, shards, dtype, tokenizer.eos_id, log, workers)
    repeats = _repeats(out_dir, shards, dtype, tokenizer.eos_id, log)
    manifest = write_manifest(out_dir, shards, tokenizer, dtype, text_field,
                              list(dict.fromkeys(p for u in units for p in u.paths)), plan, repeats)
    warn_if_repeated(out_dir, manifest, key)
    log(f"prepare: done, {manifest['tokens']:,} tokens in {len(shards)} shard(s), {time.perf_counter() - start:.1f} s")
    return manifest


# A corpus of 50,000 crawl files, each with an empty record, gave 50,000 warning lines: the
# first few are shown as they come, and all of them are written to the prepared folder.
WARNINGS_SHOWN = 5
WARNINGS_FILE = "warnings.txt"


def _write_all_warnings(out_dir: Path, said: List[str], key: str) -> None:
    replace_atomically(out_dir / WARNINGS_FILE, "".join(message + "\n" for message in said))
    warnings.warn(f"{key}: {len(said) - WARNINGS_SHOWN:,} more warning(s) like those above were not shown, "
                  f"{len(said):,} in all: every one is in {out_dir / WARNINGS_FILE}. Fix: read them there; none, if "
                  "they say what is meant (records skipped, bytes replaced).", DataWarning, stacklevel=3)


def _keyed(out_dir: Path, shards: List[dict], dtype: np.dtype, eos_id: int) -> List[StoredKeys]:
    """Every shard's stored keys, keying first the shards that have none (written by an
    earlier letrecipes) or whose keys do not read."""
    for shard in shards:
        if not keys_path(out_dir / shard["file"]).is_file():
            write_shard_keys(out_dir / shard["file"], dtype, eos_id)
    stored = stored_keys(out_dir, shards)
    if stored is None:  # a keys file that does not read: rewritten once
        for shard in shards:
            write_shard_keys(out_dir / shard["file"], dtype, eos_id)
        stored = stored_keys(out_dir, shards)
    if stored is None:  # written just now and still not read back: the disk or the folder is at fault
        raise DataError(f"data.cache_dir: the document keys written into {out_dir} do not read back (files named "
                        f"*{KEYS_SUFFIX}). Fix: check that disk (its free space, its errors), or prepare into "
                        "another folder.")
    return stored


def _drop_from(job: tuple) -> tuple:
    """One shard of the drop pass, in a worker or in-process: rewritten, then keyed."""
    path, dtype, eos_id, every, later = job
    counts = drop_from_shard(path, dtype, eos_id, every, later)
    write_shard_keys(path, dtype, eos_id)
    return counts


def _drop_copies(out_dir: Path, shards: List[dict], dtype: np.dtype, eos_id: int,
                 log: Callable[[str], None], workers: int = 1, progress_every_s: float = 10.0) -> List[dict]:
    """``drop_copies``: rewrite the shards holding copies of earlier documents without them,
    ``workers`` at a time. Each shard is replaced by a rename, then keyed, then its .json
    updated: a kill in between leaves a shard whose size its .json does not match, which the
    same command redoes from the source. Run again, it finds nothing more to drop (the first
    of each document stays)."""
    began, shards = time.perf_counter(), [dict(s) for s in shards]
    jobs = {i: (out_dir / shards[i]["file"], dtype, eos_id, every, later)
            for i, (every, later) in enumerate(copies_to_drop(_keyed(out_dir, shards, dtype, eos_id)))
            if len(every) or len(later)}
    todo_tokens, done_tokens, last = sum(shards[i]["tokens"] for i in jobs) or 1, 0, time.perf_counter()
    log(f"prepare: data.drop_copies: {len(jobs)} of {len(shards)} shard(s) hold copies of earlier documents; "
        "rewriting them without")

    def finished(i: int, counts: tuple) -> None:
        nonlocal done_tokens, last
        tokens, documents, dropped, dropped_tokens = counts
        shard = shards[i]
        shard.update(tokens=tokens, documents=documents,
                     dropped_documents=shard.get("dropped_documents", 0) + dropped,
                     dropped_tokens=shard.get("dropped_tokens", 0) + dropped_tokens)
        meta_path = out_dir / f"{Path(shard['file']).stem}.json"
        replace_atomically(meta_path, json.dumps({**json.loads(meta_path.read_text()), **{k: shard[k] for k in (
            "tokens", "documents", "dropped_documents", "dropped_tokens")}}))
        done_tokens += tokens + dropped_tokens
        if time.perf_counter() - last >= progress_every_s:  # a pass over a large corpus takes minutes
            last = time.perf_counter()
            log(f"prepare: data.drop_copies: {done_tokens:,} of {todo_tokens:,} tokens rewritten, "
                f"{elapsed_and_eta(last - began, done_tokens, todo_tokens)}")

    in_workers(_drop_from, jobs, workers, finished)
    dropped = sum(s.get("dropped_documents", 0) for s in shards)
    dropped_tokens = sum(s.get("dropped_tokens", 0) for s in shards)
    log(f"prepare: data.drop_copies: {dropped:,} copies of earlier documents left out ({dropped_tokens:,} tokens, "
        f"{dropped_tokens / max(1, dropped_tokens + sum(s['tokens'] for s in shards)):.2%}); each document of "
        f"{MIN_TOKENS}+ tokens trains once; {time.perf_counter() - began:.1f} s")
    return shards


def _repeats(out_dir: Path, shards: List[dict], dtype: np.dtype, eos_id: int, log: Callable[[str], None]) -> dict:
    """Count the documents that are copies of others across the corpus (``shards``: their
    .json records, which say what data.drop_copies left out)."""
    began = time.perf_counter()
    repeats = count_repeats(_keyed(out_dir, shards, dtype, eos_id))
    repeats["dropped"] = sum(s.get("dropped_documents", 0) for s in shards)
    repeats["dropped_tokens"] = sum(s.get("dropped_tokens", 0) for s in shards)
    total = sum(s["tokens"] for s in shards) or 1
    log(f"prepare: {repeats['copies']:,} of {repeats['documents']:,} documents (of {MIN_TOKENS}+ tokens) are copies "
        f"of another, {repeats['copy_tokens'] / total:.2%} of the tokens; {time.perf_counter() - began:.1f} s")
    return repeats


def write_manifest(out_dir: Path, shards: List[dict], tokenizer: Tokenizer, dtype: np.dtype, text_field: str,
                   sources: List[str], plan: Optional[dict] = None, repeats: Optional[dict] = None) -> dict:
    """Mark ``out_dir`` complete: ``shards`` are ``{file, tokens, documents}`` in stream order;
    ``repeats`` is :func:`document_keys.count_repeats`'s count, when made."""
    manifest = {"format_version": FORMAT_VERSION, "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(s["documents"] for s in shards),
                "unknown_tokens": sum(s.get("unknown_tokens", 0) for s in shards), "dtype": np.dtype(dtype).name,
                "tokenizer": {"fingerprint": tokenizer.fingerprint(), "path": str(tokenizer.path),
                              "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                "text_field": text_field, "sources": sources,
                "shards": [{k: s[k] for k in ("file", "tokens", "documents")} for s in shards], "plan": plan,
                "repeats": repeats}
    replace_atomically(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def cache_key(source, tokenizer: Tokenizer, text_field: str, key: str = "data.source",
              document_separator: Optional[str] = DOCUMENT_SEPARATOR, drop_copies: bool = False,
              log: Optional[Callable[[str], None]] = None) -> str:
    """Names a small corpus's prepared folder after everything that decides its tokens: the
    shard format and the readers' version, the tokenizer's content and its end-of-text token, the text field,
    the document separator, ``drop_copies``, and every file's path, size and modification time, so changing
    any of them prepares again."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}|r{READER_VERSION}|{tokenizer.fingerprint()}|eos={tokenizer.eos_token!r}|"
                       f"{text_field}|sep={document_separator!r}".encode())
    if drop_copies:  # only then: the caches made before the option keep their names
        h.update(b"|drop_copies")
    for real, st in real_paths(source_files(source, key, log)):
        st = st or os.stat(real)  # a file gone since it was listed: the OSError names it
        h.update(f"|{real}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def cache_folder(source, tokenizer: Tokenizer, cache_dir, text_field: str = "text", key: str = "data.source",
                 document_separator: Optional[str] = DOCUMENT_SEPARATOR, drop_copies: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> Path:
    """Where :func:`cached_prepare` keeps ``source`` prepared: ``<cache_dir>/prepared-<cache_key>``."""
    name = cache_key(source, tokenizer, text_field, key, document_separator, drop_copies, log)
    return Path(cache_dir) / f"prepared-{name}"


def cached_prepare(source, tokenizer: Tokenizer, cache_dir, text_field: str = "text", rank: int = 0,
                   workers: int = 1, timeout_s: float = 3600.0, key: str = "data.source",
                   log: Callable[[str], None] = print, document_separator: Optional[str] = DOCUMENT_SEPARATOR,
                   drop_copies: bool = False) -> Path:
    """The prepared folder for ``source``: ``source`` itself if it is one, else a folder in
    ``cache_dir`` that one process prepares once while the others wait for its manifest.
    ``rank`` is the process's rank on its node: the first process of each node takes
    ``<folder>.lock``, so where nodes share the cache (a shared filesystem) one of them
    prepares and the others wait for it, and where each node has a disk of its own, each
    prepares its copy. ``drop_copies`` (``data.drop_copies``) leaves out copies of earlier documents."""
    if is_prepared(Path(source)) if isinstance(source, (str, os.PathLike)) else False:
        check_drop_copies(Path(source), read_manifest(Path(source), key=key), drop_copies, key)
        return Path(source)
    folder = cache_folder(source, tokenizer, cache_dir, text_field, key, document_separator, drop_copies, log)
    start = time.perf_counter()
    if rank == 0:
        lock = folder.with_name(folder.name + ".lock")
        # A cache is read in full once, then only where a shard changed since (a 20B-token cache is
        # 40-80 GB: minutes at every launch and restart, on every node, read whole each time)
        while not (is_prepared(folder) and _keyed_already(folder)
                   and not damaged_shards(folder, tokenizer.vocab_size, read_verified(folder, tokenizer.vocab_size))):
            check_writable_folder(cache_dir, "data.cache_dir")
            with environment_errors("data.cache_dir", f"taking the lock {lock}"):
                took = _take_lock(lock)
            if took:
                try:
                    # the lock's time moves while its holder prepares: waiters on other nodes tell a slow
                    # preparer from a dead one by it (no clocks compared across nodes)
                    with _Every(LOCK_HEARTBEAT_S, lambda: os.utime(lock)):
                        _prepare_into_cache(source, tokenizer, folder, text_field, workers, key, log,
                                            document_separator, drop_copies)
                finally:
                    lock.unlink(missing_ok=True)
                break
            log(f"waiting for {_lock_owner(lock)} to prepare {source} into {folder} (data.prepare_timeout_s="
                f"{timeout_s:.0f})")
            _wait_while_held(lock, folder, start, timeout_s, source)
        write_verified(folder, tokenizer.vocab_size)  # sound as found, or written by this prepare
        return folder
    if is_prepared(folder):
        return folder
    print(f"rank {rank}: waiting for rank 0 to prepare {source} into {folder} (data.prepare_timeout_s="
          f"{timeout_s:.0f})", flush=True)
    while not is_prepared(folder):
        _check_waited(start, timeout_s, f"rank {rank}: rank 0", source, folder)
        time.sleep(1.0)
    return folder


def check_drop_copies(folder: Path, manifest: dict, drop_copies: bool, key: str) -> None:
    """A prepared folder used as it is must have been prepared the way ``data.drop_copies`` asks."""
    if drop_copies and not (manifest.get("plan") or {}).get("drop_copies"):
        raise DataError(f"data.drop_copies=true, but {key}={str(folder)!r} is a prepared folder whose copies were "
                        "kept. Fix: prepare it again with `letrecipes prepare-data ... data.drop_copies=true` into "
                        "another --out and train on that, or drop data.drop_copies.")


def _keyed_already(folder: Path) -> bool:
    """Whether a prepared folder has its document keys and their count (one prepared by a
    letrecipes from before 2026-12-04 has neither)."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("repeats") is not None
    except (OSError, ValueError):
        return False


def _prepare_into_cache(source, tokenizer: Tokenizer, folder: Path, text_field: str, workers: int, key: str,
                        log: Callable[[str], None], document_separator: Optional[str], drop_copies: bool) -> None:
    """Prepare ``source`` into the cache folder, or mend it: a cache found damaged keeps its
    sound shards and redoes the rest, with a warning; one prepared before document keys
    were kept gets them (the copies count, the held-out check on keys, mixtures compared)."""
    damage = damaged_shards(folder, tokenizer.vocab_size) if is_prepared(folder) else []
    if damage:  # a cache is ours to mend: rebuild what is damaged, say so
        warnings.warn(f"data.cache_dir: the cached tokens of {source} are damaged ({'; '.join(damage[:3])}); "
                      f"preparing {folder} again", DataWarning, stacklevel=3)
        for name in [MANIFEST] + [p.split()[0] for p in damage if p.startswith("shard_")]:
            (folder / name).unlink(missing_ok=True)  # prepare_corpus redoes the missing, keeps the rest
    if not is_prepared(folder):
        prepare_corpus(source, tokenizer, folder, text_field=text_field, workers=workers, key=key, log=log,
                       document_separator=document_separator, out_key="data.cache_dir", drop_copies=drop_copies)
    elif not _keyed_already(folder):
        log(f"prepare: {folder} was prepared before document keys were kept; keying its documents")
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["repeats"] = _repeats(folder, manifest["shards"], np.dtype(manifest["dtype"]),
                                       int(manifest["tokenizer"]["eos_id"]), log)
        replace_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))


def _take_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _lock_owner(lock: Path) -> str:
    try:
        host, pid = lock.read_text().split()
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def _owner_is_gone(lock: Path) -> bool:
    """Whether the lock's process ran on this host and has ended (a host cannot see another's)."""
    try:
        host, pid = lock.read_text().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # gone meanwhile, half-written, or another user's process
        return False
    return False


def _wait_while_held(lock: Path, folder: Path, start: float, timeout_s: float, source) -> None:
    """Return when the folder is prepared or the lock is free to take: released, or left by a
    holder that died (its process gone from this host, or its time still for LOCK_STALE_S)."""
    seen, since = None, time.perf_counter()
    while not is_prepared(folder):
        try:
            stamp = lock.stat().st_mtime
        except FileNotFoundError:
            return
        now = time.perf_counter()
        if stamp != seen:
            seen, since = stamp, now
        elif now - since > LOCK_STALE_S or _owner_is_gone(lock):
            # renamed, not removed: of several waiters that find it stale, one moves it
            left = lock.with_name(f"{lock.name}.stale.{socket.gethostname()}.{os.getpid()}")
            try:
                os.rename(lock, left)
                left.unlink()
            except OSError:
                pass
            return
        _check_waited(start, timeout_s, _lock_owner(lock), source, folder)
        time.sleep(1.0)


def _check_waited(start: float, timeout_s: float, who: str, source, folder: Path) -> None:
    if time.perf_counter() - start > timeout_s:
        raise DataError(f"{who} did not finish preparing {source} into {folder} within {timeout_s:.0f} s. Fix: "
                        "prepare it beforehand with `letrecipes prepare-data`, or raise data.prepare_timeout_s.")


# (warning, folder) pairs this process has given: a run that prepares and then reads a corpus says each once
_WARNED: set = set()


def _first_time(warning: str, folder: Path) -> bool:
    seen = (warning, Path(folder).resolve())
    if seen in _WARNED:
        return False
    _WARNED.add(seen)
    return True


def warn_if_unspellable(folder: Path, unknown: int, total: int, tokenizer: Tokenizer, key: str) -> None:
    """One warning when more than ``UNKNOWN_LIMIT`` of a corpus's tokens are the unknown
    token: when it is prepared, and again in every run that reads it (the prepare's log may
    be long gone)."""
    if unknown <= UNKNOWN_LIMIT * total or not _first_time("unspellable", folder):
        return
    unk = tokenizer.hf.id_to_token(tokenizer.unk_id) if tokenizer.unk_id is not None else "unknown"
    warnings.warn(f"{key}: {unknown:,} of the {total:,} tokens ({unknown / total:.1%}) are the tokenizer's unknown "
                  f"token {unk!r}: it cannot spell much of this corpus (another script or language than it was "
                  "trained on?). Fix: a tokenizer trained on text like this one (a byte-level BPE spells any text); the "
                  "model cannot learn what reaches it as unknown.", DataWarning, stacklevel=3)


def warn_if_text_vanishes(unit: Unit, tokenizer: Tokenizer, text_field: str, key: str,
                          separator: Optional[str] = DOCUMENT_SEPARATOR) -> None:
    """One warning, before the tokenizing, when the tokenizer loses characters of the corpus
    without a trace: a BPE with no unknown token and no byte fallback drops what it cannot
    spell (tokenizers' BpeTrainer under a ByteLevel pre-tokenizer, without its
    ``initial_alphabet``, learns only the bytes its training text held: digits it never saw
    vanished from every document, and the corpus prepared without a word). The corpus's
    first characters are encoded and decoded; a tokenizer with an unknown token is counted
    by the prepare itself (:func:`warn_if_unspellable`)."""
    if tokenizer.unk_id is not None:
        return
    pieces, chars = [], 0
    try:
        for piece, _ in read_unit_in_pieces(unit, text_field, key, [], piece_chars=PIECE_CHARS, separator=separator):
            pieces.append(piece[:VANISH_SAMPLE_CHARS - chars])
            chars += len(pieces[-1])
            if chars >= VANISH_SAMPLE_CHARS:
                break
    except LetRecipesError:  # the prepare reads the unit next, and names what is wrong with it
        return
    hf = tokenizer.hf
    normalized = hf.normalizer.normalize_str if hf.normalizer is not None else str
    before = Counter(c for piece in pieces for c in normalized(piece) if not c.isspace())
    after = Counter(c for text in hf.decode_batch(tokenizer.encode_batch(pieces), skip_special_tokens=False)
                    for c in text if not c.isspace())
    lost, total = before - after, sum(before.values())
    if not total or sum(lost.values()) <= VANISH_LIMIT * total:
        return
    shown = ", ".join(repr(c) for c, _ in lost.most_common(5))
    warnings.warn(f"{key}: the tokenizer loses {sum(lost.values()) / total:.1%} of the characters of the corpus's "
                  f"first {chars:,} (most often {shown}) without a trace: it cannot spell them and has no unknown "
                  "token or byte fallback, so that text never reaches the model. Fix: a tokenizer that spells any "
                  "text (a byte-level BPE trained with its whole byte alphabet: BpeTrainer(initial_alphabet="
                  "pre_tokenizers.ByteLevel.alphabet())), or one trained on text like this corpus.",
                  DataWarning, stacklevel=2)


def warn_if_repeated(folder: Path, manifest: dict, key: str) -> None:
    """One warning when more than ``REPEAT_LIMIT`` of a corpus's tokens are in copies of its
    own documents (a file beside its compressed copy, a folder copied into itself, a crawl
    not deduplicated): when it is prepared, and in every run that reads it."""
    repeats = manifest.get("repeats")
    if not repeats or repeats["copy_tokens"] <= REPEAT_LIMIT * manifest["tokens"] or not _first_time("repeated", folder):
        return
    units = (manifest.get("plan") or {}).get("units", [])

    def named(index: int) -> str:
        try:  # the plan only names the shard's source: a plan of an older or edited form names the shard
            return Unit.from_dict(units[index]).describe()
        except (IndexError, KeyError, TypeError, ValueError, AttributeError):
            return manifest["shards"][index]["file"]

    shared = "; ".join(f"{n:,} within {named(a)}" if a == b else f"{n:,} in both {named(a)} and {named(b)}"
                       for a, b, n, _ in repeats["shared"])
    warnings.warn(f"{key}: {repeats['copies']:,} of its {repeats['documents']:,} documents (of {MIN_TOKENS}+ tokens) "
                  f"are copies of another, {repeats['copy_tokens'] / manifest['tokens']:.1%} of its tokens: the model "
                  f"trains on that text two or more times an epoch (most: {shared}). A file beside its compressed copy, "
                  "a folder copied into itself or a crawl not deduplicated does this. Fix: data.drop_copies=true prepares "
                  "it with each document once (or remove the copies from the corpus; to weight a corpus on purpose, "
                  "give data.sources weights).", DataWarning, stacklevel=3)


def read_manifest(folder, tokenizer: Optional[Tokenizer] = None, key: str = "data.source") -> Dict[str, Any]:
    """A prepared folder's manifest, checked: every shard present at its full size, and
    made with ``tokenizer`` (the run's) when given."""
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
    except (OSError, ValueError) as err:  # json's JSONDecodeError is a ValueError
        raise DataError(f"{key}: {folder / MANIFEST} is missing, unreadable or not a manifest ({err}). Fix: rerun "
                        "`letrecipes prepare-data` for this folder (it keeps the sound shards).") from err
    if tokenizer is not None and manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        raise DataError(f"{key}: {folder} was prepared with another tokenizer ({manifest['tokenizer']['path']}, "
                        f"fingerprint {manifest['tokenizer']['fingerprint']}) than this run's ({tokenizer.path}, "
                        f"{tokenizer.fingerprint()}). Fix: prepare the corpus with this run's tokenizer section, or "
                        "set tokenizer.path to the one it was prepared with.")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        what = size_problem(path, shard["tokens"] * itemsize)
        if what:
            raise DataError(f"{key}: shard {path} {what}. Fix: rerun the `letrecipes prepare-data` command that "
                            "made the folder (it redoes only damaged shards), or delete the folder if it is a cache.")
    if tokenizer is not None:
        warn_if_unspellable(folder, int(manifest.get("unknown_tokens", 0)), int(manifest["tokens"]), tokenizer, key)
        warn_if_repeated(folder, manifest, key)
    return manifest
