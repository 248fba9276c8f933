"""Where the slice's step time goes: gpu_check's bf16 slice under torch.profiler (3 steps after warm-up),
its CUDA time summed by kind of kernel, and arms run each in a process of its own so their
peak memory is not mixed with an earlier arm's leftovers (default vs fused AdamW, no
activation checkpointing). Writes benchmarks/results/gpu_profile.json after every part.
    device run (carry [".whl"]):  bash benchmarks/gpu_check.sh --profile
    python benchmarks/gpu_profile.py --cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._common import header  # noqa: E402
from benchmarks.gpu_check import (SIZES, arm_in_process, common_overrides, demo_data, model_overrides,  # noqa: E402
                                  report_saver, run, step_figures)
from letrecipes import pretrain  # noqa: E402

KINDS = [  # first match wins, on the lower-cased kernel name
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "matmul", "cublas")),
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss/softmax", ("softmax", "cross_entropy", "nll", "log_softmax")),
    ("communication", ("nccl",)),
    ("copies", ("memcpy", "memset", "copy_")),
    ("compiled (triton)", ("triton",)),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def allocation_site(frames: List[Dict]) -> str:
    """Where an allocation was made, for grouping: the innermost frame in this project's code,
    else in torch.nn / torch.optim / torch.distributed, else the innermost frame."""
    def name(frame):
        return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"

    for wanted in (("/letrecipes/", "/components/"), ("/torch/nn/", "/torch/optim/", "/torch/distributed/")):
        frame = next((f for f in frames if any(w in f["filename"] for w in wanted)), None)
        if frame:
            return name(frame)
    return name(frames[0]) if frames else "(no stack)"


def _replay(trace: List[Dict], stop: int) -> Tuple[Dict[int, Dict], int]:
    """The traced allocations alive after event ``stop``, and the bytes freed by then that
    were allocated before recording began."""
    live: Dict[int, Dict] = {}
    freed_untraced = 0
    for event in trace[:stop + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed" and live.pop(event["addr"], None) is None:
            freed_untraced += event["size"]
    return live, freed_untraced


def peak_allocations(snapshot: Dict, device: int = 0, top: int = 15) -> Dict:
    """Replays a CUDA memory snapshot's allocation trace (``torch.cuda.memory._snapshot()``
    after ``_record_memory_history``) to its highest point and groups what was alive there
    by :func:`allocation_site`. Memory allocated before recording began is "untraced"."""
    trace = snapshot["device_traces"][device]
    active_at_end = sum(b["size"] for seg in snapshot["segments"] if seg.get("device", device) == device
                        for b in seg["blocks"] if b["state"] == "active_allocated")
    live_at_end, freed_untraced = _replay(trace, len(trace) - 1)
    untraced_at_start = active_at_end - sum(e["size"] for e in live_at_end.values()) + freed_untraced
    total = peak = untraced_at_start
    peak_index = -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            total += event["size"]
        elif event["action"] == "free_completed":
            total -= event["size"]
        if total > peak:
            peak, peak_index = total, i
    live, freed_untraced = _replay(trace, peak_index)
    sites: Dict[str, int] = defaultdict(int)
    for event in live.values():
        sites[allocation_site(event.get("frames", []))] += event["size"]
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])
    return {"peak_gib": peak / 2**30, "peak_event": peak_index, "events": len(trace),
            "untraced_gib": (untraced_at_start - freed_untraced) / 2**30,
            "sites": [{"gib": round(size / 2**30, 3), "site": site} for site, size in ranked[:top]],
            "other_sites_gib": sum(size for _, size in ranked[top:]) / 2**30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--arm", default=None, help="(internal) run one arm and print its JSON")
    parser.add_argument("--work", default="outputs/gpu_profile")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--arms", default=None, help="comma-separated arms to run in their own processes (default all)")
    args = parser.parse_args(argv)
    arms = {"foreach_adamw": ["activation_checkpointing.mode=full", "optimizer.fused=false"],  # torch's default
            "fused_adamw": ["activation_checkpointing.mode=full"],  # the big configs' (optimizer.fused: true)
            "fused_adamw_no_ac": ["activation_checkpointing.mode=none"],
            "fused_adamw_ac_every_2": ["activation_checkpointing.mode=selective", "activation_checkpointing.every=2"],
            # the 7B configs step the optimizer every 4 micro-batches: its cost per token a quarter of the slice's
            "fused_adamw_accumulate_4": ["activation_checkpointing.mode=full", "gradient_accumulation_steps=4"],
            # float8 here, each in a clean process: the check runs it after bf16 in one process
            "float8_tensorwise": ["activation_checkpointing.mode=full", "float8.enabled=true"],
            "float8_rowwise": ["activation_checkpointing.mode=full", "float8.enabled=true", "float8.recipe=rowwise"]}
    chosen = args.arms.split(",") if args.arms else list(arms)
    unknown = sorted(set(chosen) - set(arms))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {sorted(arms)}")  # before the corpus is prepared
    size = SIZES["cpu" if args.cpu else "gpu"]
    corpus, tokenizer, _, vocab_of = demo_data(args)
    shape = size["slice"]
    vocab = vocab_of(shape)
    work = Path(args.work)
    gpu = torch.cuda.is_available() and not args.cpu
    cfg = [*common_overrides(size, corpus, tokenizer, work), f"max_steps={size['steps']}",
           f"compile={str(size['compile']).lower()}", "export.enabled=false", "float8.enabled=false",
           *model_overrides(shape, vocab)]
    if args.arm:  # a child process: one arm, clean memory
        records = run(pretrain, "pretrain_7b", work / args.arm, [*cfg, *arms[args.arm]])[size["warmup"]:]
        print("ARM " + json.dumps(step_figures(records)), flush=True)
        return 0

    report = {**header("gpu_profile.py", argv), "device_name": torch.cuda.get_device_name() if gpu else "cpu",
              "arms": {}, "errors": {}}
    out_path = args.out or f"benchmarks/results/gpu_profile{'' if gpu else '_cpu'}.json"

    save = report_saver(report, out_path)

    started = time.perf_counter()
    for name in chosen:
        arm_in_process(__file__, name, work, corpus, tokenizer, args.cpu, report)
        save()

    # the profile, in this process: 3 steps of the config's own arm (fused AdamW), and its memory peak
    from letrecipes.pretrain import PretrainRecipe

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    captured = []  # the one cycle's averages, read when it ends (the profiler clears them afterwards)
    prof = torch.profiler.profile(
        activities=activities, on_trace_ready=lambda p: captured.append(p.key_averages()),
        schedule=torch.profiler.schedule(wait=max(0, size["steps"] - 7), warmup=1, active=3, repeat=1))
    original = PretrainRecipe.train_step

    def profiled_step(self):
        out = original(self)
        prof.step()
        return out

    PretrainRecipe.train_step = profiled_step
    if gpu:  # every allocation of the run, to find what is alive at the peak (see peak_allocations)
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    try:
        with prof:
            run(pretrain, "pretrain_7b", work / "profiled", [*cfg, "activation_checkpointing.mode=full"])
        if gpu:
            report["memory_peak"] = peak_allocations(torch.cuda.memory._snapshot())
            print(json.dumps(report["memory_peak"], indent=1), flush=True)
    except Exception as err:  # the arms above are already saved; say what broke here
        report["errors"]["profile"] = f"{type(err).__name__}: {err}"[:2000]
    finally:
        PretrainRecipe.train_step = original
        if gpu:
            torch.cuda.memory._record_memory_history(enabled=None)
    save()
    by_kind, kernels = defaultdict(float), []
    for event in captured[0]:
        device_us = getattr(event, "self_device_time_total", 0.0) if gpu else event.self_cpu_time_total
        # spans (ProfilerStep*, Optimizer.step, FSDP::...) would count their kernels twice
        if device_us <= 0 or getattr(event, "is_user_annotation", False) or event.key.startswith("ProfilerStep") \
                or (gpu and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        by_kind[kind_of(event.key)] += device_us / 3 / 1e3  # ms per step
        kernels.append((device_us / 3 / 1e3, event.key[:120], event.count // 3))
    kernels.sort(reverse=True)
    report["profile"] = {"ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                         "top_kernels": [{"ms_per_step": round(ms, 3), "name": n, "calls_per_step": c}
                                         for ms, n, c in kernels[:30]]}
    print(json.dumps(report["profile"], indent=1), flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
