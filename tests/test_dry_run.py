"""dry_run=true: every shipped config, both recipes, on the meta device in seconds."""

import pytest

from letrecipes import let_pretrain, pretrain
from letrecipes._config import available_configs
from letrecipes._dry_run import DryRunError, dry_run
from letrecipes._config import load_config


@pytest.mark.parametrize("config, billions, overhead", [("let_1b4", (1.3, 1.45), (0.02, 0.06)),
                                                        ("let_7b", (6.7, 7.6), (0.02, 0.08))])
def test_big_let_configs(config, billions, overhead, capsys):
    report = dry_run(load_config(config, ["dry_run_world_size=32"]), with_teacher=True)
    assert billions[0] < report["student_params"] / 1e9 < billions[1]
    assert overhead[0] < report["teacher_overhead"] < overhead[1]
    assert report["memory_per_gpu_gb"]["total"] < 80  # fits an 80 GB GPU at 32-way FSDP
    out = capsys.readouterr().out
    assert "teacher overhead while it runs" in out and "memory per GPU (world size 32" in out


def test_smollm2_teacher_shape_has_its_known_size():
    report = dry_run(load_config("let_1b4", []), with_teacher=True)
    assert report["teacher_params"] == pytest.approx(134.5e6, rel=0.01)


@pytest.mark.parametrize("config", available_configs())
def test_every_shipped_config_dry_runs_through_its_recipe(config, capsys, tokenizer_path):
    main = let_pretrain.recipe_main if config.startswith("let") else pretrain.recipe_main
    extra = [] if "1b4" in config or "7b" in config else [f"tokenizer.path={tokenizer_path}",
                                                         "teacher.shape={num_layers: 3, num_heads: 4, "
                                                         "num_kv_heads: 2, embed_dim: 128, intermediate_dim: 384, "
                                                         "vocab_size: 512}", "teacher.path=/nonexistent"]
    if not config.startswith("let"):
        extra = [e for e in extra if not e.startswith("teacher.")]
    main(["--config", config, "dry_run=true", *extra])
    assert "dry run (nothing allocated" in capsys.readouterr().out


def test_dry_run_catches_a_bad_layer_map_without_weights():
    cfg = load_config("let_7b", ["alignment.layer_map=M2E", "alignment.projector=identity"])
    with pytest.raises(ValueError, match="identity needs equal widths"):
        dry_run(cfg, with_teacher=True)


def test_dry_run_without_teacher_description():
    cfg = load_config("let_7b", ["~teacher.shape"])
    with pytest.raises(DryRunError, match="teacher.shape"):
        dry_run(cfg, with_teacher=True)
