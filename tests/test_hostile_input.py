"""Issue 6, hostile input: one test per row of docs/reliability.md's table. Each bad input
gets one clear error (or a documented, logged recovery) before training, with no
traceback as the only message and nothing previously written changed."""

import hashlib
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from letrecipes.components.corpus import DataWarning
from letrecipes.components.metrics import read_metrics
from letrecipes import pretrain
from tests.test_recipes import expect_setup_error, run_let, run_pretrain


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def finished_run(base_overrides, tmp_path):
    """A finished run whose files must survive every bad relaunch below."""
    out = tmp_path / "run"
    run_pretrain(*base_overrides, f"output_dir={out}", "max_steps=2", "save_every=1")
    return out


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 10\nmodel: [unclosed\n")
    expect_setup_error(lambda *args: pretrain.recipe_main(list(args)), "--config", str(bad), match="is not valid YAML")


@pytest.mark.parametrize("override, match", [
    ("max_step=5", "config key max_step is unknown. Did you mean max_steps?"),
    ("data.seq_length=64", "config key data.seq_length is unknown. Did you mean data.seq_len?"),
    ("batch_size=sixteen", "config key batch_size='sixteen' must be an integer >= 1"),
    ("max_steps=0", "config key max_steps=0 must be an integer >= 1"),
    ("data.val_fraction=1.5", "config key data.val_fraction=1.5 must be a number > 0 and < 0.5"),
    ("divergence.policy=ignore", "config key divergence.policy='ignore' must be one of stop, skip"),
    ("model.num_layer=2", "config key model.num_layer is not an argument of 'letrecipes.components.models.llama_model' (it takes: "),
    ("optimizer.lrr=0.1", "config key optimizer.lrr is not an argument of 'torch.optim.AdamW'"),
    ("model.norm_eps=abc", "config key model.norm_eps='abc' must be a number for 'letrecipes.components.models.llama_model'"),
    ("optimizer.betas=[0.9]", "config key optimizer.betas=[0.9] must be a list of 2 numbers, like [0.9, 0.999]"),
    ("optimizer.lr=abc", "config key optimizer.lr='abc' must be a number"),
    ("model.tie_word_embeddings=3", "config key model.tie_word_embeddings=3 must be true or false"),
], ids=["unknown-key", "unknown-nested-key", "wrong-type", "out-of-range", "out-of-range-fraction",
        "bad-choice", "unknown-model-argument", "unknown-optimizer-argument", "model-argument-type",
        "optimizer-tuple-length", "optimizer-number", "model-flag"])
def test_bad_config_values_damage_nothing(base_overrides, finished_run, override, match):
    before = digest(finished_run)
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={finished_run}", "resume=true", "max_steps=4",
                       override, match=match)
    assert digest(finished_run) == before


def test_truncated_safetensors_teacher(let_overrides, teacher_dir, tmp_path):
    broken = tmp_path / "teacher"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((teacher_dir / name).read_bytes())
    data = (teacher_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"teacher.path={broken}",
                       match="cannot read")


def test_teacher_that_produces_nans(let_overrides, teacher_dir, tmp_path):
    broken = tmp_path / "teacher"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((teacher_dir / name).read_bytes())
    weights = load_file(str(teacher_dir / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"))
    message = expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}",
                                 f"teacher.path={broken}", "max_steps=3",
                                 match="produced non-finite hidden states at step 1")
    assert "teacher.dtype=fp32" in message


@pytest.mark.parametrize("content", ["", "Too short."], ids=["empty", "shorter-than-a-sequence"])
def test_corpus_without_a_full_sequence(base_overrides, tmp_path, content):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(content)
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"data.source={corpus}",
                       f"data.cache_dir={tmp_path / 'cache'}", match="too few for one train sequence")
    assert not (tmp_path / "run").exists()


def test_tokenizer_file_that_does_not_parse(base_overrides, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"tokenizer.path={bad}",
                       match="is not a tokenizer.json")


