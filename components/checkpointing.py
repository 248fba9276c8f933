"""Step checkpoints with torch.distributed.checkpoint (DCP), and the run folder's rules.

Layout under ``<output_dir>``::

    checkpoints/step_00000100/   a complete DCP checkpoint (model, optimizer, each rank's
                                 trainer state), its run_info.json and a COMPLETE marker
    checkpoints/step_00000200.tmp/   being written; never read, removed on the next save

A checkpoint is written into a ``.tmp`` folder; when every rank's shards and the DCP
metadata are on disk, each rank hashes the files it wrote (SHA-256, while they are still
in the page cache), and rank 0 writes the ``COMPLETE`` marker, which lists every file's
size and digest and whether the weights were finite, then renames the folder. A killed
save leaves either a ``.tmp`` folder or a folder without the marker, and ``resume: true``
skips both (saying so). At resume the chosen checkpoint is verified against its marker
(the ranks share the files); a damaged one is skipped for the one before it. Old
checkpoints are pruned only after a newer one is complete.

The run folder is locked (:mod:`run_lock`) for the whole run, so two launches never
write it together.

The :class:`Checkpointer` owns everything about the run folder a recipe would otherwise
decide: where to resume from (:meth:`Checkpointer.resume_point`), whether the folder may
be written (:meth:`Checkpointer.guard`), and what a checkpoint holds: the model and
optimizer (sharded by DCP) plus any number of ``Stateful`` objects (``state_dict`` /
``load_state_dict``) stored per rank, because data positions and RNG streams differ
between ranks (:meth:`Checkpointer.track`). Another number of processes reads every saved
rank's state: an object with ``load_resharded(states)`` gets them all (the data stream),
the others one saved rank's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from letrecipes.components.errors import LetRecipesError, StopRequested, stop_within
from letrecipes.components.files import (environment_errors, nearby, os_error_in, replace_atomically, shortened,
                                         usable_cores)
from letrecipes.components.parallel import gathered, on_rank0, world_size
from letrecipes.components.run_folder import (COMPLETE_MARKER, METRICS_FILE, STEP_PREFIX, complete_checkpoints_in,
                                              is_complete, marker_and_problem, step_folders, step_of)
from letrecipes.components.run_lock import RunLock

RUN_INFO = "run_info.json"
# The layout of a step checkpoint; readers refuse a newer one. Checkpoints without the
# file were written by version 1.
FORMAT_FILE = "format.json"
FORMAT_VERSION = 1
# What marks a folder as holding a run (a relaunch must resume or overwrite it). A
# metrics file counts only once it holds a record: a run that failed before its first
# step leaves nothing that blocks the corrected rerun.
RUN_FILES = (METRICS_FILE, "checkpoints", "final")
# A folder holding one of these is a run's (a run writes run_info.json before anything
# else); one holding other files and neither is someone else's (a home, a repository, "/"):
# a run never writes into it. Not "final" or "checkpoints": common names, and overwrite=true
# deletes them.
RUN_MARKERS = ("run_info.json", METRICS_FILE)
DCP_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")  # the shard files rank N wrote
HASH_BLOCK = 64 << 20
HASH_THREADS = min(8, usable_cores())


def quiet_dcp_writer_finalizer() -> None:
    """Keep torch's DCP writer from printing a traceback after a save that failed (a full disk,
    a file size limit). Its ``NoCloseWriter`` flushes the file it wraps when it is collected,
    and that file is closed by then; Python 3.13 logs what a finalizer raises ("Exception
    ignored in: <...NoCloseWriter ...> ... ValueError: flush of closed file") after the run's
    own one-line error. Only that object's ValueError is dropped; everything else reaches the
    hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "letrecipes_dcp_writer", False):
        return

    def hook(unraisable):
        writer = type(unraisable.object)
        if not (writer.__name__ == "NoCloseWriter" and writer.__module__.startswith("torch.distributed.checkpoint")
                and isinstance(unraisable.exc_value, ValueError)):
            previous(unraisable)

    hook.letrecipes_dcp_writer = True
    sys.unraisablehook = hook


# how long a rank looks for the file rank 0 wrote into output_dir before calling it another folder
SHARED_FOLDER_WAIT_S = 10


class CheckpointError(LetRecipesError):
    pass


