"""Back-of-the-envelope cost model: parameters, FLOPs per token, memory per GPU, and
FSDP2 communication against compute per micro-batch.

Used by ``dry_run=true``; the formulas are stated in docs/scale.md. FLOPs count matmuls only (2 per multiply-add): a training step
is forward + backward = 3x forward; attention adds 2 * 2 * n_layers * seq_len * width per
token forward (QK^T and AV, causal masking not discounted). Memory assumes AdamW in fp32
sharded over the world size (FSDP2), bf16 activations, and the activation sizes of
Korthikanti et al. (2022) with a fused attention kernel (no s^2 term).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from letrecipes.components.models import POSITION_OFFSETS, ModelArgs


# Families with LayerNorms (a bias beside each scale) and a two-matrix MLP with biases.
LAYER_NORM_FAMILIES = ("opt", "gpt2", "gpt_neox")


def block_matmul_params(args: ModelArgs) -> int:
    q_width, kv_width = args.num_heads * args.dim_per_head, args.num_kv_heads * args.dim_per_head
    attn = args.embed_dim * (2 * q_width + 2 * kv_width)
    mlp = (2 if args.family in LAYER_NORM_FAMILIES else 3) * args.embed_dim * args.intermediate_dim
    return attn + mlp


def block_params(args: ModelArgs) -> int:
    q_width, kv_width = args.num_heads * args.dim_per_head, args.num_kv_heads * args.dim_per_head
    vectors = 2 * args.embed_dim  # the two norm scales
    vectors += (q_width + 2 * kv_width) if args.qkv_bias else 0
    vectors += args.embed_dim if args.output_bias else 0
    vectors += 2 * args.dim_per_head if args.qk_norm else 0
    if args.family in LAYER_NORM_FAMILIES:  # LayerNorm biases and the MLP biases
        vectors += 2 * args.embed_dim + args.intermediate_dim + args.embed_dim
    return block_matmul_params(args) + vectors


def total_params(args: ModelArgs) -> int:
    if args.stated_params:  # counted from the model itself (a teacher transformers runs: experts, SSM blocks)
        return args.stated_params
    embeddings = args.vocab_size * args.embed_dim
    head = 0 if args.tie_word_embeddings else embeddings
    final_norm = args.embed_dim * (2 if args.family in LAYER_NORM_FAMILIES else 1)
    positions = (args.max_seq_len + POSITION_OFFSETS[args.family]) * args.embed_dim if args.family in POSITION_OFFSETS \
        else 0
    return embeddings + positions + head + args.num_layers * block_params(args) + final_norm


def root_params(args: ModelArgs) -> int:
    """The root FSDP unit's parameters: all but the blocks' (embeddings, head, final norm)."""
    return max(0, total_params(args) - args.num_layers * block_params(args))


def forward_flops_per_token(args: ModelArgs, seq_len: int, layers: Optional[int] = None, head: bool = True) -> float:
    """Forward matmul FLOPs per token through ``layers`` blocks (all by default) and the head."""
    layers = args.num_layers if layers is None else layers
    per_block = 2 * block_matmul_params(args) + 4 * seq_len * args.embed_dim
    return layers * per_block + (2 * args.vocab_size * args.embed_dim if head else 0)


GIB = 1024**3
CUDA_CONTEXT_GB = 1.0  # CUDA context, cuBLAS/NCCL workspaces, allocator slack: to calibrate with gpu_check
# The estimate counts what tensors hold; PyTorch's caching allocator reserves more than that
# (blocks split and cached), so a GPU's memory is counted at 90%: by the dry run's fit and
# by the run's own memory check alike.
USABLE_SHARE = 0.9


@dataclass
class MemoryEstimate:
    """Memory per GPU in two phases, because their big terms never coincide (an H200's
    allocation trace, docs/scale.md): the loss and the activations peak at the start of the
    backward, before any gradient exists; the gradients and the root unit's fp32 gradient
    buffer peak at the optimizer step, after the activations are gone. The total is the
    larger phase, not the sum."""
    weights_and_moments_gb: float  # fp32 parameters and both AdamW moments, sharded: always resident
    gradients_gb: float  # fp32 gradients, sharded: from the backward to the optimizer step
    activations_gb: float  # saved for backward (in the compute dtype), after activation checkpointing
    loss_gb: float  # the loss peak: logits, their fp32 copy (bf16 runs), log-softmax and its gradient (or one chunk's)
    gathered_gb: float  # FSDP2 units gathered in the compute dtype (root, running and prefetched block), block grads
    root_gradient_buffer_gb: float  # the root unit's whole fp32 gradient, still held by FSDP2 at the optimizer step
    teacher_gb: float
    accumulating: bool = False  # gradient accumulation: earlier micro-batches' gradients sit beside the loss peak
    context_gb: float = CUDA_CONTEXT_GB
    accumulated_gb: Optional[float] = None  # those gradients, when not the sharded ones (reduction deferred)

    @property
    def forward_backward_gb(self) -> float:
        return (self.weights_and_moments_gb + self.activations_gb + self.loss_gb + self.gathered_gb
                + self.teacher_gb + (self.accumulated_gradients_gb if self.accumulating else 0.0))

    @property
    def accumulated_gradients_gb(self) -> float:
        return self.gradients_gb if self.accumulated_gb is None else self.accumulated_gb

    @property
    def optimizer_step_gb(self) -> float:
        return self.weights_and_moments_gb + self.gradients_gb + self.root_gradient_buffer_gb + self.teacher_gb

    @property
    def peak_phase(self) -> str:
        return "forward/backward" if self.forward_backward_gb >= self.optimizer_step_gb else "optimizer step"

    @property
    def total_gb(self) -> float:
        return max(self.forward_backward_gb, self.optimizer_step_gb) + self.context_gb


def memory_per_gpu(
    student: ModelArgs,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    activation_checkpointing: str = "none",
    teacher: Optional[ModelArgs] = None,
    teacher_sharded: bool = False,
    fsdp: Optional[bool] = None,
    gradient_accumulation_steps: int = 1,
    checkpoint_every: int = 2,
    loss_chunk_tokens: int = 0,
    compute_bytes: int = 2,
    teacher_bytes_per_param: int = 2,
    reduce_every_micro_batch: bool = True,
) -> MemoryEstimate:
    """GiB per GPU; ``fsdp`` (default: world size > 1) adds the units FSDP2 gathers.
    ``compute_bytes``: 2 when the run computes in bf16, 4 in fp32 (``dtype: fp32``, as on
    CPU): activations, logits and gathered parameters are that wide."""
    b = compute_bytes
    n = total_params(student)
    tokens = micro_batch * seq_len
    full_block = 17 * b * tokens * student.embed_dim  # bytes: 34 T d in bf16, fused attention
    checkpointed = recomputed_blocks(student.num_layers, activation_checkpointing, checkpoint_every)
    # a checkpointed block keeps its input, and one of them is whole again while it is recomputed
    acts = ((student.num_layers - checkpointed) * full_block + checkpointed * b * tokens * student.embed_dim
            + (full_block if checkpointed else 0))
    upcast = 4 if b < 4 else 0  # the fp32 copy of logits computed in bf16
    if loss_chunk_tokens > 0:  # components/loss.py: one chunk's logits (and their fp32 copy) and their gradient;
        # the output weight's gradient, accumulated in fp32 and kept in the compute dtype; the hidden states' gradient
        vocab, dim = student.vocab_size, student.embed_dim
        loss = (b + upcast + b) * min(loss_chunk_tokens, tokens) * vocab + (4 + b) * vocab * dim + b * tokens * dim
    else:
        loss = (b + upcast + 4 + 4) * tokens * student.vocab_size  # logits, fp32 copy, log-softmax, its gradient
    gathered = root_buffer = 0.0
    sharded = world_size > 1 if fsdp is None else fsdp
    if sharded:
        root = student.vocab_size * student.embed_dim * (1 if student.tie_word_embeddings else 2)
        # the root in the compute dtype while it runs; blocks: the running and the prefetched one,
        # two fp32 gradients in flight
        gathered = b * root + (2 * b + 2 * 4) * block_params(student)
        root_buffer = 4 * root  # reduce-scattered last, and not yet freed when the optimizer steps
    teacher_bytes = 0.0
    if teacher is not None:
        teacher_bytes = teacher_bytes_per_param * total_params(teacher) / (world_size if teacher_sharded else 1)
    deferred = sharded and gradient_accumulation_steps > 1 and not reduce_every_micro_batch
    return MemoryEstimate(12 * n / world_size / GIB, 4 * n / world_size / GIB, acts / GIB, loss / GIB,
                          gathered / GIB, root_buffer / GIB, teacher_bytes / GIB,
                          accumulating=gradient_accumulation_steps > 1,
                          accumulated_gb=4 * n / GIB if deferred else None)  # unsharded fp32, on every rank


def dtype_bytes(name: Optional[str], default: int = 2) -> int:
    """Bytes per value of a config's dtype name (bf16, fp32, fp16, and their long names). ``auto``
    counts as bf16, what it is on the GPUs the dry run plans for (Ampere and later); a recipe
    passes what auto came to on its own device."""
    widths = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "auto": 2}
    return widths.get(str(name), default) if name else default


def recomputed_blocks(num_layers: int, activation_checkpointing: str = "none", every: int = 2) -> int:
    """The blocks activation checkpointing wraps: all (``full``), every ``every``-th
    (``selective``, blocks 0, every, 2 every, ...), or none."""
    if activation_checkpointing == "full":
        return num_layers
    if activation_checkpointing == "selective":
        return math.ceil(num_layers / max(1, every))
    return 0


# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), by a word of the name torch gives the
# device; the first match counts, so the PCIe and NVL H100s come before the SXM one.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0), ("H200", 989.0),
                    ("GB200", 2500.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("MI300X", 1307.0), ("MI250X", 383.0))


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by its name (``NVIDIA H100 80GB HBM3``), None when unknown."""
    return next((tflops for word, tflops in PEAK_BF16_TFLOPS
                 if re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", device_name)), None)


def train_flops_per_token(args: ModelArgs, seq_len: int, activation_checkpointing: str = "none",
                          every: int = 2) -> float:
    """A training step's matmul FLOPs per token as the GPU runs them: forward and backward
    (3x the forward), plus one more forward of each checkpointed block
    (:func:`recomputed_blocks`); never the output head, which sits outside the blocks. MFU
    is counted without the recompute (the model's FLOPs)."""
    recomputed = recomputed_blocks(args.num_layers, activation_checkpointing, every)
    return 3 * forward_flops_per_token(args, seq_len) + forward_flops_per_token(args, seq_len, recomputed, head=False)


# ----------------------------------------------------------------- communication vs compute
@dataclass
class StepTime:
    communication_gb: float  # FSDP2 traffic per GPU per micro-batch, both links
    communication_s: float  # the slower link's time: the two links and the compute overlap
    compute_s: float
    smallest_compute_bound_micro_batch: int
    intra_node_gb: float = 0.0  # over the GPUs' links inside a node (NVLink)
    inter_node_gb: float = 0.0  # over the network between nodes
    intra_node_s: float = 0.0
    inter_node_s: float = 0.0
    shard_group: int = 1  # ranks a parameter is sharded over: W / replicate_degree

    @property
    def communication_bound(self) -> bool:
        return self.communication_s > self.compute_s


def micro_batch_time(student: ModelArgs, world_size: int, micro_batch: int, seq_len: int,
                     activation_checkpointing: str = "none", interconnect_gbps: float = 400.0,
                     gpu_tflops: float = 989.0, mfu: float = 0.4, reshard_after_forward: bool = True,
                     checkpoint_every: int = 2, reductions_per_micro_batch: float = 1.0, replicate_degree: int = 1,
                     gpus_per_node: int = 8, intra_node_gbps: float = 3600.0,
                     gradient_accumulation_steps: int = 1) -> StepTime:
    """FSDP2 (or HSDP) traffic against compute for one micro-batch on one GPU.

    Within a shard group of S = W / ``replicate_degree`` ranks (ring collectives: each GPU
    sends and receives (S-1)/S of the payload): the bf16 parameters are all-gathered for
    the forward and, with ``reshard_after_forward``, again for the backward, except the
    root unit and the last block, which stay gathered (components/parallel.py:shard_model);
    fp32 gradients are reduce-scattered: about (2 + 2 + 4) bytes per parameter.
    ``reductions_per_micro_batch``: 1 / gradient_accumulation_steps when the reduction waits
    for a step's last micro-batch (``fsdp.reduce_every_micro_batch: false``). Across the R
    replicas (HSDP): a ring all-reduce of each rank's fp32 gradient shard, 2 (R-1)/R x 4 N / S
    bytes, once per step (parallel.all_reduce_across_replicas), so 1 / accumulation of it per
    micro-batch. A collective among ranks of one node (S, or W, at most ``gpus_per_node``)
    runs at ``intra_node_gbps``, one that spans nodes at ``interconnect_gbps``. FSDP2
    overlaps the collectives with the compute and the two links run side by side, so the
    slowest of the three sets the pace. Compute: training FLOPs (:func:`train_flops_per_token`)
    at ``mfu`` of ``gpu_tflops``.
    """
    n = total_params(student)
    replicas = max(1, replicate_degree)
    shard_group = max(1, world_size // replicas)
    gathered_twice = n - root_params(student) - block_params(student) if reshard_after_forward else 0
    within_group = ((2 * n + 2 * gathered_twice + 4 * n * reductions_per_micro_batch)
                    * (shard_group - 1) / shard_group)
    across_replicas = 2 * (replicas - 1) / replicas * 4 * n / shard_group / max(1, gradient_accumulation_steps)
    intra = inter = 0.0
    if shard_group <= gpus_per_node:
        intra += within_group
    else:
        inter += within_group
    if world_size <= gpus_per_node:
        intra += across_replicas
    else:
        inter += across_replicas
    intra_s, inter_s = intra / (intra_node_gbps * 1e9 / 8), inter / (interconnect_gbps * 1e9 / 8)
    communication_s = max(intra_s, inter_s)
    flops_per_token = train_flops_per_token(student, seq_len, activation_checkpointing, checkpoint_every)
    compute_per_sample = flops_per_token * seq_len / (gpu_tflops * 1e12 * mfu)
    smallest = max(1, math.ceil(communication_s / compute_per_sample))
    return StepTime((intra + inter) / 1e9, communication_s, compute_per_sample * micro_batch, smallest,
                    intra / 1e9, inter / 1e9, intra_s, inter_s, shard_group)
