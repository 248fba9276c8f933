"""Every key of every section is checked before anything runs (component arguments, a
user's own components included), by the recipes and by `letrecipes validate` / `cat`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from letrecipes import cli, let_pretrain, pretrain

REPO = Path(__file__).resolve().parents[1]

# (override with a misspelt key, the key the error must suggest)
TYPOS = [
    ("max_step=3", "max_steps"),
    ("data.seq_le=16", "data.seq_len"),
    ("tokenizer.eos_tokn=x", "tokenizer.eos_token"),
    ("model.num_layer=2", "model.num_layers"),
    ("model.vocab_sz=100", "model.vocab_size"),  # an argument the recipe may also fill, still the user's to set
    ("model.max_seq=64", "model.max_seq_len"),
    ("optimizer.lrr=0.1", "optimizer.lr"),
    ("lr_scheduler.warmup_step=3", "lr_scheduler.warmup_steps"),
    ("fsdp.reshard_after_forwrd=false", "fsdp.reshard_after_forward"),
    ("float8.enabeld=false", "float8.enabled"),
    ("activation_checkpointing.mod=full", "activation_checkpointing.mode"),
    ("metrics.wandb.projct=x", "metrics.wandb.project"),
    ("divergence.polcy=skip", "divergence.policy"),
    ("export.dtyp=fp32", "export.dtype"),
    ("teacher.dtyp=fp32", "teacher.dtype"),
    ("alignment.projectr=mlp", "alignment.projector"),
    ("alignment.schedule.rho=2", "alignment.schedule.rho0"),
    ("alignment.projector={_component_: mlp, hiden_dim: 8}", "alignment.projector.hidden_dim"),
    ("alignment.loss={_component_: smooth_l1, bet: 1.0}", "alignment.loss.beta"),
    # the start of a long name, too unlike it for difflib alone
    ("fsdp.reshard=false", "fsdp.reshard_after_forward"),
]


@pytest.mark.parametrize("override, suggestion", TYPOS, ids=[t[0].split("=")[0] for t in TYPOS])
def test_a_misspelt_key_in_any_section_is_named_with_the_right_one(override, suggestion, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    message = str(err.value.code)
    assert message.startswith("error: config key ") and f"Did you mean {suggestion}?" in message, message


def test_the_recipe_refuses_it_before_anything_is_written(base_overrides, tmp_path):
    with pytest.raises(SystemExit) as err:
        let_pretrain.recipe_main(["--config", "let_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                                  "alignment.projectr=mlp"])
    assert "Did you mean alignment.projector?" in str(err.value.code)
    assert not (tmp_path / "run").exists()
    # the plain recipe ignores the teacher and alignment sections, so it does not check them
    with pytest.raises(SystemExit, match="Did you mean model.num_layers"):
        pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'b'}",
                              "model.num_layer=2"])


def test_a_users_registered_component_has_its_arguments_checked(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(
        "import torch\n"
        "from letrecipes.components.alignment import AlignmentLoss\n"
        "from letrecipes.components.registry import register\n\n"
        "@register('alignment_loss', 'margin_cosine_cfgtest')\n"
        "class MarginCosine(AlignmentLoss):\n"
        "    def __init__(self, margin: float = 0.1):\n"
        "        super().__init__()\n"
        "        self.margin = margin\n\n"
        "    def per_token(self, pred, target):\n"
        "        return torch.relu(self.margin - torch.cosine_similarity(pred, target, dim=-1))\n")
    # beside the config, in the working directory: found by `letrecipes validate` as by `tune run`
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    good = ["imports=[my_losses]", "alignment.loss={_component_: margin_cosine_cfgtest, margin: 0.2}"]
    assert cli.main(["validate", "let_tiny", *good]) == 0
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "imports=[my_losses]",
                  "alignment.loss={_component_: margin_cosine_cfgtest, margn: 0.2}"])
    assert "Did you mean alignment.loss.margin?" in str(err.value.code)
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "imports=[my_losses]",
                  "alignment.loss={_component_: margin_cosine_cfgtest, margin: wide}"])
    assert "alignment.loss.margin='wide' must be a number" in str(err.value.code)


def test_another_component_on_the_command_line_is_told_how_to_drop_the_keys_of_the_one_it_replaces():
    """torchtune merges overrides into the file's section: the constant schedule named on the
    command line kept the linear one's `stop`, and the fix said "correct or remove it" with no
    word of how a key the file sets is removed from the command line."""
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "alignment.schedule._component_=constant"])
    said = str(err.value.code)
    assert "alignment.schedule.stop is not an argument of 'constant'" in said
    assert said.endswith("Fix: correct or remove it (if the config file sets it: ~alignment.schedule.stop on the "
                         "command line removes it).")
    assert cli.main(["validate", "let_tiny", "alignment.schedule._component_=constant", "~alignment.schedule.stop"]) == 0


@pytest.mark.parametrize("override, said", [
    ("~alignment.schedule.rho0", "removes the key alignment.schedule.rho0, which --config '{cfg}' does not set "
     "(alignment.schedule holds _component_, stop). Fix: leave the override out: there is nothing to remove."),
    ("~alignment.schedule.stp", "does not set (alignment.schedule holds _component_, stop). Fix: "
     "~alignment.schedule.stop, if that is the key meant."),
    ("~max_step", "removes the key max_step, which --config '{cfg}' does not set. Fix: ~max_steps, if that is the key "
     "meant."),
    ("~alignment.schedule", "removes the component alignment.schedule, which torchtune's overrides cannot do. Fix: name "
     "another component (alignment.schedule._component_=<name>), or edit a copy of the config (letrecipes cp let_tiny "
     "my_run.yaml)."),
    ("~alignment.schedule._component_", "removes the component alignment.schedule"),
    ("~", "names no key to remove. Fix: ~ followed by a key the config sets"),
])
def test_a_removal_of_what_the_config_does_not_set_says_so(override, said):
    """torchtune refuses these itself, and the fix that came with its message was the one for a
    malformed override: "write each override as key=value (no spaces around the =)"."""
    from letrecipes._config import resolve_config_path

    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    message = str(err.value.code)
    assert message.startswith(f"error: the override {override!r} ") and "no spaces around" not in message, message
    assert said.format(cfg=resolve_config_path("let_tiny")) in message, message


@pytest.mark.parametrize("config", ["let_tiny", "let_1b4", "let_7b", "let_smollm2_cpu", "let_smollm2_xtok_cpu",
                                    "pretrain_7b", "baseline_tiny", "eval", "eval_let_paper"])
def test_every_shipped_config_validates(config, capsys):
    assert cli.main(["validate", config]) == 0
    assert "no problem found" in capsys.readouterr().out


def test_letrecipes_cat_prints_then_checks(capsys):
    result = subprocess.run([sys.executable, "-m", "letrecipes", "cat", "let_tiny", "alignment.projectr=mlp"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "projector: linear" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key alignment.projectr is unknown")


def test_validate_and_cat_take_the_config_as_tune_run_does(capsys):
    """`letrecipes validate --config my_run.yaml`, typed as `tune run` and `prepare-data` take
    it, said "Command-line overrides must be in the form of key=value, got --config"."""
    assert cli.main(["validate", "--config", "let_tiny", "max_steps=3"]) == 0
    assert "let_tiny: every key checked, no problem found" in capsys.readouterr().out
    assert cli.main(["cat", "--config", "let_tiny", "max_steps=3", "seed=5"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 3\n" in printed and "seed: 5\n" in printed
    for wrong in ([], ["let_tiny", "--config", "let_tiny"]):
        with pytest.raises(SystemExit):
            cli.main(["validate", *wrong])
        assert "give one config, as `letrecipes validate let_tiny` or `letrecipes validate --config my_run.yaml`" \
            in capsys.readouterr().err


def test_a_value_holding_an_equals_sign_is_taken_whole(capsys):
    """A run folder named for its settings (runs/lr=3e-4_bs=8) or a Hive-partitioned corpus
    (data/lang=en/) was refused: torchtune's merge splits an override at every '='."""
    from letrecipes._config import load_config

    cfg = load_config("let_tiny", ["output_dir=runs/lr=3e-4_bs=8", "data.source=data/lang=en/*.parquet",
                                   "max_steps=3", "tokenizer.path=old=1", "tokenizer.path=tok/v=2.json",
                                   "data.text_field=body", "eval_every=2", "seed=a=b", "seed=7"])
    assert cfg.output_dir == "runs/lr=3e-4_bs=8" and cfg.data.source == "data/lang=en/*.parquet"
    assert cfg.tokenizer.path == "tok/v=2.json" and cfg.max_steps == 3 and cfg.seed == 7  # the last override wins
    assert load_config("let_tiny", ["data.source=[a=1, b]"]).data.source == ["a=1", "b"]  # read as YAML, as any value
    assert cli.main(["validate", "--config", "let_tiny", "output_dir=runs/lr=3e-4"]) == 0
    assert "let_tiny: every key checked, no problem found" in capsys.readouterr().out


