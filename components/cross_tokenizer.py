"""Cross-tokenizer LET: a teacher that reads its own tokens of the student's text.

Both models read the same bytes. For every training window the loader rebuilds the
window's text from the student's token ids, lets the teacher's tokenizer cut the same text
into its own tokens, and records, for every student position ``i``, which teacher tokens
may serve as its target: those that *end at or before the end of student token i* (so
the target never holds text the student has not read yet)::

    student  |The| qu|ick| br|own|
    teacher  |The| quick| brown|
    i = 1 (" qu")  -> last teacher token ending by its end: "The"
    i = 2 ("ick")  -> " quick"

Positions are in bytes of the UTF-8 text, because a byte-level student token can end in
the middle of a character. A :class:`Pooling` component turns the teacher states of those
tokens into one target per student position (``mean``, the default: the mean of the ones
that end inside the student token, or the last one when none does; ``last``: the last one).

Everything here runs in the data loader (its workers when ``data.num_workers`` > 0):
``encode_batch`` of the teacher's tokenizer for the whole batch, then array arithmetic;
no Python loop over tokens. A batch gains ``teacher_tokens`` (B, T), ``teacher_first``
and ``teacher_last`` (B, S: indices into the teacher tokens, -1 where a position has no
target) that the recipe hands to :meth:`Pooling.__call__`.

How windows are cut: the student's window (``data.seq_len`` tokens) is the unit; the
teacher reads exactly that window's text, starting at its first whole character. Student
positions with no teacher target are masked out of the alignment loss: the first tokens
of a window whose text the teacher's first token runs past, bytes of a character cut by
the window's start, and everything after the teacher's ``context`` if the window needs
more teacher tokens than that (a log line at setup says how often, measured on the first
batches). Where the student has an end-of-text token the teacher gets its own, so
documents stay separated on both sides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from letrecipes.components.corpus import DataError
from letrecipes.components.registry import register
from letrecipes.components.tokenizer import encode_as_text, unknown_id


class CrossTokenizerError(DataError):
    pass


# ------------------------------------------------------------------ token bytes
def byte_level_alphabet() -> Dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (the
    GPT-2 scheme, used by Llama-3, SmolLM2, Qwen): printable Latin-1 bytes stand for
    themselves, the rest are shifted past 255 in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class TokenBytes:
    """Every token id's UTF-8 bytes in one flat array (``flat[offsets[i]:offsets[i+1]]``)
    and which ids are special (end-of-text and other added tokens: no bytes, a document
    boundary)."""

    flat: np.ndarray      # uint8
    offsets: np.ndarray   # int64, vocab + 1
    special: np.ndarray   # bool, vocab

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def of(cls, hf_tokenizer, key: str) -> "TokenBytes":
        """From a ``tokenizers.Tokenizer``: byte-level BPE (a ``ByteLevel`` decoder) or
        SentencePiece style (``▁`` for a space, ``<0xNN>`` byte-fallback tokens)."""
        spec = json.loads(hf_tokenizer.to_str())
        decoder = spec.get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        if "ByteLevel" in kinds:
            alphabet = byte_level_alphabet()

            def to_bytes(piece: str) -> bytes:
                return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
        elif kinds & {"Metaspace", "ByteFallback", "Replace"}:
            def to_bytes(piece: str) -> bytes:
                match = _BYTE_TOKEN.match(piece)
                return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()
        else:
            raise CrossTokenizerError(
                f"{key}: cross-tokenizer alignment rebuilds the text from the student's tokens, and this tokenizer's "
                f"decoder ({', '.join(sorted(k for k in kinds if k)) or 'none'}) does not say which bytes a token "
                "stands for. Fix: a byte-level BPE (GPT-2, Llama-3, SmolLM2 style) or SentencePiece tokenizer for "
                "the student.")
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        added = {t.content for t in hf_tokenizer.get_added_tokens_decoder().values() if t.special}
        pieces: List[bytes] = [b""] * size
        special = np.zeros(size, dtype=bool)
        for piece, i in vocab.items():  # once per tokenizer, at setup
            if piece in added:
                special[i] = True
            else:
                pieces[i] = to_bytes(piece)
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=size)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        return cls(flat, offsets, special)

    def spans(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bytes of the window, start and end byte of every token) for one row of ids."""
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        gather = np.repeat(self.offsets[ids] - starts, lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self.flat[gather], starts, ends


# ------------------------------------------------------------------ the mapping
def _char_to_byte(data: np.ndarray) -> np.ndarray:
    """Byte offset of every character boundary of valid UTF-8 ``data`` (chars + 1 entries)."""
    return np.append(np.flatnonzero((data & 0xC0) != 0x80), len(data)).astype(np.int64)


def _whole_characters(data: np.ndarray) -> Tuple[int, int]:
    """[lo, hi): the bytes of ``data`` without a character cut by either edge."""
    lo = 0
    while lo < min(len(data), 4) and (data[lo] & 0xC0) == 0x80:
        lo += 1
    hi = len(data)
    lead = max((j for j in range(max(lo, hi - 4), hi) if (data[j] & 0xC0) != 0x80), default=None)
    if lead is not None:
        b = int(data[lead])
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        if hi - lead < need:
            hi = lead
    return lo, max(lo, hi)


def _decode(data: np.ndarray) -> Tuple[str, np.ndarray]:
    """(text, byte offset of each character boundary). Invalid UTF-8 inside (a corpus with
    stray bytes) becomes U+FFFD, each standing for the bytes it replaced."""
    raw = data.tobytes()
    try:
        return raw.decode("utf-8"), _char_to_byte(data)
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="surrogateescape")
        sizes = [1 if "\udc80" <= c <= "\udcff" else len(c.encode()) for c in text]  # rare: a loop here is fine
        clean = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)
        return clean, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class CrossTokenizerCollate:
    """The loader's ``collate_fn`` in cross-tokenizer mode: the usual batch plus the teacher's
    tokens and, per student position, the range of teacher tokens it may be aligned to."""

    def __init__(self, student_tokenizer, teacher_tokenizer, teacher_context: Optional[int],
                 teacher_eos_id: Optional[int]):
        self.student = TokenBytes.of(student_tokenizer, key="tokenizer.path")
        self.teacher = teacher_tokenizer
        self.context = teacher_context
        self.eos = teacher_eos_id
        check_offsets(teacher_tokenizer)
        try:
            self.teacher_bytes: Optional[TokenBytes] = TokenBytes.of(teacher_tokenizer, key="teacher.path")
        except CrossTokenizerError:
            self.teacher_bytes = None  # its offsets alone say where its tokens end

    def _teacher_ends(self, ids: np.ndarray, offsets, char_bytes: np.ndarray) -> np.ndarray:
        """The byte where each teacher token of a segment ends. Exact when the teacher's
        tokens spell the segment's bytes (byte-level BPE, byte fallback); otherwise from its
        character offsets, made safe: offsets may be trimmed of whitespace or give a split
        character's bytes the whole character, so a token is taken to end where the next one
        starts (never earlier than it says), and the segment's last token at its end."""
        if self.teacher_bytes is not None and ids.max() < len(self.teacher_bytes.lengths):
            lengths = self.teacher_bytes.lengths[ids]
            if int(lengths.sum()) == int(char_bytes[-1]):
                return np.cumsum(lengths)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        chars = len(char_bytes) - 1
        end_chars = np.minimum(np.maximum(offsets[:, 1], np.append(offsets[1:, 0], chars)), chars)
        end_chars[-1] = chars
        return char_bytes[end_chars]

    def __getstate__(self) -> Dict[str, Any]:  # workers get the tokenizer as JSON (it pickles badly)
        return {**self.__dict__, "teacher": self.teacher.to_str()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.__dict__.update({**state, "teacher": HFTokenizer.from_str(state["teacher"])})

    def __call__(self, items: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        batch = default_collate(list(items))
        mapping = self.map_rows(batch["tokens"].numpy())
        batch.update({k: torch.from_numpy(v) for k, v in mapping.items()})
        return batch

    def map_rows(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """For (B, S) student ids: ``teacher_tokens`` (B, T, right-padded), ``teacher_first``
        and ``teacher_last`` (B, S; -1: no target)."""
        texts: List[str] = []  # every segment of every row goes to one encode_batch
        per_row = []
        for row in rows:
            data, starts, ends = self.student.spans(row)
            lo, hi = _whole_characters(data)
            # A student end-of-text token has no bytes: it cuts the text into segments, and
            # each segment after the first starts with the teacher's own separator.
            bounds = [lo, *[int(c) for c in ends[self.student.special[row]] if lo <= c <= hi], hi]
            row_segments = []
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                text, char_bytes = _decode(data[a:b])
                row_segments.append((a, len(texts), char_bytes, k > 0))
                texts.append(text)
            per_row.append((starts, ends, row_segments))
        encodings = encode_as_text(self.teacher, texts) if texts else []  # the student's ids read it as text too
        teacher_rows, first_rows, last_rows = [], [], []
        for row, (starts, ends, row_segments) in zip(rows, per_row):
            # Positions are compared in "virtual bytes": the text's bytes plus one for each
            # end-of-text token, so a separator sits strictly after the text before it and
            # two separators in a row stay in order.
            separators = np.cumsum(self.student.special[row])
            v_ends, v_starts = ends + separators, starts + separators - self.student.special[row]
            ids, keys = [], []
            for k, (a, index, char_bytes, separated) in enumerate(row_segments):
                if separated and self.eos is not None:
                    ids.append(np.array([self.eos], dtype=np.int64))  # the teacher's own document separator
                    keys.append(np.array([a + k], dtype=np.int64))
                enc = encodings[index]
                if not enc.ids:
                    continue
                segment_ids = np.asarray(enc.ids, dtype=np.int64)
                ids.append(segment_ids)
                keys.append(a + k + self._teacher_ends(segment_ids, enc.offsets, char_bytes))
            teacher_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
            teacher_keys = np.maximum.accumulate(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
            covered = None
            if self.context is not None and len(teacher_ids) > self.context:  # the teacher reads what it can
                teacher_ids, teacher_keys = teacher_ids[: self.context], teacher_keys[: self.context]
                covered = int(teacher_keys[-1])
            last = np.searchsorted(teacher_keys, v_ends, side="right") - 1
            first = np.searchsorted(teacher_keys, v_starts, side="right")
            first = np.where(first > last, last, first)  # none ends inside the token: the last one before
            if covered is not None:  # text past what the teacher read: no target
                last = np.where(v_starts >= covered, -1, last)
            first = np.where(last < 0, -1, first)
            teacher_rows.append(teacher_ids)
            first_rows.append(first)
            last_rows.append(last)
        width = max(1, max(len(t) for t in teacher_rows))
        pad = self.eos if self.eos is not None else 0
        teacher_tokens = np.full((len(rows), width), pad, dtype=np.int64)
        for i, t in enumerate(teacher_rows):
            teacher_tokens[i, : len(t)] = t
        return {"teacher_tokens": teacher_tokens, "teacher_first": np.stack(first_rows).astype(np.int64),
                "teacher_last": np.stack(last_rows).astype(np.int64)}


def check_offsets(hf_tokenizer, key: str = "teacher.path") -> None:
    """Refuse a teacher tokenizer whose offsets do not locate its tokens in the text."""
    probe = "Offsets: café 1234\n\n  indented\ttab"
    try:
        enc = hf_tokenizer.encode(probe, add_special_tokens=False)
        offsets = list(enc.offsets)
    except Exception as err:  # noqa: BLE001 - any failure here means "no usable offsets"
        raise CrossTokenizerError(f"{key}: the teacher's tokenizer cannot report where its tokens lie in the text "
                                  f"({err}). Fix: a tokenizer.json for the `tokenizers` library.") from err
    if not enc.ids or len(offsets) != len(enc.ids) or all(o == (0, 0) for o in offsets) or \
            any(not (0 <= a <= b <= len(probe)) for a, b in offsets):
        raise CrossTokenizerError(
            f"{key}: the teacher's tokenizer reports no usable character offsets for its tokens "
            f"(got {offsets[:6]}...), which cross-tokenizer alignment needs to know which text each token covers. "
            "Fix: use the teacher's tokenizer.json from the `tokenizers` library (a fast tokenizer).")


def spread_indices(length: int, count: int) -> List[int]:
    """``count`` indices spread evenly over ``range(length)``, the first and the last
    included (all of them when there are fewer)."""
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def check_encodable(hf_tokenizer, texts: Sequence[str], key: str = "teacher.path", limit: float = 0.01) -> None:
    """Refuse text the teacher cannot read: more than ``limit`` of its tokens unknown."""
    unk = unknown_id(hf_tokenizer)
    if unk is None:
        return  # byte-level or byte-fallback: every text is encodable
    encodings = hf_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    total = sum(len(e.ids) for e in encodings)
    unknown = sum(e.ids.count(unk) for e in encodings)
    if total and unknown / total > limit:
        example, where = next((t, e) for t, e in zip(texts, encodings) if unk in e.ids)
        char = where.offsets[where.ids.index(unk)]
        raise CrossTokenizerError(
            f"{key}: the teacher's tokenizer cannot encode {unknown / total:.1%} of the training text's tokens "
            f"(they become its unknown token; first: {example[char[0]:char[1]]!r}). Its targets there would be "
            "meaningless. Fix: a teacher whose tokenizer covers this text (byte-level or byte-fallback), or clean "
            "the corpus.")


# ------------------------------------------------------------------ pooling
class Pooling(nn.Module):
    """Teacher states (B, T, D) -> one target per student position (B, S, D), and the mask
    of positions that have one."""

    def forward(self, states: torch.Tensor, first: torch.Tensor, last: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(states, 1, index.clamp_min(0).unsqueeze(-1).expand(-1, -1, states.shape[-1]))


@register("pooling", "last")
class LastToken(Pooling):
    """The state of the last teacher token that ends by the student token's end: the
    teacher's most recent view of the text, as the student's own state is."""

    def forward(self, states, first, last):
        return _gather(states, last), last >= 0


@register("pooling", "mean")
class MeanOfCovering(Pooling):
    """The mean over the teacher tokens that end inside the student token (the last one
    before it where none does): one cumulative sum, no loop."""

    def forward(self, states, first, last):
        cumulative = torch.cumsum(states.float(), dim=1)
        upper = _gather(cumulative, last)
        lower = torch.where((first > 0).unsqueeze(-1), _gather(cumulative, first - 1), torch.zeros_like(upper))
        count = (last - first + 1).clamp_min(1).unsqueeze(-1).to(upper.dtype)
        return ((upper - lower) / count).to(states.dtype), last >= 0
