"""Listing a raw corpus of many small files, as every launch on it does (the token cache is
keyed by the files' names, sizes and times): the walk on ``os.scandir`` (since 2026-12-05)
against the walk on ``sorted(rglob)`` it replaced, side by side, then the whole listing into
units (``corpus.list_units``).

    python benchmarks/corpus_listing.py                 # 200,000 files in 200 folders, about a minute
    python benchmarks/corpus_listing.py --files 20000   # a quick look

Writes benchmarks/results/corpus_listing.json. Run it on a quiet machine; the first listing
of a fresh tree is read from the page cache like the rest (the files were just written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components import corpus  # noqa: E402


def rglob_walk(item: Path) -> list:
    """The folder walk as it was written before 2026-12-05 (files, datasets folders, links to nothing)."""
    out, datasets = [], []
    for path in sorted(item.rglob("*")):
        if any(path.is_relative_to(d) for d in datasets):
            continue
        if corpus.is_dataset_folder(path):
            datasets.append(path)
            out.append((path, "dataset"))
        elif path.is_symlink() and not path.exists() and not path.name.startswith("."):
            out.append((path, "broken"))
        elif path.is_file() and not any(part.startswith(".") for part in path.relative_to(item).parts):
            out.append((path, "file"))
    return out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - start, 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--folders", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/corpus_listing.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="letlist-") as tmp:
        root = Path(tmp) / "corpus"
        per = -(-args.files // args.folders)
        for i in range(args.files):
            folder = root / f"shard_{i // per:04d}"
            if i % per == 0:
                folder.mkdir(parents=True)
            (folder / f"doc_{i:07d}.txt").write_text(f"document {i}\n")
        before, rglob_s = timed(rglob_walk, root)
        after, scandir_s = timed(lambda r: list(corpus._folder_entries(r)), root)
        units, units_s = timed(corpus.list_units, root)
    report = {**header("corpus_listing.py", argv), "files": args.files, "folders": args.folders,
              "walk_rglob_s": rglob_s, "walk_scandir_s": scandir_s, "walk_speedup": round(rglob_s / scandir_s, 2),
              "same_listing": before == after, "list_units_s": units_s, "units": len(units),
              "list_units_us_per_file": round(units_s / args.files * 1e6, 1)}
    print(f"{args.files:,} files: walk on rglob {rglob_s} s, on scandir {scandir_s} s ({report['walk_speedup']}x, same "
          f"listing: {report['same_listing']}); list_units {units_s} s ({report['list_units_us_per_file']} us a file; "
          f"so a million files in about {report['list_units_us_per_file']:.0f} s)", flush=True)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
