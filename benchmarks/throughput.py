"""Throughput and memory: the LET recipe, the plain recipe and a hand-written loop.

    python benchmarks/throughput.py [--steps 10] [--nproc 1 2] [key=value ...]

Same model (``baseline_tiny``'s student unless overridden), batch and data for all arms.
For each process count the three arms run in ONE process group with their steps
interleaved (hand, pretrain, LET, then rotated), so they share the machine's load; medians
of the step times give tokens/s and the ratios. Peak memory is measured per arm in a
process of its own (peak RSS on CPU, max allocated on CUDA). Writes
``benchmarks/results/throughput.json``.

The hand loop is the minimum a PyTorch user would write: model(tokens), cross-entropy,
backward, clip, AdamW step; under several processes, FSDP2 per block + root, as the
recipes do. The recipe's overhead is its step time over the hand loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import header, write_json

from letrecipes._config import load_config

ARMS = ("hand", "pretrain", "let")


def build_recipe(kind: str, overrides, workdir: Path):
    from letrecipes.let_pretrain import LETPretrainRecipe
    from letrecipes.pretrain import PretrainRecipe

    cls, config = (LETPretrainRecipe, "let_tiny") if kind == "let" else (PretrainRecipe, "baseline_tiny")
    cfg = load_config(config, [*overrides, f"output_dir={workdir / kind}", "overwrite=true", "save_every=0",
                               "progress_bar=false", "eval_every=0", "max_steps=100000"])
    recipe = cls(cfg)
    recipe.setup()
    recipe.trainable.train()
    return recipe


class HandLoop:
    """The reference: a plain loop over the recipe's own model, data and optimizer settings."""

    def __init__(self, reference):
        from omegaconf import OmegaConf

        from letrecipes.components import parallel
        from letrecipes.components.data import build_dataloader
        from letrecipes.components.models import llama_model

        cfg = reference.cfg
        model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                        if k not in ("_component_", "vocab_size")}
        torch.manual_seed(0)
        self.device = reference.device
        self.model = llama_model(vocab_size=reference.model_args.vocab_size, max_seq_len=int(cfg.data.seq_len),
                                 **model_kwargs).to(self.device)
        self.autocast = reference.autocast_dtype
        if reference.world_size > 1:
            parallel.shard_model(self.model, reference.mp_policy)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(cfg.optimizer.lr), weight_decay=0.1,
                                           betas=(0.9, 0.95))
        self.iterator = iter(build_dataloader(reference.train_set, int(cfg.batch_size), seed=1,
                                              rank=reference.rank, world_size=reference.world_size))

    def train_step(self):
        start = time.perf_counter()
        batch = next(self.iterator)
        tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {"step_time_s": time.perf_counter() - start}


def interleaved(args, overrides) -> dict:
    """Run in every process of the group; rank 0 returns the medians."""
    with tempfile.TemporaryDirectory(prefix="letthroughput-") as tmp:
        recipes = {kind: build_recipe(kind, overrides, Path(tmp)) for kind in ("pretrain", "let")}
        steps = {"hand": HandLoop(recipes["pretrain"]).train_step,
                 **{kind: recipe.timed_step for kind, recipe in recipes.items()}}
        for _ in range(args.warmup):
            for arm in ARMS:
                steps[arm]()
        times = {arm: [] for arm in ARMS}
        for i in range(args.steps):
            # rotate the order: an arm's step can be slowed by what ran just before it
            for arm in ARMS[i % 3:] + ARMS[:i % 3]:
                times[arm].append(steps[arm]()["step_time_s"])
        tokens = recipes["pretrain"].tokens_per_step
        result = {arm: {"step_s_median": statistics.median(t), "tokens_per_s": tokens / statistics.median(t)}
                  for arm, t in times.items()}
        result["pretrain_over_hand"] = result["pretrain"]["step_s_median"] / result["hand"]["step_s_median"]
        result["let_over_hand"] = result["let"]["step_s_median"] / result["hand"]["step_s_median"]
        result["let_over_pretrain"] = result["let"]["step_s_median"] / result["pretrain"]["step_s_median"]
        result["tokens_per_step"] = tokens
        for recipe in recipes.values():
            recipe.cleanup()
    return result


def peak_memory(arm: str, args, overrides) -> float:
    """Peak memory (MiB) of one arm alone, for ``args.steps`` steps, in a fresh process."""
    code = (f"import sys; sys.argv = ['x', '--memory-arm', {arm!r}, '--steps', '{args.steps}', *{overrides!r}];"
            "sys.path.insert(0, 'benchmarks'); import throughput; throughput.main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(arm: str, args, overrides) -> None:
    with tempfile.TemporaryDirectory(prefix="letthroughput-") as tmp:
        recipe = build_recipe("let" if arm == "let" else "pretrain", overrides, Path(tmp))
        runner = HandLoop(recipe) if arm == "hand" else recipe
        if arm == "hand":  # the hand loop owns only its own model: drop the recipe's
            del recipe.model, recipe.trainable, recipe.optimizer
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            runner.train_step()
        if torch.cuda.is_available():
            print(torch.cuda.max_memory_allocated() / 2**20)
        else:
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--memory-arm", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.memory_arm:
        return memory_child(args.memory_arm, args, overrides)
    if args.child_out:  # one process of a torchrun group
        result = interleaved(args, overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.child_out).write_text(json.dumps(result))
        return None

    teacher = Path("outputs/pretrain_tiny/final")
    if not teacher.is_dir():
        from letrecipes import pretrain
        from letrecipes.demo import prepare

        prepare()  # timing needs a teacher of the right shape, not a trained one
        pretrain.recipe_main(["--config", "pretrain_tiny", "max_steps=1", "save_every=0", "eval_every=0",
                              "overwrite=true", "output_dir=outputs/pretrain_tiny"])
    report = header("throughput.py", argv)
    for nproc in args.nproc:
        with tempfile.NamedTemporaryFile(suffix=".json") as child_out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                   "benchmarks/throughput.py", "--child-out", child_out.name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *overrides]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
            subprocess.run(cmd, check=True, env=env, timeout=1800)
            report[f"{nproc}_process"] = json.loads(Path(child_out.name).read_text())
        print(json.dumps(report[f"{nproc}_process"], indent=2), flush=True)
    report["peak_memory_mib_1_process"] = {arm: peak_memory(arm, args, overrides) for arm in ARMS}
    print(json.dumps(report["peak_memory_mib_1_process"], indent=2))
    write_json(report, args.out)


if __name__ == "__main__":
    main()
