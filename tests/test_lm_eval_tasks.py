"""lm-evaluation-harness's own tasks (the LET paper's: ARC, HellaSwag, WinoGrande, LAMBADA, ...)
scored from local copies of their data: ``tasks=[arc_easy]`` with ``task_data.arc_easy=<folder>``.

The copies here are small hand-made ones in the shapes the hub serves (a snapshot naming its
configurations in its README, the parquet conversion's <config>/<split>/0000.parquet, a
folder of JSON-lines files); lm-eval's own task definitions read them."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from letrecipes import cli
from letrecipes import eval as eval_recipe
from letrecipes.components.evaluation import (EvalError, Item, prepare_tasks, run_lm_eval, write_lm_eval_tasks,
                                             write_task)
from tests.test_contamination import INVENTED, play_lines
from tests.test_recipes import expect_setup_error

FRUIT = ["apple", "stone", "cloud", "river"]


def arc_rows(questions, answer_key="A"):
    return [{"id": f"q{i}", "question": q, "answerKey": answer_key,
             "choices": {"text": FRUIT, "label": ["A", "B", "C", "D"]}} for i, q in enumerate(questions)]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_json_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def copies(corpus_dir, tmp_path_factory):
    """Local copies of four hub datasets, each in one of the shapes a user brings."""
    root = tmp_path_factory.mktemp("hub_copies")
    # allenai/ai2_arc as `hf download` leaves it: configurations in the README, a folder each
    arc = root / "ai2_arc"
    questions = ["Which of these is a fruit?", "What grows on a tree?", "Which one can you eat?",
                 "What is sweet and red?"]
    for split in ("train", "validation", "test"):
        write_parquet(arc / "ARC-Easy" / f"{split}-00000-of-00001.parquet", arc_rows(questions))
    # ARC-Challenge: two questions are lines of the plays the test teacher was trained on, one is invented
    write_parquet(arc / "ARC-Challenge" / "test-00000-of-00001.parquet",
                  arc_rows([*play_lines(corpus_dir, 2), INVENTED[0]], answer_key="B"))
    (arc / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {config}\n  data_files:\n" + "".join(
            f"  - split: {split}\n    path: {config}/{split}-*\n" for split in splits)
        for config, splits in (("ARC-Easy", ("train", "validation", "test")), ("ARC-Challenge", ("test",))))
        + "---\n# ai2_arc (a hand-made copy)\n")
    # Rowan/hellaswag as its parquet conversion: <config>/<split>/0000.parquet
    write_parquet(root / "hellaswag" / "default" / "validation" / "0000.parquet", [
        {"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he",
         "ctx": "A man cuts an onion. he", "endings": ["puts it in a pan.", "flies to the moon.", "sings [title] a song.",
                                                     "eats the knife."],
         "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(3)])
    # allenai/winogrande (and lambada, read by the wrong task below) as folders of JSON-lines files named by split
    write_json_lines(root / "winogrande" / "validation.jsonl", [
        {"sentence": "The cup did not fit in the box because the _ was too big.", "option1": "cup",
         "option2": "box", "answer": "1"},
        {"sentence": "Anna thanked Mary because _ had helped her.", "option1": "Anna", "option2": "Mary",
         "answer": "2"}])
    write_json_lines(root / "lambada" / "test.jsonl", [{"text": "To be, or not to be"},
                                                       {"text": "My lord, the king is dead"}])
    # EleutherAI/lambada_openai as its parquet conversion: a folder per configuration (language); lm-eval's
    # task reads `default` alone
    for config, texts in (("default", ["To be, or not to be", "My lord, the king is dead"]),
                          ("de", ["Sein oder nicht sein", "Mein Herr, der König ist tot", "Ein Pferd!"])):
        write_parquet(root / "lambada_parquet" / config / "test" / "0000.parquet", [{"text": t} for t in texts])
    # cais/mmlu: a configuration per subject, named in the README; two questions each (three for algebra)
    from lm_eval.tasks._yaml_loader import load_yaml

    from letrecipes.components.evaluation import _lm_eval_index, lm_eval_members

    subjects = [load_yaml(_lm_eval_index()[task].yaml_path, resolve_func=False)["dataset_name"]
                for task in lm_eval_members("mmlu", "test")[0]]
    readme = "---\nconfigs:\n"
    for subject in subjects:
        questions = [f"A {subject} question?", f"Another {subject} question?"]
        questions += ["What is 2 + 2?"] if subject == "abstract_algebra" else []
        write_parquet(root / "mmlu" / subject / "test-00000-of-00001.parquet",
                      [{"question": q, "subject": subject, "choices": ["4", "5", "6", "7"], "answer": i % 4}
                       for i, q in enumerate(questions)])
        readme += f"- config_name: {subject}\n  data_files:\n  - split: test\n    path: {subject}/test-*\n"
    (root / "mmlu" / "README.md").write_text(readme + "---\n")
    return root


def test_lm_evals_own_prompt_scores_the_local_copy(copies, teacher_dir, tmp_path):
    """arc_easy from the copy is lm-eval's task: its prompt ("Question: ...\\nAnswer:") and its
    choices after a space, the very log-likelihoods of the same items written as a task file;
    num_fewshot puts a training-split example before each."""
    prepared = prepare_tasks(["arc_easy"], {"arc_easy": str(copies / "ai2_arc")}, 0, tmp_path / "work")
    assert prepared.data == {"arc_easy": {"source": str((copies / "ai2_arc").resolve()), "split": "test"}}
    assert prepared.chance == {"arc_easy": 0.25}
    assert prepared.texts["arc_easy"][0] == "Question: Which of these is a fruit?\nAnswer: apple"
    questions = [text.split("\n")[0][len("Question: "):] for text in prepared.texts["arc_easy"]]
    twin = write_task(tmp_path / "twin.jsonl", [Item(f"Question: {q}\nAnswer:", [f" {c}" for c in FRUIT], 0)
                                                for q in questions])
    names = {**prepared.names, **write_lm_eval_tasks([twin], tmp_path / "work" / "tasks")}
    report = run_lm_eval(teacher_dir, tmp_path / "work" / "tasks", names, log_samples=True, batch_size=4)
    ours, theirs = ([float(r[0]) for s in sorted(report["samples"][name], key=lambda s: s["doc_id"])
                     for r in s["filtered_resps"]] for name in ("twin", "arc_easy"))
    assert len(ours) == 4 * 4 and ours == pytest.approx(theirs, abs=1e-5)
    assert report["tasks"]["arc_easy"]["acc"] == report["tasks"]["twin"]["acc"]
    one_shot = prepare_tasks(["arc_easy"], {"arc_easy": str(copies / "ai2_arc")}, 0, tmp_path / "shots",
                             num_fewshot=1)  # written into the task file, as the recipe does
    shots = run_lm_eval(teacher_dir, tmp_path / "shots" / "tasks", one_shot.names, log_samples=True, batch_size=4)
    context = shots["samples"]["arc_easy"][0]["arguments"][0][0]
    assert context.count("Question: ") == 2 and context.endswith("\nAnswer:")


def test_the_recipe_scores_lm_evals_tasks_and_finds_their_items_in_the_training_data(copies, teacher_dir, tmp_path,
                                                                                     capsys):
    data = {"arc_easy": "ai2_arc", "arc_challenge": "ai2_arc", "hellaswag": "hellaswag", "winogrande": "winogrande",
            "lambada_openai": "lambada_parquet"}
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{','.join(data)}]",
                             *(f"task_data.{task}={copies / folder}" for task, folder in data.items()),
                             f"output={tmp_path / 'scores.json'}", "batch_size=4"])
    report = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    tasks = report["tasks"]
    assert {name: tasks[name]["n"] for name in data} == {"arc_easy": 4, "arc_challenge": 3, "hellaswag": 3,
                                                         "winogrande": 2, "lambada_openai": 2}
    assert {name: tasks[name]["split"] for name in data} == {"arc_easy": "test", "arc_challenge": "test",
                                                             "hellaswag": "validation", "winogrande": "validation",
                                                             "lambada_openai": "test"}
    assert tasks["hellaswag"]["data"] == str((copies / "hellaswag").resolve())
    assert tasks["arc_easy"]["chance"] == 0.25 and tasks["winogrande"]["chance"] == 0.5
    assert tasks["lambada_openai"]["chance"] is None  # no choices: a word to predict
    # each task's own metrics: winogrande has acc alone, lambada a perplexity too
    assert "acc_norm" not in tasks["winogrande"] and tasks["lambada_openai"]["perplexity"] > 1
    assert report["num_fewshot"] == 0
    # the two ARC-Challenge questions taken from the plays are found in the teacher's training data
    assert report["contamination"]["tasks"]["arc_challenge"]["contaminated_items"] == [0, 1]
    assert tasks["arc_challenge"]["contaminated"] == 2 and tasks["arc_challenge"]["n_clean"] == 1
    assert tasks["arc_easy"]["contaminated"] == 0
    out = capsys.readouterr().out
    assert "tasks: hellaswag: 3 items, lm-eval's own task on the validation split of" in out
    assert "winogrande" in out and "acc_norm" not in out.split("winogrande ")[-1].splitlines()[0]
    # the same check without a model, from the command line
    assert cli.main(["contamination", "--data", str(teacher_dir.parent), "--tasks", "arc_challenge", "arc_easy",
                     "--task-data", f"arc_challenge={copies / 'ai2_arc'}", f"arc_easy={copies / 'ai2_arc'}",
                     "--out", str(tmp_path / "found.json"), "--workers", "1", "--cache-dir", ""]) == 0
    found = json.loads((tmp_path / "found.json").read_text(encoding="utf-8"))["tasks"]
    assert found["arc_challenge"]["contaminated_items"] == [0, 1] and found["arc_easy"]["contaminated_items"] == []


def test_an_lm_eval_task_that_cannot_be_read_is_named_before_the_model(copies, tmp_path, monkeypatch):
    """Every one of these used to be one refusal ("a bare name ... never downloads"), or, let
    through, a traceback from inside datasets or lm-eval after the model was loaded."""
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the tasks were checked")

    monkeypatch.setattr(eval_recipe.EvalRecipe, "_hf_folder", never)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")  # as on a new machine
    (tmp_path / "model").mkdir()  # there (a missing checkpoint is named first), never loaded
    common = ["--config", "eval", f"checkpoint={tmp_path / 'model'}"]
    cases = [
        (["tasks=[hellaswg]"], "error: tasks[0]: 'hellaswg' is no task file and no lm-evaluation-harness task "
                               "(close: hellaswag"),
        (["tasks=[ARC_Easy]"], "'ARC_Easy' is no task file and no lm-evaluation-harness task (close: arc_easy"),
        (["tasks=[hellaswag]"], "tasks: lm-eval's hellaswag reads the datasets cache (Rowan/hellaswag), which is not "
                                "on this machine"),
        (["tasks=[mmlu]"], "lm-eval's mmlu_abstract_algebra reads the datasets cache (cais/mmlu), which is not on "
                           "this machine"),
        (["tasks=[mmlu]"], "set task_data.mmlu=<folder>"),  # the group's setting, not the subject's
        (["tasks=[arc_easy]", f"task_data.arc_challenge={copies / 'ai2_arc'}"],
         "task_data.arc_challenge: names no task in tasks"),
        (["tasks=[winogrande]", f"task_data.winogrande={copies / 'ai2_arc'}"],
         f"task_data.winogrande: '{copies / 'ai2_arc'}' has no configuration 'winogrande_xl'"),
        (["tasks=[arc_easy]", f"task_data.arc_easy={copies / 'nowhere'}"], "is not a folder"),
        (["tasks=[lambada_openai]", f"task_data.lambada_openai={copies / 'lambada' / 'test.jsonl'}"],
         "is a file; the data of a task is a folder, its files named by split"),
        (["tasks=[arc_easy]", f"task_data.arc_easy={copies / 'lambada'}"],
         "tasks: lm-eval's arc_easy cannot read"),
        (["tasks=[arc_easy]", f"task_data.arc_easy={copies / 'train_only'}"],
         "holds the split(s) train, not test or validation, which lm-eval's arc_easy scores"),
    ]
    write_json_lines(copies / "train_only" / "train.jsonl", arc_rows(["Which of these is a fruit?"]))
    cases.append((["tasks=[arc_easy,hellaswag]", f"task_data.arc_easy={copies / 'nowhere'}",
                   f"task_data.hellaswag={copies / 'nor_here'}"],
                  f"task_data: 2 folders are not there: task_data.arc_easy={copies / 'nowhere'}, "
                  f"task_data.hellaswag={copies / 'nor_here'}"))  # every one at once, not one per run
    for overrides, message in cases:
        error = expect_setup_error(eval_recipe.recipe_main, [*common, *overrides], match=message)
        assert "Fix: " in error and "\n" not in error


def test_a_group_is_scored_and_aggregated_by_lm_eval_and_a_tag_lists_its_tasks(copies, teacher_dir, tmp_path, capsys):
    """`tasks=[mmlu]` used to be refused ("a group, not one task: name its tasks one by
    one", 57 of them). A group's tasks share the group's task_data; lm-eval aggregates the
    group its own way (mmlu: the mean over subjects weighted by their items)."""
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", "tasks=[mmlu,ai2_arc]",
                             f"task_data.mmlu={copies / 'mmlu'}", f"task_data.ai2_arc={copies / 'ai2_arc'}",
                             f"output={tmp_path / 'scores.json'}", "batch_size=8"])
    report = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    mmlu, tasks = report["groups"]["mmlu"], report["tasks"]
    assert len(mmlu["tasks"]) == 57 and mmlu["n"] == 115 and tasks["mmlu_abstract_algebra"]["n"] == 3
    assert mmlu["acc"] == pytest.approx(sum(tasks[t]["acc"] * tasks[t]["n"] for t in mmlu["tasks"]) / 115)
    assert mmlu["acc_stderr"] is not None
    # lm-eval has no aggregate for a tag; two of arc_challenge's questions are lines of the training plays
    assert report["groups"]["ai2_arc"] == {"tasks": ["arc_challenge", "arc_easy"], "n": 7, "contaminated": 2}
    assert tasks["arc_easy"]["data"] == str((copies / "ai2_arc").resolve())
    out = capsys.readouterr().out
    assert "tasks: mmlu: 57 lm-eval tasks, 115 items, on the test split of" in out
    assert "no aggregate (an lm-eval tag)  over 2 tasks" in out
    # 59 tasks looked up in the training data: the 58 with nothing found are one line
    assert "contamination: 58 task(s): none of their 119 items checked holds a run of 13 tokens" in out
    assert "contamination: arc_challenge: 2 of 3 items checked hold a run of 13 tokens" in out
    assert "contamination: mmlu_anatomy:" not in out


def test_a_copy_changed_since_the_last_evaluation_is_read_as_it_is_now(tmp_path):
    """datasets' shared cache keys a snapshot whose README names its configurations by the
    folder's name and the README's file patterns, not by the files: the same copy with other
    contents (repaired, or another copy in a folder of the same name) was read as the first
    one, without a word. Each evaluation converts the copy in a folder of its own."""
    snapshot = tmp_path / "ai2_arc"
    snapshot.mkdir()
    (snapshot / "README.md").write_text("---\nconfigs:\n- config_name: ARC-Easy\n  data_files:\n  - split: test\n"
                                        "    path: ARC-Easy/test-*\n---\n")
    write_parquet(snapshot / "ARC-Easy" / "test-00000-of-00001.parquet", arc_rows(["Which of these is a fruit?"]))
    first = prepare_tasks(["arc_easy"], {"arc_easy": str(snapshot)}, 0, tmp_path / "first", log=lambda line: None)
    write_parquet(snapshot / "ARC-Easy" / "test-00000-of-00001.parquet",
                  arc_rows(["What grows on a tree?", "Which one is sweet?"]))
    second = prepare_tasks(["arc_easy"], {"arc_easy": str(snapshot)}, 0, tmp_path / "second", log=lambda line: None)
    assert len(first.texts["arc_easy"]) == 1
    assert [t.split("\n")[0] for t in second.texts["arc_easy"]] == ["Question: What grows on a tree?",
                                                                    "Question: Which one is sweet?"]


def test_the_paper_config_names_lm_evals_nine_tasks_and_the_folders_its_download_loop_writes():
    """eval_let_paper.yaml: each task is one of lm-eval's, with a task_data folder named as
    `hf download <its dataset> --local-dir data/eval/<name>` in the config's header names it."""
    from letrecipes._config import load_config
    from letrecipes._schema import validate_eval
    from letrecipes.components.evaluation import lm_eval_task

    cfg = load_config("eval_let_paper", [])
    validate_eval(cfg)
    assert len(cfg.tasks) == 9 and set(cfg.task_data) == set(cfg.tasks) and cfg.num_fewshot == 1
    header = (Path(__file__).parent.parent / "recipes" / "configs" / "eval_let_paper.yaml").read_text().split("\n\n")[0]
    for task in cfg.tasks:
        hub = lm_eval_task(task, None, "tasks").hub_dataset  # lm-eval's own definition says where its data is
        assert hub in header and cfg.task_data[task] == f"data/eval/{hub.split('/')[-1]}", task


def _push_to_hub_layout(folder):  # one configuration, `data/<split>-NNNNN-of-NNNNN.parquet`
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", arc_rows(["First?", "Second?"]))
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", arc_rows(["A shot?"]))


def _gzipped_json_lines(folder):
    import gzip

    folder.mkdir(parents=True)
    with gzip.open(folder / "test.jsonl.gz", "wt") as out:
        out.writelines(json.dumps(row) + "\n" for row in arc_rows(["First?", "Second?"]))


def _save_to_disk(folder):  # what `load_dataset(...).save_to_disk(folder)` leaves where there is network
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(arc_rows(["First?", "Second?"])),
                          "train": datasets.Dataset.from_list(arc_rows(["A shot?"]))}).save_to_disk(str(folder))


