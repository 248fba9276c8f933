"""Zero-shot multiple-choice evaluation through lm-evaluation-harness.

The project's tasks are JSON-lines files, one item per line: ``{"context": str,
"choices": [str, ...], "gold": int}``. :func:`write_lm_eval_tasks` turns each file into an
lm-eval task definition that reads it locally (no hub access), and :func:`run_lm_eval`
scores a Hugging Face model folder on them with lm-eval's own ``hf`` model, so the
numbers are the ones users compare against: ``acc`` (the highest summed log-likelihood
of a choice given the context wins) and ``acc_norm`` (the same per character of the
choice). Each choice is scored as written after the context (``target_delimiter`` is
empty: choices carry their own leading space); an empty context becomes the
end-of-text token. The eval recipe (``letrecipes/eval.py``) first converts whatever
checkpoint it is given into such a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.files import replace_atomically
from letrecipes.components.models import MAX_BLOCKS
from letrecipes.components.run_info import outdated

READ_TOKENS = 1 << 20  # a prepared folder's tokens read at a time for held-out documents
LM_EVAL_TAG = "letrecipes"  # `lm_eval --tasks letrecipes` runs every task of a folder
TASK_PREFIX = "letrecipes_"  # keeps our names clear of lm-eval's own (it has a `hyperbaton` too)


class EvalError(LetRecipesError):
    pass


@dataclass
class Item:
    context: str
    choices: List[str]
    gold: int


def read_task(path: Union[str, Path], limit: int = 0) -> List[Item]:
    """Items of a JSON-lines task file (the first ``limit`` when > 0), checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"eval task file {str(path)!r} does not exist. Fix: run `python -m benchmarks.fetch_eval_tasks` "
                        "(bigbench tasks), point tasks at JSON-lines files of {context, choices, gold}, or name one "
                        "of lm-eval's own tasks (hellaswag, arc_easy, ...).")
    shape = 'Fix: one JSON object per line, {"context": "...", "choices": ["...", "..."], "gold": <index of the right one>}.'
    items = []
    try:  # utf-8-sig: a byte-order mark, as Windows editors and Excel write, is dropped
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        at_line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise EvalError(f"{path}:{at_line}: not UTF-8 ({err.reason} at byte {err.start:,}). Fix: save the file as "
                        "UTF-8 (iconv -f latin1 -t utf-8 FILE > FILE.utf8, for a Latin-1 file).") from err
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{number}: not valid JSON ({err}). {shape}") from err
        missing = [k for k in ("context", "choices", "gold") if not isinstance(raw, dict) or k not in raw]
        if missing:
            has = f"its fields are {list(raw)[:8]}" if isinstance(raw, dict) else f"it is a JSON {type(raw).__name__}"
            raise EvalError(f"{path}:{number}: not a task item: no {', '.join(missing)} ({has}). {shape}")
        if not isinstance(raw["choices"], list):  # a string would be scored as its characters
            raise EvalError(f"{path}:{number}: choices is a JSON {type(raw['choices']).__name__}, not a list of the "
                            f"choices. {shape}")
        texts = {"context": raw["context"], **{f"choices[{i}]": c for i, c in enumerate(raw["choices"])}}
        for name, value in texts.items():  # a number is its digits; null, true or an object was scored as "None"
            if isinstance(value, (bool, dict, list)) or value is None:
                raise EvalError(f"{path}:{number}: {name} is {json.dumps(value)[:40]}, not text. {shape}")
        gold = raw["gold"]
        if isinstance(gold, bool) or (isinstance(gold, float) and not gold.is_integer()):
            raise EvalError(f"{path}:{number}: gold={gold!r} is not the index of a choice. {shape}")
        try:
            item = Item(str(raw["context"]), [str(c) for c in raw["choices"]], int(gold))
        except (TypeError, ValueError) as err:
            raise EvalError(f"{path}:{number}: not a task item ({err}). {shape}") from err
        if len(item.choices) < 2 or not 0 <= item.gold < len(item.choices):
            raise EvalError(f"{path}:{number}: {len(item.choices)} choice(s) and gold={item.gold}: an item needs at "
                            f"least 2 choices and 0 <= gold < len(choices). {shape}")
        if not all(item.choices):
            raise EvalError(f"{path}:{number}: a choice is empty (it would have no tokens to score). Fix: give every "
                            "choice some text.")
        items.append(item)
        if limit and len(items) == limit:
            break
    if not items:
        raise EvalError(f"eval task file {str(path)!r} has no items. {shape}")
    return items


def chance_level(items: Sequence[Item]) -> float:
    return sum(1 / len(i.choices) for i in items) / len(items)


def write_task(path: Union[str, Path], items: Iterable[Item]) -> Path:
    return _write_json_lines(path, ({"context": i.context, "choices": i.choices, "gold": i.gold} for i in items))


def write_documents(path: Union[str, Path], documents: Iterable[str]) -> Path:
    """Documents as lm-eval's perplexity task reads them: JSON lines of ``{"text": ...}``."""
    return _write_json_lines(path, ({"text": text} for text in documents))


