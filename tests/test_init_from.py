"""``init_from``: a new run that starts from an export's weights (components/init_from.py)."""

from __future__ import annotations

import pytest
import torch

from letrecipes import pretrain
from letrecipes._config import load_config
from letrecipes.components.metrics import read_metrics
from letrecipes.components.teachers import load_teacher


@pytest.fixture(scope="module")
def export(base_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={out}", "max_steps=8",
                          "export.dtype=fp32"])
    return out / "final"


def built(base_overrides, tmp_path, *extra):
    recipe = pretrain.PretrainRecipe(load_config("baseline_tiny", [*base_overrides, f"output_dir={tmp_path}", *extra]))
    recipe.setup()
    return recipe


def test_a_run_started_from_an_export_has_its_weights_at_step_0(base_overrides, export, tmp_path, capsys):
    recipe = built(base_overrides, tmp_path / "init", f"init_from={export}")
    try:
        ours = recipe.model.state_dict()
        theirs = load_teacher({"path": str(export), "dtype": "fp32"}).model.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert recipe.step == 0
    finally:
        recipe.cleanup()
    assert "init_from: the student starts from the weights of" in capsys.readouterr().out
    fresh = built(base_overrides, tmp_path / "fresh")
    try:
        assert not torch.equal(fresh.model.state_dict()["tok_embeddings.weight"], ours["tok_embeddings.weight"])
    finally:
        fresh.cleanup()


def test_it_trains_on_with_a_fresh_schedule(base_overrides, export, tmp_path):
    pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'cont'}",
                          "max_steps=2", f"init_from={export}"])
    pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'fresh'}",
                          "max_steps=2"])
    cont, fresh = ([r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("cont", "fresh"))
    assert [r["step"] for r in cont] == [1, 2] and cont[0]["lr"] == fresh[0]["lr"]  # warmup from the start
    assert cont[0]["loss"] < fresh[0]["loss"] - 0.1  # it starts where the export left off, not from scratch


def test_a_requeued_command_resumes_and_says_init_from_is_not_used(base_overrides, export, tmp_path, capsys):
    """A scheduler's requeue repeats the first command, init_from and all: the resume goes on
    from the run's own checkpoint, and says that the export's weights were not loaded."""
    command = ["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}", "max_steps=4",
               "save_every=2", f"init_from={export}"]
    pretrain.recipe_main(command)
    capsys.readouterr()
    pretrain.recipe_main([*command, "max_steps=6", "resume=true"])
    out = capsys.readouterr().out
    assert "resumed from" in out and f"init_from={export} not used: a resumed run goes on from its" in out
    assert "init_from: the student starts from" not in out


def test_a_checkpoint_of_another_shape_is_one_error_before_training(base_overrides, export, tmp_path):
    """Read from its metadata before the corpus is prepared (it used to be found after)."""
    with pytest.raises(SystemExit) as err:
        pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                              f"init_from={export}", "model.num_layers=2", "model.embed_dim=48",
                              f"data.cache_dir={tmp_path / 'cache'}"])
    message = str(err.value.code)
    assert message.startswith("error: init_from=") and "model.num_layers: 4 in the checkpoint, 2 here" in message
    assert "model.embed_dim: 32 in the checkpoint, 48 here" in message and "Fix:" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "cache").exists()


def test_a_missing_path_names_the_key(base_overrides, tmp_path):
    with pytest.raises(SystemExit, match=r"init_from: nothing at .* Fix: point it at a Hugging Face model folder") as err:
        pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                              f"init_from={tmp_path / 'nothing'}"])
    assert "teacher" not in str(err.value.code)  # the weights to start from are not a teacher to train


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(base_overrides, export, corpus_dir, tmp_path):
    from letrecipes.components.tokenizer import train_bpe

    other = train_bpe([next(corpus_dir.glob("*.txt")).read_text()[:200_000]], 512, tmp_path / "other.json")
    with pytest.raises(SystemExit) as err:
        pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                              f"init_from={export}", f"tokenizer.path={other}"])
    assert "was trained with another tokenizer" in str(err.value.code) and "Fix: tokenizer.path=" in str(err.value.code)


def test_a_checkpoint_of_another_architecture_is_named_as_such(base_overrides, tmp_path):
    """A Pythia (GPT-NeoX) folder into the Llama-family student: one line that says the
    architectures differ (no model.* key can bridge them) and that it can be the teacher."""
    import json

    pythia = tmp_path / "pythia"
    pythia.mkdir()
    (pythia / "config.json").write_text(json.dumps({
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 512, "hidden_size": 32,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "rotary_pct": 0.25,
        "max_position_embeddings": 128, "hidden_act": "gelu"}))
    (pythia / "model.safetensors").write_bytes(b"")  # never read: the architecture is refused from config.json
    with pytest.raises(SystemExit) as err:
        pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                              f"init_from={pythia}"])
    message = str(err.value.code)
    assert message.startswith(f"error: init_from={str(pythia)!r} is a gpt_neox model; this run's student is a llama "
                              "model, another architecture") and "teacher.path" in message
    assert "model.family" not in message and not (tmp_path / "run" / "metrics.jsonl").exists()
