"""The GPU path in one command: see gpu_check.sh. ``--cpu`` runs the same checks at tiny sizes
(the test suite does, so this script cannot rot while no GPU is at hand).

(a) throughput: a 7B-width slice (4 blocks x 4096, FFN 11008, vocabulary 128256,
    micro-batch 2 x 2048, full activation checkpointing, compile, FSDP2 at world size 1, the
    chunked loss of the big configs)
    in bf16, then float8: tokens/s, MFU, peak memory against the dry run's estimate;
(b) LET's cost: the same slice as plain pretraining and as LET with a randomly
    initialised teacher of Llama-3.2-1B's shape: the step-time ratio;
(c) resume: 4 steps straight against 2 steps + resume + 2, with sync and with async
    checkpoints (FSDP2 at world size 1): the losses must be equal;
(d) export: the final export loads with transformers and gives the project's logits.

Targets (GPU only): float8 >= 1.3x bf16 tokens/s; bf16 MFU >= 40%; LET step <= 1.05x the
baseline's; peak memory within 15% of the dry run's estimate (CUDA context excluded: the
peak read is torch's allocated memory).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

# The repo root goes last: on the GPU machine letrecipes is installed beside its torch
# (gpu_check.sh), and the source folder must not shadow it.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._common import header, write_json  # noqa: E402
from letrecipes import let_pretrain, pretrain  # noqa: E402
from letrecipes.components.estimate import forward_flops_per_token, memory_per_gpu, peak_bf16_tflops  # noqa: E402
from letrecipes.components.metrics import read_metrics  # noqa: E402
from letrecipes.components.models import ModelArgs, llama_model  # noqa: E402

SIZES = {
    "gpu": {
        "slice": dict(num_layers=4, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008,
                      vocab_size=128256, rope_base=500000, tie_word_embeddings=False),
        "teacher": dict(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192,
                        vocab_size=128256, rope_base=500000, tie_word_embeddings=True),
        # the demo tokenizer's vocabulary: its checkpoints (0.9 GB with AdamW) stay quick to write
        "resume": dict(num_layers=4, num_heads=16, num_kv_heads=16, embed_dim=1024, intermediate_dim=2816,
                       rope_base=500000, tie_word_embeddings=False),
        "micro_batch": 2, "seq_len": 2048, "steps": 12, "warmup": 4, "compile": True, "device": "cuda",
        "dtype": "bf16", "logits_atol": 2e-3, "loss_chunk_tokens": 1024,
    },
    "cpu": {
        "slice": dict(num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=128,
                      tie_word_embeddings=False),
        "teacher": dict(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64),
        "resume": dict(num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, intermediate_dim=64),
        "micro_batch": 2, "seq_len": 32, "steps": 4, "warmup": 1, "compile": False, "device": "cpu",
        "dtype": "fp32", "logits_atol": 1e-4, "loss_chunk_tokens": 24,  # 64-token micro-batches: 3 chunks
    },
}


def model_overrides(shape: Dict, vocab_size: int) -> List[str]:
    shape = {"vocab_size": vocab_size, **shape}
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shape.items()]


def demo_data(args) -> Tuple[str, str, Any, Callable[[Dict], int]]:
    """The corpus and tokenizer the GPU scripts train on (the demo's unless given): their
    paths, the loaded tokenizer, and the vocabulary size of a model shape (its own, else the
    tokenizer's rounded up to 64)."""
    if args.corpus is None or args.tokenizer is None:
        from letrecipes.demo import prepare

        prepare()
    corpus = args.corpus or "outputs/demo/corpus"
    tokenizer = args.tokenizer or "outputs/demo/tokenizer.json"
    from letrecipes.components.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    return corpus, tokenizer, tok, lambda shape: shape.get("vocab_size") or 64 * -(-tok.vocab_size // 64)


def common_overrides(size: Dict, corpus: str, tokenizer: str, work: Path) -> List[str]:
    """Every GPU script's runs: the size's data, device and batch, FSDP2 at world size 1,
    a log line per step, no evaluation or checkpoint unless a check adds one."""
    return [f"tokenizer.path={tokenizer}", f"data.source={corpus}", f"data.seq_len={size['seq_len']}",
            f"data.cache_dir={work / 'cache'}", f"device={size['device']}", f"dtype={size['dtype']}",
            "progress_bar=false", "log_every=1", "eval_every=0", "save_every=0", "data.num_workers=0",
            f"batch_size={size['micro_batch']}", "gradient_accumulation_steps=1", "lr_scheduler.warmup_steps=2",
            "fsdp.enabled=true", "metrics.wandb.enabled=false", f"loss_chunk_tokens={size['loss_chunk_tokens']}"]


def report_saver(report: Dict, out_path: str) -> Callable[[], None]:
    """Writes the report (again after every check: a device session cut short still leaves
    what was measured), also into $OUT, the device machine's return folder, when set."""
    def save() -> None:
        write_json(report, out_path)
        if os.environ.get("OUT"):
            write_json(report, str(Path(os.environ["OUT"]) / Path(out_path).name))

    return save


def arm_in_process(script: str, name: str, work: Path, corpus: str, tokenizer: str, cpu: bool,
                   report: Dict) -> None:
    """Run one arm as ``script --arm name`` in a process of its own (clean memory, nothing
    compiled before it) and put the JSON it prints after ``ARM `` into ``report["arms"]``,
    or the end of its output into ``report["errors"]``."""
    import subprocess

    child = [sys.executable, script, "--arm", name, "--work", str(work), "--corpus", corpus, "--tokenizer", tokenizer,
             *(["--cpu"] if cpu else [])]
    done = subprocess.run(child, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ARM ")), None)
    if line:
        report["arms"][name] = json.loads(line[4:])
        print(f"[{name}] {report['arms'][name]}", flush=True)
    else:
        report["errors"][name] = (done.stdout + done.stderr)[-3000:]
        print(f"[{name}] FAILED\n{report['errors'][name]}", flush=True)


def step_figures(records: List[Dict]) -> Dict:
    """An arm's figures from its measured steps' log records (warm-up left out): median
    tokens/s, step time and teacher share, and the peak memory."""
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "step_s": statistics.median(r["step_time_s"] for r in records),
            "peak_memory_gib": max(r["peak_memory_mb"] for r in records) / 1024,
            "teacher_time_share": statistics.median(r.get("teacher_time_share", 0.0) for r in records)}


def run(recipe, config: str, out: Path, overrides: List[str]) -> List[Dict]:
    recipe.recipe_main(["--config", config, f"output_dir={out}", "overwrite=true", *overrides])
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "event" not in r]


def random_teacher(size: Dict, vocab, tok, work: Path) -> List[str]:
    """A randomly initialised teacher of Llama-3.2-1B's shape (the size's), exported to
    ``work/teacher`` like a real one (once), and the overrides that make a run LET with it."""
    teacher_dir = work / "teacher"
    if not (teacher_dir / "config.json").is_file():
        from letrecipes.components.export import export_model

        shape = {**size["teacher"], "vocab_size": max(vocab(size["teacher"]), vocab(size["slice"]))}
        with torch.device(size["device"]):
            teacher = llama_model(max_seq_len=size["seq_len"], **shape)
        export_model(teacher, teacher.model_args, teacher_dir, tok, torch.bfloat16)
        del teacher
        if size["device"] == "cuda":
            torch.cuda.empty_cache()
    return [f"teacher.path={teacher_dir}", "tokenizer.source=path", "alignment.schedule.stop=1.0",
            f"teacher.dtype={'bf16' if size['device'] == 'cuda' else 'fp32'}"]


def slice_arm(name: str, size: Dict, corpus: str, tokenizer: str, tok, vocab, work: Path) -> Dict:
    """One of (a)'s and (b)'s arms, in this process: ``bf16``, ``float8`` or ``let`` (the
    bf16 slice as LET with a random teacher of Llama-3.2-1B's shape, exported and loaded
    like a real one)."""
    slice_shape = size["slice"]
    overrides = [*common_overrides(size, corpus, tokenizer, work), *model_overrides(slice_shape, vocab(slice_shape)),
                 f"max_steps={size['steps']}", f"compile={str(size['compile']).lower()}",
                 "activation_checkpointing.mode=full", "export.enabled=false",
                 f"float8.enabled={str(name == 'float8').lower()}"]
    recipe, config = pretrain, "pretrain_7b"
    if name == "let":
        recipe, config = let_pretrain, "let_7b"
        overrides += [*random_teacher(size, vocab, tok, work), f"teacher.compile={str(size['compile']).lower()}"]
    if size["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return step_figures(run(recipe, config, work / name, overrides)[size["warmup"]:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (what the tests run)")
    parser.add_argument("--work", default="outputs/gpu_check", help="run folders (removed at the end)")
    parser.add_argument("--corpus", default=None, help="a text folder (default: the demo's Shakespeare)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the demo's)")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/gpu_check[_cpu].json)")
    parser.add_argument("--arm", choices=("bf16", "float8", "let"), help="(internal) run one arm, print its JSON")
    args = parser.parse_args(argv)
    size = SIZES["cpu" if args.cpu else "gpu"]
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --cpu for the tiny CPU version)")
    corpus, tokenizer, tok, vocab = demo_data(args)
    work = Path(args.work)
    if args.arm:
        print("ARM " + json.dumps(slice_arm(args.arm, size, corpus, tokenizer, tok, vocab, work)), flush=True)
        return 0
    started = time.perf_counter()
    common = common_overrides(size, corpus, tokenizer, work)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu"
    report = {**header("gpu_check.py", argv), "mode": "cpu" if args.cpu else "gpu", "device_name": device_name,
              "sizes": size}

    out_path = args.out or f"benchmarks/results/gpu_check{'_cpu' if args.cpu else ''}.json"
    report["errors"] = {}

    save = report_saver(report, out_path)

    def check(name, fn):
        try:
            fn()
        # one failed check (a recipe exits with one line) must not cost the others' measurements
        except (Exception, SystemExit) as err:
            traceback.print_exc()
            report["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
            print(f"({name}) FAILED: {report['errors'][name]}", flush=True)
        if torch.cuda.is_available() and not args.cpu:
            torch.cuda.empty_cache()
        save()

    # (a) the slice in bf16, then float8; (b) LET on it. Each arm is a process of its own: in
    # one process float8 ran after bf16 at 1.05x, in a clean one at 1.10x (H200).
    slice_args = ModelArgs(**{**size["slice"], "vocab_size": vocab(size["slice"]), "max_seq_len": size["seq_len"]})
    estimate = memory_per_gpu(slice_args, 1, size["micro_batch"], size["seq_len"], "full", fsdp=True,
                              loss_chunk_tokens=size["loss_chunk_tokens"])
    peak_tflops = peak_bf16_tflops(device_name)  # dense bf16; float8 arms are reported against it too
    model_flops = 3 * forward_flops_per_token(slice_args, size["seq_len"])
    arms, children = {}, {"arms": {}, "errors": {}}
    report["throughput"] = arms

    def in_process(name: str) -> Dict:
        arm_in_process(__file__, name, work, corpus, tokenizer, args.cpu, children)
        if name not in children["arms"]:
            raise RuntimeError(children["errors"][name][-1500:])
        return children["arms"][name]

    def throughput(arm):
        figures = in_process(arm)
        arms[arm] = {"tokens_per_s": figures["tokens_per_s"], "step_s": figures["step_s"],
                     "mfu": figures["tokens_per_s"] * model_flops / (peak_tflops * 1e12) if peak_tflops else None,
                     "peak_memory_gib": figures["peak_memory_gib"],
                     "estimate_gib": estimate.total_gb - estimate.context_gb,
                     "estimate_phases_gib": {"forward_backward": estimate.forward_backward_gb,
                                             "optimizer_step": estimate.optimizer_step_gb},
                     "peak_over_estimate": figures["peak_memory_gib"] / (estimate.total_gb - estimate.context_gb)}
        print(f"(a) {arm}: {json.dumps(arms[arm])}", flush=True)

    check("a_bf16", lambda: throughput("bf16"))
    check("a_float8", lambda: throughput("float8"))
    if "bf16" in arms and "float8" in arms:
        report["float8_over_bf16"] = arms["float8"]["tokens_per_s"] / arms["bf16"]["tokens_per_s"]

    def let_cost():  # against (a)'s bf16 arm, the same config without the teacher
        let = in_process("let")
        step_base = arms["bf16"]["step_s"] if "bf16" in arms else in_process("bf16")["step_s"]
        report["let"] = {"baseline_step_s": step_base, "let_step_s": let["step_s"],
                         "let_over_baseline": let["step_s"] / step_base,
                         "teacher_time_share": let["teacher_time_share"]}
        print(f"(b) {json.dumps(report['let'])}", flush=True)

    check("b_let", let_cost)

    # (c) resume, sync and async: 4 straight against 2 + resume + 2
    # deterministic kernels: a GPU's atomics alone made two straight runs differ at step 4 (H200, 7.8828 / 7.8834)
    resume_cfg = [*common, *model_overrides(size["resume"], vocab(size["resume"])), "max_steps=4", "export.dtype=fp32",
                  "deterministic=true"]
    straight = []
    report["resume"] = {}
    check("c_straight", lambda: straight.extend(run(pretrain, "pretrain_7b", work / "straight", resume_cfg)))

    def resume(mode):
        folder = work / f"resumed_{mode}"
        again = [*resume_cfg, "save_every=2", f"async_checkpoint={str(mode == 'async').lower()}"]
        run(pretrain, "pretrain_7b", folder, again)
        shutil.rmtree(folder / "checkpoints" / "step_00000004")
        pretrain.recipe_main(["--config", "pretrain_7b", f"output_dir={folder}", *again, "resume=true"])
        resumed = [r for r in read_metrics(folder / "metrics.jsonl") if "loss" in r and "event" not in r]
        same = bool(straight) and [r["step"] for r in resumed] == [r["step"] for r in straight] and all(
            abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) for a, b in zip(straight, resumed))
        report["resume"][mode] = {"equal_losses": same, "straight": [r["loss"] for r in straight],
                                  "resumed": [r["loss"] for r in resumed]}
        print(f"(c) resume {mode}: equal losses {same}", flush=True)

    for mode in ("sync", "async"):
        check(f"c_resume_{mode}", lambda mode=mode: resume(mode))

    # (d) the export through transformers
    def export():
        import transformers

        from letrecipes.components.teachers import load_teacher

        final = work / "straight" / "final"
        ids = torch.tensor([tok.encode("To be, or not to be, that is the question.")], device=size["device"])
        hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(size["device"]).eval()
        ours = load_teacher({"_component_": "auto", "path": str(final), "dtype": "fp32"}, device=size["device"])
        with torch.no_grad():
            diff = (hf(ids).logits.float() - ours.logits(ids).float()).abs().max().item()
        report["export"] = {"max_abs_logit_diff": diff, "equal_logits": diff <= size["logits_atol"],
                            "atol": size["logits_atol"]}
        print(f"(d) export: max |logit difference| {diff:.2e}", flush=True)

    check("d_export", export)

    # (e) the recipes' own profiler on this device: a trace of one step, with its kernels on a GPU
    def profiler():
        folder = work / "profiled"
        run(pretrain, "pretrain_7b", folder, [*resume_cfg, "max_steps=3", "profiler.enabled=true",
                                              "profiler.first_step=2", "profiler.steps=1"])
        trace = folder / "profile" / "step_2" / "rank0.trace.json.gz"
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        kernels = sum(1 for e in events if e.get("cat") == "kernel")
        ops = (folder / "profile" / "step_2" / "rank0.ops.txt").read_text().splitlines()
        report["profiler"] = {"trace_bytes": trace.stat().st_size, "kernel_events": kernels,
                              "kernels_traced": kernels > 0 if gpu else None, "ops_head": ops[:6]}
        print(f"(e) profiler: {trace.stat().st_size:,} bytes, {kernels} kernel events", flush=True)

    gpu = not args.cpu  # speed and memory targets mean nothing at tiny sizes on a CPU
    check("e_profiler", profiler)

    def judged(ok):
        if not gpu:
            return None
        try:
            return bool(ok())
        except (KeyError, TypeError):  # a check that failed is not met
            return False

    report["targets"] = {
        "float8_at_least_1.3x_bf16": judged(lambda: report["float8_over_bf16"] >= 1.3),
        "bf16_mfu_at_least_40%": judged(lambda: arms["bf16"]["mfu"] >= 0.40),
        "let_step_at_most_1.05x": judged(lambda: report["let"]["let_over_baseline"] <= 1.05),
        "peak_memory_within_15%_of_estimate": judged(lambda: abs(arms["bf16"]["peak_over_estimate"] - 1) <= 0.15),
        "resume_equal_losses": len(report["resume"]) == 2 and all(v["equal_losses"] for v in report["resume"].values()),
        "export_equal_logits": report.get("export", {}).get("equal_logits", False),
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["table"] = table(report)
    print(report["table"])
    save()
    shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


def table(r: Dict) -> str:
    a = r["throughput"]
    t = {k: "n/a (cpu)" if v is None else v for k, v in r["targets"].items()}
    failed = lambda name: f"failed: {r['errors'].get(name, 'not run')[:80]}"  # noqa: E731

    def mfu(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    def arm(name, text):
        return text() if name in a else failed(f"a_{name}")

    resume, profiled = r["resume"], r.get("profiler")
    rows = [f"gpu_check on {r['device_name']} ({r['mode']} sizes), {r['wall_s']:.0f} s",
            "| check | measured | target | met |", "|---|---|---|---|",
            f"| (a) {'bf16' if r['mode'] == 'gpu' else 'fp32'} slice | " + arm("bf16", lambda: (
                f"{a['bf16']['tokens_per_s']:,.0f} tok/s, MFU {mfu(a['bf16']['mfu'])}, peak "
                f"{a['bf16']['peak_memory_gib']:.1f} GiB (estimate {a['bf16']['estimate_gib']:.1f})")) +
            f" | MFU >= 40%; peak within 15% | {t['bf16_mfu_at_least_40%']}; "
            f"{t['peak_memory_within_15%_of_estimate']} |",
            "| (a) float8 slice | " + arm("float8", lambda: (
                f"{a['float8']['tokens_per_s']:,.0f} tok/s"
                + (f" ({r['float8_over_bf16']:.2f}x bf16)" if "float8_over_bf16" in r else "")
                + f", peak {a['float8']['peak_memory_gib']:.1f} GiB")) +
            f" | >= 1.3x | {t['float8_at_least_1.3x_bf16']} |",
            "| (b) LET step / baseline step | " + (
                f"{r['let']['let_over_baseline']:.3f} (teacher share {100 * r['let']['teacher_time_share']:.1f}%)"
                if "let" in r else failed("b_let")) + f" | <= 1.05 | {t['let_step_at_most_1.05x']} |",
            "| (c) resume, sync / async | equal losses: " + " / ".join(
                str(resume[m]["equal_losses"]) if m in resume else failed(f"c_resume_{m}") for m in ("sync", "async"))
            + f" | equal | {t['resume_equal_losses']} |",
            "| (d) export via transformers | " + (
                f"max logit difference {r['export']['max_abs_logit_diff']:.1e}" if "export" in r
                else failed("d_export")) + f" | <= {r['sizes']['logits_atol']:g} | "
            f"{t['export_equal_logits']} |",
            "| (e) the recipes' profiler | " + (
                f"one step traced, {profiled['trace_bytes']:,} bytes, {profiled['kernel_events']} kernel events"
                if profiled else failed("e_profiler")) + " | a trace, with kernels on a GPU | "
            + ("n/a (cpu)" if profiled and profiled["kernels_traced"] is None else str(bool(profiled)
                                                                                        and profiled["kernels_traced"]))
            + " |"]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
