import json
from pathlib import Path

import numpy as np
import pytest
import torch

from letrecipes.components.corpus import DataError, read_documents
from letrecipes.components.data import PackedDataset, TokenShards, build_dataloader
from letrecipes.components.prepare import cached_prepare
from letrecipes.components.tokenizer import Tokenizer


def tokenize_corpus(source, tokenizer, cache_dir):
    """The prepared token stream of a small corpus, as the recipes read it."""
    shards = TokenShards(cached_prepare(source, tokenizer, cache_dir, log=lambda _: None), tokenizer)
    return shards[0:len(shards)]


def test_tokenizer_round_trips_text(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "To be, or not to be, that is the question."
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.vocab_size == 512


def test_missing_tokenizer_names_the_key(tmp_path):
    with pytest.raises(DataError, match="tokenizer.path: no tokenizer file"):
        Tokenizer(tmp_path / "nope.json")


def test_a_tokenizer_json_with_a_value_changed_at_random_loads_or_is_one_error(tokenizer_path, tmp_path):
    """tokenizer.json with one value changed (its vocabulary and merges aside, or among them):
    it loads and encodes, or is one DataError. A continuing_subword_prefix of "##" made
    tokenizers' Rust code panic (pyo3's PanicException, a BaseException that passed every
    `except Exception`), a traceback ending the run."""
    import random

    from letrecipes.components.tokenizer import Tokenizer
    from tests.damage import changed_json

    original = json.loads(Path(tokenizer_path).read_text(encoding="utf-8"))
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({**original, "model": {**original["model"], "continuing_subword_prefix": "##"}}))
    with pytest.raises(DataError, match="tokenizer.path: .*tokenizer.json' is not a tokenizer.json"):
        Tokenizer(path)
    rng, outcomes = random.Random(20261206), {"loaded": 0, "error": 0}
    settings = {**original, "model": {k: v for k, v in original["model"].items() if k not in ("vocab", "merges")}}
    for n in range(300):
        changed = changed_json(settings if n % 3 else original, rng)[0]
        if n % 3 and isinstance(changed.get("model"), dict):
            changed["model"] = {**original["model"], **changed["model"]}
        path.write_text(json.dumps(changed))
        try:
            Tokenizer(path).encode("To be, or not to be: that is the question.")
            outcomes["loaded"] += 1
        except DataError:
            outcomes["error"] += 1
    assert outcomes["loaded"] > 30 and outcomes["error"] > 30, outcomes


def test_tokenization_is_cached_and_invalidated_by_edits(corpus_dir, tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    source = tmp_path / "text.txt"
    source.write_text("hello world. " * 50)
    first = tokenize_corpus(source, tok, tmp_path / "cache")
    assert first[-1] == tok.eos_id
    assert len(list((tmp_path / "cache").glob("prepared-*"))) == 1
    again = tokenize_corpus(source, tok, tmp_path / "cache")
    np.testing.assert_array_equal(first, again)
    assert len(list((tmp_path / "cache").glob("prepared-*"))) == 1  # reused
    source.write_text("a different text entirely " * 20)
    changed = tokenize_corpus(source, tok, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("prepared-*"))) == 2
    assert len(changed) != len(first) or not np.array_equal(changed, first)


def test_jsonl_source_reads_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)) + "\n")
    assert list(read_documents(path, text_field="body")) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataError, match="has no field 'text'"):
        list(read_documents(path))


def test_missing_corpus_path_names_the_key(tmp_path):
    with pytest.raises(DataError, match="data.source: .* does not exist") as err:
        list(read_documents(tmp_path / "missing"))
    # the big configs name a prepared folder (/data/prepared/...): the command that writes it, not the demo's
    assert err.value.args[0].endswith(f"; or write token shards there: letrecipes prepare-data --config <yours> --out "
                                      f"{tmp_path / 'missing'} data.source=<the raw corpus>.")
    with pytest.raises(DataError, match=r"\(the demo corpus is made by `python -m letrecipes.demo --prepare-only`\)\.$"):
        list(read_documents(tmp_path / "outputs" / "demo" / "corpus"))


