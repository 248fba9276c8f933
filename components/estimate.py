"""Back-of-the-envelope cost model: parameters, FLOPs per token, memory per GPU.

Used by ``dry_run=true``. FLOPs count matmuls only (2 per multiply-add): a training step
is forward + backward = 3x forward; attention adds 2 * 2 * n_layers * seq_len * width per
token forward (QK^T and AV, causal masking not discounted). Memory assumes AdamW in fp32
sharded over the world size (FSDP2), bf16 activations, and the activation sizes of
Korthikanti et al. (2022) with a fused attention kernel (no s^2 term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from letrecipes.components.models import ModelArgs


def block_matmul_params(args: ModelArgs) -> int:
    q_width, kv_width = args.num_heads * args.dim_per_head, args.num_kv_heads * args.dim_per_head
    attn = args.embed_dim * (2 * q_width + 2 * kv_width)
    mlp = (2 if args.family == "opt" else 3) * args.embed_dim * args.intermediate_dim
    return attn + mlp


def block_params(args: ModelArgs) -> int:
    q_width, kv_width = args.num_heads * args.dim_per_head, args.num_kv_heads * args.dim_per_head
    vectors = 2 * args.embed_dim  # the two norm scales
    vectors += (q_width + 2 * kv_width) if args.qkv_bias else 0
    vectors += args.embed_dim if args.output_bias else 0
    if args.family == "opt":  # LayerNorm biases and the MLP biases
        vectors += 2 * args.embed_dim + args.intermediate_dim + args.embed_dim
    return block_matmul_params(args) + vectors


def total_params(args: ModelArgs) -> int:
    embeddings = args.vocab_size * args.embed_dim
    head = 0 if args.tie_word_embeddings else embeddings
    final_norm = args.embed_dim * (2 if args.family == "opt" else 1)
    positions = (args.max_seq_len + 2) * args.embed_dim if args.family == "opt" else 0
    return embeddings + positions + head + args.num_layers * block_params(args) + final_norm


def forward_flops_per_token(args: ModelArgs, seq_len: int, layers: Optional[int] = None, head: bool = True) -> float:
    """Forward matmul FLOPs per token through ``layers`` blocks (all by default) and the head."""
    layers = args.num_layers if layers is None else layers
    per_block = 2 * block_matmul_params(args) + 4 * seq_len * args.embed_dim
    return layers * per_block + (2 * args.vocab_size * args.embed_dim if head else 0)


@dataclass
class MemoryEstimate:
    params_grads_optimizer_gb: float
    activations_gb: float
    logits_gb: float
    teacher_gb: float

    @property
    def total_gb(self) -> float:
        return self.params_grads_optimizer_gb + self.activations_gb + self.logits_gb + self.teacher_gb


def memory_per_gpu(
    student: ModelArgs,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    activation_checkpointing: str = "none",
    teacher: Optional[ModelArgs] = None,
    teacher_sharded: bool = False,
) -> MemoryEstimate:
    gb = 1024**3
    n = total_params(student)
    # fp32 params + fp32 grads + 2 fp32 AdamW moments, sharded by FSDP2
    states = 16 * n / world_size
    tokens = micro_batch * seq_len
    full_block = 34 * tokens * student.embed_dim  # bytes, bf16, fused attention
    if activation_checkpointing == "full":
        acts = student.num_layers * 2 * tokens * student.embed_dim + full_block
    elif activation_checkpointing == "selective":  # every other block kept
        acts = student.num_layers / 2 * (full_block + 2 * tokens * student.embed_dim)
    else:
        acts = student.num_layers * full_block
    logits = 2 * 4 * tokens * student.vocab_size  # fp32 logits and their gradient
    teacher_bytes = 0.0
    if teacher is not None:
        teacher_bytes = 2 * total_params(teacher) / (world_size if teacher_sharded else 1)
    return MemoryEstimate(states / gb, acts / gb, logits / gb, teacher_bytes / gb)