def _write_json_lines(path: Union[str, Path], records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def held_out_documents(source: str, count: int, text_field: str, tokenizers: Sequence[Path], key: str) -> List[str]:
    """The first ``count`` (0: all) non-blank documents of a corpus, for perplexity: any
    corpus ``data.source`` reads, or a prepared folder (its tokens decoded with the
    tokenizer it was prepared with, document by document)."""
    from letrecipes.components.corpus import is_token_shards, read_documents

    documents: List[str] = []
    if is_token_shards(source):
        from letrecipes.components.contamination import Corpus, corpus_tokenizer

        corpus = Corpus.read(source, key)
        tokenizer, eos = corpus_tokenizer([corpus], tokenizers, key), int(corpus.manifest["tokenizer"]["eos_id"])
        dtype = np.dtype(corpus.manifest["dtype"])
        for shard in corpus.manifest["shards"]:  # read a million tokens at a time: as far as the documents wanted
            carry = np.zeros(0, dtype=dtype)
            for start in range(0, int(shard["tokens"]), READ_TOKENS):
                tokens = np.concatenate([carry, np.fromfile(corpus.folder / shard["file"], dtype=dtype,
                                                            count=READ_TOKENS, offset=start * dtype.itemsize)])
                ends = np.flatnonzero(tokens == eos)
                for begin, stop in zip(np.concatenate([[0], ends[:-1] + 1]), ends):
                    text = tokenizer.decode(tokens[begin:stop].tolist())
                    if text.strip():
                        documents.append(text)
                    if count and len(documents) == count:
                        return documents
                carry = tokens[ends[-1] + 1:] if len(ends) else tokens
        return documents
    for text in read_documents(source, text_field, key=key):
        if text.strip():
            documents.append(text)
        if count and len(documents) == count:
            break
    return documents


# ----------------------------------------------------------------- lm-eval task definitions
def lm_eval_task_name(task_file: Union[str, Path]) -> str:
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", Path(task_file).stem)


def lm_eval_task_config(name: str, task_file: Union[str, Path], perplexity: bool = False) -> str:
    """lm-eval's YAML for one task file (JSON strings are valid YAML: paths need no escaping):
    multiple choice over ``{context, choices, gold}`` items, or, with ``perplexity``, the
    log-likelihood of whole ``{text}`` documents (lm-eval's rolling windows, as its wikitext
    task): word and byte perplexity and bits per byte, which compare across tokenizers."""
    data_file = json.dumps(str(Path(task_file).resolve()))
    if perplexity:
        scoring = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false"""
    else:
        scoring = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true"""
    return f"""# Written by letrecipes (components/evaluation.py) for {Path(task_file).name}.
task: {name}
tag: {LM_EVAL_TAG}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
{scoring}
metadata:
  version: 1.0
"""


def write_lm_eval_group(name: str, members: Sequence[str], aggregate: Sequence[Mapping[str, Any]],
                        folder: Union[str, Path]) -> str:
    """An lm-eval group of our task files (lm-eval's own group, mmlu, over the copies of its
    tasks written here), so lm-eval aggregates it as it aggregates its own; returns its name."""
    group = lm_eval_task_name(name)
    replace_atomically(Path(folder) / f"{group}.yaml", "# Written by letrecipes (components/evaluation.py).\n"
                       + json.dumps({"group": group, "task": list(members),
                                     "aggregate_metric_list": [dict(spec) for spec in aggregate],
                                     "metadata": {"version": 1.0}}, indent=1) + "\n")
    return group


def write_lm_eval_tasks(task_files: Iterable[Union[str, Path]], folder: Union[str, Path],
                        perplexity_files: Iterable[Union[str, Path]] = (),
                        builtins: Iterable["LmEvalTask"] = (), num_fewshot: Optional[int] = None) -> Dict[str, str]:
    """One lm-eval task YAML per task file (per perplexity file of ``{text}`` documents, per
    lm-eval task of ``builtins``) into ``folder``; returns {report name: task name}, the
    report name being the file's stem or lm-eval's task name. ``num_fewshot``, when given,
    is written into every task but the perplexity ones (whole documents take no examples).

    ``lm_eval --include_path <folder> --tasks letrecipes`` then runs them all.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shots = f"num_fewshot: {int(num_fewshot)}\n" if num_fewshot is not None else ""
    names: Dict[str, str] = {}
    configs = [(Path(f).stem, lm_eval_task_name(f), lambda n, f=f: lm_eval_task_config(n, f) + shots)
               for f in task_files]
    configs += [(Path(f).stem, lm_eval_task_name(f), lambda n, f=f: lm_eval_task_config(n, f, perplexity=True))
                for f in perplexity_files]
    configs += [(task.name, lm_eval_task_name(task.name), lambda n, t=task: lm_eval_builtin_config(n, t) + shots)
                for task in builtins]
    for stem, name, config in configs:
        if stem in names or name in names.values():
            raise EvalError(f"tasks: two tasks here are named {stem!r} (a task file's name, or lm-eval's). Fix: "
                            "rename one of the files.")
        replace_atomically(folder / f"{name}.yaml", config(name))
        names[stem] = name
    return names


# ----------------------------------------------------------------- lm-eval's own tasks (hellaswag, arc_easy, ...)
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


def is_lm_eval_name(spec: Union[str, Path]) -> bool:
    """A bare word that is no file (``hellaswag``, ``arc_easy``) names an lm-eval task."""
    path = Path(spec)
    return not path.exists() and path.suffix == "" and len(path.parts) == 1


@dataclass
class LmEvalTask:
    """One of lm-eval's own tasks, scored as lm-eval defines it (its prompt, its choices,
    its metrics) on data from ``data`` (a local folder) or, without one, from this
    machine's ``datasets`` cache. ``overrides`` are the keys our task file sets over
    lm-eval's definition (where the data is, the splits it lacks)."""
    name: str
    definition: Path
    hub_dataset: str
    overrides: Dict[str, Any]
    data_key: str = ""  # the setting its data comes from: task_data.<task>, or task_data.<its group>
    split: str = ""  # the split scored, once the task is loaded

    @property
    def source(self) -> str:
        return str(self.overrides.get("dataset_path", f"the datasets cache ({self.hub_dataset})"))


