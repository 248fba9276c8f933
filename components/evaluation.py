"""Zero-shot multiple-choice evaluation by log-likelihood, as lm-eval-harness scores it.

Each item is a context and several continuations, one of them right. A continuation's
score is the sum of its tokens' log-probabilities given the context (the text is split
as ``context + continuation``; an empty context is replaced by the end-of-text token).
Three accuracies are reported:

- ``acc``: the highest summed log-likelihood wins;
- ``acc_norm_chars``: log-likelihood divided by the continuation's length in bytes
  (lm-eval's ``acc_norm``);
- ``acc_norm_tokens``: log-likelihood divided by its number of tokens.

Task files are JSON lines, one item per line: ``{"context": str, "choices": [str, ...],
"gold": int}``; a task's chance level is the mean of ``1 / len(choices)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Union

import torch
import torch.nn.functional as F

from letrecipes.components.errors import LetRecipesError

SCORES = ("acc", "acc_norm_chars", "acc_norm_tokens")


class EvalError(LetRecipesError):
    pass


@dataclass
class Item:
    context: str
    choices: List[str]
    gold: int


def read_task(path: Union[str, Path], limit: int = 0) -> List[Item]:
    """Items of a JSON-lines task file (the first ``limit`` when > 0)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"eval task file {str(path)!r} does not exist. Fix: run `python -m benchmarks.fetch_eval_tasks` "
                        "(bigbench tasks) or point tasks at JSON-lines files of {context, choices, gold}.")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            item = Item(str(raw["context"]), [str(c) for c in raw["choices"]], int(raw["gold"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise EvalError(f"{path}:{number}: not a task item {{context, choices, gold}} ({err}).") from err
        if len(item.choices) < 2 or not 0 <= item.gold < len(item.choices):
            raise EvalError(f"{path}:{number}: needs at least 2 choices and 0 <= gold < len(choices).")
        items.append(item)
        if limit and len(items) == limit:
            break
    if not items:
        raise EvalError(f"eval task file {str(path)!r} has no items.")
    return items


def chance_level(items: Sequence[Item]) -> float:
    return sum(1 / len(i.choices) for i in items) / len(items)


@torch.no_grad()
def continuation_loglikelihoods(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    requests: Sequence[tuple],
    batch_size: int = 16,
    max_len: int = 256,
    pad_id: int = 0,
) -> List[float]:
    """Summed log p(continuation | context) for ``(context_ids, continuation_ids)`` pairs.

    Sequences longer than ``max_len`` lose tokens from the left of the context. Right
    padding cannot change earlier positions of a causal model, so batches are padded.
    """
    out: List[float] = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        seqs, spans = [], []
        for context, continuation in batch:
            ids = (list(context) + list(continuation))[-(max_len + 1):]
            n_cont = min(len(continuation), len(ids) - 1)
            seqs.append(ids)
            spans.append(n_cont)
        width = max(len(s) for s in seqs) - 1
        inputs = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(seqs):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        logprobs = F.log_softmax(logits_fn(inputs).float(), dim=-1)
        for row, (ids, n_cont) in enumerate(zip(seqs, spans)):
            targets = torch.tensor(ids[len(ids) - n_cont :])
            positions = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1)
            out.append(logprobs[row, positions, targets].sum().item())
    return out


def score_task(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[str], List[int]],
    items: Sequence[Item],
    eos_id: int,
    batch_size: int = 16,
    max_len: int = 256,
) -> Dict[str, float]:
    """The three accuracies of :data:`SCORES` over ``items``, plus ``chance`` and ``n``."""
    requests, owners = [], []
    for index, item in enumerate(items):
        context = encode(item.context) if item.context else [eos_id]
        for choice in item.choices:
            continuation = encode(choice)
            if not continuation:
                raise EvalError(f"item {index}: a choice encodes to no tokens ({choice!r}).")
            requests.append((context, continuation))
            owners.append(index)
    lls = continuation_loglikelihoods(logits_fn, requests, batch_size=batch_size, max_len=max_len, pad_id=eos_id)
    right = {name: 0 for name in SCORES}
    cursor = 0
    for item in items:
        n = len(item.choices)
        ll = lls[cursor : cursor + n]
        n_tokens = [len(requests[cursor + k][1]) for k in range(n)]
        cursor += n
        by = {
            "acc": ll,
            "acc_norm_chars": [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, item.choices)],
            "acc_norm_tokens": [v / t for v, t in zip(ll, n_tokens)],
        }
        for name, values in by.items():
            right[name] += int(max(range(n), key=values.__getitem__) == item.gold)
    result = {name: right[name] / len(items) for name in SCORES}
    result.update(chance=chance_level(items), n=len(items))
    return result


def write_task(path: Union[str, Path], items: Iterable[Item]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"context": i.context, "choices": i.choices, "gold": i.gold}) + "\n"
                           for i in items), encoding="utf-8")
    tmp.replace(path)
    return path
