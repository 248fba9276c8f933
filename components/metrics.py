"""Metric sinks: a JSONL file, stdout and (optionally) Weights & Biases.

``MetricLogger.log(record)`` writes one JSON object per call to ``<output_dir>/metrics.jsonl``
and forwards it to wandb when enabled. wandb runs with ``mode: offline`` or
``disabled`` with no network and no API key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional


class MetricLogger:
    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        wandb: Optional[Dict[str, Any]] = None,
        run_config: Optional[Dict[str, Any]] = None,
        append: bool = False,
    ):
        self.enabled = enabled
        self._file = None
        self._wandb = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(output_dir) / "metrics.jsonl", "a" if append else "w", buffering=1)
        wandb = dict(wandb or {})
        if wandb.pop("enabled", False):
            import wandb as wandb_lib

            wandb.setdefault("mode", "offline")
            wandb.setdefault("dir", str(output_dir))
            self._wandb = wandb_lib.init(config=run_config, **wandb)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path):
    """All records of a metrics.jsonl, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_runs(baseline: list, let: list) -> Dict[str, Any]:
    """Step speedup of a LET run over a baseline, from their metrics.jsonl records.

    ``let_steps_to_baseline`` is the first validation step at which LET's validation
    loss is at or below the baseline's final one (None if it never gets there).
    """
    base_val = [(r["step"], r["val_loss"]) for r in baseline if r.get("val_loss") is not None]
    let_val = [(r["step"], r["val_loss"]) for r in let if r.get("val_loss") is not None]
    if not base_val or not let_val:
        raise ValueError("both runs need validation records (set eval_every > 0)")
    base_steps, base_final = base_val[-1]
    reached = next((step for step, loss in let_val if loss <= base_final), None)
    return {
        "baseline_final_val_loss": base_final,
        "let_final_val_loss": let_val[-1][1],
        "baseline_steps": base_steps,
        "let_steps_to_baseline": reached,
        "step_speedup": base_steps / reached if reached else None,
    }