def test_the_eval_config_is_checked_too():
    with pytest.raises(SystemExit, match="config key limt is unknown. Did you mean limit"):
        cli.main(["validate", "eval", "limt=3"])


def test_tune_validate_accepts_every_shipped_config():
    from omegaconf import OmegaConf
    from torchtune.config._validate import validate  # what `tune validate <file>` runs

    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        validate(OmegaConf.load(path))  # raises torchtune's ConfigError on a component it cannot bind
    result = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "validate", str(configs[0])],
                            capture_output=True, text=True, timeout=300)  # and the command itself, once
    assert result.returncode == 0 and "Config is well-formed!" in result.stdout, result.stdout + result.stderr


def test_a_short_name_and_its_dotted_path_are_the_same_run_on_resume():
    from letrecipes.components.resume import differences

    saved = {"config": {"model": {"_component_": "llama"}, "teacher": {"_component_": "auto"}}}
    current = {"config": {"model": {"_component_": "letrecipes.components.models.llama_model"},
                          "teacher": {"_component_": "letrecipes.components.teachers.AutoFormat"}}}
    assert differences(saved, current) == []
    other = {"config": {"model": {"_component_": "llama"}, "teacher": {"_component_": "gguf"}}}
    assert [k for k, _, _ in differences(saved, other)] == ["teacher._component_"]


