"""Peak memory of reading a parquet file written as one row group (pandas' ``to_parquet``
and pyarrow's ``write_table`` put up to a million rows in a group), and a ``datasets``
folder's unit of 50,000 rows: made Python strings in batches of rows (components/corpus.py
since 2026-12-05) against all at once (what it did before).

    python benchmarks/parquet_memory.py [--mb 64 256]

Each way runs in a fresh process (peak resident memory, ``VmHWM``) and hashes the texts it
read, so both are checked to give the same documents. Texts of 0.5-4 KB from the demo's
Shakespeare. JSON in benchmarks/results/parquet_memory.json.
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

READ = """
import hashlib, json, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from letrecipes.components import corpus
path, way = Path(sys.argv[1]), sys.argv[2]
start, digest, rows = time.perf_counter(), hashlib.sha256(), 0
if way == "batches":
    texts = corpus._row_group_values(path, 0, "text", "data.source")
elif way == "whole":
    texts = pq.ParquetFile(path).read_row_group(0, columns=["text"]).column(0).to_pylist()
elif way == "dataset_batches":
    texts = corpus._dataset_values(corpus._load_dataset(path, "k"), ["text"], 0, corpus.DATASET_UNIT_ROWS, path, "k")
else:
    from datasets import load_from_disk
    texts = load_from_disk(str(path)).select_columns(["text"]).with_format("arrow")[0:corpus.DATASET_UNIT_ROWS]
    texts = texts.column(0).to_pylist()
for text in texts:
    digest.update(text.encode("utf-8"))
    rows += 1
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
print(json.dumps({"peak_rss_mb": round(peak, 1), "seconds": round(time.perf_counter() - start, 2),
                  "texts_sha256": digest.hexdigest(), "rows": rows}))
"""


def one_row_group(path: Path, megabytes: int, text: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng, texts, size = random.Random(0), [], 0
    while size < megabytes * 2**20:
        start = rng.randrange(len(text) - 4096)
        texts.append(text[start:start + rng.randrange(512, 4096)])
        size += len(texts[-1])
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path, row_group_size=len(texts))


def read(path: Path, way: str) -> dict:
    done = subprocess.run([sys.executable, "-c", READ, str(path), way], cwd=REPO, capture_output=True, text=True,
                          check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 256], help="MB of text in the row group")
    parser.add_argument("--out", default="benchmarks/results/parquet_memory.json")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare as prepare_demo

    demo = REPO / "outputs" / "demo"
    prepare_demo(demo)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(demo.rglob("*.txt")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="letrecipes-parquetmem-") as work:
        for mb in args.mb:
            path = Path(work) / f"one_group_{mb}mb.parquet"
            one_row_group(path, mb, text)
            from datasets import Dataset

            saved = Path(work) / f"saved_{mb}mb"
            Dataset.from_parquet(str(path), cache_dir=str(Path(work) / "hf_cache")).save_to_disk(str(saved))
            row = {"text_mb": mb, "file_mb": round(path.stat().st_size / 2**20, 1),
                   "batches": read(path, "batches"), "whole": read(path, "whole"),
                   "dataset_batches": read(saved, "dataset_batches"), "dataset_whole": read(saved, "dataset_whole")}
            row["same_texts"] = len({row[w]["texts_sha256"] for w in ("batches", "whole")}) == 1
            row["dataset_same_texts"] = len({row[w]["texts_sha256"] for w in ("dataset_batches", "dataset_whole")}) == 1
            rows.append(row)
            path.unlink()
            print(f"{mb} MB of text in one row group: peak {row['batches']['peak_rss_mb']:.0f} MB in batches, "
                  f"{row['whole']['peak_rss_mb']:.0f} MB whole; same texts: {row['same_texts']}; a datasets "
                  f"folder's first unit ({row['dataset_whole']['rows']:,} rows): {row['dataset_batches']['peak_rss_mb']:.0f}"
                  f" MB in batches, {row['dataset_whole']['peak_rss_mb']:.0f} MB at once; same texts: "
                  f"{row['dataset_same_texts']}", flush=True)
    write_json({**header("parquet_memory.py", argv), "rows": rows}, args.out)
    return 0 if all(r["same_texts"] and r["dataset_same_texts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
