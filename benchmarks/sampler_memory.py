"""Memory and time of one rank's epoch order for very large corpora: the permutation table
(``torch.randperm``, what EpochSampler holds up to ``PERMUTATION_TABLE_MAX`` sequences)
against the order computed index by index (``IndexPermutation``, above it).

    python benchmarks/sampler_memory.py [--sequences 33554432 100000000 500000000] [--world 8]

Each measurement runs in a fresh process: the sampler of rank 0 of ``--world`` ranks reads
its first 1,000,000 indices; recorded are its peak resident memory (``VmHWM``) above the
process's baseline, the seconds to the first index and the indices per second after it.
500 M sequences of 2,048 tokens are a 1 T-token corpus. JSON in
benchmarks/results/sampler_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import header, write_json  # noqa: E402

CHILD = """
import json, sys, time
from letrecipes.components import data
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
n, world, way = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data.PERMUTATION_TABLE_MAX = n if way == "table" else 0
class Sized:
    def __len__(self):
        return n
sampler = data.EpochSampler(Sized(), num_replicas=world, rank=0, shuffle=True, seed=0, drop_last=True)
base = rss()
start = time.perf_counter()
order = iter(sampler)
next(order)
first = time.perf_counter() - start
start = time.perf_counter()
for _ in range(1_000_000 - 1):
    next(order)
rate = (1_000_000 - 1) / (time.perf_counter() - start)
print(json.dumps({"peak_rss_above_baseline_mb": rss() - base, "seconds_to_first_index": first,
                  "indices_per_s": rate}))
"""


def measure(sequences: int, world: int, way: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(sequences), str(world), way], cwd=REPO,
                            capture_output=True, text=True, check=True,
                            env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1 << 25, 100_000_000, 500_000_000])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampler_memory.json"))
    args = parser.parse_args(argv)
    rows = []
    for sequences in args.sequences:
        for way in ("table", "computed"):
            row = {"sequences": sequences, "tokens_at_2048": sequences * 2049, "order": way,
                   **measure(sequences, args.world, way)}
            rows.append(row)
            print(f"{sequences:>13,} sequences, {way:>8}: {row['peak_rss_above_baseline_mb']:8.1f} MB, first index "
                  f"after {row['seconds_to_first_index']:6.2f} s, {row['indices_per_s']:12,.0f} indices/s")
    write_json({**header("sampler_memory.py", argv), "world": args.world, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