def test_a_torchtune_model_builder_is_answered_with_the_same_shape_as_llama_keys():
    """torchtune users name a builder (llama3_2_1b); the error hands back its shape as the keys
    a student is built from, and those keys validate."""
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "model._component_=torchtune.models.llama3_2.llama3_2_1b"])
    message = str(err.value.code)
    assert message.startswith("error: config key model._component_=") and "torchtune model builder" in message
    equivalent = message.split("Fix: model: ")[1].split(" (its shape")[0]
    assert ("num_layers: 16, num_heads: 32, num_kv_heads: 8, embed_dim: 2048, intermediate_dim: 8192, "
            "rope_base: 500000") in equivalent
    with pytest.raises(SystemExit, match=r"model._component_ is a mapping: an override `model=...` names the "
                                         r"component only .* Fix: give its keys one by one \(model._component_=llama "
                                         r"model.num_layers=16 model.num_heads=32 \.\.\.\)"):
        cli.main(["validate", "let_tiny", f"model={equivalent}"])  # torchtune's merge sets model._component_ to it
    with pytest.raises(SystemExit, match=r"Fix: give its keys one by one \(model._component_=llama "
                                         r"model.num_layers=2 \.\.\.\)"):  # no space after a colon: still split
        cli.main(["validate", "let_tiny", "model={_component_:llama, num_layers: 2}"])
    import yaml

    keys = yaml.safe_load(equivalent)  # Llama 3.2's scaled RoPE too, which a student can now take
    assert keys["rope_scaling"] == {"factor": 32, "low_freq_factor": 1, "high_freq_factor": 4,
                                    "original_max_position_embeddings": 8192}
    overrides = [f"model.{k}={v}" for k, v in keys.items() if k != "rope_scaling"]
    assert cli.main(["validate", "let_tiny", *overrides, "model.rope_scaling=" + equivalent.split("rope_scaling: ")[1][:-1]]) \
        in (0, None)
    # not Llama-shaped (Qwen2.5 has biases on q, k, v): the keys to write, without invented values
    with pytest.raises(SystemExit, match=r"torchtune model builder; .* Fix: model: \{_component_: llama, "
                                         r"num_layers: \.\.\."):
        cli.main(["validate", "let_tiny", "model._component_=torchtune.models.qwen2_5.qwen2_5_0_5b"])


SOURCE_ENTRIES = [  # (data.sources override, what the one line must say)
    ("[{source: a, weight: -1}]", "data.sources[0].weight=-1 must be a number >= 0"),
    ("[{source: a}, {source: b, wieght: 2}]", "data.sources[1].wieght is unknown. Did you mean data.sources[1].weight?"),
    ("[{source: a}, {source:b}]", "data.sources[1].source:b is unknown: YAML reads 'source:b' as one key, as the colon "
                                  "has no space after it. Fix: write 'source: b' (a space after the colon)."),
    ("[{weight: 1}]", "data.sources[0].source is missing"),
    ("[a, b]", "data.sources[0]='a' must be a mapping {source, weight, name, text_field}. Fix: write it as "
               "{source: 'a', weight: 1.0}"),
]


