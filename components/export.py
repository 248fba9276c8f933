"""The final export: ``<output_dir>/final`` = model.safetensors + config.json (+ tokenizer.json).

Written atomically (into ``final.tmp``, then renamed). ``letrecipes_teacher`` reads the
same folder back, so a trained model can be the next run's teacher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from letrecipes.components.models import ModelArgs

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_TOKENIZER = "tokenizer.json"
EXPORT_FORMAT = "letrecipes"  # config.json's "format" value


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    (tmp / EXPORT_CONFIG).write_text(json.dumps({"format": EXPORT_FORMAT, "model": args.to_dict()}, indent=2))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / EXPORT_TOKENIZER)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    _barrier()
    return out_dir
