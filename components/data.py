"""Training data: fixed-length sequences packed from a prepared corpus, the distributed,
resumable loader, and the stream of batches a recipe draws from.

A corpus reaches training in two steps: ``components/prepare.py`` turns it into token
shards once (explicitly with ``letrecipes prepare-data``, or into ``data.cache_dir`` on
the first run), and :class:`TokenShards` reads them memory-mapped, so a process's memory
does not grow with the corpus.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from letrecipes.components.corpus import DataError
from letrecipes.components.prepare import read_manifest
from letrecipes.components.tokenizer import Tokenizer


class TokenShards:
    """A prepared folder's shards as one read-only token array: ``len()`` and slices.

    Shards are memory-mapped on first use in each process (never pickled into dataloader
    workers), so only the pages a batch touches are read.
    """

    def __init__(self, folder: Union[str, Path], tokenizer: Optional[Tokenizer] = None, key: str = "data.source"):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, tokenizer, key)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        sizes = [s["tokens"] for s in self.manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._maps: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards supports contiguous slices only")
        pieces = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[i + 1])
            if end > start:
                pieces.append(self._shard(i)[start - self.starts[i]:end - self.starts[i]])
            start, i = end, i + 1
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_maps": {}}


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
