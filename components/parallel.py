"""Process groups, FSDP2, torchao float8, per-block compile and activation checkpointing.

The order the recipes apply them in is the one that composes (torchtitan's):
float8 conversion -> activation checkpointing -> compile -> FSDP2 sharding.
Every function here takes a built model and changes it in place; none knows recipes.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: torch.device, timeout_s: int = 600) -> Tuple[int, int]:
    """(rank, world size); joins the torchrun process group when there is one.

    NCCL for CUDA, gloo for CPU. A single process (no ``WORLD_SIZE`` > 1) needs no group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Linear layers inside transformer blocks whose dims are multiples of 16."""
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: nn.Module, recipe: str = "tensorwise", fsdp_float8_all_gather: bool = False,
                 emulate: bool = False) -> List[str]:
    """Convert the blocks' linear layers to torchao float8 training; return the skipped ones.

    Never converted: the output head, embeddings, and linears with a dimension that is
    not a multiple of 16 (float8 matmuls need it). The projector and the teacher are
    separate modules, so they are never touched.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather, emulate=emulate)
    else:
        if fsdp_float8_all_gather:
            raise ValueError("parallel.float8.fsdp_float8_all_gather works with recipe=tensorwise only.")
        config = Float8LinearConfig.from_recipe_name(recipe)
        if emulate:
            config = dataclasses.replace(config, emulate=True)
    skipped = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and not is_float8_eligible(m, fqn)]
    convert_to_float8_training(model, module_filter_fn=is_float8_eligible, config=config)
    return skipped


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> int:
    """Recompute block activations in backward: every block (``full``) or every k-th (``selective``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpointing={mode!r}: use full, selective or none.")
    step = 1 if mode == "full" else max(1, every)
    wrapped = 0
    for i, block in enumerate(model.layers):
        if i % step == 0:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    return wrapped


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (state-dict keys unchanged)."""
    for block in model.layers:
        block.compile()


def mixed_precision_policy(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def shard_model(model: nn.Module, mp_policy=None, reshard_after_forward: bool = True) -> None:
    """FSDP2: one unit per transformer block, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


def shard_module(module: nn.Module, mp_policy=None) -> None:
    """FSDP2 for a small trainable module of its own (the aligner's projectors)."""
    from torch.distributed.fsdp import fully_shard

    if any(p.requires_grad for p in module.parameters()):
        fully_shard(module, **({"mp_policy": mp_policy} if mp_policy is not None else {}))


def shard_teacher(model: nn.Module) -> None:
    """FSDP2 for a frozen teacher whose forward may stop early (no root unit: the blocks,
    the embedding and the final norm each gather their own weights when they run)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model.tok_embeddings)
    fully_shard(model.norm)


def all_reduce_mean(values: dict, device: torch.device) -> dict:
    """Average a dict of floats over ranks (one collective)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    buf /= dist.get_world_size()
    return dict(zip(keys, buf.tolist()))


def all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return buf.tolist()


def keep_freed_memory_in_process() -> bool:
    """glibc malloc: keep freed memory for reuse instead of handing it back to the OS.

    A CPU training step frees and re-allocates the same large activation buffers every
    step. By default glibc serves big blocks with fresh ``mmap`` calls and unmaps them on
    free, so every step page-faults its activations back in: 15-25% of a step on 2 cores
    for the tiny configs (docs/results.md). Returns False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
                and libc.mallopt(m_mmap_threshold, ctypes.c_int(2**30)))


def materialize(model: nn.Module, device: torch.device, seed: int, init_std: float = 0.02) -> None:
    """Allocate a meta-device model that FSDP2 has sharded, and initialise it from scratch.

    Each rank allocates only its shards; the random init runs on the sharded (DTensor)
    parameters. On CUDA, DTensor's RNG tracker draws each shard from its place in one
    stream. On CPU DTensor draws every shard from the local generator, so each rank is
    seeded differently for the init (else all shards would be copies of one), then the
    common seed is restored. RoPE caches are non-persistent buffers: rebuilt on ``device``.
    """
    from components.models import init_weights, rebuild_rope_caches

    model.to_empty(device=device)
    with torch.device(device):
        rebuild_rope_caches(_blocks(model))
    per_rank_stream = device.type == "cpu" and dist.is_initialized()
    if per_rank_stream:
        torch.manual_seed(seed * 7919 + 1 + dist.get_rank())
    init_weights(model, std=init_std)
    if per_rank_stream:
        torch.manual_seed(seed)


def _blocks(model: nn.Module):
    """The transformer blocks, looking through activation-checkpoint wrappers."""
    for block in model.layers:
        yield getattr(block, "_checkpoint_wrapped_module", block)
