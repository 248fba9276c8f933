"""What the per-step stop vote (components/preemption.py, StopVote) costs a rank's host
thread: the time of one ``poll`` after a step of host work, in a gloo group of N
processes, against the all-reduce the sync points use (``parallel.all_reduce_sum``, which
waits for its result; on a GPU it also waits for the device).

    python benchmarks/stop_vote_cost.py [--nproc 2] [--polls 500] [--step-ms 5]
        -> benchmarks/results/stop_vote_cost.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components import parallel  # noqa: E402
from letrecipes.components.preemption import StopVote  # noqa: E402
from tests.launch import free_port  # noqa: E402


def timed(fn, rounds: int, step_s: float) -> float:
    """Median microseconds that ``fn`` takes, called after each of ``rounds`` steps of work
    (a loop of small matmuls for ``step_s`` seconds: what the host does between two polls)."""
    a = torch.randn(64, 64)
    spent = []
    for _ in range(rounds):
        until = time.perf_counter() + step_s
        while time.perf_counter() < until:
            a = torch.tanh(a @ a)
        start = time.perf_counter()
        fn()
        spent.append((time.perf_counter() - start) * 1e6)
    return statistics.median(spent)


def worker(rank: int, nproc: int, port: int, polls: int, step_s: float, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    vote = StopVote()
    vote_us = timed(lambda: vote.poll(False), polls, step_s)
    vote.close()
    device = torch.device("cpu")
    sync_us = timed(lambda: parallel.all_reduce_sum([0.0], device), polls, step_s)
    if rank == 0:
        queue.put({"poll_us": vote_us, "blocking_all_reduce_us": sync_us})
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--polls", type=int, default=500)
    parser.add_argument("--step-ms", type=float, default=5.0, help="host work between two polls (a step)")
    parser.add_argument("--out", default="benchmarks/results/stop_vote_cost.json")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(worker, args=(args.nproc, free_port(), args.polls, args.step_ms / 1000, queue), nprocs=args.nproc,
                       start_method="spawn")
    figures = queue.get(timeout=60)
    report = {**header("stop_vote_cost.py", argv), "nproc": args.nproc, "polls": args.polls, "step_ms": args.step_ms, **figures}
    print(f"{args.nproc} processes, {args.step_ms:g} ms steps: StopVote.poll {figures['poll_us']:.0f} us per step; "
          f"a blocking all-reduce {figures['blocking_all_reduce_us']:.0f} us (medians)")
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
