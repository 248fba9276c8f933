"""The names in a run's ``output_dir`` and the readers of them that need no torch.

``letrecipes status`` is asked from login nodes, often in a loop, and of a folder a live run
writes: it reads the log's newest records, the step checkpoints' markers and the export's
step, and nothing here imports torch or torchtune (5.5 s and 430 MB a call, measured: 0.2 s and
29 MB without them).
:mod:`checkpointing`, :mod:`metrics` and :mod:`export` own the writing and import these names
from here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

METRICS_FILE = "metrics.jsonl"
STEP_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
# beside an exported model: the step a letrecipes export was taken at (a relaunch of a finished
# run tells its own final/ from an earlier one's by it); Hugging Face loaders pass over the file
EXPORT_INFO = "letrecipes_export.json"

# the names a save gives its folder: step_00000100, and step_00000100.tmp while it is written
STEP_FOLDER = re.compile(rf"^{STEP_PREFIX}\d+(\.tmp)?$")
OLD_MARKER = re.compile(r"\s*step_\d+\s*")  # 0.3's marker: the step folder's name, as text


def records_from_the_end(path: Union[str, Path], block_bytes: int = 1 << 20) -> Iterator[Optional[Dict[str, Any]]]:
    """A metrics.jsonl's whole lines from the last to the first, each as its record, or None
    for a line that is no record (as :func:`metrics.read_metric_records` counts them); a last
    line that is not whole is left out. Read backwards a block at a time: a long run logs about
    1 KB a step (about 100 MB over 100k steps), and the newest records are all a status or
    an evaluation wants."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        after = b""  # the text between this block and the next newline after it
        ends_a_line = False  # whether `after` runs up to a newline: not at first (a line still being written)
        while end > 0:
            start = max(0, end - block_bytes)
            f.seek(start)
            pieces = (f.read(end - start) + after).split(b"\n")
            end = start
            if not ends_a_line:
                if len(pieces) == 1:
                    after = pieces[0]
                    continue
                pieces.pop()  # after the file's last newline: nothing, or a line not yet whole
                ends_a_line = True
            after = pieces.pop(0) if start > 0 else b""  # maybe the end of a line that began in the block before
            for line in reversed(pieces):
                if line.strip():
                    yield _record(line)


def _record(line: bytes) -> Optional[Dict[str, Any]]:
    try:  # bytes that are not UTF-8 are replaced, as the whole read of read_metric_records does
        record = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / COMPLETE_MARKER).is_file()


def step_folders(folder: Path) -> List[Path]:
    """The folders a run's ``checkpoints/`` holds under a step name, complete or not. A
    folder named otherwise (a user's copy, ``step_best``) is no checkpoint of the run: it is
    neither listed, resumed from, nor removed."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name)]


def complete_checkpoints_in(folder: Path) -> List[Path]:
    """The complete step checkpoints of a run's ``checkpoints/`` folder, oldest first (not a
    ``.tmp`` folder a save was killed in, even one marked complete before its rename)."""
    found = [p for p in step_folders(folder) if not p.name.endswith(".tmp") and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def step_of(path: Path) -> Optional[int]:
    """The step a checkpoint was written at, from the folder name its marker records (a copy
    may be renamed); None for a folder this project did not name."""
    named = (read_marker(path) or {}).get("step_folder", path.name)
    digits = named[len(STEP_PREFIX):] if named.startswith(STEP_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def read_marker(path: Path) -> Optional[Dict[str, Any]]:
    """A checkpoint's COMPLETE marker: its file list and flags, or None for a marker
    written before checksums (version 0.3 and earlier) or a damaged one
    (:func:`marker_and_problem` tells them apart)."""
    return marker_and_problem(path)[0]


def marker_and_problem(path: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The marker read once: (its file list, or None) and what is wrong with it: a cut or
    edited file, JSON that is no file list (None for a sound one, and for 0.3's plain-text
    one, which has nothing to verify)."""
    try:
        text = (Path(path) / COMPLETE_MARKER).read_text(errors="replace")
    except FileNotFoundError as err:  # gone since it was listed: the checkpoint's own damage
        return None, f"its {COMPLETE_MARKER} marker does not read ({err.strerror or err})"
    # Any other OSError (a failing disk, a lost mount) is the environment's: raised for the
    # caller's one line. Taken as damage, a resume went back to the checkpoint before, and
    # when it reached this step again deleted the one that had only failed to read.
    if OLD_MARKER.fullmatch(text):
        return None, None
    try:
        marker = json.loads(text)
    except ValueError:
        return None, (f"its {COMPLETE_MARKER} marker is damaged ({len(text.encode()):,} bytes that are not the JSON "
                      "written)")
    if not _is_marker(marker):
        return None, f"its {COMPLETE_MARKER} marker is damaged (JSON, but not a list of files)"
    return marker, None


def _is_marker(marker) -> bool:
    files = marker.get("files") if isinstance(marker, dict) else None
    return isinstance(files, dict) and all(
        isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
        for f in files.values()) and isinstance(marker.get("step_folder", ""), str)


def exported_step(folder: Union[str, Path]) -> Optional[int]:
    """The training step a letrecipes export was taken at; None where it does not say (an
    export written before it was recorded, a model from elsewhere, a damaged file)."""
    try:
        step = json.loads((Path(folder) / EXPORT_INFO).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
