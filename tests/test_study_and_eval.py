"""Issue 5's machinery: evaluation through lm-evaluation-harness, the eval recipe, logit KD, speedups and
the study runner's plumbing (a two-arm suite of a few steps; the full suites are not run here)."""

import json
import math
import re

import pytest
import torch

from benchmarks import let_study
from letrecipes.components.alignment import LogitKL
from letrecipes.components.evaluation import (EvalError, Item, read_task, run_lm_eval, write_lm_eval_tasks,
                                              write_task)
from letrecipes.components.metrics import read_metrics
from letrecipes import eval as eval_recipe
from letrecipes import let_pretrain
from tests.test_recipes import expect_setup_error

TINY = ["model.num_layers=2", "model.embed_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_dim=64"]


# ----------------------------------------------------------------- lm-eval
def test_lm_eval_scores_are_the_project_models_own_loglikelihoods(teacher_dir, tmp_path, monkeypatch, capfd):
    """The whole chain (task YAML -> lm-eval's hf model on the export) against a direct
    computation with the project's own model on the same weights. Run outside a git
    checkout: lm-eval's own provenance step printed git's "fatal: not a git repository"."""
    import lm_eval.evaluator

    from letrecipes.components.teachers import load_teacher
    from letrecipes.components.tokenizer import Tokenizer

    items = [Item("To be, or not to", [" be", " cheese", " see"], 0), Item("", ["Thou art.", "Art thou."], 1),
             Item("My lord,", [" I", " the king is dead"], 0)]
    task = write_task(tmp_path / "hand_made.jsonl", items)
    names = write_lm_eval_tasks([task], tmp_path / "tasks")
    assert names == {"hand_made": "letrecipes_hand_made"}
    provenance = (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info)
    monkeypatch.chdir(tmp_path)
    report = run_lm_eval(teacher_dir, tmp_path / "tasks", names, log_samples=True)
    assert "not a git repository" not in capfd.readouterr().err
    assert (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info) == provenance  # handed back

    teacher = load_teacher({"_component_": "auto", "path": str(teacher_dir), "dtype": "fp32"})
    tokenizer = Tokenizer(teacher.tokenizer_path)

    def loglikelihood(context: str, choice: str) -> float:
        # lm-eval's split: the continuation is what the whole text adds to the context's tokens
        whole = tokenizer.encode(context + choice)
        context_ids = tokenizer.encode(context) if context else [tokenizer.eos_id]
        continuation = whole[len(context_ids):] if context else tokenizer.encode(choice)
        ids = torch.tensor([context_ids + continuation])
        logp = torch.log_softmax(teacher.logits(ids[:, :-1]).float(), -1)[0]
        positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
        return logp[positions, ids[0, len(context_ids):]].sum().item()

    samples = sorted(report["samples"]["hand_made"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(items)
    right = 0
    for item, sample in zip(items, samples):
        ours = [loglikelihood(item.context, choice) for choice in item.choices]
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        right += int(max(range(len(ours)), key=ours.__getitem__) == item.gold)
    scores = report["tasks"]["hand_made"]
    assert scores["n"] == 3 and scores["acc"] == pytest.approx(right / 3)
    p = right / 3  # lm-eval's closed-form standard error of a mean of 0/1 outcomes
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 2), abs=1e-9)
    assert 0 <= scores["acc_norm"] <= 1


def test_the_lm_eval_command_scores_an_export_offline(teacher_dir, tmp_path):
    """The documented command: `lm_eval --model hf --model_args pretrained=<export>
    --include_path <tasks> --tasks letrecipes`, with the hub switched off."""
    import os
    import subprocess
    import sys

    task = write_task(tmp_path / "hand_made.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 2)
    write_lm_eval_tasks([task], tmp_path / "tasks")
    # lm-eval prints its table's arrows to stdout: under a locale that is not UTF-8, a traceback of its own
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={teacher_dir},dtype=float32", "--include_path", str(tmp_path / "tasks"),
                           "--tasks", "letrecipes", "--device", "cpu", "--batch_size", "4",
                           "--output_path", str(tmp_path / "out")], env=env, capture_output=True, encoding="utf-8",
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = list((tmp_path / "out").rglob("results*.json"))
    scores = json.loads(results.read_text(encoding="utf-8"))["results"]["letrecipes_hand_made"]
    assert scores["acc,none"] in (0.0, 1.0)  # two copies of one item: both right or both wrong


def test_lm_eval_task_folder_serves_the_lm_eval_command_line(tmp_path):
    """`lm_eval --include_path <folder> --tasks letrecipes` finds every task of the folder."""
    from lm_eval.tasks import TaskManager

    files = [write_task(tmp_path / f"{n}.jsonl", [Item("a", [" b", " c"], 0)]) for n in ("one", "two-2")]
    names = write_lm_eval_tasks(files, tmp_path / "tasks")
    assert names == {"one": "letrecipes_one", "two-2": "letrecipes_two_2"}
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    assert set(names.values()) <= set(manager.all_tasks) and "letrecipes" in manager.all_tags
    with pytest.raises(EvalError, match="two tasks here are named .one."):
        write_lm_eval_tasks([files[0], tmp_path / "sub" / "one.jsonl"], tmp_path / "tasks2")


