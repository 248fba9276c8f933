"""Text -> tokens -> packed fixed-length sequences -> a resumable, sharded loader.

- ``read_documents``: a text/markdown file, a folder of them, or JSONL with a text field.
- ``Tokenizer``: any Hugging Face ``tokenizer.json``; ``train_bpe`` makes one.
- ``tokenize_corpus``: tokenize once, cached on disk under a key of (tokenizer, source).
- ``PackedDataset``: the token stream (documents joined by EOS) cut into sequences of
  ``seq_len + 1`` tokens; every ``1/val_fraction``-th sequence is held out for validation,
  so the split is deterministic and spread over the whole corpus.
- ``build_dataloader``: torchdata's ``StatefulDataLoader`` over a
  ``StatefulDistributedSampler``: deterministic for a seed, sharded by rank, and its
  ``state_dict`` resumes mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from letrecipes.components.errors import LetRecipesError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
_CACHE_FORMAT = 1


class DataError(LetRecipesError):
    """Bad data input, raised before training starts."""


def _source_files(source: Union[str, Sequence[str]], key: str) -> List[Path]:
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise DataError(f"{key} is empty. Fix: point it at a text file, a folder, or a .jsonl file.")
    files: List[Path] = []
    for item in sources:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
            if not found:
                raise DataError(
                    f"{key}: folder {str(path)!r} holds no {', '.join(TEXT_SUFFIXES)} or .jsonl files."
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(
                f"{key}: {str(path)!r} does not exist (working directory {os.getcwd()!r}). "
                "Fix: set it to an existing text file, folder or .jsonl file"
                " (the demo corpus is made by `python -m letrecipes.demo --prepare-only`)."
            )
    return files


def read_documents(source: Union[str, Sequence[str]], text_field: str = "text", key: str = "data.source") -> Iterable[str]:
    """Yield documents: a whole text file each, or one JSONL record's ``text_field`` each."""
    return _documents(_source_files(source, key), text_field, key)


def _documents(files: Sequence[Path], text_field: str, key: str) -> Iterable[str]:
    for path in files:
        text = _read_text(path, key)
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{key}: {path}:{line_no} is not valid JSON ({err}).") from err
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(
                        f"{key}: {path}:{line_no} has no field {text_field!r}. "
                        "Fix: set data.text_field to the field holding the text."
                    )
                yield record[text_field]
        else:
            yield text


def _read_text(path: Path, key: str) -> str:
    """The file as UTF-8; bytes that are not UTF-8 become U+FFFD, with a warning naming the file."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        text = data.decode("utf-8", errors="replace")
        warnings.warn(f"{key}: {path} is not valid UTF-8 (first bad byte at offset {err.start}); "
                      f"{text.count(chr(0xFFFD))} undecodable byte sequence(s) were replaced by U+FFFD.",
                      DataWarning, stacklevel=2)
        return text


class DataWarning(UserWarning):
    """Data was read with a documented recovery (e.g. non-UTF-8 bytes replaced)."""


class Tokenizer:
    """A thin wrapper over a Hugging Face ``tokenizers`` JSON file."""

    def __init__(self, path: Union[str, Path], eos_token: Optional[str] = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer.path: no tokenizer file at {str(self.path)!r}. Fix: point it at a "
                "tokenizer.json (the demo trains one with `python -m letrecipes.demo --prepare-only`)."
            )
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"tokenizer.path: {str(self.path)!r} is not a tokenizer.json ({err}).") from err
        candidates = [eos_token] if eos_token else EOS_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise DataError(
                f"tokenizer: {str(self.path)!r} has none of the end-of-text tokens {candidates}. "
                "Fix: set tokenizer.eos_token to the token that separates documents."
            )
        self.eos_token, self.eos_id = found[0]
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def reads_like(self, other: "Tokenizer") -> bool:
        """True when both map text to the same ids (same vocabulary, same splitting),
        whatever their files look like (a GGUF export vs the model's own tokenizer.json)."""
        probe = "Tokenizers agree: café, 1234 items, <|endoftext|>\n\tindented   spaces."
        return (self._tok.get_vocab(with_added_tokens=True) == other._tok.get_vocab(with_added_tokens=True)
                and self.encode(probe) == other.encode(probe))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]


