"""data.sources: corpora drawn in fixed proportions, deterministic, exactly resumable, and
counted per source in the metrics."""

import numpy as np
import pytest
import torch

from letrecipes.components.data import BatchStream, MixtureDataset, PackedDataset, build_dataloader
from letrecipes.components.metrics import read_metrics


def parts(sizes=(3000, 800, 200)):
    """Datasets whose first token says which part and which sequence an item is."""
    out = []
    for p, n in enumerate(sizes):
        windows = np.repeat(np.arange(n, dtype=np.int64) + 10_000 * p, 8)
        out.append(PackedDataset(windows.astype(np.uint32), 7, "train", 0.45))
    return out


def test_proportions_follow_the_weights_in_every_stretch():
    mixture = MixtureDataset(parts(), [0.5, 0.3, 0.2], seed=1)
    drawn = np.array([mixture.locate(i)[0] for i in range(5000)])
    for s, weight in enumerate([0.5, 0.3, 0.2]):
        assert abs((drawn == s).mean() - weight) < 0.005  # exact per 1024-block, up to rounding
        assert abs((drawn[:1024] == s).mean() - weight) < 0.002


def test_shuffled_loader_keeps_the_proportions():
    mixture = MixtureDataset(parts(), [0.5, 0.3, 0.2], seed=1)
    loader = build_dataloader(mixture, 16, seed=4)
    sources = torch.cat([b["source"] for _, b in zip(range(250), loader)])  # 4000 sequences
    for s, weight in enumerate([0.5, 0.3, 0.2]):
        assert abs((sources == s).float().mean().item() - weight) < 0.03


def test_deterministic_for_a_seed_and_new_draws_every_epoch():
    a, b, c = (MixtureDataset(parts(), [0.5, 0.3, 0.2], seed=seed) for seed in (1, 1, 2))
    first = [a.locate(i) for i in range(3000)]
    assert first == [b.locate(i) for i in range(3000)] and first != [c.locate(i) for i in range(3000)]
    small = {j for s, j in (a.locate(i) for i in range(len(a))) if s == 2}  # 20% of the draws, the smallest part
    assert len(small) == len(a.parts[2])  # upsampled: every sequence of it comes up
    a.set_epoch(1)
    big_next = {j for s, j in (a.locate(i) for i in range(len(a))) if s == 0}
    a.set_epoch(0)
    big = {j for s, j in (a.locate(i) for i in range(len(a))) if s == 0}
    assert len(big) < len(a.parts[0]) and big_next - big  # downsampled: the next epoch shows others


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_stream_over_a_mixture_resumes_exactly_with_its_counts(workers):
    mixture = MixtureDataset(parts(), [0.5, 0.3, 0.2], seed=1)
    names = ["web", "code", "math"]

    def stream():
        return BatchStream(build_dataloader(mixture, 16, seed=2, num_workers=workers), torch.device("cpu"), names)

    reference = stream()
    expected = [reference.next()["tokens"] for _ in range(300)]  # past an epoch boundary (250 batches)
    first = stream()
    for _ in range(260):
        first.next()
    state, counts = first.state_dict(), first.figures()
    resumed = stream()
    resumed.load_state_dict(state)
    assert resumed.figures() == counts and sum(counts.values()) == 260 * 16 * 7
    assert all(torch.equal(resumed.next()["tokens"], want) for want in expected[260:])


def test_a_run_on_two_sources_logs_tokens_per_source(base_overrides, corpus_dir, tmp_path):
    from letrecipes import pretrain

    plays = sorted(corpus_dir.glob("*.txt"))
    overrides = [o for o in base_overrides if not o.startswith("data.source=")]
    pretrain.recipe_main(["--config", "pretrain_tiny", *overrides, "~data.source", f"output_dir={tmp_path / 'run'}",
                          f"data.sources=[{{source: {plays[0]}, weight: 3, name: first}}, "
                          f"{{source: {plays[1]}, weight: 1, name: second}}]", "max_steps=20", "log_every=20"])
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    total = last["tokens_first"] + last["tokens_second"]
    assert total == 20 * 4 * 32 and abs(last["tokens_first"] / total - 0.75) < 0.1