def test_items_whose_right_choice_appears_twice_are_named_before_scoring(tmp_path):
    """Equal choices score alike and the argmax takes the earlier one: such items were counted
    right (gold first) or wrong (gold later) by position alone, without a word."""
    from letrecipes.components.evaluation import prepare_tasks

    task = write_task(tmp_path / "dup.jsonl", [Item("a", [" b", " c"], 0), Item("a", [" b", " c", " b"], 2),
                                               Item("a", [" b", " b", " c"], 2)])
    said = []
    prepare_tasks([str(task)], {}, 0, tmp_path / "work", log=said.append)
    assert said == [f"warning: {task}: 1 of 3 item(s) hold the right choice twice or more (the first: item 2): equal "
                    "choices score alike and the tie goes to the earlier one, so these items are right or wrong by "
                    "position, not by the model. Fix: remove or correct those items."], said


def test_task_files_round_trip_and_bad_ones_are_named(tmp_path):
    path = write_task(tmp_path / "t.jsonl", [Item("c", ["x", "y"], 1)])
    assert read_task(path)[0] == Item("c", ["x", "y"], 1)
    (tmp_path / "bad.jsonl").write_text('{"context": "c", "choices": ["only one"], "gold": 0}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:1: 1 choice\(s\) and gold=0: an item needs at least 2 choices"):
        read_task(tmp_path / "bad.jsonl")
    (tmp_path / "other.jsonl").write_text('{"question": "q", "answers": ["a", "b"], "label": 0}\n')
    with pytest.raises(EvalError, match=r"other.jsonl:1: not a task item: no context, choices, gold \(its fields are "
                                        r"\['question', 'answers', 'label'\]\)\. Fix: one JSON object per line"):
        read_task(tmp_path / "other.jsonl")
    (tmp_path / "text.jsonl").write_text("a question?\n")
    with pytest.raises(EvalError, match=r"text.jsonl:1: not valid JSON .*Fix: one JSON object per line"):
        read_task(tmp_path / "text.jsonl")
    with pytest.raises(EvalError, match="fetch_eval_tasks"):
        read_task(tmp_path / "missing.jsonl")
    for gold in ("true", "0.5"):  # int() would read them as 1 and 0
        (tmp_path / "gold.jsonl").write_text(f'{{"context": "c", "choices": ["x", "y"], "gold": {gold}}}\n')
        with pytest.raises(EvalError, match=rf"gold.jsonl:1: gold={'True' if gold == 'true' else gold} is not the "
                                            "index of a choice"):
            read_task(tmp_path / "gold.jsonl")
    for field, said in (('"context": null', "context is null, not text"),
                        ('"context": {"text": "c"}', 'context is {"text": "c"}, not text')):
        (tmp_path / "null.jsonl").write_text(f'{{{field}, "choices": ["x", "y"], "gold": 1}}\n')
        with pytest.raises(EvalError, match=re.escape(f"null.jsonl:1: {said}")):  # it was scored as "None"
            read_task(tmp_path / "null.jsonl")
    (tmp_path / "num.jsonl").write_text('{"context": "2 + 2 =", "choices": [4, 5], "gold": 0}\n')
    assert read_task(tmp_path / "num.jsonl") == [Item("2 + 2 =", ["4", "5"], 0)]  # numbers are their digits
    (tmp_path / "num.jsonl").write_text('{"context": "c", "choices": ["x", null], "gold": 0}\n')
    with pytest.raises(EvalError, match=re.escape("num.jsonl:1: choices[1] is null, not text")):
        read_task(tmp_path / "num.jsonl")
    # as a Windows editor or Excel saves it: a byte-order mark and CRLF line ends are read; Latin-1 is named
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"context": "c", "choices": ["x", "y"], "gold": 1}\r\n')
    assert read_task(tmp_path / "bom.jsonl") == [Item("c", ["x", "y"], 1)]
    (tmp_path / "latin.jsonl").write_bytes(b'{"context": "c", "choices": ["x", "y"], "gold": 1}\n'
                                           b'{"context": "caf\xe9", "choices": ["x", "y"], "gold": 1}\n')
    with pytest.raises(EvalError, match=r"latin.jsonl:2: not UTF-8 \(invalid continuation byte at byte 67\)\. Fix: "
                                        r"save the file as UTF-8"):
        read_task(tmp_path / "latin.jsonl")
    # lm-eval's own tasks are read by name elsewhere (tests/test_lm_eval_tasks.py); a file that is not there says so
    with pytest.raises(EvalError, match=r"eval task file 'hellaswag' does not exist.* or name one of lm-eval's own"):
        read_task("hellaswag")


