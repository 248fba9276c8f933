"""Teacher formats are open: a format registered from a user's own module (no edit of the
package) is found by `auto`, describes itself for the dry run, names its tokenizer for
`tokenizer.source: teacher` and loads for a LET run."""

import sys
from pathlib import Path

import pytest

from letrecipes import let_pretrain
from letrecipes.components import registry
from letrecipes.components.metrics import read_metrics
from letrecipes.components.teachers import TeacherError, detect_format, formats

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.fixture
def npz_teacher(teacher_dir, tmp_path, monkeypatch):
    """docs/examples/npz_teacher.py, imported as a user's module would be, and the tests'
    tiny teacher saved in its format with the example's own helper."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert "npz" not in formats()  # nothing in the package knows it
    import npz_teacher as user_module

    loads = []
    original = user_module.NpzFormat.load
    monkeypatch.setattr(user_module.NpzFormat, "load", lambda self, *a: loads.append(a[0]) or original(self, *a))
    yield user_module.save_npz(teacher_dir, tmp_path / "teacher.npz"), loads
    sys.modules.pop("npz_teacher", None)
    registry._REGISTRY["teacher_loader"].pop("npz", None)


def test_a_format_from_a_user_module_runs_let_dry_run_and_tokenizer_source_teacher(
        npz_teacher, base_overrides, tmp_path, capsys):
    npz_teacher, loads = npz_teacher
    overrides = [o for o in base_overrides if not o.startswith("tokenizer.path=")]
    common = ["--config", "let_tiny", *overrides, "imports=[npz_teacher]", f"teacher.path={npz_teacher}",
              "teacher.dtype=fp32", "tokenizer.source=teacher"]

    # the dry run: the shape comes from the format's describe(), no weights read
    let_pretrain.recipe_main([*common, "dry_run=true", "teacher._component_=npz"])
    out = capsys.readouterr().out
    assert "teacher   " in out and "2 blocks x 24" in out
    assert loads == []

    # a LET run through `auto` detection, with the format's own tokenizer
    let_pretrain.recipe_main([*common, "teacher._component_=auto", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                              "alignment.schedule.stop=2"])
    assert loads == [npz_teacher]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(-1.0 <= r["align_loss"] <= 1.0 and r["lambda"] > 0 for r in records)
    final_tokenizer = (tmp_path / "run" / "final" / "tokenizer.json").read_bytes()
    assert final_tokenizer == npz_teacher.with_suffix(".tokenizer.json").read_bytes()


def test_auto_names_every_known_format_when_none_recognises_a_path(tmp_path):
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(TeacherError, match="no teacher format recognises") as err:
        detect_format(odd)
    for name in ("letrecipes", "huggingface", "gguf"):
        assert name in str(err.value)


def test_a_registered_teacher_loader_must_be_a_format(tmp_path, let_overrides):
    with pytest.raises(SystemExit, match="not a TeacherFormat"):
        let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={tmp_path}",
                                  "teacher._component_=pathlib.Path"])


def test_configs_that_name_the_old_top_level_package_get_the_new_name(base_overrides, tmp_path):
    from letrecipes import pretrain

    with pytest.raises(SystemExit) as err:
        pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}",
                              "model._component_=components.models.llama_model"])
    message = str(err.value.code)
    assert "'letrecipes.components.models.llama_model'" in message and "'llama'" in message
    assert not Path(tmp_path, "metrics.jsonl").exists()


def test_loading_a_large_teacher_says_how_far_it_is(teacher_dir, monkeypatch, capsys):
    """A GGUF teacher dequantizes tensor by tensor (minutes for an 8B one): every
    PROGRESS_EVERY_S seconds a line with the bytes loaded of the total and an ETA."""
    from letrecipes.components import progress
    from letrecipes.components.teachers import load_teacher

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # every tensor
    teacher = load_teacher({"path": str(teacher_dir), "dtype": "fp32"})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher: ")]
    assert len(lines) > 5 and all(" MB loaded, " in line and "ETA" in line for line in lines)
    done, total = (float(x) for x in lines[-1].split("teacher: ")[1].split(" MB")[0].split(" of "))
    assert done == total == round(sum(p.numel() * 4 for p in teacher.parameters()) / 1e6, 2) > 0


def test_damaged_teacher_and_checkpoint_files_are_one_error_each_with_its_fix(teacher_dir, tmp_path):
    """A teacher folder with unreadable weights, and a step checkpoint whose save never
    finished: each error says what to do (before, the second stated the problem only)."""
    import shutil

    import torch

    from letrecipes.components.checkpointing import CheckpointError, load_model_weights
    from letrecipes.components.models import llama_model
    from letrecipes.components.teachers import load_teacher

    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TeacherError, match=r"cannot read '.*model.safetensors' \(.*\)\. Fix: re-download or re-export"):
        load_teacher({"_component_": "auto", "path": str(copy), "dtype": "fp32"})
    half = tmp_path / "checkpoints" / "step_00000003"
    half.mkdir(parents=True)
    model = llama_model(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16, intermediate_dim=32,
                        max_seq_len=32)
    with pytest.raises(CheckpointError, match=r"is not a complete checkpoint \(its save never finished\)\. Fix: use an "
                                              r"earlier step in '.*checkpoints', or the run's final/ folder\."):
        load_model_weights(half, model, torch.device("cpu"))
