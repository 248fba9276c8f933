"""Step checkpoints with torch.distributed.checkpoint (DCP), and the run folder's rules.

Layout under ``<output_dir>``::

    checkpoints/step_00000100/   a complete DCP checkpoint (model, optimizer, each rank's
                                 trainer state), its run_info.json and a COMPLETE marker
    checkpoints/step_00000200.tmp/   being written; never read, removed on the next save

A checkpoint is written into a ``.tmp`` folder; when every rank's shards and the DCP
metadata are on disk, rank 0 writes the ``COMPLETE`` marker and renames the folder. A
killed save therefore leaves either a ``.tmp`` folder or a folder without the marker, and
``resume: true`` skips both (saying so). Old checkpoints are pruned only after a newer
one is complete.

The :class:`Checkpointer` owns everything about the run folder a recipe would otherwise
decide: where to resume from (:meth:`Checkpointer.resume_point`), whether the folder may
be written (:meth:`Checkpointer.guard`), and what a checkpoint holds: the model and
optimizer (sharded by DCP) plus any number of ``Stateful`` objects (``state_dict`` /
``load_state_dict``) stored per rank, because data positions and RNG streams differ
between ranks (:meth:`Checkpointer.track`).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from letrecipes.components.errors import LetRecipesError

STEP_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
RUN_INFO = "run_info.json"
# The layout of a step checkpoint; readers refuse a newer one. Checkpoints without the
# file were written by version 1.
FORMAT_FILE = "format.json"
FORMAT_VERSION = 1
# What marks a folder as holding a run (a relaunch must resume or overwrite it).
RUN_FILES = ("metrics.jsonl", "checkpoints", "final")


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / COMPLETE_MARKER).is_file()


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
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written in checkpoint format {version}; this letrecipes reads up to "
                              f"{FORMAT_VERSION}. Fix: upgrade letrecipes (pip install -U letrecipes).")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _decided_on_rank0(decide):
    """``decide()`` run on rank 0 alone; its value, or its :class:`LetRecipesError`, on every rank."""
    if _world_size() == 1:
        return decide()
    answer = [None]
    if _rank() == 0:
        try:
            answer[0] = ("value", decide())
        except LetRecipesError as err:
            answer[0] = ("error", type(err), str(err))
    dist.broadcast_object_list(answer, src=0)
    if answer[0][0] == "error":
        raise answer[0][1](answer[0][2])
    return answer[0][1]


def saved_world_size(path: Union[str, Path]) -> Optional[int]:
    """How many processes wrote a step checkpoint (one trainer state per rank), or None."""
    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # unreadable metadata: load() names the problem
        return None
    ranks = [k for k in keys if k.startswith("trainer_rank")]
    return len(ranks) or None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _to_bytes(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@dataclass
class Progress:
    """How far training got: optimizer steps taken and seconds spent in them (over resumes)."""

    step: int = 0
    train_time: float = 0.0

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.train_time = int(state["step"]), float(state["train_time"])


class RNGState:
    """Every random stream a step may draw from (torch, CUDA, numpy, Python), as a ``Stateful``."""

    def state_dict(self) -> Dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores a run at step boundaries, and guards its folder.

    Usage, in this order::

        ckpt = Checkpointer(output_dir, keep_last=2)
        resume_from = ckpt.resume_point(cfg.resume)      # None = a fresh start
        ckpt.guard(cfg.resume, overwrite=cfg.overwrite)         # resume or overwrite, or refuse
        ...                                              # build model, optimizer, loader
        ckpt.track(model, optimizer, progress=..., dataloader=..., rng=RNGState())
        ckpt.load(resume_from) if resume_from else ckpt.clear()
        ckpt.save(step)                                  # every save_every steps
    """

    def __init__(self, output_dir: Union[str, Path], keep_last: int = 2, async_save: bool = False,
                 log: Callable[[str], None] = print):
        self.output_dir = Path(output_dir)
        self.dir = self.output_dir / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self.log = log
        self.model = self.optimizer = None
        self.per_rank: Dict[str, Any] = {}
        self._pending = None  # (future, tmp folder, final folder) of an async save in flight
        # Called with the folder after its shards are written, before it is marked complete
        # (components/faults.py kills the process here for the reliability tests).
        self.before_complete = None

    # -------------------------------------------------------------- run folder
    @staticmethod
    def resume_requested(resume: Any) -> bool:
        return resume not in (False, None, "false", "False")

    def resume_point(self, resume: Any) -> Optional[Path]:
        """The checkpoint ``resume`` asks for: false/None -> None; true -> the latest complete
        one (None, said aloud, when there is none: a run killed before its first checkpoint
        starts over); a path -> that folder.

        Rank 0 decides and every rank gets its answer (or its error): ranks looking at a
        shared filesystem with a lag could otherwise resume from different steps.
        """
        return _decided_on_rank0(lambda: self._resume_point(resume))

    def _resume_point(self, resume: Any) -> Optional[Path]:
        if not self.resume_requested(resume):
            return None
        if resume in (True, "true", "True"):
            for broken in self.incomplete_checkpoints():
                self.log(f"resume: ignoring {broken} (its save never finished)")
            latest = self.latest()
            if latest is None:
                self.log(f"resume=true but {self.dir} holds no complete checkpoint: starting fresh")
                return None
            path = latest
        else:
            path = Path(str(resume))
            if not path.is_dir():
                raise CheckpointError(f"resume={resume!r}: no such checkpoint folder. Fix: resume=true for the "
                                      f"latest, or a path like <output_dir>/checkpoints/{STEP_PREFIX}00000100.")
        written_by, world_size = saved_world_size(path), _world_size()
        if written_by is not None and written_by != world_size:
            raise CheckpointError(
                f"resume: {str(path)!r} was written by {written_by} process(es); this run has {world_size}. Fix: "
                f"launch with {written_by} (tune run --nproc_per_node {written_by} ...), or start over with "
                "overwrite=true. Resuming on another world size is refused: the data order and the per-rank "
                "RNG streams of a run depend on its number of processes.")
        return path

    def guard(self, resume: Any, overwrite: bool) -> None:
        """Refuse to replace a finished or running run's files unless told to (``resume`` or
        ``overwrite``). Rank 0 looks; every rank stops alike."""
        _decided_on_rank0(lambda: self._guard(resume, overwrite))

    def _guard(self, resume: Any, overwrite: bool) -> None:
        existing = [p for p in RUN_FILES if (self.output_dir / p).exists()]
        if existing and not self.resume_requested(resume) and not overwrite:
            raise CheckpointError(
                f"output_dir={str(self.output_dir)!r} already holds a run ({', '.join(existing)}). Fix: resume=true "
                "to continue it, overwrite=true to start over (its files are replaced), or another output_dir."
            )

    def clear(self) -> None:
        """A fresh start (overwrite=true) must never resume the old run's checkpoints later."""
        if _rank() == 0:
            for name in ("checkpoints", "final"):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)

    # ------------------------------------------------------------- contents
    def track(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **per_rank: Any) -> None:
        """What a checkpoint holds: ``model`` and ``optimizer`` (sharded by DCP) and the
        ``Stateful`` objects in ``per_rank``, saved and restored by name."""
        self.model, self.optimizer, self.per_rank = model, optimizer, per_rank

    def _step_folders(self):
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]

    def complete_checkpoints(self):
        found = [p for p in self._step_folders() if not p.name.endswith(".tmp") and is_complete(p)]
        return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))

    def incomplete_checkpoints(self):
        """Folders a killed save left behind (resume ignores them; the next save removes them)."""
        return sorted(p for p in self._step_folders() if p.name.endswith(".tmp") or not is_complete(p))

    def latest(self) -> Optional[Path]:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def save(self, step: int, run_info: Optional[Dict] = None) -> Path:
        self.wait()
        final = self.dir / f"{STEP_PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            for stale in self.incomplete_checkpoints():
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / FORMAT_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION}))
            if run_info is not None:
                (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2, default=str))
        _barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        trainer_state = {name: obj.state_dict() for name, obj in self.per_rank.items()}
        state = {"model": model_sd, "optim": optim_sd, f"trainer_rank{_rank()}": _to_bytes(trainer_state)}
        if self.async_save:
            # DCP stages a copy in CPU memory before returning; training goes on meanwhile.
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp)), tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, final)
        return final

    def wait(self) -> None:
        """Block until an async save in flight is on disk and renamed complete."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        _barrier()  # every rank's shards are written
        if self.before_complete is not None:
            self.before_complete(tmp)
        if _rank() == 0:
            (tmp / COMPLETE_MARKER).write_text(f"{final.name}\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete_checkpoints()[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def load(self, path: Union[str, Path]) -> None:
        """Restore the tracked model, optimizer and per-rank state from ``path`` in place."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(
                f"resume: {str(path)!r} is not a complete checkpoint (no .metadata or no {COMPLETE_MARKER} marker: "
                f"its save never finished). Fix: give a folder like <output_dir>/checkpoints/{STEP_PREFIX}00000100, "
                "or resume=true for the latest complete one."
            )
        check_format(path)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # DCP loads whatever keys it is asked for: a checkpoint of a deeper model would load
        # "fine" into a shallower one. Compare the tensor names first.
        saved = {k for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata if k.startswith("model.")}
        wanted = {f"model.{k}" for k in model_sd}
        if saved != wanted:
            missing, extra = sorted(wanted - saved), sorted(saved - wanted)
            raise CheckpointError(
                f"resume: cannot load {str(path)!r} into this run: it holds another model ({len(missing)} tensors "
                f"this run needs are missing, e.g. {[m[6:] for m in missing[:2]]}; {len(extra)} are not in this run, "
                f"e.g. {[e[6:] for e in extra[:2]]}). Fix: resume with the same model, alignment and world size that "
                "wrote it."
            )
        key = f"trainer_rank{_rank()}"
        state = {"model": model_sd, "optim": optim_sd, key: io.BytesIO()}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as err:  # DCP wraps per-rank failures in CheckpointException
            raise CheckpointError(
                f"resume: cannot load {str(path)!r} into this run ({str(err).splitlines()[0][:300]}). "
                "Fix: resume with the same model, alignment and world size that wrote it."
            ) from err
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        buf = state[key]
        buf.seek(0)
        trainer_state = torch.load(buf, weights_only=False)
        missing = [name for name in self.per_rank if name not in trainer_state]
        if missing:
            raise CheckpointError(f"resume: {str(path)!r} holds no {missing} state (it was written by another "
                                  "version of letrecipes or another recipe). Fix: resume with the recipe and version "
                                  "that wrote it, or start fresh with overwrite=true.")
        for name, obj in self.per_rank.items():
            obj.load_state_dict(trainer_state[name])


def load_model_weights(path: Union[str, Path], model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Load only the student weights of a step checkpoint into ``model`` (built on meta or not).

    For evaluating intermediate checkpoints: no optimizer, no trainer state, any world
    size (DCP reshards).
    """
    from letrecipes.components.models import rebuild_rope_caches

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a complete checkpoint (its save never finished).")
    model.to_empty(device=device)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # the recipes save {"model": student, ...}
    try:
        dcp.load({"model": state}, checkpoint_id=str(path))
    except Exception as err:  # DCP wraps failures in CheckpointException
        raise CheckpointError(f"checkpoint: cannot load {str(path)!r} ({str(err).splitlines()[0][:300]}).") from err
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    with torch.device(device):
        rebuild_rope_caches(model.layers)
    return model