_TASK_INDEX: Dict[str, Any] = {}


def _lm_eval_index():
    """lm-eval's index of its own tasks (about 6 s to build: once per process)."""
    if "index" not in _TASK_INDEX:
        _, TaskManager = import_lm_eval()
        _TASK_INDEX["index"] = TaskManager().task_index
    return _TASK_INDEX["index"]


def lm_eval_members(name: str, key: str) -> Tuple[List[str], Optional[List[Dict[str, Any]]]]:
    """The lm-eval tasks ``name`` stands for: itself; a tag's tasks (``ai2_arc``: arc_easy,
    arc_challenge); a group's, its subgroups and tags opened (``mmlu``: 57 subjects), with
    the group's ``aggregate_metric_list`` (None for a task or a tag: lm-eval gives them none)."""
    import difflib

    from lm_eval.tasks._yaml_loader import load_yaml

    index = _lm_eval_index()
    entry = index.get(name)
    if entry is None:
        lowered = {n.lower(): n for n in index}  # ARC_Easy is arc_easy's typo too
        close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=3)]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise EvalError(f"{key}: {name!r} is no task file and no lm-evaluation-harness task{hint}. Fix: a JSON-lines "
                        "file of {context, choices, gold}, or one of `lm_eval ls tasks`.")
    kind = entry.kind.name
    if kind == "TAG":
        return sorted(n for n, e in index.items() if e.kind.name == "TASK" and name in (e.tags or ())), None
    if kind == "TASK":
        return [name], None
    definition = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}
    members: List[str] = []
    for part in definition.get("task") or []:
        if not isinstance(part, str):  # a task defined inside the group's file has no name of its own to override
            raise EvalError(f"{key}: lm-eval's group {name!r} defines a task inside its own file; this recipe scores "
                            "named tasks. Fix: name the group's tasks in tasks=[...], or score it with `lm_eval`.")
        members += [m for m in lm_eval_members(part, key)[0] if m not in members]
    if not members:
        raise EvalError(f"{key}: lm-eval's {kind.lower()} {name!r} holds no task this recipe can score. Fix: name "
                        "its tasks in tasks=[...].")
    return members, list(definition.get("aggregate_metric_list") or [])


def lm_eval_task(name: str, data: Optional[str], key: str, data_key: Optional[str] = None,
                 cache_dir: Optional[Path] = None) -> LmEvalTask:
    """lm-eval's task ``name`` with its data: ``data`` a local folder (a copy of the hub
    dataset, ``hf download <dataset> --repo-type dataset --local-dir <folder>``, or a folder
    of parquet or JSON-lines files named by split), or None for the ``datasets`` cache. Checked
    here, before any model: the name, the folder, the configuration and splits in it.
    ``data_key`` names the setting ``data`` came from (``task_data.<its group>``);
    ``cache_dir`` is where ``datasets`` converts the copy (a folder of this evaluation's
    own: its shared cache keys a local copy by folder name and file patterns, not by
    content, so a copy changed since, or another copy in a folder of the same name, would
    be read as the old one)."""
    data_key = data_key or f"task_data.{name}"
    entry = _lm_eval_index().get(name)
    if entry is None or entry.kind.name != "TASK" or entry.yaml_path is None:
        raise EvalError(f"{key}: {name!r} is no lm-evaluation-harness task with a definition file. Fix: name another.")
    from lm_eval.tasks._yaml_loader import load_yaml

    definition = load_yaml(entry.yaml_path, resolve_func=False)
    task = LmEvalTask(name, Path(entry.yaml_path), str(definition.get("dataset_path")), {}, data_key)
    if data is not None:
        path, config, splits = _local_task_data(Path(data).expanduser(), definition.get("dataset_name"),
                                                data_key, task.hub_dataset)
        task.overrides.update(dataset_path=str(path.resolve()), dataset_name=config)
        if cache_dir is not None:
            task.overrides["dataset_kwargs"] = {**(definition.get("dataset_kwargs") or {}), "cache_dir": str(cache_dir)}
        # a split lm-eval's definition names and the folder lacks (a few-shot train split,
        # a test split without labels left out of the copy) is no split here
        task.overrides.update({split: None for split in SPLITS if definition.get(split) not in (None, *splits)})
        if not any(definition.get(split) in splits for split in ("validation_split", "test_split")):
            wanted = " or ".join(str(definition[s]) for s in ("test_split", "validation_split") if definition.get(s))
            raise EvalError(f"{data_key}: {str(data)!r} holds the split(s) {', '.join(splits)}, not {wanted}, "
                            f"which lm-eval's {name} scores. Fix: point it at a full copy of {task.hub_dataset}.")
    return task


