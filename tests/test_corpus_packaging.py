"""Corpora as they are packaged, not only as they are formatted: archives (TinyStories'
tar.gz of JSON arrays, OpenWebText's tar of .xz tars, zips), compression that the name
does not say, datasets' .arrow cache files, glob patterns, Hub ids given as paths, a
dataset card beside the records. Each reads the same documents as the plain files."""

import bz2
import gzip
import io
import json
import lzma
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from letrecipes.components import corpus
from letrecipes.components.corpus import DataError, DataWarning, read_documents
from letrecipes.components.data import TokenShards
from letrecipes.components.prepare import prepare_corpus
from letrecipes.components.tokenizer import Tokenizer

QUIET = {"log": lambda _: None}


def documents(n, start=0):
    rng = np.random.default_rng(start)
    return [f"Document {i}: " + " ".join(str(x) for x in rng.integers(0, 10**6, 30 + i % 7)) + "\nThe end."
            for i in range(start, start + n)]


def tar_bytes(members, mode="w"):
    """A tar archive of ``(name, bytes)`` members, in that order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def jsonl(docs, field="text"):
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


@pytest.fixture
def packaged(tmp_path):
    """The same 24 documents in every packaging, one folder each: ``{name: folder}``."""
    import zstandard

    docs = documents(24)
    texts = [(f"part/{i:02d}.txt", d.encode()) for i, d in enumerate(docs[:8])]
    records = [("shard_0.jsonl", jsonl(docs[8:16])), ("shard_1.json.gz", gzip.compress(jsonl(docs[16:24])))]
    members = texts + records
    hidden = [("__MACOSX/part/._00.txt", b"\x00\x05\x16\x07junk"), (".DS_Store", b"\x00\x00\x00\x01Bud1")]
    layouts = {
        "tar": tar_bytes(members + hidden),
        "tar.gz": gzip.compress(tar_bytes(members)),
        "tgz": gzip.compress(tar_bytes(members)),
        "tar.xz": lzma.compress(tar_bytes(members)),
        "tar.bz2": bz2.compress(tar_bytes(members)),
        "tar.zst": zstandard.ZstdCompressor().compress(tar_bytes(members)),
        "zip": zip_bytes(members + hidden),
    }
    folders = {}
    for suffix, data in layouts.items():
        folder = tmp_path / suffix
        folder.mkdir()
        (folder / f"corpus.{suffix}").write_bytes(data)
        folders[suffix] = folder
    # OpenWebText: a tar of xz-compressed tars whose names do not say tar; a zip inside a tar
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "subset.tar").write_bytes(tar_bytes([
        ("subset/urlsf_00_data.xz", lzma.compress(tar_bytes(texts[:5]))),
        ("subset/urlsf_01_data.xz", lzma.compress(tar_bytes(texts[5:]))),
        ("subset/records.zip", zip_bytes(records)),
    ]))
    folders["nested"] = nested
    return docs, folders


def test_archives_read_as_their_members_in_order(packaged):
    docs, folders = packaged
    for name, folder in folders.items():
        with _no_data_warnings():
            assert list(read_documents(folder)) == docs, name
        assert [u.kind for u in corpus.list_units(folder)] == ["archive"], name


def test_an_archive_prepares_to_the_ids_of_its_extracted_files(packaged, tokenizer_path, tmp_path, monkeypatch):
    """The prepare step streams members in pieces (a small piece size forces the cuts):
    the ids are those of each document in one call, whatever the packaging."""
    monkeypatch.setattr("letrecipes.components.prepare.PIECE_CHARS", 100)
    docs, folders = packaged
    tok = Tokenizer(tokenizer_path)
    expected = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs])
    for name in ("tar.zst", "zip", "nested"):
        manifest = prepare_corpus(folders[name], tok, tmp_path / f"out-{name}", workers=2 if name == "zip" else 1,
                                  **QUIET)
        np.testing.assert_array_equal(TokenShards(tmp_path / f"out-{name}", tok)[0:manifest["tokens"]], expected)


def test_tinystories_layout_a_tar_gz_of_json_arrays_with_another_text_field(tmp_path):
    docs = documents(6)
    arrays = [json.dumps([{"story": d, "source": "GPT-4"} for d in docs[:4]]).encode(),
              json.dumps([{"story": d, "source": "GPT-4"} for d in docs[4:]]).encode()]
    (tmp_path / "TinyStories_all_data.tar.gz").write_bytes(
        gzip.compress(tar_bytes([("data00.json", arrays[0]), ("data01.json", arrays[1]), ("LICENSE", b"MIT\n")])))
    with pytest.warns(DataWarning, match=r"1 member\(s\) of .*TinyStories_all_data.tar.gz are not read \(1 \(no "
                                         r"suffix\); first: .*\[LICENSE\]\)"):
        assert list(read_documents(tmp_path, text_field="story")) == docs


def test_files_of_formats_not_read_are_counted_by_suffix_in_one_warning(tmp_path):
    docs = documents(2)
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(docs[1])
    for name in ("x.pdf", "sub/y.doc", "sub/z.doc", "Makefile"):
        (tmp_path / name).write_bytes(b"%PDF\x00")
    with pytest.warns(DataWarning, match=r"4 file\(s\) in '.*' are not read \(1 \(no suffix\), 2 \.doc, 1 \.pdf; first: "
                                         r"Makefile\): only text"):
        assert list(read_documents(tmp_path)) == docs


def test_a_folder_of_no_format_read_names_what_it_holds_and_markup_named_directly_warns(tmp_path):
    """A Wikipedia dump (XML, bzip2) in a folder: the error counts the files by their whole
    suffix (.xml.bz2, not .bz2). Named directly it is read as text, with one warning that
    the markup is read too and how to extract the text."""
    dump = tmp_path / "dump" / "enwiki-20261101-pages-articles.xml.bz2"
    dump.parent.mkdir()
    dump.write_bytes(bz2.compress(b"<mediawiki><page><title>A</title><text>Words of the page.</text></page></mediawiki>"))
    (dump.parent / "notes.doc").write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(DataError, match=r"folder '.*dump' holds none of the formats read\. 2 file\(s\) in it are not "
                                        r"read \(1 \.doc, 1 \.xml\.bz2; first: enwiki-20261101-pages-articles.xml.bz2\)\. "
                                        r"Read are: text"):
        read_documents(dump.parent).__next__()
    with pytest.warns(DataWarning, match=r"pages-articles.xml.bz2 is read as plain text, its markup \(tags, attributes, "
                                         r"entities\) included\. Fix: extract the text first"):
        assert next(read_documents(dump)).startswith("<mediawiki><page>")
    page = tmp_path / "page.HTML"
    page.write_text("<p>Hello</p>")
    with pytest.warns(DataWarning, match=r"page.HTML is read as plain text"):
        assert list(read_documents(page)) == ["<p>Hello</p>"]


def write_files(folder, names, docs):
    """Each name gets one document (JSON records for .jsonl, text otherwise); returns {name: doc}."""
    written = {}
    for name, doc in zip(names, docs):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"text": doc}) + "\n" if name.endswith(".jsonl") else doc)
        written[name] = doc
    return written


@pytest.mark.parametrize("names, train", [
    (["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl", "data/test-00000-of-00001.jsonl",
      "data/validation-00000-of-00001.jsonl", "README.md"], 2),  # the Hub's parquet-converter layout
    (["TinyStories-train.txt", "TinyStories-valid.txt"], 1),
    (["c4-train.00000-of-01024.jsonl", "c4-train.00001-of-01024.jsonl", "c4-validation.00000-of-00008.jsonl"], 2),
    (["train/a.txt", "train/b.txt", "test/c.txt"], 2),
], ids=["hub-shards", "name-train-valid", "c4", "split-folders"])
def test_a_folder_laid_out_in_splits_reads_its_train_split(tmp_path, names, train):
    docs = documents(len(names))
    written = write_files(tmp_path, names, docs)
    expected = [written[n] for n in sorted(written) if corpus.split_named(Path(n)) == "train"]
    assert len(expected) == train
    with pytest.warns(DataWarning, match=r"is laid out in splits as datasets names them: the train split is read \("
                                         + str(train) + r" file\(s\) or folder\(s\)\), .* not, as with load_dataset"):
        assert list(read_documents(tmp_path)) == expected


@pytest.mark.parametrize("names", [
    ["the-test-pilot.txt", "hamlet.txt", "the-great-train-robbery.txt"],  # books, not splits: some name no split
    ["test.txt", "notes.txt"],
    ["valid.jsonl", "test.jsonl"],  # splits, but no train among them: read as given
], ids=["books", "one-named", "no-train"])
def test_a_folder_that_is_not_laid_out_in_splits_is_read_whole(tmp_path, names):
    docs = documents(len(names))
    written = write_files(tmp_path, names, docs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(read_documents(tmp_path)) == [written[n] for n in sorted(written)]


def test_datasets_own_layouts_read_their_train_split_and_never_their_metadata(tmp_path):
    """save_to_disk of a DatasetDict (dataset_dict.json, train/, test/) and the cache that
    load_dataset writes (dataset_info.json beside json-train.arrow and json-test.arrow):
    their JSON metadata used to be read as records (one error), and test was trained on."""
    import datasets

    datasets.disable_progress_bars()
    docs = documents(5)
    dataset_dict = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:3]}),
                                         "test": datasets.Dataset.from_dict({"text": docs[3:]})})
    dataset_dict.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "raw").mkdir()
    for split, part in (("train", docs[:3]), ("test", docs[3:])):
        (tmp_path / "raw" / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    datasets.load_dataset("json", data_files={s: str(tmp_path / "raw" / f"{s}.jsonl") for s in ("train", "test")},
                          cache_dir=str(tmp_path / "cache"))
    [cache] = {p.parent for p in (tmp_path / "cache").rglob("*-train.arrow")}
    assert (cache / "dataset_info.json").is_file()
    for folder in (tmp_path / "saved", cache):
        with pytest.warns(DataWarning, match="the train split is read"):
            assert list(read_documents(folder)) == docs[:3]
    assert list(read_documents(tmp_path / "saved" / "test")) == docs[3:]  # another split, named


def test_the_split_keywords_are_datasets_own():
    from datasets.data_files import FILES_TO_IGNORE, SPLIT_KEYWORDS

    assert {str(split): tuple(words) for split, words in SPLIT_KEYWORDS.items()} == corpus.SPLIT_KEYWORDS
    assert set(corpus.DATASETS_METADATA) == set(FILES_TO_IGNORE) - {"README.md"}


def test_links_to_files_never_downloaded_are_said_not_skipped_in_silence(tmp_path):
    """A Hugging Face cache whose download stopped holds links to blobs that were never
    written: they were skipped without a word, and the run trained on part of the corpus."""
    docs = documents(2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-0.jsonl").write_text(jsonl(docs).decode())
    (tmp_path / "data" / "train-1.jsonl").symlink_to(tmp_path / "blobs" / "3f2a")
    with pytest.warns(DataWarning, match=r"1 file\(s\) in .* are links to files that do not exist \(first: "
                      r"data/train-1.jsonl -> .*blobs/3f2a\).*they are not read. Fix: finish the download"):
        assert list(read_documents(tmp_path)) == docs
    (tmp_path / "data" / "train-0.jsonl").unlink()
    with pytest.raises(DataError, match=r"are links to files that do not exist .* and it holds nothing else"):
        list(read_documents(tmp_path))


def test_a_parquet_row_group_is_read_in_batches_of_rows(tmp_path, monkeypatch):
    """A row group was read whole, then made Python strings: about five times its text in
    memory (pandas writes a million rows a group). Now in batches of rows, fewer for longer
    rows (`python benchmarks/parquet_memory.py`: 256 MB of text, 1018 -> 108 MB peak)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from letrecipes.components import corpus

    docs = documents(40)
    long_docs = [d * 40 for d in docs]
    meta = pa.array([{"body": d, "lang": "en"} for d in docs])
    pq.write_table(pa.table({"text": docs, "meta": meta}), tmp_path / "short.parquet", row_group_size=40)
    pq.write_table(pa.table({"text": long_docs}), tmp_path / "long.parquet", row_group_size=40)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        sizes.append(kwargs["batch_size"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    monkeypatch.setattr(corpus, "ROW_BATCH_ROWS", 16)
    monkeypatch.setattr(corpus, "ROW_BATCH_BYTES", 20_000)
    with _no_data_warnings():
        assert list(read_documents(tmp_path / "short.parquet")) == docs
        assert list(read_documents(tmp_path / "short.parquet", text_field="meta.body")) == docs
        assert list(read_documents(tmp_path / "long.parquet")) == long_docs
    assert sizes[0] == sizes[1] == 16 and 1 <= sizes[2] < 16, sizes  # long rows: fewer a batch

    from datasets import Dataset  # a datasets folder's unit (50,000 rows) is made strings in batches too

    Dataset.from_dict({"text": long_docs}).save_to_disk(str(tmp_path / "saved"))
    batches = []
    real_values = corpus._python_values
    monkeypatch.setattr(corpus, "_python_values", lambda column: batches.append(len(column)) or real_values(column))
    with _no_data_warnings():
        assert list(read_documents(tmp_path / "saved")) == long_docs
    assert len(batches) > 2 and sum(batches) == 40 and max(batches) < 16, batches


def test_parquet_and_arrow_members_of_an_archive_are_read_in_memory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(7)
    table = pa.table({"id": list(range(3)), "text": docs[:3]})
    parquet, arrow = io.BytesIO(), io.BytesIO()
    pq.write_table(table, parquet, row_group_size=2)
    with pa.ipc.new_stream(arrow, table.schema) as writer:
        writer.write_table(pa.table({"id": list(range(3)), "text": docs[3:6]}), max_chunksize=2)
    (tmp_path / "shards.tar.gz").write_bytes(gzip.compress(tar_bytes([
        ("a/train-0.parquet", parquet.getvalue()), ("a/train-1.arrow", arrow.getvalue()),
        ("a/train-2.jsonl", jsonl(docs[6:]))])))
    assert list(read_documents(tmp_path / "shards.tar.gz")) == docs
    with pytest.raises(DataError, match=r"shards.tar.gz\[a/train-0.parquet\] has no column 'story' \(it has \['id', 'text'\]\)"):
        list(read_documents(tmp_path / "shards.tar.gz", text_field="story"))
    # A CSV member reads once; its header line is kept to name the columns all the same.
    rows = "\ufeffid,body\r\n" + "".join(f'{i},"{d}"\r\n' for i, d in enumerate(docs[:2]))
    (tmp_path / "rows.tar").write_bytes(tar_bytes([("rows.csv", rows.encode())]))
    with pytest.raises(DataError, match=r"rows.tar\[rows.csv\] has no column 'text' \(it has \['id', 'body'\]\)"):
        list(read_documents(tmp_path / "rows.tar"))
    assert list(read_documents(tmp_path / "rows.tar", text_field="body")) == docs[:2]


def test_compression_is_read_from_the_content_not_the_name(tmp_path):
    """A gzip file named .txt used to be skipped as binary; a .jsonl that is zstd, a .gz that
    is plain text: each reads as what it holds."""
    import zstandard

    docs = documents(3)
    (tmp_path / "a.txt").write_bytes(gzip.compress(docs[0].encode()))
    (tmp_path / "b.jsonl").write_bytes(zstandard.ZstdCompressor().compress(jsonl([docs[1]])))
    (tmp_path / "c.txt.gz").write_bytes(docs[2].encode())
    with _no_data_warnings():
        assert list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.txt.gz"])) == docs


def test_lz4_files_read_named_or_not(tmp_path):
    """The `lz4` command's frame format (a .jsonl.lz4, a .tar.lz4) was skipped as binary, and
    a folder's .lz4 files were not read."""
    import pyarrow as pa

    def lz4(data: bytes) -> bytes:
        out = pa.BufferOutputStream()
        with pa.CompressedOutputStream(out, "lz4") as stream:
            stream.write(data)
        return out.getvalue().to_pybytes()

    docs = documents(4)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl.lz4").write_bytes(lz4(jsonl(docs[:2])))
    (folder / "b.tar.lz4").write_bytes(lz4(tar_bytes([("b.txt", docs[2].encode())])))
    (tmp_path / "c.txt").write_bytes(lz4(docs[3].encode()))  # named as text: read by its content
    with _no_data_warnings():
        assert list(read_documents([folder, tmp_path / "c.txt"])) == docs
    whole = lz4(jsonl(documents(3000)))
    (tmp_path / "cut.jsonl.lz4").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.lz4 is damaged: the compressed stream breaks after line \d+ "
                                        r"\(Truncated compressed stream\)\. Fix: re-download the file"):
        list(read_documents(tmp_path / "cut.jsonl.lz4"))


def test_zstd_long_window_files_read(tmp_path):
    """`zstd --long=31` (for big corpora) writes frames with windows above zstandard's default
    128 MiB limit: they read as "damaged" before. A stream made the same way, small."""
    import io

    import zstandard

    docs = documents(2)
    params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True, write_content_size=False)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as writer:
        writer.write(jsonl(docs))
    assert zstandard.get_frame_parameters(out.getvalue()).window_size == 2**31
    (tmp_path / "long.jsonl.zst").write_bytes(out.getvalue())
    with _no_data_warnings():
        assert list(read_documents(tmp_path / "long.jsonl.zst")) == docs


