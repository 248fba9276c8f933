"""What git tracks is the card's layout and nothing a run wrote: a probe's output folder
(a config, metrics, a model) was once committed at the top level by mistake."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = {".ci", ".gitignore", "README.md", "pyproject.toml", "constraints.txt", "letrecipes", "components",
             "recipes", "tests", "docs", "benchmarks", "scripts"}
RUN_OUTPUTS = {"metrics.jsonl", "run_info.json", "model.safetensors", ".metadata"}


def tracked_files():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to check")
    listing = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [Path(line) for line in listing.splitlines()]


def test_tracked_files_are_the_projects_own():
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    strays = sorted({str(path.parts[0]) for path in files} - TOP_LEVEL)
    assert not strays, f"tracked outside the project's layout: {strays} (git rm -r them)"
    outputs = [str(path) for path in files if path.name in RUN_OUTPUTS]
    assert not outputs, f"a run's outputs are tracked: {outputs}"
    results = [str(path) for path in files if path.parts[:2] == ("benchmarks", "results")
               and path.suffix != ".json" and path.name != ".gitkeep"]
    assert not results, f"benchmarks/results holds the benchmarks' JSON only: {results}"
