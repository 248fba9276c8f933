"""Peak memory of preparing one long document: encoded in pieces (the default) against in
one call, as the prepare step did before.

    python benchmarks/prepare_memory.py [--mb 8 32 128] [--whole-up-to 32]

Each measurement runs in a fresh process (its peak resident memory, ``VmHWM``) on a
text file that is a single document of the demo corpus's text repeated to ``--mb``
megabytes, and checks that both ways give the same token ids (the one-call way only up
to ``--whole-up-to`` MB: it needs about 170 bytes of memory per byte of text). JSON in
benchmarks/results/prepare_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402

CHILD = """
import hashlib, json, sys, time
from letrecipes.components import prepare
from letrecipes.components.tokenizer import Tokenizer
source, out, whole = sys.argv[1], sys.argv[2], sys.argv[3] == "whole"
if whole:
    prepare.PIECE_CHARS = 1 << 62  # no piece is ever cut: the document goes to one encode call
start = time.perf_counter()
prepare.prepare_corpus(source, Tokenizer(sys.argv[4]), out, log=lambda _: None)
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would count the parent's
# memory at fork time (here: the parent holds the generated document). Read before the
# check below reads the shards.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
digest, size = hashlib.sha256(), 0
for shard in sorted(__import__("pathlib").Path(out).glob("shard_*.bin")):
    with open(shard, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
            size += len(block)
print(json.dumps({"peak_rss_mb": peak, "seconds": seconds, "ids_sha256": digest.hexdigest(), "tokens": size // 2}))
"""


def measure(source: Path, out: Path, way: str, tokenizer: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), way, str(tokenizer)], cwd=REPO,
                            capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1",
                                                                             "RAYON_NUM_THREADS": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--whole-up-to", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/prepare_memory.json")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare as prepare_demo

    demo = REPO / "outputs" / "demo"
    prepare_demo(demo)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(demo.rglob("*.txt")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="letrecipes-prepmem-") as work:
        for mb in args.mb:
            source = Path(work) / f"one_document_{mb}mb.txt"
            repeated = (text * (mb * 2**20 // len(text) + 1))[: mb * 2**20]
            source.write_text(repeated, encoding="utf-8")
            row = {"document_mb": mb}
            for way in ("pieces", "whole") if mb <= args.whole_up_to else ("pieces",):
                row[way] = measure(source, Path(work) / f"out_{mb}_{way}", way, demo / "tokenizer.json")
            if "whole" in row:
                row["same_ids"] = row["pieces"]["ids_sha256"] == row["whole"]["ids_sha256"]
            rows.append(row)
            print(mb, "MB:", {w: round(row[w]["peak_rss_mb"]) for w in ("pieces", "whole") if w in row},
                  "same ids:", row.get("same_ids"))
    write_json({**header("prepare_memory.py", argv), "rows": rows}, args.out)
    return 0 if all(r.get("same_ids", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
