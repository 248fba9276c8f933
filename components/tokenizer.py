"""Tokenizers: a thin wrapper over a Hugging Face ``tokenizers`` JSON file, the run's
tokenizer from its config section, and byte-level BPE training (the demo's)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

from letrecipes.components.corpus import DataError
from letrecipes.components.files import (as_given, hub_id_hint, in_outputs, json_cut_short, model_folder_hint, nearby,
                                         stand_in)

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def unknown_id(hf_tokenizer) -> Optional[int]:
    """The id a text the vocabulary cannot spell becomes (WordPiece, BPE without byte
    fallback); None for a byte-level tokenizer, which spells every text."""
    return hf_tokenizer.token_to_id(getattr(hf_tokenizer.model, "unk_token", None) or "<unk>")


def bos_id(hf_tokenizer) -> Optional[int]:
    """The id a ``tokenizers.Tokenizer`` puts before every text it encodes (its BOS: Llama 3's
    ``<|begin_of_text|>``), read from what it does; None for one that puts nothing there."""
    plain, full = (hf_tokenizer.encode("a", add_special_tokens=special).ids for special in (False, True))
    return full[0] if len(full) > len(plain) and full[1:len(plain) + 1] == plain else None


def nearby_tokenizer_json(path: Path) -> Optional[Path]:
    """A tokenizer.json in the folder of ``path`` or the folder above it, other than ``path``:
    Meta's downloads keep the original ``tokenizer.model`` in ``original/`` below the Hugging
    Face files (the path torchtune's Llama configs name)."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    return None


def slow_tokenizer_kind(path: Path) -> Optional[str]:
    """What a tokenizer file that is not a tokenizer.json is, when it is one transformers
    converts (tiktoken ranks or a SentencePiece model); None for anything else."""
    with open(path, "rb") as f:
        head = f.read(512)
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head):
        return "a tiktoken BPE file (Llama 3's original/tokenizer.model)"
    if path.suffix == ".model" or path.name.endswith(".spm"):
        return "a SentencePiece model"
    if path.name in ("vocab.json", "merges.txt"):
        return f"a GPT-2 style BPE {path.name} (half of a vocab.json + merges.txt pair)"
    if path.name == "vocab.txt":
        return "a WordPiece vocab.txt (BERT style)"
    return None


# From this length on, tracking character offsets costs more than the encoding itself
LONG_TEXT_CHARS = 16_384


def encode_as_text(hf_tokenizer, texts: List[str], offsets: bool = True):
    """``hf_tokenizer.encode_batch`` of corpus text, where a special token written in the text
    (a page that quotes ``<|endoftext|>``) is encoded as the text it is, not as the token
    (nanoGPT's ``encode_ordinary``): a document ends where the corpus says (records,
    ``data.document_separator``), not where it quotes a separator.

    ``offsets=False`` (preparing a corpus needs the ids only): texts of LONG_TEXT_CHARS or
    more go through ``encode_batch_fast``, which tracks no offsets, the same ids in 1/1.7
    of the time on 130k-character documents; shorter ones keep ``encode_batch``, which
    measured as fast or faster there (``python benchmarks/tokenize_cost.py``)."""
    before, hf_tokenizer.encode_special_tokens = hf_tokenizer.encode_special_tokens, True
    try:
        fast = getattr(hf_tokenizer, "encode_batch_fast", None)
        long = [i for i, text in enumerate(texts) if len(text) >= LONG_TEXT_CHARS] if fast and not offsets else []
        if not long:
            return hf_tokenizer.encode_batch(texts, add_special_tokens=False)
        short = [i for i, text in enumerate(texts) if len(text) < LONG_TEXT_CHARS]
        encodings = [None] * len(texts)
        for where, encode in ((long, fast), (short, hf_tokenizer.encode_batch)):
            for i, encoding in zip(where, encode([texts[i] for i in where], add_special_tokens=False) if where else []):
                encodings[i] = encoding
        return encodings
    finally:
        hf_tokenizer.encode_special_tokens = before