def test_packed_split_is_deterministic_disjoint_and_shifted():
    tokens = np.arange(10_000, dtype=np.uint16)
    train, val = PackedDataset(tokens, 15, "train", 0.1), PackedDataset(tokens, 15, "val", 0.1)
    assert len(train) + len(val) == 10_000 // 16 and len(val) == pytest.approx(62, abs=2)
    assert not set(train.index) & set(val.index)
    item = train[3]
    assert torch.equal(item["labels"][:-1], item["tokens"][1:])
    assert item["tokens"].dtype == torch.int64


def test_loader_is_deterministic_sharded_and_resumes_mid_epoch():
    data = PackedDataset(np.arange(20_000, dtype=np.uint16), 15, "train", 0.05)
    first = [b["tokens"] for _, b in zip(range(6), build_dataloader(data, 4, seed=1))]
    second = [b["tokens"] for _, b in zip(range(6), build_dataloader(data, 4, seed=1))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    rank0 = {int(x) for b in build_dataloader(data, 4, seed=1, rank=0, world_size=2) for x in b["tokens"][:, 0]}
    rank1 = {int(x) for b in build_dataloader(data, 4, seed=1, rank=1, world_size=2) for x in b["tokens"][:, 0]}
    assert rank0 and rank1 and not rank0 & rank1

    loader = build_dataloader(data, 4, seed=1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    resumed = build_dataloader(data, 4, seed=1)
    resumed.load_state_dict(state)
    rest = [b["tokens"] for _, b in zip(range(3), resumed)]
    assert all(torch.equal(a, b) for a, b in zip(first[3:], rest))


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="too few"):
        PackedDataset(np.arange(10, dtype=np.uint16), 32, "val", 0.1)


def test_too_small_corpus_advises_only_what_would_help():
    tokens = np.arange(2 * 33, dtype=np.uint16)  # two windows of 32 + 1
    with pytest.raises(DataError, match="too few for one validation sequence") as caught:
        PackedDataset(tokens, 32, "val", 0.1)  # one val window every 10: none among two
    assert str(caught.value).endswith("or a larger data.val_fraction.")
    assert len(PackedDataset(tokens, 32, "val", 0.4)) == 1  # the advice followed
    with pytest.raises(DataError, match="too few for one train sequence") as caught:
        PackedDataset(tokens, 80, "train", 0.4)  # window 0 is always training's: the fraction cannot help
    assert str(caught.value).endswith("use more text or a shorter data.seq_len.")
    assert len(PackedDataset(tokens, 64, "train", 0.4)) == 1


def test_epoch_sampler_matches_torchdatas_order_state_and_resume():
    """EpochSampler keeps the permutation as a tensor; order and checkpoints are torchdata's."""
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    from letrecipes.components.data import EpochSampler

    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    for n, world, shuffle, drop_last in [(97, 1, True, True), (1000, 3, True, False), (12345, 2, False, True)]:
        for rank in range(world):
            ours, theirs = (cls(Sized(n), world, rank, shuffle, 7, drop_last)
                            for cls in (EpochSampler, StatefulDistributedSampler))
            ours.set_epoch(2)
            theirs.set_epoch(2)
            assert list(ours) == list(theirs)
            it_ours, it_theirs = iter(ours), iter(theirs)
            for _ in range(5):
                next(it_ours), next(it_theirs)
            assert ours.state_dict() == theirs.state_dict()
            resumed = EpochSampler(Sized(n), world, rank, shuffle, 7, drop_last)
            resumed.set_epoch(2)
            resumed.load_state_dict(theirs.state_dict())
            assert list(resumed) == list(it_theirs)


def test_a_corpus_too_large_for_a_permutation_table_is_shuffled_without_one(monkeypatch):
    """Above PERMUTATION_TABLE_MAX sequences the epoch's order is computed index by index
    (here from 0, in chunks of 16): every rank's share is disjoint, together they are the
    epoch, the order is the seed's and the epoch's, and a resume mid-chunk goes on exactly."""
    from letrecipes.components import data
    from letrecipes.components.data import EpochSampler, IndexPermutation

    monkeypatch.setattr(data, "PERMUTATION_TABLE_MAX", 0)
    monkeypatch.setattr(data, "PERMUTATION_CHUNK", 16)
    for n in (1, 2, 3, 17, 64, 1000, 4097):
        assert sorted(IndexPermutation(n, seed=5).take(np.arange(n)).tolist()) == list(range(n))

    class Sized:
        def __len__(self):
            return 1001

    def sampler(rank, seed=7, epoch=0):
        made = EpochSampler(Sized(), num_replicas=3, rank=rank, shuffle=True, seed=seed, drop_last=True)
        made.set_epoch(epoch)
        return made

    shares = [list(sampler(rank)) for rank in range(3)]
    assert all(len(share) == 333 for share in shares)
    everything = [i for share in shares for i in share]
    assert len(set(everything)) == 999 and all(0 <= i < 1001 for i in everything)
    assert shares[0] == list(sampler(0)) and shares[0] != list(sampler(0, epoch=1))
    assert list(sampler(0, seed=8)) == list(sampler(0, epoch=1))  # seeded by seed + epoch, as torchdata's
    assert shares[0] != sorted(shares[0])  # shuffled
    first = sampler(1)
    read = iter(first)
    head = [next(read) for _ in range(37)]
    resumed = sampler(1)
    resumed.load_state_dict(first.state_dict())
    assert head + list(resumed) == shares[1]


def test_loader_workers_outlive_a_sigterm_meant_for_the_job_and_still_stop_with_their_trainer(tmp_path):
    """Slurm's SIGTERM reaches every process of the job: a loader worker that died of it made
    torch raise "DataLoader worker is killed by signal" in the trainer while it saved the
    checkpoint for that signal. Workers now take SIGTERM from their trainer only (which is
    how the loader stops them), so a trainer that crashes still exits, without waiting on them."""
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, torch\n"
        "from letrecipes.components.data import build_dataloader\n"
        "loader = build_dataloader(torch.utils.data.TensorDataset(torch.arange(400)), 4, seed=0, num_workers=2)\n"
        "batches = iter(loader)\n"
        "first = next(batches)\n"
        "print(*[w.pid for w in batches._workers], flush=True)\n"
        "sys.stdin.readline()  # the job's SIGTERM is sent meanwhile\n"
        "print(1 + sum(1 for _ in batches), flush=True)\n"
        "raise RuntimeError('a bug, with the workers alive')\n")
    trainer = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                                                        "OMP_NUM_THREADS": "1"})
    try:
        workers = trainer.stdout.readline().split()
        assert len(workers) == 2
        subprocess.run(["kill", "-TERM", *workers], check=True)  # sent by another process, as a scheduler's is
        subprocess.run(["kill", "-USR1", *workers], check=True)  # Slurm's --signal=USR1 notice: the trainer's to act on
        out, err = trainer.communicate("go\n", timeout=60)  # a worker deaf to the trainer's SIGTERM would hang here
    finally:
        trainer.kill()
    assert out.split() == ["100"], err[-2000:]  # every batch came, from workers that outlived the signal
    assert trainer.returncode == 1 and "a bug, with the workers alive" in err and "killed by signal" not in err


