"""Issue 6, hostile input: one test per row of docs/reliability.md's table. Each bad input
gets one clear error (or a documented, logged recovery) before training, with no
traceback as the only message and nothing previously written changed."""

import gc
import hashlib
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from letrecipes.components.corpus import DataError, DataWarning, list_units
from letrecipes.components.metrics import read_metrics
from letrecipes import let_pretrain, pretrain
from letrecipes.components.files import utf8_names
from tests.launch import REPO
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
    message = expect_setup_error(lambda *args: pretrain.recipe_main(list(args)), "--config", str(bad),
                                 match="is not valid YAML: ")
    assert "\n" not in message and "(line 3, column 1). Fix: correct the YAML there." in message
    bad.write_text("max_steps: 10\nmodel:\n\tnum_layers: 2\n")
    message = expect_setup_error(lambda *args: pretrain.recipe_main(list(args)), "--config", str(bad),
                                 match="found character that cannot start any token (line 3, column 1)")
    assert "\n" not in message and message.endswith("Fix: indent with spaces (YAML allows no tabs).")
    bad.write_bytes(b"max_steps: 10\n# caf\xe9 (Latin-1)\n")
    message = expect_setup_error(lambda *args: pretrain.recipe_main(list(args)), "--config", str(bad),
                                 match="is not valid YAML: it is not UTF-8 (byte 0xe9 on line 2)")
    assert message.endswith("Fix: save the file as UTF-8.")
    for encoding in ("utf-16", "utf-16-be"):  # PowerShell 5's `>` writes UTF-16 (was "byte 0xff on line 1")
        text = "max_steps: 10\n".encode(encoding)
        bad.write_bytes(text if encoding == "utf-16" else b"\xfe\xff" + text)
        message = expect_setup_error(lambda *args: pretrain.recipe_main(list(args)), "--config", str(bad),
                                     match="is not valid YAML: it is UTF-16 (its first bytes are UTF-16's byte-order "
                                           "mark), not UTF-8. Fix: save the file as UTF-8 (PowerShell: ")


@pytest.mark.parametrize("override, match", [
    ("=5", "the override '=5' has no key. Fix: write key=value, like max_steps=100."),
    ("max_steps==5", "config key max_steps='=5' must be an integer >= 1"),  # the value is what follows the first =
    ("max_steps", "got max_steps. Fix: write each override as key=value"),
], ids=["no-key", "double-equals", "no-value"])
def test_malformed_overrides(override, match):
    expect_setup_error(lambda *args: pretrain.recipe_main(list(args)), "--config", "pretrain_tiny", override,
                       match=match)


@pytest.mark.parametrize("override, match", [
    ("max_step=5", "config key max_step is unknown. Did you mean max_steps?"),
    ("data.seq_length=64", "config key data.seq_length is unknown. Did you mean data.seq_len?"),
    ("batch_size=sixteen", "config key batch_size='sixteen' must be an integer >= 1"),
    ("max_steps=0", "config key max_steps=0 must be an integer >= 1"),
    ("max_steps=1e3", "config key max_steps=1000.0 must be an integer (YAML reads 1e5 or 1000.0 as a float). Fix: "
                      "write it as max_steps=1000."),
    ("lr_scheduler.warmup_steps=1e2", "warmup_steps=100.0 must be an integer for 'letrecipes.components.lr_schedules."
                                      "warmup_cosine'. Fix: write it as lr_scheduler.warmup_steps=100"),
    ("data.val_fraction=1.5", "config key data.val_fraction=1.5 must be a number >= 0 and < 0.5"),
    ("data.val_fraction=0", "config key eval_every=4 evaluates on the validation split, but data.val_fraction is 0"),
    ("divergence.policy=ignore", "config key divergence.policy='ignore' must be one of stop, skip"),
    ("model.num_layer=2", "config key model.num_layer is not an argument of 'letrecipes.components.models.llama_model' (it takes: "),
    ("optimizer.lrr=0.1", "config key optimizer.lrr is not an argument of 'torch.optim.AdamW'"),
    ("model.norm_eps=abc", "config key model.norm_eps='abc' must be a number for 'letrecipes.components.models.llama_model'"),
    ("optimizer.betas=[0.9]", "config key optimizer.betas=[0.9] must be a list of 2 numbers, like [0.9, 0.999]"),
    ("optimizer.lr=abc", "config key optimizer.lr='abc' must be a number"),
    ("model.tie_word_embeddings=3", "config key model.tie_word_embeddings=3 must be true or false"),
    ("model.num_layers=null", "config key model.num_layers=None must be an integer for"),
    ("model=5", "config key model._component_=5 must be a component name"),
    ("max_steps=${oc.env:LETRECIPES_SURELY_UNSET}", "config key max_steps does not resolve: KeyError raised while "
                                                    "resolving interpolation: \"Environment variable "
                                                    "'LETRECIPES_SURELY_UNSET' not found\". Fix: export "
                                                    "LETRECIPES_SURELY_UNSET=... before the run"),
    ("max_steps=${no.such.key}", "config key max_steps does not resolve: Interpolation key 'no.such.key' not found"),
    # sizes no memory holds, before anything is built for real (a RoPE table of 32 GB; a MemoryError from building
    # 10**8 blocks on the meta device): smaller than the report's, so that a lost check cannot take the machine
    ("model.max_seq_len=16777217", "model.max_seq_len=16,777,217 is past 16,777,216 positions, the most data.seq_len "
                                   "takes. Fix: remove it (it follows data.seq_len)"),
    ("model.num_layers=5000", "model.num_layers=5,000 is past 4,096 blocks (Llama 3.1 405B has 126)"),
], ids=["unknown-key", "unknown-nested-key", "wrong-type", "out-of-range", "float-for-integer",
        "float-for-integer-argument", "out-of-range-fraction", "no-val-split",
        "bad-choice", "unknown-model-argument", "unknown-optimizer-argument", "model-argument-type",
        "optimizer-tuple-length", "optimizer-number", "model-flag", "null-for-a-required-integer",
        "section-as-a-scalar", "unset-environment-variable", "dangling-interpolation", "positions-past-2**24",
        "blocks-past-4096"])
def test_bad_config_values_damage_nothing(base_overrides, finished_run, override, match):
    before = digest(finished_run)
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={finished_run}", "resume=true", "max_steps=4",
                       override, match=match)
    assert digest(finished_run) == before


