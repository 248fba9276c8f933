"""Training data: fixed-length sequences packed from a prepared corpus, the distributed,
resumable loader, and the stream of batches a recipe draws from.

A corpus reaches training in two steps: ``components/prepare.py`` turns it into token
shards once (explicitly with ``letrecipes prepare-data``, or into ``data.cache_dir`` on
the first run), and :class:`TokenShards` reads them in place, so a process's memory
does not grow with the corpus.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from letrecipes.components.checkpointing import file_digest
from letrecipes.components.corpus import DOCUMENT_SEPARATOR, DataError, DataWarning, source_files
from letrecipes.components.document_keys import MIN_TOKENS, count_repeats, stored_keys
from letrecipes.components.files import real_paths
from letrecipes.components.held_out import check_documents
from letrecipes.components.parallel import on_rank0
from letrecipes.components.preemption import NOTICE_SIGNALS
from letrecipes.components.prepare import REPEAT_LIMIT, cached_prepare, is_prepared, read_manifest
from letrecipes.components.tokenizer import Tokenizer


# Shard files a process keeps open at once (each dataloader worker as many): well under the
# usual soft limit of 1,024 descriptors, with room for the rest of the process.
MAX_OPEN_SHARDS = 128


class TokenShards:
    """A prepared folder's shards as one read-only token array: ``len()`` and slices.

    Slices are read with ``os.pread`` into fresh arrays, not through a memory map: mapped
    pages count in the process's resident memory and accumulate as an epoch reads the
    corpus (measured: 80 random sequences of a 400 MB shard folder mapped 134 MB, the
    kernel's read-around), while a read leaves nothing behind but the OS page cache, which
    the kernel reclaims. File handles are opened per process on first use (never pickled
    into dataloader workers), at most ``MAX_OPEN_SHARDS`` at a time, the least recently read
    closed first: a 1 T-token corpus has some 100,000 shards, and a shuffled epoch touches
    them all (``ulimit -n`` is often 1,024).
    """

    def __init__(self, folder: Union[str, Path], tokenizer: Optional[Tokenizer] = None, key: str = "data.source"):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, tokenizer, key)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.key = key
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        sizes = [s["tokens"] for s in self.manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._fds: Dict[int, int] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))  # dicts keep insertion order: the least recent
            fd = os.open(self.files[shard], os.O_RDONLY)
        self._fds[shard] = fd  # (re)inserted last: the most recently read
        return fd

    def _read(self, shard: int, start: int, stop: int) -> np.ndarray:
        size = self.dtype.itemsize
        data = os.pread(self._fd(shard), (stop - start) * size, start * size)
        if len(data) != (stop - start) * size:
            raise DataError(f"data.source: {self.files[shard]} is shorter than its manifest says (it changed after "
                            "the run started). Fix: rerun the prepare command that made it.")
        tokens = np.frombuffer(data, dtype=self.dtype)
        if tokens.size and tokens.max() >= self.vocab_size:  # one max per read: cheap next to the model
            raise DataError(f"{self.key}: {self.files[shard]} holds token ids >= the vocabulary size "
                            f"{self.vocab_size} (its bytes changed after it was prepared). Fix: rerun the prepare "
                            "command that made it, or delete the folder if it is a cache.")
        return tokens

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards supports contiguous slices only")
        pieces = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[i + 1])
            if end > start:
                pieces.append(self._read(i, start - self.starts[i], end - self.starts[i]))
            start, i = end, i + 1
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class PackedDataset(Dataset):
    """Fixed-length training sequences cut from one token stream.

    Item ``i`` is ``{"tokens": x, "labels": y}`` with ``y`` = ``x`` shifted by one. The stream
    is cut into windows of ``seq_len + 1`` tokens; every ``round(1 / val_fraction)``-th window
    (offset by half that) is validation, so the held-out set is spread over the whole corpus
    and the same for a given corpus. ``val_fraction=0``: every window is training. Window ids
    are computed, not stored: memory does not grow with the corpus.
    """

    def __init__(self, tokens, seq_len: int, split: str = "train", val_fraction: float = 0.02, key: str = "data"):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        what = {"train": "train sequence", "val": "validation sequence", "all": "sequence"}[split]
        if split == "all":  # a corpus held out as a whole (data.val_source): every window, in order
            split, val_fraction = "train", 0.0
        if not 0.0 <= val_fraction < 0.5:
            raise DataError(f"data.val_fraction={val_fraction}: must lie in [0, 0.5).")
        if split == "val" and val_fraction == 0:
            raise DataError("data.val_fraction=0: there is no validation split. Fix: a val_fraction above 0.")
        self.tokens = tokens
        self.seq_len = seq_len
        self.split = split
        self.windows = len(tokens) // (seq_len + 1)
        # val_fraction 0: a period longer than the corpus, offset past its end (no window is validation)
        self.every = max(2, round(1 / val_fraction)) if val_fraction else 2 * self.windows + 2
        offset = self.every // 2
        val_windows = 0 if self.windows <= offset else (self.windows - 1 - offset) // self.every + 1
        self.length = val_windows if split == "val" else self.windows - val_windows
        if self.length == 0:
            # window 0 is always training's, so only the validation split can be short of windows
            # that a larger val_fraction would give it; training needs one whole window
            fix = "use more text, a shorter data.seq_len or a larger data.val_fraction" if split == "val" \
                else "use more text or a shorter data.seq_len"
            raise DataError(
                f"{key}: the corpus has {len(tokens)} tokens, too few for one {what} of {seq_len + 1}. Fix: {fix}."
            )

    def window(self, i: int) -> int:
        """The corpus window that item ``i`` of this split is."""
        offset = self.every // 2
        if self.split == "val":
            return offset + i * self.every
        block, r = divmod(i, self.every - 1)
        return block * self.every + r + (r >= offset)

    @property
    def index(self) -> np.ndarray:
        """Every item's window id (for inspection; items are computed without it)."""
        return np.fromiter((self.window(i) for i in range(self.length)), dtype=np.int64, count=self.length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        start = self.window(int(i)) * (self.seq_len + 1)
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"tokens": chunk[:-1], "labels": chunk[1:]}


class MixtureDataset(Dataset):
    """Several datasets drawn in fixed proportions: ``data.sources`` with weights.

    Positions are dealt in blocks of ``block`` (1024): each block holds every source's share
    (largest remainder of ``weight * block``), in an order shuffled by ``(seed, block)``. The
    ``k``-th draw of source ``s`` is its sequence ``(a_s * k + c_s) mod len(s)`` (``a_s``
    coprime to ``len(s)``: a permutation that spreads the draws over the whole source, with
    no table). Draws continue across epochs (:meth:`set_epoch`), so a downsampled source
    shows new sequences every epoch and an upsampled one repeats. Everything is a function
    of ``(seed, epoch, position)``: deterministic and exactly resumable. Items carry
    ``source``, the source's index, so the loader can count tokens per source.
    """

    def __init__(self, parts, weights, seed: int = 0, block: int = 1024):
        if len(parts) != len(weights) or not parts:
            raise ValueError("one weight per dataset")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise DataError(f"data.sources: weights {list(weights)} must be >= 0 with a positive sum.")
        self.parts, self.seed, self.block, self.epoch = list(parts), int(seed), int(block), 0
        exact = [block * w / total for w in weights]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: block - sum(counts)]:
            counts[i] += 1
        self.counts = counts
        self.pattern = np.repeat(np.arange(len(parts)), counts)
        self.length = sum(len(p) for p in parts)
        rng = np.random.default_rng([self.seed, 7])
        self.stride = [self._coprime(len(p), int(rng.integers(1, 1 << 30))) for p in parts]
        self.shift = [int(rng.integers(0, len(p))) for p in parts]
        self._cache: Dict[int, tuple] = {}

    @staticmethod
    def _coprime(n: int, start: int) -> int:
        a = start % n or 1
        while np.gcd(a, n) != 1:
            a = a % n + 1
        return a

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _block(self, b: int):
        if b not in self._cache:
            order = np.random.default_rng([self.seed, b]).permutation(self.pattern)
            rank = np.zeros(self.block, dtype=np.int64)  # how many earlier positions of the block share the source
            for s in range(len(self.parts)):
                where = order == s
                rank[where] = np.arange(int(where.sum()))
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[b] = (order, rank)
        return self._cache[b]

    def locate(self, position: int):
        """(source, sequence of that source) that mixture ``position`` is, in this epoch."""
        b, r = divmod(self.epoch * self.length + int(position), self.block)
        order, rank = self._block(b)
        s = int(order[r])
        k = b * self.counts[s] + int(rank[r])
        return s, (self.stride[s] * k + self.shift[s]) % len(self.parts[s])

    def __getitem__(self, position: int):
        s, i = self.locate(position)
        return {**self.parts[s][i], "source": torch.tensor(s)}