def test_a_run_resumes_exactly_with_another_number_of_loader_workers(base_overrides, tmp_path):
    """torchdata's loader state is shaped by its worker count (a 0-worker state does not load
    into 2 workers: AssertionError), so changing data.num_workers was refused as "another run".
    The position is kept apart from it (batches taken this epoch): the same batches follow."""
    from letrecipes import pretrain
    from letrecipes.components.metrics import read_metrics

    def run(out, *extra):
        pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / out}",
                              "eval_every=0", *extra])
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / out / "metrics.jsonl") if "loss" in r]

    straight = run("straight", "max_steps=6")
    run("more", "max_steps=3", "save_every=3", "data.num_workers=0")
    assert run("more", "max_steps=6", "save_every=3", "data.num_workers=2", "resume=true") == straight
    run("fewer", "max_steps=3", "save_every=3", "data.num_workers=2")
    assert run("fewer", "max_steps=6", "save_every=3", "data.num_workers=0", "resume=true") == straight


def test_an_older_loader_state_names_the_worker_count_it_needs():
    from letrecipes.components.data import BatchStream

    dataset = torch.utils.data.TensorDataset(torch.arange(64))
    older = {"epoch": 0, "source_tokens": [], "loader": {"_snapshot": {"_worker_snapshots": {"worker_0": {},
                                                                                              "worker_1": {}}}}}
    stream = BatchStream(build_dataloader(dataset, 4, seed=0), torch.device("cpu"))
    with pytest.raises(DataError, match=r"saved by a loader with data.num_workers=2, .* Fix: resume with "
                                        r"data.num_workers=2"):
        stream.load_state_dict(older)