@pytest.mark.parametrize("override, match", [
    ("optimizer.lr=-1", "optimizer: cannot build 'torch.optim.AdamW': Invalid learning rate: -1."),
    ("optimizer.betas=[0.9,1.5]", "Invalid beta parameter at index 1: 1.5"),
    ("lr_scheduler.min_lr_ratio=2", "lr_scheduler.min_lr_ratio=2 must be in [0, 1]"),
    # torch takes eps=0, and the embedding rows of tokens not yet seen became NaN at the first step
    ("optimizer.eps=0", "config key optimizer.eps=0: the update divides by sqrt(v) + eps"),
    # every weight zero: grad_norm 0 and the loss at ln(vocabulary) for the whole run
    ("model.init_std=0", "model.init_std=0 must be a finite number > 0 (0.02 is usual), or null for no "
                         "initialisation (weights loaded afterwards): 0 makes every weight zero"),
], ids=["negative-lr", "beta-above-one", "schedule-ratio", "eps-zero", "init-std-zero"])
def test_values_the_optimizer_refuses_are_named_before_the_data_is_prepared(base_overrides, corpus_dir, tmp_path,
                                                                             override, match):
    """Before, the optimizer was first built after the corpus was tokenized: hours, at scale."""
    fresh = tmp_path / "corpus"
    fresh.mkdir()
    (fresh / "a.txt").write_text(next(corpus_dir.glob("*.txt")).read_text(encoding="utf-8"))
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"data.source={fresh}",
                       f"data.cache_dir={tmp_path / 'cache'}", override, match=match)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_run_writing_inside_its_own_corpus_folder_is_refused(base_overrides, corpus_dir, tmp_path):
    """Before, the first launch trained and the second read its checkpoints' format.json as a
    JSON corpus (and a resume found the corpus changed)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(next(corpus_dir.glob("*.txt")).read_text(encoding="utf-8"))
    common = [*base_overrides, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    expect_setup_error(run_pretrain, *common, f"output_dir={corpus / 'run'}",
                       match=f"config key output_dir='{corpus / 'run'}' lies inside the corpus folder data.source="
                             f"'{corpus}': what the run writes there")
    expect_setup_error(run_pretrain, *common[:-1], f"data.cache_dir={corpus / 'cache'}",
                       f"output_dir={tmp_path / 'run'}", match="config key data.cache_dir=")
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"] and not (tmp_path / "run").exists()
    # a glob reads only what it matches: a run folder beside the files it names is no part of it
    run_pretrain(*common[:-2], f"data.source={corpus}/*.txt", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={corpus / 'run'}", "max_steps=1")



def test_a_teacher_or_init_from_inside_the_folders_the_run_replaces_is_refused(let_overrides, teacher_dir, tmp_path):
    """``teacher.path=<output_dir>/final`` with overwrite=true: the run trained from the teacher,
    then its export replaced the teacher's files (lost); init_from in its checkpoints/ the same;
    a tokenizer.json in final/ was deleted at the start and the export failed at the end."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(teacher_dir.parent, run)  # a finished run: its final/ is the teacher
    kept = digest(run)
    expect_setup_error(run_let, *let_overrides, f"output_dir={run}", f"teacher.path={run / 'final'}", "overwrite=true",
                       match=f"config key teacher.path='{run / 'final'}' is {run / 'final'}, which this run "
                             f"(output_dir='{run}') replaces with its own export: what teacher.path names would be "
                             f"lost, or change under a resume. Fix: copy it out of the run folder")
    step = next((run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else run / "checkpoints" / "step_1"
    expect_setup_error(run_pretrain, *let_overrides[:-2], f"output_dir={run}", f"init_from={step}", "overwrite=true",
                       match=f"config key init_from='{step}' lies inside {run / 'checkpoints'}, which this run")
    assert digest(run) == kept
    # its tokenizer.json too: overwrite=true deletes final/ at the start, and the export copies the file
    expect_setup_error(run_pretrain, *let_overrides[:-2], f"output_dir={run}", "overwrite=true",
                       f"tokenizer.path={run / 'final' / 'tokenizer.json'}",
                       match=f"config key tokenizer.path='{run / 'final' / 'tokenizer.json'}' lies inside")
    assert digest(run) == kept


def test_a_shell_variable_in_a_path_is_named_with_omegaconfs_form(base_overrides, tmp_path, monkeypatch):
    """``output_dir: $SCRATCH/run`` in a YAML file is literal text: the run used to write into
    a folder named '$SCRATCH' under the working directory; a corpus path was called a Hub id."""
    from letrecipes._config import load_config
    from letrecipes._schema import validate_eval

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LETRECIPES_TEST_SCRATCH", str(tmp_path / "scratch"))
    expect_setup_error(run_pretrain, *base_overrides, "output_dir=$LETRECIPES_TEST_SCRATCH/run",
                       match=f"config key output_dir='$LETRECIPES_TEST_SCRATCH/run' holds $LETRECIPES_TEST_SCRATCH, a "
                             f"shell variable, which a config does not expand (the path would be read as the literal "
                             f"text '$LETRECIPES_TEST_SCRATCH'; here LETRECIPES_TEST_SCRATCH='{tmp_path}/scratch'). "
                             "Fix: write output_dir=${oc.env:LETRECIPES_TEST_SCRATCH}/run")
    expect_setup_error(run_pretrain, *[o for o in base_overrides if not o.startswith("data.source=")],
                       "data.source=[a.txt, $NO_SUCH_VARIABLE_HERE/b.txt]", "output_dir=run",
                       match="config key data.source[1]='$NO_SUCH_VARIABLE_HERE/b.txt' holds $NO_SUCH_VARIABLE_HERE")
    assert list(tmp_path.iterdir()) == []
    # the form the error gives resolves to the folder meant
    cfg = load_config("pretrain_tiny", ["output_dir=${oc.env:LETRECIPES_TEST_SCRATCH}/run"])
    assert cfg.output_dir == f"{tmp_path}/scratch/run"
    with pytest.raises(Exception, match=r"config key output=.*\$HOME"):
        validate_eval(load_config("eval", ["checkpoint=x", "output=$HOME/scores.json"]))


def test_a_path_starting_with_tilde_is_refused_with_the_expanded_path(base_overrides, tmp_path, monkeypatch):
    """``data.source=~/corpus`` (bash expands ~ only after a shell name's ``=``) or ``~`` in YAML
    used to be a folder named '~' in the working directory; the letrecipes command expands it."""
    from letrecipes import cli
    from letrecipes._config import load_config
    from letrecipes._schema import validate_eval

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expect_setup_error(run_pretrain, *base_overrides, "output_dir=~/runs/x",
                       match=f"config key output_dir='~/runs/x' starts with ~, which a config does not expand (it "
                             f"would be read as a file or folder named '~' in the working directory). Fix: write "
                             f"output_dir={tmp_path}/home/runs/x, or output_dir=${{oc.env:HOME}}/runs/x in a YAML file.")
    expect_setup_error(run_pretrain, *[o for o in base_overrides if not o.startswith("data.source=")],
                       "data.source=[a.txt, ~/b.txt]", "output_dir=run", match="config key data.source[1]='~/b.txt' starts with ~")
    with pytest.raises(Exception, match=r"config key checkpoint='~/run/final' starts with ~"):
        validate_eval(load_config("eval", ["checkpoint=~/run/final"]))
    assert list(tmp_path.iterdir()) == []
    # the command line's own path arguments are expanded, as bash does for a word of its own
    (tmp_path / "home").mkdir()
    cli.main(["cp", "let_tiny", "~/my_let.yaml"])
    assert (tmp_path / "home" / "my_let.yaml").is_file() and not (tmp_path / "~").exists()


def test_a_finished_run_launched_again_changes_nothing(base_overrides, finished_run, capsys):
    """A scheduler's requeue of a finished run, or max_steps lowered below the checkpoint:
    before, the first saved its last checkpoint again (deleting it first) and re-exported
    final/; the second re-exported final/ from a checkpoint of a later step; without its
    checkpoints, a requeue trained from step 0 over it."""
    kept = {name: digest(finished_run / name) for name in ("checkpoints", "final")}
    metrics = (finished_run / "metrics.jsonl").read_text(encoding="utf-8")
    run_pretrain(*base_overrides, f"output_dir={finished_run}", "resume=true", "max_steps=2", "save_every=1")
    assert "step 2 is max_steps: the run is complete, nothing to train" in capsys.readouterr().out
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={finished_run}", "resume=true", "max_steps=1",
                       "save_every=1", match="step_00000002 is at step 2, past max_steps=1. Fix: max_steps=2 or more")
    assert {name: digest(finished_run / name) for name in kept} == kept
    assert (finished_run / "metrics.jsonl").read_text(encoding="utf-8") == metrics
    # an export lost (a full disk stopped it): the relaunch exports the last checkpoint again, and only that
    import shutil

    shutil.rmtree(finished_run / "final")
    run_pretrain(*base_overrides, f"output_dir={finished_run}", "resume=true", "max_steps=2", "save_every=1")
    assert {name: digest(finished_run / name) for name in kept} == kept

    # its checkpoints pruned (or save_every=0): a requeue used to train from step 0 and replace final/
    shutil.rmtree(finished_run / "checkpoints")
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={finished_run}", "resume=true", "max_steps=2",
                       match=f"resume=true: output_dir='{finished_run}' holds a finished run's export "
                             f"({finished_run / 'final'}) but no checkpoint to go on from (save_every=0, or its "
                             "checkpoints were deleted): starting fresh would train from step 0 and replace that export. "
                             "Fix: overwrite=true to train again from scratch")
    assert digest(finished_run / "final") == kept["final"]
    assert (finished_run / "metrics.jsonl").read_text(encoding="utf-8") == metrics


@pytest.mark.parametrize("cut,match", [("model.safetensors", "cannot read"),
                                       ("config.json", "Fix: re-download or re-export the model")])
def test_truncated_teacher_file(let_overrides, teacher_dir, tmp_path, cut, match):
    """Found from the headers before the corpus is prepared (a cut weight file used to be found
    when the teacher was loaded, after it)."""
    broken = tmp_path / "teacher"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        data = (teacher_dir / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name == cut else data)
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"teacher.path={broken}",
                       f"data.cache_dir={tmp_path / 'cache'}", match=match)
    assert not (tmp_path / "cache").exists()


def test_a_shard_the_index_names_that_is_missing_or_cut_is_named_before_the_corpus(let_overrides, teacher_dir,
                                                                                   tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (sharded / name).write_bytes((teacher_dir / name).read_bytes())
    tensors = load_file(teacher_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, sharded / file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: file for file, part in halves.items() for n in part}}))
    common = [*let_overrides, f"output_dir={tmp_path / 'run'}", f"teacher.path={sharded}",
              f"data.cache_dir={tmp_path / 'cache'}"]
    second = sharded / "model-00002-of-00002.safetensors"
    whole = second.read_bytes()
    second.write_bytes(whole[: len(whole) - 100])
    expect_setup_error(run_let, *common, match=f"teacher.path: cannot read '{second}' (Error while deserializing "
                                               "header: incomplete metadata, file not fully covered)")
    second.unlink()
    expect_setup_error(run_let, *common, match="lists the shard 'model-00002-of-00002.safetensors', but")
    assert not (tmp_path / "cache").exists()
    second.write_bytes(whole)
    run_let(*common, "max_steps=1")  # whole again: it trains


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


@pytest.mark.parametrize("content,match", [("", "the source holds no text"),
                                           ("Too short.", "too few for one train sequence")],
                         ids=["empty", "shorter-than-a-sequence"])
def test_corpus_without_a_full_sequence(base_overrides, tmp_path, content, match):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(content)
    # output_dir two folders deep, as the configs' outputs/<name>: a failed setup leaves neither folder
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'outputs' / 'run'}",
                       f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", match=match)
    assert not (tmp_path / "outputs").exists()


