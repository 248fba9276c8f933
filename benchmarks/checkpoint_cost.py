"""What checksummed checkpoints cost: save time with and without the SHA-256 pass, and the
time to verify a checkpoint at resume.

    python benchmarks/checkpoint_cost.py [--params-m 100] [--repeats 3]

A model of ``--params-m`` million fp32 parameters with AdamW state (so a checkpoint of
about 12 bytes per parameter, like a real run's) is saved ``--repeats`` times through
:class:`Checkpointer`; the marker's hashing is timed inside each save. JSON in
benchmarks/results/checkpoint_cost.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._common import header, write_json  # noqa: E402
from letrecipes.components.checkpointing import Checkpointer, Progress  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/checkpoint_cost.json")
    args = parser.parse_args(argv)
    width = 2048
    layers = max(1, round(args.params_m * 1e6 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # optimizer state exists, as in a real checkpoint
    work = Path(tempfile.mkdtemp(prefix="letrecipes-ckpt-cost-"))
    try:
        ckpt = Checkpointer(work, keep_last=1, log=lambda message: None)
        ckpt.track(model, optimizer, progress=Progress())
        saves, verifies = [], []
        for step in range(1, args.repeats + 1):
            path = ckpt.save(step)
            saves.append(dict(ckpt.last_save))
            start = time.perf_counter()
            assert ckpt.verify(path) == []
            verifies.append(time.perf_counter() - start)
        size_mb = saves[-1]["bytes"] / 2**20
        save_s = min(s["save_s"] for s in saves)
        checksum_s = min(s["checksum_s"] for s in saves)
        report = {
            **header("checkpoint_cost.py", argv),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "checkpoint_mb": round(size_mb, 1),
            "save_s_min": round(save_s, 3), "checksum_s_min": round(checksum_s, 3),
            "checksum_share_of_save": round(checksum_s / save_s, 3),
            "checksum_mb_per_s": round(size_mb / checksum_s, 1), "verify_s_min": round(min(verifies), 3),
            "saves": saves, "verify_s": verifies,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(report, args.out)
    print({k: report[k] for k in ("checkpoint_mb", "save_s_min", "checksum_s_min", "checksum_share_of_save",
                                  "verify_s_min")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