def _local_task_data(folder: Path, config: Optional[str], key: str, hub_dataset: str):
    """(path, configuration, splits) ``datasets`` reads a task's local copy with. A hub
    snapshot names its configurations in its README (ai2_arc: ARC-Easy, ARC-Challenge);
    without one, a subfolder named after the configuration holds it (the parquet
    conversion's layout), else the folder's files are the configuration."""
    import datasets

    fix = _download_fix(hub_dataset, key)
    if folder.is_file():
        raise EvalError(f"{key}: {str(folder)!r} is a file; the data of a task is a folder, its files named by split "
                        f"(validation.jsonl, test-00000-of-00001.parquet, ...). Fix: move the file into a folder of "
                        f"its own, named by its split, and set {key}=<folder>.")
    if not folder.is_dir():
        raise EvalError(f"{key}: {str(folder)!r} is not a folder. {fix}")
    if (folder / "dataset_dict.json").is_file() and outdated("datasets", (5, 0), datasets.__version__):
        # datasets 2.21-4.8 read such a folder's JSON files as its data: "'question' is undefined" in lm-eval's prompt
        raise EvalError(f"{key}: {str(folder)!r} is a copy written by `save_to_disk` (dataset_dict.json), which "
                        f"datasets reads as one from 5.0; {datasets.__version__} is installed. Fix: pip install "
                        "'datasets>=5' (constraints.txt pins the tested one), or a copy made with `hf download "
                        f"{hub_dataset} --repo-type dataset --local-dir <folder>`.")
    path, name = folder, config
    if config and not _declares_configs(folder):
        # the parquet conversion (<config>/<split>/0000.parquet, beside the other configurations' folders),
        # else a folder of this configuration's files alone
        path, name = (folder / config if (folder / config).is_dir() else folder), None
    try:
        builder = datasets.load_dataset_builder(str(path), name)
        return path, name, [str(split) for split in (builder.config.data_files or {})]
    except ValueError as err:  # "BuilderConfig 'X' not found. Available: [...]"
        reason = str(err).splitlines()[0]
    except (FileNotFoundError, datasets.data_files.EmptyDatasetError) as err:
        raise EvalError(f"{key}: {str(folder)!r} holds no data files datasets reads ({err}). {fix}") from None
    wanted = (f"has no configuration {config!r}, which lm-eval's task reads" if config else
              "holds several configurations and lm-eval's task names none")
    raise EvalError(f"{key}: {str(folder)!r} {wanted} ({reason}). {fix}")


def _download_fix(hub_dataset: str, key: str) -> str:
    return (f"Fix: on a machine with network, `hf download {hub_dataset} --repo-type dataset --local-dir <folder>`, "
            f"copy the folder here and set {key}=<folder> (docs/evaluation.md).")


def _declares_configs(folder: Path) -> bool:
    """A hub snapshot of several configurations names them in its README's header."""
    readme = folder / "README.md"
    return readme.is_file() and "config_name:" in readme.read_text(encoding="utf-8", errors="replace")


def lm_eval_builtin_config(name: str, task: LmEvalTask) -> str:
    """Our task file for one of lm-eval's tasks: its definition included whole (prompt,
    choices, metrics, its Python helpers), the data's place and missing splits set over it."""
    overrides = "".join(f"{key}: {json.dumps(value)}\n" for key, value in task.overrides.items())
    return f"""# Written by letrecipes (components/evaluation.py): lm-eval's own {task.name}.
include: {json.dumps(str(task.definition))}
task: {name}
tag: {LM_EVAL_TAG}
{overrides}"""


def lm_eval_task_docs(manager: Any, name: str, task: LmEvalTask, limit: int) -> List[Dict[str, Any]]:
    """The items lm-eval will score for ``task`` (the first ``limit``; ``manager`` an lm-eval
    TaskManager of the folder its definition is in), each as ``{"text":
    what a model trained on it would have read (prompt and right answer), "choices": n or
    None}``; reading them loads the data, so a task whose data is not here fails now, in
    one line, not after the model is loaded."""
    offline()  # data not on this machine is said at once, not after minutes of retries
    fix = _download_fix(task.hub_dataset, task.data_key)
    try:
        loaded = manager.load([name])["tasks"][name]
        task.split = str(loaded.config.test_split if loaded.has_test_docs() else loaded.config.validation_split)
        items = [_item(loaded, doc) for doc in list(loaded.eval_docs)[:limit or None]]
    except (ConnectionError, FileNotFoundError) as err:
        raise EvalError(f"tasks: lm-eval's {task.name} reads {task.source}, which is not on this machine "
                        f"({str(err).splitlines()[0]}); the recipe never downloads. {fix}") from None
    except Exception as err:  # noqa: BLE001 - data of another shape than the task's prompt reads: said in one line
        raise EvalError(f"tasks: lm-eval's {task.name} cannot read {task.source}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}. {fix}") from None
    if not items:
        raise EvalError(f"tasks: lm-eval's {task.name} found no items in {task.source} ({task.split} split). {fix}")
    return items