def test_tokenizer_file_that_does_not_parse(base_overrides, tokenizer_path, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": }')
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"tokenizer.path={bad}",
                       match="). Fix: point it at the model's tokenizer.json.")
    # an interrupted download or copy: the JSON stops inside a value (here inside a string, cut mid-character)
    whole = Path(tokenizer_path).read_bytes()
    for cut in (whole[:2000], whole[:len(whole) // 2], '{"version": "1.0", "model": '.encode(),
                "{\"a\": \"é".encode()[:-1]):
        bad.write_bytes(cut)
        expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"tokenizer.path={bad}",
                           match=f"is cut short: its JSON stops inside a value after {len(cut):,} bytes (an "
                                 "interrupted download or copy). Fix: copy the model's tokenizer.json again.")
    # a model folder's config.json named instead of its tokenizer.json: the one beside it is the fix
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}",
                       f"tokenizer.path={model / 'config.json'}",
                       match=f"). Fix: tokenizer.path={model / 'tokenizer.json'} (the model's tokenizer beside it).")


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
    assert messages and "latin1.txt is not valid UTF-8 (first bad byte at offset 20,003)" in messages[0]
    assert len([r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]) == 2


@pytest.mark.skipif(not utf8_names(), reason="under a locale that is not UTF-8, b'caf\\xe9' reads as a name of its "
                    "encoding (ISO-8859-1's 'caf\u00e9'), or as UTF-8 misread: the next test's case")
def test_a_file_name_or_a_value_that_is_not_utf8_is_one_line_before_anything_is_written(base_overrides, corpus_dir,
                                                                                      tmp_path):
    """A corpus file named in Latin-1 (b'caf\\xe9.txt', as an old archive unpacks) was a
    UnicodeEncodeError traceback from the cache key; such a path given on the command line,
    "'utf-8' codec can't encode ... Fix: write each override as key=value"."""
    import os

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = next(iter(sorted(corpus_dir.glob("*.txt")))).read_text(encoding="utf-8")
    (corpus / "ok.txt").write_text(text)
    latin1 = os.fsdecode(bytes(corpus) + b"/caf\xe9.txt")
    Path(latin1).write_text(text[::-1])
    common = [*base_overrides, f"data.cache_dir={tmp_path / 'cache'}", "max_steps=2"]
    expect_setup_error(run_pretrain, *common, f"output_dir={tmp_path / 'run'}", f"data.source={corpus}",
                       match=f"data.source: 1 file name(s) in {str(corpus)!r} are not UTF-8 (first: b'caf\\xe9.txt'), "
                             "which the prepared corpus's records and the log cannot hold. Fix: rename them to UTF-8")
    for key, value in (("data.source", latin1), ("output_dir", os.fsdecode(bytes(tmp_path) + b"/r\xe9"))):
        expect_setup_error(run_pretrain, *common, *([] if key == "output_dir" else [f"output_dir={tmp_path / 'run'}"]),
                           f"{key}={value}", match=f"{key}: its value {os.fsencode(value)!r} is not UTF-8")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_names_the_locale_cannot_hold_are_one_line_naming_the_locale(base_overrides, corpus_dir, tmp_path):
    """Under a locale whose encoding is not UTF-8 (ISO-8859-1, EUC-JP; or C with Python's
    UTF-8 coercion off, the stand-in here: ASCII, on every machine), a UTF-8 name typed on
    the command line was "not valid YAML ... control characters" (ISO-8859-1) or "is not
    UTF-8" (ASCII: it is); one in a YAML file a UnicodeEncodeError traceback at the run's
    first mkdir; a config value that `letrecipes cat` printed, one at the print."""
    import os
    import subprocess

    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "WANDB_MODE": "disabled"}
    env.pop("PYTHONIOENCODING", None)

    def launch(*args):  # UTF-8 bytes in and out, whatever this process's own locale
        done = subprocess.run([sys.executable, "-m", *(a.encode("utf-8") for a in args)], env=env, cwd=tmp_path,
                              capture_output=True, timeout=300)
        return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")

    fix = "Fix: run under a UTF-8 locale (export LC_ALL=C.UTF-8), or with PYTHONUTF8=1 (Python's UTF-8 mode)"
    common = [*base_overrides, f"data.cache_dir={tmp_path / 'cache'}", "max_steps=2"]
    code, _, err = launch("letrecipes.pretrain", "--config", "baseline_tiny", *common, f"output_dir={tmp_path / '出力'}")
    assert code == 1 and err.count("\n") == 1 and err.startswith(
        f"error: output_dir: its value is UTF-8 text ('{tmp_path}/\\u51fa\\u529b'), but this process reads its "
        "command line as ascii (its locale: LC_CTYPE=C), which makes it ") and err.rstrip().endswith(fix + "."), err
    config = (REPO / "recipes" / "configs" / "baseline_tiny.yaml").read_text(encoding="utf-8")
    mine = config.replace("output_dir: outputs/baseline_tiny", f"output_dir: {tmp_path}/出力")
    (tmp_path / "mine.yaml").write_text(mine, encoding="utf-8")
    token = config.replace("  path: outputs/demo/tokenizer.json",
                           "  path: outputs/demo/tokenizer.json\n  eos_token: <｜end▁of▁sentence｜>")
    (tmp_path / "token.yaml").write_text(token, encoding="utf-8")
    code, _, err = launch("letrecipes.pretrain", "--config", "mine.yaml", *common)
    assert code == 1 and err == (f"error: config key output_dir='{tmp_path}/\\u51fa\\u529b' cannot be a file name "
                                 "here: this process writes file names in ascii (its locale: LC_CTYPE=C), which has no "
                                 f"'\\u51fa\\u529b'. {fix}; or a name without those characters.\n"), err
    code, out, err = launch("letrecipes", "cat", "token.yaml")  # printed, the characters ASCII has not escaped
    assert code == 0 and "eos_token: <\\uff5cend\\u2581of\\u2581sentence\\uff5c>" in out, err
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(sorted(corpus_dir.glob("*.txt"))[0], corpus / os.fsdecode("日本.txt".encode("utf-8")))
    code, _, err = launch("letrecipes.pretrain", "--config", "baseline_tiny", *common, f"output_dir={tmp_path / 'run'}",
                          f"data.source={corpus}")
    assert code == 1 and err == (f"error: data.source: 1 file name(s) in '{corpus}' are UTF-8 (first: "
                                 "'\\u65e5\\u672c.txt'), but this process reads file names as ascii (its locale: "
                                 f"LC_CTYPE=C). {fix}.\n"), err
    assert not (tmp_path / os.fsdecode("出力".encode("utf-8"))).exists() and not (tmp_path / "cache").exists()


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
    assert "loss_chunk_tokens=1024 (the logits are then never whole)" in message  # the run has it at 0
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
    # exponents that slipped: eps 1e8 for 1e-8 (was silent: the model barely learned), lr 3 for 3e-4
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'slipped'}", "max_steps=1", "optimizer.eps=1e8",
                 "optimizer.lr=3")
    out = capsys.readouterr().out
    assert "warning: optimizer.eps=1e+08: Adam divides each update by sqrt(v) + eps" in out
    assert "warning: optimizer.lr=3 for torch.optim.AdamW: each step moves every weight by up to 3" in out
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'plain'}", "max_steps=2")
    assert "warning:" not in capsys.readouterr().out


def test_an_alignment_that_outlasts_the_run_is_said_at_the_start(let_overrides, tmp_path, capsys):
    run_let(*let_overrides, f"output_dir={tmp_path}", "max_steps=2", "alignment.schedule._component_=linear",
            "alignment.schedule.stop=50", "teacher.placement=sharded")
    out = capsys.readouterr().out
    assert "warning: alignment.schedule.stop=50 > max_steps=2: the teacher guides every step and is never released" in out
    assert "note: teacher.placement=sharded shards the teacher over FSDP2's processes; FSDP2 is off" in out
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'b'}", "max_steps=2",
                       "alignment.schedule._component_=linear", "alignment.schedule.stop=0",
                       match="alignment.schedule.stop=0: must be >= 1 step. Fix: a number of steps >= 1")



def test_a_schedule_that_weighs_nothing_while_the_teacher_runs_is_said_at_the_start(let_overrides, tmp_path, capsys):
    """lambda0=0 ran the teacher's forward passes for nothing, without a word."""
    run_let(*let_overrides, f"output_dir={tmp_path / 'zero'}", "max_steps=2", "alignment.schedule._component_=linear",
            "alignment.schedule.lambda0=0")
    assert "warning: alignment.schedule gives lambda 0 at every step the teacher runs (LinearDecay(lambda0=0.0" \
           in capsys.readouterr().out
    for name, schedule in (("linear", ["alignment.schedule._component_=linear", "alignment.schedule.lambda0=0.1"]),
                           ("auto", ["alignment.schedule=auto"])):  # a real weight, or one measured: no warning
        run_let(*let_overrides, f"output_dir={tmp_path / name}", "max_steps=2", *schedule)
        assert "teaches nothing" not in capsys.readouterr().out


@pytest.mark.parametrize("override, match", [
    ("teacher.compile=maybe", "config key teacher.compile='maybe' must be true or false"),
    ("teacher.placement=everywhere", "config key teacher.placement='everywhere' must be one of replicated, sharded"),
    ("teacher.dtype=int8", "config key teacher.dtype='int8' must be one of bf16"),
    ("alignment.layer_map=E2Z", "alignment.layer_map='E2Z' is neither a preset (L2E, L2M"),
    ("alignment.layer_map=[3]", "alignment.layer_map=[3]: a list of layer pairs holds [student_layer, teacher_layer]"),
    ("lr_scheduler.warmup_steps=-1", "lr_scheduler.warmup_steps=-1 must be >= 0. Fix: 0 for no warmup"),
    ("lr_scheduler.min_lr_ratio=2", "lr_scheduler.min_lr_ratio=2 must be in [0, 1]"),
    ("model.max_seq_len=16", "model.max_seq_len=16 is shorter than data.seq_len=32, the length the model trains on"),
    ("metric_logger._component_=torch", "config key metric_logger._component_='torch' is a module, not a logger class"),
], ids=["teacher-compile", "teacher-placement", "teacher-dtype", "unknown-preset", "pair-not-a-pair",
        "negative-warmup", "min-lr-ratio", "max-seq-len-short", "logger-not-a-class"])
