"""The language-model loss without the logits tensor: output layer + cross-entropy, a chunk
of tokens at a time.

``nll_loss(model(tokens), labels)`` holds the whole micro-batch's logits several times
over: bf16 logits, their fp32 copy, the log-softmax saved for backward, its gradient. With
Llama-3's 128k vocabulary that is 14 bytes x 128,256 = 1.8 MB per token: 13.7 GiB for a
micro-batch of 4 x 2048, half of a 7B run's memory per GPU (docs/scale.md). Here each chunk
of ``chunk_tokens`` tokens gets its logits, its loss and, right away, its gradients with
respect to the hidden states and the output weight; the logits are freed before the next
chunk. Backward only scales the stored gradients, so nothing is computed twice (unlike
recomputing each chunk under activation checkpointing, which would redo the output matmul).

Why our own: torchtune's ``CEWithChunkedOutputLoss`` chunks the logits but still keeps every
chunk for backward (it saves memory under ``torch.compile`` only), and the fused kernels
that do what this does (Liger's) are Triton-only. The loss and the gradients equal
``F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)``'s up to
rounding (tests/test_loss.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the plain path would use: autocast's where it is on, else the inputs'."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
        dtype = compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
            w = weight.to(dtype)
            y = labels.reshape(-1)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_tokens):
                h_chunk, y_chunk = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
                logits = (h_chunk @ w.t()).float()
                keep = y_chunk != IGNORE_INDEX
                target = y_chunk.clamp(min=0).unsqueeze(1)  # ignored rows point at class 0, then are zeroed
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, target).squeeze(1)) * keep).sum()
                # d(sum of losses)/d(logits) = softmax - one_hot(target), for the kept rows; in place
                grad = logits.sub_(lse.unsqueeze(1)).exp_()
                grad.scatter_add_(1, target, -torch.ones_like(target, dtype=grad.dtype))
                grad.mul_(keep.unsqueeze(1))
                grad = grad.to(dtype)
                if grad_h is not None:
                    torch.mm(grad, w, out=grad_h[start:start + chunk_tokens])
                if grad_w is not None:  # add_ casts on the fly: no fp32 copy of the product
                    grad_w.add_(grad.t() @ h_chunk)
                del logits, grad
            if grad_w is not None:  # kept until backward in the weight's dtype: 1 GB, not 2, at 7B in bf16
                grad_w = grad_w.to(weight.dtype)
        count = (y != IGNORE_INDEX).sum()  # a tensor: no host sync
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        shape, hidden_dtype, weight_dtype = ctx.shapes
        scale = grad_loss / count
        grad_hidden = (grad_h * scale).reshape(shape).to(hidden_dtype) if grad_h is not None else None
        grad_weight = (grad_w * scale).to(weight_dtype) if grad_w is not None else None
        return grad_hidden, grad_weight, None, None


def _loss_only(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    dtype = compute_dtype(hidden, weight)
    h, y, w = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        logits = (h[start:start + chunk_tokens].to(dtype) @ w.t()).float()
        total += F.cross_entropy(logits, y[start:start + chunk_tokens], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (y != IGNORE_INDEX).sum()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (``-100`` ignored),
    ``chunk_tokens`` tokens at a time: the logits of one chunk exist at any moment."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)
    return _loss_only(hidden, weight, labels, chunk_tokens)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output layer's weight, tied (torchtune's ``TiedLinear``: the embedding's) or not."""
    output = model.output
    weight: Optional[torch.Tensor] = getattr(output, "weight", None)
    if weight is None:
        weight = output.tied_module.weight
    if getattr(output, "bias", None) is not None:
        raise ValueError("linear_cross_entropy: the output layer has a bias; set loss_chunk_tokens=0")
    return weight
