"""Peak memory of reading a corpus file that is one JSON array of records: streamed record
by record (ijson, what components/corpus.py does) against ``json.loads`` of the whole
file (what it did before).

    python benchmarks/json_array_memory.py [--mb 32 128 512]
    python benchmarks/json_array_memory.py --layouts one_line wrapped_pretty lines --mb 128 \
        --baseline-corpus /tmp/corpus_before.py   # (git show REV:components/corpus.py > /tmp/corpus_before.py)

Each measurement runs in a fresh process (its peak resident memory, ``VmHWM``) and hashes
the texts it read, so every way is checked to give the same documents. The array holds
records like C4's (``text``, ``url``, ``timestamp``), each text 0.5-4 KB. Layouts:
``array`` (a record a line inside ``[`` ``]``), ``one_line`` (``json.dump(rows, f)``: no
newline at all), ``wrapped_pretty`` (``json.dump({"data": rows}, f, indent=2)``) and
``lines`` (JSON Lines, for the speed of the line reader). ``--baseline-corpus`` adds the
reader of another revision's corpus.py. JSON in benchmarks/results/json_array_memory.json
(or ``--out``).
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
if way.startswith("baseline="):  # another revision's corpus.py, loaded from its file
    import importlib.util
    spec = importlib.util.spec_from_file_location("corpus_baseline", way.split("=", 1)[1])
    corpus = sys.modules["corpus_baseline"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
start, digest, documents = time.perf_counter(), hashlib.sha256(), 0
if way == "whole" and source.suffix == ".jsonl":  # json.loads a line at a time: the plain way to read it
    texts = (json.loads(line)["text"] for line in open(source, encoding="utf-8"))
elif way == "whole":
    loaded = json.loads(source.read_bytes().decode("utf-8"))
    texts = (record["text"] for record in (loaded["data"] if isinstance(loaded, dict) else loaded))
else:
    texts = corpus._json_records(source, "text", "data.source", [])
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
                            text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if result.returncode:  # an older reader that cannot read the layout: its error is the result
        return {"error": (result.stderr.strip().splitlines() or ["exit %d" % result.returncode])[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_array(path: Path, megabytes: int, text: str, layout: str = "array") -> None:
    """C4-like records in ``layout``, written a record at a time (never held whole)."""
    rng, written = random.Random(0), 0
    indent = 2 if layout == "wrapped_pretty" else None
    between = {"array": "\n", "one_line": " ", "wrapped_pretty": "\n    ", "lines": ""}[layout]
    with open(path, "w", encoding="utf-8") as f:
        f.write({"array": "[", "one_line": "[", "wrapped_pretty": '{\n  "version": 2,\n  "data": [', "lines": ""}[layout])
        while written < megabytes * 2**20:
            start = rng.randrange(len(text) - 4096)
            fields = {"text": text[start:start + rng.randrange(512, 4096)], "url": f"https://example.org/{written}",
                      "timestamp": "2019-04-25T12:57:54Z"}
            record = json.dumps(fields, ensure_ascii=False, indent=indent)
            if indent:
                record = record.replace("\n", "\n    ")
            if layout == "lines":
                f.write(record + "\n")
            else:
                f.write(("," if written else "") + between + record)
            written += len(record) + 2
        f.write({"array": "\n]\n", "one_line": "]", "wrapped_pretty": "\n  ]\n}\n", "lines": ""}[layout])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--layouts", nargs="+", default=["array"],
                        choices=["array", "one_line", "wrapped_pretty", "lines"])
    parser.add_argument("--baseline-corpus", help="another revision's components/corpus.py to compare with")
    parser.add_argument("--out", default="benchmarks/results/json_array_memory.json")
    args = parser.parse_args(argv)
    from letrecipes.demo import prepare as prepare_demo

    demo = REPO / "outputs" / "demo"
    prepare_demo(demo)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(demo.rglob("*.txt")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="letrecipes-jsonmem-") as work:
        ways = ["streamed", "whole"] + (["baseline"] if args.baseline_corpus else [])
        for layout in args.layouts:
            for mb in args.mb:
                source = Path(work) / f"{layout}_{mb}mb.{'jsonl' if layout == 'lines' else 'json'}"
                write_array(source, mb, text, layout)
                row = {"layout": layout, "file_mb": round(source.stat().st_size / 2**20, 1)}
                for way in ways:
                    row[way] = measure(source, f"baseline={Path(args.baseline_corpus).resolve()}"
                                       if way == "baseline" else way)
                read = [way for way in ways if "error" not in row[way]]
                row["same_texts"] = "streamed" in read and len({row[way]["texts_sha256"] for way in read}) == 1
                rows.append(row)
                source.unlink()
                print(layout, mb, "MB:", {w: round(row[w]["peak_rss_mb"]) if w in read else "error" for w in ways},
                      {w: round(row[w]["seconds"], 1) for w in read}, "same texts:", row["same_texts"])
    write_json({**header("json_array_memory.py", argv), "rows": rows}, args.out)
    return 0 if all(r["same_texts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