def test_a_choice_lm_eval_could_not_score_is_named_before_the_scoring(teacher_dir, tmp_path, capsys):
    """Choices are scored as written after the context: one without its leading space can
    tokenize into the context's last token and leave lm-eval nothing to score (a bare
    AssertionError from lm-eval, after the conversion). Named here, with the file and item;
    `"choices": "x y"` (a string: scored as its characters) is refused when read."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731 - as lm-eval encodes
    context, choice = next((c[:-1], c[-1]) for c in ("To be, or not to", "the king", "my lord", "and the")
                           if len(encode(c)) == len(encode(c[:-1])))
    task = write_task(tmp_path / "glued.jsonl", [Item("A fine day", [" yes", " no"], 0), Item(context, [choice, " x"], 0)])
    with pytest.raises(SystemExit) as err:
        eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{task}]", "contamination=null"])
    message = str(err.value.code)
    assert f"glued.jsonl: item 2: the choice {choice!r} has no token of its own after the context" in message, message
    assert "Fix: begin each choice with the space" in message and "Traceback" not in capsys.readouterr().err
    (tmp_path / "letters.jsonl").write_text('{"context": "c", "choices": "x y", "gold": 0}\n')
    with pytest.raises(EvalError, match=r"letters.jsonl:1: choices is a JSON str, not a list of the choices"):
        read_task(tmp_path / "letters.jsonl")


# ----------------------------------------------------------------- logit KD
def test_logit_kl_is_zero_only_for_equal_distributions():
    loss = LogitKL()
    a = torch.randn(2, 5, 11)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(a, a + 3.0).item() == pytest.approx(0.0, abs=1e-5)  # a shift is the same distribution
    assert loss(a, torch.randn(2, 5, 11)).item() > 0.01
    assert loss.target == "logits"


def test_rkd_arm_runs_through_the_let_recipe(let_overrides, tmp_path):
    let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={tmp_path}", "max_steps=4",
                              "alignment.loss=kl_logits", "alignment.schedule._component_=step",
                              "alignment.schedule.lambda0=0.5", "alignment.schedule.stop=2"])
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["lambda"] for r in records] == [0.5, 0.5, 0.0, 0.0]
    assert records[0]["align_loss"] > 0 and "cosine" not in records[0]
    assert records[0]["loss"] == pytest.approx(records[0]["nll"] + 0.5 * records[0]["align_loss"], rel=1e-5)


# ----------------------------------------------------------------- eval recipe
def test_eval_recipe_on_an_export_and_on_a_step_checkpoint(base_overrides, teacher_dir, tmp_path):
    from letrecipes import pretrain

    task = write_task(tmp_path / "tiny_task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 3)
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{task}]",
                             f"output={tmp_path / 'export.json'}"])
    report = json.loads((tmp_path / "export.json").read_text(encoding="utf-8"))
    assert report["tasks"]["tiny_task"]["n"] == 3 and report["tasks"]["tiny_task"]["chance"] == 0.5
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, *TINY, f"output_dir={tmp_path / 'run'}",
                          "max_steps=2", "save_every=1", "export.dtype=fp32"])
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={step}", f"tasks=[{task}]",
                             f"output={tmp_path / 'step.json'}"])
    from_step = json.loads((tmp_path / "step.json").read_text(encoding="utf-8"))
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={tmp_path / 'run' / 'final'}", f"tasks=[{task}]",
                             f"output={tmp_path / 'final.json'}"])
    from_final = json.loads((tmp_path / "final.json").read_text(encoding="utf-8"))
    assert from_step["step"] == 2
    # the step-2 checkpoint and the final export are the same weights: the same scores
    assert from_step["tasks"]["tiny_task"]["acc"] == from_final["tasks"]["tiny_task"]["acc"]


def test_eval_scores_the_items_it_checked_and_one_item_has_no_stderr(teacher_dir, tmp_path, capsys):
    """lm-eval used to read the task file itself: `"gold": "1"` passed the check as index 1 and
    was then compared as a string, scoring every item wrong without a word. A task of one
    item (lm-eval's stderr "N/A") ended the recipe in a ValueError after the scoring."""
    items = [("To be, or not to", [" be", " cheese"], 0), ("To be, or not to", [" cheese", " be"], 1)]
    as_ints = tmp_path / "as_ints.jsonl"
    as_ints.write_text("".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in items))
    as_strings = tmp_path / "as_strings.jsonl"
    as_strings.write_text("".join(json.dumps({"context": c, "choices": ch, "gold": str(g)}) + "\n"
                                  for c, ch, g in items))
    one = write_task(tmp_path / "one.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)])
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{as_ints},{as_strings},{one}]",
                             f"output={tmp_path / 'scores.json'}"])
    tasks = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))["tasks"]
    assert tasks["as_strings"]["acc"] == tasks["as_ints"]["acc"] and tasks["as_strings"]["n"] == 2
    assert tasks["one"]["n"] == 1 and tasks["one"]["acc_stderr"] is None
    assert "acc_norm" in capsys.readouterr().out.split("one ")[-1]