def _item(task: Any, doc: Mapping) -> Dict[str, Any]:
    text, target = task.doc_to_text(doc), task.doc_to_target(doc)
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
    if isinstance(text, int):  # winogrande's way: the choices are the contexts, the target what follows
        text, answer = choices[text], target
    else:
        answer = choices[target] if choices is not None and isinstance(target, int) else target
    answer = answer[0] if isinstance(answer, list) and answer else answer
    return {"text": f"{text}{task.config.target_delimiter}{answer}",
            "choices": len(choices) if choices is not None else None}



@dataclass
class PreparedTasks:
    """What the tasks of a run resolve to: lm-eval's task per report name, and for each task
    its items as text (looked for in the training data) and its chance level (None where
    the task is no multiple choice); for each lm-eval group or tag named, its tasks and
    the group's aggregate metrics."""
    names: Dict[str, str]
    texts: Dict[str, List[str]]
    chance: Dict[str, Optional[float]]
    data: Dict[str, Dict[str, str]]  # lm-eval's own tasks: the data scored, {"source", "split"}
    groups: Dict[str, Dict[str, Any]]  # {"tasks": [...], "lm_eval_group": our group's name, None for a tag}
    items: Dict[str, Tuple[str, List[Item]]] = None  # the task files' items, with the file: {name: (file, items)}


def prepare_tasks(specs: Sequence[str], task_data: Mapping[str, str], limit: int, folder: Union[str, Path],
                  perplexity_files: Sequence[Union[str, Path]] = (), log=print,
                  num_fewshot: Optional[int] = None) -> PreparedTasks:
    """Each of ``specs`` (a task file, or the name of one of lm-eval's tasks, tags or groups
    with its data in ``task_data`` or this machine's ``datasets`` cache) read, checked and
    written as lm-eval tasks into ``folder``/tasks; every item is read here, before any model."""
    from letrecipes.components.contamination import item_text

    folder = Path(folder)
    stray = sorted(set(task_data) - {str(s) for s in specs})
    if stray:
        raise EvalError(f"task_data.{stray[0]}: names no task in tasks={list(specs)}. Fix: add {stray[0]} to tasks, or "
                        f"remove task_data.{stray[0]}.")
    missing = [f"task_data.{name}={where}" for name, where in task_data.items()
               if not Path(str(where)).expanduser().exists()]
    if len(missing) > 1:  # all at once: a config of nine tasks is not fixed one error at a time
        raise EvalError(f"task_data: {len(missing)} folders are not there: {', '.join(missing)}. Fix: copy each task's "
                        "data there (`hf download <its dataset> --repo-type dataset --local-dir <folder>` where there "
                        "is network; eval_let_paper.yaml's header has the loop), or point task_data at the copies.")
    files, builtins, texts, chance, data, groups, read = [], {}, {}, {}, {}, {}, {}
    for i, spec in enumerate(specs):
        if is_lm_eval_name(spec):
            members, aggregate = lm_eval_members(str(spec), f"tasks[{i}]")
            if members != [spec]:
                groups[str(spec)] = {"tasks": members, "aggregate": aggregate}
            for member in members:  # a task's own folder, else its group's
                given = member if member in task_data else str(spec)
                if member not in builtins:
                    builtins[member] = lm_eval_task(member, task_data.get(given), f"tasks[{i}]",
                                                    data_key=f"task_data.{given}", cache_dir=folder / "datasets")
            continue
        # lm-eval scores the items as read and checked here (`"gold": "1"` is the index 1; lm-eval, given
        # the file itself, would compare the string and score every item wrong without a word)
        items = read_task(spec, limit=limit)
        tied = [n for n, item in enumerate(items, 1) if item.choices.count(item.choices[item.gold]) > 1]
        if tied:  # equal texts score equally, and the argmax takes the earlier: right or wrong by position alone
            log(f"warning: {spec}: {len(tied):,} of {len(items):,} item(s) hold the right choice twice or more (the "
                f"first: item {tied[0]}): equal choices score alike and the tie goes to the earlier one, so these "
                "items are right or wrong by position, not by the model. Fix: remove or correct those items.")
        read[Path(spec).stem] = (str(spec), items)
        files.append(write_task(folder / "data" / str(i) / f"{Path(spec).stem}.jsonl", items))
        texts[Path(spec).stem] = [item_text(item) for item in items]
        chance[Path(spec).stem] = chance_level(items)
    names = write_lm_eval_tasks(files, folder / "tasks", perplexity_files, builtins.values(), num_fewshot)
    in_groups = {member for group in groups.values() for member in group["tasks"]}
    manager = None
    for task in builtins.values():
        if manager is None:  # one index of the folder for every task: a group has dozens
            _, TaskManager = import_lm_eval()
            manager = TaskManager(include_path=str(folder / "tasks"), include_defaults=False)
        items = lm_eval_task_docs(manager, names[task.name], task, limit)
        texts[task.name] = [item["text"] for item in items]
        counts = [item["choices"] for item in items if item["choices"]]
        chance[task.name] = sum(1 / n for n in counts) / len(counts) if len(counts) == len(items) else None
        data[task.name] = {"source": task.source, "split": task.split}
        if task.name not in in_groups:
            log(f"tasks: {task.name}: {len(items):,} items, lm-eval's own task on the {task.split} split of "
                f"{task.source}")
    for name, group in groups.items():
        aggregate = group.pop("aggregate")
        group["lm_eval_group"] = (write_lm_eval_group(name, [names[m] for m in group["tasks"]], aggregate,
                                                      folder / "tasks") if aggregate else None)
        splits = sorted({data[member]["split"] for member in group["tasks"]})
        log(f"tasks: {name}: {len(group['tasks'])} lm-eval tasks, {sum(len(texts[m]) for m in group['tasks']):,} "
            f"items, on the {'/'.join(splits)} split of {data[group['tasks'][0]]['source']}")
    return PreparedTasks(names, texts, chance, data, groups, read)