def test_non_utf8_bytes_are_replaced_with_a_warning(base_overrides, corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = next(iter(sorted(corpus_dir.glob("*.txt")))).read_bytes()
    (corpus / "latin1.txt").write_bytes(text[:20000] + b"caf\xe9 \xff\xfe" + text[20000:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pretrain(*base_overrides, f"output_dir={tmp_path / 'run'}", f"data.source={corpus}",
                     f"data.cache_dir={tmp_path / 'cache'}", "max_steps=2")
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert messages and "latin1.txt is not valid UTF-8 (first bad byte at offset 20003)" in messages[0]
    assert len([r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]) == 2


def test_checks_run_before_the_first_write_and_a_failed_start_blocks_nothing(let_overrides, tmp_path):
    """Issue 15, class 9: settings that used to pass setup and fail at step 1 are refused
    before the run folder exists; a run that fails at its first step leaves a folder that
    the corrected rerun may use without overwrite=true."""
    out = tmp_path / "run"
    expect_setup_error(run_let, *let_overrides, f"output_dir={out}", "data.seq_len=64", "max_steps=3",
                       match="data.seq_len=64 is longer than the teacher's context (32 tokens")
    expect_setup_error(run_let, *let_overrides, f"output_dir={out}", "alignment.schedule.rho0=.nan",
                       "max_steps=3", match="alignment.schedule.rho0=nan must be a finite number")
    expect_setup_error(run_let, *let_overrides, f"output_dir={out}", "alignment.schedule._component_=linear",
                       "alignment.schedule.lambda0=.nan", "max_steps=3",
                       match="alignment.schedule.lambda0=nan must be a finite number")
    assert not out.exists()
    expect_setup_error(run_let, *let_overrides, f"output_dir={out}", "max_steps=3", "debug.nan_loss_at_step=1",
                       match="non-finite loss or gradient norm at step 1")
    run_let(*let_overrides, f"output_dir={out}", "max_steps=3")  # no overwrite needed: step 1 never finished
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_library_errors_name_the_key(base_overrides, tmp_path, monkeypatch):
    """Issue 15, class 8: a module in `imports` that raises while imported, and a JSONL
    record whose text is not a string, are one line each naming the key (and the line)."""
    (tmp_path / "broken_module.py").write_text("VALUE = 1\nRATIO = VALUE / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'a'}", "imports=[broken_module]",
                       match="imports: importing 'broken_module' failed: ZeroDivisionError: division by zero "
                             "(at broken_module.py:2)")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a fine document"}\n{"text": 42}\n')
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'b'}", f"data.source={corpus}",
                       match=f"data.source: {corpus}:2: 'text' is int, not text.")


def test_running_out_of_memory_mid_run_is_one_line_with_the_fix_and_keeps_the_checkpoint(base_overrides, tmp_path,
                                                                                      monkeypatch):
    """A real allocator refusal (a 1 PiB tensor) in the third step's loss."""
    import torch

    original = pretrain.PretrainRecipe.compute_loss

    def greedy(self, tokens, labels, **extra):
        if self.step == 2:
            torch.empty(2**50, dtype=torch.uint8)
        return original(self, tokens, labels, **extra)

    monkeypatch.setattr(pretrain.PretrainRecipe, "compute_loss", greedy)
    run = tmp_path / "run"
    message = expect_setup_error(run_pretrain, *base_overrides, f"output_dir={run}", "max_steps=4", "save_every=2",
                                 "batch_size=4", "gradient_accumulation_steps=2",
                                 match="out of memory at step 3 (RuntimeError: ")
    assert "\n" not in message and "can't allocate memory" in message
    assert "The cost model gives " in message and "GiB per process" in message
    assert "Fix: batch_size=2 with gradient_accumulation_steps=4 (the same tokens per step)" in message
    assert "step_00000002" in message and "is intact" in message
    assert (run / "checkpoints" / "step_00000002").is_dir()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_settings_that_are_valid_but_rarely_meant_are_said_once_at_the_start(base_overrides, tmp_path, capsys):
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=2", "lr_scheduler.warmup_steps=8",
                 "optimizer.lr=0")
    out = capsys.readouterr().out
    assert "warning: lr_scheduler.warmup_steps=8 > max_steps=2: the learning rate rises for the whole run and ends " \
           "at 25% of optimizer.lr." in out
    assert "warning: optimizer.lr=0: the weights never change." in out
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'plain'}", "max_steps=2")
    assert "warning:" not in capsys.readouterr().out
