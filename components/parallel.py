"""Process groups, FSDP2, torchao float8, per-block compile and activation checkpointing.

The order the recipes apply them in is the one that composes (torchtitan's):
float8 conversion -> activation checkpointing -> compile -> FSDP2 sharding.
Every function here takes a built model and changes it in place; none knows recipes.
"""

from __future__ import annotations


import contextlib
import dataclasses
import hashlib
import json
import locale
import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar, Union

import torch
import torch.distributed as dist
from torch import nn

from letrecipes.components.errors import LetRecipesError, LetRecipesWarning, StopRequested, errors_within
from letrecipes.components.files import LOCALE_FIX, cause_and_fix, os_error_in, shortened
from letrecipes.components.registry import ComponentError
from letrecipes.components.resume import flatten
from letrecipes.components.run_info import outdated, torchrun_attempt

T = TypeVar("T")


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors with gloo beside it for CPU tensors (DCP's async save stages
    the state on the CPU and needs a CPU backend); gloo alone on CPU."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: int = 600, single_process_group: bool = False) -> Tuple[int, int]:
    """(rank, world size); joins the torchrun process group when there is one.

    A single process (no ``WORLD_SIZE`` > 1) needs no group, unless ``single_process_group``:
    FSDP2 at world size 1 (the sharded code path on one GPU, or in a CPU test) runs in a
    group of one, which needs no rendezvous (an in-memory store).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not single_process_group:
        return 0, 1
    if not dist.is_initialized():
        if world_size == 1:
            kwargs = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        else:
            try:
                kwargs = restart_safe_store(timedelta(seconds=timeout_s))
            except dist.DistError as err:
                raise _joining_failed(err, timeout_s) from err
        if device.type == "cuda":
            # The group is bound to this process's GPU: NCCL's barrier (the checkpoint's, the
            # start's) otherwise guesses the GPU from the global rank, which hangs where
            # ranks map to GPUs otherwise (torch warns "devices used by this process are
            # currently unknown"); NCCL's communicator is also made at once (a bad setup
            # fails here, not at the first step) and HSDP's sub-groups are split from it.
            kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(kwargs["device_id"])
        try:
            dist.init_process_group(backend=process_group_backend(device), timeout=timedelta(seconds=timeout_s),
                                    **kwargs)
        except dist.DistError as err:
            raise _joining_failed(err, timeout_s) from err
    return dist.get_rank(), dist.get_world_size()


def restart_safe_store(timeout: timedelta) -> Dict[str, Any]:
    """The process group's store, rank and size, from torchrun's environment as
    ``init_process_group`` reads them, with keys of this attempt's own. torchrun's
    restarts (``--max-restarts``) hand the new processes the same store as the old ones
    (its c10d rendezvous): gloo then read the dead processes' addresses from it and every
    restart failed in ``connectFullMesh``, "Connection refused" (seen here on 2 of 3
    restarts)."""
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"letrecipes/attempt_{torchrun_attempt()}/", store), "rank": rank,
            "world_size": size}


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _check_launch_environment() -> None:
    """The variables torchrun sets for each process, read before any is used: one left in a
    shell or a job script (``export WORLD_SIZE=8`` without torchrun), or set by hand and
    inconsistent, ended in torch's traceback ("environment variable RANK expected"), or in a
    wait for peers that never come that lasted the whole process_group_timeout_s."""
    fix = ("start the processes with torchrun, which sets all of them (tune run --nproc_per_node N ...), or unset "
           "them to train in one process")
    numbers = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            numbers[name] = int(text)
        except ValueError:
            raise ComponentError(f"the environment variable {name}={shortened(repr(text), 40)} is no whole number. "
                                 f"Fix: {fix}.") from None
    world = numbers.get("WORLD_SIZE", 1)
    if world < 1:
        raise ComponentError(f"the environment variable WORLD_SIZE={world}: a run has 1 process or more. Fix: {fix}.")
    if world > 1:
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ComponentError(f"WORLD_SIZE={world} in the environment makes this one of {world} processes, but "
                                 f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Fix: {fix}.")
        if not 0 <= numbers["RANK"] < world:
            raise ComponentError(f"RANK={numbers['RANK']} in the environment is not one of the {world} ranks "
                                 f"0..{world - 1} (WORLD_SIZE={world}). Fix: {fix}.")
        if not 0 < numbers["MASTER_PORT"] < 65536:
            raise ComponentError(f"MASTER_PORT={numbers['MASTER_PORT']} in the environment is no port (1..65535). "
                                 f"Fix: {fix}.")
        address = os.environ["MASTER_ADDR"]
        try:
            socket.getaddrinfo(address, numbers["MASTER_PORT"], type=socket.SOCK_STREAM)
        except socket.gaierror as err:  # torch retried it for the store's whole timeout, then a C++ stack
            raise ComponentError(
                f"MASTER_ADDR={address} does not resolve to an address ({err.strerror}): it is where every process "
                "meets, and torchrun sets it to its node's host name unless told another address. Fix: make the "
                "host name resolve (/etc/hosts, DNS), or give torchrun an address of this node (on one machine: tune "
                "run --nproc_per_node N --local-addr 127.0.0.1 ...), then run the same command again.") from None
    local_rank, local_world = numbers.get("LOCAL_RANK", 0), numbers.get("LOCAL_WORLD_SIZE")
    if local_rank < 0 or (local_world is not None and not 0 <= local_rank < local_world):
        ranks = f"this node's local ranks 0..{local_world - 1} (LOCAL_WORLD_SIZE={local_world})" \
            if local_world is not None and local_world > 0 else "a local rank (0 or more)"
        raise ComponentError(f"LOCAL_RANK={local_rank} in the environment is not one of {ranks}. Fix: {fix}.")


def _joining_failed(err: BaseException, timeout_s: int) -> ComponentError:
    """One line for a process group that could not form: its peers never came (the store's
    or the socket's timeout), or NCCL could not set up its communicator."""
    said = " ".join(str(err).split())[:300]
    if isinstance(err, dist.DistBackendError):
        return ComponentError(f"process group: the communication backend could not start ({said}). Fix: rerun with "
                              "NCCL_DEBUG=INFO to see why (a GPU in use by another process, a network interface "
                              "NCCL cannot use: NCCL_SOCKET_IFNAME), then run the same command again.")
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return ComponentError(
        f"process group: rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not gather the others "
        f"at {where} within process_group_timeout_s={timeout_s} ({said}). Fix: start every process (torchrun starts "
        "them: tune run --nproc_per_node N ...; on several nodes, one torchrun per node with the same "
        f"--rdzv_endpoint); check that each node reaches {where} (its address, a firewall); or raise "
        "process_group_timeout_s for slow starts.")


def _check_launched_by_torchrun() -> None:
    """``srun python -m letrecipes.pretrain`` starts N processes that know nothing of each
    other (no WORLD_SIZE): each would train alone, and all but one would stop at the run
    folder's lock, naming another run. Read from the job step's task count, which srun
    sets: a batch script of a many-task job (SLURM_NTASKS) running one process is fine."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks > 1 and "WORLD_SIZE" not in os.environ:
        raise ComponentError(
            f"this process is one of {tasks} Slurm tasks, started without torchrun (no WORLD_SIZE): each would train "
            "alone. Fix: start one torchrun per node, which starts the processes (srun --ntasks-per-node=1 tune run "
            "--nnodes $SLURM_NNODES --nproc_per_node <GPUs per node> --rdzv_backend c10d --rdzv_endpoint "
            "<first node>:29500 letrecipes/let_pretrain --config ...; docs/scale.md).")


def _check_one_gpu_per_process() -> None:
    """Process ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``: more processes on a node than GPUs it
    can see would fail in NCCL's setup with "invalid device ordinal" (or put two ranks on one
    GPU)."""
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = torch.cuda.device_count()
    if max(local_rank + 1, local_world) > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ComponentError(
            f"{local_world} processes on this node, one GPU each, but torch sees {visible} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "") + f". Fix: --nproc_per_node "
            f"{visible} (tune run --nproc_per_node {visible} ...), or make {local_world} GPUs visible.")


def setup_device(name: Optional[str], cpu_malloc_tuning: bool = True, timeout_s: int = 600,
                 single_process_group: bool = False) -> Tuple[torch.device, int, int, List[str]]:
    """(device, rank, world size, notes for the log): ``name`` cpu, cuda or None (cuda when
    there is one); joins the process group (collectives time out after ``timeout_s``; a
    group of one with ``single_process_group``); on CPU, tunes malloc
    (:func:`keep_freed_memory_in_process`)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ComponentError("device=cuda but torch sees no CUDA device. Fix: device=cpu, or leave device unset.")
    _check_launch_environment()
    _check_launched_by_torchrun()
    if device.type == "cuda":
        _check_one_gpu_per_process()
    notes = []
    if device.type == "cpu" and cpu_malloc_tuning and keep_freed_memory_in_process():
        notes.append("malloc keeps freed memory")
    rank, world_size = init_distributed(device, timeout_s, single_process_group)
    return local_device(device), rank, world_size, notes