def test_a_run_says_how_many_epochs_it_reads_and_where_the_data_first_repeats(base_overrides, tmp_path, capsys):
    """A max_steps past the training set repeated it without a word; pretraining users decide
    about repeated data, so the start-up line states the epochs and the log the first repeat."""
    import re

    from letrecipes import pretrain
    from letrecipes.components.metrics import read_metrics

    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / 'probe'}",
                          "eval_every=0", "max_steps=1"])
    sequences = int(re.search(r"(\d+) training sequences of 32 tokens; 1 steps read 4 of them",
                              capsys.readouterr().out)[1])
    batch_size = -(-sequences // 3)  # two or three steps an epoch (the loader drops a last, partial batch)
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                          "eval_every=0", "max_steps=5", f"batch_size={batch_size}"])
    out = capsys.readouterr().out
    assert f"5 steps read {5 * batch_size} of them ({5 * batch_size / sequences:.2f} epochs)" in out
    per_epoch = sequences // batch_size
    assert f"step {per_epoch + 1}: all {sequences} training sequences are read; epoch 2 begins" in out
    assert out.count("epoch 2 begins") == 1
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert epochs == pytest.approx([s / per_epoch if s <= per_epoch else 1 + (s - per_epoch) / per_epoch
                                    for s in range(1, 6)], abs=1e-4)


def test_a_run_resumes_with_another_batch_size_on_the_sequences_not_yet_read(base_overrides, tmp_path, capsys):
    """batch_size and gradient_accumulation_steps were refused on resume ("a different run"):
    now the data goes on after the sequences read (4 x 2 -> 8 x 1 reads the same ones per step:
    a straight run's losses), and a step of another size is stated."""
    from letrecipes import pretrain
    from letrecipes.components.data import BatchStream
    from letrecipes.components.metrics import read_metrics

    def run(out, *extra):
        pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / out}",
                              "eval_every=0", "save_every=3", *extra])
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / out / "metrics.jsonl") if "loss" in r]

    straight = run("straight", "max_steps=6", "batch_size=8")
    run("resumed", "max_steps=3", "batch_size=4", "gradient_accumulation_steps=2")
    capsys.readouterr()
    resumed = run("resumed", "max_steps=6", "batch_size=8", "resume=true")
    assert [s for s, _ in resumed] == [s for s, _ in straight]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], rel=1e-5, abs=0)
    assert "tokens per step 256 -> 256" in capsys.readouterr().out
    run("bigger", "max_steps=3", "batch_size=4")
    capsys.readouterr()
    run("bigger", "max_steps=4", "batch_size=8", "resume=true")
    assert ("resume: the data goes on after the 12 sequences of epoch 1 read before (each once); tokens per step 128 "
            "-> 256 (keep them with batch_size x gradient_accumulation_steps x processes") in capsys.readouterr().out
    # a checkpoint from before the batch size was kept: another number of processes is named
    stream = BatchStream(build_dataloader(torch.utils.data.TensorDataset(torch.arange(64)), 4, seed=0),
                         torch.device("cpu"))
    older = {"epoch": 0, "source_tokens": [], "batches_taken": 3, "num_workers": 0, "loader": {}}
    with pytest.raises(DataError, match=r"saved by 2 process\(es\) in a form that only that number can read\. Fix: "
                                        r"resume with 2 processes"):
        stream.load_resharded([older, older])