@pytest.mark.parametrize("sources, says", SOURCE_ENTRIES, ids=["negative", "typo", "no-space", "no-source", "bare-path"])
def test_a_mixture_entry_is_named_with_its_index_and_key(sources, says):
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "~data.source", f"data.sources={sources}"])
    assert says in str(err.value.code), err.value.code
    assert cli.main(["validate", "let_tiny", "~data.source", "data.sources=[{source: a, weight: 0}, {source: b}]"]) \
        in (0, None)


# (override as another trainer, or another place of this config, spells it; the line the error must hold)
MEANT = [
    ("checkpoint_every=5", "Did you mean save_every? (checkpoint_every is what other trainers call it.) Fix: replace "
                           "it with save_every=5."),  # by spelling alone: async_checkpoint
    ("save_steps=100", "Did you mean save_every?"),
    ("lr=0.001", "Did you mean optimizer.lr? (lr is what other trainers call it.) Fix: replace it with "
                 "optimizer.lr=0.001."),
    ("block_size=64", "Did you mean data.seq_len?"),
    ("max_iters=10", "Did you mean max_steps?"),
    ("epochs=3", "Fix: replace it with max_steps=<steps>: a run counts steps, not epochs"),
    ("gradient_checkpointing=true", "Fix: replace it with activation_checkpointing.mode=full."),
    ("fp16=true", "Fix: replace it with dtype=bf16 (float16 would need loss scaling"),
    ("data.path=/x", "Did you mean data.source? (data.path is what other trainers call it.) Fix: replace it with "
                     "data.source=/x."),
    ("teacher.model=/t", "Did you mean teacher.path?"),
    ("data.batch_size=4", "Did you mean batch_size? (batch_size is a top-level key.) Fix: replace it with batch_size=4."),
    ("optimizer.clip_grad_norm=1.0", "Did you mean clip_grad_norm? (clip_grad_norm is a top-level key.)"),
    ("num_layers=4", "Did you mean model.num_layers? (num_layers belongs in model.) Fix: replace it with "
                     "model.num_layers=4."),  # an argument of the config's own model component
    ("replicate_degree=2", "Did you mean fsdp.replicate_degree? (replicate_degree belongs in fsdp.)"),
    ("enabled=true", "Did you mean fsdp.enabled or export.enabled or float8.enabled or profiler.enabled? Fix: replace "
                     "it with the one you mean, like fsdp.enabled=true."),
    ("model.hidden_size=64", "Did you mean model.embed_dim? (hidden_size is what other libraries call it.) Fix: "
                             "replace it with model.embed_dim=64."),
    ("model.num_attention_heads=4", "Did you mean model.num_heads?"),
    ("model.rope_theta=500000.0", "Did you mean model.rope_base?"),
    ("lr_scheduler.num_warmup_steps=10", "Did you mean lr_scheduler.warmup_steps?"),
    ("optimizer.learning_rate=0.001", "Did you mean optimizer.lr?"),
    ("alignment.projector={_component_: mlp, hidden_size: 8}", "Did you mean alignment.projector.hidden_dim?"),
]


@pytest.mark.parametrize("override, says", MEANT, ids=[m[0].split("=")[0] for m in MEANT])
def test_a_key_named_as_elsewhere_is_answered_with_the_key_it_means(override, says):
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    assert says in str(err.value.code), err.value.code


def test_every_other_name_points_at_a_key_that_exists_and_is_not_one_itself():
    """The tables cannot rot: each name they answer is unknown here, each key they offer is real."""
    import inspect

    from letrecipes import _schema
    from letrecipes.components import registry

    components = _schema._component_arguments(cli_values("let_tiny"))
    for name, ours in _schema.OTHER_NAMES.items():
        where, _, alone = name.rpartition(".")
        assert alone not in (_schema.SECTIONS.get(where, {}) if where else _schema.TOP), name
        section, _, key = ours.rpartition(".")
        known = (_schema.TOP if not section else _schema.SECTIONS.get(section) or components.get(section)
                 or ("path", "dtype"))
        assert key in known, (name, ours)
    for name, ours in _schema.EVAL_OTHER_NAMES.items():
        assert name not in _schema.EVAL and ours in _schema.EVAL, (name, ours)
    taken = set().union(*components.values(), inspect.signature(registry.resolve("projector", "mlp")).parameters)
    for name, offered in registry.ARGUMENT_NAMES.items():
        assert name not in ("embed_dim", "num_layers") and any(n in taken for n in offered), (name, offered)


