"""Peak memory of `letrecipes export` (a DCP step checkpoint -> a Hugging Face folder)
against the model's size: the converter reads and writes one tensor at a time, so its
peak should follow the output shard size, not the model.

    python benchmarks/export.py            # about 3 minutes on 2 cores

Makes a 116M-parameter checkpoint (one step of pretrain_tiny widened: 444 MB of fp32
weights), converts it with the default shard size (one 220 MB bf16 file) and with
--max-shard-mb 32, and records each conversion's peak RSS (ru_maxrss of the process).
Writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import header, write_json
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["model.num_layers=12", "model.num_heads=12", "model.num_kv_heads=12", "model.embed_dim=768",
         "model.intermediate_dim=3072"]


MEASURED_CHILD = ("import resource, runpy, sys\n"
                  "sys.argv = ['letrecipes', *sys.argv[1:]]\n"
                  "try:\n    runpy.run_module('letrecipes', run_name='__main__')\n"
                  "finally:\n    print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def convert(checkpoint: Path, out: Path, *extra: str) -> dict:
    """Run `letrecipes export` in a child process that reports its own peak RSS."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED_CHILD, "export", str(checkpoint), str(out), *extra],
                            cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    peak_kb = int(result.stderr.split("PEAK_KB")[-1].split()[0])
    files = sorted(out.glob("*.safetensors"))
    return {"args": list(extra), "seconds": seconds, "peak_rss_mb": peak_kb / 1024, "output_files": len(files),
            "largest_file_mb": max(f.stat().st_size for f in files) / 2**20}


def baseline_rss() -> float:
    """Peak RSS of a process that imports what the converter imports and converts nothing."""
    code = ("import resource, torch, letrecipes.components.export, torch.distributed.checkpoint, "
            "torchtune.models.convert_weights; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.split()[-1]) / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/export.json")
    args = parser.parse_args(argv)
    report = header("export.py", argv)
    with tempfile.TemporaryDirectory(prefix="letexport-") as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes/pretrain", "--config",
                        "pretrain_tiny", *SHAPE, "max_steps=1", "save_every=1", "eval_every=0", "batch_size=2",
                        "data.seq_len=128", f"output_dir={run}", "progress_bar=false"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        checkpoint = run / "checkpoints" / "step_00000001"
        weights = json.loads((run / "final" / "config.json").read_text())
        params = sum(t.numel() for t in load_file(str(run / "final" / "model.safetensors")).values())
        report["model"] = {"parameters": params, "fp32_mb": params * 4 / 2**20, "bf16_mb": params * 2 / 2**20,
                           "layers": weights["num_hidden_layers"], "hidden_size": weights["hidden_size"]}
        report["import_only_peak_rss_mb"] = baseline_rss()
        report["conversions"] = [convert(checkpoint, Path(tmp) / "small_shards", "--max-shard-mb", "32"),
                                 convert(checkpoint, Path(tmp) / "one_file")]
    for row in report["conversions"]:
        row["over_import_only_mb"] = row["peak_rss_mb"] - report["import_only_peak_rss_mb"]
        print(f"export {' '.join(row['args']) or '(default shard size)'}: peak RSS {row['peak_rss_mb']:.0f} MB "
              f"({row['over_import_only_mb']:.0f} MB above importing alone), largest file {row['largest_file_mb']:.0f} MB,"
              f" {row['seconds']:.1f} s; model {report['model']['fp32_mb']:.0f} MB fp32 / "
              f"{report['model']['bf16_mb']:.0f} MB bf16", flush=True)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