@pytest.mark.parametrize("sources, match", [
    ("[{{source: {a}, weight: 0}}]", "data.sources: weights [0.0] must be >= 0 with a positive sum"),
    ("[{{source: {a}, weight: 0, name: x}}, {{source: {b}, weight: 0, name: y}}]", "weights [0.0, 0.0]"),
    ("[{{source: {a}}}, {{source: {a}}}]", "repeat. Fix: give each source a distinct `name`"),
], ids=["one-source-weight-0", "all-weights-0", "same-name"])
def test_a_mixture_that_cannot_train_is_refused_before_any_corpus_is_prepared(base_overrides, corpus_dir, tmp_path,
                                                                               sources, match):
    """Before: a lone source's weight 0 was ignored, and both checks came after preparing
    every corpus (hours, at scale)."""
    from tests.test_recipes import expect_setup_error, run_pretrain

    plays = sorted(corpus_dir.glob("*.txt"))
    overrides = [o for o in base_overrides if not o.startswith(("data.source=", "data.cache_dir="))]
    cache = tmp_path / "cache"
    expect_setup_error(run_pretrain, *overrides, "~data.source",
                       f"data.cache_dir={cache}", f"output_dir={tmp_path / 'run'}",
                       f"data.sources={sources.format(a=plays[0], b=plays[1])}", match=match)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_held_out_corpus_of_its_own_is_the_validation_set_and_the_training_data_all_trains(base_overrides,
                                                                                             corpus_dir, tmp_path,
                                                                                             tokenizer_path, capsys):
    """data.val_source (C4's validation files beside its train files): evaluation reads it,
    every window of it in order; data.val_fraction is not used, so every training window trains."""
    from letrecipes import pretrain
    from letrecipes.components.data import build_datasets
    from letrecipes.components.tokenizer import Tokenizer

    plays = sorted(corpus_dir.glob("*.txt"))
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir(), val_dir.mkdir()
    for play in plays[:2]:
        (train_dir / play.name).write_text(play.read_text(encoding="utf-8"))
    (val_dir / plays[2].name).write_text(plays[2].read_text(encoding="utf-8"))
    tok = Tokenizer(tokenizer_path)
    section = {"source": str(train_dir), "seq_len": 32, "val_fraction": 0.02, "cache_dir": str(tmp_path / "cache")}
    plain_train, plain_val, _ = build_datasets(section, tok, seed=0, log=lambda _: None)
    train, val, _ = build_datasets({**section, "val_source": str(val_dir)}, tok, seed=0, log=print)
    assert "validation: data.val_source (" in capsys.readouterr().out
    assert len(train) == len(plain_train) + len(plain_val) == plain_train.windows  # all of it trains
    held_out = build_datasets({**section, "source": str(val_dir), "val_fraction": 0.0}, tok, seed=0,
                              log=lambda _: None, validation=False)[0]
    assert len(val) == held_out.windows and all(torch.equal(val[i]["tokens"], held_out[i]["tokens"])
                                                for i in (0, len(val) // 2, len(val) - 1))

    overrides = [o for o in base_overrides if not o.startswith("data.source=")]
    pretrain.recipe_main(["--config", "pretrain_tiny", *overrides, f"data.source={train_dir}",
                          f"data.val_source={val_dir}", "data.val_fraction=0", f"output_dir={tmp_path / 'run'}",
                          "max_steps=4", "eval_every=2", "eval_batches=2"])
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r] == [2, 4]


def test_a_held_out_corpus_that_is_training_data_is_refused(corpus_dir, tmp_path, tokenizer_path):
    """val_source naming training files (the same folder, one of its files, a copy elsewhere,
    or the text of a prepared training folder) used to give a val_loss of memorised text."""
    from letrecipes.components.corpus import DataError
    from letrecipes.components.data import build_datasets
    from letrecipes.components.prepare import prepare_corpus
    from letrecipes.components.tokenizer import Tokenizer

    plays = sorted(corpus_dir.glob("*.txt"))
    train_dir, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    train_dir.mkdir(), elsewhere.mkdir()
    for play in plays[:2]:
        (train_dir / play.name).write_text(play.read_text(encoding="utf-8"))
    (elsewhere / "copy.txt").write_bytes((train_dir / plays[1].name).read_bytes())
    (elsewhere / "other.txt").write_text(plays[2].read_text(encoding="utf-8"))
    tok = Tokenizer(tokenizer_path)
    section = {"source": str(train_dir), "seq_len": 32, "cache_dir": str(tmp_path / "cache")}
    cases = [(train_dir, f"{train_dir / plays[0].name} is training data too (data.source; 2 files in all)"),
             (train_dir / plays[1].name, "is training data too (data.source)"),
             (elsewhere, f"{elsewhere / 'copy.txt'} has the same bytes as {train_dir / plays[1].name} (data.source)")]
    for val_source, says in cases:
        with pytest.raises(DataError, match="so the validation loss would measure what the model memorised") as err:
            build_datasets({**section, "val_source": str(val_source)}, tok, seed=0, log=lambda _: None)
        assert says in str(err.value), err.value
    assert not (tmp_path / "cache").exists()  # refused before anything was prepared
    prepare_corpus(train_dir, tok, tmp_path / "prepared", log=lambda _: None)
    with pytest.raises(DataError, match="is training data too"):  # the prepared folder's manifest names its text
        build_datasets({**section, "source": str(tmp_path / "prepared"), "val_source": str(train_dir / plays[0].name)},
                       tok, seed=0, log=lambda _: None)
    build_datasets({**section, "val_source": str(elsewhere / "other.txt")}, tok, seed=0, log=lambda _: None)
    build_datasets({**section, "val_source": str(train_dir)}, tok, seed=0, log=lambda _: None, validation=False)


def test_held_out_documents_copied_into_the_training_data_under_other_files_are_found(corpus_dir, tmp_path,
                                                                                       tokenizer_path, capsys):
    """The file comparison above misses a held-out set that reached the training corpus
    re-sharded or converted (the plays' scenes as JSON lines and as parquet, here): its
    documents are compared by their tokens. A copy is refused; a few repeats (as a crawl
    has by chance) are a warning; other text passes, and the log says what was read. The
    training documents are those the prepare keyed, or (a folder keyed by no prepare) hashed
    from its tokens."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from letrecipes.components.corpus import DataError, DataWarning
    from letrecipes.components.data import build_datasets
    from letrecipes.components.tokenizer import Tokenizer

    plays = sorted(corpus_dir.glob("*.txt"))
    scenes = [s for play in plays for s in play.read_text(encoding="utf-8").split("\n\n") if len(s) > 400]
    train_dir, copied, fresh = tmp_path / "train", tmp_path / "copied", tmp_path / "fresh"
    for folder in (train_dir, copied, fresh):
        folder.mkdir()
    (train_dir / "scenes.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in scenes[:-40]))
    pq.write_table(pa.table({"text": scenes[-60:-40][::-1]}), copied / "part-0.parquet")  # 20 of them, reordered
    invented = [" ".join(reversed(s.split())) for s in scenes[-40:]]
    (fresh / "a.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in [*invented, *scenes[:2]]))
    tok = Tokenizer(tokenizer_path)
    section = {"source": str(train_dir), "seq_len": 32, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=r"data.val_source: 20 of its 20 documents \(of 32\+ tokens\) are in the "
                                        r"training data \(data.source; all its tokens read\) under other files"):
        build_datasets({**section, "val_source": str(copied)}, tok, seed=0, log=print)
    with pytest.warns(DataWarning, match=r"2 of its 42 documents .* are in the training data too"):
        build_datasets({**section, "val_source": str(fresh)}, tok, seed=0, log=print)
    assert ("validation: data.val_source's 42 documents (of 32+ tokens) checked against the training data (all its "
            "tokens read): 2 found") in capsys.readouterr().out
    # a mixture: each source is searched, and named
    mixture = {"sources": [{"source": str(fresh), "name": "fresh"}, {"source": str(train_dir), "name": "plays"}],
               "seq_len": 32, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=r"20 of its 20 documents .* \(data.sources\[1\].source: 20; all its tokens read\)"):
        build_datasets({**mixture, "val_source": str(copied)}, tok, seed=0, log=print)
    # a training folder prepared before document keys were kept: its tokens are hashed instead, the same finding
    for keys in (tmp_path / "cache").glob("prepared-*/*.keys.npy"):
        keys.unlink()
    with pytest.raises(DataError, match=r"20 of its 20 documents .* \(data.source; all its tokens read\)"):
        build_datasets({**section, "val_source": str(copied)}, tok, seed=0, log=print)


def test_sources_of_a_mixture_sharing_documents_are_named(corpus_dir, tmp_path, tokenizer_path, capsys):
    """A mixture of a corpus and a subset of it (FineWeb-Edu beside FineWeb) trains the shared
    text at both weights: a warning names the two sources and the share; sources with
    nothing in common pass without one, and the log gives the count either way."""
    import json
    import warnings

    from letrecipes.components.corpus import DataWarning
    from letrecipes.components.data import build_datasets
    from letrecipes.components.tokenizer import Tokenizer

    scenes = [s for play in sorted(corpus_dir.glob("*.txt")) for s in play.read_text().split("\n\n") if len(s) > 400]
    folders = {name: tmp_path / name for name in ("web", "edu", "books")}
    chosen = {"web": scenes[:-60], "edu": scenes[10:40], "books": scenes[-60:]}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "part.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in chosen[name]))
    tok = Tokenizer(tokenizer_path)

    def mixture(*names):
        return {"sources": [{"source": str(folders[n]), "name": n} for n in names], "seq_len": 32,
                "cache_dir": str(tmp_path / "cache")}

    with pytest.warns(DataWarning, match=r"data.sources: 30 documents of 'edu' are in 'web' too \(100.0% of 'edu'\'s "
                                         r"tokens\): that text trains at both sources' weights"):
        build_datasets(mixture("web", "edu"), tok, seed=0, log=print)
    assert "data: 30 documents (of 32+ tokens) of one source are in another too (2 sources)" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_datasets(mixture("web", "books"), tok, seed=0, log=print)
    assert "data: 0 documents (of 32+ tokens) of one source are in another too (2 sources)" in capsys.readouterr().out


def test_document_keys_do_not_depend_on_chunks_windows_or_position(monkeypatch):
    """Each document's key is the same whatever chunk or window boundary cuts the stream,
    and wherever the document sits; a document in another order, or cut short, is another."""
    import numpy as np

    from letrecipes.components import document_keys, held_out

    class Tokens:
        def __init__(self, array):
            self.array = array

        def __len__(self):
            return len(self.array)

        def __getitem__(self, index):
            return self.array[index]

    monkeypatch.setattr(document_keys, "MIN_TOKENS", 3)
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 500, size=int(n)), 0).astype(np.uint16) for n in rng.integers(1, 40, size=300)]
    stream = np.concatenate(docs)
    whole = np.concatenate([k for k, _ in document_keys.corpus_keys(Tokens(stream), 0)])
    for chunk in (5, 17, 64, 1000):
        monkeypatch.setattr(document_keys, "CHUNK", chunk)
        assert np.array_equal(np.concatenate([k for k, _ in document_keys.corpus_keys(Tokens(stream), 0)]), whole)
    long_enough = [d for d in docs if len(d) >= 3]
    assert len(whole) == len(long_enough) == len(set(whole.tolist()))
    base = next(i for i, d in enumerate(docs) if len(d) >= 10)
    key = whole[[i for i, d in enumerate(docs) if len(d) >= 3].index(base)]
    moved = np.concatenate([docs[base + 1], docs[base]])  # at another position in another stream
    assert document_keys.document_keys(moved, 0, True)[0][-1] == key
    reordered = docs[base].copy()
    reordered[:-1] = reordered[:-1][::-1]
    shorter = docs[base][1:]
    for other in (reordered, shorter):
        assert document_keys.document_keys(other, 0, True)[0][0] not in whole.tolist()
    # a document longer than `longest` (MAX_TOKENS: a book as one document) is left out, the next one is not
    monkeypatch.setattr(document_keys, "CHUNK", 16)
    book = np.append(rng.integers(1, 500, size=200), 0).astype(np.uint16)
    after_it = [k for k, _ in document_keys.corpus_keys(Tokens(np.concatenate([book, docs[base]])), 0, longest=50)]
    assert np.concatenate(after_it).tolist() == [key]
    monkeypatch.setattr(document_keys, "CHUNK", 1000)
    # a corpus larger than SCAN_TOKENS is read in windows: documents cut by a window's edges are left out
    monkeypatch.setattr(held_out, "SCAN_TOKENS", len(stream) // 2)
    monkeypatch.setattr(held_out, "WINDOWS", 4)
    windowed = np.concatenate([k for k, _ in document_keys.corpus_keys(Tokens(stream), 0, spans=held_out._windows(len(stream)))])
    assert 0 < len(windowed) < len(whole) and set(windowed.tolist()) <= set(whole.tolist())