def check_format(path: Path) -> None:
    """Refuse a checkpoint written by a newer letrecipes (another layout)."""
    try:
        version = json.loads((Path(path) / FORMAT_FILE).read_text())["format_version"]
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: {FORMAT_FILE} is unreadable ({err}).") from err
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:  # edited or damaged: not a number
        raise CheckpointError(f"{path}: {FORMAT_FILE} gives format_version={shortened(repr(version), 40)}, which is "
                              "no version: the file was edited or damaged. Fix: use another checkpoint of the run "
                              "(its checkpoints/ folder).")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written in checkpoint format {version}; this letrecipes reads up to "
                              f"{FORMAT_VERSION}. Fix: upgrade letrecipes (pip install -U letrecipes).")


def hold_file(folder: Path) -> Path:
    """The file a reader's hold on a model folder is taken on: a step checkpoint's COMPLETE
    marker, or the ``config.json`` of a Hugging Face folder (a run's ``final`` export)."""
    folder = Path(folder)
    return folder / (COMPLETE_MARKER if (folder / COMPLETE_MARKER).exists() or not (folder / "config.json").exists()
                     else "config.json")


@contextlib.contextmanager
def held_for_reading(path: Path, key: str):
    """Keep a model folder of a run (a complete step checkpoint, its ``final`` export) from
    being deleted while it is read (``letrecipes export``, the eval recipe): a shared
    ``flock`` on its :func:`hold_file`, which the rotation and ``overwrite=true``
    (:func:`remove_unless_read`) respect. The kernel drops it when the reader exits in any
    way, so nothing is left to clean up. A checkpoint the rotation removed as the reading
    began is one line naming the run's newest ones."""
    try:
        fd = os.open(hold_file(path), os.O_RDONLY)
    except FileNotFoundError:
        _raise_removed(Path(path), key)
    try:
        try:  # blocks only while the rotation removes the folder: an instant
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass  # no locks on this filesystem (ENOLCK, Lustre without -o flock: ENOSYS): read unheld, as before
        if os.fstat(fd).st_nlink == 0:
            _raise_removed(Path(path), key)
        yield
    finally:
        os.close(fd)


def _raise_removed(path: Path, key: str) -> None:
    raise CheckpointError(removed_checkpoint(path, key, "was removed by its run as the reading began"))


def removed_checkpoint(path: Path, key: str, what: str) -> str:
    """The line for a step checkpoint its run's rotation removed (``what`` says when), with
    the run's newest ones to read instead."""
    from letrecipes.components.run_lock import describe, live_owner

    newest = complete_checkpoints_in(path.parent)[-2:]
    owner = live_owner(path.parent.parent)
    return (f"{key}: {str(path)!r} {what} (a run keeps its newest keep_last_checkpoints step checkpoints and "
            "removes older ones at each save" + (f"; this one is training now: {describe(owner)}" if owner else "")
            + "). Fix: " + (f"read one it keeps ({', '.join(repr(str(p)) for p in newest)}), which is held for as "
                            "long as it is read" if newest else "read the run's final/ export once it finishes")
            + "; keep_last_checkpoints=all keeps every step.")


@contextlib.contextmanager
def _unless_read(folder: Path):
    """Yield whether no reader holds this model folder (:func:`held_for_reading`), holding
    it exclusively meanwhile where none does, so no reader can begin inside the block."""
    held_on = hold_file(folder)
    try:  # for writing where it may: NFS maps flock to fcntl locks, whose exclusive kind needs it
        fd = os.open(held_on, os.O_RDWR)
    except OSError:
        try:
            fd = os.open(held_on, os.O_RDONLY)
        except OSError:  # no marker: nothing can hold it
            yield True
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            pass  # no locks on this filesystem: nothing can be seen holding it
        yield True
    finally:
        os.close(fd)


def remove_unless_read(folder: Path) -> bool:
    """Remove a step checkpoint or an export unless a reader holds it (:func:`held_for_reading`);
    True once removed. Held for the removal itself, so a reader that opens it meanwhile
    finds it gone rather than half-deleted."""
    with _unless_read(folder) as unread:
        if unread:
            shutil.rmtree(folder, ignore_errors=True)
        return unread


def being_read(folder: Path) -> bool:
    """Whether another process reads this model folder now (``letrecipes export``, eval)."""
    with _unless_read(folder) as unread:
        return not unread


# where a resume from an earlier checkpoint moves the later ones (Checkpointer.set_aside_later)
SUPERSEDED = "superseded"

