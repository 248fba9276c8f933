"""Peak memory and time of the language-model loss (output layer + cross-entropy, forward
and backward): the whole micro-batch's logits at once (``loss_chunk_tokens=0``) against
components/loss.py's chunks.

    python benchmarks/loss_memory.py [--vocab 32768 128256] [--dim 1024] [--tokens 4096] [--chunk 1024]

Each arm runs in a fresh process: its peak resident memory (``VmHWM``) above what it held
before the loss, and the median time of forward + backward over ``--reps`` repetitions.
Both arms must give the same loss and gradients (checked here, fp32). On the CPU the
plain path's logits are fp32 from the start; on a GPU under bf16 the saving is larger
(the dry run's loss term: 14 bytes per token and vocabulary entry, against one chunk's).
JSON in benchmarks/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402

CHILD = """
import hashlib, json, statistics, sys, time
import torch, torch.nn.functional as F
from letrecipes.components.loss import linear_cross_entropy
vocab, dim, tokens, chunk, reps = map(int, sys.argv[1:6])
def high_water_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(1, tokens, dim, generator=gen).requires_grad_()
weight = (torch.randn(vocab, dim, generator=gen) * 0.02).requires_grad_()
labels = torch.randint(0, vocab, (1, tokens), generator=gen)
before = high_water_mb()
times = []
for _ in range(reps):
    hidden.grad = weight.grad = None
    start = time.perf_counter()
    if chunk:
        loss = linear_cross_entropy(hidden, weight, labels, chunk)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), labels.flatten())
    loss.backward()
    times.append(time.perf_counter() - start)
    del loss
peak = high_water_mb() - before
grads = torch.cat([hidden.grad.flatten(), weight.grad.flatten()])
print(json.dumps({"peak_above_inputs_mb": peak, "median_s": statistics.median(times), "times_s": times,
                  "loss_grads": grads.double().norm().item()}))
"""


def measure(vocab: int, dim: int, tokens: int, chunk: int, reps: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, (vocab, dim, tokens, chunk, reps))], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/loss_memory.json")
    args = parser.parse_args(argv)
    rows = []
    for vocab in args.vocab:
        plain = measure(vocab, args.dim, args.tokens, 0, args.reps)
        chunked = measure(vocab, args.dim, args.tokens, args.chunk, args.reps)
        row = {"vocab": vocab, "dim": args.dim, "tokens": args.tokens, "chunk_tokens": args.chunk,
               "plain": plain, "chunked": chunked,
               "logits_fp32_mb": args.tokens * vocab * 4 / 2**20,
               "memory_ratio_chunked_over_plain": chunked["peak_above_inputs_mb"] / plain["peak_above_inputs_mb"],
               "time_ratio_chunked_over_plain": chunked["median_s"] / plain["median_s"],
               "same_gradients": abs(chunked["loss_grads"] - plain["loss_grads"]) <= 1e-5 * plain["loss_grads"]}
        rows.append(row)
        print(f"vocab {vocab}: peak {plain['peak_above_inputs_mb']:,.0f} MB -> {chunked['peak_above_inputs_mb']:,.0f} MB "
              f"({row['memory_ratio_chunked_over_plain']:.2f}x), time {plain['median_s']:.2f} s -> "
              f"{chunked['median_s']:.2f} s ({row['time_ratio_chunked_over_plain']:.2f}x), same gradients: "
              f"{row['same_gradients']}")
    write_json({**header("loss_memory.py", argv), "rows": rows}, args.out)
    return 0 if all(r["same_gradients"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
