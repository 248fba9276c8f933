"""``profiler``: torch.profiler over the run's own steps, in both recipes, across a resume."""

import gzip
import json
import shutil

import pytest
import torch

from letrecipes import let_pretrain, pretrain
from letrecipes.components.metrics import read_metrics
from letrecipes.components.profiling import build_profiler

PROFILE = ["profiler.enabled=true"]


def traced_steps(trace_file) -> int:
    """How many training steps a Chrome trace holds (torch.profiler marks each ProfilerStep#k)."""
    events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    return len({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})


def losses(folder):
    return [(r["step"], r["loss"]) for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]


def test_the_named_steps_are_traced_and_training_is_unchanged(base_overrides, tmp_path, capsys):
    plain, traced = tmp_path / "plain", tmp_path / "traced"
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={plain}", "max_steps=6"])
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={traced}", "max_steps=6",
                          *PROFILE, "profiler.first_step=3", "profiler.steps=2"])
    folder = traced / "profile" / "steps_3-4"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0.ops.txt", "rank0.trace.json.gz"]
    assert traced_steps(folder / "rank0.trace.json.gz") == 2
    assert "aten::mm" in (folder / "rank0.ops.txt").read_text(encoding="utf-8")
    out = capsys.readouterr().out
    assert "profiler: tracing steps 3-4 on rank 0" in out and "profiler: steps 3-4 traced on rank 0" in out
    assert "most CPU self time: " in out
    assert [s for s, _ in losses(traced)] == [s for s, _ in losses(plain)] == list(range(1, 7))
    assert [v for _, v in losses(traced)] == pytest.approx([v for _, v in losses(plain)], rel=1e-6)


def test_the_teacher_is_named_in_a_let_runs_trace(let_overrides, tmp_path):
    let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={tmp_path}", "max_steps=3",
                              *PROFILE, "profiler.first_step=2", "profiler.steps=1"])
    ops = (tmp_path / "profile" / "step_2" / "rank0.ops.txt").read_text(encoding="utf-8")
    assert any(line.split()[:1] == ["teacher"] for line in ops.splitlines()), ops


def test_a_resumed_run_traces_the_same_steps_and_says_when_they_are_past(base_overrides, tmp_path, capsys):
    run = ["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "save_every=4"]
    pretrain.recipe_main([*run, "max_steps=4"])
    assert not (tmp_path / "profile").exists()
    shutil.rmtree(tmp_path / "final")
    # the window 3-6 is half past: this launch traces 5 and 6, and names them so
    pretrain.recipe_main([*run, "max_steps=8", "resume=true", *PROFILE, "profiler.first_step=3", "profiler.steps=4"])
    trace = tmp_path / "profile" / "steps_5-6" / "rank0.trace.json.gz"
    assert traced_steps(trace) == 2
    shutil.rmtree(tmp_path / "final")
    capsys.readouterr()
    pretrain.recipe_main([*run, "max_steps=10", "resume=true", *PROFILE, "profiler.first_step=2", "profiler.steps=2"])
    assert "profiler: steps 2-3 were trained before this launch (it starts at step 9): nothing is traced" \
        in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["steps_5-6"]
    # a fresh start over the folder leaves no trace of the replaced run
    pretrain.recipe_main([*run, "max_steps=2", "overwrite=true"])
    assert not (tmp_path / "profile").exists()


def test_a_window_past_the_last_step_is_cut_to_it(base_overrides, tmp_path):
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=3",
                          *PROFILE, "profiler.first_step=2", "profiler.steps=5"])
    assert traced_steps(tmp_path / "profile" / "steps_2-3" / "rank0.trace.json.gz") == 2


@pytest.mark.parametrize("override, says", [
    ("profiler.wait_steps=5", "profiler.wait_steps is torchtune's (setup_torch_profiler)"),
    ("profiler._component_=torchtune.training.setup_torch_profiler", "profiler._component_ is torchtune's"),
    ("profiler.first_step=50", "profiler.first_step=50 is past max_steps=4"),
    ("profiler.ranks=[-1]", "profiler.ranks=[-1] must be a list of ranks or all"),
    ("profiler.step=3", "Did you mean profiler.steps?"),
])
def test_a_profiler_setting_that_cannot_work_is_one_line_before_the_run(base_overrides, tmp_path, override, says):
    with pytest.raises(SystemExit) as err:
        pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=4",
                              *PROFILE, override])
    assert str(err.value.code).startswith("error: ") and says in str(err.value.code), err.value.code
    assert not (tmp_path / "metrics.jsonl").exists()


def test_only_the_listed_ranks_trace(tmp_path):
    cpu = torch.device("cpu")
    spec = {"enabled": True, "first_step": 2, "steps": 1}
    assert build_profiler(spec, tmp_path, 0, 10, cpu, rank=1, log=lambda _: None) is None  # rank 0 by default
    assert build_profiler({**spec, "ranks": [1, 3]}, tmp_path, 0, 10, cpu, rank=1, log=lambda _: None) is not None
    assert build_profiler({**spec, "ranks": "all"}, tmp_path, 0, 10, cpu, rank=7, log=lambda _: None) is not None
    assert build_profiler({**spec, "enabled": False}, tmp_path, 0, 10, cpu, rank=0, log=lambda _: None) is None