def require_complete(path: Path) -> None:
    """A checkpoint named for resume must be one whose save finished."""
    if not is_complete(path):
        from letrecipes.components.export import is_hf_folder, is_run_folder  # export reads checkpoints: no cycle

        if is_hf_folder(path):
            raise CheckpointError(
                f"resume: {str(path)!r} is an exported model (weights only: no optimizer state, schedule or data "
                f"position), which a run cannot resume. Fix: init_from={path} starts a new run from its weights; "
                f"resume=<output_dir>/checkpoints/{STEP_PREFIX}N resumes a run.")
        if is_run_folder(path):
            steps = complete_checkpoints_in(Path(path) / "checkpoints")
            raise CheckpointError(
                f"resume: {str(path)!r} is a training run's folder, not a checkpoint. Fix: resume=true with "
                f"output_dir={path} (its latest complete checkpoint)"
                + (f", or resume={steps[-1]}" if steps else "") + ".")
        raise CheckpointError(
            f"resume: {str(path)!r} is not a complete checkpoint (no .metadata or no {COMPLETE_MARKER} marker: "
            f"its save never finished). Fix: give a folder like <output_dir>/checkpoints/{STEP_PREFIX}00000100, "
            "or resume=true for the latest complete one.")


def file_digest(path: Path) -> str:
    """SHA-256 over the SHA-256 of each 64 MiB block, the blocks hashed on parallel threads
    (hashlib releases the GIL): a save's hashing scales with the cores instead of one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = range(0, max(1, os.fstat(fd).st_size), HASH_BLOCK)
        with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            digests = pool.map(lambda offset: hashlib.sha256(os.pread(fd, HASH_BLOCK, offset)).digest(), blocks)
            return hashlib.sha256(b"".join(digests)).hexdigest()
    finally:
        os.close(fd)


def describe_files(folder: Path, names: List[str]) -> Dict[str, Dict[str, Any]]:
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)} for name in names}


def file_problems(folder: Path, expected: Dict[str, Dict[str, Any]]) -> List[str]:
    """What differs between ``folder``'s files and their recorded sizes and digests."""
    problems = []
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size:,} bytes, {want['bytes']:,} were written")
        elif file_digest(path) != want["sha256"]:
            problems.append(f"{name} has other bytes than were written (checksum differs)")
    return problems


def checkpoint_problems(path: Union[str, Path], share: int = 0, shares: int = 1) -> List[str]:
    """What is wrong with the files of a complete checkpoint against its COMPLETE marker,
    for the ``share``-th of ``shares`` parts of its file list (all of it by default), and
    whether it holds non-finite weights (share 0). A marker written before checksums
    (version 0.3 and earlier) has nothing to verify against: no problems."""
    path = Path(path)
    marker, problem = marker_and_problem(path)
    if problem:
        return [problem] if share == 0 else []
    if marker is None:
        return []
    names = sorted(marker["files"])
    problems = file_problems(path, {n: marker["files"][n] for i, n in enumerate(names) if i % shares == share})
    if share == 0 and not marker.get("finite_weights", True):
        problems.append("it holds non-finite weights")
    return problems


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter (every rank's shard) is finite: one pass, one collective."""
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters()]
    flag = torch.stack(flags).all().float() if flags else torch.ones(())
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _is_library_failure(err: BaseException) -> bool:
    """DCP raises ``CheckpointException``, a ``BaseException``: not a Ctrl-C or an exit. A
    signal's stop that landed in DCP's read, which gathers each rank's failure into its own,
    is raised as itself: before, a SIGTERM during a resume's read was said to be a damaged
    checkpoint."""
    stop = stop_within(err)
    if stop is not None and stop is not err:
        raise stop from None
    return not isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit, StopRequested))


def _raise_if_the_disk(err: BaseException, key: str, path: Path) -> None:
    """An OS error inside a read's failure (a failing disk, a lost mount, a permission) is the
    environment's, said as such: not a checkpoint of another model or a damaged one, whose
    fixes would send the user elsewhere. A file gone is the checkpoint's own damage."""
    if os_error_in(err, other_than=(errno.ENOENT,)) is not None:  # DCP's fallback read after it: ENOENT
        with environment_errors(key, f"reading the checkpoint {path}", other_than=(errno.ENOENT,)):
            raise err


