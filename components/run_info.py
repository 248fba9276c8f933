"""What produced a run: the resolved config, package versions and the git revision.

Printed at start, written to ``<output_dir>/run_info.json`` and into every checkpoint, so
a result can always be traced back to the code and settings that made it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("torch", "torchtune", "torchao", "torchdata", "omegaconf", "tokenizers", "safetensors", "numpy", "gguf",
            "letrecipes")
REPO = Path(__file__).resolve().parents[1]


def git_revision(repo: Path = REPO) -> Optional[str]:
    """``<commit>`` or ``<commit>+dirty``; None outside a git checkout (an installed wheel).
    A checkout of another user's (a lab's shared one) is read too: git refuses it as of
    "dubious ownership" unless told it is safe, and the run recorded no revision. Nothing is
    written (no index refresh: a `git commit` of the user's at the same moment found
    index.lock taken)."""
    git = ["git", "-c", f"safe.directory={repo}", "--no-optional-locks"]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], cwd=repo,
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


def outdated(package: str, minimum: Tuple[int, ...], version: Optional[str] = None,
             below: Optional[str] = None) -> Optional[str]:
    """Where the installed ``package`` (or ``version`` of it) is older than ``minimum``, by its
    release numbers (4.46.0.dev0 is 4.46): what it needs and the fix, for an error line (``below``:
    a version the fix's pip command stays under); None where it is not, or where its version
    cannot be read (a package put on ``PYTHONPATH`` as source, llama.cpp's gguf-py say, has no
    installed metadata: not checked)."""
    try:
        version = version or importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if tuple(int(part) for part in re.findall(r"\d+", version)[:len(minimum)]) >= minimum:
        return None
    wanted = ".".join(map(str, minimum))
    return (f"needs {package} {wanted} or later; {version} is installed. Fix: pip install '{package}>={wanted}"
            f"{f',<{below}' if below else ''}' (constraints.txt pins the tested one)")


def source_fingerprints() -> Dict[str, str]:
    """A short hash of each letrecipes module this process runs (the recipes' and the
    components'), by module name: the same for a checkout and an installed wheel of one
    version, where a commit says nothing of a node's uncommitted edits or of a wheel."""
    import letrecipes
    import letrecipes.components

    return {f"{package.__name__}.{path.stem}": hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for package in (letrecipes, letrecipes.components)
            for path in sorted(Path(package.__file__).parent.glob("*.py"))}


def what_every_rank_must_share(cfg: DictConfig) -> Dict[str, Any]:
    """What the processes of one job must agree on (parallel.check_ranks_agree): the resolved
    config, the letrecipes source and the packages' versions, and the working directory when
    the config holds relative paths (nodes started from different folders would read other
    files and write other folders under the same names)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    facts = {"config": config, "source": source_fingerprints(), "packages": package_versions(),
             "python": sys.version.split()[0]}
    paths = [(name, section[key]) for section, key, name in config_paths(config)]
    paths += [(key, config.get(key)) for key in ("output_dir", "init_from", "resume")]
    relative = [name for name, value in paths if isinstance(value, str) and value not in ("true", "false")
                and not value.startswith("pkg:") and not os.path.isabs(value)]
    if relative:
        facts[f"working directory (of the relative {', '.join(relative[:3])})"] = os.getcwd()
    return facts


# the instructions that choose torch's and oneDNN's CPU kernels (bf16 matmuls use AMX where there is one)
CPU_KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")


def cpu_model() -> Tuple[Optional[str], List[str]]:
    """The processor's name as the kernel reports it, and which of CPU_KERNEL_FLAGS it has
    (Linux; elsewhere what ``platform`` knows, and no flags)."""
    name, flags = None, []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = [flag for flag in CPU_KERNEL_FLAGS if flag in value.split()]
                    break
    except OSError:
        pass
    return name or platform.processor() or None, flags


def hardware() -> Dict[str, Any]:
    """What the numbers depend on beyond the code: the same run on another processor picks
    other kernels (torch's CPU capability, oneDNN's AMX for bf16) and rounds otherwise, so
    its losses differ in the last digits and drift apart over hundreds of steps (the demo's
    baseline: 4.6418 on one machine, 4.6869 on another, same code and packages)."""
    import torch

    name, flags = cpu_model()
    return {"cpu": name, "cpu_flags": flags, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def collect(cfg: DictConfig, world_size: int = 1) -> Dict[str, Any]:
    return {
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hardware": hardware(),
        "world_size": world_size,
        "argv": sys.argv,
        "cwd": os.getcwd(),  # what the config's relative paths are relative to (rebased_config)
        "launcher_job": launcher_job(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def torchrun_attempt() -> int:
    """Which start of its job this process is: 0 for the first, N for torchrun's N-th
    restart (``--max-restarts``); 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def launcher_job() -> Optional[str]:
    """Which torchrun job this process belongs to: its run id and its agent (the torchrun
    process on this host, the same across the job's restarts); None outside torchrun."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    import socket

    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}@{socket.gethostname()}:{os.getppid()}"


def restart_of(output_dir: Path) -> int:
    """torchrun's restart number when this launch restarts (``--max-restarts``) the job
    that last wrote ``output_dir``'s run_info.json, else 0. torchrun starts every process
    again with the same arguments, so a run launched without ``resume=true`` would refuse
    its own folder on every restart (or, with ``overwrite=true``, start over): the recipes
    read a restart of the same job as ``resume=true``. Another job's run in the folder is
    not this one's to go on with, whatever torchrun's restart count."""
    count = torchrun_attempt()
    if count == 0:
        return 0
    try:
        recorded = json.loads((Path(output_dir) / "run_info.json").read_text()).get("launcher_job")
    except (OSError, ValueError, AttributeError):
        return 0
    return count if recorded is not None and recorded == launcher_job() else 0


def summary(info: Dict[str, Any]) -> str:
    p = info["packages"]
    return (f"run: git {info['git_revision'] or 'unknown (not a git checkout)'}; torch {p['torch']}, torchtune "
            f"{p['torchtune']}, torchao {p['torchao']}; python {info['python']}; {info['world_size']} process(es)")


def config_paths(config: Dict[str, Any]) -> Iterator[Tuple[Dict[str, Any], str, str]]:
    """``(section, key, dotted name)`` of each setting of a training config (a plain dict)
    that names the data, the tokenizer or the teacher on disk: ``section[key]`` is the
    value, for reading or replacing (rebased_config; the config check for ``~`` and ``$``)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    for key in ("source", "val_source", "cache_dir"):
        if key in data:
            yield data, key, f"data.{key}"
    for i, entry in enumerate(data.get("sources") or []):
        if isinstance(entry, dict) and "source" in entry:
            yield entry, "source", f"data.sources[{i}].source"
    for section, key in (("tokenizer", "path"), ("teacher", "path"), ("teacher", "tokenizer_dir")):
        if isinstance(config.get(section), dict) and key in config[section]:
            yield config[section], key, f"{section}.{key}"


def saved_config(run: Path) -> Optional[Dict[str, Any]]:
    """A run folder's config.yaml as a plain dict, its relative paths rebased to work from
    here (:func:`rebased_config`); None when it is missing or does not read."""
    try:
        return rebased_config(run, OmegaConf.to_container(OmegaConf.load(Path(run) / "config.yaml"), resolve=True))
    except Exception:  # missing, damaged, an interpolation that no longer resolves: the caller says it without
        return None


def rebased_config(run: Path, config: Dict[str, Any]) -> Dict[str, Any]:
    """A run's config (a plain dict) with its relative paths made to work from here: a run
    started in the repository with ``tokenizer.path: outputs/demo/tokenizer.json`` and read
    from another folder (an eval job, an export) found no tokenizer. Each relative path that
    does not exist from here is read from the working directory the run recorded, else from
    a folder the run lies in (a run under outputs/ started beside it); one that exists
    nowhere is left as it is, for its key's own error."""
    import json

    run = Path(run).resolve()
    try:
        recorded = json.loads((run / "run_info.json").read_text()).get("cwd")
    except (OSError, ValueError, AttributeError):
        recorded = None
    bases = [Path(recorded)] if isinstance(recorded, str) and recorded else []
    bases += list(run.parents)

    def rebased(value: Any) -> Any:
        if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists() \
                or ":" in value.split("/")[0]:  # pkg:... and hub-like specs are not paths
            return value
        return next((str(base / value) for base in bases if (base / value).exists()), value)

    out = json.loads(json.dumps(config))  # a copy
    for section, key, _ in list(config_paths(out)):
        section[key] = rebased(section[key])
    return out