def test_a_save_to_disk_copy_under_a_datasets_that_reads_it_as_json_files_is_one_line(tmp_path, monkeypatch):
    """datasets 2.21 to 4.8 read such a folder's dataset_dict.json and state.json as the task's
    data: "cannot read ...: UndefinedError: 'question' is undefined" from lm-eval's prompt."""
    import datasets

    _save_to_disk(tmp_path / "copy")
    monkeypatch.setattr(datasets, "__version__", "4.8.5")
    with pytest.raises(EvalError, match=r"^task_data\.arc_easy: .*/copy' is a copy written by `save_to_disk` "
                                        r"\(dataset_dict\.json\), which datasets reads as one from 5\.0; 4\.8\.5 is "
                                        r"installed\. Fix: pip install 'datasets>=5'"):
        prepare_tasks(["arc_easy"], {"arc_easy": str(tmp_path / "copy")}, 0, tmp_path / "work", log=lambda line: None)


@pytest.mark.parametrize("layout", [_push_to_hub_layout, _gzipped_json_lines, _save_to_disk])
def test_the_other_shapes_a_copy_comes_in_are_read_by_split(layout, tmp_path):
    layout(tmp_path / "copy")
    prepared = prepare_tasks(["arc_easy"], {"arc_easy": str(tmp_path / "copy")}, 0, tmp_path / "work",
                             log=lambda line: None)
    assert [text.split("\n")[0] for text in prepared.texts["arc_easy"]] == ["Question: First?", "Question: Second?"]
    assert prepared.data["arc_easy"]["split"] == "test"