def _to_bytes(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@dataclass
class Progress:
    """How far training got: optimizer steps taken, seconds spent in them and tokens trained
    on (over resumes, whatever each launch's tokens per step; None from a checkpoint saved
    before tokens were counted, which the recipe then estimates)."""

    step: int = 0
    train_time: float = 0.0
    tokens: Optional[int] = 0

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.train_time = int(state["step"]), float(state["train_time"])
        self.tokens = int(state["tokens"]) if state.get("tokens") is not None else None


class RNGState:
    """Every random stream a step may draw from (torch, CUDA, numpy, Python), as a ``Stateful``.

    CUDA's is the stream of the GPU this process computes on (``torch.cuda.current_device``,
    its LOCAL_RANK's), not every visible GPU's: a process draws from its own device alone, and
    a list of all of them (what checkpoints before 2026-12 hold) could not be restored where
    fewer GPUs are visible (a resume on 4 GPUs a node after 8: torch's ``set_rng_state_all``
    stops on the fifth with an IndexError)."""

    def state_dict(self) -> Dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        cuda = state["cuda"]
        if cuda is None or not torch.cuda.is_available():
            return  # a CPU checkpoint on a GPU: the GPU's stream starts from the seed, as at a first start
        device = torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # an older checkpoint: every visible GPU's; this process used its own
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)

    def load_resharded(self, states: List[Dict[str, Any]]) -> None:
        """Resuming on another number of processes: rank r goes on with saved rank r's streams;
        a rank the saved run did not have gets streams of its own, seeded from saved rank
        r % W's and its rank (with a copy, rank 3 of 4 after 2 would draw what rank 1 draws)."""
        rank = _rank()
        if rank < len(states):
            self.load_state_dict(states[rank])
            return
        base = states[rank % len(states)]["torch"].numpy().tobytes()
        seed = int.from_bytes(hashlib.sha256(base + rank.to_bytes(8, "little")).digest()[:8], "little")
        torch.manual_seed(seed)  # every CUDA device's too
        np.random.seed(seed % 2**32)
        random.seed(seed)