def test_settings_the_recipe_used_to_accept_or_trace_back_on(let_overrides, tmp_path, override, match):
    """Before: teacher.compile='maybe' compiled (any string is true), model.max_seq_len=16 was
    silently replaced by data.seq_len, a module as metric logger was a TypeError traceback."""
    out = tmp_path / "run"
    expect_setup_error(run_let, *let_overrides, f"output_dir={out}", "max_steps=2", override, match=match)


def test_a_run_folder_or_a_step_checkpoint_where_a_model_is_read_names_the_model_inside(let_overrides, teacher_dir,
                                                                                          tmp_path):
    run_folder = teacher_dir.parent
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'a'}", f"teacher.path={run_folder}",
                       match=f"teacher.path: '{run_folder}' is a training run's folder, not a model. "
                             f"Fix: teacher.path={teacher_dir}, its exported model.")
    unfinished = tmp_path / "unfinished"
    run_pretrain(*let_overrides[:-2], f"output_dir={unfinished}", "max_steps=2", "save_every=1", "export.enabled=false")
    step = unfinished / "checkpoints" / "step_00000002"
    assert step.is_dir() and not (unfinished / "final").exists()
    expect_setup_error(run_pretrain, *let_overrides[:-2], f"output_dir={tmp_path / 'b'}", f"init_from={unfinished}",
                       match=f"init_from: '{unfinished}' is a training run's folder, not a model. Fix: export a "
                             f"checkpoint first: letrecipes export {step} {unfinished}/exported, then "
                             f"init_from={unfinished}/exported.")
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'c'}", f"teacher.path={step}",
                       match=f"teacher.path: '{step}' is a training checkpoint (sharded DCP files), which is read "
                             f"only to resume. Fix: letrecipes export {step} {step}-hf, then teacher.path={step}-hf.")


def test_a_run_folder_a_checkpoint_or_a_model_where_a_corpus_is_read_is_named_as_one(base_overrides, finished_run,
                                                                                       teacher_dir, corpus_dir,
                                                                                       tmp_path):
    """What training writes, given as data.source, was read as a corpus: a run folder or a
    step checkpoint stopped on `format.json:1 has no field 'text'`, an export on its
    generation_config.json, each after a token cache was begun. Now each is named for what
    it is, with the corpus its run trained on; held inside a folder of text, likewise. A run
    folder as tokenizer.path names the tokenizer it has (was: "has no tokenizer.json")."""
    overrides = [o for o in base_overrides if not o.startswith(("data.source=", "data.cache_dir="))]
    cache = tmp_path / "cache"
    step = finished_run / "checkpoints" / "step_00000002"
    assert step.is_dir()
    for source, what, use in (
            (finished_run, "a training run's folder", "a run goes on with resume=true"),
            (finished_run / "checkpoints", "a training run's checkpoints folder", "a step checkpoint is read by"),
            (step, "a training checkpoint (sharded DCP files)", "a step checkpoint is read by resume=<its path>"),
            (finished_run / "final", "a model (config.json and weights)", "a model is read as teacher.path=")):
        expect_setup_error(run_pretrain, *overrides, f"data.source={source}", f"data.cache_dir={cache}",
                           f"output_dir={tmp_path / 'new'}",
                           match=f"data.source: '{source}' is {what}, not a corpus. Fix: point data.source at the text "
                                 f"to train on (the run it belongs to trained on data.source={corpus_dir}); {use}")
    expect_setup_error(run_pretrain, *overrides, f"data.source={teacher_dir}", f"data.cache_dir={cache}",
                       f"output_dir={tmp_path / 'new'}", match=f"'{teacher_dir}' is a model (config.json and weights)")
    assert not cache.exists() and not (tmp_path / "new").exists()
    expect_setup_error(run_pretrain, *base_overrides, f"tokenizer.path={finished_run}", f"output_dir={tmp_path / 'new'}",
                       match=f"tokenizer.path: '{finished_run}' is a training run's folder, which holds no "
                             f"tokenizer.json of its own. Fix: tokenizer.path={finished_run}/final/tokenizer.json "
                             "(its export's copy).")
    mixed = tmp_path / "mixed"
    shutil.copytree(corpus_dir, mixed)
    shutil.copytree(finished_run, mixed / "zz-run")
    with pytest.raises(DataError, match=rf"'{mixed}' holds a training run's folder, '{mixed / 'zz-run'}', which is not "
                                        rf"text. Fix: move it out of '{mixed}', or point data.source at the corpus's "
                                        "own folder"):
        list_units(mixed, key="data.source")


def test_layer_pairs_may_be_given_as_a_plain_list():
    from letrecipes.components.layer_maps import LayerMapError, layer_map_spec

    assert layer_map_spec([[2, -1], [3, "L"]]) == {"_component_": "pairs", "pairs": [[2, -1], [3, "L"]]}
    assert layer_map_spec("m2e") == {"_component_": "preset", "name": "M2E"}
    assert layer_map_spec({"_component_": "pairs", "pairs": [[1, 1]]}) == {"_component_": "pairs", "pairs": [[1, 1]]}
    with pytest.raises(LayerMapError, match="is neither a preset"):
        layer_map_spec("E2Z")


