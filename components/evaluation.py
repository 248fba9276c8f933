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

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.files import replace_atomically

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
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1:
        # a bare word is lm-eval's task name (hellaswag, arc_easy): its data lives on the hub
        raise EvalError(f"eval task {str(path)!r} is not a file; a bare name reads as an lm-evaluation-harness task, "
                        "whose data this recipe never downloads. Fix: point tasks at JSON-lines files of {context, "
                        "choices, gold} (`python -m benchmarks.fetch_eval_tasks` writes some), or score the task with "
                        "lm-eval's own command on an export where its data can be fetched or is cached: `lm_eval "
                        f"--model hf --model_args pretrained=<output_dir>/final --tasks {path}` (docs/evaluation.md).")
    if not path.is_file():
        raise EvalError(f"eval task file {str(path)!r} does not exist. Fix: run `python -m benchmarks.fetch_eval_tasks` "
                        "(bigbench tasks) or point tasks at JSON-lines files of {context, choices, gold}.")
    shape = 'Fix: one JSON object per line, {"context": "...", "choices": ["...", "..."], "gold": <index of the right one>}.'
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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


def write_lm_eval_tasks(task_files: Iterable[Union[str, Path]], folder: Union[str, Path],
                        perplexity_files: Iterable[Union[str, Path]] = ()) -> Dict[str, str]:
    """One lm-eval task YAML per task file (and per perplexity file of ``{text}`` documents)
    into ``folder``; returns {file stem: task name}.

    ``lm_eval --include_path <folder> --tasks letrecipes`` then runs them all.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names: Dict[str, str] = {}
    for task_file, perplexity in [*((f, False) for f in task_files), *((f, True) for f in perplexity_files)]:
        stem, name = Path(task_file).stem, lm_eval_task_name(task_file)
        if name in names.values():
            raise EvalError(f"tasks: two task files map to the lm-eval task {name!r}. Fix: rename one of them.")
        replace_atomically(folder / f"{name}.yaml", lm_eval_task_config(name, task_file, perplexity))
        names[stem] = name
    return names


# ----------------------------------------------------------------- running lm-eval
def offline() -> None:
    """Everything lm-eval needs is local; a hub lookup would only hang on a machine
    without network (the user's own settings win)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise EvalError(f"evaluation needs lm-evaluation-harness, which is not importable ({err}). Fix: "
                        "`bash scripts/setup.sh` (it installs the eval extra), or "
                        "`pip install -c constraints.txt -e '.[eval]'`.") from err
    return lm_eval, TaskManager


def run_lm_eval(model_folder: Union[str, Path], task_folder: Union[str, Path], task_names: Mapping[str, str],
                device: str = "cpu", dtype: str = "float32", batch_size: Union[int, str] = 16,
                max_length: Optional[int] = None, limit: int = 0, tokenizer: Any = None,
                log_samples: bool = False) -> Dict[str, Any]:
    """Score a Hugging Face folder with lm-eval's ``hf`` model on the tasks in ``task_folder``.

    Returns ``{"tasks": {stem: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, "seconds",
    "lm_eval_version"}`` and, with ``log_samples``, ``"samples": {stem: [lm-eval sample]}``.
    """
    offline()
    lm_eval, TaskManager = import_lm_eval()
    model_args: Dict[str, Any] = {"pretrained": str(model_folder), "dtype": dtype}
    if max_length:
        model_args["max_length"] = int(max_length)
    if tokenizer is not None:
        model_args["tokenizer"] = tokenizer
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=list(task_names.values()),
        task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
        batch_size=batch_size, device=device, limit=limit or None, log_samples=log_samples)
    report: Dict[str, Any] = {"tasks": {}, "seconds": round(time.perf_counter() - start, 2),
                              "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}
    for stem, name in task_names.items():
        scores = results["results"][name]
        # every metric the task has (acc and acc_norm, or the perplexities), each with its standard error;
        # lm-eval writes "N/A" where it has none (one item, a perplexity): null here, a number or nothing
        metrics = [key[:-len(",none")] for key in scores if key.endswith(",none") and "_stderr," not in key]
        entry = {metric: scores[f"{metric},none"] for metric in metrics}
        entry.update({f"{metric}_stderr": _number_or_none(scores.get(f"{metric}_stderr,none")) for metric in metrics})
        entry["n"] = int(results["n-samples"][name]["effective"])
        report["tasks"][stem] = entry
    if log_samples:
        report["samples"] = {stem: results["samples"][name] for stem, name in task_names.items()}
    return report


def _number_or_none(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
