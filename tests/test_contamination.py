"""Eval items looked up in the training data: components/contamination.py, the eval recipe's
``contamination`` keys and ``letrecipes contamination``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from letrecipes import cli
from letrecipes import eval as eval_recipe
from letrecipes.components import contamination
from letrecipes.components.evaluation import Item, write_task
from letrecipes.components.prepare import prepare_corpus
from letrecipes.components.tokenizer import Tokenizer
from tests.test_recipes import expect_setup_error

INVENTED = ["Quantum zebras file their tax returns by carrier pigeon every second Thursday of June.",
            "The spreadsheet refused to compile until the espresso machine had rebooted its firmware twice.",
            "Seven robotic penguins negotiated a ceasefire over the last slice of pineapple pizza in orbit."]


def play_lines(corpus_dir, count: int):
    """Long lines of the test corpus's plays: text the training data holds."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt")))
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 70]
    return lines[::max(1, len(lines) // count)][:count]


def as_item(text: str) -> Item:
    cut = text.index(" ", 20)  # the right choice carries its own leading space, as task files write it
    return Item(text[:cut], [text[cut:], " and nothing more was said of it."], 0)


@pytest.fixture(scope="module")
def prepared(corpus_dir, tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_corpus(corpus_dir, Tokenizer(tokenizer_path), out, log=lambda line: None)
    return contamination.Corpus.read(out, "test")


def test_window_hashes_are_each_ngrams_own_hash():
    tokens = np.random.default_rng(0).integers(0, 50_000, 200)
    hasher = contamination._Hasher(len(tokens))
    prefix = hasher.prefix(tokens)
    for length in (8, 13, 200):
        windows = hasher.windows(prefix, length)
        assert [int(h) for h in windows] == [contamination.ngram_hash(tokens[s:s + length])
                                             for s in range(len(tokens) - length + 1)]


def test_a_hash_match_with_other_tokens_is_no_match():
    """The bit table and the hashes only find candidates: a match is the same tokens."""
    tokens = np.arange(100, 140, dtype=np.int64)
    hasher = contamination._Hasher(len(tokens))
    prefix = hasher.prefix(tokens)
    target = hasher.windows(prefix, 8)[5:6]
    same = contamination._Lookup({8: (target, tokens[5:13][None, :])})
    colliding = contamination._Lookup({8: (target, (tokens[5:13] + 1)[None, :])})
    assert same.matches(tokens, prefix, hasher, 8, 33)[0].tolist() == [5]
    assert colliding.matches(tokens, prefix, hasher, 8, 33)[0].tolist() == []


def test_items_of_the_training_text_are_found_and_only_they(prepared, corpus_dir, tokenizer_path, monkeypatch):
    lines = play_lines(corpus_dir, 6)
    mid_line = lines[5][lines[5].index(" ", 10) + 1:]  # starts inside a line: its first word had a space before it
    # a few words from inside a line, under 13 tokens: looked for whole, in the form with a space before it
    words, tokenizer = lines[4].split(), Tokenizer(tokenizer_path)
    short = next(" ".join(words[3:3 + n]) for n in range(2, len(words) - 3)
                 if len(tokenizer.encode(" " + " ".join(words[3:3 + n]))) >= 9)
    assert len(tokenizer.encode(" " + short)) < 13
    task = [as_item(lines[0]), as_item(INVENTED[0]), as_item(lines[1]), Item("", [" To be", " Not to"], 0),
            as_item(INVENTED[1]), as_item(mid_line), Item("", [short, " or so the story goes"], 0)]
    # every item of this task shares one line of a play (a fixed instruction): the template, not an item
    templated = [Item(lines[2] + " " + invented, [" yes", " no"], 0) for invented in INVENTED]
    tasks = {"mixed": task, "templated": templated}
    monkeypatch.setattr(contamination, "CHUNK", 997)  # windows across chunk ends: the overlap must hold them
    tasks = {name: [contamination.item_text(item) for item in items] for name, items in tasks.items()}
    found = contamination.check_items([prepared], tasks, [], log=lambda line: None)
    mixed = found["tasks"]["mixed"]
    assert mixed["contaminated_items"] == [0, 2, 5, 6]
    assert mixed["checked"] == 6 and mixed["items"] == 7  # " To be" is too short to tell
    assert found["tasks"]["templated"]["contaminated"] == 0 and found["tasks"]["templated"]["template_ngrams"] > 0
    assert found["tokens"] == prepared.manifest["tokens"]
    # each example says where the corpus holds it: those are its tokens
    for example in mixed["examples"]:
        at = np.fromfile(prepared.folder / example["file"], dtype=prepared.manifest["dtype"],
                         count=len(example["tokens"]), offset=example["token"] * 2)
        assert at.tolist() == example["tokens"] and example["text"].strip() in "\n".join(lines)
    # one chunk, and shards spread over two processes, find the same
    monkeypatch.setattr(contamination, "CHUNK", 1 << 22)
    again = contamination.check_items([prepared], tasks, [], workers=2, log=lambda line: None)
    assert {k: v for k, v in again["tasks"].items()} == found["tasks"]


def test_a_copy_lowercased_or_reflowed_is_found(corpus_dir, tokenizer_path, tmp_path):
    """The corpus holds one item lowercased and another with its line breaks as single
    spaces (a page that reflowed it). The differences recur every few tokens, so that no
    13-token run of either item, as written, is in the corpus."""
    titled = " ".join(word.capitalize() for word in INVENTED[0].split())  # Quantum Zebras File Their Tax ...
    listed = "\n".join(INVENTED[1].split())  # one word a line
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(sorted(corpus_dir.glob("*.txt"))[0], folder / "play.txt")
    (folder / "forum.txt").write_text("someone posted this today: " + titled.lower() + " what a day.\n")
    (folder / "page.txt").write_text("Read the passage. " + " ".join(listed.split()) + " Then answer.\n")
    out = tmp_path / "prepared"
    prepare_corpus(folder, Tokenizer(tokenizer_path), out, log=lambda line: None)
    cut = listed.index("\n", 30)
    items = [as_item(titled), Item(listed[:cut], [listed[cut:], " No."], 0), as_item(INVENTED[2])]
    found = contamination.check_items([contamination.Corpus.read(out, "test")],
                                      {"near": [contamination.item_text(item) for item in items]}, [],
                                      log=lambda line: None)
    assert found["tasks"]["near"]["contaminated_items"] == [0, 1]  # the third is in no spelling


def test_eval_recipe_reports_items_in_the_training_data_and_scores_the_others(teacher_dir, corpus_dir, tmp_path,
                                                                               capsys):
    run_info = json.loads((teacher_dir.parent / "run_info.json").read_text(encoding="utf-8"))
    assert run_info["data_folders"] and all(Path(f).is_dir() for f in run_info["data_folders"])
    lines = play_lines(corpus_dir, 2)
    clean = [as_item(text) for text in INVENTED]
    mixed = write_task(tmp_path / "mixed.jsonl", [as_item(lines[0]), *clean, as_item(lines[1])])
    clean_only = write_task(tmp_path / "clean_only.jsonl", clean)
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{mixed},{clean_only}]",
                             f"output={tmp_path / 'scores.json'}"])
    report = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert report["contamination"]["tasks"]["mixed"]["contaminated_items"] == [0, 4]
    assert report["contamination"]["corpora"] == run_info["data_folders"]
    scores, alone = report["tasks"]["mixed"], report["tasks"]["clean_only"]
    assert scores["contaminated"] == 2 and scores["n_clean"] == 3 and alone["contaminated"] == 0
    # the clean items' scores are those of the same items scored as a task of their own
    assert scores["acc_clean"] == pytest.approx(alone["acc"]) and scores["acc_norm_clean"] == pytest.approx(alone["acc_norm"])
    out = capsys.readouterr().out
    assert "contamination: mixed: 2 of 5 items checked hold a run of 13 tokens found in the training data" in out
    # eval.yaml's max_len (256) is past this model's 32 positions: scored as asked, and said
    assert "note: max_len=256 is past the model's context (32 positions" in out
    assert "2 in the training data; on the other 3: acc" in out
    # asked not to: said so in the report
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{clean_only}]",
                             "contamination=false", f"output={tmp_path / 'off.json'}"])
    assert json.loads((tmp_path / "off.json").read_text(encoding="utf-8"))["contamination"] == {"checked": False,
                                                                               "why": "contamination=false"}


