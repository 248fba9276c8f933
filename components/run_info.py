"""What produced a run: the resolved config, package versions and the git revision.

Printed at start, written to ``<output_dir>/run_info.json`` and into every checkpoint, so
a result can always be traced back to the code and settings that made it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("torch", "torchtune", "torchao", "torchdata", "omegaconf", "tokenizers", "safetensors", "numpy", "gguf",
            "letrecipes")
REPO = Path(__file__).resolve().parents[1]


def git_revision(repo: Path = REPO) -> Optional[str]:
    """``<commit>`` or ``<commit>+dirty``; None outside a git checkout (an installed wheel)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect(cfg: DictConfig, world_size: int = 1) -> Dict[str, Any]:
    return {
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world_size,
        "argv": sys.argv,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def summary(info: Dict[str, Any]) -> str:
    p = info["packages"]
    return (f"run: git {info['git_revision'] or 'unknown (not a git checkout)'}; torch {p['torch']}, torchtune "
            f"{p['torchtune']}, torchao {p['torchao']}; python {info['python']}; {info['world_size']} process(es)")