def test_metric_loggers_have_short_names_and_one_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    from torchtune.training.metric_logging import DiskLogger, WandBLogger

    from letrecipes.components.metrics import build_metric_loggers, metric_logger_class
    from letrecipes.components.registry import ComponentError

    assert metric_logger_class("wandb") is WandBLogger and metric_logger_class("Disk") is DiskLogger
    (logger,) = build_metric_loggers({"_component_": "disk"}, None, tmp_path)
    assert isinstance(logger, DiskLogger)
    logger.close()
    # Like torchtune's TensorBoardLogger without its package: __init__ fails, then __del__ does too
    (tmp_path / "half_built_logger.py").write_text(
        "class HalfBuilt:\n"
        "    def __init__(self, log_dir):\n"
        "        raise ModuleNotFoundError(\"No module named 'tensorboard'\")\n"
        "    def __del__(self):\n"
        "        self._writer.close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    printed_after = []  # what Python would print as "Exception ignored in ..." under the error
    monkeypatch.setattr(sys, "unraisablehook", printed_after.append)
    with pytest.raises(ComponentError) as err:
        build_metric_loggers({"_component_": "half_built_logger.HalfBuilt"}, None, tmp_path)
    assert str(err.value).startswith("metric_logger: HalfBuilt could not start: ModuleNotFoundError: No module named "
                                     "'tensorboard'. Fix: see that logger's documentation, or remove it")
    gc.collect()
    assert printed_after == []

    # W&B with a key but no route to its server (a compute node): the fix is offline mode, not a login
    import wandb

    def unreachable(**_):
        raise wandb.errors.CommError("Timed out while retrying: Post \"https://api.wandb.ai/graphql\": no such host")

    monkeypatch.setattr(wandb, "init", unreachable)
    with pytest.raises(ComponentError) as err:
        build_metric_loggers({"_component_": "wandb", "project": "p"}, None, tmp_path)
    assert "could not start: CommError: Timed out while retrying" in str(err.value)
    assert "cannot be reached from this machine" in str(err.value) and "wandb sync" in str(err.value)
    assert "wandb login" not in str(err.value)



def test_a_logger_that_could_not_start_is_named_before_the_corpus_is_prepared(base_overrides, tmp_path, monkeypatch):
    """W&B online without credentials used to be found by wandb.init once the corpus was
    prepared (or to wait at its login prompt, on a terminal); a logger's missing package
    likewise. Both are named at validation now, without starting anything; a short name
    alone (metric_logger=disk) is a logger."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb/settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    overrides = [*[o for o in base_overrides if not o.startswith("data.cache_dir=")],
                 f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]
    expect_setup_error(run_pretrain, *overrides, "metric_logger={_component_: wandb, project: p}",
                       match="metric_logger: WandBLogger logs online and this machine has no W&B credentials")
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:  # not among the project's dependencies
        expect_setup_error(run_pretrain, *overrides, "metric_logger=[disk, tensorboard]",
                           match="metric_logger[1]: TensorBoardLogger needs the tensorboard package, which is not "
                                 "installed. Fix: pip install tensorboard")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # credentials (never checked against a server here)
    from letrecipes._config import load_config
    from letrecipes._schema import validate

    validate(load_config("pretrain_tiny", ["metric_logger={_component_: wandb, project: p}"]), with_teacher=False)
    monkeypatch.delenv("WANDB_API_KEY")
    validate(load_config("pretrain_tiny", ["metric_logger={_component_: wandb, mode: offline}"]), with_teacher=False)
    run_pretrain(*overrides, "metric_logger=disk", "max_steps=1")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_output_paths_that_would_lose_or_mix_files_are_refused_before_any_work(base_overrides, teacher_dir,
                                                                               corpus_dir, tmp_path):
    """Before: `export step_N . --overwrite` deleted the working folder; prepare-data wrote its
    shards among whatever the --out folder held; a file as --out, or cp into a missing folder,
    was a traceback."""
    from letrecipes.cli import main

    def refused(argv, match):
        with pytest.raises(SystemExit, match=match):
            main(argv)

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    before = digest(teacher_dir)
    refused(["export", str(teacher_dir), str(kept), "--overwrite"],
            r"holds files that are not a model export \(notes.txt\); --overwrite replaces only a folder")
    refused(["export", str(teacher_dir), str(teacher_dir.parent), "--overwrite"],
            r"holds the model being exported .* Fix: write the export to another folder")
    refused(["export", str(teacher_dir), str(teacher_dir / "hf")], r"lies inside the model being exported .* Fix: "
            "write the export to a folder outside it")
    refused(["export", str(teacher_dir), str(a_file)], r"is a file, not a folder")
    assert (kept / "notes.txt").read_text(encoding="utf-8") == "mine" and a_file.read_text(encoding="utf-8") == "mine"
    assert digest(teacher_dir) == before
    # An earlier export is what --overwrite replaces
    assert main(["export", str(teacher_dir), str(tmp_path / "hf")]) == 0
    assert main(["export", str(teacher_dir), str(tmp_path / "hf"), "--overwrite"]) == 0

    prepare = ["prepare-data", "--config", "pretrain_tiny", *base_overrides[:2]]
    refused([*prepare, "--out", str(kept)], r"--out: .*kept is not empty and is not a prepared folder \(notes.txt\)")
    refused([*prepare, "--out", str(corpus_dir)], r"--out: .* holds the corpus being prepared")
    refused([*prepare, "--out", str(a_file)], r"--out=.* is a file, not a folder")
    refused([*prepare, "--out", str(tmp_path / "shards"), "--workers", "0"], r"workers=0 .* Fix: give 1 or more")
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"] and not (tmp_path / "shards").exists()

    refused(["cp", "let_tiny", str(tmp_path / "missing" / "my.yaml")],
            r"cp: the folder .*missing does not exist. Fix: create it first")


def test_the_let_recipe_on_a_config_without_a_teacher_and_pretraining_on_one_with(base_overrides, tmp_path, capsys):
    """Before: let_pretrain on pretrain_tiny was an omegaconf traceback from inside setup;
    pretrain on let_tiny dropped the teacher without a word."""
    from letrecipes import let_pretrain

    out = tmp_path / "let"
    expect_setup_error(lambda *args: let_pretrain.recipe_main(list(args)), "--config", "pretrain_tiny",
                       *base_overrides, f"output_dir={out}",
                       match="config key teacher is missing: the LET recipe trains against a teacher")
    assert not out.exists()
    pretrain.recipe_main(["--config", "let_tiny", *base_overrides, f"output_dir={tmp_path / 'plain'}", "max_steps=1"])
    assert "note: this recipe is plain pretraining: the config's teacher and alignment sections are not used" in \
        capsys.readouterr().out


def test_a_run_too_large_for_this_machine_is_refused_before_anything_is_prepared(base_overrides, tmp_path):
    """A 128B-parameter student on this machine: 16 bytes a parameter cannot fit in any CI
    host's memory. One line before the corpus is prepared or the run folder written (the
    kernel would otherwise kill the process while it builds the model)."""
    cache = tmp_path / "cache"
    message = expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}",
                                 f"data.cache_dir={cache}", "model.num_layers=160", "model.embed_dim=8192",
                                 "model.num_heads=64", "model.num_kv_heads=8", "model.intermediate_dim=28672",
                                 match="memory: this run needs at least")
    assert "per process for its weights, gradients and AdamW moments (" in message and "16 bytes each" in message
    assert "Fix: a smaller model, more processes with FSDP2" in message and "memory_check=false" in message
    assert not cache.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["gemma-config", "context-shorter-than-seq_len", "teacher-layer-out-of-range",
                                     "projector-of-unequal-widths"])
def test_what_the_teachers_metadata_rules_out_is_refused_before_the_corpus_is_prepared(let_overrides, teacher_dir,
                                                                                       tmp_path, problem):
    """Its config.json is read first: a Gemma teacher without its shape, one whose context cannot hold a
    training sequence, or an alignment section that cannot join the student to its shape (a
    layer beyond its depth, an identity projector between two widths: found after the corpus
    was prepared before) stops the run before hours of preparing data."""
    cache = tmp_path / "cache"
    if problem == "gemma-config":
        foreign = tmp_path / "gemma"
        foreign.mkdir()
        for name in ("model.safetensors", "tokenizer.json"):
            (foreign / name).write_bytes((teacher_dir / name).read_bytes())
        (foreign / "config.json").write_text('{"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}')
        overrides, match = [f"teacher.path={foreign}"], "GemmaForCausalLM without hidden_size, num_hidden_layers"
    elif problem == "context-shorter-than-seq_len":
        overrides, match = ["data.seq_len=64"], "data.seq_len=64 is longer than the teacher's context (32 tokens"
    elif problem == "teacher-layer-out-of-range":
        overrides, match = ["alignment.layer_map=[[1, 50]]"], "alignment.layer_map: teacher layer 50 is outside the " \
                                                              "teacher's depth"
    else:
        overrides, match = ["alignment.projector=identity"], "alignment.projector: identity needs equal widths"
    message = expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                                 *overrides, match=match)
    assert "Fix: " in message
    assert not cache.exists() and not (tmp_path / "run").exists()




def test_a_student_vocabulary_smaller_than_the_tokenizer_is_named_before_the_corpus_is_prepared(base_overrides,
                                                                                                tmp_path):
    overrides = [o for o in base_overrides if not o.startswith("data.cache_dir=")]
    expect_setup_error(run_pretrain, *overrides, "model.vocab_size=100", f"data.cache_dir={tmp_path / 'cache'}",
                       f"output_dir={tmp_path / 'run'}",
                       match="model.vocab_size=100 is smaller than the tokenizer's 512 tokens. Fix: remove "
                             "model.vocab_size")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_machine_that_cannot_compile_is_named_before_the_corpus_is_prepared(base_overrides, tmp_path):
    """No C++ compiler (here CXX names none): compile=true used to end the first step in a
    100-line InductorError traceback, after the corpus was prepared and the model built."""
    import os
    import subprocess

    overrides = [o for o in base_overrides if not o.startswith("data.cache_dir=")]
    result = subprocess.run(
        [sys.executable, "-m", "letrecipes.pretrain", "--config", "pretrain_tiny", *overrides, "compile=true",
         f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CXX": str(tmp_path / "no-compiler"),
             "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # a fresh cache: no kernel built before
             "PYTHONUTF8": "1"})  # whatever the locale: under EUC-JP, that is the line (the next test)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("error: compile=true: torch.compile cannot compile on this machine (InductorError: "
                           "InvalidCxxCompiler") and last.endswith("or compile=false."), last
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()



def test_a_locale_torch_cannot_compile_under_is_named_with_its_fix(monkeypatch):
    """torch's compiler opens its own UTF-8 templates in the locale's encoding: under EUC-JP
    compile=true was "cannot compile on this machine ... Fix: install a C++ compiler"."""
    import torch

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    def undecodable(function):
        def compiled(*args):
            raise RuntimeError("while loading a template") from UnicodeDecodeError(
                "euc_jp", b"\xe2", 0, 1, "illegal multibyte sequence")
        return compiled

    monkeypatch.setattr(torch, "compile", undecodable)
    monkeypatch.setattr(parallel.locale, "getpreferredencoding", lambda do_setlocale=True: "EUC-JP")
    with pytest.raises(ComponentError) as refused:
        parallel.rehearse_compile(torch.device("cpu"))
    assert str(refused.value) == (
        "compile=true: torch.compile cannot compile under this locale: torch's compiler reads its own UTF-8 files in "
        "the locale's encoding, EUC-JP (RuntimeError: while loading a template). Fix: run under a UTF-8 locale (export "
        "LC_ALL=C.UTF-8), or with PYTHONUTF8=1 (Python's UTF-8 mode), or compile=false.")


@pytest.mark.parametrize("in_env", [True, False], ids=["TORCHINDUCTOR_CACHE_DIR", "default"])
def test_a_compiler_cache_that_cannot_be_written_is_named_with_its_fix(monkeypatch, tmp_path, in_env):
    """A full /tmp, or a cache folder on a read-only filesystem: compile=true was "cannot
    compile on this machine ... Fix: install a C++ compiler"."""
    import errno
    import tempfile

    import torch

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    if in_env:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
        kernel = tmp_path / "inductor" / "ab" / "kernel.cpp"
    else:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        kernel = Path(tempfile.gettempdir()) / "torchinductor_someone" / "ab" / "kernel.cpp"

    def full_disk(function):
        def compiled(*args):
            raise RuntimeError("InductorError: while writing a kernel") from OSError(
                errno.ENOSPC, "No space left on device", str(kernel))
        return compiled

    monkeypatch.setattr(torch, "compile", full_disk)
    with pytest.raises(ComponentError) as refused:
        parallel.rehearse_compile(torch.device("cpu"))
    assert str(refused.value).startswith(
        "compile=true: torch.compile cannot compile here: it cannot write its cache folder (TORCHINDUCTOR_CACHE_DIR, "
        f"else torchinductor_<user> in the temporary folder): the disk is full ({kernel}). Fix: "), refused.value
    assert str(refused.value).endswith("or TORCHINDUCTOR_CACHE_DIR=<a writable folder>, or compile=false.")
    monkeypatch.setattr(torch, "compile", lambda function: lambda *args: open(tmp_path / "no" / "such" / "compiler"))
    with pytest.raises(ComponentError, match="cannot compile on this machine .*install a C.. compiler"):
        parallel.rehearse_compile(torch.device("cpu"))  # an OS error elsewhere: not the cache's