def test_every_key_of_torchtunes_training_configs_is_taken_or_answered_with_what_it_is_here():
    """A torchtune user brings its configs (full fine-tune, knowledge distillation, LoRA, as
    the installed torchtune ships them): each top-level key is one of ours, or its error says
    what it is there and what to write here; never the list of every key nor a guess by
    spelling (teacher_checkpointer was "Did you mean async_checkpoint?", kd_ratio and
    optimizer_in_bwd the list of all keys)."""
    import importlib.metadata
    import re

    import yaml

    from letrecipes import _schema

    files = [f for f in importlib.metadata.files("torchtune") or []
             if re.fullmatch(r"recipes/configs/.*(full|KD|lora).*\.yaml", str(f)) and not re.search(r"dpo|ppo", str(f))]
    assert len(files) > 50, files
    keys = {}
    for file in files:
        for key, value in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).items():
            keys.setdefault(key, (value, str(file)))
    assert {"teacher_model", "teacher_checkpointer", "kd_loss", "kd_ratio", "optimizer_in_bwd", "loss"} <= set(keys)
    for key, (value, file) in keys.items():
        if key in _schema.TOP:
            continue
        said = str(_schema._other_name(key, value) or "")
        assert said.startswith(f"config key {key} ") and "Known keys" not in said and "Fix: correct or remove it" \
            not in said and "Fix: " in said, (key, file, said)
    said = str(_schema._other_name("teacher_checkpointer", {"checkpoint_dir": "/models/Qwen2-1.5B"}))
    assert said.endswith("Fix: replace it with teacher.path=/models/Qwen2-1.5B."), said


def cli_values(config: str) -> dict:
    from letrecipes._config import load_config
    from letrecipes._schema import resolved

    return resolved(load_config(config))


def test_the_eval_recipes_keys_as_lm_eval_spells_them():
    with pytest.raises(SystemExit, match=r"config key output_path is unknown. Did you mean output\? \(output_path is "
                                         r"what lm-eval or other tools call it.\) Fix: replace it with output=x.json."):
        cli.main(["validate", "eval", "output_path=x.json"])
    with pytest.raises(SystemExit, match="config key pretrained is unknown. Did you mean checkpoint"):
        cli.main(["validate", "eval", "pretrained=/m"])


def test_a_value_the_recipe_sets_itself_is_refused_not_ignored():
    """The recipe passes the LR schedule's total_steps (from max_steps), the projector's widths,
    the model's vocabulary: the same key in the config was silently overruled."""
    from letrecipes.components import registry

    with pytest.raises(SystemExit, match=r"config key lr_scheduler.total_steps=5 is set by the recipe \(total_steps="
                                         r"\d+, from max_steps\), so the config's value would be ignored. Fix: remove "
                                         r"lr_scheduler.total_steps and set max_steps"):
        cli.main(["validate", "let_tiny", "lr_scheduler.total_steps=5"])
    assert cli.main(["validate", "let_tiny", "max_steps=300", "lr_scheduler.total_steps=300"]) in (0, None)  # the same
    with pytest.raises(registry.ComponentError, match=r"alignment.projector.student_dim=7 is set by the recipe "
                                                      r"\(student_dim=16, the student's width\)"):
        registry.build("projector", {"_component_": "linear", "student_dim": 7}, "alignment.projector",
                       student_dim=16, teacher_dim=8)


