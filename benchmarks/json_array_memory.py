"""Peak memory of reading a corpus file that is one JSON array of records: streamed record
by record (ijson, what components/corpus.py does) against ``json.loads`` of the whole
file (what it did before).

    python benchmarks/json_array_memory.py [--mb 32 128 512]

Each measurement runs in a fresh process (its peak resident memory, ``VmHWM``) and hashes
the texts it read, so both ways are checked to give the same documents. The array holds
records like C4's (``text``, ``url``, ``timestamp``), each text 0.5-4 KB. JSON in
benchmarks/results/json_array_memory.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402

CHILD = """
import hashlib, json, sys, time
from pathlib import Path
from letrecipes.components import corpus
source, way = Path(sys.argv[1]), sys.argv[2]
start, digest, documents = time.perf_counter(), hashlib.sha256(), 0
if way == "streamed":
    texts = corpus._json_records(source, "text", "data.source", [])
else:
    texts = (record["text"] for record in json.loads(source.read_bytes().decode("utf-8")))
for text in texts:
    digest.update(text.encode("utf-8"))
    documents += 1
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
print(json.dumps({"peak_rss_mb": peak, "seconds": seconds, "texts_sha256": digest.hexdigest(),
                  "documents": documents}))
"""


def measure(source: Path, way: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), way], cwd=REPO, capture_output=True,
                            text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_array(path: Path, megabytes: int, text: str) -> None:
    """A JSON array of C4-like records, written a record at a time (never held whole)."""
    rng, written = random.Random(0), 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        while written < megabytes * 2**20:
            start = rng.randrange(len(text) - 4096)
            record = json.dumps({"text": text[start:start + rng.randrange(512, 4096)], "url": "https://example.org/"
                                 f"{written}", "timestamp": "2019-04-25T12:57:54Z"}, ensure_ascii=False)
            f.write(("," if written else "") + "\n" + record)
            written += len(record) + 2
        f.write("\n]\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--out", default="benchmarks/results/json_array_memory.json")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare as prepare_demo

    demo = REPO / "outputs" / "demo"
    prepare_demo(demo)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(demo.rglob("*.txt")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="letrecipes-jsonmem-") as work:
        for mb in args.mb:
            source = Path(work) / f"array_{mb}mb.json"
            write_array(source, mb, text)
            row = {"file_mb": round(source.stat().st_size / 2**20, 1)}
            for way in ("streamed", "whole"):
                row[way] = measure(source, way)
            row["same_texts"] = row["streamed"]["texts_sha256"] == row["whole"]["texts_sha256"]
            rows.append(row)
            source.unlink()
            print(mb, "MB:", {w: round(row[w]["peak_rss_mb"]) for w in ("streamed", "whole")},
                  {w: round(row[w]["seconds"], 1) for w in ("streamed", "whole")}, "same texts:", row["same_texts"])
    write_json({**header("json_array_memory.py", argv), "rows": rows}, args.out)
    return 0 if all(r["same_texts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