def test_a_memory_limit_of_the_process_is_checked_and_named(base_overrides, tmp_path, monkeypatch):
    """`ulimit -v` (a login node's, an older scheduler's) below what the run needs: the memory
    check read only the host's free memory, and the model's build ended in a
    DefaultCPUAllocator traceback."""
    import subprocess

    from letrecipes.components import parallel

    probe = ("import resource; from letrecipes.components.parallel import rlimit_left_gb; "
             "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize(); "
             "resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY)); print(rlimit_left_gb())")
    left, name = eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                     timeout=120).stdout)
    assert name == "ulimit -v" and 0.9 < left <= 1.0, left
    monkeypatch.setattr(parallel, "rlimit_left_gb", lambda: (1e-4, "ulimit -v"))
    expect_setup_error(run_pretrain, *base_overrides, "max_steps=1", f"output_dir={tmp_path / 'run'}",
                       match="this process's limit leaves 0.0 GiB free (its ulimit -v). Fix: `ulimit -v unlimited` "
                             "(or higher) before the command, a smaller model")


def test_a_compiler_cache_on_a_noexec_filesystem_is_named_with_its_fix(monkeypatch, tmp_path):
    """Docker mounts /tmp noexec: the kernel torch built there cannot be loaded ("failed to map
    segment from shared object"), and compile=true said "install a C++ compiler"."""
    import os
    from types import SimpleNamespace

    import torch

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    statvfs = os.statvfs
    monkeypatch.setattr(parallel.os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_NOEXEC)
                        if str(path) == str(tmp_path) else statvfs(path))

    def unloadable(function):
        def compiled(*args):
            raise RuntimeError("InductorError: OSError: kernel.so: failed to map segment from shared object") \
                from OSError(f"{tmp_path}/ab/kernel.so: failed to map segment from shared object")
        return compiled

    monkeypatch.setattr(torch, "compile", unloadable)
    with pytest.raises(ComponentError) as refused:
        parallel.rehearse_compile(torch.device("cpu"))
    assert str(refused.value) == (
        f"compile=true: torch.compile cannot compile here: its cache folder {tmp_path} is on a filesystem mounted "
        "noexec, where the kernels it builds cannot be loaded (RuntimeError: InductorError: OSError: kernel.so: failed "
        "to map segment from shared object). Fix: TORCHINDUCTOR_CACHE_DIR=<a folder on a filesystem that allows "
        "running programs> (or remount it with exec), or compile=false.")


def test_shared_memory_the_loaders_workers_run_out_of_is_one_line_with_what_is_kept(base_overrides, tmp_path,
                                                                                    monkeypatch):
    """A full /dev/shm (a container's 64 MB, or files of killed runs) under data.num_workers > 0:
    torch's "unable to allocate shared memory(shm) ... No space left on device" from a
    worker was a traceback mid-run (seen with a small tmpfs mounted over /dev/shm)."""
    from letrecipes.components import data

    stream_next = data.BatchStream.next

    def next_batch(self):
        if self.batches_taken == 2:  # after step 2's checkpoint
            raise RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...\n"
                               "RuntimeError: unable to allocate shared memory(shm) for file </torch_1_2_3>: No space "
                               "left on device (28)")
        return stream_next(self)

    monkeypatch.setattr(data.BatchStream, "next", next_batch)
    out = tmp_path / "run"
    message = expect_setup_error(run_pretrain, *base_overrides, f"output_dir={out}", "max_steps=4", "save_every=2",
                                 "eval_every=0", "data.num_workers=1",
                                 match="data.num_workers=1: the data loader's worker processes pass each batch through "
                                       "shared memory (/dev/shm: ")
    assert message.endswith(f"The last complete checkpoint, {out}/checkpoints/step_00000002, is intact. Fix: free it "
                            "(ls /dev/shm), give it more room (--shm-size=1g), or data.num_workers=0 (batches read in "
                            "this process), then run the same command with resume=true."), message
    assert data.shared_memory_exhausted(RuntimeError("some other failure"), 2) is None
    assert data.shared_memory_exhausted(RuntimeError("out of shared memory"), 0) is None  # no workers: not theirs


def test_the_memory_check_refuses_warns_or_steps_aside(base_overrides, tmp_path, monkeypatch, capsys):
    """Against the memory this process may allocate: below the weights, gradients and
    moments, refused; below the cost model's total, a warning and the run goes on;
    memory_check=false skips it."""
    from letrecipes.components import parallel

    args = [*base_overrides, "max_steps=1", "eval_every=0"]
    monkeypatch.setattr(parallel, "memory_per_process_gb", lambda device: 1e-4)
    expect_setup_error(run_pretrain, *args, f"output_dir={tmp_path / 'refused'}", match="memory: this run needs")
    run_pretrain(*args, f"output_dir={tmp_path / 'skipped'}", "memory_check=false")
    assert "memory:" not in capsys.readouterr().out
    monkeypatch.setattr(parallel, "memory_per_process_gb", lambda device: 0.05)  # above 16 bytes x 0.15M, below 1 GiB
    run_pretrain(*args, f"output_dir={tmp_path / 'warned'}")
    out = capsys.readouterr().out
    assert "warning: memory: the cost model puts this run at " in out and "it may run out of memory" in out
    assert (tmp_path / "warned" / "final").is_dir()


def test_the_memory_check_counts_a_gpu_as_the_dry_run_counts_it(monkeypatch):
    """On a GPU the run warned only above all of its free memory, where the dry run counts 90%
    (the caching allocator keeps more than tensors hold): a config the dry run called too big
    started without a word. Each GiB figure here is the check's own input."""
    from types import SimpleNamespace

    import torch

    from letrecipes.components import parallel
    from letrecipes.components.estimate import USABLE_SHARE
    from letrecipes.pretrain import PretrainRecipe

    said = []
    recipe = SimpleNamespace(cfg={}, device=torch.device("cuda"), local_processes=1, shards=1, log=said.append,
                             planned_teacher=lambda: (None, False))
    monkeypatch.setattr(parallel, "memory_per_process_gb", lambda device: 10.0)
    for total, warned in ((USABLE_SHARE * 10.0 + 0.2, True), (USABLE_SHARE * 10.0 - 0.2, False)):
        monkeypatch.setattr(PretrainRecipe, "memory_estimate", lambda *args, total=total, **kwargs: SimpleNamespace(
            optimizer_step_gb=1.0, total_gb=total, peak_phase="backward"))
        said.clear()
        PretrainRecipe.check_memory(recipe, SimpleNamespace(model_args=None))
        assert bool(said) == warned, (total, said)
    monkeypatch.setattr(PretrainRecipe, "memory_estimate", lambda *args, **kwargs: SimpleNamespace(
        optimizer_step_gb=1.0, total_gb=9.2, peak_phase="backward"))
    PretrainRecipe.check_memory(recipe, SimpleNamespace(model_args=None))
    assert "the GPU has 10.0 GiB free (90% of it counted, as the dry run counts it): it may run out" in said[0], said


def test_memory_per_process_reads_meminfo_the_cgroup_limit_and_the_processes_of_the_host(tmp_path, monkeypatch):
    import torch

    from letrecipes.components.parallel import memory_per_process_gb

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   16777216 kB\n")  # 16 GiB
    cpu = torch.device("cpu")
    assert memory_per_process_gb(cpu, 1, str(meminfo), cgroups=()) == pytest.approx(16.0)
    assert memory_per_process_gb(cpu, 4, str(meminfo), cgroups=()) == pytest.approx(4.0)
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(str(10 * 2**30))
    usage.write_text(str(2 * 2**30))
    assert memory_per_process_gb(cpu, 1, str(meminfo), cgroups=((str(limit), str(usage)),)) == pytest.approx(8.0)
    limit.write_text("max\n")  # cgroup v2 without a limit
    assert memory_per_process_gb(cpu, 2, str(meminfo), cgroups=((str(limit), str(usage)),)) == pytest.approx(8.0)
    # no /proc/meminfo (macOS): psutil's available memory, the check's figure there; without psutil, none
    import psutil

    by_psutil = memory_per_process_gb(cpu, 1, str(tmp_path / "missing"), cgroups=())
    assert by_psutil == pytest.approx(psutil.virtual_memory().available / 2**30, rel=0.2)
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert memory_per_process_gb(cpu, 1, str(tmp_path / "missing"), cgroups=()) is None


def test_a_disk_too_small_for_the_checkpoints_is_a_warning_at_the_start(base_overrides, tmp_path, monkeypatch,
                                                                       capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pretrain.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'run'}", "max_steps=2", "save_every=1",
                 "keep_last_checkpoints=1", "eval_every=0")
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: disk:"))
    assert "has 1 kB free" in warning and "(2 at a time: keep_last_checkpoints and the one being saved)" in warning
    assert out.index("warning: disk:") < out.index("step 1/2")  # at the start, not at the first save
    monkeypatch.undo()
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'roomy'}", "max_steps=1", "eval_every=0")
    assert "warning: disk:" not in capsys.readouterr().out