def load_tokenizer(tokenizer_cfg: Mapping[str, Any], teacher_cfg: Optional[Mapping[str, Any]] = None) -> Tokenizer:
    """The run's tokenizer from its ``tokenizer`` config section: ``tokenizer.path`` (``source:
    path``, the default), or the teacher's own (``source: teacher``: its format names the
    tokenizer without loading the weights).

    A path may be a tokenizer.json, a model folder that holds one, or any checkpoint a
    teacher format recognises (a .gguf file exports its embedded tokenizer).
    """
    from letrecipes.components.teachers import teacher_format, tokenizer_file

    source = tokenizer_cfg.get("source", "path")
    if source == "teacher":
        teacher = teacher_cfg or {}
        if not teacher.get("path"):
            raise DataError("tokenizer.source=teacher but there is no teacher.path. Fix: set teacher.path, "
                            "or use tokenizer.source=path with tokenizer.path.")
        path = tokenizer_file(teacher["path"], key="teacher.path", fmt=teacher_format(teacher))
    elif source == "path":
        if not tokenizer_cfg.get("path"):
            raise DataError("tokenizer.path is not set. Fix: point it at a tokenizer.json (or a model folder or "
                            ".gguf file), or set tokenizer.source=teacher.")
        path = tokenizer_file(tokenizer_cfg["path"], key="tokenizer.path")
    else:
        raise DataError(f"tokenizer.source={source!r}: use path (tokenizer.path) or teacher (the teacher's own).")
    return Tokenizer(path, eos_token=tokenizer_cfg.get("eos_token"))


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Union[str, Path]) -> Path:
    """Train a byte-level BPE tokenizer with an ``<|endoftext|>`` token; write tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(out_path)
    return out_path


def tokenize_corpus(
    source: Union[str, Sequence[str]],
    tokenizer: Tokenizer,
    cache_dir: Union[str, Path],
    text_field: str = "text",
    key: str = "data.source",
) -> np.ndarray:
    """The whole corpus as one token array, each document followed by EOS; cached.

    The cache key covers the tokenizer file's content and every source file's path, size
    and modification time, so editing either re-tokenizes.
    """
    files = _source_files(source, key)
    h = hashlib.sha256(f"v{_CACHE_FORMAT}|{tokenizer.fingerprint()}|{text_field}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = Path(cache_dir) / f"tokens-{h.hexdigest()[:20]}.npy"
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    chunks = []
    docs = list(_documents(files, text_field, key))
    for start in range(0, len(docs), 256):
        for ids in tokenizer.encode_batch(docs[start : start + 256]):
            chunks.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, tokens)
    tmp.replace(cache)  # atomic: a killed run never leaves a half-written cache
    return tokens


class PackedDataset(Dataset):
    """Fixed-length training sequences cut from one token stream.

    Item ``i`` is ``{"tokens": x, "labels": y}`` with ``y`` = ``x`` shifted by one.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train", val_fraction: float = 0.02):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 0.5:
            raise DataError(f"data.val_fraction={val_fraction}: must lie in (0, 0.5).")
        self.tokens = tokens
        self.seq_len = seq_len
        total = len(tokens) // (seq_len + 1)
        every = max(2, round(1 / val_fraction))
        all_ids = np.arange(total)
        is_val = all_ids % every == every // 2
        self.index = all_ids[is_val] if split == "val" else all_ids[~is_val]
        if len(self.index) == 0:
            raise DataError(
                f"data: the corpus has {len(tokens)} tokens, too few for one {split} sequence of "
                f"{seq_len + 1}. Fix: use more text, a shorter seq_len or a larger val_fraction."
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        start = int(self.index[i]) * (self.seq_len + 1)
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"tokens": chunk[:-1], "labels": chunk[1:]}


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    num_workers: int = 0,
) -> StatefulDataLoader:
    if len(dataset) < batch_size * world_size:
        raise DataError(
            f"data: {len(dataset)} sequences cannot fill one batch of {batch_size} on each of "
            f"{world_size} ranks. Fix: lower batch_size or use more text."
        )
    sampler = StatefulDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    return StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers
    )


class BatchStream:
    """Endless batches from a loader, epoch after epoch, moved to ``device``.

    A ``Stateful`` (``state_dict``/``load_state_dict``): the epoch and the loader's position
    within it, so a resumed run continues with exactly the next batch.
    """

    def __init__(self, loader: StatefulDataLoader, device: torch.device):
        self.loader = loader
        self.device = device
        self.epoch = 0
        self._iter = None

    def next(self) -> Dict[str, torch.Tensor]:
        while True:
            if self._iter is None:
                self.loader.sampler.set_epoch(self.epoch)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
                return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            except StopIteration:
                self.epoch += 1
                self._iter = None

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.loader.sampler.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._iter = None