@pytest.mark.parametrize("make, named", [
    (lambda tmp: tmp / "missing", "checkpoint: nothing at"),
    (lambda tmp: (tmp / "run" / "checkpoints" / "step_00000004").mkdir(parents=True) or
     tmp / "run" / "checkpoints" / "step_00000004", "config.yaml"),
])
def test_eval_recipe_names_a_bad_checkpoint_in_one_line(make, named, tmp_path):
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("a", [" b", " c"], 0)])
    out = tmp_path / "scores" / "tiny" / "out.json"  # folders the output would have been written in
    message = expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={make(tmp_path)}",
                                                           f"tasks=[{task}]", f"output={out}"],
                                 match=named)
    assert message.startswith("error: checkpoint: ")
    assert not (tmp_path / "scores").exists()  # a failed start leaves no empty folder behind


def test_eval_names_a_checkpoint_that_is_not_there_before_reading_the_tasks(tmp_path):
    """Many tasks or much held-out text take minutes to read: the checkpoint was found missing only after them."""
    expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={tmp_path / 'run' / 'final'}",
                                                 f"tasks=[{tmp_path / 'not_fetched.jsonl'}]"],
                       match="checkpoint: nothing at")


def test_an_lm_eval_older_than_the_recipe_reads_is_one_line_before_any_model(teacher_dir, tmp_path, monkeypatch):
    """lm-eval 0.4.9 has no lm_eval.tasks._yaml_loader (a ModuleNotFoundError traceback from the
    task check); with 0.4.12 the `lm_eval` command found no task in the folder this recipe writes."""
    import importlib.metadata

    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.12" if name == "lm-eval" else installed(name))
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("a", [" b", " c"], 0)])
    expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{task}]",
                                                 f"output={tmp_path / 'out.json'}"],
                       match="evaluation (lm-evaluation-harness's task index, the task files it writes) needs lm-eval "
                             "0.4.13 or later; 0.4.12 is installed. Fix: pip install 'lm-eval>=0.4.13'")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("edit, said", [
    (lambda c: {**c, "num_attention_heads": str(c["num_attention_heads"])},
     r"config.json' does not load in transformers \(StrictDataclassFieldValidationError: .*num_attention_heads"),
    (lambda c: {**c, "hidden_act": "silux"}, r"config.json' does not build a model in transformers \(KeyError"),
    (lambda c: {**c, "intermediate_size": c["intermediate_size"] + 64},
     r"tensor 'model.layers.0.mlp.down_proj.weight' in '.*model.safetensors' has shape \(\d+, \d+\), but "
     r"'.*config.json' gives it \(\d+, \d+\): the config and the weights are of different models"),
], ids=["a-count-as-text", "no-such-activation", "other-weights"])
def test_a_model_folder_whose_config_transformers_cannot_use_is_one_line_before_the_scoring(teacher_dir, tmp_path,
                                                                                           edit, said):
    """A Hugging Face folder is scored as transformers loads it: a config.json it cannot
    read or build from, or one that does not fit the weights, was transformers' traceback
    (or its mismatch report) from inside lm-eval's model loading."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(teacher_dir, folder)
    (folder / "config.json").write_text(json.dumps(edit(json.loads((folder / "config.json").read_text()))))
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("a", [" b", " c"], 0)])
    message = expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={folder}",
                                                           f"tasks=[{task}]", "contamination=null"], match="")
    assert message.startswith("error: checkpoint: ") and re.search(said, message) and "Fix: use the config.json" in message


@pytest.mark.skipif(__import__("importlib").util.find_spec("optimum") is not None, reason="optimum loads GPTQ")
def test_a_quantized_model_transformers_cannot_load_here_is_one_line_before_the_scoring(teacher_dir, tmp_path):
    """A GPTQ folder was lm-eval's ImportError traceback from inside its model loading."""
    import shutil

    folder = tmp_path / "model-gptq"
    shutil.copytree(teacher_dir, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                      "bits": 4}}))
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("a", [" b", " c"], 0)])
    message = expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={folder}",
                                                           f"tasks=[{task}]", "contamination=null"],
                                 match="holds a quantized model (gptq, 4 bits), and transformers cannot load it "
                                       "here: Loading a GPTQ quantized model requires optimum")
    assert message.startswith("error: checkpoint: ") and "score the full-precision model" in message


