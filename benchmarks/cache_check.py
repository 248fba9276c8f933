"""What a launch spends checking a prepared cache before its first step: every token read
(as before 2026-12-05) against the shards recorded sound in verified.json (their sizes
only), on a synthetic cache of ``--tokens`` tokens, the page cache dropped before each
(as at a cluster job's start on a fresh node; needs root, else both are read warm and
the JSON says so).

    python benchmarks/cache_check.py                  # 1B tokens (2 GB of uint16), about 1 minute
    python benchmarks/cache_check.py --tokens 100000000

Writes benchmarks/results/cache_check.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import header, write_json
from data import REPO, synthetic_prepared

from letrecipes.components.prepare import damaged_shards, read_verified, write_verified
from letrecipes.components.tokenizer import Tokenizer


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(check) -> float:
    start = time.perf_counter()
    assert check() == [], "the synthetic cache must be sound"
    return round(time.perf_counter() - start, 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000_000)
    parser.add_argument("--out", default="benchmarks/results/cache_check.json")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    tokenizer = Tokenizer(REPO / "outputs/demo/tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="letcache-", dir=REPO / "outputs") as tmp:
        folder = Path(tmp) / "prepared"
        synthetic_prepared(folder, tokenizer, args.tokens)
        size_gb = sum(p.stat().st_size for p in folder.glob("shard_*.bin")) / 2**30
        cold = drop_page_cache()
        every_token = timed(lambda: damaged_shards(folder, tokenizer.vocab_size))
        write_verified(folder, tokenizer.vocab_size)
        drop_page_cache()
        recorded = timed(lambda: damaged_shards(folder, tokenizer.vocab_size, read_verified(folder, tokenizer.vocab_size)))
    report = {**header("cache_check.py", argv), "tokens": args.tokens, "cache_gb": round(size_gb, 2),
              "page_cache_dropped": cold, "every_token_s": every_token, "recorded_s": recorded,
              "every_token_gb_per_s": round(size_gb / every_token, 2)}
    print(f"{size_gb:.2f} GB cache ({'cold' if cold else 'warm: page cache not dropped'}): every token read "
          f"{every_token} s ({report['every_token_gb_per_s']} GB/s), recorded shards {recorded} s", flush=True)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