def test_keep_last_checkpoints_all_keeps_every_step_and_is_counted_on_the_disk(base_overrides, tmp_path, monkeypatch,
                                                                              capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pretrain.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=5", "save_every=1",  # steps 1-5: 5 saves
                 "keep_last_checkpoints=all", "eval_every=0")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in range(1, 6)]
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: disk:"))
    assert "(keep_last_checkpoints=all keeps all 5)" in warning
    with pytest.raises(SystemExit, match="keep_last_checkpoints=0 must be an integer >= 1 \\(0 would keep none.*"
                                         "Fix: set keep_last_checkpoints to an integer >= 1, or all.$"):
        run_pretrain(*base_overrides, f"output_dir={tmp_path / 'none'}", "keep_last_checkpoints=0")


UNBUFFERED_EXIT = """
import io, sys
class Writes(io.RawIOBase):  # records each write the process makes to stderr
    def writable(self):
        return True
    def write(self, data):
        with open(sys.argv[1], "a") as log:
            log.write(repr(bytes(data)) + "\\n")
        return len(data)
sys.stderr = io.TextIOWrapper(Writes(), write_through=True)  # stderr as PYTHONUNBUFFERED=1 makes it
from letrecipes._config import exit_with_line
exit_with_line("error: " + "x" * 300)
"""


def test_an_error_line_leaves_in_one_write_even_with_stderr_unbuffered(tmp_path):
    """Ranks that fail together each print the error rank 0 shared; with stderr unbuffered
    (as torchrun's children often run) Python wrote the message and its newline apart, and
    two ranks' lines ran into one (seen once in CI: `...the file.error: teacher.path: ...`)."""
    import subprocess

    log = tmp_path / "writes"
    done = subprocess.run([sys.executable, "-c", UNBUFFERED_EXIT, str(log)], capture_output=True, text=True)
    assert done.returncode == 1
    assert log.read_text(encoding="utf-8").splitlines() == [repr(("error: " + "x" * 300 + "\n").encode())]


@pytest.mark.parametrize("override, message", [
    ("alignment.layer_map={_component_:pairs,pairs:[[1,2]]}", "a space after each ':' of a mapping"),
    ("max_steps=[1,2", "close each bracket"),
    ("data.source=*.parquet", "quote the value as a string: 'data.source=\"*.parquet\"'"),
])
def test_an_override_that_is_not_yaml_is_named_with_the_fix(override, message):
    """omegaconf reads each value as YAML and raised the parser's traceback (``{a:1}``, YAML
    with no space after the colon, is no mapping; ``*`` begins an alias)."""
    with pytest.raises(SystemExit) as err:
        let_pretrain.recipe_main(["--config", "let_tiny", "max_steps=2", override])
    assert str(err.value.code).startswith(f"error: the override {override!r} is not valid YAML") and \
        message in str(err.value.code), err.value.code


def test_a_torchtune_config_or_a_folder_as_config_is_named_for_what_it_is(tmp_path):
    """`tune run` swaps `--config llama3_2/1B_full` for torchtune's own file: it was refused as
    "max_steps is missing"; a copy of it (`tune cp`) likewise; a folder was "no such file"."""
    from letrecipes._config import torchtune_config_dir

    ours = torchtune_config_dir() / "llama3_2" / "1B_full.yaml"
    copy = tmp_path / "my_llama.yaml"
    copy.write_text(ours.read_text(encoding="utf-8"))
    for config, named in ((ours, "'llama3_2/1B_full' is one of torchtune's own configs"),
                          (copy, f"{str(copy)!r} is a torchtune config")):
        with pytest.raises(SystemExit) as err:
            pretrain.recipe_main(["--config", str(config)])
        assert str(err.value.code).startswith(f"error: --config {named}, written for torchtune's") and \
            "letrecipes cp let_tiny my_run.yaml" in str(err.value.code)
    with pytest.raises(SystemExit, match="is a folder. Fix: name a YAML file in it"):
        pretrain.recipe_main(["--config", str(tmp_path)])
    # an empty --config was "'' is a folder" (the working one); a web address "no such file"; a list
    # or a number at the top level had no fix
    (tmp_path / "list.yaml").write_text("- max_steps: 3\n")
    (tmp_path / "number.yaml").write_text("5\n")
    for config, message in (("", "error: --config is empty. Fix: --config <a YAML file>, or one of: "),
                            ("https://x.org/c/let.yaml", "is a web address; a config is read from a file and a run "
                             "never downloads. Fix: fetch it first (curl -LO https://x.org/c/let.yaml) and give "
                             "let.yaml."),
                            (str(tmp_path / "list.yaml"), "list.yaml' holds a list at the top level, where a config"),
                            (str(tmp_path / "number.yaml"), "number.yaml' holds a number at the top level")):
        with pytest.raises(SystemExit) as err:
            pretrain.recipe_main(["--config", config])
        assert message in str(err.value.code), err.value.code
    assert "letrecipes cp let_tiny my_run.yaml" in str(err.value.code)


def test_an_empty_config_hydra_defaults_and_a_tokenizer_component_are_named(tmp_path, capsys):
    """Each used to end as "output_dir is missing" (or "unknown key"): a torchtune or Hydra
    habit gets the line that says what letrecipes does instead."""
    from letrecipes import cli

    empty, hydra = tmp_path / "empty.yaml", tmp_path / "hydra.yaml"
    empty.write_text("")
    hydra.write_text("defaults:\n  - let_tiny\nmax_steps: 3\n")
    for config, message in ((empty, "is empty. Fix: start from a shipped one: `letrecipes cp let_tiny"),
                            (hydra, "has `defaults:`, Hydra's composition")):
        with pytest.raises(SystemExit) as err:
            pretrain.recipe_main(["--config", str(config)])
        assert message in str(err.value.code), err.value.code
    cli.main(["cp", "let_tiny", str(empty)])  # the fix works: an empty file holds nothing to keep
    assert "max_steps" in empty.read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as err:
        cli.main(["validate", "let_tiny", "tokenizer._component_=torchtune.models.llama3.llama3_tokenizer"])
    assert "the tokenizer section builds no component here" in str(err.value.code)



def test_a_path_that_does_not_exist_is_answered_with_what_is_there(let_overrides, finished_run, corpus_dir, teacher_dir,
                                                                  tokenizer_path, tmp_path):
    """A step never saved (or rotated out), a typo in a file or folder name: the error says
    what does exist where the path points, so the fix is not a search."""
    from letrecipes import cli

    steps = finished_run / "checkpoints"
    run = [*let_overrides, f"output_dir={tmp_path / 'new'}"]
    expect_setup_error(run_pretrain, *run, f"output_dir={finished_run}", f"resume={steps / 'step_00000009'}",
                       match=f"no such checkpoint folder. {steps} holds 2 step checkpoint(s): step_00000001, "
                             "step_00000002 (the newest last). Fix: ")
    with pytest.raises(SystemExit, match=r"step_00000009' is not there: never saved, or removed by its run \(.*"
                                         r"Fix: read one it keeps \('.*step_00000001', '.*step_00000002'\)"):
        cli.main(["export", str(steps / "step_00000009"), str(tmp_path / "hf")])
    typo = corpus_dir.parent / (corpus_dir.name + "s")  # the folder's name, one letter off
    expect_setup_error(run_pretrain, *run, f"data.source={typo}", match=f"Close by in {corpus_dir.parent}: "
                                                                         f"'{corpus_dir}'")
    expect_setup_error(run_let, *run, f"teacher.path={teacher_dir.with_name(teacher_dir.name + 'l')}",
                       match=f"Close by in {teacher_dir.parent}: '{teacher_dir}'")
    expect_setup_error(run_pretrain, *run, f"tokenizer.path={tokenizer_path.with_suffix('.jsn')}",
                       match=f"Close by in {tokenizer_path.parent}: '{tokenizer_path}'")
    expect_setup_error(run_pretrain, *run, f"data.source={tmp_path / 'no' / 'such' / 'corpus'}",
                       match=f"{tmp_path / 'no'} does not exist ({tmp_path} does). Fix: ")
    assert not (tmp_path / "new").exists()
    # a symbolic link to nowhere (a scratch folder not mounted, a model moved): said as one, where it was
    # "close by" itself, or "a file is where the folder should be" for an output folder
    for name, target in (("corpus_link", "gone_corpus"), ("out_link", "gone_out")):
        (tmp_path / name).symlink_to(tmp_path / target)
    link = f"{tmp_path / 'corpus_link'} is a symbolic link to {tmp_path / 'gone_corpus'}, which does not exist."
    expect_setup_error(run_pretrain, *run, f"data.source={tmp_path / 'corpus_link'}", match=link)
    expect_setup_error(run_pretrain, *run, f"output_dir={tmp_path / 'out_link' / 'run'}", match=(
        f"{tmp_path / 'out_link'} is a symbolic link to {tmp_path / 'gone_out'}, which does not exist. Fix: create "
        f"what it points to (mkdir -p {tmp_path / 'gone_out'}) or point it at another folder"))