# (a value other trainers accept, what the error must say instead of only "must be ...")
VALUES_MEANT = [
    ("device=cuda:1", "Fix: device=cuda, with CUDA_VISIBLE_DEVICES=1 before the command."),
    ("device=gpu", "Did you mean cuda? Fix: device=cuda."),
    ("device=mps", "mps is not a device these recipes run on"),
    ("dtype=fp16", "fp16 training needs loss scaling, which the recipes do not do"),
    ("dtype=float8", "Fix: dtype=bf16 float8.enabled=true."),
    # numpy's legacy seeding takes 32 bits: a larger seed (a 64-bit one from a launcher script) was a
    # ValueError traceback from setup
    ("seed=4294967296", "must be an integer >= 0 and <= 4,294,967,295"),
    # a value in another case: said with the one meant
    ("device=CPU", "values are lowercase, without spaces. Fix: device=cpu."),
    ("dtype=BF16", "Fix: dtype=bf16."),
    ("activation_checkpointing.mode=Full", "Fix: activation_checkpointing.mode=full."),
    ("keep_last_checkpoints=ALL", "Fix: keep_last_checkpoints=all."),
    # a number or boolean as text (quoted in YAML, or from ${oc.env:...}): "must be an integer" beside '100'
    ("max_steps='100'", "it is text: YAML keeps a value in quotes as text, and ${oc.env:NAME} always gives text. "
                        "Fix: write it without quotes, max_steps=100; from an environment variable, "
                        "max_steps='${oc.decode:${oc.env:NAME}}'."),
    ("fsdp.enabled=${oc.env:LETRECIPES_TEST_UNSET,true}", "Fix: write it without quotes, fsdp.enabled=true;"),
    ("optimizer.lr='1e-3'", "for 'torch.optim.AdamW': it is text"),
    ("alignment.schedule.rho0=' 0.5'", "Fix: write it without quotes, alignment.schedule.rho0=0.5;"),
]


@pytest.mark.parametrize("override, said", VALUES_MEANT, ids=[v[0] for v in VALUES_MEANT])
def test_a_value_other_trainers_take_is_answered_with_ours(override, said):
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    message = str(err.value.code)
    assert message.startswith(f"error: config key {override.split('=')[0]}=") and said in message, message


@pytest.mark.parametrize("override, said", [
    ("alignment.schedule.stop=-1", "alignment.schedule.stop=-1: must be >= 1 step"),
    ("alignment.schedule.stop=1.5", "alignment.schedule.stop=1.5: a fraction must lie in (0, 1]"),
    ("alignment.schedule.rho0=-1", "alignment.schedule.rho0=-1 must be a finite number > 0"),
    ("teacher.path=null", "config key teacher.path is empty: the LET recipe trains against a teacher model"),
])
def test_validate_says_what_the_recipe_would_refuse_of_the_alignment(override, said):
    """`letrecipes validate` answered "every key checked, no problem found" for a schedule the
    recipe then refused (it builds the schedule as the recipe does)."""
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    assert said in str(err.value.code), err.value.code


@pytest.mark.parametrize("override, said", [
    ("model.num_heads=3", "model.embed_dim (320) must be divisible by model.num_heads (3)"),
    ("model.num_kv_heads=3", "model.num_heads (5) must be a multiple of model.num_kv_heads (3)"),
    ("model.init_std=0", "model.init_std=0 must be a finite number > 0"),
    ("model.max_seq_len=16", "model.max_seq_len=16 is shorter than data.seq_len=256"),
    ("model.rope_scaling={factor: 2}", "model.rope_scaling has the keys ['factor']; Llama 3.1's scaled RoPE takes "
                                       "exactly"),
])
def test_validate_says_what_the_recipe_would_refuse_of_the_students_shape(override, said):
    """The student's shape, checked as its builder checks it but not built: `letrecipes
    validate` said "no problem found" for a width its head count does not divide."""
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    assert str(err.value.code).startswith("error: ") and said in str(err.value.code), err.value.code
    assert cli.main(["validate", "let_tiny", "model.num_heads=4", "model.num_kv_heads=2"]) == 0  # 320 / 4: fine


def test_validate_builds_a_users_student_on_the_meta_device(tmp_path, monkeypatch):
    """A builder of the user's own is called as the run calls it (on the meta device): one
    that returns no decoder of ours is named before any run; one that fails in its own way
    is left to the run."""
    (tmp_path / "meta_students.py").write_text(
        "import torch\n"
        "def sequential(vocab_size, max_seq_len, width: int = 8):\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, width))\n"
        "def picky(vocab_size, max_seq_len):\n"
        "    raise RuntimeError('needs a GPU')\n")
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "baseline_tiny.yaml")
    for builder in ("sequential", "picky"):
        config.model = {"_component_": f"meta_students.{builder}"}
        config.imports = ["meta_students"]
        OmegaConf.save(config, tmp_path / f"{builder}.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # imports adds the working directory: undone afterwards
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "sequential.yaml"])
    assert "model._component_=meta_students.sequential built a Sequential; a student is the decoder" in str(err.value.code)
    assert cli.main(["validate", "picky.yaml"]) == 0