class Checkpointer:
    """Saves and restores a run at step boundaries, and guards its folder.

    Usage, in this order::

        ckpt = Checkpointer(output_dir, keep_last=2)
        ckpt.lock()                                      # one run per folder, until release()
        resume_from = ckpt.resume_point(cfg.resume)      # None = a fresh start
        ckpt.guard(cfg.resume, overwrite=cfg.overwrite)  # resume or overwrite, or refuse
        ...                                              # build model, optimizer, loader
        ckpt.track(model, optimizer, progress=..., dataloader=..., rng=RNGState())
        ckpt.load(resume_from) if resume_from else ckpt.clear()
        ckpt.save(step)                                  # every save_every steps
        ckpt.release()
    """

    def __init__(self, output_dir: Union[str, Path], keep_last: int = 2, async_save: bool = False,
                 log: Callable[[str], None] = print, timeout_s: int = 600):
        self.output_dir = Path(output_dir)
        self.dir = self.output_dir / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self.log = log
        self.timeout_s = timeout_s
        self._async_group = None  # the process group of async saves' own collectives (made at the first one)
        self.model = self.optimizer = None
        self.per_rank: Dict[str, Any] = {}
        self._pending = None  # (future, tmp folder, final folder, step, start time) of an async save in flight
        self.found_checkpoint = True  # False once resume_point found none: guard() minds a finished run's export
        self._lock = RunLock(self.output_dir)
        self.last_save: Dict[str, float] = {}  # seconds the last save took, and its checksums
        self._said_held: set = set()  # old checkpoints kept for a reader, said once each
        # Called with the folder after its shards are written, before it is marked complete
        # (components/faults.py kills the process here for the reliability tests).
        self.before_complete = None

    # -------------------------------------------------------------- run folder
    def lock(self) -> None:
        """Rank 0 takes the folder's run lock (every rank stops alike if another run holds it),
        after checking that the folder is new, empty (hidden files aside) or a run's."""
        def take() -> None:
            self._refuse_a_foreign_folder()
            self._lock.acquire(log=self.log)

        on_rank0(take)
        self._check_every_rank_sees_the_folder()

    def _check_every_rank_sees_the_folder(self) -> None:
        """A checkpoint is written by every rank into output_dir and read back whole: a path
        that is a node-local disk on each node (``/tmp/run``, ``/local/scratch``) would split
        every checkpoint across the nodes, none of them whole, and be found out only at the
        resume. Rank 0 writes a file there; every rank must see it within SHARED_FOLDER_WAIT_S."""
        if world_size() == 1:
            return

        def write_probe() -> str:
            name = f".letrecipes.shared.{socket.gethostname()}.{os.getpid()}"
            replace_atomically(self.output_dir / name, "written by rank 0: every rank must see this file\n")
            return name

        probe = self.output_dir / on_rank0(write_probe)
        deadline = time.monotonic() + SHARED_FOLDER_WAIT_S
        while not probe.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = gathered((probe.exists(), socket.gethostname()))
        if dist.get_rank() == 0:
            probe.unlink(missing_ok=True)
        blind = [(rank, host) for rank, (sees, host) in enumerate(seen) if not sees]
        if blind:
            hosts = sorted({host for _, host in blind})
            raise CheckpointError(
                f"output_dir={str(self.output_dir)!r} is not one folder for every process: {len(blind)} of the job's "
                f"{len(seen)} ranks (rank {blind[0][0]} first; on {', '.join(hosts[:4])}) do not see the file rank 0 "
                f"(on {seen[0][1]}) wrote there, after {SHARED_FOLDER_WAIT_S} s. Every rank writes its part of each "
                "checkpoint into output_dir and a resume reads it back whole, so it must be on a filesystem every "
                "node mounts (NFS, Lustre, GPFS), not a node's local disk. Fix: set output_dir to a path on the "
                "shared filesystem.")

    def release(self) -> None:
        self._lock.release()

    def take_back_lock(self) -> bool:
        """Rank 0's lock taken again if its file went with the folder (RunLock.take_back)."""
        return self._lock.take_back(log=self.log)

    def _refuse_a_foreign_folder(self) -> None:
        """``output_dir=/``, ``~`` or ``.`` in a repository would scatter a run's files among
        others, and ``overwrite=true`` would delete a ``checkpoints`` or ``final`` folder that is
        not the run's: refused, overwrite or not."""
        if not self.output_dir.is_dir():
            return
        entries = sorted(p.name for p in self.output_dir.iterdir() if not p.name.startswith("."))
        if entries and not any(name in RUN_MARKERS for name in entries):
            shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
            raise CheckpointError(
                f"output_dir={str(self.output_dir)!r} holds files that are not a run's ({shown}). A run writes only "
                "into a new or empty folder, or one a run made. Fix: choose a new folder, e.g. "
                f"output_dir={(self.output_dir / 'runs' / 'my_run') if str(self.output_dir) != '/' else 'outputs/my_run'}.")

    @staticmethod
    def resume_requested(resume: Any) -> bool:
        return resume not in (False, None, "false", "False")

    def resume_point(self, resume: Any) -> Optional[Path]:
        """The checkpoint ``resume`` asks for: false/None -> None; true -> the newest complete
        one that verifies (a damaged one is skipped, said aloud; None when there is none: a
        run killed before its first checkpoint starts over); a path -> that folder, which
        must verify.

        Rank 0 lists the candidates and every rank gets its answer (or its error): ranks
        looking at a shared filesystem with a lag could otherwise resume from different
        steps. The ranks verify a candidate's files together.
        """
        self.found_checkpoint = True
        explicit = self.resume_requested(resume) and resume not in (True, "true", "True")
        candidates = on_rank0(lambda: self._resume_candidates(resume))
        for path in candidates:
            problems = self.verify(path)  # the same answer on every rank
            if not problems:
                return path
            if explicit:
                raise CheckpointError(
                    f"resume={str(resume)!r} is damaged: {'; '.join(problems[:3])}. Fix: resume=true takes the newest "
                    "checkpoint that verifies, or give an older one.")
            self.log(f"resume: skipping {path}: {'; '.join(problems[:3])}")
        if candidates:
            raise CheckpointError(
                f"resume=true: no checkpoint in {self.dir} verified (each is damaged, see above). Fix: resume from "
                "another copy of the run, or start over with overwrite=true (the damaged checkpoints are deleted).")
        self.found_checkpoint = False
        return None

    def _resume_candidates(self, resume: Any) -> List[Path]:
        if not self.resume_requested(resume):
            return []
        if resume in (True, "true", "True"):
            for broken in self.incomplete_checkpoints():
                self.log(f"resume: ignoring {broken} (its save never finished)")
            candidates = self.complete_checkpoints()[::-1]
            if not candidates and not (self.output_dir / "final").is_dir():  # else guard() says more
                self.log(f"resume=true but {self.dir} holds no complete checkpoint: starting fresh")
            return candidates
        path = Path(str(resume))
        if not path.is_dir():
            seen = nearby(path)
            raise CheckpointError(f"resume={resume!r}: no such checkpoint folder.{' ' + seen if seen else ''} Fix: "
                                  "resume=true for the "
                                  f"latest, or a path like <output_dir>/checkpoints/{STEP_PREFIX}00000100.")
        require_complete(path)
        return [path]

    def verify(self, path: Union[str, Path]) -> List[str]:
        """What is wrong with a complete checkpoint (empty: it verifies). Each rank hashes a
        share of the files; every rank gets the same answer."""
        return [p for share in gathered(checkpoint_problems(path, _rank(), world_size())) for p in share]

    def last_good(self) -> Optional[Path]:
        """The newest checkpoint that verifies and holds finite weights (a collective call)."""
        for path in self.complete_checkpoints()[::-1]:
            if not self.verify(path):
                return path
        return None

    def guard(self, resume: Any, overwrite: bool) -> None:
        """Refuse to replace a finished or running run's files unless told to (``resume`` or
        ``overwrite``). Rank 0 looks; every rank stops alike."""
        on_rank0(lambda: self._guard(resume, overwrite))

    def _guard(self, resume: Any, overwrite: bool) -> None:
        existing = [p for p in RUN_FILES if (self.output_dir / p).exists()
                    and not (p == METRICS_FILE and (self.output_dir / p).stat().st_size == 0)]
        if existing and not self.resume_requested(resume) and not overwrite:
            raise CheckpointError(
                f"output_dir={str(self.output_dir)!r} already holds a run ({', '.join(existing)}). Fix: resume=true "
                "to continue it, overwrite=true to start over (its files are replaced), or another output_dir."
            )
        if existing and overwrite and not self.resume_requested(resume):
            self._refuse_if_read("overwrite=true")
        final = self.output_dir / "final"
        if self.resume_requested(resume) and not self.found_checkpoint and final.is_dir() \
                and not overwrite:  # a requeue of a run finished with save_every=0, or whose checkpoints were pruned
            raise CheckpointError(
                f"resume=true: output_dir={str(self.output_dir)!r} holds a finished run's export ({final}) but no "
                "checkpoint to go on from (save_every=0, or its checkpoints were deleted): starting fresh would train "
                "from step 0 and replace that export. Fix: overwrite=true to train again from scratch, or another "
                f"output_dir; to go on from the export, init_from={final} in a new output_dir.")

    def readable_folders(self) -> List[Path]:
        """What a reader may hold in this run's folder: its complete step checkpoints, its
        ``final`` export, and both kinds set aside in ``superseded/``."""
        superseded = sorted((self.output_dir / SUPERSEDED).glob("*/*"))
        return [*self.complete_checkpoints(),
                *(p for p in [self.output_dir / "final", *superseded] if p.is_dir() and
                  (is_complete(p) if p.name.startswith(STEP_PREFIX) else (p / "config.json").is_file()))]

    def _refuse_if_read(self, why: str, held: Optional[List[Path]] = None) -> None:
        """Deleting a checkpoint or an export another process is reading would make that
        export or evaluation fail half-way, with an error about its own output."""
        held = held if held is not None else [p for p in self.readable_folders() if being_read(p)]
        if held:
            raise CheckpointError(
                f"{why} would delete {held[0]}{f' (and {len(held) - 1} more)' if len(held) > 1 else ''} while another "
                "process reads it (letrecipes export and the eval recipe hold a checkpoint or an export while they "
                "read it). Fix: "
                "launch again once that reader is done (`letrecipes status` lists the run's checkpoints), or choose "
                "another output_dir.")

    def set_aside_later(self, resumed: Path) -> None:
        """A run resumed from one of its own checkpoints that is not its newest (rolled back
        past a loss spike, or past a damaged newest one) goes on from there: the later
        checkpoints, and a ``final`` export written after them, belong to a continuation that
        is no longer the run's. They are moved, not deleted, to ``superseded/``: left in
        ``checkpoints/``, the next ``resume=true`` went back to them, silently, and a relaunch
        of a finished run took the old export for the new run's."""
        def move() -> None:
            if resumed.parent.resolve() != self.dir.resolve():
                return  # another run's checkpoint: this folder's own are not of its history
            step = step_of(resumed)
            later = sorted((p for p in self._step_folders() if not p.name.endswith(".tmp") and (step_of(p) or 0) > step),
                           key=lambda p: step_of(p) or 0)
            if not later:
                return
            final = self.output_dir / "final"
            moving = later + ([final] if final.is_dir() else [])
            self._refuse_if_read(f"resume={str(resumed)!r} (an earlier checkpoint than the run's newest)",
                                 [p for p in moving if being_read(p)])
            aside = self.output_dir / SUPERSEDED / f"after_{resumed.name}_{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(parents=True, exist_ok=True)
            for path in moving:
                path.rename(aside / path.name)
            self.log(f"resume: {resumed.name} is not the run's newest checkpoint: {', '.join(p.name for p in moving)} "
                     f"(what came after it) moved to {aside}, so that resume=true cannot go back to them; delete that "
                     "folder when it is not needed")

        with environment_errors("output_dir", f"setting aside the checkpoints after {resumed.name}",
                                "Nothing was deleted: each checkpoint is in checkpoints/ or in superseded/.",
                                then="run the same command again"):
            on_rank0(move)

    def clear(self) -> None:
        """A fresh start (overwrite=true) must never resume the old run's checkpoints later.
        Each checkpoint goes only if nobody reads it: one whose reading began after the guard
        looked stops the run here, the others already gone."""
        def remove_all() -> None:
            self._refuse_if_read("overwrite=true", [p for p in self.readable_folders() if not remove_unless_read(p)])
            for name in ("checkpoints", "final", SUPERSEDED):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)

        on_rank0(remove_all)  # a refusal stops every rank alike

    # ------------------------------------------------------------- contents
    def track(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **per_rank: Any) -> None:
        """What a checkpoint holds: ``model`` and ``optimizer`` (sharded by DCP) and the
        ``Stateful`` objects in ``per_rank``, saved and restored by name."""
        self.model, self.optimizer, self.per_rank = model, optimizer, per_rank

    def _step_folders(self):
        return step_folders(self.dir)

    def complete_checkpoints(self):
        return complete_checkpoints_in(self.dir)

    def incomplete_checkpoints(self):
        """Folders a killed save left behind (resume ignores them; the next save removes them)."""
        return sorted(p for p in self._step_folders() if p.name.endswith(".tmp") or not is_complete(p))

    def latest(self) -> Optional[Path]:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def save(self, step: int, run_info: Optional[Dict] = None) -> Path:
        self.wait()
        start = time.perf_counter()
        final = self.dir / f"{STEP_PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        kept = self.what_is_kept()
        with environment_errors("output_dir", f"saving the step-{step} checkpoint into {tmp}", kept,
                                then="run the same command with resume=true"):
            if _rank() == 0:
                for stale in self.incomplete_checkpoints():
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True, exist_ok=True)
                replace_atomically(tmp / FORMAT_FILE, json.dumps({"format_version": FORMAT_VERSION}))
                if run_info is not None:
                    replace_atomically(tmp / RUN_INFO, json.dumps(run_info, indent=2, default=str))
            _barrier()
            finite = _weights_finite(self.model)
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            trainer_state = {name: obj.state_dict() for name, obj in self.per_rank.items()}
            state = {"model": model_sd, "optim": optim_sd, f"trainer_rank{_rank()}": _to_bytes(trainer_state)}
            if self.async_save:
                # DCP stages a copy in CPU memory before returning; training goes on meanwhile.
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._save_group())
                self._pending = (future, tmp, final, finite, start, kept)
            else:
                dcp.save(state, checkpoint_id=str(tmp))
                self._finalize(tmp, final, finite, start)
        return final

    def _save_group(self):
        """A gloo group of every rank for the collectives an async save runs in its own thread.
        On the default group they interleaved with the training's FSDP2 collectives in a
        different order on each rank: gloo aborted the job (SIGABRT) or it hung, 2 ranks out of 2
        at the first async save. torchtitan keeps a group apart for the same reason."""
        if self._async_group is None and dist.is_initialized() and dist.get_world_size() > 1:
            self._async_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        return self._async_group

    def what_is_kept(self) -> str:
        """For an error that stops the run: what it can go back to."""
        latest = self.latest()
        return f"The last complete checkpoint, {latest}, is intact." if latest else "No checkpoint was saved yet."

    def wait(self) -> None:
        """Block until an async save in flight is on disk and renamed complete."""
        if self._pending is not None:
            future, tmp, final, finite, start, kept = self._pending
            self._pending = None
            with environment_errors("output_dir", f"saving the checkpoint {final.name} (async)", kept,
                                    then="run the same command with resume=true"):
                future.result()
                self._finalize(tmp, final, finite, start)

    def _finalize(self, tmp: Path, final: Path, finite: bool, start: float) -> None:
        _barrier()  # every rank's shards are written
        if self.before_complete is not None:
            self.before_complete(tmp)
        # Each rank hashes the shards it wrote (still in its page cache); rank 0 the rest.
        hash_start = time.perf_counter()
        names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != COMPLETE_MARKER)
        owner = [int(m.group(1)) if (m := DCP_SHARD.match(n)) and int(m.group(1)) < world_size() else 0
                 for n in names]
        mine = describe_files(tmp, [n for n, r in zip(names, owner) if r == _rank()])
        files = {name: meta for share in gathered(mine) for name, meta in share.items()}
        hash_seconds = time.perf_counter() - hash_start
        if _rank() == 0:
            marker = {"step_folder": final.name, "finite_weights": finite, "files": files}
            replace_atomically(tmp / COMPLETE_MARKER, json.dumps(marker, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete_checkpoints()[: -self.keep_last] if self.keep_last > 0 else []:
                if not remove_unless_read(old) and old not in self._said_held:
                    self._said_held.add(old)
                    self.log(f"checkpoint: {old.name} kept past keep_last_checkpoints={self.keep_last} while another "
                             "process reads it (letrecipes export, the eval recipe); a later save removes it")
        _barrier()
        self.last_save = {"save_s": time.perf_counter() - start, "checksum_s": hash_seconds,
                          "bytes": float(sum(meta["bytes"] for meta in files.values()))}

    def load(self, path: Union[str, Path]) -> None:
        """Restore the tracked model, optimizer and per-rank state from ``path`` in place."""
        path = Path(path)
        require_complete(path)
        check_format(path)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # DCP loads whatever keys it is asked for: a checkpoint of a deeper model would load
        # "fine" into a shallower one. Compare the tensor names first.
        try:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except BaseException as err:
            if not _is_library_failure(err):
                raise
            _raise_if_the_disk(err, "output_dir", path)
            raise CheckpointError(f"resume: {str(path)!r}: its .metadata is unreadable ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''}). Fix: resume from an older "
                                  "checkpoint, or resume=true (it skips damaged ones).") from err
        saved = {k for k in metadata.state_dict_metadata if k.startswith("model.")}
        wanted = {f"model.{k}" for k in model_sd}
        if saved != wanted:
            missing, extra = sorted(wanted - saved), sorted(saved - wanted)
            raise CheckpointError(
                f"resume: cannot load {str(path)!r} into this run: it holds another model ({len(missing)} tensors "
                f"this run needs are missing, e.g. {[m[6:] for m in missing[:2]]}; {len(extra)} are not in this run, "
                f"e.g. {[e[6:] for e in extra[:2]]}). Fix: resume with the same model, alignment and world size that "
                "wrote it."
            )
        # Another number of processes: DCP reshards the model and optimizer, and every saved
        # rank's trainer state is read (the data position continues after what all of them read)
        saved_world = len([k for k in metadata.state_dict_metadata if k.startswith("trainer_rank")]) or 1
        resharded = saved_world != world_size()
        keys = [f"trainer_rank{i}" for i in range(saved_world)] if resharded else [f"trainer_rank{_rank()}"]
        state = {"model": model_sd, "optim": optim_sd, **{key: io.BytesIO() for key in keys}}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except BaseException as err:  # DCP wraps per-rank failures in CheckpointException, a BaseException
            if not _is_library_failure(err):
                raise
            _raise_if_the_disk(err, "output_dir", path)
            raise CheckpointError(
                f"resume: cannot load {str(path)!r} into this run ({str(err).splitlines()[0][:300]}). "
                "Fix: resume with the same model and alignment that wrote it"
                + (f", or on the {saved_world} process(es) that wrote it." if resharded else ".")
            ) from err
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer_states = []
        for key in keys:
            state[key].seek(0)
            trainer_states.append(torch.load(state[key], weights_only=False))
        trainer_state = trainer_states[_rank() % len(trainer_states)]  # another world size: a saved rank's RNG
        missing = [name for name in self.per_rank if name not in trainer_state]
        if missing:
            raise CheckpointError(f"resume: {str(path)!r} holds no {missing} state (it was written by another "
                                  "version of letrecipes or another recipe). Fix: resume with the recipe and version "
                                  "that wrote it, or start fresh with overwrite=true.")
        for name, obj in self.per_rank.items():
            if resharded and hasattr(obj, "load_resharded"):
                obj.load_resharded([saved[name] for saved in trainer_states])
            else:
                obj.load_state_dict(trainer_state[name])


def load_model_weights(path: Union[str, Path], model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Load only the student weights of a step checkpoint into ``model`` (built on meta or not).

    For evaluating intermediate checkpoints: no optimizer, no trainer state, any world
    size (DCP reshards).
    """
    from letrecipes.components.models import rebuild_rope_caches

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a complete checkpoint (its save never finished). "
                              f"Fix: use an earlier step in {str(path.parent)!r}, or the run's final/ folder.")
    model.to_empty(device=device)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # the recipes save {"model": student, ...}
    try:
        dcp.load({"model": state}, checkpoint_id=str(path))
    except BaseException as err:  # DCP wraps failures in CheckpointException, a BaseException
        if not _is_library_failure(err):
            raise
        _raise_if_the_disk(err, "checkpoint", path)
        raise CheckpointError(f"checkpoint: cannot load {str(path)!r} ({str(err).splitlines()[0][:300]}). Fix: "
                              "read it with the config.yaml of the run that wrote it.") from err
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    with torch.device(device):
        rebuild_rope_caches(model.layers)
    return model