def web_archive(records, compressed: bool = True) -> bytes:
    """A WARC file (warcio's writer) of ``(type, text)`` records: `conversion` as Common
    Crawl's WET files hold each page's text, `response` as its WARC files hold each page."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = io.BytesIO()
    writer = WARCWriter(out, gzip=compressed)
    writer.write_record(writer.create_warcinfo_record("corpus.warc", {"software": "test"}))
    for i, (kind, text) in enumerate(records):
        http = (StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
                if kind == "response" else None)
        writer.write_record(writer.create_warc_record(
            f"https://example.com/{i}", kind, payload=io.BytesIO(text.encode()), http_headers=http,
            warc_content_type=None if http else "text/plain"))
    return out.getvalue()


def test_web_archives_read_as_one_document_a_page(tmp_path):
    """Common Crawl's WET files (CC-MAIN-*.warc.wet.gz) were read as one text document of WARC
    headers (named directly) or not at all (in a folder)."""
    docs = documents(6)
    folder = tmp_path / "crawl"
    folder.mkdir()
    (folder / "CC-MAIN-00000.warc.wet.gz").write_bytes(
        web_archive([("conversion", docs[0]), ("metadata", "fetchTimeMs: 12"), ("conversion", docs[1]),
                     ("conversion", "  \n"), ("conversion", docs[2])]))
    (folder / "CC-MAIN-00001.warc.wet").write_bytes(web_archive([("conversion", d) for d in docs[3:5]], False))
    (tmp_path / "pages.tar").write_bytes(tar_bytes([("p/a.warc.wet.gz", web_archive([("conversion", docs[5])]))]))
    with pytest.warns(DataWarning, match=r"CC-MAIN-00000.warc.wet.gz: skipped 1 of 4 records that hold no text "
                                         r"\(1 empty; the first at record 5\)"):
        assert list(read_documents([folder, tmp_path / "pages.tar"])) == docs
    # pages as fetched (HTTP headers and HTML) are not text: one error, not markup trained on
    (tmp_path / "pages.warc.gz").write_bytes(web_archive([("response", "<html><body>hi</body></html>")] * 3))
    with pytest.raises(DataError, match=r"pages.warc.gz holds web pages as they were fetched \(WARC response records: "
                                        r"HTTP headers and HTML\), not text.* Fix: use the text extracted from them "
                                        r"\(Common Crawl publishes it as WET files"):
        list(read_documents(tmp_path / "pages.warc.gz"))
    # text named as a web archive: warcio read it as records of the older ARC format, "web pages as fetched"
    (tmp_path / "notes.warc.wet").write_text("just some text, not a web archive\n")
    with pytest.raises(DataError, match=r"notes.warc.wet is named as a web archive but is not one \(a WARC file "
                                        r"begins with 'WARC/'; this one with 'just some text, not a web archive'\)"):
        list(read_documents(tmp_path / "notes.warc.wet"))
    # cut short: compressed (warcio takes the gzip stream's EOFError for the end) or not
    whole = web_archive([("conversion", d) for d in documents(200)])
    (tmp_path / "cut.warc.wet.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.warc.wet.gz is damaged: the compressed stream breaks "
                                        r"(after WARC record [\d,]+ )?\(Compressed file ended"):
        list(read_documents(tmp_path / "cut.warc.wet.gz"))
    plain = web_archive([("conversion", d) for d in docs[:2]], False)
    (tmp_path / "cut.warc.wet").write_bytes(plain[:-100])
    with pytest.raises(DataError, match=r"cut.warc.wet is damaged: it ends inside WARC record 3 \(\d+ of its \d+ "
                                        r"bytes\)"):
        list(read_documents(tmp_path / "cut.warc.wet"))


def test_a_file_of_another_kind_named_as_text_is_skipped_with_its_kind_named(tmp_path):
    docs = documents(1)
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_bytes(zip_bytes([("x.txt", b"hello")]))
    (tmp_path / "c.txt").write_bytes(b"%PDF-1.7\n" + bytes(range(256)))
    (tmp_path / "d.txt").write_bytes(b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(range(256)))  # packings not read
    (tmp_path / "e.txt").write_bytes(b"Rar!\x1a\x07\x01\x00" + bytes(range(256)))
    with pytest.warns(DataWarning) as caught:
        assert list(read_documents(tmp_path)) == docs
    messages = [str(w.message) for w in caught]
    assert any("b.txt is skipped: it is a zip file, named as text. Fix: rename it to end in .zip" in m for m in messages)
    assert any("c.txt is skipped: it is a PDF file." in m for m in messages), messages
    assert any("d.txt is skipped: it is a 7-Zip file, a packing not read here (gzip, zstd, bzip2, xz and LZ4 files "
               f"are, and tar and zip archives). Fix: unpack it first (7z x {tmp_path / 'd.txt'})" in m
               for m in messages), messages
    assert any("e.txt is skipped: it is a RAR file, a packing not read here" in m and
               f"(unrar x {tmp_path / 'e.txt'})" in m for m in messages), messages


def test_damaged_and_misnamed_archives_are_one_error(tmp_path):
    docs = documents(8)
    whole = gzip.compress(tar_bytes([(f"{i}.txt", d.encode()) for i, d in enumerate(docs)]))
    (tmp_path / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.tar.gz.* is damaged: .*Fix: re-download the file"):
        list(read_documents(tmp_path / "cut.tar.gz"))
    (tmp_path / "text.tar").write_text(docs[0])
    with pytest.raises(DataError, match=r"text.tar is named as an archive but is not one"):
        list(read_documents(tmp_path / "text.tar"))
    (tmp_path / "bad.zip").write_bytes(zip_bytes([("a.txt", docs[0].encode())])[:40])
    with pytest.raises(DataError, match=r"bad.zip is .*Fix: re-download it"):
        list(read_documents(tmp_path / "bad.zip"))


def test_arrow_files_as_datasets_caches_and_pyarrow_write_them(tmp_path):
    import pyarrow as pa

    docs = documents(5)
    table = pa.table({"id": list(range(7)), "text": docs[:3] + [None, ""] + docs[3:]})
    with pa.OSFile(str(tmp_path / "cache-train-00000-of-00002.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:  # datasets' cache files: the stream format
            writer.write_table(table, max_chunksize=2)
    with pa.OSFile(str(tmp_path / "cache-train-00001-of-00002.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:  # the file format
            writer.write_table(table.slice(0, 2), max_chunksize=1)
    with pytest.warns(DataWarning, match=r"skipped 2 of 7 records that hold no text \(1 with a null 'text', 1 with "
                                         r"an empty or blank 'text'; the first at row 3\)"):
        assert list(read_documents(tmp_path)) == docs + docs[:2]
    assert [u.kind for u in corpus.list_units(tmp_path)] == ["arrow", "arrow"]
    with pytest.raises(DataError, match=r"has no column 'story' \(it has \['id', 'text'\]\)"):
        list(read_documents(tmp_path, text_field="story"))
    whole = (tmp_path / "cache-train-00000-of-00002.arrow").read_bytes()
    (tmp_path / "cache-train-00000-of-00002.arrow").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cache-train-00000-of-00002.arrow is (damaged|not a readable Arrow file)"):
        list(read_documents(tmp_path))


def test_feather_files_pandas_writes_are_read_and_feather_v1_is_named(tmp_path):
    """pandas' DataFrame.to_feather writes Arrow's IPC file format (Feather V2, LZ4 by default):
    it was "not read" by its suffix alone. V1, an older layout, gets the one-line re-save."""
    import pyarrow as pa
    import pyarrow.feather as feather

    docs = documents(4)
    (tmp_path / "v2").mkdir()
    feather.write_feather(pa.table({"id": list(range(4)), "text": docs}), str(tmp_path / "v2" / "part.feather"))
    assert list(read_documents(tmp_path / "v2")) == docs
    assert [u.kind for u in corpus.list_units(tmp_path / "v2")] == ["arrow"]
    (tmp_path / "v1").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pyarrow's own, for writing V1
        feather.write_feather(pa.table({"text": docs}), str(tmp_path / "v1" / "old.feather"), version=1)
    with pytest.raises(DataError, match=r"old.feather is Feather V1, an older layout .* Fix: save it again as V2"):
        list(read_documents(tmp_path / "v1"))


def test_glob_patterns_hub_ids_and_a_card_beside_the_records(tmp_path, monkeypatch):
    docs = documents(4)
    data = tmp_path / "fineweb" / "data"
    data.mkdir(parents=True)
    for i, d in enumerate(docs):
        (data / f"train-{i:05d}.jsonl").write_bytes(jsonl([d]))
    (data / "val-00000.jsonl").write_bytes(jsonl(["held out"]))
    (tmp_path / "fineweb" / "README.md").write_text("# Dataset card\nlicense: odc-by\n")
    with pytest.warns(DataWarning, match=r"the train split is read \(4 file"):  # train and val: the card is not read
        assert list(read_documents(tmp_path / "fineweb")) == docs
    (data / "val-00000.jsonl").rename(data / "extra-00000.jsonl")  # no splits: everything is read, the card too
    with pytest.warns(DataWarning, match=r"1 text file\(s\) in .* \(first: README.md\) are read as documents beside "
                                         r"5 file\(s\) of records"):
        list(read_documents(tmp_path / "fineweb"))
    with _no_data_warnings():
        assert list(read_documents(str(tmp_path / "fineweb" / "**" / "train-*.jsonl"))) == docs
    with pytest.raises(DataError, match=r"the pattern '.*tarin-\*.jsonl' matches no file .*Fix: correct the pattern"):
        list(read_documents(str(data / "tarin-*.jsonl")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"'HuggingFaceFW/fineweb-edu' does not exist .* Hugging Face Hub dataset id: "
                                        r"letrecipes reads local files only and never downloads. Fix: download it "
                                        r"first \(huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type "
                                        r"dataset --local-dir data/fineweb-edu\)"):
        list(read_documents("HuggingFaceFW/fineweb-edu"))
    with pytest.raises(DataError, match=r"'fineweb/missing' does not exist .* Fix: set it to an existing"):
        list(read_documents("fineweb/missing"))  # its first part is a folder here: a path, not a Hub id


def test_project_warnings_print_as_one_line(tmp_path):
    """Entry points show the project's warnings as ``warning: ...`` lines, without Python's
    file, line and source line; other warnings keep Python's format."""
    code = ("import warnings\n"
            "from letrecipes.components.errors import warnings_as_lines\n"
            "from letrecipes.components.corpus import DataWarning\n"
            "warnings_as_lines()\n"
            "warnings.warn('data.source: x is skipped', DataWarning)\n"
            "warnings.warn('plain', UserWarning)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert lines[0] == "warning: data.source: x is skipped", done.stderr
    assert "UserWarning: plain" in done.stderr


class _no_data_warnings:
    """Fails the block on any DataWarning (a misread would warn)."""

    def __enter__(self):
        import warnings

        self.catch = warnings.catch_warnings(record=True)
        self.caught = self.catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.catch.__exit__(*exc)
        messages = [str(w.message) for w in self.caught if issubclass(w.category, DataWarning)]
        assert not messages, messages


def hub_cache_folder(cache, repo_type, repo_id, files, commit="0123abcd"):
    """huggingface_hub's layout: blobs/<hash>, snapshots/<commit>/<name> -> ../../blobs/<hash>, refs/main."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = folder / "blobs" / f"blob{abs(hash(name))}"
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    (folder / "snapshots" / "old-commit").mkdir()  # an earlier download, not the one refs/main names
    return folder


def test_a_hugging_face_cache_folder_reads_as_the_snapshot_it_serves(tmp_path, teacher_dir, monkeypatch):
    """`huggingface-cli download` without --local-dir fills ~/.cache/huggingface/hub: its
    models--/datasets-- folders read as their current snapshot; a Hub id it holds gets its path."""
    from letrecipes.components.teachers import TeacherError, load_teacher

    docs = documents(3)
    cache = tmp_path / "hub"
    data = hub_cache_folder(cache, "dataset", "org/corpus", {"data/train-00000-of-00001.jsonl": jsonl(docs),
                                                              "data/test-00000-of-00001.jsonl": jsonl(["held out"]),
                                                              "README.md": b"# card\n"})
    with pytest.warns(DataWarning, match=r"snapshots/0123abcd' is laid out in splits"):  # blobs/, refs/ unread
        assert list(read_documents(data)) == docs
    model = hub_cache_folder(cache, "model", "org/tiny", {name: (teacher_dir / name).read_bytes() for name in
                                                          ("config.json", "model.safetensors", "tokenizer.json")})
    teacher = load_teacher({"path": str(model), "dtype": "fp32"})
    assert teacher.source.endswith("snapshots/0123abcd") and teacher.depth == 2
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherError, match=r"your Hugging Face cache holds it .* Fix: teacher.path=.*models--org--tiny"
                                           r"/snapshots/0123abcd"):
        load_teacher({"path": "org/tiny"})
    with pytest.raises(DataError, match=r"your Hugging Face cache holds it .* Fix: data.source=.*datasets--org--corpus"
                                        r"/snapshots/0123abcd"):
        list(read_documents("org/corpus"))


def test_a_text_field_inside_nested_records_is_read_as_outer_dot_inner(tmp_path):
    """``data.text_field=meta.text`` (the name `datasets`' flatten gives it) reads the text
    of nested JSON objects and of struct columns in parquet, Arrow, datasets folders and
    archives alike; a missing or null level is a record without text; a path that leads
    nowhere names what each level holds."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "meta": {"text": f"Document {i} says hello.", "url": f"u{i}"}} for i in range(4)]
    records.append({"id": 9, "meta": None})
    expected = [f"Document {i} says hello." for i in range(4)]
    table = pa.Table.from_pylist(records)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(table, tmp_path / "records.parquet")
    with pa.ipc.new_stream(str(tmp_path / "records.arrow"), table.schema) as writer:
        writer.write_table(table)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    member = io.BytesIO()
    pq.write_table(table, member)
    with tarfile.open(tmp_path / "packed.tar", "w") as tar:
        info = tarfile.TarInfo("inner.parquet")
        info.size = len(member.getvalue())
        tar.addfile(info, io.BytesIO(member.getvalue()))
    # a column literally named with a dot is itself, before any path
    (tmp_path / "dotted.jsonl").write_text(json.dumps({"meta.text": "Literal.", "meta": {"text": "Nested."}}) + "\n")
    for name in ("records.jsonl", "records.parquet", "records.arrow", "saved", "packed.tar"):
        with pytest.warns(DataWarning, match="skipped 1 of 5 records"):
            assert list(read_documents(tmp_path / name, text_field="meta.text")) == expected, name
    assert list(read_documents(tmp_path / "dotted.jsonl", text_field="meta.text")) == ["Literal."]
    for name, message in (("records.jsonl", r"no field 'meta.body' \(its fields are \['id', 'meta'\]; meta has "
                                            r"\['text', 'url'\]\)"),
                          ("records.parquet", r"no column 'meta.body' \(it has \['id', 'meta'\]; meta has "
                                              r"\['text', 'url'\]\)"),
                          ("saved", r"no column 'meta.text.x' \(it has \['id', 'meta'\]; meta has \['text', 'url'\]")):
        with pytest.raises(DataError, match=message):
            list(read_documents(tmp_path / name, text_field="meta.body" if name != "saved" else "meta.text.x"))


def test_json_laid_out_other_than_one_record_per_line(tmp_path, monkeypatch):
    """JSON as exporters write it, not only as JSON Lines: an object that holds its records in
    a list (`json.dump({"version": 2, "data": rows})`, on one line or pretty-printed),
    pretty-printed records one after another, JSON strings as the records. Each reads the
    same documents as JSON Lines; a list of {text} objects is not taken for chat turns (it
    was: "'data' holds chat turns"), and several lists of records are one error with the
    command that writes out one of them."""
    docs = documents(30)
    rows = [{"text": d, "id": i, "tags": ["a", {"b": 1}]} for i, d in enumerate(docs)]
    files = {
        "wrapped_one_line.json": json.dumps({"version": 2, "data": rows}),
        "wrapped_pretty.json": json.dumps({"version": 2, "data": rows, "count": 30}, indent=2),
        "records_pretty.json": "".join(json.dumps(r, indent=2) + "\n" for r in rows),
        "strings.jsonl": "".join(json.dumps(d) + "\n" for d in docs),
        "strings_array.json": json.dumps(docs),
        "one_line_array.json": json.dumps(rows),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in files:
        assert list(read_documents(tmp_path / name)) == docs, name
    # the same through the stream reader when the first line is too long to read whole to tell
    monkeypatch.setattr(corpus, "JSON_PEEK_BYTES", 64)
    (tmp_path / "long_lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in [*files, "long_lines.jsonl"]:
        assert list(read_documents(tmp_path / name)) == docs, name
    monkeypatch.undo()

    # records under the list that hold no text are counted, as in JSON Lines
    holes = [*rows[:10], {"id": "x"}, *rows[10:]]
    (tmp_path / "holes.json").write_text(json.dumps({"data": holes}, indent=1))
    with pytest.warns(DataWarning, match=r"holes.json: skipped 1 of 31 records that hold no text \(1 without the "
                                         r"field 'text'"):
        assert list(read_documents(tmp_path / "holes.json")) == docs
    # chat turns stay chat turns: they have a role
    (tmp_path / "chat.json").write_text(json.dumps({"messages": [{"role": "user", "text": d} for d in docs]},
                                                   indent=1))
    with pytest.raises(DataError, match=r"'messages' holds chat turns"):
        list(read_documents(tmp_path / "chat.json"))
    for indent in (None, 1):
        (tmp_path / "splits.json").write_text(json.dumps({"test": rows[:3], "train": rows}, indent=indent))
        with pytest.raises(DataError, match=r"splits.json.* holds lists of records under several keys \['test', "
                                            r"'train'\].*Fix: .*jq -c '.\"train\"\[\]' .*splits.json > train.jsonl"):
            list(read_documents(tmp_path / "splits.json"))
    # a text that is an object: its own text fields are offered
    (tmp_path / "nested.jsonl").write_text(json.dumps({"text": {"en": "Hello.", "n": 1}}) + "\n")
    with pytest.raises(DataError, match=r"'text' is dict, not text. Fix: data.text_field=text.en, its one text field"):
        list(read_documents(tmp_path / "nested.jsonl"))


def test_pretty_printed_json_is_streamed_and_never_cut_into_byte_ranges(tmp_path, monkeypatch, tokenizer_path):
    """A large JSON file that is not JSON Lines stays one unit (a byte range of it would
    start inside an object), is read a record at a time (records come before a cut-off
    end, then one error naming the record), and prepares to the tokens JSON Lines gives."""
    docs = documents(300)
    (tmp_path / "pretty.json").write_text(json.dumps({"data": [{"text": d} for d in docs]}, indent=2))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setattr(corpus, "SPLIT_FILE_BYTES", 4000)
    assert [u.is_range for u in corpus.list_units(tmp_path / "pretty.json")] == [False]
    assert len(corpus.list_units(tmp_path / "lines.jsonl")) > 5
    whole = (tmp_path / "pretty.json").read_bytes()
    (tmp_path / "cut.json").write_bytes(whole[:len(whole) // 2])
    read = []
    with pytest.raises(DataError, match=r"cut.json is not valid JSON after record (\d+) \(") as error:
        for text in read_documents(tmp_path / "cut.json"):
            read.append(text)
    assert 100 < len(read) < 300 and read == docs[:len(read)]
    assert f"after record {len(read)} " in str(error.value)
    tok = Tokenizer(tokenizer_path)
    pretty = prepare_corpus(tmp_path / "pretty.json", tok, tmp_path / "out_pretty", workers=2, **QUIET)
    lines = prepare_corpus(tmp_path / "lines.jsonl", tok, tmp_path / "out_lines", workers=2, **QUIET)
    assert pretty["documents"] == lines["documents"] == 300 and pretty["tokens"] == lines["tokens"]
    assert np.array_equal(TokenShards(tmp_path / "out_pretty", tok)[0:pretty["tokens"]],
                          TokenShards(tmp_path / "out_lines", tok)[0:lines["tokens"]])


@pytest.mark.parametrize("orient", ["records", "table", "columns", "index", "split", "values"])
def test_each_way_pandas_writes_a_table_as_json_reads_or_says_how_to_write_it(tmp_path, orient):
    """`DataFrame.to_json`'s layouts: the two that hold records are read; the others (its
    default, 'columns', among them) are one error with the line that writes JSON Lines,
    not a fix that names `text.0` or a row number as the text field."""
    import pandas as pd

    docs = documents(5)
    pd.DataFrame({"text": docs, "id": range(5)}).to_json(tmp_path / "table.json", orient=orient)
    if orient in ("records", "table"):
        assert list(read_documents(tmp_path / "table.json")) == docs
        return
    with pytest.raises(DataError, match=r"table.json.*pandas' DataFrame.to_json writes a table .*orient='?"
                                        + orient + r".*Fix: write it as JSON Lines.*orient='records', lines=True"):
        list(read_documents(tmp_path / "table.json"))


def test_csv_as_spreadsheets_write_it(tmp_path):
    """A CSV separated by ';' (a European spreadsheet's export) reads as the comma's does
    (it was a pyarrow traceback); a column named `Text` is offered as such; a file without a
    header row is said to be one; an empty file holds no rows; a header of 20,000 columns is
    read whole to find the text column."""
    import csv

    docs = [d.replace("\n", " ; , ") for d in documents(6)]
    with open(tmp_path / "semicolon.csv", "w", newline="") as f:
        csv.writer(f, delimiter=";").writerows([["id", "text"], *[[i, d] for i, d in enumerate(docs)]])
    assert list(read_documents(tmp_path / "semicolon.csv")) == docs
    with open(tmp_path / "capital.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ID", "Text"], *[[i, d] for i, d in enumerate(docs)]])
    with pytest.raises(DataError, match=r"capital.csv has no column 'text' \(it has \['ID', 'Text'\]\)\. "
                                        r"Fix: data.text_field=Text\.$"):
        list(read_documents(tmp_path / "capital.csv"))
    assert list(read_documents(tmp_path / "capital.csv", text_field="Text")) == docs
    with open(tmp_path / "headless.csv", "w", newline="") as f:
        csv.writer(f).writerows([[i, d] for i, d in enumerate(docs)])
    with pytest.raises(DataError, match=r"headless.csv has no column 'text' .*Fix: its first row looks like data, "
                                        r"not column names \('0'\): if the file has no header row, add one"):
        list(read_documents(tmp_path / "headless.csv"))
    (tmp_path / "empty.csv").write_bytes(b"")
    assert list(read_documents(tmp_path / "empty.csv")) == []
    (tmp_path / "wide.csv").write_text(",".join(f"c{i}" for i in range(20000)) + ",text\n"
                                       + "1," * 20000 + "hello there\n")
    assert list(read_documents(tmp_path / "wide.csv")) == ["hello there"]


def test_damaged_files_of_every_format_end_in_a_data_error_or_read(tmp_path):
    """Bytes flipped, cut, inserted, deleted or repeated in JSON Lines, a JSON array, a JSON
    object holding its records, CSV, text, parquet, zip, tar and zstd files, plain and
    gzipped: each either reads (texts that encode as UTF-8, for the tokenizer) or stops with
    one DataError. Before, a zip with a damaged member ended in a BadZipFile traceback ("Bad
    CRC-32 for file 'd0.txt'", "Bad magic number for file header") or an OSError (a header
    offset past the file: "[Errno 22] Invalid argument"), from the middle of a prepare."""
    import csv
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(20261206)
    texts = [f"Document {i}: " + "héllo wörld 😀 " * (1 + i % 9) for i in range(24)]

    def jsonl():
        return "".join(json.dumps({"text": t, "id": i}, ensure_ascii=i % 2 == 0) + "\n"
                       for i, t in enumerate(texts)).encode()

    def table_csv():
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(texts))
        return out.getvalue().encode()

    def parquet():
        out = io.BytesIO()
        pq.write_table(pa.table({"text": texts}), out, row_group_size=6)
        return out.getvalue()

    def zipped():
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for i, t in enumerate(texts[:4]):
                archive.writestr(f"d{i}.txt", t)
        return out.getvalue()

    makers = [(".jsonl", jsonl), (".json", lambda: json.dumps([{"text": t} for t in texts], indent=1).encode()),
              (".json", lambda: json.dumps({"version": 1, "data": [{"text": t} for t in texts]}).encode()),
              (".csv", table_csv), (".txt", lambda: "<|endoftext|>".join(texts).encode()), (".parquet", parquet),
              (".zip", zipped), (".tar", lambda: tar_bytes([(f"d{i}.jsonl", jsonl()) for i in range(3)])),
              (".jsonl.zst", lambda: zstandard.ZstdCompressor().compress(jsonl()))]

    def damaged(data: bytes) -> bytes:
        data = bytearray(data)
        how = rng.choice(["flip", "cut", "insert", "delete", "repeat"])
        for _ in range(rng.randint(1, 5)):
            if not data:
                break
            at = rng.randrange(len(data))
            if how == "flip":
                data[at] = rng.randrange(256)
            elif how == "cut":
                data = data[:at]
            elif how == "insert":
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif how == "delete":
                del data[at:at + rng.randint(1, 20)]
            else:
                data[at:at] = data[max(0, at - 30):at]
        return bytes(data)

    outcomes = {"read": 0, "DataError": 0}
    for n in range(360):
        suffix, make = makers[n % len(makers)]
        data = damaged(make())
        gzipped = n % 5 == 0 and suffix not in (".zip", ".parquet", ".jsonl.zst")
        path = tmp_path / f"case{n}{suffix}{'.gz' if gzipped else ''}"
        path.write_bytes(gzip.compress(data) if gzipped else data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read = list(read_documents(path))
        except DataError:
            outcomes["DataError"] += 1
            continue
        assert all(isinstance(text, str) and text.encode("utf-8") for text in read), path
        outcomes["read"] += 1
    assert outcomes["read"] > 50 and outcomes["DataError"] > 50, outcomes  # both kinds of ending were exercised