def check_choice_tokens(items: Mapping[str, Tuple[str, List[Item]]], encode, log=print) -> None:
    """Each choice of the task files as lm-eval tokenizes it after its context (the pair
    encoded whole, the context's tokens taken off the front; a context's trailing spaces
    move to the choice): a choice left with no token of its own stops lm-eval with a bare
    AssertionError after the model is converted, so it is one error here, naming the line;
    choices whose first token merges with the context's last (scored on part of their
    text) are counted in one line. Choices are scored as written after the context, so
    they usually begin with a space."""
    merged, first = 0, None
    for name, (path, task_items) in items.items():
        for number, item in enumerate(task_items, 1):
            context = item.context
            spaces = len(context) - len(context.rstrip())
            for choice in item.choices:
                head, tail = (context[:-spaces], context[-spaces:] + choice) if spaces else (context, choice)
                if not head:
                    continue  # an empty context is the end-of-text token: nothing to merge with
                whole, alone = encode(head + tail), encode(head)
                if len(whole) <= len(alone):
                    raise EvalError(f"{path}: item {number}: the choice {choice!r} has no token of its own after the "
                                    f"context ({head[-20:] + tail!r} tokenizes as the context alone), so it cannot be "
                                    "scored. Fix: begin each choice with the space (or newline) that separates it "
                                    f"from the context, as lm-eval's own tasks do: {' ' + choice.lstrip()!r}.")
                if whole[:len(alone)] != alone:
                    merged += 1
                    first = first or f"{path}: item {number}, {choice!r}"
    if merged:
        log(f"tasks: {merged:,} choice(s) share their first token with the context's last (the first: {first}), so "
            "their scores cover only the rest of them; choices usually begin with a space.")


# ----------------------------------------------------------------- running lm-eval
def check_model_config(folder: Union[str, Path], key: str = "checkpoint") -> None:
    """The folder's config.json as transformers reads it, before any task is built: a value
    of the wrong kind (``"num_attention_heads": "4"``), a key gone, a model type this
    transformers does not know is then one line, not lm-eval's traceback from inside its
    model loading."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # transformers and huggingface_hub raise many types here
        detail = " ".join(str(err).split())
        raise EvalError(f"{key}: {str(Path(folder) / 'config.json')!r} does not load in transformers "
                        f"({type(err).__name__}: {detail[:300]}). Fix: use the config.json the model was released "
                        "or exported with.") from err


def check_scorable(folder: Union[str, Path], key: str = "checkpoint") -> None:
    """lm-eval's ``hf`` model loads a folder with AutoModelForCausalLM: a vision-language
    release whose configuration it does not map (Qwen2.5-VL, Mistral 3, LLaVA) was
    transformers' ValueError and a list of 200 classes from inside lm-eval."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(folder))  # check_model_config has read it
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    name = next(iter(getattr(config, "architectures", None) or []), config.model_type)
    raise EvalError(f"{key}: {str(folder)!r} is a {name}, which lm-eval's hf model cannot load (transformers' "
                    f"AutoModelForCausalLM has no class for model_type {config.model_type!r}). Fix: score it with "
                    "lm-eval's hf-multimodal model (lm_eval --model hf-multimodal), or a checkpoint of a causal "
                    "language model.")