def test_eval_recipe_checks_its_output_path_before_scoring(teacher_dir, tmp_path, monkeypatch):
    """Before: a folder or an unwritable path as `output` was a traceback after the scoring."""
    import letrecipes.eval as eval_module

    def never(*args, **kwargs):
        raise AssertionError("scored before the output path was checked")

    monkeypatch.setattr(eval_module, "run_lm_eval", never)
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("a", [" b", " c"], 0)])
    common = ["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{task}]"]
    expect_setup_error(eval_recipe.recipe_main, [*common, f"output={tmp_path}"],
                       match=f"error: output: '{tmp_path}' is a folder; output names the JSON file to write. "
                             f"Fix: output={tmp_path / 'scores.json'}.")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    expect_setup_error(eval_recipe.recipe_main, [*common, f"output={a_file / 'scores.json'}"],
                       match="error: output=")
    assert a_file.read_text(encoding="utf-8") == "mine"
    # a file there already: another checkpoint's scores, or no score report, are kept unless overwrite=true
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"checkpoint": "runs/a/checkpoints/step_00000150", "scorer": "lm-evaluation-harness",
                                  "tasks": {}}))
    kept = scores.read_text(encoding="utf-8")
    expect_setup_error(eval_recipe.recipe_main, [*common, f"output={scores}"],
                       match=f"error: output: '{scores}' holds the scores of another checkpoint "
                             "(runs/a/checkpoints/step_00000150). Fix: output=<another file>, or overwrite=true to "
                             "replace it.")
    expect_setup_error(eval_recipe.recipe_main, [*common, f"output={a_file}"],
                       match="is there and is not a score report of this recipe")
    assert scores.read_text(encoding="utf-8") == kept and a_file.read_text(encoding="utf-8") == "mine"
    # the same checkpoint again (a requeued job), or overwrite=true, goes on to the scoring
    for replaceable in ([f"output={scores}", "overwrite=true"], [f"output={a_file}", "overwrite=true"]):
        with pytest.raises(AssertionError, match="scored before"):
            eval_recipe.recipe_main([*common, *replaceable])
    scores.write_text(json.dumps({"checkpoint": str(teacher_dir), "scorer": "lm-evaluation-harness", "tasks": {}}))
    with pytest.raises(AssertionError, match="scored before"):
        eval_recipe.recipe_main([*common, f"output={scores}"])
    # another evaluation writing the same output (before: each replaced the other's scores, the last one kept)
    from letrecipes.components.run_lock import RunLock

    lock = RunLock(tmp_path, lock_file=tmp_path / ".scores.json.lock").acquire(log=lambda line: None)
    try:
        expect_setup_error(eval_recipe.recipe_main, [*common, f"output={scores}"],
                           match=f"output={str(scores)!r} is being written by another evaluation: pid ")
    finally:
        lock.release()
    with pytest.raises(AssertionError, match="scored before"):
        eval_recipe.recipe_main([*common, f"output={scores}"])
    assert not (tmp_path / ".scores.json.lock").exists()  # handed back when the evaluation ends, even by an error


# ----------------------------------------------------------------- study
def test_speedup_on_synthetic_curves():
    assert let_study.steps_to_reach([(10, 5.0), (20, 4.0), (30, 3.0)], 3.5) == pytest.approx(25.0)
    assert let_study.steps_to_reach([(10, 5.0), (20, 4.0)], 3.0) is None
    baseline = [{"step": s, "val_loss": 6 - s / 100, "train_time_s": s * 1.0} for s in (100, 200, 300, 400)]
    arm = [{"step": s, "val_loss": 6 - s / 50, "train_time_s": s * 1.5} for s in (100, 200, 300, 400)]
    result = let_study.speedups(baseline, arm)  # baseline ends at 2.0, reached by the arm at step 200
    assert result["speedup_steps"] == pytest.approx(2.0) and result["speedup_tokens"] == pytest.approx(2.0)
    assert result["speedup_wall_clock"] == pytest.approx(400 / 300)  # its steps cost 1.5x
    assert let_study.fmt([2.0, None]) == "not reached (1/2)" and let_study.fmt([1.0, 2.0]) == "1.50 [1.00, 2.00]"


