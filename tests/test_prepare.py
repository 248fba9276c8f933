"""Issue 12: corpora in their shipping formats -> token shards, deterministic and resumable;
the memory-mapped dataset over them; bad input as one clear error."""

import codecs
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from letrecipes.components import corpus
from letrecipes.components import prepare as prepare_module
from letrecipes.components.corpus import DataError, read_documents
from letrecipes.components.data import PackedDataset, TokenShards, build_dataloader
from letrecipes.components.prepare import MANIFEST, prepare_corpus, read_manifest
from letrecipes.components.tokenizer import Tokenizer, train_bpe

QUIET = {"log": lambda _: None}


def documents(n, start=0):
    """``n`` distinct documents (random numbers make every token window unique)."""
    rng = np.random.default_rng(start)
    return [f"Document {i}: " + " ".join(str(x) for x in rng.integers(0, 10**6, 20 + i % 13))
            for i in range(start, start + n)]


@pytest.fixture
def mixed_corpus(tmp_path):
    """The same 60 documents spread over every supported format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    docs = documents(60)
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a_text.txt").write_text(docs[0])
    (root / "b_plain.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:10]))
    with gzip.open(root / "c_gzip.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[10:20])
    (root / "d_zstd.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[20:30]).encode()))
    pq.write_table(pa.table({"text": docs[30:45], "id": list(range(15))}), root / "e_shard.parquet", row_group_size=4)
    Dataset.from_dict({"text": docs[45:60]}).save_to_disk(str(root / "f_dataset"))
    return root, docs


def test_every_format_reads_in_a_fixed_order(mixed_corpus):
    root, docs = mixed_corpus
    assert list(read_documents(root)) == docs
    kinds = [u.kind for u in corpus.list_units(root)]
    assert kinds == ["text", "jsonl", "jsonl", "jsonl"] + ["parquet"] * 4 + ["dataset"]


def test_small_text_files_are_grouped_in_linear_time(tmp_path, monkeypatch):
    """Grouping small text files into units summed the group's sizes again at each file:
    50,000 files of 250 bytes took over 10 minutes to list (3 s after). Counted in stat calls,
    not timed: each file is looked at a bounded number of times."""
    for i in range(3000):
        (tmp_path / f"{i:05d}.txt").write_text(f"document {i} " * 20)
    monkeypatch.setattr(corpus, "TEXT_UNIT_BYTES", 250_000)  # several groups of ~900 files
    stats = 0
    real_stat = Path.stat

    def counted(self, *args, **kwargs):
        nonlocal stats
        stats += 1
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", counted)
    units = corpus.list_units(tmp_path)
    monkeypatch.setattr(Path, "stat", real_stat)
    assert len(units) >= 3 and all(u.size >= 250_000 for u in units[:-1]) and units[-1].size < 250_000
    assert sum(len(u.paths) for u in units) == 3000
    assert sum(u.size for u in units) == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert stats <= 10 * 3000, stats  # quadratic: about 1,500,000


def test_a_folder_is_listed_in_rglob_order_with_one_stat_a_file(tmp_path, monkeypatch):
    """Every launch on a raw corpus lists it: on os.scandir (the directory read gives each
    entry's type) a file costs one stat, where the walk on rglob cost about six (200,000 files:
    8.3 s -> 3.8 s to list into units). What is found, and its order, are rglob's: subfolders
    where their names sort, links to folders not followed, links to nothing counted, hidden
    names skipped, a datasets folder one entry."""
    root = tmp_path / "corpus"
    for name in ["a/x.txt", "a/.hidden.txt", "a/sub/y.jsonl", "a.txt", "a-b/z.txt", "A.txt", "b/c/d/e.json.gz",
                 ".git/config.txt", "README.md", "notes.doc", "ds/state.json", "ds/dataset_info.json",
                 "ds/data-00000-of-00001.arrow", "m/0.txt", "m/10.txt", "m/9.txt"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("some text\n")
    (root / "link_dir").symlink_to(root / "a", target_is_directory=True)
    (root / "gone.txt").symlink_to(root / "never_written.txt")
    (root / "b" / "linked.txt").symlink_to(root / "a.txt")

    from benchmarks.corpus_listing import rglob_walk  # the listing as it was written before 2026-12-05

    assert list(corpus._folder_entries(root)) == rglob_walk(root)
    with pytest.warns(corpus.DataWarning, match="1 file.* are links to files that do not exist"):
        found = corpus.source_files(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "A.txt", "README.md", "a/sub/y.jsonl", "a/x.txt", "a-b/z.txt", "a.txt", "b/c/d/e.json.gz", "b/linked.txt",
        "ds", "m/0.txt", "m/10.txt", "m/9.txt"]

    many = tmp_path / "many"
    for folder in range(20):
        (many / f"f{folder:02d}").mkdir(parents=True)
        for i in range(100):
            (many / f"f{folder:02d}" / f"{i:03d}.txt").write_text(f"document {i} " * 5)
    stats = 0
    real_stat = os.stat

    def counted(*args, **kwargs):
        nonlocal stats
        stats += 1
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", counted)  # Path.stat, is_dir and is_file go through it too
    units = corpus.list_units(many)
    monkeypatch.setattr(os, "stat", real_stat)
    assert sum(len(u.paths) for u in units) == 2000
    assert stats <= 2000 + 3 * 20 + 10, stats  # the walk on rglob: 14,086


def _whole(monkeypatch):
    monkeypatch.setattr(corpus, "SPLIT_FILE_BYTES", 10**12)


def test_a_large_file_is_cut_into_units_that_read_as_the_whole(tmp_path, tokenizer_path, monkeypatch):
    """One big JSON Lines or text file was one unit, prepared by one worker whatever the
    number of cores. Cut into byte ranges (lines that begin in a range; text at a document
    separator), the documents, their order and the tokens are those of the whole file:
    a byte-order mark, CRLF, blank lines, multibyte characters, lines across a cut."""
    docs = [d + " caf\u00e9 \u4e2d\u6587 \U0001f600" * (i % 3) for i, d in enumerate(documents(300))]
    lines = [json.dumps({"text": d}, ensure_ascii=i % 2 == 0) + ("\r\n" if i % 5 == 0 else "\n") + ("\n" if i % 7 == 0 else "")
             for i, d in enumerate(docs)]
    (tmp_path / "big.jsonl").write_bytes(codecs.BOM_UTF8 + "".join(lines).encode())
    (tmp_path / "stories.txt").write_text("".join(f"{d}<|endoftext|>\n" for d in docs), encoding="utf-8")
    (tmp_path / "array.json").write_text(json.dumps([{"text": d} for d in docs]))
    (tmp_path / "one_document.txt").write_text("\n".join(docs), encoding="utf-8")
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    files = ["big.jsonl", "stories.txt", "array.json", "one_document.txt", "packed.jsonl.gz"]
    _whole(monkeypatch)
    whole = {name: list(read_documents(tmp_path / name)) for name in files}
    assert whole["big.jsonl"] == docs == whole["stories.txt"] == whole["packed.jsonl.gz"]
    monkeypatch.setattr(corpus, "SPLIT_FILE_BYTES", 4000)
    units = {name: corpus.list_units(tmp_path / name) for name in files}
    assert len(units["big.jsonl"]) > 5 and len(units["stories.txt"]) > 5, units
    for name in ("array.json", "one_document.txt", "packed.jsonl.gz"):  # cannot be entered midway: whole
        assert len(units[name]) == 1 and not units[name][0].is_range, name
    # without a separator a text file is one document, however large
    one_document = (tmp_path / "stories.txt").read_text(encoding="utf-8")
    assert list(read_documents(tmp_path / "stories.txt", separator=None)) == [one_document]
    # a separator that overlaps itself is found only by a read from the start: not cut
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("\n\n\n".join(docs), encoding="utf-8")
    assert [u.is_range for u in corpus.list_units(paragraphs, separator="\n\n")] == [False]
    stories = (tmp_path / "stories.txt").read_bytes()
    assert all(stories[u.start:].startswith(b"<|endoftext|>") for u in units["stories.txt"][1:])
    for name in files:
        assert list(read_documents(tmp_path / name)) == whole[name], name
        pieces = [piece for unit in units[name] for piece in corpus.read_unit_in_pieces(unit, piece_chars=300)]
        joined, current = [], ""
        for piece, ends in pieces:
            current += piece
            if ends:
                joined.append(current)
                current = ""
        assert joined == whole[name], name

    tok = Tokenizer(tokenizer_path)
    cut = prepare_corpus([tmp_path / "big.jsonl", tmp_path / "stories.txt"], tok, tmp_path / "cut", workers=2, **QUIET)
    _whole(monkeypatch)
    one = prepare_corpus([tmp_path / "big.jsonl", tmp_path / "stories.txt"], tok, tmp_path / "one", workers=1, **QUIET)
    assert len(cut["shards"]) > 10 and len(one["shards"]) == 2 and cut["documents"] == one["documents"] == 600
    stream = lambda folder, m: TokenShards(folder, tok)[0:m["tokens"]]  # noqa: E731
    assert np.array_equal(stream(tmp_path / "cut", cut), stream(tmp_path / "one", one))


def test_a_folder_prepared_before_files_were_cut_is_still_prepared(tmp_path, tokenizer_path, monkeypatch, capsys):
    """A prepare-data folder or cache made when a big file was one unit is the same tokens:
    it is used as it is (and an unfinished one goes on in its own units), not refused as
    "prepared from other sources"; an edited file still is."""
    tok = Tokenizer(tokenizer_path)
    source = tmp_path / "big.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(200)))
    _whole(monkeypatch)
    before = prepare_corpus(source, tok, tmp_path / "out", **QUIET)
    monkeypatch.setattr(corpus, "SPLIT_FILE_BYTES", 4000)
    messages = []
    assert prepare_corpus(source, tok, tmp_path / "out", log=messages.append) == before
    assert any("already prepared" in m for m in messages), messages
    (tmp_path / "out" / "shard_000000.bin").write_bytes(b"")  # damaged: redone in the earlier plan's one unit
    assert prepare_corpus(source, tok, tmp_path / "out", **QUIET)["shards"] == before["shards"]
    source.write_text(source.read_text(encoding="utf-8") + json.dumps({"text": "one more"}) + "\n")
    grown = source.stat().st_size
    with pytest.raises(DataError, match=re.escape(
            f"already holds a corpus prepared from the same files when they held other bytes: {source} was "
            f"{grown - len(json.dumps({'text': 'one more'})) - 1:,} bytes, is {grown:,}. Fix: prepare into another")):
        prepare_corpus(source, tok, tmp_path / "out", **QUIET)


def test_a_bad_record_in_a_later_part_of_a_cut_file_is_named_by_its_byte(tmp_path, monkeypatch):
    docs = documents(200)
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    lines[150] = "{not json\n"
    (tmp_path / "big.jsonl").write_text("".join(lines))
    (tmp_path / "bad.txt").write_bytes("".join(f"{d}<|endoftext|>" for d in docs[:150]).encode() + b"\xff"
                                       + "".join(f"{d}<|endoftext|>" for d in docs[150:]).encode())
    monkeypatch.setattr(corpus, "SPLIT_FILE_BYTES", 4000)
    at = len("".join(lines[:150]).encode())
    with pytest.warns(corpus.DataWarning) as caught:
        assert list(read_documents(tmp_path / "big.jsonl")) == docs[:150] + docs[151:]
    assert any("skipped 1 of " in str(w.message) and f"the first at byte {at}" in str(w.message) for w in caught), \
        [str(w.message) for w in caught]
    bad_at = len("".join(f"{d}<|endoftext|>" for d in docs[:150]).encode())
    with pytest.warns(corpus.DataWarning, match=f"first bad byte at offset {bad_at:,}\\)"):
        assert len(list(read_documents(tmp_path / "bad.txt"))) == 200


def test_prepare_is_deterministic_and_independent_of_workers(mixed_corpus, tokenizer_path, tmp_path):
    root, docs = mixed_corpus
    tok = Tokenizer(tokenizer_path)
    one = prepare_corpus(root, tok, tmp_path / "one", workers=1, **QUIET)
    two = prepare_corpus(root, tok, tmp_path / "two", workers=2, **QUIET)
    assert one == two and one["documents"] == 60 and len(one["shards"]) == 9
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()
    stream = TokenShards(tmp_path / "one", tok)[0:one["tokens"]]
    expected = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs])
    np.testing.assert_array_equal(stream, expected)  # shards concatenate to the documents in order
    assert stream.dtype == np.uint16


def test_a_corpus_of_more_shards_than_open_files_allowed_is_prepared_and_its_copies_counted(tokenizer_path, tmp_path):
    """Each shard's keys were memory-mapped together to count the copies across the corpus, a
    file descriptor each: past `ulimit -n` (1024 on many machines; a FineWeb-Edu snapshot is
    thousands of files), the keys "did not read", were written again, and the prepare ended
    in a TypeError (a mixture's cross-source count said the folders had no keys)."""
    source = tmp_path / "many"
    source.mkdir()
    for i in range(150):  # each file a unit, each unit a shard
        (source / f"part_{i:03d}.jsonl").write_text(json.dumps({"text": documents(1, i)[0]}) + "\n")
    (source / "part_149.jsonl").write_text((source / "part_000.jsonl").read_text())  # one copy, to be counted
    script = ("import json, resource, sys; from pathlib import Path\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              "from letrecipes.components.prepare import MANIFEST, prepare_corpus\n"
              "from letrecipes.components.tokenizer import Tokenizer\n"
              "prepare_corpus(sys.argv[1], Tokenizer(sys.argv[2]), sys.argv[3], log=lambda _: None)\n"
              "print(json.dumps(json.loads((Path(sys.argv[3]) / MANIFEST).read_text())['repeats']))")
    done = subprocess.run([sys.executable, "-c", script, str(source), str(tokenizer_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    repeats = json.loads(done.stdout.strip().splitlines()[-1])
    assert (repeats["documents"], repeats["copies"]) == (150, 1)


def test_document_keys_that_do_not_read_back_once_rewritten_are_one_line(tokenizer_path, tmp_path, monkeypatch):
    """Keys that do not read are written again; if those do not read either (a failing disk), the
    copies count got None and the prepare ended in a TypeError."""
    monkeypatch.setattr(prepare_module, "stored_keys", lambda folder, shards: None)
    with pytest.raises(DataError, match=r"^data\.cache_dir: the document keys written into .* do not read back \(files "
                                        r"named \*\.keys\.npy\)\. Fix: check that disk"):
        prepare_corpus(small_jsonl(tmp_path), Tokenizer(tokenizer_path), tmp_path / "out", **QUIET)


def test_a_killed_prepare_finishes_with_the_same_bytes(tokenizer_path, tmp_path):
    source = tmp_path / "jsonl"
    source.mkdir()
    for i in range(40):
        (source / f"part_{i:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                            for d in documents(150, i * 150)))
    clean = tmp_path / "clean"
    prepare_corpus(source, Tokenizer(tokenizer_path), clean, **QUIET)
    killed = tmp_path / "killed"
    # each batch encoded 0.1 s late (the same ids): the prepare takes 4 s after its first shard, not the 0.4 s it
    # takes whole, so that a test process starved under load still kills it midway
    script = ("import sys, time; from letrecipes.components import prepare; "
              "from letrecipes.components.tokenizer import Tokenizer\n"
              "class Slow(Tokenizer):\n"
              "    def encode_batch(self, texts):\n"
              "        time.sleep(0.1)\n"
              "        return super().encode_batch(texts)\n"
              "prepare.Tokenizer = Slow  # the one each unit is encoded with (one worker: in this process)\n"
              "prepare.prepare_corpus(sys.argv[1], Slow(sys.argv[2]), sys.argv[3], log=lambda _: None)")
    process = subprocess.Popen([sys.executable, "-c", script, str(source), str(tokenizer_path), str(killed)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list(killed.glob("shard_*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (killed / MANIFEST).exists(), "the prepare finished before the kill: make the corpus larger"
    finished_before = {p.name for p in killed.glob("shard_*.json")}
    assert finished_before
    prepare_corpus(source, Tokenizer(tokenizer_path), killed, **QUIET)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())
    for path in clean.glob("shard_*.bin"):
        assert (killed / path.name).read_bytes() == path.read_bytes()
    assert json.loads((killed / MANIFEST).read_text()) == json.loads((clean / MANIFEST).read_text())


def test_an_unfinished_prepare_folder_as_a_corpus_is_named_with_the_command_that_finishes_it(
        base_overrides, tokenizer_path, tmp_path):
    """A prepare that stopped (or is still running) leaves plan.json and some shards, no
    manifest. Given as data.source, the folder was read as a corpus of JSON: `plan.json
    value 0 has no field 'text'` (shards not yet written), and a token cache was prepared
    from it first. Now it is named, with how far it got and the command that finishes it;
    inside a folder of text, likewise; and once finished it trains."""
    from letrecipes import pretrain

    source = tmp_path / "corpus"
    source.mkdir()
    for i in range(4):  # a JSON Lines file is a unit of its own
        (source / f"part_{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(60, i * 60)))
    out = tmp_path / "prepared"
    prepare_corpus(source, Tokenizer(tokenizer_path), out, **QUIET)
    assert len(json.loads((out / "plan.json").read_text(encoding="utf-8"))["units"]) == 4
    (out / MANIFEST).unlink()  # as a prepare stopped after its third shard leaves it
    for path in out.glob("shard_000003*"):
        path.unlink()
    overrides = [o for o in base_overrides if not o.startswith(("data.source=", "data.cache_dir="))]
    cache = tmp_path / "cache"
    run = ["--config", "pretrain_tiny", *overrides, f"data.source={out}", "max_steps=2", f"data.cache_dir={cache}",
           f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as stopped:
        pretrain.recipe_main(run)
    said = str(stopped.value)
    assert said.startswith(f"error: data.source: '{out}' is a folder that `letrecipes prepare-data` began and has "
                           "not finished (plan.json and no manifest.json: 3 of 4 shards written; it stopped, or "
                           "is still running), not text. Fix: finish it with the command that began it "
                           f"(letrecipes prepare-data --config <yours> --out {out} data.source={source}: "), said
    assert said.endswith(f"then train on it; or point data.source at the corpus itself, {source}."), said
    assert not cache.exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    beside = tmp_path / "texts"
    beside.mkdir()
    (beside / "notes.txt").write_text(" ".join(documents(40)))
    shutil.copytree(out, beside / "prepared")
    with pytest.raises(DataError, match=rf"'{beside}' holds one, '{beside / 'prepared'}', which is a folder that "
                       r"`letrecipes prepare-data` began .* Fix: move it out of"):
        corpus.list_units(beside, key="data.source")
    prepare_corpus(source, Tokenizer(tokenizer_path), out, **QUIET)  # the command it names finishes it
    pretrain.recipe_main(run)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_truncated_shard_is_named_and_the_same_command_repairs_it(tokenizer_path, tmp_path, mixed_corpus):
    root, _ = mixed_corpus
    tok = Tokenizer(tokenizer_path)
    out = tmp_path / "prepared"
    prepare_corpus(root, tok, out, **QUIET)
    shard = out / "shard_000002.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(DataError, match=r"shard .*shard_000002.bin has [\d,]+ bytes where the manifest says"):
        TokenShards(out, tok)
    prepare_corpus(root, tok, out, **QUIET)
    assert shard.read_bytes() == good
    shard.unlink()
    with pytest.raises(DataError, match="shard_000002.bin is missing"):
        read_manifest(out)


def test_a_manifest_from_another_tokenizer_is_refused(tokenizer_path, corpus_dir, tmp_path, mixed_corpus):
    root, _ = mixed_corpus
    prepare_corpus(root, Tokenizer(tokenizer_path), tmp_path / "prepared", **QUIET)
    other = Tokenizer(train_bpe([p.read_text() for p in corpus_dir.glob("*.txt")], 300, tmp_path / "other.json"))
    with pytest.raises(DataError, match="was prepared with another tokenizer .* Fix:"):
        TokenShards(tmp_path / "prepared", other)


@pytest.mark.parametrize("edit, said", [
    (lambda m: [m], "it holds a JSON list, not a manifest's object"),
    (lambda m: {k: v for k, v in m.items() if k != "dtype"}, "it has no dtype"),
    (lambda m: {**m, "dtype": "float32"}, "its dtype 'float32' is not an integer type"),
    (lambda m: {**m, "tokenizer": "tok.json"}, "its tokenizer entry is not"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "file": "../elsewhere/shard_000000.bin"}, *m["shards"][1:]]},
     "shard 0 names '../elsewhere/shard_000000.bin', not a shard_N.bin of the folder"),
    (lambda m: {**m, "tokens": m["tokens"] + 1}, "are not the sum of its shards'"),
    (lambda m: {**m, "unknown_tokens": "x"}, "its unknown_tokens 'x' is not a count"),
    (lambda m: {**m, "repeats": 0.5}, "its repeats entry is not {documents, copies, copy_tokens, shared}"),
    (lambda m: {**m, "repeats": {k: v for k, v in m["repeats"].items() if k != "copy_tokens"}},
     "its repeats entry is not"),
    (lambda m: {**m, "repeats": {**m["repeats"], "shared": [[0, 9, 2, 300]]}},
     "its repeats.shared is not a list of [shard, shard, documents, tokens]"),
    (lambda m: {**m, "plan": "x"}, "its plan entry is not {units: [...], ...}"),
])
def test_a_manifest_that_parses_but_is_not_one_is_refused_and_prepare_rewrites_it(mixed_corpus, tokenizer_path,
                                                                                    tmp_path, edit, said):
    """A hand-edited or foreign manifest.json (valid JSON): one error naming what is wrong,
    not a KeyError or TypeError traceback from the loader; a shard path outside the folder
    is refused; `letrecipes prepare-data` into the folder writes it again from the sound
    shards."""
    root, _ = mixed_corpus
    tok = Tokenizer(tokenizer_path)
    good = prepare_corpus(root, tok, tmp_path / "prepared", **QUIET)
    (tmp_path / "prepared" / MANIFEST).write_text(json.dumps(edit(json.loads(json.dumps(good)))))
    with pytest.raises(DataError, match=r"manifest.json is missing, unreadable or not a manifest \(.*"
                                        + re.escape(said) + r".*\)\. Fix: rerun `letrecipes prepare-data`"):
        TokenShards(tmp_path / "prepared", tok)
    messages = []
    assert prepare_corpus(root, tok, tmp_path / "prepared", log=messages.append) == good
    assert any("manifest.json is damaged" in m and "writing it again" in m for m in messages), messages
    assert len(TokenShards(tmp_path / "prepared", tok)) == good["tokens"]


def test_a_manifest_with_a_value_changed_at_random_reads_or_is_one_error_that_prepare_mends(
        corpus_dir, tokenizer_path, tmp_path):
    """A manifest.json with one value changed at random (a wrong kind, a key gone, a number
    scaled): the folder reads and trains, or is one DataError; `letrecipes prepare-data`
    into it then mends it. (A `repeats` entry of the wrong kind was a TypeError or
    KeyError from the copies warning, a `unknown_tokens` of "x" a ValueError.)"""
    import random

    from letrecipes.components.data import build_datasets
    from tests.damage import changed_json

    tok, rng = Tokenizer(tokenizer_path), random.Random(20261206)
    good = prepare_corpus(corpus_dir, tok, tmp_path / "good", **QUIET)
    outcomes = {"read": 0, "mended": 0}
    for n in range(60):
        folder = tmp_path / f"case{n}"
        shutil.copytree(tmp_path / "good", folder)
        (folder / MANIFEST).write_text(json.dumps(changed_json(good, rng)[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                train, _, _ = build_datasets({"source": str(folder), "seq_len": 32, "val_fraction": 0.05}, tok,
                                             seed=0, log=lambda line: None)
                next(iter(build_dataloader(train, 2, seed=0)))
                outcomes["read"] += 1
                continue
            except DataError:
                pass
            said = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("tokenizer")
            if not isinstance(said, dict) or said.get("fingerprint") == tok.fingerprint():  # else: another tokenizer's
                assert prepare_corpus(corpus_dir, tok, folder, **QUIET)["tokens"] == good["tokens"]
                assert len(TokenShards(folder, tok)) == good["tokens"]
                outcomes["mended"] += 1
    assert outcomes["read"] > 10 and outcomes["mended"] > 10, outcomes


def test_plan_and_shard_records_with_a_value_changed_at_random_read_or_are_one_error(corpus_dir, tokenizer_path,
                                                                                      tmp_path):
    """plan.json or a shard's record changed at random, with or without the manifest (an
    unfinished prepare): reading the folder and preparing into it again each work or end in
    one DataError. (A record without its documents was a KeyError in the rerun; a plan whose
    units are not a list, or a unit whose paths are a number, a TypeError in both.)"""
    import random

    from letrecipes.components.data import build_datasets
    from tests.damage import changed_json

    tok, rng = Tokenizer(tokenizer_path), random.Random(20261206)
    prepare_corpus(corpus_dir, tok, tmp_path / "good", **QUIET)
    outcomes = {"worked": 0, "DataError": 0}
    for n in range(60):
        folder = tmp_path / f"case{n}"
        shutil.copytree(tmp_path / "good", folder)
        target = folder / rng.choice(["plan.json", "plan.json", "shard_000000.json"])
        target.write_text(json.dumps(changed_json(json.loads(target.read_text(encoding="utf-8")), rng)[0]))
        if n % 2:
            (folder / MANIFEST).unlink()
        for step in (lambda: build_datasets({"source": str(folder), "seq_len": 32, "val_fraction": 0.05}, tok, seed=0,
                                            log=lambda line: None),
                     lambda: prepare_corpus(corpus_dir, tok, folder, **QUIET)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    step()
                    outcomes["worked"] += 1
                except DataError:
                    outcomes["DataError"] += 1
    assert outcomes["worked"] > 20 and outcomes["DataError"] > 20, outcomes


def test_a_damaged_plan_json_is_named_as_that(corpus_dir, tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    folder = tmp_path / "out"
    prepare_corpus(corpus_dir, tok, folder, **QUIET)
    (folder / MANIFEST).unlink()
    plan = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
    (folder / "plan.json").write_text(json.dumps({**plan, "units": [{**plan["units"][0], "paths": 7}]}))
    with pytest.raises(DataError, match=r"plan.json is damaged \(its unit 0 is not \{kind, paths, ...\}\): the shards "
                                        r"written cannot be matched to the files. Fix: delete that folder"):
        prepare_corpus(corpus_dir, tok, folder, **QUIET)
    with pytest.raises(DataError, match="a folder that `letrecipes prepare-data` began and has not finished"):
        list(read_documents(folder))


def test_bad_sources_are_one_clear_error(tokenizer_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = Tokenizer(tokenizer_path)
    damaged = tmp_path / "damaged.jsonl.gz"
    with gzip.open(damaged, "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents(400))
    damaged.write_bytes(damaged.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"damaged.jsonl.gz is damaged: the compressed stream breaks after line \d+"):
        prepare_corpus(damaged, tok, tmp_path / "out1", **QUIET)

    zst = tmp_path / "damaged.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(200))
    with pytest.raises(DataError, match="damaged.jsonl.zst is damaged"):
        prepare_corpus(zst, tok, tmp_path / "out2", **QUIET)

    no_column = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_column)
    with pytest.raises(DataError, match=r"body.parquet has no column 'text' \(it has \['body'\]\)\. Fix: "
                                        r"data.text_field=body, its one text column\."):
        prepare_corpus(no_column, tok, tmp_path / "out3", **QUIET)
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"id": [1], "doc": [{"text": "x", "url": "u", "n": 3}]}), nested)
    with pytest.raises(DataError, match=r"one of its text columns \['doc.text', 'doc.url'\]\."):
        prepare_corpus(nested, tok, tmp_path / "out_nested", **QUIET)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no text"):
        prepare_corpus(empty, tok, tmp_path / "out4", **QUIET)
    assert not (tmp_path / "out4" / MANIFEST).exists()


@pytest.fixture
def three_shards(tokenizer_path, tmp_path):
    """A corpus prepared into 3 shards, sequences crossing the shard boundaries."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(200, i * 200)))
    tok = Tokenizer(tokenizer_path)
    prepare_corpus(source, tok, tmp_path / "prepared", **QUIET)
    return TokenShards(tmp_path / "prepared", tok)


def test_a_shuffled_epoch_over_more_shards_than_open_files_keeps_few_open(three_shards, monkeypatch):
    """A 1 T-token corpus has some 100,000 shards and ``ulimit -n`` is often 1,024: the
    handles kept are the most recently read, at most MAX_OPEN_SHARDS (here 2 of 3)."""
    from letrecipes.components import data

    expected = three_shards[0:len(three_shards)].copy()
    monkeypatch.setattr(data, "MAX_OPEN_SHARDS", 2)
    fresh = data.TokenShards(three_shards.folder)
    rng = np.random.default_rng(0)
    for start in rng.integers(0, len(fresh) - 50, 300):
        np.testing.assert_array_equal(fresh[start:start + 50], expected[start:start + 50])
        assert len(fresh._fds) <= 2
    fresh[0:1]
    assert list(fresh._fds)[-1] == 0  # the shard just read is the last to be closed
    opened = set(fresh._fds.values())
    del fresh
    for fd in opened:  # closed with the object
        with pytest.raises(OSError):
            os.fstat(fd)


def test_slices_across_shard_boundaries(three_shards):
    whole = np.concatenate([np.fromfile(f, dtype=three_shards.dtype) for f in three_shards.files])
    for start, stop in [(0, 5), (three_shards.starts[1] - 3, three_shards.starts[1] + 4),
                        (three_shards.starts[1] - 3, three_shards.starts[2] + 4), (len(whole) - 2, len(whole))]:
        np.testing.assert_array_equal(three_shards[start:stop], whole[start:stop])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_across_a_shard_boundary(three_shards, workers):
    data = PackedDataset(three_shards, 31, "train", 0.05)
    steps_per_epoch = len(data) // 4
    stop_at = steps_per_epoch // 2  # the shuffled loader has crossed every shard boundary by then

    def loader():
        return build_dataloader(data, 4, seed=3, num_workers=workers)

    reference = [b["tokens"] for _, b in zip(range(stop_at + 5), loader())]
    first = loader()
    it = iter(first)
    for _ in range(stop_at):
        next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["tokens"] for _, b in zip(range(5), resumed)]
    assert all(torch.equal(a, b) for a, b in zip(reference[stop_at:], rest))


def test_two_ranks_see_disjoint_sequences_that_cover_the_epoch(three_shards):
    data = PackedDataset(three_shards, 31, "train", 0.05)
    seen = []
    for rank in range(2):
        for batch in build_dataloader(data, 4, seed=0, rank=rank, world_size=2):
            seen += [tuple(row.tolist()) for row in batch["tokens"]]
    assert len(seen) == len(set(seen))  # disjoint
    assert len(seen) >= len(data) - 2 * 4 * 2  # all but the last incomplete batch on each rank


def test_other_ranks_wait_for_the_first_to_prepare_a_small_corpus(tokenizer_path, tmp_path, capsys):
    import threading

    from letrecipes.components.prepare import cached_prepare

    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(50)))
    tok = Tokenizer(tokenizer_path)
    with pytest.raises(DataError, match=r"rank 1: rank 0 did not finish preparing .* Fix: prepare it beforehand"):
        cached_prepare(source, tok, tmp_path / "cache", rank=1, timeout_s=0.2)
    waited = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("folder", cached_prepare(
        source, tok, tmp_path / "cache", rank=1, timeout_s=60)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # no manifest yet: rank 1 waits
    folder = cached_prepare(source, tok, tmp_path / "cache", rank=0, **QUIET)
    waiter.join(timeout=30)
    assert waited["folder"] == folder and (folder / MANIFEST).is_file()
    assert "rank 1: waiting for rank 0 to prepare" in capsys.readouterr().out


NODE = """
import sys, time
from letrecipes.components import prepare
from letrecipes.components.tokenizer import Tokenizer
prepare.LOCK_HEARTBEAT_S = 0.2
folder = prepare.cached_prepare(sys.argv[1], Tokenizer(sys.argv[2]), sys.argv[3], rank=0, timeout_s=120,
                                log=lambda line: print(line, flush=True))
print("FOLDER", folder, flush=True)
"""


def test_nodes_sharing_a_cache_prepare_it_once_and_a_dead_preparers_lock_is_taken_over(tokenizer_path, tmp_path,
                                                                                        monkeypatch):
    """Each node's first process prepares a raw corpus into data.cache_dir. Where nodes share
    that folder, the one that takes its lock prepares and the others wait for the manifest
    (before: every node tokenized the whole corpus into it at once). A lock whose holder
    died is taken over: at once when it ran on this host, else when its time has stood
    still for LOCK_STALE_S (no clocks compared across nodes)."""
    from letrecipes.components import prepare

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(3000)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, str(source), str(tokenizer_path), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    preparers = [out for out in outputs if "prepare: done" in out]
    assert len(preparers) == 1, outputs  # the other waited for its lock, or found the folder done
    assert len({line for out in outputs for line in out.splitlines() if line.startswith("FOLDER")}) == 1
    assert not list((tmp_path / "cache").glob("*.lock*"))

    tok = Tokenizer(tokenizer_path)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": documents(1)[0]}) + "\n")
    folder = Path(str(prepare.cached_prepare(small, tok, tmp_path / "c2", rank=0, **QUIET)))
    shutil.rmtree(folder)
    lock = folder.with_name(folder.name + ".lock")
    lock.write_text(f"{socket.gethostname()} 999999999\n")  # a process of this host that has ended
    start = time.perf_counter()
    assert prepare.cached_prepare(small, tok, tmp_path / "c2", rank=0, **QUIET) == folder
    assert time.perf_counter() - start < 10 and not lock.exists()
    shutil.rmtree(folder)
    lock.write_text("another-node 4242\n")  # a node that stopped touching it
    monkeypatch.setattr(prepare, "LOCK_STALE_S", 1.5)
    assert prepare.cached_prepare(small, tok, tmp_path / "c2", rank=0, **QUIET) == folder
    assert (folder / MANIFEST).is_file() and not lock.exists()
    lock.write_text("another-node 4242\n")
    shutil.rmtree(folder)
    with pytest.raises(DataError, match=r"process 4242 on another-node did not finish preparing .* within 1 s"):
        prepare.cached_prepare(small, tok, tmp_path / "c2", rank=0, timeout_s=1, **QUIET)


def test_prepare_data_command_then_a_run_on_its_shards(base_overrides, tokenizer_path, corpus_dir, tmp_path):
    from letrecipes import pretrain

    source = tmp_path / "docs.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.writelines(json.dumps({"text": p.read_text()}) + "\n" for p in sorted(corpus_dir.glob("*.txt")))
    out = tmp_path / "prepared"
    result = subprocess.run([sys.executable, "-m", "letrecipes", "prepare-data", "--config", "pretrain_tiny",
                             "--out", str(out), "--workers", "2", f"tokenizer.path={tokenizer_path}",
                             f"data.source={source}"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ETA" in result.stdout and f"data.source={out}" in result.stdout
    overrides = [o for o in base_overrides if not o.startswith("data.source=")]
    pretrain.recipe_main(["--config", "pretrain_tiny", *overrides, f"data.source={out}", "max_steps=2",
                          f"output_dir={tmp_path / 'run'}"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    other = train_bpe([p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt")], 300, tmp_path / "other.json")
    with pytest.raises(SystemExit, match="was prepared with another tokenizer"):
        pretrain.recipe_main(["--config", "pretrain_tiny", *overrides, f"data.source={out}", "max_steps=2",
                              f"tokenizer.path={other}", f"output_dir={tmp_path / 'run2'}"])
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_prepare_data_on_a_full_disk_is_one_line_and_goes_on_after(tokenizer_path, corpus_dir, tmp_path):
    """A shard that cannot be written (here a file size limit, as a full disk would) used to
    end prepare-data in a traceback from inside the writer."""
    from tests.test_run_safety import limit_file_size

    command = [sys.executable, "-m", "letrecipes", "prepare-data", "--config", "pretrain_tiny", "--workers", "1",
               "--out", str(tmp_path / "out"), f"tokenizer.path={tokenizer_path}", f"data.source={corpus_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            preexec_fn=limit_file_size(4096))
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert last.startswith(f"error: --out: preparing {corpus_dir} into {tmp_path / 'out'} failed: a file size limit"), last
    assert "Finished shards are kept: the same command goes on from them. Fix: raise the file size limit" in last
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "prepared " in done.stdout, done.stderr[-2000:]
    assert read_manifest(tmp_path / "out")["tokens"] > 4096


def test_prepare_data_on_a_mixture_and_on_prepared_folders(base_overrides, tokenizer_path, corpus_dir, tmp_path,
                                                           capsys):
    """data.sources is prepared entry by entry into <out>/<name>, and the line printed is the
    data.sources to train on; a source that is prepared already is checked and left in place;
    token shards are never read as text."""
    from letrecipes import pretrain
    from letrecipes.cli import main

    plays = sorted(corpus_dir.glob("*.txt"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copy(plays[0], tmp_path / "a"), shutil.copy(plays[1], tmp_path / "b")
    prepare = ["prepare-data", "--config", "pretrain_tiny", f"tokenizer.path={tokenizer_path}", "--workers", "1"]
    assert main([*prepare, "--out", str(tmp_path / "pre_b"), f"data.source={tmp_path / 'b'}"]) == 0
    capsys.readouterr()
    sources = f"[{{source: {tmp_path / 'a'}, weight: 3, name: first}}, {{source: {tmp_path / 'pre_b'}, weight: 1}}]"
    assert main([*prepare, "--out", str(tmp_path / "mix"), "~data.source", f"data.sources={sources}"]) == 0
    out = capsys.readouterr().out
    assert f"data.sources[1].source: {tmp_path / 'pre_b'} is prepared already" in out
    assert "data: 0 documents (of 32+ tokens) of one source are in another too (2 sources)" in out
    assert sorted(p.name for p in (tmp_path / "mix").iterdir()) == ["first"]  # the prepared one stays where it is
    printed = out.split("train on them with data.sources='")[1].split("'")[0]
    assert printed == f"[{{source: {tmp_path / 'mix' / 'first'}, weight: 3, name: first}}, " \
                      f"{{source: {tmp_path / 'pre_b'}, weight: 1, name: pre_b}}]"
    overrides = [o for o in base_overrides if not o.startswith("data.source=")]
    pretrain.recipe_main(["--config", "pretrain_tiny", *overrides, "~data.source", f"data.sources={printed}", "max_steps=2",
                          "eval_every=0", f"output_dir={tmp_path / 'run'}"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()

    # a prepared folder cannot be re-tokenized: the text it came from is named
    other = train_bpe([p.read_text(encoding="utf-8") for p in plays], 300, tmp_path / "other.json")
    with pytest.raises(SystemExit, match=r"pre_b is a prepared folder \(token ids of .*\), not text, and this "
                                         r"config's tokenizer is another .* Fix: point data.source at the text it "
                                         r"was prepared from \(.*b/"):
        main([*prepare[:3], f"tokenizer.path={other}", "--out", str(tmp_path / "x"), f"data.source={tmp_path / 'pre_b'}"])
    # token shards among text, or in a list of text sources: named, not read as a bad JSON record
    shutil.copytree(tmp_path / "pre_b", tmp_path / "a" / "stray_prepared")
    with pytest.raises(DataError, match=r"holds one, .*stray_prepared', which is a prepared folder"):
        corpus.list_units(tmp_path / "a")
    with pytest.raises(DataError, match=r"pre_b' is a prepared folder \(token shards"):
        corpus.list_units([str(tmp_path / "b"), str(tmp_path / "pre_b")])
    assert not (tmp_path / "x").exists()



def test_two_prepare_data_into_one_out_the_second_names_the_first(tokenizer_path, corpus_dir, tmp_path):
    """Both used to tokenize the whole corpus for the same bytes; the second now stops with the
    first's pid before it reads or writes anything, and the lock goes with its owner."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from letrecipes.components.run_lock import RunLock; "
        f"RunLock({str(out)!r}, lock_file={str(tmp_path / '.out.prepare.lock')!r}).acquire(); "
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    command = [sys.executable, "-m", "letrecipes", "prepare-data", "--config", "pretrain_tiny", "--workers", "1",
               "--out", str(out), f"tokenizer.path={tokenizer_path}", f"data.source={corpus_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 1 and busy.stderr.strip().splitlines()[-1].startswith(
        f"error: --out='{out}' is being prepared by another process: pid {holder.pid} on "), busy.stderr[-2000:]
    assert not out.exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)  # the owner is gone
    assert done.returncode == 0 and read_manifest(out)["tokens"] > 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock left behind



def test_ctrl_c_stops_prepare_data_and_its_workers_in_one_line_and_the_next_launch_goes_on(
        tokenizer_path, corpus_dir, tmp_path):
    """Ctrl-C (SIGINT to the terminal's whole process group) used to print a KeyboardInterrupt
    traceback from the parent and each worker, and leaving the pool waited for every queued
    unit; a SIGTERM during a run's own prepare was a silent kill that left its locks."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt")))
    source = tmp_path / "corpus"
    source.mkdir()
    for i in range(8):  # eight units of a few seconds each: the signal lands with most still to do
        (source / f"part{i}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(6)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "letrecipes", "prepare-data", "--config", "pretrain_tiny", "--workers", "2",
               "--out", str(out), f"tokenizer.path={tokenizer_path}", f"data.source={source}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)  # its own process group, as a terminal's job is
    deadline = time.monotonic() + 240
    while not (out / "shard_000000.json").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGINT)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("error: stopped by SIGINT while preparing. Finished shards are kept: "
                                               "the same command goes on from them.")
    assert not (out / "manifest.json").exists()
    kept = len(list(out.glob("shard_*.json")))
    assert 1 <= kept < 8
    def alive_in_group():  # zombies (exited, waiting to be reaped by a container's init) are not alive
        states = subprocess.run(["ps", "-o", "stat=", "-g", str(job.pid)], capture_output=True, text=True).stdout
        return [state for state in states.split() if not state.startswith("Z")]

    deadline = time.monotonic() + 10
    while alive_in_group() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive_in_group() == []  # no worker goes on with its unit
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{kept} already done, {8 - kept} to go" in done.stdout
    assert not list(out.glob(".*.tmp")) and read_manifest(out)["documents"] == 8 * 6


def test_sigterm_while_a_run_prepares_its_corpus_is_one_line_and_leaves_no_lock(base_overrides, tokenizer_path,
                                                                                corpus_dir, tmp_path):
    """A scheduler's SIGTERM during a run's setup (hours of preparing, at scale) used to kill it
    without a word, leaving the cache's lock and the run folder's lock behind."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt")))
    source = tmp_path / "corpus"
    source.mkdir()
    # 24 units, about 8 s of preparing after the first shard is written: the signal must land before the prepare and
    # the rest of the setup end (with 8 units, 0.5 s; a test process starved under load sent it after the first step)
    for i in range(24):
        (source / f"part{i:02d}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(6)))
    overrides = [o for o in base_overrides if not o.startswith(("data.source=", "data.cache_dir="))]
    cache = tmp_path / "cache"
    job = subprocess.Popen([sys.executable, "-m", "letrecipes.pretrain", "--config", "pretrain_tiny", *overrides,
                            f"data.source={source}", f"data.cache_dir={cache}", f"output_dir={tmp_path / 'run'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(cache.glob("prepared-*/shard_000000.json")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM during setup, before the first step. Nothing was trained; corpus shards prepared "
        "so far are kept, and launching again goes on from them.")
    assert not list(cache.glob("*.lock")) and not (tmp_path / "run").exists()
    assert len(list(cache.glob("prepared-*/shard_*.json"))) >= 1


# ------------------------------------------------------------------ issue 15, part 5: the token cache
def small_jsonl(tmp_path, n=40):
    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(n)))
    return source


def test_cache_key_covers_the_end_of_text_token(tokenizer_path, tmp_path):
    from letrecipes.components.prepare import cached_prepare

    source = small_jsonl(tmp_path)
    plain = cached_prepare(source, Tokenizer(tokenizer_path), tmp_path / "cache", **QUIET)
    another = Tokenizer(tokenizer_path)._tok.id_to_token(300)  # any other token of the vocabulary
    other_eos = cached_prepare(source, Tokenizer(tokenizer_path, eos_token=another), tmp_path / "cache", **QUIET)
    assert plain != other_eos  # another eos splits documents with another id: prepared apart


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "out-of-vocabulary", "manifest", "document keys"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tokenizer_path, tmp_path, damage):
    from letrecipes.components.corpus import DataWarning
    from letrecipes.components.prepare import cached_prepare

    source, tok = small_jsonl(tmp_path), Tokenizer(tokenizer_path)
    folder = cached_prepare(source, tok, tmp_path / "cache", **QUIET)
    shard, keys = folder / "shard_000000.bin", folder / "shard_000000.keys.npy"
    good, good_keys = shard.read_bytes(), keys.read_bytes()
    if damage == "zero-byte":
        shard.write_bytes(b"")
    elif damage == "truncated":
        shard.write_bytes(good[: len(good) // 2])
    elif damage == "out-of-vocabulary":
        shard.write_bytes(good[:10] + np.array([65000], dtype=np.uint16).tobytes() + good[12:])
    elif damage == "document keys":
        keys.write_bytes(good_keys[:100])
    else:
        (folder / MANIFEST).write_text("")
    with pytest.warns(DataWarning, match="cached tokens of .* are damaged"):
        again = cached_prepare(source, tok, tmp_path / "cache", **QUIET)
    assert again == folder and shard.read_bytes() == good and keys.read_bytes() == good_keys
    assert not list(folder.glob(".*.tmp"))


def test_a_sound_cache_is_read_in_full_once_then_only_where_it_changed(tokenizer_path, tmp_path, monkeypatch):
    """Every launch read the whole cache to check its token ids: 40-80 GB for a 20B-token
    corpus, on every node at every start and restart. Now a shard is read in full when it
    is new to the record (verified.json) or changed since (size, mtime); the sizes are still
    checked every time."""
    from letrecipes.components.prepare import VERIFIED, cached_prepare, read_verified

    source, tok = small_jsonl(tmp_path), Tokenizer(tokenizer_path)
    folder = cached_prepare(source, tok, tmp_path / "cache", **QUIET)
    shard = folder / "shard_000000.bin"
    assert set(read_verified(folder, tok.vocab_size)) == {"shard_000000.bin", "shard_000000.keys.npy"}
    assert read_verified(folder, tok.vocab_size + 1) == {}  # another vocabulary: nothing counts as checked
    full_reads = []
    real = prepare_module.stored_keys
    monkeypatch.setattr(prepare_module, "stored_keys", lambda f, shards: full_reads.append(shards) or real(f, shards))
    assert cached_prepare(source, tok, tmp_path / "cache", **QUIET) == folder and full_reads == []
    later = shard.stat().st_mtime_ns + 10**9
    os.utime(shard, ns=(later, later))  # changed since: read in full again, found sound, recorded
    assert cached_prepare(source, tok, tmp_path / "cache", **QUIET) == folder and len(full_reads) == 1
    assert read_verified(folder, tok.vocab_size)["shard_000000.bin"][1] == later
    assert cached_prepare(source, tok, tmp_path / "cache", **QUIET) == folder and len(full_reads) == 1
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])  # a size other than the manifest's is found without the record's help
    with pytest.warns(corpus.DataWarning, match="cached tokens of .* are damaged"):
        cached_prepare(source, tok, tmp_path / "cache", **QUIET)
    assert shard.read_bytes() == good
    (folder / VERIFIED).write_text("{not json")  # a damaged record: every shard is read, and it is rewritten
    assert cached_prepare(source, tok, tmp_path / "cache", **QUIET) == folder
    assert set(read_verified(folder, tok.vocab_size)) == {"shard_000000.bin", "shard_000000.keys.npy"}


def test_a_damaged_prepared_folder_is_named_when_read(tokenizer_path, tmp_path):
    source, tok = small_jsonl(tmp_path), Tokenizer(tokenizer_path)
    prepare_corpus(source, tok, tmp_path / "prepared", **QUIET)
    shard = tmp_path / "prepared" / "shard_000000.bin"
    data = bytearray(shard.read_bytes())
    data[0:2] = np.array([65000], dtype=np.uint16).tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="holds token ids >= the vocabulary size"):
        TokenShards(tmp_path / "prepared", tok)[0:16]


def test_a_failed_tokenisation_leaves_no_temporary_file(tokenizer_path, tmp_path, monkeypatch):
    from letrecipes.components import prepare
    from letrecipes.components.files import StorageError

    source, tok = small_jsonl(tmp_path), Tokenizer(tokenizer_path)

    def broken(*args, **kwargs):
        yield "one document", True
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare, "read_unit_in_pieces", broken)
    with pytest.raises(StorageError, match=r"^prepare: preparing .* failed: the disk is full\. Finished shards are "
                                           r"kept: the same command goes on from them\."):
        prepare_corpus(source, tok, tmp_path / "out", **QUIET)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_cache_dir_that_is_a_file_is_one_error(tokenizer_path, tmp_path):
    from letrecipes.components.files import StorageError
    from letrecipes.components.prepare import cached_prepare

    (tmp_path / "cache").write_text("")
    with pytest.raises(StorageError, match="data.cache_dir=.* is a file, not a folder"):
        cached_prepare(small_jsonl(tmp_path), Tokenizer(tokenizer_path), tmp_path / "cache", **QUIET)


def test_a_long_document_is_prepared_in_pieces_with_the_ids_of_one_call(tokenizer_path, tmp_path, monkeypatch):
    from letrecipes.components import prepare
    from tests.test_gguf_teacher import hard_text

    tok = Tokenizer(tokenizer_path)
    text = hard_text(200)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "one.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare, "PIECE_CHARS", 500)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 2000)  # many flushes inside the one document
    monkeypatch.setattr(corpus, "READ_BLOCK", 777)  # blocks that cut words and UTF-8 sequences
    prepare_corpus(tmp_path / "src", tok, tmp_path / "out", **QUIET)
    ids = np.fromfile(tmp_path / "out" / "shard_000000.bin", dtype=np.uint16).tolist()
    assert tok.splits_safely and ids == tok.encode(text) + [tok.eos_id]


def test_text_files_are_split_into_documents_at_the_separator(tokenizer_path, tmp_path, monkeypatch):
    """TinyStories' text files end each story with a `<|endoftext|>` line: each story is a
    document (its tokens, then EOS), whatever tokenizer reads it, the marker never read as
    text; the same in a .txt.gz, in a tar, in pieces with the marker cut by a block or piece
    boundary, and with `data.document_separator` set to another marker. null reads the file
    as one document, as written."""
    import tarfile
    from letrecipes.components import prepare

    stories = [d.replace(",", ".") for d in documents(40)]
    written = "".join(f"{story}\n<|endoftext|>\n" for story in stories)
    root = tmp_path / "tinystories"
    root.mkdir()
    (root / "TinyStoriesV2-GPT4-valid.txt").write_text(written)
    tok = Tokenizer(tokenizer_path)
    expected = np.concatenate([np.asarray(tok.encode(story + "\n") + [tok.eos_id]) for story in stories])

    def prepared(source, name, **options):
        manifest = prepare_corpus(source, tok, tmp_path / f"out_{name}", **QUIET, **options)
        return manifest, TokenShards(tmp_path / f"out_{name}", tok)[0:manifest["tokens"]]

    manifest, ids = prepared(root, "plain")
    assert manifest["documents"] == 40
    np.testing.assert_array_equal(ids, expected)
    assert [d.rstrip("\n") for d in read_documents(root)] == stories  # the reader the tests and samples use agrees

    monkeypatch.setattr(prepare, "PIECE_CHARS", 120)  # pieces and blocks that cut the marker
    monkeypatch.setattr(corpus, "READ_BLOCK", 97)
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "stories.txt.gz").write_bytes(gzip.compress(written.encode()))
    _, ids = prepared(gz, "gz")
    np.testing.assert_array_equal(ids, expected)
    with tarfile.open(tmp_path / "stories.tar", "w") as tar:
        tar.add(root / "TinyStoriesV2-GPT4-valid.txt", arcname="TinyStoriesV2-GPT4-valid.txt")
    _, ids = prepared(tmp_path / "stories.tar", "tar")
    np.testing.assert_array_equal(ids, expected)

    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("".join(f"{story}\n=====\n" for story in stories))
    manifest, ids = prepared(other, "other", document_separator="\n=====\n")
    expected_other = np.concatenate([np.asarray(tok.encode(story) + [tok.eos_id]) for story in stories])
    assert manifest["documents"] == 40 and np.array_equal(ids, expected_other)

    manifest, ids = prepared(root, "whole", document_separator=None)
    # one document, the markers in it as the text they are: EOS only at its end
    assert manifest["documents"] == 1 and ids.tolist().count(tok.eos_id) == 1 and tok.hf.decode(ids[:-1].tolist()) == written

    # a blank document between two markers (a doubled marker, trailing space) is no document
    blanks = tmp_path / "blanks"
    blanks.mkdir()
    (blanks / "a.txt").write_text(f"{stories[0]}\n<|endoftext|>\n   \n<|endoftext|>\n{stories[1]}\n<|endoftext|>\n \n")
    manifest, ids = prepared(blanks, "blanks")
    assert manifest["documents"] == 2
    np.testing.assert_array_equal(ids, np.concatenate([np.asarray(tok.encode(story + "\n") + [tok.eos_id])
                                                       for story in stories[:2]]))


def test_a_special_token_quoted_in_a_record_is_text_not_an_end_of_document(tokenizer_path, tmp_path):
    """A page that quotes `<|endoftext|>` (code about language models) keeps it as text, as
    nanoGPT's encode_ordinary does: EOS comes only where a document ends."""
    tok = Tokenizer(tokenizer_path)
    page = 'The GPT-2 separator is "<|endoftext|>", written out.'
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pages.jsonl").write_text(json.dumps({"text": page}) + "\n")
    manifest = prepare_corpus(tmp_path / "src", tok, tmp_path / "out", **QUIET)
    ids = TokenShards(tmp_path / "out", tok)[0:manifest["tokens"]].tolist()
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    assert tok.hf.decode(ids[:-1]) == page and tok.hf.encode(page).ids.count(tok.eos_id) == 1  # the library's default


def test_a_tokenizer_that_cannot_spell_the_corpus_is_named_once(tokenizer_path, tmp_path):
    """A WordPiece vocabulary learnt from other text turns most of this corpus into [UNK]:
    one warning with the share, counted in the manifest. A byte-level BPE spells any text:
    nothing to count."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    other = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(["zebra quartz vixen"] * 20, trainers.WordPieceTrainer(
        vocab_size=60, special_tokens=["[UNK]", "[SEP]"]))
    other.save(str(tmp_path / "wordpiece.json"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n".join(documents(30)))
    with pytest.warns(corpus.DataWarning, match=r"data.source: [\d,]+ of the [\d,]+ tokens \([\d.]+%\) are the "
                                                r"tokenizer's unknown token '\[UNK\]': it cannot spell"):
        manifest = prepare_corpus(tmp_path / "src", Tokenizer(tmp_path / "wordpiece.json", eos_token="[SEP]"),
                                  tmp_path / "out", **QUIET)
    assert manifest["unknown_tokens"] > 0.5 * manifest["tokens"]
    wordpiece = Tokenizer(tmp_path / "wordpiece.json", eos_token="[SEP]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not twice in the process that prepared it
        TokenShards(tmp_path / "out", wordpiece)
    prepare_module._WARNED.clear()  # a later run, in a process of its own, reads the prepared folder
    with pytest.warns(corpus.DataWarning, match="it cannot spell"):
        TokenShards(tmp_path / "out", wordpiece)
    byte_level = Tokenizer(tokenizer_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        assert byte_level.unk_id is None
        assert prepare_corpus(tmp_path / "src", byte_level, tmp_path / "out2", **QUIET)["unknown_tokens"] == 0


def test_a_tokenizer_that_drops_what_it_cannot_spell_is_named_before_the_tokenizing(tokenizer_path, tmp_path):
    """A byte-level BPE trained without its byte alphabet and with no unknown token drops every
    character its training text lacked (here: digits and capitals): those documents were
    prepared without them, and without a word, as no unknown token was there to count."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    narrow = HFTokenizer(models.BPE())
    narrow.pre_tokenizer, narrow.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    narrow.train_from_iterator(["the cat sat on the mat and ate a hat"] * 20,
                               trainers.BpeTrainer(vocab_size=80, special_tokens=["<|endoftext|>"]))
    narrow.save(str(tmp_path / "narrow.json"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n".join(documents(30)))
    with pytest.warns(corpus.DataWarning, match=r"data.source: the tokenizer loses [\d.]+% of the characters of the "
                                                r"corpus's first [\d,]+ \(most often .*\) without a trace: it cannot "
                                                r"spell them and has no unknown token or byte fallback"):
        prepare_corpus(tmp_path / "src", Tokenizer(tmp_path / "narrow.json"), tmp_path / "out", **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a byte-level BPE with its alphabet spells it all: no warning
        prepare_corpus(tmp_path / "src", Tokenizer(tokenizer_path), tmp_path / "out2", **QUIET)


def test_text_is_streamed_in_blocks_with_exact_decoding_and_bad_byte_offset(tmp_path, monkeypatch):
    data = ("é" * 10000).encode() + b"\xff" + ("ü word\n" * 500).encode()
    (tmp_path / "a.txt").write_bytes(data)
    monkeypatch.setattr(corpus, "READ_BLOCK", 777)  # odd: two-byte characters straddle blocks
    warn = []
    unit = corpus.list_units(tmp_path / "a.txt")[0]
    pieces = list(corpus.read_unit_in_pieces(unit, warn=warn, piece_chars=300))
    assert "".join(p for p, _ in pieces) == data.decode("utf-8", errors="replace")
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True] and len(pieces) > 5
    assert warn == [f"data.source: {tmp_path / 'a.txt'} is not valid UTF-8 (first bad byte at offset 20,000); 1 "
                    "undecodable byte sequence(s) were replaced by U+FFFD."]


def test_records_without_text_are_skipped_with_one_warning_and_a_misread_file_is_one_error(tokenizer_path,
                                                                                           tmp_path):
    """A missing field, a null text, a last line cut off mid-write, a .pdf beside the corpus:
    counted and named, the good documents kept in order. Text under another field, or a
    file that is not JSONL, is one error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from letrecipes.components.corpus import DataWarning

    tok = Tokenizer(tokenizer_path)
    docs = documents(40)
    source = tmp_path / "corpus"
    source.mkdir()
    lines = [json.dumps({"text": d}) for d in docs[:30]]
    lines.insert(3, json.dumps({"id": 3}))
    lines.insert(8, json.dumps({"text": None}))
    lines.append('{"text": "a record cut off mid-wri')
    (source / "a.jsonl").write_text("\n".join(lines))
    pq.write_table(pa.table({"text": [None, *docs[30:], None]}), source / "b.parquet")
    (source / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    with pytest.warns(DataWarning) as caught:
        manifest = prepare_corpus(source, tok, tmp_path / "out", **QUIET)
    messages = [str(w.message) for w in caught]
    assert any("a.jsonl: skipped 3 of 33 records that hold no text (1 without the field 'text', 1 with a null "
               "'text', 1 not valid JSON; the first at line 4)" in m for m in messages), messages
    assert any("b.parquet (row group 0): skipped 2 of 12 records" in m for m in messages), messages
    assert any("1 file(s) in" in m and "(1 .pdf; first: notes.pdf)" in m for m in messages), messages
    assert manifest["documents"] == 40
    stream = TokenShards(tmp_path / "out", tok)[0:manifest["tokens"]]
    np.testing.assert_array_equal(stream, np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs]))

    other_field = tmp_path / "body.jsonl"
    other_field.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    with pytest.raises(DataError, match=r"body.jsonl:1 has no field 'text' \(its fields are \['body'\]\)\. Fix: "
                                        r"data.text_field=body, its one text field\. \(40 of 40 records are like this\.\)"):
        prepare_corpus(other_field, tok, tmp_path / "out2", **QUIET)
    # chat data (an SFT set given to pretraining): named as such, not "data.text_field=id"
    chat = tmp_path / "chat.jsonl"
    turns = [{"id": str(i), "messages": [{"role": "user", "content": d}, {"role": "assistant", "content": "ok"}]}
             for i, d in enumerate(docs)]
    chat.write_text("".join(json.dumps(t) + "\n" for t in turns))
    join = r"'messages' holds chat turns \(a list of \{role, content\} or \{from, value\} objects\), .*join each"
    with pytest.raises(DataError, match=r"chat.jsonl:1 has no field 'text' \(its fields are \['id', 'messages'\]\); "
                                        + join):
        prepare_corpus(chat, tok, tmp_path / "out4", **QUIET)
    with pytest.raises(DataError, match=r"chat.jsonl:1: " + join):
        prepare_corpus(chat, tok, tmp_path / "out5", text_field="messages", **QUIET)
    pq.write_table(pa.Table.from_pylist(turns), tmp_path / "chat.parquet")
    for field, where in (("text", r"chat.parquet has no column 'text' \(it has \['id', 'messages'\]\); "),
                         ("messages", r"chat.parquet row 0: ")):
        with pytest.raises(DataError, match=where + join):
            prepare_corpus(tmp_path / "chat.parquet", tok, tmp_path / f"out_{field}", text_field=field, **QUIET)
    not_jsonl = tmp_path / "plain.jsonl"
    not_jsonl.write_text("".join(d + "\n" for d in documents(150)))
    with pytest.raises(DataError, match=r"plain.jsonl:1 is not valid JSON .*Fix: .*rename the file to \.txt"):
        prepare_corpus(not_jsonl, tok, tmp_path / "out3", **QUIET)  # stops after 100 bad lines, none good


def test_lone_surrogates_in_json_records_become_replacement_characters_with_one_warning(tokenizer_path, tmp_path):
    """JSON may escape half of a UTF-16 pair (``"\\ud83d"``, a crawl cutting an emoji): Python
    reads it as a lone surrogate, which no tokenizer takes (a TypeError traceback mid-prepare).
    A valid pair is one character and is kept; both JSON Lines and a JSON array."""
    from letrecipes.components.corpus import DataWarning

    tok = Tokenizer(tokenizer_path)
    raw = ['{"text": "cut emoji \\ud83d here"}', '{"text": "a whole pair \\ud83d\\ude00 stays"}',
           '{"text": "trailing \\udc00"}']
    expected = ["cut emoji \ufffd here", "a whole pair \U0001f600 stays", "trailing \ufffd"]
    for name, body in (("a.jsonl", "\n".join(raw)), ("b.json", "[" + ", ".join(raw) + "]")):
        source = tmp_path / name
        source.write_text(body)
        with pytest.warns(DataWarning, match=rf"{name}: 2 lone UTF-16 surrogate\(s\) .* the first at "
                                             rf"(line 1|byte 21)\) were replaced by U\+FFFD"):
            assert list(read_documents(source)) == expected
        with pytest.warns(DataWarning):
            manifest = prepare_corpus(source, tok, tmp_path / f"out-{name}", **QUIET)
        np.testing.assert_array_equal(TokenShards(tmp_path / f"out-{name}", tok)[0:manifest["tokens"]],
                                      np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in expected]))


def test_lone_surrogate_escapes_are_replaced_wherever_the_reads_cut_the_stream():
    """The JSON-array reader rewrites escapes in the byte stream: an escape, a pair or an
    escaped backslash cut between two reads must come out as from one read."""
    import io
    import random

    rng = random.Random(0)
    pieces = ["ab", "\\\\", "\\ud83d", "\\ude00", "\\ud83d\\ude00", "\\\\ud83d", "\\u00e9", "é", "\\"]
    for trial in range(40):
        text = "".join(rng.choice(pieces) for _ in range(60))
        expected = corpus.JSON_SURROGATE_ESCAPE.sub(lambda m: m[0] if m[0] == "\\\\" or len(m[0]) == 12
                                                    else "\\ufffd", text)
        for size in (1, 5, 7, 12, 13, 4096):
            stream = corpus._Utf8Repaired(io.BytesIO(text.encode()), 0)
            out, buffer = b"", bytearray(size)
            while n := stream.readinto(buffer):
                out += bytes(buffer[:n])
            assert out.decode() == expected, (trial, size)
            assert stream.surrogates == sum(len(m[0]) == 6 for m in corpus.JSON_SURROGATE_ESCAPE.finditer(text))
    assert json.loads('"' + corpus.JSON_SURROGATE_ESCAPE.sub(
        lambda m: m[0] if m[0] == "\\\\" or len(m[0]) == 12 else "\\ufffd", "\\\\ud83d \\ud83d\\ude00 \\udc00") + '"') \
        == "\\ud83d \U0001f600 \ufffd"


def test_json_csv_compression_and_text_encodings_read_the_same_documents(tokenizer_path, tmp_path):
    """The class "the formats corpora ship in": C4's JSON Lines named .json.gz, a JSON array,
    CSV/TSV (quoted values with newlines and commas), text compressed four ways, text in
    UTF-8/16/32 with a byte-order mark. Every one reads back the same documents."""
    import bz2
    import csv
    import io
    import lzma

    import zstandard

    docs = [d + ',\n "quoted", and a second line' for d in documents(12)]
    root = tmp_path / "corpus"
    root.mkdir()
    jsonl = "".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs[0:3]).encode()
    (root / "a_c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(jsonl))
    (root / "b_array.json").write_text(json.dumps([{"text": d} for d in docs[3:5]], indent=2))
    (root / "c_lines.ndjson.bz2").write_bytes(bz2.compress(json.dumps({"text": docs[5]}).encode()))
    table = io.StringIO()
    csv.writer(table).writerows([["id", "text"], [0, docs[6]], [1, docs[7]]])
    (root / "d_table.csv").write_text(table.getvalue())
    table = io.StringIO()
    csv.writer(table, delimiter="\t").writerows([["text"], [docs[8]]])
    (root / "e_table.tsv.xz").write_bytes(lzma.compress(table.getvalue().encode()))
    (root / "f_utf16.txt").write_bytes(docs[9].encode("utf-16"))
    (root / "g_utf32.md.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[10].encode("utf-32")))
    (root / "h_bom.txt").write_bytes(codecs.BOM_UTF8 + docs[11].encode())
    assert list(read_documents(root)) == docs
    assert [u.kind for u in corpus.list_units(root)] == ["jsonl", "jsonl", "jsonl", "csv", "csv", "text"]
    tok = Tokenizer(tokenizer_path)
    manifest = prepare_corpus(root, tok, tmp_path / "out", **QUIET)  # the streaming path agrees
    stream = TokenShards(tmp_path / "out", tok)[0:manifest["tokens"]]
    np.testing.assert_array_equal(stream, np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs]))


def test_a_json_array_is_read_record_by_record(tmp_path):
    """A corpus file that is one JSON array is parsed a record at a time (a many-GB array
    never sits whole in memory: benchmarks/json_array_memory.py): records come out before
    the reader has seen the end, so a file cut off mid-record gives its whole records first,
    then one error naming the record it broke after. Undecodable bytes become U+FFFD with one
    warning, as in JSON Lines; a gzip stream that breaks names the record too."""
    records = [{"text": f"record {i} " + "x" * 5000, "url": f"u{i}"} for i in range(400)]
    whole = json.dumps(records, indent=1).encode()
    cut = tmp_path / "cut.json"
    cut.write_bytes(whole[:len(whole) // 2])
    read = []
    with pytest.raises(DataError, match=r"cut.json starts like a JSON array but is not valid JSON after record "
                                        r"(\d+) \(parse error: premature EOF\)") as error:
        for text in corpus.read_documents(cut):
            read.append(text)
    assert 100 < len(read) < 400 and read == [r["text"] for r in records[:len(read)]]
    assert f"after record {len(read)} " in str(error.value)

    bad_bytes = tmp_path / "bad_utf8.json"
    bad_bytes.write_bytes(codecs.BOM_UTF8 + b'[{"text": "caf\xc3\xa9"}, {"text": "a\xff\xfeb"}, {"text": "ok"}]')
    with pytest.warns(corpus.DataWarning, match=r"bad_utf8.json is not valid UTF-8 \(first bad byte at offset 34\); "
                                                "1 undecodable byte sequence"):
        assert list(corpus.read_documents(bad_bytes)) == ["caf\u00e9", "a\ufffdb", "ok"]

    broken_gzip = tmp_path / "broken.json.gz"
    broken_gzip.write_bytes(gzip.compress(whole)[:-100])
    with pytest.raises(DataError, match=r"broken.json.gz is damaged: the compressed stream breaks after record \d+ "):
        list(corpus.read_documents(broken_gzip))


def test_a_binary_text_column_is_read_as_utf8_and_a_list_column_is_named(tmp_path):
    """Crawls that keep a page's bytes (a binary column): read as UTF-8, the rows that are
    not counted in one warning; a column of lists is one error that says to join them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9", b"bad \xff byte", None, b"ok"], pa.binary())}),
                   tmp_path / "pages.parquet")
    with pytest.warns(corpus.DataWarning, match=r"pages.parquet \(row group 0\) is not valid UTF-8: 1 of its rows hold "
                                                r"undecodable bytes \(the first, row 1, at its byte 4\)"):
        assert list(read_documents(tmp_path / "pages.parquet")) == ["caf\u00e9", "bad \ufffd byte", "ok"]
    # a string column need not hold UTF-8 (parquet writers and Arrow's reader do not check):
    # to_pylist stopped at the first bad row with a UnicodeDecodeError traceback
    import pyarrow.ipc as ipc

    values = [b"caf\xc3\xa9", b"bad \xff byte", b"ok"]
    for kind, offsets in ((pa.string(), np.int32), (pa.large_string(), np.int64)):
        column = pa.Array.from_buffers(kind, 3, [None, pa.py_buffer(np.cumsum([0, *map(len, values)]).astype(offsets)),
                                                 pa.py_buffer(b"".join(values))])
        pq.write_table(pa.table({"text": column}), tmp_path / "unchecked.parquet")
        shutil.rmtree(tmp_path / "unchecked_dataset", ignore_errors=True)
        with ipc.new_file(str(tmp_path / "unchecked.arrow"), pa.schema([("text", kind)])) as writer:
            writer.write_table(pa.table({"text": column}))
        import datasets

        datasets.Dataset(pa.table({"text": column})).save_to_disk(str(tmp_path / "unchecked_dataset"))
        for name in ("unchecked.parquet", "unchecked.arrow", "unchecked_dataset"):
            with pytest.warns(corpus.DataWarning, match=r"is not valid UTF-8: 1 of its rows hold undecodable bytes"):
                assert list(read_documents(tmp_path / name)) == ["caf\u00e9", "bad \ufffd byte", "ok"], (kind, name)
    # so with a CSV file (pyarrow's check refused the whole file: "invalid UTF8 data")
    (tmp_path / "rows.csv").write_bytes(b"id,text\n1,caf\xc3\xa9\n2,bad \xff byte\n3,ok\n")
    with pytest.warns(corpus.DataWarning, match=r"rows.csv is not valid UTF-8: 1 of its rows hold undecodable bytes "
                                                r"\(the first, row 1, at its byte 4\)"):
        assert list(read_documents(tmp_path / "rows.csv")) == ["caf\u00e9", "bad \ufffd byte", "ok"]
    pq.write_table(pa.table({"text": pa.array([["one sentence.", "two."]])}), tmp_path / "lists.parquet")
    with pytest.raises(DataError, match=r"lists.parquet row 0: 'text' is list, not text \(a list: join its items"):
        list(read_documents(tmp_path / "lists.parquet"))


def test_text_in_windows_1252_is_said_once_per_file_with_the_conversion_to_make_first(tmp_path):
    """A Latin-1 (Windows-1252) JSON Lines file of 3,000 lines gave 3,000 warnings, one per line
    ("fr.jsonl:1 is not valid UTF-8 ...", ":2", ...), and none of them said what the bytes
    were. Every format now says so once per file, with the iconv to run first when the bytes
    read as Windows-1252; a UTF-8 file with a few damaged bytes gets no such advice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Le café numéro {i} est très apprécié à Paris, où l'été est chaud." for i in range(300)]
    latin = [t.encode("cp1252") for t in texts]
    (tmp_path / "fr.jsonl").write_bytes(b"".join(b'{"text": "' + t + b'"}\n' for t in latin))
    (tmp_path / "fr.txt").write_bytes(b"\n\n".join(latin))
    (tmp_path / "fr.json").write_bytes(b"[" + b", ".join(b'{"text": "' + t + b'"}' for t in latin) + b"]")
    (tmp_path / "fr.csv").write_bytes(b"text\n" + b"".join(b'"' + t + b'"\n' for t in latin))
    pq.write_table(pa.table({"text": pa.array(latin, pa.binary())}), tmp_path / "fr.parquet")
    (tmp_path / "fr.jsonl.gz").write_bytes(gzip.compress((tmp_path / "fr.jsonl").read_bytes()))
    convert = "It reads as Windows-1252 (Latin-1) text, not damaged UTF-8: convert it to UTF-8 first ({}), or those " \
              "characters are lost to training."
    expected = {
        "fr.jsonl": ("is not valid UTF-8: 300 of its lines hold undecodable bytes (the first, line 1, at its byte 16); "
                     "2,700 byte sequence(s) were replaced by U+FFFD. "
                     + convert.format(f"iconv -f cp1252 -t utf-8 {tmp_path / 'fr.jsonl'} > {tmp_path / 'fr.utf8.jsonl'}")),
        "fr.txt": "2,700 undecodable byte sequence(s) were replaced by U+FFFD. " + convert.format(
            f"iconv -f cp1252 -t utf-8 {tmp_path / 'fr.txt'} > {tmp_path / 'fr.utf8.txt'}"),
        "fr.json": "2,700 undecodable byte sequence(s) were replaced by U+FFFD. " + convert.format(
            f"iconv -f cp1252 -t utf-8 {tmp_path / 'fr.json'} > {tmp_path / 'fr.utf8.json'}"),
        "fr.csv": "300 of its rows hold undecodable bytes (the first, row 0, at its byte 6); 2,700 byte sequence(s) "
                  "were replaced by U+FFFD. " + convert.format(
                      f"iconv -f cp1252 -t utf-8 {tmp_path / 'fr.csv'} > {tmp_path / 'fr.utf8.csv'}"),
        "fr.parquet": convert.format("rewrite its text column decoded as cp1252, e.g. bytes.decode('cp1252') in the "
                                     "script that wrote it"),
        "fr.jsonl.gz": convert.format("iconv -f cp1252 -t utf-8 on its decompressed text"),
    }
    for name, said in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            read = list(read_documents(tmp_path / name))
        messages = [str(w.message) for w in caught if issubclass(w.category, corpus.DataWarning)]
        assert len(messages) == 1 and said in messages[0] and "Windows-1252" in messages[0], (name, messages)
        assert "".join(read).count("\ufffd") == 2700, name
    # UTF-8 with two damaged bytes among valid accents: counted, no conversion advised
    good = b"".join(b'{"text": "' + t.encode() + b'"}\n' for t in texts)
    (tmp_path / "damaged.jsonl").write_bytes(good[:5000] + b"\xff\xfe" + good[5000:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(read_documents(tmp_path / "damaged.jsonl"))
    messages = [str(w.message) for w in caught if issubclass(w.category, corpus.DataWarning)]
    assert len(messages) == 1 and "1 of its lines hold undecodable bytes" in messages[0] and \
        "Windows-1252" not in messages[0], messages


def test_warnings_of_many_files_show_the_first_few_and_all_go_to_the_prepared_folder(tmp_path, tokenizer_path):
    """A folder of crawl files, each with one empty record, gave one warning line per file
    (300 lines for 300 files; 50,000 for a crawl of 50,000). The first few are shown, then
    one line that counts the rest and names the file in the prepared folder that holds all."""
    corpus_dir = tmp_path / "crawl"
    corpus_dir.mkdir()
    texts = documents(36)
    for i in range(12):
        (corpus_dir / f"part{i:02d}.jsonl").write_text(json.dumps({"text": " ".join(texts[3 * i:3 * i + 3])}) + "\n"
                                                      + json.dumps({"text": ""}) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_corpus(corpus_dir, Tokenizer(tokenizer_path), tmp_path / "out", **QUIET)
    said = [str(w.message) for w in caught if issubclass(w.category, corpus.DataWarning)]
    shown = prepare_module.WARNINGS_SHOWN
    assert len(said) == shown + 1 and all("skipped 1 of 2 records" in m for m in said[:shown]), said
    assert said[-1] == (f"data.source: {12 - shown} more warning(s) like those above were not shown, 12 in all: every "
                        f"one is in {tmp_path / 'out' / 'warnings.txt'}. Fix: read them there; none, if they say what "
                        "is meant (records skipped, bytes replaced).")
    kept = (tmp_path / "out" / "warnings.txt").read_text(encoding="utf-8").splitlines()
    assert len(kept) == 12 and sorted(m.split(": ")[1] for m in kept) == \
        sorted(f"{corpus_dir / f'part{i:02d}.jsonl'}" for i in range(12))
    # the folder is read as prepared, the extra file notwithstanding
    assert read_manifest(tmp_path / "out")["tokens"] > 0
    assert len(PackedDataset(TokenShards(tmp_path / "out"), 16, "train", 0.0)) > 0


def test_binary_hidden_and_empty_files_add_no_tokens(tokenizer_path, tmp_path):
    """A binary file with a text suffix is skipped with a warning naming it; macOS's
    ``._name`` resource forks and hidden folders are not read; an empty document (a file,
    a record) adds no lone end-of-text token; all-skipped is one error that points at the
    warnings."""
    from letrecipes.components.corpus import DataWarning

    docs = documents(4)
    root = tmp_path / "corpus"
    (root / ".cache").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0])
    (root / "._a.txt").write_bytes(b"\x00\x05\x16\x07" + os.urandom(500))
    (root / ".cache" / "b.txt").write_text("cached, not corpus")
    (root / "b.txt").write_bytes(os.urandom(100) + b"\x00" + os.urandom(1000))
    (root / "c.txt").write_text("")
    (root / "c2.txt").write_text(" \n\t\n")  # blank space only: no document either
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [docs[1], "", docs[2], " \n", docs[3]]))
    tok = Tokenizer(tokenizer_path)
    with pytest.warns(DataWarning) as caught:
        manifest = prepare_corpus(root, tok, tmp_path / "out", **QUIET)
    messages = [str(w.message) for w in caught]
    assert any("b.txt is skipped: it looks binary (a NUL byte in its first 8,000 bytes" in m for m in messages), messages
    assert any("d.jsonl: skipped 2 of 5 records that hold no text (2 with an empty or blank 'text'; the first at "
               "line 2)" in m for m in messages), messages
    assert manifest["documents"] == 4
    stream = TokenShards(tmp_path / "out", tok)[0:manifest["tokens"]]
    np.testing.assert_array_equal(stream, np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs]))

    only_binary = tmp_path / "binary.txt"
    only_binary.write_bytes(b"\x00" * 100)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"holds no text \(0 documents; the 1 warning\(s\) "
                                                                  r"above say what was skipped\)"):
        prepare_corpus(only_binary, tok, tmp_path / "out2", **QUIET)
    # Again on the same folder: the unit is done and reads no more, but the error still says what was skipped.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is warned twice
        with pytest.raises(DataError, match=r"holds no text \(0 documents\)\. Fix: .* When it was read, 1 warning\(s\) "
                                            r"said what was skipped; the first: .*binary\.txt is skipped: it looks binary"):
            prepare_corpus(only_binary, tok, tmp_path / "out2", **QUIET)


def test_damaged_files_of_every_format_are_one_error(tokenizer_path, tmp_path):
    import lzma

    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = Tokenizer(tokenizer_path)
    text = "\n".join(documents(3000))
    cases = {}
    cases["cut.txt.gz"] = (gzip.compress(text.encode())[:5000], r"cut.txt.gz is damaged: the compressed stream breaks "
                                                                 r"after [\d,]+ bytes")
    cases["cut.json.xz"] = (lzma.compress("".join(json.dumps({"text": d}) + "\n" for d in documents(3000)).encode())
                            [:5000], r"cut.json.xz is damaged: the compressed stream breaks after line \d+")
    cases["ragged.csv"] = (b'text,id\n"abc,1\n' + b"x,2,3,4\n" * 10, r"ragged.csv does not read as CSV after row 0 "
                                                                    r"\(CSV parse error: [^\n]*\)\. Fix: repair")
    cases["body.csv"] = (b"id,body\n1,x\n", r"body.csv has no column 'text' \(it has \['id', 'body'\]\)")
    cases["broken.json"] = (b'[{"text": "a"}, {"text": ', r"broken.json starts like a JSON array but is not valid JSON")
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": documents(2000)}), buffer, compression="snappy")
    data = bytearray(buffer.getvalue().to_pybytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    cases["damaged.parquet"] = (bytes(data), r"damaged.parquet is damaged: row group 0 does not read")
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=match):
            prepare_corpus(tmp_path / name, tok, tmp_path / f"out_{name}", **QUIET)
        assert not (tmp_path / f"out_{name}" / MANIFEST).exists()


def test_copies_of_documents_inside_a_corpus_are_counted_and_their_files_named(tokenizer_path, tmp_path, capsys,
                                                                               monkeypatch):
    """A file beside its compressed copy, and a file re-sharded into parquet, trained twice
    without a word. The prepare keys every document (kept beside each shard), counts the
    copies across the corpus, names the files that share the most, and warns in every run
    that reads the folder. A corpus without copies is silent; counting a range of keys at a
    time gives the same count; a folder prepared before keys were kept gets them on a rerun."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from letrecipes.components import document_keys

    tok = Tokenizer(tokenizer_path)
    texts = documents(90)
    lines = lambda docs: "".join(json.dumps({"text": d}) + "\n" for d in docs)  # noqa: E731
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(lines(texts[:40]))
    (src / "a.jsonl.gz").write_bytes(gzip.compress(lines(texts[:40]).encode()))
    (src / "b.jsonl").write_text(lines(texts[40:80]))
    pq.write_table(pa.table({"text": texts[40:50][::-1]}), src / "c.parquet")  # 10 of b's, re-sharded
    keyed = sum(len(tok.encode(t)) + 1 >= document_keys.MIN_TOKENS for t in texts[:50])
    assert keyed == 50  # every document of these is long enough to be keyed
    with pytest.warns(corpus.DataWarning) as caught:
        manifest = prepare_corpus(src, tok, tmp_path / "out", log=print)
    said = [str(w.message) for w in caught if "copies of another" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith("data.source: 50 of its 130 documents (of 32+ tokens) are copies of another")
    assert f"most: 40 in both {src / 'a.jsonl'} and {src / 'a.jsonl.gz'}; 10 in both {src / 'b.jsonl'} and " in said[0]
    assert "Fix: data.drop_copies=true prepares it with each document once" in said[0]
    assert manifest["repeats"]["copies"] == 50 and manifest["repeats"]["documents"] == 130
    assert "prepare: 50 of 130 documents (of 32+ tokens) are copies of another" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.keys.npy")) == [f"shard_00000{i}.keys.npy" for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not twice in the process that prepared it
        TokenShards(tmp_path / "out", tok)
    prepare_module._WARNED.clear()  # a training run, in a process of its own
    with pytest.warns(corpus.DataWarning, match="50 of its 130 documents .* are copies of another"):
        TokenShards(tmp_path / "out", tok)
    # counted a range of keys at a time, the same figures
    monkeypatch.setattr(document_keys, "PASS_KEYS", 7)
    arrays = document_keys.stored_keys(tmp_path / "out", manifest["shards"])
    assert {**manifest["repeats"], **document_keys.count_repeats(arrays)} == manifest["repeats"]
    # a folder prepared before keys were kept: a rerun of the prepare keys it and counts
    for keys in (tmp_path / "out").glob("*.keys.npy"):
        keys.unlink()
    old = {k: v for k, v in manifest.items() if k != "repeats"}
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(old))
    prepare_module._WARNED.clear()
    with pytest.warns(corpus.DataWarning, match="50 of its 130 documents"):
        assert prepare_corpus(src, tok, tmp_path / "out", **QUIET)["repeats"] == manifest["repeats"]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text(encoding="utf-8"))["repeats"] == manifest["repeats"]
    # a keys file damaged since: the same command keys the shard again
    keys_file = tmp_path / "out" / "shard_000001.keys.npy"
    good_keys = keys_file.read_bytes()
    keys_file.write_bytes(good_keys[:64])
    prepare_module._WARNED.clear()
    with pytest.warns(corpus.DataWarning, match="50 of its 130 documents"):
        prepare_corpus(src, tok, tmp_path / "out", **QUIET)
    assert keys_file.read_bytes() == good_keys
    # no copies: no warning, and the count says 0
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.jsonl").write_text(lines(texts[:40]))
    (clean / "b.jsonl").write_text(lines(texts[40:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_corpus(clean, tok, tmp_path / "out2", **QUIET)["repeats"]["copies"] == 0


def test_drop_copies_prepares_each_document_once_and_survives_a_kill(tokenizer_path, tmp_path, capsys, monkeypatch):
    """data.drop_copies=true: the first of each document (of 32+ tokens) stays, in stream
    order, and its copies (a compressed copy of a file, rows re-sharded into parquet, a repeat
    within a file) are left out; the shards read back as the distinct documents, keys show
    no copy left, the log and the manifest say what was dropped. A cache named after the
    option; a prepared folder made without it refused; a shard killed mid-rewrite redone."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from letrecipes.components import document_keys
    from letrecipes.components.data import build_datasets
    from letrecipes.components.prepare import cached_prepare

    tok = Tokenizer(tokenizer_path)
    texts = documents(60)
    lines = lambda docs: "".join(json.dumps({"text": d}) + "\n" for d in docs)  # noqa: E731
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(lines(texts[:20] + texts[5:8]))  # three repeats inside the file
    (src / "a.jsonl.gz").write_bytes(gzip.compress(lines(texts[:20]).encode()))
    (src / "b.jsonl").write_text(lines(texts[20:60]))
    pq.write_table(pa.table({"text": texts[30:40][::-1] + ["short"]}), src / "c.parquet")
    distinct = texts + ["short"]  # "short" is under 32 tokens: not keyed, never dropped
    manifest = prepare_corpus(src, tok, tmp_path / "out", log=print, drop_copies=True)
    out = capsys.readouterr().out
    assert "prepare: data.drop_copies: 3 of 4 shard(s) hold copies of earlier documents" in out
    assert "prepare: data.drop_copies: 33 copies of earlier documents left out" in out
    assert "prepare: 0 of 60 documents (of 32+ tokens) are copies of another" in out
    assert manifest["repeats"]["dropped"] == 33 and manifest["documents"] == len(distinct)
    stream = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], dtype=np.uint16) for s in manifest["shards"]])
    eos = tok.eos_id
    got = [tok.decode(d.tolist()) for d in np.split(stream, np.flatnonzero(stream == eos) + 1) if len(d)]
    assert [g.removesuffix(tok.eos_token) for g in got] == texts[:20] + texts[20:60] + ["short"]
    assert manifest["tokens"] == len(stream)
    # the same folder again: nothing to redo, nothing more to drop
    assert prepare_corpus(src, tok, tmp_path / "out", **QUIET, drop_copies=True)["tokens"] == manifest["tokens"]
    # killed after a shard's rewrite was renamed, before its .json was updated: the shard is redone from the source
    meta = json.loads((tmp_path / "out" / "shard_000001.json").read_text(encoding="utf-8"))
    (tmp_path / "out" / "shard_000001.json").write_text(json.dumps({**meta, "tokens": meta["tokens"] + 7}))
    (tmp_path / "out" / MANIFEST).unlink()
    again = prepare_corpus(src, tok, tmp_path / "out", **QUIET, drop_copies=True)
    assert again["shards"] == manifest["shards"] and again["repeats"]["dropped"] == 33
    # without the option, the same source prepares elsewhere, copies kept; given as a prepared folder, refused
    with pytest.warns(corpus.DataWarning, match="33 of its 93 documents .* Fix: data.drop_copies=true"):
        kept = prepare_corpus(src, tok, tmp_path / "kept", **QUIET)
    assert kept["repeats"]["copies"] == 33 and kept["tokens"] > manifest["tokens"]
    with pytest.raises(DataError, match=r"data.drop_copies=true, but data.source='.*kept' is a prepared folder whose "
                                        r"copies were kept. Fix: prepare it again"):
        cached_prepare(tmp_path / "kept", tok, tmp_path / "cache", drop_copies=True, **QUIET)
    from letrecipes.cli import main
    with pytest.raises(SystemExit, match=r"data.drop_copies=true, but data.source='.*kept' is a prepared folder"):
        main(["prepare-data", "--config", "pretrain_tiny", f"tokenizer.path={tokenizer_path}", "--out",
              str(tmp_path / "unused"), f"data.source={tmp_path / 'kept'}", "data.drop_copies=true"])
    # as a cache: a folder of its own, the training windows drawn from the distinct documents
    prepare_module._WARNED.clear()
    with pytest.warns(corpus.DataWarning, match="33 of its 93 documents"):
        plain = cached_prepare(src, tok, tmp_path / "cache", **QUIET)
    dropped = cached_prepare(src, tok, tmp_path / "cache", drop_copies=True, **QUIET)
    assert plain != dropped and read_manifest(dropped)["tokens"] == manifest["tokens"]
    train, _, _ = build_datasets({"source": str(src), "seq_len": 16, "cache_dir": str(tmp_path / "cache"),
                                  "drop_copies": True, "val_fraction": 0.0}, tok, seed=0, log=lambda _: None,
                                 validation=False)
    assert len(train) == (manifest["tokens"] - 1) // 17
    # counted a range of keys at a time, the same choice; the rewrites spread over worker processes, the same bytes
    monkeypatch.setattr(document_keys, "PASS_KEYS", 5)
    assert prepare_corpus(src, tok, tmp_path / "small_passes", **QUIET, drop_copies=True)["shards"] == manifest["shards"]
    two = prepare_corpus(src, tok, tmp_path / "two_workers", **QUIET, drop_copies=True, workers=2)
    assert two["shards"] == manifest["shards"] and all(
        (tmp_path / "two_workers" / s["file"]).read_bytes() == (tmp_path / "out" / s["file"]).read_bytes()
        for s in manifest["shards"])


def test_a_cache_prepared_before_document_keys_gets_them_when_a_run_reads_it(tokenizer_path, tmp_path):
    """A cache made by a letrecipes that kept no keys stayed without them until deleted: no
    copies count, the held-out check hashing tokens, mixtures not compared. The next run
    that reads it keys it once (its shards untouched)."""
    from letrecipes.components.prepare import cached_prepare

    source, tok = small_jsonl(tmp_path), Tokenizer(tokenizer_path)
    folder = cached_prepare(source, tok, tmp_path / "cache", **QUIET)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    shard_bytes = (folder / "shard_000000.bin").read_bytes()
    keys = sorted(folder.glob("*.keys.npy"))
    kept = {path: path.read_bytes() for path in keys}
    for path in keys:
        path.unlink()
    (folder / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "repeats"}))
    lines = []
    assert cached_prepare(source, tok, tmp_path / "cache", log=lines.append) == folder
    assert any("was prepared before document keys were kept" in line for line in lines)
    assert {path: path.read_bytes() for path in keys} == kept
    assert json.loads((folder / MANIFEST).read_text(encoding="utf-8")) == manifest
    assert (folder / "shard_000000.bin").read_bytes() == shard_bytes
    lines.clear()  # keyed once: the next reader finds it complete
    cached_prepare(source, tok, tmp_path / "cache", log=lines.append)
    assert not any("keying" in line for line in lines)


def test_a_long_listing_says_how_far_it_has_got_and_how_to_skip_it(tmp_path, tokenizer_path, monkeypatch):
    """A folder of millions of files takes minutes to list at each launch: not in silence."""
    for i in range(5000):
        (tmp_path / "c" / f"{i // 1000}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / f"{i // 1000}" / f"{i}.txt").write_text(f"document {i}\n")
    lines = []
    corpus.list_units(tmp_path / "c", log=lines.append)
    assert lines == []  # quick: nothing said
    monkeypatch.setattr(corpus, "LISTING_PROGRESS_S", 0.0)
    folder = prepare_module.cache_folder(tmp_path / "c", Tokenizer(tokenizer_path), tmp_path / "cache",
                                         log=lines.append)
    seconds = [re.sub(r"\d+ s\b", "N s", line) for line in lines]  # however long the machine takes
    assert seconds == [f"data.source: listing {tmp_path / 'c'}: 4,096 names so far, N s",
                       f"data.source: listed 5,000 names in {tmp_path / 'c'} in N s, as each launch on it does; "
                       "`letrecipes prepare-data` once, with data.source=<its --out>, lists nothing at launch"]
    assert folder == prepare_module.cache_folder(tmp_path / "c", Tokenizer(tokenizer_path), tmp_path / "cache")


def test_real_paths_are_realpaths_and_cache_names_do_not_move(tmp_path, tokenizer_path):
    """real_paths finds each folder's real path once (a launch's cache name hashed every file's
    realpath, 5 s of 6.5 for 200,000 files); what it returns is os.path.realpath's, so every
    cache folder already on disk keeps its name."""
    import hashlib

    from letrecipes.components.files import real_paths

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt", "sub/c.jsonl"):
        (real / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "some text\n")
    (tmp_path / "via").symlink_to(real, target_is_directory=True)  # a folder on the way is a link
    (real / "sub" / "link.txt").symlink_to(real / "a.txt")  # the file itself is one
    paths = [tmp_path / "via" / "a.txt", tmp_path / "via" / "sub" / "b.txt", tmp_path / "via" / "sub" / "link.txt",
             real / "sub" / ".." / "sub" / "c.jsonl", tmp_path / "never_written.txt"]
    found = list(real_paths(paths))
    assert [r for r, _ in found] == [os.path.realpath(p) for p in paths]
    assert [s.st_size if s else None for _, s in found] == [10, 10, 10, 14, None]
    tokenizer = Tokenizer(tokenizer_path)
    h = hashlib.sha256(f"v{prepare_module.FORMAT_VERSION}|r{prepare_module.READER_VERSION}|{tokenizer.fingerprint()}|"
                       f"eos={tokenizer.eos_token!r}|text|sep={corpus.DOCUMENT_SEPARATOR!r}".encode())
    for f in corpus.source_files(tmp_path / "via"):  # the name as written before 2026-12-05
        h.update(f"|{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}".encode())
    assert prepare_module.cache_key(tmp_path / "via", tokenizer, "text") == h.hexdigest()[:20]


def test_a_datasets_folder_of_long_rows_is_cut_by_size_and_reads_the_same(tmp_path, tokenizer_path, monkeypatch):
    """50,000 rows a unit made a folder of books one unit (one worker for 11 GB): units now
    stop at TEXT_UNIT_BYTES of rows, and read the same documents, in order, as the same tokens;
    a folder prepared in the old units is used as it is."""
    from datasets import Dataset

    docs = [f"book {i}: " + " ".join(documents(30)[i % 30:]) for i in range(40)]
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "books"))
    tok = Tokenizer(tokenizer_path)
    old = corpus.list_units(tmp_path / "books")
    assert [u.is_range for u in old] == [False]  # small: one unit, listed as before
    before = prepare_corpus(tmp_path / "books", tok, tmp_path / "whole", **QUIET)
    monkeypatch.setattr(corpus, "TEXT_UNIT_BYTES", len(docs[0]) * 6)
    units = corpus.list_units(tmp_path / "books")
    assert len(units) >= 4 and [(u.start, u.stop) for u in units][:2] == [(0, units[0].stop), (units[0].stop,
                                                                                              units[1].stop)]
    assert units[-1].stop == 40 and units[1].describe().endswith(f"[rows {units[1].start}-{units[1].stop}]")
    assert [text for u in units for text in corpus.read_unit(u)] == docs
    cut = prepare_corpus(tmp_path / "books", tok, tmp_path / "cut", workers=2, **QUIET)
    assert cut["tokens"] == before["tokens"] and len(cut["shards"]) == len(units)
    assert np.array_equal(TokenShards(tmp_path / "cut", tok)[0:cut["tokens"]],
                          TokenShards(tmp_path / "whole", tok)[0:before["tokens"]])
    messages = []
    assert prepare_corpus(tmp_path / "books", tok, tmp_path / "whole", log=messages.append) == before
    assert any("already prepared" in m for m in messages), messages


def _tokenizer_threads(_job) -> tuple:
    return os.environ.get("RAYON_NUM_THREADS"), os.environ.get("TOKENIZERS_PARALLELISM")


def test_workers_share_the_cores_of_units_too_few_for_them():
    """--workers is a budget of cores: with fewer units than workers, each worker's tokenizer
    gets the threads of the idle ones (before: one thread each, the rest of the machine idle;
    a 128 MB file is 2-3 units, a 32-core machine ran them on 2-3 cores)."""
    seen = []
    prepare_module.in_workers(_tokenizer_threads, {0: None, 1: None}, 4, lambda _, got: seen.append(got))
    assert sorted(s[:2] for s in seen) == [("2", "true"), ("2", "true")]
    seen.clear()
    prepare_module.in_workers(_tokenizer_threads, dict.fromkeys(range(4)), 2, lambda _, got: seen.append(got))
    assert [s[:2] for s in seen] == [("1", "false")] * 4


def test_workers_past_the_cores_this_process_may_use_are_cut_to_them(tokenizer_path, corpus_dir, tmp_path,
                                                                      monkeypatch):
    """A cluster's `--workers 64` on an 8-core login node started 64 tokenizing processes, and
    the default (os.cpu_count() - 1) counted the node's cores, not a job's allocation: 127
    workers on the 4 cores SLURM gave. Both follow the CPU affinity now."""
    said = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert prepare_module.workers_within_cores(64, "prepare", said.append) == 3
    assert said == ["prepare: 64 workers asked for, more than the 3 cores this process may use (its CPU affinity): 3 "
                    "used (a process past the cores only shares them, with a tokenizer of its own in memory)"]
    assert prepare_module.workers_within_cores(3, "prepare", said.append) == 3 and len(said) == 1
    monkeypatch.undo()
    if shutil.which("taskset") is None:
        return
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "letrecipes", "prepare-data", "--config",
                             "pretrain_tiny", "--out", str(tmp_path / "out"), f"tokenizer.path={tokenizer_path}",
                             f"data.source={corpus_dir}", "--workers", "2"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "prepare: 2 workers asked for, more than the 1 core this process may use" in \
        result.stdout and "; 1 worker(s)" in result.stdout, result.stdout + result.stderr[-2000:]


def test_ids_only_encoding_of_long_and_short_texts_is_encode_batchs_in_order(tokenizer_path):
    """Preparing keeps the ids only: texts of LONG_TEXT_CHARS or more skip the offsets
    (encode_batch_fast, 1/1.7 of the time), shorter ones do not; the ids, their order and
    a separator quoted in the text (encoded as text) are what encode_batch gives."""
    from tokenizers import Tokenizer as HFTokenizer

    from letrecipes.components.tokenizer import LONG_TEXT_CHARS, encode_as_text

    hf = HFTokenizer.from_file(str(tokenizer_path))
    line = "Quoting <|endoftext|> in a line, café 1234.\n"
    texts = [line, line * (LONG_TEXT_CHARS // len(line) + 1), "", line * 3, line * (2 * LONG_TEXT_CHARS // len(line))]
    assert [len(t) >= LONG_TEXT_CHARS for t in texts] == [False, True, False, False, True]
    expected = [e.ids for e in encode_as_text(hf, texts)]
    assert [e.ids for e in encode_as_text(hf, texts, offsets=False)] == expected
    assert hf.token_to_id("<|endoftext|>") not in expected[1] and not hf.encode_special_tokens  # left as found


@pytest.mark.parametrize("files, workers", [(1, 1), (2, 2)])
def test_a_long_unit_says_how_far_it_has_got_before_its_shard_is_done(tokenizer_path, tmp_path, files, workers):
    """A compressed file is one unit (hours for a 15 GB .jsonl.zst); progress lines used to come
    only as units finished. Now they come on the clock, with the bytes the units under way have
    read: in this process (one worker) and from worker processes (two)."""
    source = tmp_path / "corpus"
    source.mkdir()
    for n in range(files):
        with gzip.open(source / f"part{n}.jsonl.gz", "wt") as f:
            for text in documents(20_000, start=n * 20_000):
                f.write(json.dumps({"text": text * 3}) + "\n")
    total_mb = sum(p.stat().st_size for p in source.iterdir()) / 2**20
    lines = []
    prepare_corpus(source, Tokenizer(tokenizer_path), tmp_path / "out", workers=workers, log=lines.append,
                   progress_every_s=0.05)
    progress = [re.match(r"prepare: (\d+)/(\d+) units(?: \((\d+) under way\))?, ([\d,.]+)/([\d,.]+) MB, ([\d,]+) "
                         r"tokens/s, elapsed \S+, ETA \S+$", line) for line in lines]
    progress = [m for m in progress if m]
    assert progress and progress[-1].group(1) == progress[-1].group(2) == str(files)  # the last says all are done
    under_way = [m for m in progress if m.group(3)]
    assert under_way, lines  # lines before any unit was done
    read = [float(m.group(4).replace(",", "")) for m in progress]
    assert any(0 < float(m.group(4).replace(",", "")) < total_mb - 0.06 for m in under_way), lines  # part-way
    assert read == sorted(read) and read[-1] == pytest.approx(total_mb, abs=0.06)
    assert all(float(m.group(5).replace(",", "")) == read[-1] for m in progress)
    assert any(int(m.group(6).replace(",", "")) > 0 for m in under_way)  # tokens written so far count in the rate


def test_the_progress_thread_stops_quietly_when_its_output_is_gone(monkeypatch):
    """`letrecipes prepare-data | head -1`: a progress line written by the thread finds the pipe
    closed; the thread ends without a traceback of its own (the work's next line says it)."""
    import threading

    raised, ticks = [], []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type))

    def tick():
        ticks.append(time.monotonic())
        raise BrokenPipeError(32, "Broken pipe")

    with prepare_module._Every(0.01, tick):
        time.sleep(0.2)
    assert len(ticks) == 1 and raised == []


def test_a_file_still_being_written_is_named_and_not_prepared_as_the_part_that_arrived(tokenizer_path, tmp_path,
                                                                                         monkeypatch):
    """A corpus prepared while its download still ran was prepared as whatever had arrived,
    its last record cut (skipped with a warning at most), and kept as the corpus."""
    source = tmp_path / "corpus"
    source.mkdir()
    part = source / "part.jsonl"
    part.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(50)))
    listed = part.stat().st_size
    reader, arrived = prepare_module.read_unit_in_pieces, '{"text": "what arrived mean'  # a record not yet whole

    grown = []

    def while_it_grows(*args, **kwargs):  # the record arrives once (the check of the tokenizer reads the start too)
        for i, piece in enumerate(reader(*args, **kwargs)):
            if i == 0 and not grown:
                with open(part, "a") as more:
                    more.write(arrived)
                grown.append(True)
            yield piece

    monkeypatch.setattr(prepare_module, "read_unit_in_pieces", while_it_grows)
    tok = Tokenizer(tokenizer_path)
    with pytest.raises(DataError, match=re.escape(
            f"data.source: {part} changed while it was being prepared: {listed:,} bytes when the corpus was listed, "
            f"{listed + len(arrived):,} now (a download or a copy still under way?). Fix: wait until it is complete, then run "
            "the command again.")):
        prepare_corpus(source, tok, tmp_path / "out", workers=1, **QUIET)
    assert not list((tmp_path / "out").glob("shard_*"))  # nothing of it is kept as prepared
    monkeypatch.undo()
    with open(part, "a") as more:
        more.write('time"}\n')  # the download ends
    with pytest.raises(DataError, match=re.escape(
            f"prepare: {tmp_path / 'out'} was begun from the same files when they held other bytes: {part} was "
            f"{listed:,} bytes, is {part.stat().st_size:,}: one changed since, or was still being written then. Fix: "
            "delete that folder")):
        prepare_corpus(source, tok, tmp_path / "out", workers=1, **QUIET)
    assert prepare_corpus(source, tok, tmp_path / "new", workers=1, **QUIET)["documents"] == 51


def test_a_used_prepare_folder_says_what_sets_its_corpus_apart():
    """A prepare into a folder holding another corpus said only "other sources or another
    tokenizer": now which, and the first file added, gone or changed."""
    from letrecipes.components.prepare import plan_difference

    def plan(*units, **settings):
        return {"format_version": 1, "tokenizer_fingerprint": "a", "eos_id": 0, "dtype": "uint16",
                "text_field": "text", "document_separator": "<|endoftext|>", **settings,
                "units": [{"kind": "text", "paths": list(paths), "size": size} for paths, size in units]}

    was = plan((["/c/a.txt", "/c/b.txt"], 30), (["/c/big.jsonl"], 100), (["/c/big.jsonl"], 50))
    assert plan_difference(was, plan((["/c/a.txt", "/c/b.txt"], 30), (["/c/big.jsonl"], 151))) == (
        "from the same files when they held other bytes: /c/big.jsonl was 150 bytes, is 151")
    assert plan_difference(was, plan((["/c/a.txt", "/c/b.txt"], 31), (["/c/big.jsonl"], 150))) == (
        "from the same files when they held other bytes: /c/a.txt and the 1 file(s) read with it, together, was 30 "
        "bytes, is 31")
    assert plan_difference(was, plan((["/c/a.txt", "/c/c.txt"], 30), (["/c/big.jsonl"], 150))) == (
        "from other files: 1 not in it (first: /c/c.txt); 1 gone or not read now (first: /c/b.txt)")
    assert plan_difference(was, plan((["/c/a.txt", "/c/b.txt"], 30), (["/c/big.jsonl"], 150),
                                     tokenizer_fingerprint="b", eos_id=2)) == "with another tokenizer"
    assert plan_difference(was, plan((["/c/a.txt", "/c/b.txt"], 30), (["/c/big.jsonl"], 150),
                                     document_separator=None)) == "with document_separator '<|endoftext|>' -> None"