def check_model_weights(folder: Union[str, Path], key: str = "checkpoint") -> None:
    """Each tensor of the folder's weight files the shape its config.json gives it (read from
    the safetensors headers, or from a pytorch_model.bin's index loaded onto the meta device,
    against the model built there: no weight is loaded). A config edited after the weights
    were written, or weights of another size, is then one line naming a tensor, not
    transformers' mismatch report and traceback from inside lm-eval, nor a model of the
    config's sizes allocated first (a `vocab_size` of 10**9 took all of this machine's memory)."""
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from letrecipes.components.hf_teacher import quantization

    config = AutoConfig.from_pretrained(str(folder))  # check_model_config has read it
    if quantization(config.to_dict(), Path(folder)):  # packed weights have shapes of their own: the quantizer checks
        return
    blocks = getattr(config.get_text_config(), "num_hidden_layers", None)
    if isinstance(blocks, int) and blocks > MAX_BLOCKS:  # built one by one below, even on the meta device: never ends
        raise EvalError(f"{key}: {str(Path(folder) / 'config.json')!r} gives {blocks:,} blocks (num_hidden_layers), "
                        f"past the {MAX_BLOCKS:,} a model is read with (Llama 3.1 405B has 126). Fix: use the "
                        "config.json the model was released or exported with.")
    from letrecipes.components.transformers_teacher import vision_language_class

    multimodal = vision_language_class(config.to_dict())
    try:
        with torch.device("meta"):  # a vision-language teacher by its own class: the auto class may not map it
            model = getattr(transformers, multimodal)(config) if multimodal else \
                AutoModelForCausalLM.from_config(config)
    except Exception as err:  # a value no model can be built from: -4 heads, an activation of no name, ...
        detail = " ".join(str(err).split())
        raise EvalError(f"{key}: {str(Path(folder) / 'config.json')!r} does not build a model in transformers "
                        f"({type(err).__name__}: {detail[:300]}). Fix: use the config.json the model was released "
                        "or exported with.") from err
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    model_name = _checkpoint_names(model)
    # transformers reads the safetensors where there are any, else the PyTorch files (older releases)
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("pytorch_model*.bin"))
    for file in files:
        try:
            if file.suffix == ".bin":  # onto the meta device: the pickle's index of shapes, no tensor data
                shapes = {name: tuple(tensor.shape) for name, tensor in torch.load(
                    file, map_location="meta", weights_only=True).items() if isinstance(tensor, torch.Tensor)}
            else:
                with safe_open(str(file), framework="pt") as weights:
                    shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        except Exception as err:  # safetensors and torch.load raise their own error types
            kind = "PyTorch weights" if file.suffix == ".bin" else "safetensors"
            raise EvalError(f"{key}: {str(file)!r} does not read as {kind} ({err}). Fix: re-download or re-export "
                            "the model.") from err
        for stored, shape in shapes.items():
            name = model_name(stored)
            if name in expected and expected[name] != shape:
                raise EvalError(f"{key}: tensor {name!r} in {str(file)!r} has shape {shape}, but "
                                f"{str(Path(folder) / 'config.json')!r} gives it {expected[name]}: the config and "
                                "the weights are of different models. Fix: use the config.json that came with these "
                                "weights.")