def test_damaged_configs_load_or_end_in_one_error(tmp_path):
    """The shipped configs with characters flipped, cut, inserted, deleted, repeated or
    re-indented, as a hand edit or a bad merge leaves them: each loads and validates, or
    stops with one ConfigError or LetRecipesError (the recipes print that as one line),
    never another exception. (A damaged `_component_` path, `.components.lr_schedules...`,
    once ended in importlib's TypeError.)"""
    import random

    from letrecipes._config import ConfigError, load_config
    from letrecipes._schema import validate
    from letrecipes.components.errors import LetRecipesError

    rng = random.Random(20261206)
    sources = {name: (REPO / "recipes" / "configs" / f"{name}.yaml").read_bytes()
               for name in ("let_tiny", "let_7b", "pretrain_tiny")}
    outcomes = {"loaded": 0, "error": 0}
    for n in range(300):
        name = rng.choice(sorted(sources))
        data = bytearray(sources[name])
        how = rng.choice(["flip", "cut", "insert", "delete", "repeat", "indent"])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if how == "flip":
                data[at] = rng.choice(b":-[]{}#'\"\t\n 0123456789abc!&*|>%@`,?.\x00\xff")
            elif how == "cut":
                data = data[:max(1, at)]
            elif how == "insert":
                data[at:at] = bytes(rng.choice(b":-[]{}#'\" \n\t.") for _ in range(rng.randint(1, 4)))
            elif how == "delete":
                del data[at:at + rng.randint(1, 10)]
            elif how == "indent":
                lines = bytes(data).split(b"\n")
                i = rng.randrange(len(lines))
                lines[i] = b" " * rng.randint(0, 6) + lines[i].lstrip()
                data = bytearray(b"\n".join(lines))
            else:
                data[at:at] = data[max(0, at - 30):at]
        path = tmp_path / f"damaged{n}.yaml"
        path.write_bytes(bytes(data))
        try:
            validate(load_config(str(path), []), with_teacher=name.startswith("let"))
            outcomes["loaded"] += 1
        except (ConfigError, LetRecipesError):
            outcomes["error"] += 1
    assert outcomes["loaded"] > 20 and outcomes["error"] > 100, outcomes


def test_an_integer_for_a_number_is_taken_as_the_number_it_writes():
    """YAML reads `eps: 99999999999999999999` as an integer past 64 bits, which reached torch's
    Adam kernel as one: an OverflowError traceback in the first step (found by the config
    fuzzer). Such an integer given where a number is taken is now the float it writes."""
    import torch

    from letrecipes.components.errors import LetRecipesError
    from letrecipes.components.registry import build

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = build("optimizer", {"_component_": "adamw", "eps": 10**20}, "optimizer", [weight])
    assert optimizer.defaults["eps"] == 1e20 and isinstance(optimizer.defaults["eps"], float)
    weight.sum().backward()
    optimizer.step()  # was: OverflowError: int too big to convert
    assert torch.isfinite(weight).all()
    with pytest.raises(LetRecipesError, match=r"^config key optimizer.eps=1000+ is past the largest number"):
        build("optimizer", {"_component_": "adamw", "eps": 10**400}, "optimizer", [weight])
    # an argument that takes an int as such keeps it: a schedule's stop in steps (a float is a fraction)
    schedule = build("schedule", {"_component_": "linear", "stop": 10**20}, "alignment.schedule", total_steps=1000)
    assert schedule.end_step == 10**20  # as a float, 1e20 was refused as a fraction outside (0, 1]


# (override: a key of another section or component, the line its error must hold)
ELSEWHERE = [
    ("teacher.layer_map=L2E", "Did you mean alignment.layer_map? (layer_map belongs in alignment.) Fix: replace it "
     "with alignment.layer_map=L2E."),
    ("optimizer.warmup_steps=5", "Did you mean lr_scheduler.warmup_steps?"),
    ("lr_scheduler.lr=0.01", "Did you mean optimizer.lr?"),
    ("model.replicate_degree=2", "Did you mean fsdp.replicate_degree?"),
    ("alignment.stop=0.3", "Did you mean alignment.schedule.stop?"),
    ("teacher.stop=3", "Did you mean alignment.schedule.stop?"),
    # another component of its own kind takes it: that one, not model.num_layers
    ("alignment.projector.num_layers=3", "not an argument of 'linear' (it takes: student_dim, teacher_dim, bias). mlp "
     "takes it: alignment.projector._component_=mlp alignment.projector.num_layers=3."),
    ("alignment.schedule.lambda0=0.5", "linear, cosine and step take it: alignment.schedule._component_=linear "
     "alignment.schedule.lambda0=0.5."),
    # a module class without an __init__ of its own took any key (torch's Module.__init__(*args, **kwargs)), and
    # the run failed only as it built the loss
    ("alignment.loss.margin=1", "alignment.loss.margin is not an argument of 'negative_cosine' (it takes no options)."),
]


