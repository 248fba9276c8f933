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


def test_setup_with_a_python_older_than_the_pinned_stack_is_one_line_before_any_install(tmp_path):
    """With Python 3.10, scripts/setup.sh made a venv and pip ended in "ResolutionImpossible"
    (transformers 5.21+, pyarrow 26 and matplotlib 3.11 have no 3.10 build) minutes later."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    fake = tmp_path / "python3.10"  # answers the script's two questions as Python 3.10 would
    fake.write_text("#!/bin/sh\ncase \"$2\" in *version_info*) exit 1;; *python_version*) echo 3.10.13;;\n"
                    "*) echo \"$@\" >> \"$(dirname \"$0\")/asked\";; esac\n")  # anything else (-m venv): noted
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"setup: error: {fake} is Python 3.10.13; letrecipes' pinned stack needs 3.11 or later. Fix: "
        "PYTHON=python3.11 bash scripts/setup.sh (remove .venv first if it was made with the older one).")
    assert not (tmp_path / ".venv").exists() and not (tmp_path / "asked").exists()
