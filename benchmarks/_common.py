"""What every benchmark records: the command that made it, the machine, and a JSON file."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from letrecipes.components.files import replace_atomically
from letrecipes.components.run_info import hardware


def header(script: str, argv=None) -> dict:
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": " ".join([f"python benchmarks/{script}", *args]),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    **{key: value for key, value in hardware().items()
                       if key in ("cpu", "cpu_flags", "cpu_capability")}},
    }


def save_figure(fig, axes, path: Path, legend_size: int = 7) -> Path:
    """Legends, layout, and the PNG written (its folder made); the figure closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_json(report: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