def test_a_contamination_folder_that_is_no_corpus_is_named_before_any_conversion(teacher_dir, corpus_dir, tmp_path,
                                                                                 monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("converted before the contamination folder was checked")

    monkeypatch.setattr(eval_recipe, "export_any", never)
    task = write_task(tmp_path / "t.jsonl", [as_item(INVENTED[0])])
    message = expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={teacher_dir}",
                                                           f"tasks=[{task}]", f"contamination={corpus_dir}"],
                                 match="is neither a prepared folder")
    assert message.startswith(f"error: contamination: '{corpus_dir}' is neither") and "prepare-data" in message


def test_the_command_checks_the_data_a_config_will_train_on(base_overrides, teacher_dir, corpus_dir, tmp_path,
                                                             capsys):
    """Before a run: `--config` and its overrides name the data through its cache folder
    (the teacher fixture's run prepared it), or say that it is not prepared yet."""
    task = write_task(tmp_path / "t.jsonl", [as_item(play_lines(corpus_dir, 1)[0]), as_item(INVENTED[0])])
    assert cli.main(["contamination", "--config", "pretrain_tiny", "--tasks", str(task), *base_overrides,
                     "--cache-dir", "", "--out", str(tmp_path / "found.json")]) == 0
    assert json.loads((tmp_path / "found.json").read_text(encoding="utf-8"))["tasks"]["t"]["contaminated_items"] == [0]
    with pytest.raises(SystemExit) as stop:
        cli.main(["contamination", "--config", "pretrain_tiny", "--tasks", str(task), *base_overrides,
                  f"data.cache_dir={tmp_path / 'empty'}"])
    assert "--config: the data it trains on is not prepared yet" in str(stop.value)