@pytest.mark.parametrize("override, said", ELSEWHERE, ids=[e[0].split("=")[0] for e in ELSEWHERE])
def test_a_key_of_another_section_or_component_is_named_where_it_belongs(override, said):
    """Each of these said only "unknown" with the section's own keys (or, for a component, its
    closest argument: alignment.projector.hidden_dim -> student_dim)."""
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", override])
    assert said in str(err.value.code), err.value.code
    assert "Did you mean model.num_layers" not in str(err.value.code)


def test_a_name_shared_by_many_sections_is_not_pointed_at_one_of_them():
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "optimizer.enabled=true"])
    assert "optimizer.enabled is not an argument of 'torch.optim.AdamW'" in str(err.value.code)
    assert "fsdp.enabled" not in str(err.value.code)


def test_options_given_to_a_component_the_config_names_by_its_short_name_keep_that_name():
    """let_tiny says `projector: linear`: `alignment.projector=mlp alignment.projector.hidden_dim=64`
    (the way docs/configs.md gives options) became {hidden_dim: 64}, torchtune's merge having
    replaced the name, and was refused as "must be a component name or a mapping with
    _component_"; so was any option added to linear itself, and `metric_logger=disk
    metric_logger.log_dir=...`."""
    from letrecipes._config import load_config

    cfg = load_config("let_tiny", ["alignment.projector=mlp", "alignment.projector.hidden_dim=64"])
    assert dict(cfg.alignment.projector) == {"_component_": "mlp", "hidden_dim": 64}
    assert dict(load_config("let_tiny", ["alignment.projector.bias=true"]).alignment.projector) == {
        "_component_": "linear", "bias": True}
    assert dict(load_config("let_tiny", ["metric_logger=disk", "metric_logger.log_dir=/tmp/logs"]).metric_logger) == {
        "_component_": "disk", "log_dir": "/tmp/logs"}
    # a mapping named anew, or a removal, has no short name to keep
    assert dict(load_config("let_tiny", ["~alignment.projector", "alignment.projector.hidden_dim=3"])
                .alignment.projector) == {"hidden_dim": 3}
    assert dict(load_config("let_tiny", ["alignment.projector={_component_: mlp}", "alignment.projector.hidden_dim=3"])
                .alignment.projector) == {"_component_": "mlp", "hidden_dim": 3}
    for overrides in (["alignment.projector=mlp", "alignment.projector.hidden_dim=64"],
                      ["alignment.loss=smooth_l1", "alignment.loss.beta=0.5"]):
        assert cli.main(["validate", "let_tiny", *overrides]) == 0


def test_an_override_into_a_list_is_told_to_set_the_list_whole():
    """omegaconf's "Cannot merge incompatible container types" named neither the list nor the fix."""
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "optimizer.betas.0=0.8"])
    assert str(err.value.code) == ("error: the override 'optimizer.betas.0=0.8' reaches into optimizer.betas, a list, "
                                   "which an override sets whole. Fix: 'optimizer.betas=[0.8, 0.95]'.")
    assert cli.main(["validate", "let_tiny", "optimizer.betas=[0.8, 0.95]"]) == 0
    # into a value (a layer map's preset, a path, a number): omegaconf made it a section, `{'0': 3}`
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "alignment.layer_map.0=3"])
    assert str(err.value.code).startswith(
        "error: the override 'alignment.layer_map.0=3' reaches into alignment.layer_map, which the config sets "
        "to 'L2E': a value, not a section. Fix: set alignment.layer_map whole (a preset such as L2E, or pairs: "
        "'alignment.layer_map=[[2, 3]]'"), err.value.code
    with pytest.raises(SystemExit, match=r"reaches into data.source, which the config sets to "
                                         r"'outputs/demo/corpus': a value, not a section. Fix: set data.source whole."):
        cli.main(["validate", "let_tiny", "data.source.path=/data/x"])
    # a section given anew by an earlier override takes keys; a component's short name takes options
    assert cli.main(["validate", "let_tiny", "alignment.layer_map={_component_: pairs, pairs: [[2, -1]]}",
                     "alignment.layer_map.pairs=[[3, -1]]"]) == 0
    assert cli.main(["validate", "let_tiny", "alignment.projector=mlp", "alignment.projector.hidden_dim=64"]) == 0
