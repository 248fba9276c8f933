"""Step checkpoints with torch.distributed.checkpoint (DCP), and the final export.

Layout under ``<output_dir>``::

    checkpoints/step_00000100/   a complete DCP checkpoint (model, optimizer, trainer state),
                                 its run_info.json and a COMPLETE marker
    checkpoints/step_00000200.tmp/   being written; never read, removed on the next save
    final/model.safetensors, final/config.json, final/tokenizer.json

A checkpoint is written into a ``.tmp`` folder; when every rank's shards and the DCP
metadata are on disk, rank 0 writes the ``COMPLETE`` marker and renames the folder. A
killed save therefore leaves either a ``.tmp`` folder or a folder without the marker, and
``resume: true`` skips both (saying so). Old checkpoints are pruned only after a newer
one is complete.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from components.models import ModelArgs
from components.teachers import EXPORT_CONFIG, EXPORT_TOKENIZER, EXPORT_WEIGHTS

STEP_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
RUN_INFO = "run_info.json"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / COMPLETE_MARKER).is_file()


class CheckpointError(ValueError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _to_bytes(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


class Checkpointer:
    """Saves and restores (model, optimizer, trainer state) at step boundaries.

    ``trainer_state`` is any picklable dict (step, LR scheduler, data loader, RNG); it is
    stored per rank because data-loader positions and RNG streams differ between ranks.
    """

    def __init__(self, output_dir: Union[str, Path], keep_last: int = 2, async_save: bool = False):
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending = None  # (future, tmp folder, final folder) of an async save in flight
        # Called with the folder after its shards are written, before it is marked complete
        # (the reliability tests kill the process here).
        self.before_complete = None

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

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: Dict,
             run_info: Optional[Dict] = None) -> Path:
        self.wait()
        final = self.dir / f"{STEP_PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            for stale in self.incomplete_checkpoints():
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            if run_info is not None:
                (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2, default=str))
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
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

    def load(self, path: Union[str, Path], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict:
        """Load model and optimizer in place; return this rank's trainer state."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(
                f"resume: {str(path)!r} is not a complete checkpoint (no .metadata or no {COMPLETE_MARKER} marker: "
                f"its save never finished). Fix: give a folder like <output_dir>/checkpoints/{STEP_PREFIX}00000100, "
                "or resume=true for the latest complete one."
            )
        model_sd, optim_sd = get_state_dict(model, optimizer)
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
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        buf = state[key]
        buf.seek(0)
        return torch.load(buf, weights_only=False)


def load_model_weights(path: Union[str, Path], model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Load only the student weights of a step checkpoint into ``model`` (built on meta or not).

    For evaluating intermediate checkpoints: no optimizer, no trainer state, any world
    size (DCP reshards).
    """
    from components.models import rebuild_rope_caches

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


def export_model(
    model: torch.nn.Module,
    args: ModelArgs,
    out_dir: Union[str, Path],
    tokenizer_path: Optional[Union[str, Path]] = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``) atomically.

    Collective under FSDP2: every rank calls it, the full state is gathered (offloaded to
    CPU) and rank 0 writes it.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out_dir = Path(out_dir)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        _barrier()
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in full.items()}
    save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
    (tmp / EXPORT_CONFIG).write_text(json.dumps({"format": "letrecipes", "model": args.to_dict()}, indent=2))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / EXPORT_TOKENIZER)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    _barrier()
    return out_dir