def device_mesh(device: torch.device, replicate_degree: int = 1):
    """None for plain FSDP2 (one shard group: the whole world); for HSDP a 2-D mesh
    (``replicate`` x ``shard``): parameters are sharded within a group of
    world/replicate_degree ranks (a node, typically) and replicated across groups, so the
    all-gathers stay on the fast links and only gradients cross nodes."""
    if replicate_degree <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    _check_replicate_degree(replicate_degree, world)
    return init_device_mesh(device.type, (replicate_degree, world // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


def fsdp_layout(fsdp_options: Mapping[str, Any], world_size: int) -> Tuple[bool, int]:
    """(whether FSDP2 shards the model, into how many shards) for the ``fsdp`` config
    section: ``enabled: auto`` shards with more than one process; under HSDP a shard group
    is world / ``replicate_degree`` ranks."""
    enabled = fsdp_options.get("enabled", "auto")
    fsdp = world_size > 1 if enabled == "auto" else bool(enabled)
    replicate_degree = max(1, int(fsdp_options.get("replicate_degree", 1)))
    if fsdp:  # checked here, at setup's start, not when the mesh is built after the data is prepared
        _check_replicate_degree(replicate_degree, world_size)
    return fsdp, (world_size // replicate_degree if fsdp else 1)


def _check_replicate_degree(replicate_degree: int, world: int) -> None:
    if world % replicate_degree:
        raise ComponentError(f"fsdp.replicate_degree={replicate_degree} does not divide the {world} processes. "
                             "Fix: a divisor of the world size (the number of nodes, typically), or 1 for plain "
                             "FSDP2.")


def shard_rank(mesh=None) -> int:
    """This rank's place among the ranks that hold different shards."""
    if mesh is not None:
        return mesh.get_local_rank("shard")
    return dist.get_rank() if dist.is_initialized() else 0


class RanksDisagreeError(LetRecipesError):
    """The processes of one job were started with different configs, code or packages."""


SAME_THING_FIX = ("start every node with the same command, from the same folder, with the same environment variables "
                  "that the config reads and the same installation of letrecipes and its packages.")


def check_ranks_agree(facts: Dict[str, Any], fix: str = SAME_THING_FIX) -> List[str]:
    """Raise one error on every rank when any rank's ``facts`` (what_every_rank_must_share)
    differ from rank 0's: nodes launched with different overrides, environment variables the
    config reads, checkouts or package versions would otherwise each train their shard their
    own way (a learning rate, a sequence length) or hang in a collective, without an error.
    One all-gather of a digest per rank; the facts themselves are gathered only on a mismatch.
    Returns each rank's host name (the log names a rank by it)."""
    if world_size() == 1:
        return [socket.gethostname()]
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
    digests = gathered((digest, socket.gethostname()))
    if len({d for d, _ in digests}) == 1:
        return [host for _, host in digests]
    every = gathered(facts)  # every rank computes the same message from the same facts
    reference = _by_key(every[0])
    odd = [rank for rank, (d, _) in enumerate(digests) if d != digests[0][0]]
    first = _by_key(every[odd[0]])
    keys = sorted(k for k in reference.keys() | first.keys() if reference.get(k, "<unset>") != first.get(k, "<unset>"))
    shown = "; ".join(f"{k}={_short(first.get(k, '<unset>'))} against {_short(reference.get(k, '<unset>'))}"
                      for k in keys[:3])
    more = f" (and {len(keys) - 3} more: {', '.join(keys[3:8])})" if len(keys) > 3 else ""
    others = f"; {len(odd)} of the job's {world_size()} processes differ from rank 0" if len(odd) > 1 else ""
    raise RanksDisagreeError(
        f"the job's processes do not run the same thing: rank {odd[0]} (on {digests[odd[0]][1]}) differs from rank 0 "
        f"(on {digests[0][1]}): {shown}{more}{others}. Processes that differ train each shard under other settings, or "
        f"hang in a collective, without an error. Fix: {fix}")


def _by_key(facts: Dict[str, Any]) -> Dict[str, Any]:
    """The facts by dotted key, the config's keys as the user writes them (optimizer.lr)."""
    return {**flatten(facts.get("config", {})), **flatten({k: v for k, v in facts.items() if k != "config"})}


def _short(value: Any) -> str:
    return shortened(repr(value) if isinstance(value, str) else str(value), 100)


def gathered(obj: Any) -> List[Any]:
    """``obj`` from every rank, in rank order (a list of one without a group)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size() -> int:
    """The number of processes in the group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def on_rank0(work: Callable[[], T], share: bool = True) -> Optional[T]:
    """``work()`` run on rank 0 alone (by the one process when there is no group).

    Every rank gets its value (``share``), or None with the value kept on rank 0 (a state
    dict that is then broadcast tensor by tensor). If it raises, every rank raises: a
    :class:`LetRecipesError` or a signal's stop as itself, anything else as one naming rank 0's error; rank 0
    re-raises its own. Without this, a rank 0 that failed alone would leave the others
    waiting in their next collective until the group's timeout.
    """
    if world_size() == 1:
        return work()
    answer: List[Any] = [None]
    own_error = None
    if dist.get_rank() == 0:
        try:
            value = work()
            answer[0] = ("value", value if share else None)
        except (Exception, StopRequested) as err:  # noqa: BLE001 - every rank must hear of it, whatever it is
            own_error = err
            ours = isinstance(err, (LetRecipesError, StopRequested))  # a signal's stop: every rank stops with it
            answer[0] = ("error", type(err) if ours else None, str(err) if ours else f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(answer, src=0)
    if own_error is not None:
        raise own_error
    if answer[0][0] == "error":
        error_type = answer[0][1] or LetRecipesError
        shared = error_type(answer[0][2] if answer[0][1] else f"rank 0 failed: {answer[0][2]}")
        shared.shared_by_rank0 = True  # rank 0 prints it; this rank only stops (errors_as_one_line)
        raise shared
    if dist.get_rank() == 0:
        return value
    return answer[0][1]


# what gloo and NCCL say when a collective gave up: waiting for a process (timeout), or
# because one went away (its connection closed)
COLLECTIVE_TIMEOUT = ("Timed out waiting", "collective operation timeout", "Watchdog caught collective")
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "Broken pipe")


def collective_failure(err: BaseException) -> Optional[str]:
    """``"timeout"`` or ``"peer gone"`` when ``err`` is a collective of the process group
    that failed for want of another process; None for anything else."""
    if not isinstance(err, RuntimeError) or not dist.is_available() or not dist.is_initialized():
        return None
    text = str(err)
    if any(mark in text for mark in COLLECTIVE_TIMEOUT):
        return "timeout"
    if any(mark in text for mark in PEER_GONE):
        return "peer gone"
    return None


def local_rank(rank: int) -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; ``rank`` without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", rank))


CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def memory_per_process_gb(device: torch.device, local_processes: Optional[int] = None,
                          meminfo: str = "/proc/meminfo", cgroups=CGROUP_LIMITS) -> Optional[float]:
    """GiB this process may still allocate: a GPU's free memory, or on CPU the host's
    available memory (/proc/meminfo, else psutil's; less, if a container's cgroup limit
    leaves less) shared by the processes of this host. None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # no /proc (macOS): psutil's figure (it comes with torchtune)
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except Exception:
            return None
    for limit_path, usage_path in cgroups:
        try:
            limit = Path(limit_path).read_text().strip()
            if limit.isdigit() and int(limit) < 2**60:  # "max" or a near-2^63 number: no limit
                available = min(available, int(limit) - int(Path(usage_path).read_text().strip()))
        except (OSError, ValueError):
            continue
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    share = max(0, available) / max(1, local) / 2**30
    limited = rlimit_left_gb()
    return min(share, limited[0]) if limited is not None else share


def rlimit_left_gb(statm: str = "/proc/self/statm") -> Optional[Tuple[float, str]]:
    """GiB this process may still map under its own limits, and which: ``ulimit -v`` (the
    address space, which a cluster's login node or an older scheduler sets) or ``ulimit -d``
    (the data segment: every private mapping, since Linux 4.7). The tighter of the two;
    None where neither is set (or there is no /proc to read the sizes from). A run over it
    was a DefaultCPUAllocator traceback while its model was being built."""
    import resource

    try:
        fields = Path(statm).read_text().split()
        page = os.sysconf("SC_PAGE_SIZE")
        used = {"ulimit -v": int(fields[0]) * page, "ulimit -d": int(fields[5]) * page}  # size, data + stack
    except (OSError, ValueError, IndexError):
        return None
    left = []
    for name, limit in (("ulimit -v", resource.RLIMIT_AS), ("ulimit -d", resource.RLIMIT_DATA)):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            left.append((max(0, soft - used[name]) / 2**30, name))
    return min(left) if left else None


def parallelize(
    model: nn.Module,
    device: torch.device,
    fsdp: bool,
    compute_dtype: Optional[torch.dtype],
    float8: Mapping[str, Any],
    activation_checkpointing: Mapping[str, Any],
    compile: bool,
    fsdp_options: Mapping[str, Any],
    seed: int,
    init_std: float = 0.02,
    mesh=None,
) -> Tuple[Any, List[str]]:
    """Apply float8 -> activation checkpointing -> compile -> FSDP2 (the order that composes).

    Returns (the FSDP mixed-precision policy or None, notes for the log). Without FSDP the
    model is moved to ``device``; with it, the meta-device model is sharded, then allocated
    and initialised shard by shard (no rank ever holds the whole model).
    """
    notes = []
    if float8.get("enabled", False) and not float8.get("emulate", False):
        check_float8_device(device)
    if not fsdp:
        model.to(device)
    if float8.get("enabled", False):
        recipe = float8.get("recipe", "tensorwise")
        skipped = apply_float8(model, recipe=recipe, fsdp_float8_all_gather=float8.get("fsdp_float8_all_gather", False),
                               emulate=float8.get("emulate", False))
        notes.append(f"float8 {recipe} (kept high precision: {', '.join(skipped) if skipped else 'none'})")
    mode = activation_checkpointing.get("mode", "none")
    if mode not in ("none", None):
        wrapped = apply_activation_checkpointing(model, mode, int(activation_checkpointing.get("every", 2)))
        notes.append(f"activation checkpointing {mode} ({wrapped} blocks)")
    if compile:
        compile_blocks(model)
        notes.append("compiled blocks")
    mp_policy = None
    if fsdp:
        if compute_dtype is not None:  # FSDP2 casts parameters itself; no autocast on top
            mp_policy = mixed_precision_policy(compute_dtype)
        shard_model(model, mp_policy, bool(fsdp_options.get("reshard_after_forward", True)), mesh=mesh)
        notes.append(("HSDP " + " x ".join(f"{n} {d}" for n, d in zip(mesh.mesh_dim_names, mesh.shape))
                      if mesh is not None else "FSDP2") + (" bf16 params / fp32 reduce" if mp_policy else " fp32"))
        materialize(model, device, seed=seed, init_std=init_std, mesh=mesh)
        notes.append("initialised after sharding")
    return mp_policy, notes


def is_float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Linear layers inside transformer blocks whose dims are multiples of 16."""
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


# float8 tensor cores: NVIDIA Ada (8.9: L40S, RTX 4090) and Hopper (9.0: H100, H200) and later
FLOAT8_CAPABILITY = (8, 9)


def check_float8_device(device: torch.device) -> None:
    """float8 matmuls where the device has none: an older GPU stops before any step (torch's
    float8 matmul raises there at the first one, after the model is built and compiled); a
    CPU runs torch's reference kernel, hundreds of times slower than bf16, which is said once."""
    fix = ("float8.enabled=false (bf16), or float8.emulate=true to check float8's numerics at bf16 speed (no "
           "speed-up)")
    if device.type == "cuda" and torch.version.hip is None:
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < FLOAT8_CAPABILITY:
            raise ComponentError(
                f"float8.enabled=true needs float8 tensor cores (compute capability 8.9 or higher: H100, H200, L40S, "
                f"RTX 4090); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Fix: {fix}.")
    elif device.type == "cpu":
        warnings.warn(f"float8.enabled=true on a CPU: torch has no fast float8 matmul there (its reference kernel took "
                      "3.1 s for a 4096 x 128 x 384 matmul that bf16 does in 0.009 s on 2 cores; one step of "
                      "pretrain_tiny, width 128, did not end in 10 minutes). Fix: "
                      f"{fix}; float8 is for GPUs with float8 tensor cores.",
                      LetRecipesWarning, stacklevel=2)


BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 tensor cores
# A CPU whose bf16 matmuls take this many times an fp32 one's has no bf16 instructions (torch then converts
# every value): measured 46-83x on an AMD EPYC with AVX2 alone, where a 4096 x 128 x 384 bf16 matmul took 0.217 s
# (fp32: 0.005 s) against 0.009 s on an AMX Xeon. The gap is wide: the measurement's noise cannot move a CPU across it.
BF16_SLOWDOWN_LIMIT = 3.0
_cpu_bf16_slowdown: Optional[float] = None


def cpu_bf16_slowdown() -> float:
    """How many times longer this CPU takes for a 256 x 256 x 256 matmul in bf16 than in fp32
    (the best of three of each, after one of each to warm up: 0.1 s in all on an AVX2-only EPYC,
    where bf16 is slowest). Measured once per process."""
    global _cpu_bf16_slowdown
    if _cpu_bf16_slowdown is None:
        import time

        def best_time(dtype: torch.dtype) -> float:
            a, b = torch.randn(256, 256).to(dtype), torch.randn(256, 256).to(dtype)
            a @ b
            times = []
            for _ in range(3):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            return max(min(times), 1e-9)

        _cpu_bf16_slowdown = best_time(torch.bfloat16) / best_time(torch.float32)
    return _cpu_bf16_slowdown


def bf16_is_slow(device: Union[str, torch.device]) -> Optional[str]:
    """Why ``device`` computes bf16 slowly (a GPU without bf16 tensor cores, a CPU without bf16
    instructions), as the middle of a sentence; None where bf16 runs at speed."""
    device = torch.device(device)
    if device.type == "cuda" and torch.version.hip is None:
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < BF16_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}), which "
                    "has no bf16 tensor cores (they start at 8.0: A100, A10, L4, H100): torch runs bf16 there without "
                    "them, slowly, and torch.compile may refuse it")
    elif device.type == "cpu":
        slowdown = cpu_bf16_slowdown()
        if slowdown > BF16_SLOWDOWN_LIMIT:
            from letrecipes.components.run_info import cpu_model

            name, flags = cpu_model()
            listed = (f" (it has {', '.join(flags)}, neither avx512_bf16 nor amx_bf16)"
                      if flags and not any("bf16" in flag for flag in flags) else "")
            return (f"this CPU ({name or 'unnamed'}), where a bf16 matmul took {slowdown:.0f}x an fp32 one (256 x 256 "
                    f"x 256, measured now): without bf16 instructions{listed} torch converts every value")
    return None


def check_bf16_device(device: Union[str, torch.device], key: str = "dtype") -> None:
    """bf16 asked for on a device that computes it slowly, said once at setup (by rank 0): a
    GPU without bf16 tensor cores (V100, T4, P100: compute capability below 8.0), where
    torch.compile's kernels may also refuse the dtype, or a CPU without bf16 instructions
    (AVX2 alone: most laptops before 2023), where a tiny config's step took 14x longer than
    in fp32. fp32 (or fp16 for a teacher on such a GPU, which runs no backward) is the setting
    that uses the device. A warning, not an error: the numbers are right."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return  # said by rank 0 alone: every rank of a job has the same kind of device
    reason = bf16_is_slow(device)
    if reason is None:
        return
    teacher = key.endswith("teacher.dtype")
    if torch.device(device).type == "cuda":
        fix = (f"{key}=fp16 (a frozen teacher runs no backward) or fp32" if teacher
               else f"{key}=fp32 (float16 training would need loss scaling, which letrecipes does not do)")
    else:
        fix = f"{key}=fp32"
    warnings.warn(f"{key}=bf16 on {reason}. Fix: {fix}, or {key}=auto, which takes bf16 only where the device runs "
                  "it at speed.", LetRecipesWarning, stacklevel=2)


def resolve_dtype(name: Any, device: Union[str, torch.device], key: str = "dtype") -> Tuple[str, Optional[str]]:
    """A config's dtype with ``auto`` made concrete: bf16 where ``device`` runs it at speed,
    fp32 where it does not, with the reason (None otherwise). Rank 0's answer for every rank:
    ranks that measured on their own could disagree on a loaded machine. Every rank must call
    it (a collective, where there is a group)."""
    if str(name) != "auto":
        return str(name), None
    return tuple(on_rank0(lambda: auto_dtype(device)))


def auto_line(keys: str, slow: Optional[str]) -> str:
    """The line that says what ``auto`` came to for ``keys`` (``dtype=auto, teacher.dtype=auto``)."""
    return (f"{keys}: fp32, since bf16 would run on {slow}" if slow else
            f"{keys}: bf16, which this device computes at speed")


def auto_dtype(device: Union[str, torch.device]) -> Tuple[str, Optional[str]]:
    """What ``auto`` is on ``device`` as this process sees it: bf16, or fp32 and why."""
    reason = bf16_is_slow(device)
    return ("fp32", reason) if reason else ("bf16", None)


# The oldest torchao float8 training was run with here (tests/test_distributed.py, test_gpu_check.py
# pass with 0.13.0, 0.14.1 and 0.15.0, the pin, under torch 2.13): with 0.10 and 0.11 a sharded
# float8 run trained, then its export failed (torch.load refuses torchao's
# WeightWithDynamicFloat8CastTensor); 0.12 does not import under torch 2.13.
TORCHAO_FLOAT8_MIN = (0, 13)


def apply_float8(model: nn.Module, recipe: str = "tensorwise", fsdp_float8_all_gather: bool = False,
                 emulate: bool = False) -> List[str]:
    """Convert the blocks' linear layers to torchao float8 training; return the skipped ones.

    Never converted: the output head, embeddings, and linears with a dimension that is
    not a multiple of 16 (float8 matmuls need it). The projector and the teacher are
    separate modules, so they are never touched.
    """
    problem = outdated("torchao", TORCHAO_FLOAT8_MIN, below="0.16")  # 0.16+ breaks torchtune 0.6.1's imports
    if problem:
        raise ComponentError(f"float8.enabled=true {problem}, or float8.enabled=false.")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather, emulate=emulate)
    else:
        if fsdp_float8_all_gather:
            raise ComponentError("float8.fsdp_float8_all_gather works with recipe=tensorwise only.")
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
        raise ComponentError(f"activation_checkpointing.mode={mode!r}: use full, selective or none.")
    step = 1 if mode == "full" else max(1, every)
    wrapped = 0
    for i, block in enumerate(model.layers):
        if i % step == 0:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    return wrapped


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (state-dict keys unchanged): those of
    a decoder (its ``layers``), or the blocks given as a ``ModuleList`` (a teacher's ``blocks``)."""
    for block in model if isinstance(model, nn.ModuleList) else model.layers:
        block.compile()


def _cause_of(err: BaseException, kind: type) -> Optional[BaseException]:
    """The first exception of ``kind`` in ``err``'s chain (itself, its causes and contexts)."""
    return next((e for e in errors_within(err) if isinstance(e, kind)), None)


def _noexec(folder: Optional[str]) -> bool:
    try:
        return bool(folder) and bool(os.statvfs(folder).f_flag & os.ST_NOEXEC)
    except (OSError, AttributeError):  # gone, or no statvfs flags (not POSIX)
        return False


def _in_inductor_cache(path: str) -> bool:
    """Whether ``path`` is in torch's compiler cache: $TORCHINDUCTOR_CACHE_DIR, else
    torchinductor_<user> in the temporary folder (torch's own rule, read here because
    importing torch's is what failed: it makes the folder at import)."""
    import tempfile

    path = os.path.abspath(path)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return path.startswith(os.path.abspath(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
    with contextlib.suppress(OSError):  # no usable temporary folder
        return path.startswith(os.path.join(tempfile.gettempdir(), "torchinductor_"))
    return False


def rehearse_compile(device: torch.device, key: str = "compile") -> None:
    """Compile and run one small function on ``device`` with torch.compile's default backend,
    so that a machine that cannot compile (no C++ compiler or no Python headers for CPU
    kernels, no Triton for GPU ones; a cache folder it cannot write; a locale it cannot
    read its own files in) is named at setup, in one line, and not by a 100-line traceback
    from the first step after the corpus was prepared. It costs a few seconds (most of it
    importing the compiler, which the model's compile needs anyway)."""
    def probe(x):
        return torch.nn.functional.silu(x) * x.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()

    try:
        torch.compile(probe)(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(device))  # not the global RNG
    except Exception as err:  # inductor's errors are of many kinds; all mean the same here
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        fix = ("install Triton for this torch (pip install triton, matching torch's version)" if device.type == "cuda"
               else "install a C++ compiler and Python's headers (apt-get install g++ python3-dev; or set CXX)")
        cause = f"on this machine ({type(err).__name__}: {first[:300]})"
        written = os_error_in(err)  # an OS error with its errno (and file), as the run's own are named
        if _cause_of(err, UnicodeError):  # inductor opens its own UTF-8 templates in the locale's encoding (EUC-JP)
            cause = (f"under this locale: torch's compiler reads its own UTF-8 files in the locale's encoding, "
                     f"{locale.getpreferredencoding(False)} ({type(err).__name__}: {first[:300]})")
            fix = LOCALE_FIX
        elif _cause_of(err, OSError) and _noexec(cache := os.environ.get("TORCHINDUCTOR_CACHE_DIR")):  # torch sets it
            # Docker mounts /tmp noexec: the kernel it built there cannot be loaded ("failed to map segment")
            cause = (f"here: its cache folder {cache} is on a filesystem mounted noexec, where the kernels it builds "
                     f"cannot be loaded ({type(err).__name__}: {first[:200]})")
            fix = ("TORCHINDUCTOR_CACHE_DIR=<a folder on a filesystem that allows running programs> (or remount it "
                   "with exec)")
        elif written is not None and written.filename and _in_inductor_cache(str(written.filename)):
            # a read-only root filesystem (a container's), a full /tmp, a cache folder on a mount that is not there
            why, fix = cause_and_fix(written)
            cause = (f"here: it cannot write its cache folder (TORCHINDUCTOR_CACHE_DIR, else torchinductor_<user> in "
                     f"the temporary folder): {why}")
            fix = f"{fix}, or TORCHINDUCTOR_CACHE_DIR=<a writable folder>"
        raise ComponentError(f"{key}=true: torch.compile cannot compile {cause}. Fix: {fix}, or {key}=false.") from None
    finally:
        dynamo = sys.modules.get("torch._dynamo")  # absent where importing it failed (its cache folder, made at import)
        if dynamo is not None:
            dynamo.reset()  # the probe leaves nothing in dynamo's caches for the model's compile


def mixed_precision_policy(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def shard_model(model: nn.Module, mp_policy=None, reshard_after_forward: bool = True, mesh=None) -> None:
    """FSDP2: one unit per transformer block, then the root (embeddings, norm, head); HSDP
    with a 2-D ``mesh``.

    ``reshard_after_forward`` applies to every block but the last, whose backward comes
    right after its forward, and never to the root, which is gathered from the start of the
    forward to the end of the backward either way: resharding them would only gather them
    once more (at let_7b, 2.5 GB of traffic per micro-batch) and hold nothing less at the
    peak."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if mesh is not None:
        kwargs["mesh"] = mesh
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < last, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)


def all_reduce_across_replicas(module: nn.Module, enabled: bool) -> None:
    """HSDP: whether the next backward all-reduces gradients across the replicas. Gradient
    accumulation turns it off for all but a step's last micro-batch: the reduce-scatter
    within a shard group still runs (gradients stay sharded, so memory is unchanged) and
    adds into the sharded gradient, and the last micro-batch's all-reduce carries the sum
    of them all. The slow, inter-node collective then runs once per step, not once per
    micro-batch."""
    from torch.distributed.fsdp import FSDPModule

    for part in module.modules():
        if isinstance(part, FSDPModule):
            part.set_requires_all_reduce(enabled, recurse=False)


def reduce_gradients(module: nn.Module, enabled: bool) -> None:
    """FSDP2: whether the next backward reduces gradients at all (reduce-scatter, and for
    HSDP the all-reduce across replicas). ``fsdp.reduce_every_micro_batch: false`` turns it
    off for all but a step's last micro-batch: the earlier ones accumulate unsharded fp32
    gradients on every rank (4 bytes a parameter, not divided among the shards), and the
    last one reduces their sum, so a step's gradient traffic is divided by the number of
    micro-batches. Memory for traffic: for a communication-bound run with memory to spare."""
    from torch.distributed.fsdp import FSDPModule

    for part in module.modules():
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled, recurse=False)


def shard_module(module: nn.Module, mp_policy=None, mesh=None) -> None:
    """FSDP2 for a small trainable module of its own (the aligner's projectors), on the
    student's mesh (gradient clipping takes one norm over both)."""
    from torch.distributed.fsdp import fully_shard

    if any(p.requires_grad for p in module.parameters()):
        kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
        fully_shard(module, **kwargs, **({"mesh": mesh} if mesh is not None else {}))


def shard_teacher(model: nn.Module, mesh=None) -> None:
    """FSDP2 for a frozen teacher whose forward may stop early (no root unit: the blocks,
    the embedding and the final norm each gather their own weights when they run)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mesh is not None else {}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model.tok_embeddings, **kwargs)
    fully_shard(model.norm, **kwargs)


def all_reduce_mean(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over ranks: one collective, no host sync."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    buf = torch.stack([values[k].detach().reshape(()).double() for k in keys])
    dist.all_reduce(buf)
    buf /= dist.get_world_size()
    return dict(zip(keys, buf.unbind()))


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


def materialize(model: nn.Module, device: torch.device, seed: int, init_std: float = 0.02, mesh=None) -> None:
    """Allocate a meta-device model that FSDP2 has sharded, and initialise it from scratch.

    Each rank allocates only its shards; the random init runs on the sharded (DTensor)
    parameters. On CUDA, DTensor's RNG tracker draws each shard from its place in one
    stream. On CPU DTensor draws every shard from the local generator, so each rank is
    seeded by its shard's place for the init (else all shards would be copies of one;
    HSDP replicas of a shard draw alike), then the common seed is restored. RoPE caches are
    non-persistent buffers: rebuilt on ``device``.
    """
    from letrecipes.components.models import init_weights, rebuild_rope_caches

    model.to_empty(device=device)
    with torch.device(device):
        rebuild_rope_caches(_blocks(model))
    shards = mesh.shape[mesh.mesh_dim_names.index("shard")] if mesh is not None else (
        dist.get_world_size() if dist.is_initialized() else 1)
    per_rank_stream = device.type == "cpu" and shards > 1
    if per_rank_stream:  # replicas of one shard (HSDP) draw the same stream
        torch.manual_seed(seed * 7919 + 1 + shard_rank(mesh))
    init_weights(model, std=init_std)
    if per_rank_stream:
        torch.manual_seed(seed)


def _blocks(model: nn.Module):
    """The transformer blocks, looking through activation-checkpoint wrappers."""
    for block in model.layers:
        yield getattr(block, "_checkpoint_wrapped_module", block)