def test_two_arm_suite_writes_json_tables_plots_and_skips_finished_runs(corpus_dir, tokenizer_path, tmp_path):
    tasks = tmp_path / "tasks"
    write_task(tasks / "hand_made.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 4)
    scale = {"teacher_steps": 6, "regime_steps": {"short": 4}, "student": TINY, "seq_len": 32, "batch_size": 4,
             "teacher": ["model.num_layers=1", "model.embed_dim=16", "model.num_heads=2", "model.num_kv_heads=1",
                         "model.intermediate_dim=32"]}
    args = ["--suite", "smoke", "--out", str(tmp_path / "study"), "--corpus", str(corpus_dir), "--tokenizer",
            str(tokenizer_path), "--tasks", str(tasks), "--plot-dir", str(tmp_path / "plots"), "--scale",
            json.dumps(scale)]
    assert let_study.main(args) == 0
    report = json.loads((tmp_path / "study" / "study_smoke.json").read_text(encoding="utf-8"))
    arms = report["regimes"]["short"]["arms"]
    assert set(arms) == {"baseline", "let"}
    assert arms["baseline"][0]["speedup_steps"] == pytest.approx(1.0)
    assert set(arms["let"][0]["accuracy"]) == {"hand_made", "cloze_heldout"}
    assert sorted(arms["let"][0]["accuracy_by_step"]) == ["1", "2", "3", "4"]  # eval at every checkpoint
    assert (tmp_path / "plots" / "study_smoke_short.png").stat().st_size > 10_000
    assert "| let | 1 |" in (tmp_path / "study" / "study_smoke.md").read_text(encoding="utf-8")
    final = tmp_path / "study" / "runs" / "short" / "seed0" / "let" / "final" / "model.safetensors"
    written = final.stat().st_mtime_ns
    assert let_study.main(args) == 0  # everything finished: nothing is trained again
    assert final.stat().st_mtime_ns == written
    # the teacher trained anew (its steps changed): the LET arm is run again, the baseline is not
    baseline = tmp_path / "study" / "runs" / "short" / "seed0" / "baseline" / "final" / "model.safetensors"
    baseline_written = baseline.stat().st_mtime_ns
    assert let_study.main([*args[:-1], json.dumps({**scale, "teacher_steps": 5})]) == 0
    assert final.stat().st_mtime_ns != written and baseline.stat().st_mtime_ns == baseline_written
    assert arms["let"][0]["lambda0_equivalent"] > 0 and arms["baseline"][0]["lambda0_equivalent"] is None


def test_alignment_summary_gives_the_linear_lambda0_of_the_same_area():
    records = [{"step": s, "loss": 1.0, "lambda": 3.0 * max(0.0, 1 - s / 100), "cosine": s / 200} for s in range(200)]
    summary = let_study.alignment_summary(records)
    assert summary["lambda0_equivalent"] == pytest.approx(3.0, rel=0.02)
    assert summary["cosine_end"] == pytest.approx(99 / 200)
    assert let_study.alignment_summary([{"step": 1, "loss": 1.0}])["lambda0_equivalent"] is None


def test_a_suite_without_scoring_trains_its_arms_for_their_seeds_only(corpus_dir, tokenizer_path, tmp_path,
                                                                      monkeypatch):
    arms = [let_study.BASELINE, let_study.replace(let_study.LET_ARM, seeds=(1,))]
    monkeypatch.setitem(let_study.SUITES, "unscored", {"regimes": ["short"], "seeds": [0, 1], "evaluate": False,
                                                       "arms": arms})
    scale = {"teacher_steps": 4, "regime_steps": {"short": 3}, "student": TINY, "seq_len": 32, "batch_size": 4,
             "teacher": ["model.num_layers=1", "model.embed_dim=16", "model.num_heads=2", "model.num_kv_heads=1",
                         "model.intermediate_dim=32"]}
    assert let_study.main(["--suite", "unscored", "--out", str(tmp_path / "study"), "--corpus", str(corpus_dir),
                           "--tokenizer", str(tokenizer_path), "--tasks", str(tmp_path / "no_tasks"),
                           "--plot-dir", str(tmp_path / "plots"), "--scale", json.dumps(scale)]) == 0
    report = json.loads((tmp_path / "study" / "study_unscored.json").read_text())["regimes"]["short"]["arms"]
    assert [r["seed"] for r in report["baseline"]] == [0, 1] and [r["seed"] for r in report["let"]] == [1]
    assert report["let"][0]["accuracy"] == {} and not list((tmp_path / "study" / "runs").rglob("eval"))
    assert (tmp_path / "plots" / "study_unscored_short.png").is_file()
    with pytest.raises(SystemExit, match="--regimes long: the unscored suite runs short"):
        let_study.main(["--suite", "unscored", "--regimes", "long", "--out", str(tmp_path / "study"), "--corpus",
                        str(corpus_dir), "--tokenizer", str(tokenizer_path), "--tasks", str(tmp_path / "no_tasks"),
                        "--report"])


def test_the_auto_arm_passes_no_lambda0_to_a_schedule_that_takes_none():
    # the study's LET overrides set lambda0 for the linear arms; auto takes none, and let_tiny sets none
    overrides = let_study.let_auto(1.0).overrides
    assert "alignment.schedule._component_=auto" in overrides and "alignment.schedule.rho0=1.0" in overrides
    assert not [o for o in overrides if "lambda0" in o]


def test_a_runs_folder_scores_each_checkpoint_in_turn_and_goes_on_where_it_stopped(base_overrides, tmp_path,
                                                                                 monkeypatch, capsys):
    """`checkpoint=<output_dir>`: the run's step checkpoints in order, then its final export
    (the accuracy curve LET is judged by), each converted and scored in turn; the report
    is written after each, and the same command again scores only what it has not."""
    import letrecipes.eval as eval_module
    from letrecipes import pretrain

    run = tmp_path / "run"
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, *TINY, f"output_dir={run}", "max_steps=4",
                          "save_every=2", "eval_every=0"])
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0),
                                                     Item("My lord,", [" I", " the king is dead"], 0)])
    command = ["--config", "eval", f"checkpoint={run}", f"tasks=[{task}]", f"output={tmp_path / 'curve.json'}"]
    eval_recipe.recipe_main(command)
    report = json.loads((tmp_path / "curve.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in report["checkpoints"]] == [2, 4, None]
    # and the tokens each had trained on (recorded with the checkpoint; the final export's from the metrics)
    trained = json.loads((run / "run_info.json").read_text(encoding="utf-8"))["config"]
    per_step = trained["batch_size"] * trained["data"]["seq_len"]
    assert [r["tokens"] for r in report["checkpoints"]] == [2 * per_step, 4 * per_step, 4 * per_step]
    assert report["checkpoints"][-1]["checkpoint"] == str(run / "final")
    assert all(r["tasks"]["tiny_task"]["n"] == 2 for r in report["checkpoints"])
    curve = capsys.readouterr().out.split("eval: ")[-1].splitlines()  # the curve's table after the last one
    assert [line.split()[:2] for line in curve[-3:]] == [["2", f"{2 * per_step}"], ["4", f"{4 * per_step}"],
                                                         ["final", f"{4 * per_step}"]] and "tiny_task" in curve[-5]
    # the converted copies are removed, the run's own checkpoints and export never
    assert (run / "final" / "config.json").is_file() and (run / "checkpoints" / "step_00000002").is_dir()

    def never(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(eval_module, "run_lm_eval", never)
    eval_recipe.recipe_main(command)  # everything scored before with these settings: nothing to do
    out = capsys.readouterr().out
    assert out.count("scored before with these settings") == 3
    assert json.loads((tmp_path / "curve.json").read_text(encoding="utf-8"))["checkpoints"] == report["checkpoints"]
    # the run started over in its folder: the same paths hold other weights, which were taken for scored ones
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, *TINY, f"output_dir={run}", "max_steps=4",
                          "save_every=2", "eval_every=0", "overwrite=true", "seed=1"])
    capsys.readouterr()
    with pytest.raises(AssertionError, match="scored again"):
        eval_recipe.recipe_main(command)
    assert f"eval: {run / 'checkpoints' / 'step_00000002'}: other weights than those" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="scored again"):  # other settings: scored again
        eval_recipe.recipe_main([*command, "limit=1"])
    expect_setup_error(eval_recipe.recipe_main, [*command, f"export_dir={tmp_path / 'keep'}"],
                       match="export_dir: a run's checkpoints are converted one after another")
    # a damaged checkpoint costs its own point of the curve: said, recorded, the others scored
    monkeypatch.setattr(eval_module, "run_lm_eval", run_lm_eval)
    shard = next((run / "checkpoints" / "step_00000002").glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    eval_recipe.recipe_main([*command, f"output={tmp_path / 'damaged.json'}"])
    damaged = json.loads((tmp_path / "damaged.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in damaged["checkpoints"]] == [4, None]
    assert damaged["skipped"][0]["checkpoint"] == str(run / "checkpoints" / "step_00000002")
    assert "is damaged" in damaged["skipped"][0]["why"]
    assert "eval: 1 checkpoint(s) skipped" in capsys.readouterr().out


def test_a_curve_report_edited_or_damaged_is_scored_again_not_trusted(tmp_path, capsys):
    """`output=curve.json` read back to go on where an evaluation stopped: an entry of the
    wrong kind (a hand edit, a damaged file) is scored again, never carried into the new
    report, where printing the curve after hours of scoring would fail on it."""
    import random

    from tests.damage import changed_json

    settings = {"tasks": ["tiny_task"], "limit": 0}
    good = [{"checkpoint": f"run/checkpoints/step_0000000{step}", "step": step, "tokens": 512 * step,
             "tasks": {"tiny_task": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.1, "n": 2,
                                     "chance": 0.5}}} for step in (2, 4)]
    out = tmp_path / "curve.json"

    def kept(reports):
        out.write_text(json.dumps({"scorer": "lm-evaluation-harness", "settings": settings, "checkpoints": reports}))
        return eval_recipe._scored_before(out, settings)

    assert list(kept(good)) == [r["checkpoint"] for r in good]
    bad = [{**good[0], "step": "2"}, {**good[0], "tasks": "x"},
           {**good[0], "tasks": {"tiny_task": {**good[0]["tasks"]["tiny_task"], "acc_norm": "high"}}}, 7]
    assert list(kept([*bad, good[1]])) == [good[1]["checkpoint"]]
    assert "4 report(s) in" in capsys.readouterr().out
    rng, outcomes = random.Random(20261206), {"kept": 0, "scored again": 0}
    for _ in range(200):
        reports, _, _ = changed_json({"checkpoints": good}, rng)
        held = kept(reports.get("checkpoints", []))
        eval_recipe._curve(list(held.values())) if held else None  # what the recipe prints at the end
        outcomes["kept" if len(held) == 2 else "scored again"] += 1
    assert outcomes["kept"] > 20 and outcomes["scored again"] > 20, outcomes


def test_a_full_temporary_folder_is_named_as_tmpdir_with_its_fix(base_overrides, teacher_dir, tmp_path):
    """The eval writes its task and document files (and a step checkpoint's conversion) under
    TMPDIR: a full one was `checkpoint: evaluating failed: the disk is full. Fix: free space`,
    naming neither the folder nor the variable that moves it (the conversion's: `checkpoint:
    writing the export into ...`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    task = write_task(tmp_path / "tiny_task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)])
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "tests" / "io_fault.py"), ".jsonl", "ENOSPC", "--",
                           "letrecipes.eval", "--config", "eval", f"checkpoint={teacher_dir}",
                           f"tasks=[{task}]", "contamination=false"],
                          cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(temporary)})
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and line.startswith(
        f"error: TMPDIR: evaluating failed: the disk is full ({temporary}/"), done.stderr[-3000:]
    assert "Fix: free space, or point TMPDIR at a folder on another disk (export TMPDIR=...)" in line

    from letrecipes import pretrain

    run = tmp_path / "run"
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, *TINY, f"output_dir={run}", "max_steps=2",
                          "save_every=2", "eval_every=0"])
    step = run / "checkpoints" / "step_00000002"
    for destination, key in ((None, "TMPDIR"), (tmp_path / "kept", "export_dir")):
        done = subprocess.run([sys.executable, str(repo / "tests" / "io_fault.py"), "config.json", "ENOSPC", "--",
                               "letrecipes.eval", "--config", "eval", f"checkpoint={step}",
                               f"tasks=[{task}]", "contamination=false",
                               *([f"export_dir={destination}"] if destination else [])],
                              cwd=repo, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TMPDIR": str(temporary)})
        line = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1 and line.startswith(f"error: {key}: writing the export into "
                                                        f"{destination or temporary}"), done.stderr[-3000:]


def test_a_home_folder_the_datasets_cache_cannot_be_made_in_is_named_as_hf_datasets_cache(teacher_dir, tmp_path):
    """lm-eval reads each task through datasets, which caches it under ~/.cache: a home folder
    read-only on a compute node (or over its quota) was `checkpoint: evaluating failed`."""
    import os
    import subprocess
    import sys

    task = write_task(tmp_path / "tiny_task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)])
    (tmp_path / "a_file").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
    command = [sys.executable, "-m", "letrecipes.eval", "--config", "eval", f"checkpoint={teacher_dir}",
               f"tasks=[{task}]", "contamination=false"]
    home = tmp_path / "a_file" / "home"  # a folder that cannot be made, even by root
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**env, "HOME": str(home), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        f"error: HF_DATASETS_CACHE: evaluating failed: a part of the path is a file, not a folder ({home}). Fix: "
        "point it at a folder (or move the file away), or point HF_DATASETS_CACHE at a writable folder (export "
        "HF_DATASETS_CACHE=...), then run the same command again."), done.stderr[-3000:]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**env, "HOME": str(home), "OMP_NUM_THREADS": "1",
                               "HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    assert done.returncode == 0 and "tiny_task" in done.stdout, done.stderr[-3000:]


def test_a_write_that_fails_without_a_file_name_is_named_by_the_file_replaced(tmp_path):
    """A full disk meets a write, not an open: Python's OSError then names no file, and the
    one-line error none either. replace_atomically names the file it was replacing."""
    import errno
    import resource
    import signal

    from letrecipes.components.files import replace_atomically

    previous = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, previous[0][1]))  # writes past 1,000 bytes fail: EFBIG
    try:
        with pytest.raises(OSError) as err:
            replace_atomically(tmp_path / "big.json", "x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous[0])
        signal.signal(signal.SIGXFSZ, previous[1])
    assert err.value.errno == errno.EFBIG and err.value.filename == str(tmp_path / "big.json")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_failing_disk_under_a_checkpoint_costs_its_point_of_the_curve_in_one_line(base_overrides, tmp_path):
    """An input/output error as eval read a run's checkpoint (its format.json, its config.yaml)
    was an OSError traceback that ended the whole curve; the checkpoint is now skipped with
    the reason, as a damaged one is, and the others are scored."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from letrecipes import pretrain

    run = tmp_path / "run"
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, *TINY, f"output_dir={run}", "max_steps=2",
                          "save_every=2", "eval_every=0"])
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)])
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "tests" / "io_fault.py"), "--read", "format.json", "EIO", "--",
                           "letrecipes.eval", "--config", "eval", f"checkpoint={run}", f"tasks=[{task}]",
                           f"output={tmp_path / 'curve.json'}", "contamination=false"],
                          cwd=repo, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads((tmp_path / "curve.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in report["checkpoints"]] == [None]  # the final export, scored
    (skipped,) = report["skipped"]
    assert skipped["checkpoint"].endswith("step_00000002")
    assert skipped["why"].startswith(f"checkpoint: reading the checkpoint {run / 'checkpoints' / 'step_00000002'} "
                                     "failed: an input/output error (a failing disk or a lost network mount)")