def test_a_pipe_or_a_device_where_a_file_or_folder_is_read_is_named_as_one(let_overrides, tmp_path):
    """bash's <(zstdcat corpus.zst) is a pipe (/dev/fd/63): data.source took it for a folder
    that "holds none of the formats read", tokenizer.path for a folder without a tokenizer.json."""
    import os

    pipe = tmp_path / "stream"
    os.mkfifo(pipe)
    run = [*let_overrides, f"output_dir={tmp_path / 'new'}"]
    expect_setup_error(run_pretrain, *run, f"data.source={pipe}",
                       match=f"data.source: '{pipe}' is a pipe (FIFO), not a file or a folder: a corpus is read more "
                             "than once")
    expect_setup_error(run_pretrain, *run, f"tokenizer.path={pipe}",
                       match=f"tokenizer.path: '{pipe}' is a pipe (FIFO), not a file or a folder. Fix: ")
    expect_setup_error(run_let, *run, "teacher.path=/dev/null",
                       match="teacher.path: '/dev/null' is a character device, not a file or a folder. Fix: ")
    assert not (tmp_path / "new").exists()
    # inside a corpus folder, one named like a corpus file: left out, but said (it was left out silently)
    from letrecipes.components.corpus import source_files

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("some text")
    os.mkfifo(folder / "b.jsonl")
    with pytest.warns(DataWarning, match=r"1 file\(s\) in '.*corpus' are not read \(1 \(pipes, sockets, devices\); "
                      r"first: b.jsonl\)"):
        assert source_files(folder) == [folder / "a.txt"]


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4512345\n")


@pytest.mark.parametrize("stand_in", ["model.safetensors", "tokenizer.json"])
def test_a_git_lfs_pointer_in_place_of_a_teacher_file_is_named_as_one(let_overrides, teacher_dir, tmp_path, stand_in):
    """A Hub repository cloned without Git LFS holds 130-byte pointers where its weights
    should be: said as such, with `git lfs pull` (it was "header too large"), before the
    corpus is prepared; the same through init_from and `letrecipes export`."""
    from letrecipes.components.export import export_any
    from letrecipes.components.teachers import TeacherError

    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (clone / name).write_bytes(LFS_POINTER if name == stand_in else (teacher_dir / name).read_bytes())
    lfs = "is a Git LFS pointer (132 bytes for a file of 4,512,345 bytes), not a "
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"teacher.path={clone}",
                       f"data.cache_dir={tmp_path / 'cache'}", match=lfs)
    assert not (tmp_path / "cache").exists()
    if stand_in == "model.safetensors":
        message = expect_setup_error(run_pretrain, *let_overrides, f"output_dir={tmp_path / 'run2'}",
                                     f"init_from={clone}", "model.num_layers=2", "model.embed_dim=24",
                                     "model.num_heads=2", "model.intermediate_dim=48", match=lfs + "safetensors file")
        assert message.startswith("error: init_from: ") and "git lfs pull" in message, message
        with pytest.raises(TeacherError, match=r"^export: .*" + lfs.replace("(", r"\(").replace(")", r"\)")):
            export_any(clone, tmp_path / "exported")


def test_stand_ins_for_corpus_files_are_named_not_read(tmp_path):
    """Pointers (a dataset cloned without Git LFS) and saved error pages (HTML, S3's XML)
    under a corpus file's name: one error naming what the file is, never read as text or
    called "not valid JSON" / "magic bytes not found". A page named .html stays markup,
    read as text with its warning."""
    from letrecipes.components.corpus import DataError, read_documents

    page = b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n"
    s3 = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>\n'
    cases = {"train-00000-of-00001.parquet": (LFS_POINTER, "parquet"), "c4.jsonl": (LFS_POINTER, "JSON"),
             "notes.txt": (LFS_POINTER, "text"), "data.arrow": (LFS_POINTER, "arrow"),
             "c4.jsonl.gz": (page, "web page"), "x.parquet": (page, "web page"), "rows.csv": (s3, "web page")}
    for name, (data, said) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match="Git LFS pointer .*git lfs pull" if data == LFS_POINTER else
                           r"is a web page \(HTML or XML\), not a .*download it again") as err:
            list(read_documents(tmp_path / name))
        assert said.lower() in str(err.value).lower() and name in str(err.value), str(err.value)
    (tmp_path / "page.html").write_bytes(page)
    with pytest.warns(DataWarning, match="markup"):
        assert "404 Not Found" in "".join(read_documents(tmp_path / "page.html"))


def test_a_git_lfs_pointer_in_place_of_a_gguf_teacher(tmp_path):
    from letrecipes.components.teachers import TeacherError, load_teacher

    (tmp_path / "model.gguf").write_bytes(LFS_POINTER)
    with pytest.raises(TeacherError, match=r"^teacher.path: .*model.gguf' is a Git LFS pointer .*not a GGUF file"):
        load_teacher({"_component_": "auto", "path": str(tmp_path / "model.gguf")})


def test_a_torch_loss_trains_as_the_built_in_of_its_formula_and_one_of_three_inputs_is_refused_first(
        let_overrides, tmp_path):
    """alignment.loss=torch.nn.MSELoss stopped at the rehearsal (the recipe also gives a mask);
    it now trains step for step as alignment.loss=mse. CosineEmbeddingLoss (a third input,
    its +1/-1 target) is refused before the corpus is prepared, by `letrecipes validate` too."""
    common = [*let_overrides, "max_steps=3", "alignment.schedule._component_=linear", "alignment.schedule.stop=3"]
    losses = {}
    for name in ("mse", "torch.nn.MSELoss"):
        run_let(*common, f"output_dir={tmp_path / name}", f"alignment.loss={name}")
        losses[name] = [r[k] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r
                        for k in ("loss", "nll")]
    assert len(losses["mse"]) == 6 and losses["torch.nn.MSELoss"] == pytest.approx(losses["mse"], rel=1e-6)
    cache = tmp_path / "cache"
    expect_setup_error(run_let, *common, f"output_dir={tmp_path / 'three'}", f"data.cache_dir={cache}",
                       "alignment.loss=torch.nn.CosineEmbeddingLoss",
                       match="alignment.loss=torch.nn.CosineEmbeddingLoss takes (input1, input2, target)")
    assert not cache.exists() and not (tmp_path / "three").exists()
    from letrecipes._config import load_config
    from letrecipes._schema import validate
    from letrecipes.components.registry import ComponentError

    with pytest.raises(ComponentError, match="CosineEmbeddingLoss takes"):
        validate(load_config("let_tiny", ["alignment.loss=torch.nn.CosineEmbeddingLoss"]))


def test_a_model_builder_of_ones_own_must_build_the_projects_decoder(base_overrides, tmp_path, monkeypatch):
    """A builder returning an nn.Sequential ended in "AttributeError: 'Sequential' object has no
    attribute 'tok_embeddings'" (a traceback); one that wraps llama_model trains."""
    (tmp_path / "my_students.py").write_text(
        "from torch import nn\n"
        "from letrecipes.components.models import llama_model\n\n"
        "def sequential(vocab_size, max_seq_len, **shape):\n"
        "    return nn.Sequential(nn.Embedding(vocab_size, 32), nn.Linear(32, vocab_size))\n\n"
        "def bare_decoder(vocab_size, max_seq_len, **shape):\n"
        "    model = llama_model(vocab_size=vocab_size, max_seq_len=max_seq_len, **shape)\n"
        "    del model.model_args\n"
        "    return model\n\n"
        "def wrapped(vocab_size, max_seq_len, **shape):\n"
        "    return llama_model(vocab_size=vocab_size, max_seq_len=max_seq_len, **shape)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = tmp_path / "cache"
    for builder, built in (("sequential", "a Sequential;"), ("bare_decoder", "a TransformerDecoder without model_args;")):
        expect_setup_error(run_pretrain, *base_overrides, "imports=[my_students]", f"model=my_students.{builder}",
                           f"output_dir={tmp_path / builder}", f"data.cache_dir={cache}", "max_steps=2",
                           match=f"model._component_=my_students.{builder} built {built} a student is the decoder")
    assert not cache.exists()
    run_pretrain(*base_overrides, "imports=[my_students]", "model=my_students.wrapped",
                 f"output_dir={tmp_path / 'wrapped'}", "max_steps=2")
    assert (tmp_path / "wrapped" / "final" / "config.json").is_file()


def test_null_for_a_section_key_that_takes_no_null_is_named_before_any_work(base_overrides, tmp_path):
    """`activation_checkpointing.every=null` (found by the config fuzzer), `data.num_workers=null`,
    `export.max_shard_mb=null` and eight more were int(None) tracebacks: a section's null
    skipped its check, and the code read it as a value. Every such key is now one line."""
    from letrecipes._config import load_config
    from letrecipes._schema import SECTION, SECTIONS, TEACHER, ConfigValueError, _takes_null, validate

    keys = [f"{section}.{key}" for section, spec in {**SECTIONS, "teacher": TEACHER}.items() if section != "tokenizer"
            for key, value in spec.items() if value is not SECTION and not _takes_null(value) and key != "path"]
    assert len(keys) > 30 and "data.source" not in keys  # null there is "data.sources names the data"
    for key in keys:
        with pytest.raises(ConfigValueError, match=rf"config key {re.escape(key)} is null, and it takes .* Fix: "
                                                   rf"remove it for its default \(~{re.escape(key)} on the command"):
            validate(load_config("let_tiny", [f"{key}=null"]))
    cache = tmp_path / "cache"
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                       "activation_checkpointing.every=null", match="activation_checkpointing.every is null")
    assert not cache.exists() and not (tmp_path / "run").exists()