# Above this many sequences (69 B tokens at seq_len 2048) an epoch's order is computed index
# by index (IndexPermutation) instead of held as a table of 8 bytes per sequence per rank.
PERMUTATION_TABLE_MAX = 1 << 25
PERMUTATION_CHUNK = 1 << 16  # indices computed at a time


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective mixing of 64-bit words (numpy wraps the products)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class IndexPermutation:
    """A pseudo-random permutation of ``range(n)`` that maps positions to indices without a
    table: a 4-round Feistel network over the smallest even-bit domain holding ``n`` (a
    bijection there whatever its round function), with indices past ``n`` walked through it
    again until they land in range (a bijection of ``range(n)``; fewer than 4 passes on
    average, as the domain is under ``4 n``). Memory is constant in ``n``."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half, self.mask = n, np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(k) for k in np.random.default_rng([seed, 0x5EED]).integers(0, 2**63, self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The indices at ``positions`` (each in ``range(n)``) of the permuted order."""
        x = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(x >= self.n)
        while outside.size:
            x[outside] = self._feistel(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)


class EpochSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` (same order: a permutation seeded by
    ``seed + epoch``, rank ``r`` of ``w`` taking every ``w``-th), holding the permutation as
    one int64 tensor instead of Python lists: 8 bytes per sequence instead of about 50
    (measured: 37 MB for 760k sequences), and nothing copied per rank. Above
    ``PERMUTATION_TABLE_MAX`` sequences the order is an :class:`IndexPermutation` seeded by
    ``seed + epoch`` instead, computed as it is read: a 1 T-token corpus would otherwise
    hold 3.9 GB of table in every rank (benchmarks/sampler_memory.py).

    ``epoch_start`` is the position in the epoch's order where the ranks begin: 0, but for
    the epoch a run resumed in on another number of processes or another batch size, which
    begins after the sequences read before (rank ``r`` then takes positions
    ``epoch_start + r``, ``+ w``, ... and every rank as many)."""

    epoch_start = 0

    def _positions(self) -> range:
        """This rank's positions in the epoch's order."""
        each = (self.total_size - self.epoch_start) // self.num_replicas
        first = self.epoch_start + self.rank
        return range(first, first + each * self.num_replicas, self.num_replicas)

    def __len__(self) -> int:
        return len(self._positions())

    def __iter__(self):
        start = self.next_yielded if self.next_yielded is not None else 0
        self.next_yielded = None
        positions = self._positions()
        if self.shuffle and self.drop_last and len(self.dataset) > PERMUTATION_TABLE_MAX:
            yield from self._computed_order(positions, start)
            return
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator)
        else:
            order = torch.arange(len(self.dataset))
        if self.drop_last:
            order = order[: self.total_size]
        else:  # repeat the head to divide evenly, as the parent does
            order = torch.cat([order, order.repeat(-(-self.total_size // len(order)))])[: self.total_size]
        mine = order[positions.start : positions.stop : positions.step].numpy()
        self.yielded = start
        for i in range(start, len(mine)):
            self.yielded += 1
            yield int(mine[i])

    def _computed_order(self, positions: range, start: int):
        permutation = IndexPermutation(len(self.dataset), self.seed + self.epoch)
        self.yielded = start
        for first in range(start, len(positions), PERMUTATION_CHUNK):
            mine = np.asarray(positions[first:first + PERMUTATION_CHUNK], dtype=np.int64)
            for index in permutation.take(mine):
                self.yielded += 1
                yield int(index)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
    what: str = "the training split",
) -> StatefulDataLoader:
    if len(dataset) < batch_size * world_size:
        fix = "use more text, a shorter data.seq_len or a lower batch_size" if what == "the training split" else (
            "a larger data.val_fraction, a held-out corpus in data.val_source, or eval_every=0 (no validation)")
        raise DataError(
            f"data: {what} holds {len(dataset)} sequence(s), too few for one batch of {batch_size} on each of "
            f"{world_size} process(es). Fix: {fix}."
        )
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
    return StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers, collate_fn=collate_fn,
        worker_init_fn=_leave_signals_to_the_trainer if num_workers else None
    )


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A scheduler's SIGTERM (Slurm sends it to every process of the job) or a terminal's
    Ctrl-C reaches the loader's workers too; a worker that died of it made torch raise
    "DataLoader worker is killed by signal" in the trainer, in the middle of the checkpoint
    it was saving for that very signal. So a worker ignores Ctrl-C, and takes SIGTERM only
    from its trainer: the loader stops its workers with SIGTERM (``terminate``), and a
    worker deaf to that would hang the trainer's exit. The sender is known from
    ``sigwaitinfo`` (a thread waits on SIGTERM, blocked everywhere else). A worker whose
    trainer has died exits by itself (torch's watchdog)."""
    for notice in (signal.SIGINT, *NOTICE_SIGNALS):  # Slurm's --signal=USR1 reaches every process as well
        signal.signal(notice, signal.SIG_IGN)
    _start_the_batch_passing_thread()
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm_from_the_trainer_only() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
                os._exit(0)

    try:
        threading.Thread(target=take_sigterm_from_the_trainer_only, daemon=True).start()
    except RuntimeError:  # at the limit on threads: with SIGTERM blocked and no thread to take it, the
        # worker was deaf to its trainer's terminate(), and the trainer's exit waited on it for good
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        raise


def _start_the_batch_passing_thread() -> None:
    """Start now the thread through which a worker hands its batches' tensors to the trainer
    (multiprocessing's resource sharer, which torch's file-descriptor sharing uses), not at
    the first batch. Started there at the limit on threads (components/tasks.py), it failed
    after its socket was open, and the trainer, connecting to take the batch, waited for an
    answer for good: a run that hung without a word. Failing here, the worker's error
    reaches the trainer as the first batch (torch passes on its init function's error)."""
    from multiprocessing import resource_sharer

    sharer = getattr(resource_sharer, "_resource_sharer", None)  # CPython's, since 3.4
    if sharer is None or getattr(sharer, "_address", True) is not None or not hasattr(sharer, "_start"):
        return
    with sharer._lock:
        if sharer._address is None:
            sharer._start()


def source_names(specs: Sequence[Mapping[str, Any]]) -> List[str]:
    """Each ``data.sources`` entry's name: its ``name``, else its path's last part (logs,
    ``tokens_<name>`` metrics, and the folder ``letrecipes prepare-data`` writes it to)."""
    return [str(spec.get("name") or Path(str(spec["source"])).name or f"source{i}") for i, spec in enumerate(specs)]


def source_key(i: int, mixture: bool) -> str:
    """The config key an error names for the i-th source: ``data.sources[i].source`` or ``data.source``."""
    return f"data.sources[{i}].source" if mixture else "data.source"


def build_datasets(data_cfg: Mapping[str, Any], tokenizer: Tokenizer, seed: int, local_rank: int = 0,
                   log: Callable[[str], None] = print,
                   validation: bool = True) -> Tuple[Dataset, Optional[Dataset], List[str]]:
    """(train set, validation set, source names) from a ``data`` config section. The
    validation set is None without ``validation`` (a run that never evaluates: too small a
    split is then no error) or when ``data.val_fraction`` is 0. ``data.val_source`` names a
    held-out corpus of its own: it is the validation set, whole, and the training data
    is all training.

    ``data.source`` is one corpus; ``data.sources`` a list of ``{source, weight, name,
    text_field}`` drawn as a :class:`MixtureDataset` (validation mixed the same way). Each
    corpus is a prepared folder, or is prepared into ``data.cache_dir`` first.
    """
    specs = data_cfg.get("sources") or [{"source": data_cfg.get("source"), "weight": 1.0}]
    seq_len, val_fraction = int(data_cfg["seq_len"]), float(data_cfg.get("val_fraction", 0.02))
    # checked before any corpus is prepared (hours, at scale)
    names = source_names(specs)
    weights = [float(spec.get("weight", 1.0)) for spec in specs]
    if len(specs) > 1 and len(set(names)) != len(names):
        raise DataError(f"data.sources: names {names} repeat. Fix: give each source a distinct `name`.")
    if sum(weights) <= 0 or any(w < 0 for w in weights):
        raise DataError(f"data.sources: weights {weights} must be >= 0 with a positive sum. Fix: give the sources "
                        "to train on a positive weight.")
    val_source = data_cfg.get("val_source")
    if val_source:  # a held-out corpus of its own (C4's validation files): every window of the training data trains
        val_fraction = 0.0
    if validation and val_source:
        _check_held_out(val_source, specs, data_cfg)

    def prepared(source, key: str, text_field: Optional[str], drop_copies: bool = False) -> TokenShards:
        folder = cached_prepare(source, tokenizer, data_cfg.get("cache_dir", "outputs/cache"),
                                text_field=text_field or data_cfg.get("text_field", "text"),
                                rank=local_rank, workers=int(data_cfg.get("prepare_workers", 1)),
                                timeout_s=float(data_cfg.get("prepare_timeout_s", 3600)), key=key, log=log,
                                document_separator=data_cfg.get("document_separator", DOCUMENT_SEPARATOR),
                                drop_copies=drop_copies)
        return TokenShards(folder, tokenizer, key=key)

    train, val = [], []
    for i, spec in enumerate(specs):
        key = source_key(i, bool(data_cfg.get("sources")))
        tokens = prepared(spec["source"], key, spec.get("text_field"), bool(data_cfg.get("drop_copies", False)))
        train.append(PackedDataset(tokens, seq_len, "train", val_fraction))
        if validation and val_fraction:
            val.append(PackedDataset(tokens, seq_len, "val", val_fraction))
    held_out = None
    if validation and val_source:
        held_tokens = prepared(val_source, "data.val_source", None)
        # rank 0 reads up to SCAN_TOKENS of the training data for every rank (not each of
        # hundreds of ranks from one shared filesystem); a refusal reaches them all
        on_rank0(lambda: check_documents(held_tokens, [(source_key(i, bool(data_cfg.get("sources"))), part.tokens)
                                                       for i, part in enumerate(train)], tokenizer.eos_id, log))
        held_out = PackedDataset(held_tokens, seq_len, "all", key="data.val_source")
        log(f"validation: data.val_source ({len(held_out):,} sequences of {seq_len}); every sequence of the training "
            "data trains (data.val_fraction is not used)")
    if len(specs) == 1:
        return train[0], held_out or (val[0] if val else None), []
    on_rank0(lambda: warn_about_shared_documents([part.tokens for part in train], names, log))
    mixed_val = MixtureDataset(val, weights, seed=0) if val else None
    return MixtureDataset(train, weights, seed=seed), held_out or mixed_val, names


def warn_about_shared_documents(corpora: Sequence["TokenShards"], names: Sequence[str],
                                 log: Callable[[str], None]) -> None:
    """Warn when two sources of a mixture share documents (FineWeb-Edu beside FineWeb, a
    corpus listed twice under two paths): that text trains at both weights. Each corpus's
    own copies are its prepare's warning; this counts the copies across them, by the keys
    their prepares stored (a corpus prepared by an earlier letrecipes has none: not counted)."""
    arrays, groups = [], []
    for i, corpus in enumerate(corpora):
        stored = stored_keys(corpus.folder, corpus.manifest["shards"])
        if stored is None:
            log(f"data: documents shared between the sources not counted: {names[i]} ({corpus.folder}) has no document "
                "keys (prepared by an earlier letrecipes: its `letrecipes prepare-data` command run again adds them; a "
                "folder in data.cache_dir gets them when deleted and prepared again)")
            return
        arrays += stored
        groups += [i] * len(stored)
    shared = [(a, b, n, t) for a, b, n, t in count_repeats(arrays, groups, top=len(corpora) ** 2)["shared"] if a != b]
    log(f"data: {sum(n for _, _, n, _ in shared):,} documents (of {MIN_TOKENS}+ tokens) of one source are in another "
        f"too ({len(corpora)} sources)")
    for a, b, n, t in shared:
        if t > REPEAT_LIMIT * len(corpora[b]):
            warnings.warn(DataWarning(
                f"data.sources: {n:,} documents of {names[b]!r} are in {names[a]!r} too ({t / len(corpora[b]):.1%} of "
                f"{names[b]!r}'s tokens): that text trains at both sources' weights. Fix: none, if it is meant; "
                f"otherwise remove them from one of the two (or drop one source)."), stacklevel=3)


def _corpus_files(source, key: str) -> List[str]:
    """The files a source reads, as real paths; a prepared folder's from its manifest."""
    if isinstance(source, (str, os.PathLike)) and is_prepared(Path(source).expanduser()):
        named = read_manifest(Path(source).expanduser(), key=key).get("sources") or []
    else:
        named = source_files(source, key)
    return [real for real, _ in real_paths(named)]


def _file_digest(path: str, seen: Dict[str, str]) -> str:
    """A file's digest (the checkpoints' hash), each file read once however many it is compared with."""
    if path not in seen:
        seen[path] = file_digest(Path(path))
    return seen[path]


def _check_held_out(val_source, specs: Sequence[Mapping[str, Any]], data_cfg: Mapping[str, Any]) -> None:
    """A held-out corpus that is (partly) training data would make val_loss measure memory,
    not generalisation, and nothing in the figures would show it. The same file, or a copy
    of it (same size, then same bytes: only files of equal size are read)."""
    def sizes(files: List[str]) -> Dict[int, List[str]]:
        by_size: Dict[int, List[str]] = {}
        for f in files:
            if os.path.isfile(f):  # a prepared folder's text may be on another machine
                by_size.setdefault(os.path.getsize(f), []).append(f)
        return by_size

    held_out, digests = sizes(_corpus_files(val_source, "data.val_source")), {}
    for i, spec in enumerate(specs):
        key = source_key(i, bool(data_cfg.get("sources")))
        common = [(v, f) for size, files in sizes(_corpus_files(spec["source"], key)).items() if size in held_out
                  for f in files for v in held_out[size]
                  if f == v or _file_digest(f, digests) == _file_digest(v, digests)]
        if common:
            val, train = common[0]
            also = "is training data too" if val == train else f"has the same bytes as {train}"
            raise DataError(
                f"data.val_source: {val} {also} ({key}"
                + (f"; {len(common)} files in all" if len(common) > 1 else "") + "), so the validation loss would "
                "measure what the model memorised. Fix: keep the held-out files out of the training source (another "
                "folder, or a glob that leaves them out), or drop data.val_source and hold out windows of the same "
                "corpus with data.val_fraction.")


SHARED_MEMORY = "/dev/shm"


def shared_memory_exhausted(err: BaseException, num_workers: int, folder: str = SHARED_MEMORY) -> Optional[str]:
    """What to say when the loader's worker processes could not pass a batch through shared
    memory (a container's /dev/shm is 64 MB unless --shm-size says more, and the files of
    killed runs stay in it): torch's "unable to allocate shared memory(shm) ... No space
    left on device" in a worker, or a worker killed by SIGBUS, was a traceback mid-run.
    None for any other error."""
    if num_workers < 1 or "shared memory" not in str(err):
        return None
    import shutil

    try:
        usage = shutil.disk_usage(folder)
        state = f"{usage.free / 2**20:,.1f} MB free of {usage.total / 2**20:,.1f} MB"
    except OSError:
        state = "its size unknown"
    return (f"data.num_workers={num_workers}: the data loader's worker processes pass each batch through shared "
            f"memory ({folder}: {state}), and it ran out (a container's is 64 MB unless docker run --shm-size says "
            "more; files of runs that were killed stay in it).")


def corpus_fingerprint(dataset) -> str:
    """The training tokens in brief: each prepared corpus's token and document counts,
    shard by shard. A corpus edited, grown or shrunk since (then prepared again) changes
    it; the same corpus copied to another machine or path does not (no paths, no times)."""
    digest = hashlib.sha256()
    for part in _parts(dataset):
        manifest = part.tokens.manifest
        digest.update(json.dumps([manifest["dtype"], [[s["tokens"], s["documents"]] for s in manifest["shards"]]])
                      .encode())
    return digest.hexdigest()[:16]


def training_folders(dataset) -> List[str]:
    """The prepared folders a training set reads, as absolute paths (a mixture's in its order)."""
    return [str(part.tokens.folder.resolve()) for part in _parts(dataset)]


def _parts(dataset) -> List["PackedDataset"]:
    return dataset.parts if isinstance(dataset, MixtureDataset) else [dataset]


def _workers_of(loader_state: Mapping[str, Any]) -> int:
    """How many workers wrote a torchdata loader state (its per-worker snapshots; none for 0)."""
    return len((loader_state.get("_snapshot") or {}).get("_worker_snapshots") or {})


def _read_by(state: Mapping[str, Any], world: int) -> int:
    """The sequences of its epoch that ``world`` ranks had read at a saved ``BatchStream`` state."""
    return int(state.get("epoch_start", 0)) + world * int(state["batches_taken"]) * int(state["batch_size"])


class BatchStream:
    """Endless batches from a loader, epoch after epoch, moved to ``device``.

    A ``Stateful`` (``state_dict``/``load_state_dict``): the epoch, the loader's position
    within it and, for a mixture, the tokens each source has given (``figures()``, logged
    as ``tokens_<name>``), so a resumed run continues with exactly the next batch.
    """

    def __init__(self, loader: StatefulDataLoader, device: torch.device, source_names=()):
        self.loader = loader
        self.device = device
        self.epoch = 0
        self.batches_taken = 0  # this epoch: the position in a form that holds for any number of workers
        self.source_names = list(source_names)
        self.source_tokens = [0] * len(self.source_names)
        self._iter = None

    @property
    def epochs_read(self) -> float:
        """Passes over the training set so far (1.5: the second pass is half read)."""
        sampler, batch = self.loader.sampler, self.loader.sampler.num_replicas * self.loader.batch_size
        readable = sampler.epoch_start + (sampler.total_size - sampler.epoch_start) // batch * batch  # whole batches
        return self.epoch + self.sequences_read() / max(1, readable)

    def sequences_read(self) -> int:
        """Sequences of this epoch's order that all ranks together have read: each rank takes
        whole batches, as many as the others, from positions interleaved with theirs."""
        sampler = self.loader.sampler
        return sampler.epoch_start + sampler.num_replicas * self.batches_taken * self.loader.batch_size

    def _start_epoch(self) -> None:
        self.loader.sampler.set_epoch(self.epoch)
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(self.epoch)

    def next(self) -> Dict[str, torch.Tensor]:
        while True:
            if self._iter is None:
                self._start_epoch()
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch += 1
                self.batches_taken = 0
                self.loader.sampler.epoch_start = 0
                self._iter = None
                continue
            self.batches_taken += 1
            sources = batch.pop("source", None)
            if sources is not None:
                per_sequence = batch["labels"].shape[1]
                for s, n in enumerate(torch.bincount(sources, minlength=len(self.source_names)).tolist()):
                    self.source_tokens[s] += n * per_sequence
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def figures(self) -> Dict[str, int]:
        """Tokens each mixture source has given this rank so far (empty for one source; the
        recipe sums them over ranks for the metrics)."""
        return {f"tokens_{name}": n for name, n in zip(self.source_names, self.source_tokens)}

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict(), "source_tokens": list(self.source_tokens),
                "batches_taken": self.batches_taken, "num_workers": self.loader.num_workers,
                "batch_size": self.loader.batch_size, "epoch_start": self.loader.sampler.epoch_start}

    def _continue_after(self, read: int) -> None:
        """This epoch goes on after its first ``read`` sequences, whatever the ranks and batch
        size that read them (every position before is read once, none after)."""
        self.loader.sampler.epoch_start, self.loader.sampler.next_yielded = read, None
        self.batches_taken = 0

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self._start_epoch()
        self.loader.sampler.epoch_start = int(state.get("epoch_start", 0))
        saved_workers = state.get("num_workers", _workers_of(state["loader"]))
        saved_batch = int(state.get("batch_size", self.loader.batch_size))  # older checkpoints: unchanged (refused)
        if saved_batch != self.loader.batch_size:
            self._continue_after(_read_by(state, self.loader.sampler.num_replicas))
        elif saved_workers == self.loader.num_workers:
            self.loader.load_state_dict(state["loader"])
            self.batches_taken = int(state.get("batches_taken", 0))
        elif "batches_taken" not in state:  # written before the position was kept apart from the loader's
            raise DataError(f"resume: this checkpoint's data position was saved by a loader with data.num_workers="
                            f"{saved_workers}, in a form that only that number of workers can read. Fix: resume with "
                            f"data.num_workers={saved_workers} (checkpoints written from now on can change it).")
        else:
            # torchdata's loader state is shaped by its worker count (a 0-worker state does not load
            # into 2 workers): the sampler starts after the batches the trainer took, which is
            # the same position (batches are whole: drop_last)
            self.batches_taken = int(state["batches_taken"])
            self.loader.sampler.next_yielded = self.batches_taken * self.loader.batch_size
        self.source_tokens = list(state.get("source_tokens", self.source_tokens))
        self._iter = None

    def load_resharded(self, states: Sequence[Dict[str, Any]]) -> None:
        """Resume from the states of another number of processes (``states[r]``: saved rank
        ``r``'s): the epoch goes on after the sequences all of them read; the mixture's token
        counts, summed, go to rank 0 (the metrics sum them over ranks)."""
        first = states[0]
        if "batch_size" not in first:
            raise DataError(f"resume: this checkpoint's data position was saved by {len(states)} process(es) in a "
                            f"form that only that number can read. Fix: resume with {len(states)} processes "
                            "(checkpoints written from now on can change it).")
        self.epoch = int(first["epoch"])
        self._start_epoch()
        self._continue_after(_read_by(first, len(states)))
        totals = [sum(int(s["source_tokens"][i]) for s in states) for i in range(len(self.source_tokens))]
        self.source_tokens = totals if self.loader.sampler.rank == 0 else [0] * len(totals)
        self._iter = None