class Tokenizer:
    """A thin wrapper over a Hugging Face ``tokenizers`` JSON file."""

    def __init__(self, path: Union[str, Path], eos_token: Optional[str] = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            hub = hub_id_hint(path, "tokenizer.path")
            seen = nearby(path)
            seen = seen + " " if seen else ""
            demo = " (the demo trains one with `python -m letrecipes.demo --prepare-only`)" if in_outputs(path) else ""
            raise DataError(f"tokenizer.path: no tokenizer file at {as_given(path)!r}. " + (hub or (
                seen + (model_folder_hint(path, "tokenizer.path") or
                        f"Fix: point it at a tokenizer.json, or a model folder or .gguf file that holds one{demo}."))))
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except BaseException as err:
            # tokenizers raises a bare Exception on bad JSON, and on some values it does not check
            # (a continuing_subword_prefix of "##" its merges lack) its Rust code panics: pyo3's PanicException, a
            # BaseException. Ctrl-C and the like go on as they are.
            if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
                raise
            raise DataError(_not_a_tokenizer_json(self.path, err)) from err
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

    @functools.cached_property
    def unk_id(self) -> Optional[int]:
        """:func:`unknown_id` of this tokenizer (read once: prepare counts it on every batch)."""
        return unknown_id(self._tok)

    @property
    def hf(self):
        """The ``tokenizers.Tokenizer`` itself (offsets, the vocabulary, ``encode_batch``)."""
        return self._tok

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """The ids of corpus text (:func:`encode_as_text`)."""
        return [e.ids for e in encode_as_text(self._tok, texts, offsets=False)]

    @functools.cached_property  # parses the whole tokenizer JSON: once per tokenizer, not per unit
    def splits_safely(self) -> bool:
        """Whether a long text may be encoded in pieces cut at ``corpus.safe_cuts`` with the
        same ids as in one call (``corpus.safe_cuts``): true for byte-level BPE (GPT-2, Llama-3, SmolLM2, Qwen
        style) without a normalizer that looks across characters. SentencePiece-style
        tokenizers (Metaspace) prepend a marker at the start of each call, so they are
        encoded whole."""
        spec = json.loads(self._tok.to_str())
        pre = spec.get("pre_tokenizer") or {}
        kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
        normalizer = (spec.get("normalizer") or {}).get("type")
        return "ByteLevel" in kinds and "Metaspace" not in kinds and normalizer in (None, "NFC", "NFKC")

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def reads_like(self, other: "Tokenizer") -> bool:
        """True when both map text to the same ids (same vocabulary, same splitting),
        whatever their files look like (a GGUF export vs the model's own tokenizer.json)."""
        probe = "Tokenizers agree: café, 1234 items, <|endoftext|>\n\tindented   spaces."
        return (self._tok.get_vocab(with_added_tokens=True) == other._tok.get_vocab(with_added_tokens=True)
                and self.encode(probe) == other.encode(probe))

    def fingerprint(self) -> str:
        return file_fingerprint(self.path)


def file_fingerprint(path: Path) -> str:
    """A tokenizer file's content in brief (kept in every prepared folder's manifest)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _not_a_tokenizer_json(path: Path, err: Exception) -> str:
    instead = stand_in(path, "a tokenizer.json")
    if instead:
        return f"tokenizer.path: {instead}"
    kind = slow_tokenizer_kind(path)
    what = f"is {kind}, not a tokenizer.json, the one tokenizer format read here" if kind else (
        f"is not a tokenizer.json ({err})")
    cut_short = None if kind else json_cut_short(path)
    nearby = nearby_tokenizer_json(path)
    if cut_short:
        what, fix = cut_short, "copy the model's tokenizer.json again"
    elif nearby is not None:
        where = "beside it" if nearby.parent == path.parent else "in the folder above"
        fix = f"tokenizer.path={nearby} (the model's tokenizer {where})"
    elif kind:
        fix = ("write the model's tokenizer.json with transformers (AutoTokenizer.from_pretrained(<model folder>)"
               ".save_pretrained(<model folder>)) and point tokenizer.path at it")
    else:
        fix = "point it at the model's tokenizer.json"
    return f"tokenizer.path: {str(path)!r} {what}. Fix: {fix}."


def load_tokenizer(tokenizer_cfg: Mapping[str, Any], teacher_cfg: Optional[Mapping[str, Any]] = None) -> Tokenizer:
    """The run's tokenizer from its ``tokenizer`` config section: ``tokenizer.path`` (``source:
    path``, the default), or the teacher's own (``source: teacher``: its format names the
    tokenizer without loading the weights).

    A path may be a tokenizer.json, a model folder that holds one, or any checkpoint a
    teacher format recognises (a .gguf file exports its embedded tokenizer).
    """
    # imported here: prepare workers load this module and need no torch
    from letrecipes.components.teachers import existing_path, teacher_format, tokenizer_file

    source = tokenizer_cfg.get("source", "path")
    if source == "teacher":
        teacher = teacher_cfg or {}
        if not teacher.get("path"):
            raise DataError("tokenizer.source=teacher but there is no teacher.path. Fix: set teacher.path, "
                            "or use tokenizer.source=path with tokenizer.path.")
        existing_path(teacher["path"], key="teacher.path")
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