def test_the_command_checks_a_run_with_or_without_its_recorded_folders(teacher_dir, corpus_dir, tmp_path, capsys):
    lines = play_lines(corpus_dir, 1)
    task = write_task(tmp_path / "t.jsonl", [as_item(lines[0]), as_item(INVENTED[0])])
    out = tmp_path / "reports" / "found.json"  # a folder made when the findings are written
    assert cli.main(["contamination", "--data", str(teacher_dir.parent), "--tasks", str(task),
                     "--out", str(out)]) == 0
    found = json.loads(out.read_text(encoding="utf-8"))
    assert found["tasks"]["t"]["contaminated_items"] == [0]
    # a run from before run_info.json named its data: its config.yaml leads to the same cache folder
    older = tmp_path / "older_run"
    older.mkdir()
    shutil.copy(teacher_dir.parent / "config.yaml", older / "config.yaml")
    info = json.loads((teacher_dir.parent / "run_info.json").read_text(encoding="utf-8"))
    info.pop("data_folders")
    (older / "run_info.json").write_text(json.dumps(info))
    assert cli.main(["contamination", "--data", str(older), "--tasks", str(task)]) == 0
    assert "t: 1 of 2 items checked" in capsys.readouterr().out
    # a run_info.json edited into no record (a list, a string), or whose data_folders are not
    # paths, is read as such a run's (before: AttributeError 'list' object has no attribute
    # 'get', TypeError from Path(1.5))
    for edited in ([1], "x", {**info, "data_folders": [1.5]}):
        (older / "run_info.json").write_text(json.dumps(edited))
        assert cli.main(["contamination", "--data", str(older), "--tasks", str(task)]) == 0
        assert "t: 1 of 2 items checked" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # refused after --out was checked: no folder is left behind for it
        cli.main(["contamination", "--data", str(corpus_dir), "--tasks", str(task),
                  "--out", str(tmp_path / "refused" / "found.json")])
    assert "is neither a prepared folder" in str(stop.value) + capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    # an --out that cannot be written is said before the scan, not after it
    with pytest.raises(SystemExit) as stop:
        cli.main(["contamination", "--data", str(teacher_dir.parent), "--tasks", str(task), "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert "is a folder; --out names the JSON file" in str(stop.value) + printed.err
    assert "contamination:" not in printed.out


def synthetic_corpus(folder, tokens: np.ndarray) -> contamination.Corpus:
    """A prepared folder of given token ids (no tokenizer: items below are token ids as text)."""
    tokens.astype(np.uint16).tofile(folder / "shard_000000.bin")
    (folder / "manifest.json").write_text(json.dumps({
        "format_version": 1, "tokens": len(tokens), "documents": 1, "dtype": "uint16",
        "tokenizer": {"fingerprint": "none", "path": "none", "vocab_size": 60_000, "eos_id": 0},
        "shards": [{"file": "shard_000000.bin", "tokens": len(tokens), "documents": 1}]}))
    return contamination.Corpus.read(folder, "test")


def test_runs_of_one_token_and_a_tasks_template_are_not_evidence(tmp_path):
    """A row of dots or table rules is in any corpus, and so is a task's fixed instruction
    when one item of it is: neither says the corpus holds an item."""
    rng = np.random.default_rng(0)
    rule, instruction = np.full(40, 7), rng.integers(100, 50_000, 20)
    copied = rng.integers(100, 50_000, 30)
    corpus = synthetic_corpus(tmp_path, np.concatenate([rng.integers(100, 50_000, 5_000), rule, instruction, copied,
                                                        rng.integers(100, 50_000, 5_000)]))

    def text(*parts):
        return " ".join(str(int(t)) for t in np.concatenate(parts))

    items = {"rules": [text(np.full(20, 7), rng.integers(100, 50_000, 12)),  # only its rule is in the corpus
                       text(np.full(30, 9)),  # nothing but a rule: nothing to look for
                       text(np.full(20, 7), copied)],  # a rule, then text the corpus holds
             "templated": [text(instruction, rng.integers(100, 50_000, 10)) for _ in range(20)]}
    grams = contamination.item_ngrams(items, lambda batch: [[int(t) for t in s.split()] for s in batch])
    found = contamination.scan([corpus], grams, log=lambda line: None)["tasks"]
    assert found["rules"]["contaminated_items"] == [2] and found["rules"]["checked"] == 2
    assert found["templated"]["contaminated"] == 0 and found["templated"]["template_ngrams"] >= 8


# ----------------------------------------------------------------- held-out perplexity
def test_held_out_perplexity_is_the_models_own_loglikelihood_per_byte(teacher_dir, corpus_dir, tmp_path,
                                                                       capsys):
    """`perplexity=[corpus]` scores whole documents through lm-eval's rolling log-likelihood:
    bits per byte against a direct computation with the project's own model; the documents
    the training data holds are counted, and the figure over the others is the same corpus
    without them, scored on its own."""
    import math

    import torch

    from letrecipes.components.teachers import load_teacher

    lines = play_lines(corpus_dir, 2)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": text}) + "\n" for text in [lines[0], *INVENTED, lines[1]]))
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(json.dumps({"text": text}) + "\n" for text in INVENTED))
    # in windows of the model's context (32 positions), as the reference below
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", "tasks=[]", "max_len=32",
                             f"perplexity=[{held},{fresh}]", f"output={tmp_path / 'scores.json'}"])
    report = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert report["tasks"] == {} and set(report["perplexity"]) == {"held", "fresh"}
    out = capsys.readouterr().out
    assert "past the model's context" not in out
    assert f"perplexity: fresh: 3 document(s), 0.00 MB of text from {fresh}" in out
    scores, alone = report["perplexity"]["held"], report["perplexity"]["fresh"]

    teacher = load_teacher({"_component_": "auto", "path": str(teacher_dir), "dtype": "fp32"})
    tokenizer = Tokenizer(teacher.tokenizer_path)

    context = json.loads((teacher_dir / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]

    def loglikelihood(text: str) -> float:
        """Every token, the first after the end-of-text token, in windows of the model's context."""
        total = 0.0
        for before, scored in rolling_windows(tokenizer.encode(text), tokenizer.eos_id, context):
            ids = torch.tensor([before + scored])[:, -context - 1:]
            logp = torch.log_softmax(teacher.logits(ids[:, :-1]).float(), -1)[0]
            total += logp[-len(scored):].gather(1, torch.tensor(scored)[:, None]).sum().item()
        return total

    texts = [lines[0], *INVENTED, lines[1]]
    nats = -sum(loglikelihood(text) for text in texts)
    size = sum(len(text.encode("utf-8")) for text in texts)
    assert scores["n"] == 5 and scores["bits_per_byte"] == pytest.approx(nats / size / math.log(2), rel=1e-4)
    assert scores["byte_perplexity"] == pytest.approx(math.exp(nats / size), rel=1e-4)
    assert scores["contaminated"] == 2 and scores["n_clean"] == 3 and alone["contaminated"] == 0
    assert scores["bits_per_byte_clean"] == pytest.approx(alone["bits_per_byte"], rel=1e-6)
    assert report["contamination"]["tasks"]["held"]["contaminated_items"] == [0, 4]


def rolling_windows(tokens, first_context: int, size: int):
    """(context, tokens scored) covering every token once, each window at most ``size``
    tokens of input: the first scored after ``first_context``, each later one after the
    tokens before it (as many as fit)."""
    windows, done = [], 0
    while done < len(tokens):
        scored = tokens[done:done + size]
        before = tokens[max(0, done + len(scored) - size - 1):done] if done else [first_context]
        windows.append((before, scored))
        done += len(scored)
    return windows


def test_a_prepared_folder_gives_back_its_documents_as_text(prepared, corpus_dir, tokenizer_path, monkeypatch):
    from letrecipes.components import evaluation
    from letrecipes.components.corpus import read_documents

    plays = list(read_documents(corpus_dir))
    assert evaluation.held_out_documents(str(prepared.folder), 2, "text", [], "perplexity[0]") == plays[:2]
    monkeypatch.setattr(evaluation, "READ_TOKENS", 997)  # documents across many reads
    assert evaluation.held_out_documents(str(prepared.folder), 0, "text", [], "perplexity[0]") == plays


def test_perplexity_corpora_that_cannot_be_scored_are_named_before_the_model(teacher_dir, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("converted before the perplexity corpora were read")

    monkeypatch.setattr(eval_recipe, "export_any", never)
    common = ["--config", "eval", f"checkpoint={teacher_dir}", "tasks=[]"]
    expect_setup_error(eval_recipe.recipe_main, common, match="tasks and perplexity are both empty: nothing to score")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    expect_setup_error(eval_recipe.recipe_main, [*common, f"perplexity=[{tmp_path / 'blank.txt'}]"],
                       match=f"perplexity[0]: '{tmp_path / 'blank.txt'}' holds no text to score")
    (tmp_path / "other").mkdir()
    for folder in (tmp_path, tmp_path / "other"):
        (folder / "held.txt").write_text("Some held-out text.")
    expect_setup_error(eval_recipe.recipe_main,
                       [*common, f"perplexity=[{tmp_path / 'held.txt'},{tmp_path / 'other' / 'held.txt'}]"],
                       match=f"perplexity[1]: '{tmp_path / 'other' / 'held.txt'}' has the name 'held' of another task")


def test_findings_are_kept_and_given_again_until_the_corpus_or_the_items_change(prepared, corpus_dir, tmp_path,
                                                                                 monkeypatch):
    """Scoring each checkpoint of a run looks the same items up in the same training data:
    at scale a scan of minutes each time. The findings are kept and read back instead."""
    import os

    corpus = contamination.Corpus.read(shutil.copytree(prepared.folder, tmp_path / "corpus"), "test")
    texts = {"t": [contamination.item_text(as_item(text)) for text in [*play_lines(corpus_dir, 2), INVENTED[0]]]}
    cache, lines = tmp_path / "cache", []
    first = contamination.check_items([corpus], texts, [], cache_dir=cache, log=lines.append)
    assert first["tasks"]["t"]["contaminated_items"] == [0, 1] and len(list(cache.iterdir())) == 1
    real_scan = contamination.scan

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(contamination, "scan", no_scan)
    lines.clear()
    assert contamination.check_items([corpus], texts, [], cache_dir=cache, log=lines.append) == first
    assert "found as kept in" in lines[0]
    # a damaged record, one edited (it still parses: a count changed, a list of the wrong kind
    # was given as found, or failed in the lines logged from it), other items, or a corpus
    # changed since: scanned again
    as_written = {kept: kept.read_text(encoding="utf-8") for kept in cache.iterdir()}
    for change in ("damaged", "edited", "wrong kind", "items", "corpus"):
        for kept, text in as_written.items():
            kept.write_text(text)
        if change in ("edited", "wrong kind"):
            for kept in cache.iterdir():
                record = json.loads(kept.read_text(encoding="utf-8"))
                record["report"]["tasks"]["t"]["contaminated"] = 0 if change == "edited" else "many"
                kept.write_text(json.dumps(record))
        elif change == "items":
            texts = {"t": texts["t"][:2]}
        elif change == "corpus":
            shard = corpus.folder / corpus.manifest["shards"][0]["file"]
            os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
        else:
            for kept in cache.iterdir():
                kept.write_text("{")
        lines.clear()
        with pytest.raises(AssertionError, match="scanned again"):
            contamination.check_items([corpus], texts, [], cache_dir=cache, log=lines.append)
        if change in ("edited", "wrong kind"):
            assert lines == [f"contamination: the findings kept in {next(cache.iterdir())} are not as they were "
                             "written (edited or damaged): scanning again"]
    monkeypatch.setattr(contamination, "scan", real_scan)
    assert contamination.check_items([corpus], texts, [], cache_dir=cache, log=lines.append)["tasks"]["t"][
        "contaminated_items"] == [0, 1]