def _checkpoint_names(model) -> Callable[[str], Optional[str]]:
    """A weight file's tensor name -> the built model's, as transformers renames it when it
    loads: a vision-language release stores ``language_model.model.layers.0...`` where
    transformers 5 builds ``model.language_model.layers.0...``. A tensor that transformers
    converts (fuses, splits, transposes) maps to None: its stored shape is not the model's. This
    reads transformers' loading internals; where they differ (another version), names are
    compared as stored, which was the rule before."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = model.base_model_prefix
    except Exception:  # noqa: BLE001 - not this transformers' API: names as stored
        return lambda name: name

    def rename(name: str) -> Optional[str]:
        try:
            renamed, converted = rename_source_key(name, renamings, converters, prefix, meta)
        except Exception:  # noqa: BLE001 - as above
            return name
        if renamed not in meta and name in meta:
            return name
        return None if converted is not None else renamed

    return rename


def check_quantized_model(folder: Union[str, Path], key: str = "checkpoint") -> None:
    """A quantized Hugging Face folder (GPTQ, AWQ, bitsandbytes, FP8) is scored as transformers
    loads it, which takes the quantizer's own package and often a GPU. Asked of transformers'
    quantizer before the tasks are built, so that a missing one is one line, not lm-eval's
    traceback from deep inside its model loading."""
    from letrecipes.components.hf_teacher import quantization

    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers says what is wrong with it
    found = quantization(config, Path(folder)) if isinstance(config, dict) else None
    setting = config.get("quantization_config") if found else None
    if not setting:  # full precision, or a quantizer transformers does not read from config.json
        return
    from transformers.quantizers import AutoHfQuantizer

    try:
        quantizer = AutoHfQuantizer.from_config(setting)
        quantizer.validate_environment(device_map=None)
    except TypeError:  # a quantizer whose check takes other arguments: transformers will check as it loads
        return
    except (ImportError, ValueError, RuntimeError) as err:
        raise EvalError(f"{key}: {str(folder)!r} holds a quantized model ({found}), and transformers cannot load "
                        f"it here: {str(err).rstrip('.')}. Fix: install what it names with -c constraints.txt "
                        "(some quantizers need a GPU), or score the full-precision model.") from err


def offline() -> None:
    """Everything lm-eval needs is local; a hub lookup would only hang on a machine
    without network (the user's own settings win). huggingface_hub and datasets read the
    setting once, when imported: one imported already (the teacher loaders, a test run)
    is given it too."""
    import sys

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    hub = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = hub
    if "datasets.config" in sys.modules:
        datasets_offline = os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
        sys.modules["datasets.config"].HF_HUB_OFFLINE = datasets_offline
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = datasets_offline


# The oldest lm-evaluation-harness the eval recipe was run against whole (tests/test_lm_eval_tasks.py,
# test_study_and_eval.py pass with 0.4.13, the pin). 0.4.12 fails one: `lm_eval` itself finds
# no task in the folder this recipe writes; 0.4.9 has no lm_eval.tasks._yaml_loader (a traceback).
LM_EVAL_MIN = (0, 4, 13)


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise EvalError(f"evaluation needs lm-evaluation-harness, which is not importable ({err}). Fix: "
                        "`bash scripts/setup.sh` (it installs the eval extra), or "
                        "`pip install -c constraints.txt -e '.[eval]'`.") from err
    problem = outdated("lm-eval", LM_EVAL_MIN)
    if problem:
        raise EvalError(f"evaluation (lm-evaluation-harness's task index, the task files it writes) {problem}.")
    return lm_eval, TaskManager


def run_lm_eval(model_folder: Union[str, Path], task_folder: Union[str, Path], task_names: Mapping[str, str],
                device: str = "cpu", dtype: str = "float32", batch_size: Union[int, str] = 16,
                max_length: Optional[int] = None, limit: int = 0, tokenizer: Any = None,
                log_samples: bool = False, num_fewshot: Optional[int] = None,
                groups: Optional[Mapping[str, Tuple[str, Sequence[str]]]] = None) -> Dict[str, Any]:
    """Score a Hugging Face folder with lm-eval's ``hf`` model on the tasks in ``task_folder``.

    Returns ``{"tasks": {stem: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, "groups":
    {group: {its aggregate metrics, n}}, "seconds", "lm_eval_version"}`` and, with
    ``log_samples``, ``"samples": {stem: [lm-eval sample]}``. ``groups``: {report name:
    (lm-eval group in ``task_folder`` (:func:`write_lm_eval_group`), the task names it
    holds)}; lm-eval runs each whole and aggregates it its own way. ``num_fewshot``: None for
    what the task files say (:func:`prepare_tasks` writes it there; given here, it overrides
    them, and lm-eval warns once per task).
    """
    offline()
    lm_eval, TaskManager = import_lm_eval()
    model_args: Dict[str, Any] = {"pretrained": str(model_folder), "dtype": dtype}
    if max_length:
        model_args["max_length"] = int(max_length)
    if tokenizer is not None:
        model_args["tokenizer"] = tokenizer
    grouped = dict(groups or {})
    members = {name for _, names in grouped.values() for name in names}
    start = time.perf_counter()
    with _without_lm_eval_provenance():
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=[*(group for group, _ in grouped.values()),
                                                          *(n for n in task_names.values() if n not in members)],
            task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
            batch_size=batch_size, device=device, limit=limit or None, log_samples=log_samples,
            num_fewshot=num_fewshot)
    report: Dict[str, Any] = {"tasks": {}, "seconds": round(time.perf_counter() - start, 2),
                              "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}
    for stem, name in task_names.items():
        report["tasks"][stem] = {**_metrics(results["results"][name]),
                                 "n": int(results["n-samples"][name]["effective"])}
    report["groups"] = {report_name: {**_metrics(results["results"][group]),
                                      "n": sum(int(results["n-samples"][name]["effective"]) for name in names)}
                        for report_name, (group, names) in grouped.items()}
    if log_samples:
        report["samples"] = {stem: results["samples"][name] for stem, name in task_names.items()}
    return report


@contextlib.contextmanager
def _without_lm_eval_provenance():
    """lm-eval ends each evaluation by asking git for the working directory's commit (outside a
    repository git prints "fatal: not a git repository" on our stderr) and gathering torch's
    environment report (about 2 s a call here: pip and nvidia-smi run as subprocesses). Our
    reports record neither (the checkpoint, lm-eval's version and the tasks name what was
    scored), so both are skipped while an evaluation runs."""
    import lm_eval.evaluator as evaluator
    names = [name for name in ("get_git_commit_hash", "add_env_info") if hasattr(evaluator, name)]
    saved = {name: getattr(evaluator, name) for name in names}
    replacements = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    for name in names:
        setattr(evaluator, name, replacements[name])
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(evaluator, name, function)


def _metrics(scores: Mapping[str, Any]) -> Dict[str, Any]:
    """Every metric lm-eval gives a task or group (acc and acc_norm, or the perplexities),
    each with its standard error; lm-eval writes "N/A" where it has none (one item, a
    perplexity): null here, a number or nothing."""
    metrics = [key[:-len(",none")] for key in scores if key.endswith(",none") and "_stderr," not in key]
    entry = {metric: scores[f"{metric},none"] for metric in metrics}
    entry.update({f"{metric}_stderr": _number_or_none(scores.get(f"{metric}_stderr,none")) for metric in metrics})
    return entry


def _number_or_none(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
