"""Resumable, seeded batch loaders.

Epoch ``e``'s batch order depends only on ``(seed, e)`` and augmentation randomness only on
``(seed, e, batch)``, so a run restored from ``state_dict()`` mid-epoch sees exactly the batches the
uninterrupted run would have seen. ``InMemoryLoader`` indexes whole tensors (no per-sample Python);
``DatasetLoader`` wraps a map-style ``Dataset`` in a regular ``torch.utils.data.DataLoader`` for
decoded-from-disk data such as ImageNet folders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .seeding import torch_generator

Batch = tuple[torch.Tensor, torch.Tensor]
Augment = Callable[..., torch.Tensor]  # called as augment(batch, generator=torch.Generator)
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


class _ResumableLoader:
    """Epoch/position bookkeeping shared by the loaders; subclasses turn index batches into data batches.

    A fresh iteration replays the current epoch from its first batch, unless ``load_state_dict`` supplied a
    mid-epoch position. Finishing an epoch advances to the next one, so ``set_epoch`` is optional.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n < 1:
            raise ValueError("cannot build a loader over an empty dataset")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self._epoch, self._position, self._resume_at = 0, 0, 0
        self._rank, self._world = 0, 1

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (from its first batch)."""
        self._epoch, self._position, self._resume_at = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        """Epoch and number of batches of it already yielded; enough to resume mid-epoch."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"position {state['position']} is outside an epoch of {len(self)} batches")
        self._epoch, self._position, self._resume_at = state["epoch"], state["position"], state["position"]

    def shard(self, rank: int, world: int) -> None:
        """Data-parallel training: yield only this rank's slice ``batch[rank::world]`` of every global batch, so
        each process loads (and decodes) its own examples; the order and the batch count stay global."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world} processes")
        self._rank, self._world = rank, world

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch_generator(self.seed, _ORDER_STREAM, epoch))

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._resume_at
        self._resume_at, self._position = 0, start
        order = self._order(epoch)
        index_batches = [order[b * self.batch_size : (b + 1) * self.batch_size][self._rank :: self._world]
                         for b in range(start, len(self))]
        for b, batch in enumerate(self._produce(epoch, start, index_batches), start):
            self._position = b + 1
            yield batch
        self._epoch, self._position = epoch + 1, 0

    def _produce(self, epoch: int, start: int, index_batches: list[torch.Tensor]) -> Iterator[Batch]:
        raise NotImplementedError


class InMemoryLoader(_ResumableLoader):
    """Batches from in-memory tensors by permutation indexing, with optional batched augment/normalize.

    ``augment(batch, generator=g)`` runs on the raw (e.g. uint8) batch with a generator seeded from
    ``(seed, epoch, batch index)``; ``normalize(batch)`` runs after it and usually yields float32.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: Augment | None = None,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        super().__init__(len(x), batch_size, shuffle, seed, drop_last)
        self.x, self.y = x, y
        self.augment, self.normalize = augment, normalize

    def _produce(self, epoch: int, start: int, index_batches: list[torch.Tensor]) -> Iterator[Batch]:
        for b, idx in enumerate(index_batches, start):
            xb = self.x[idx]
            if self.augment is not None:
                xb = self.augment(xb, generator=torch_generator(self.seed, _AUGMENT_STREAM, epoch, b))
            if self.normalize is not None:
                xb = self.normalize(xb)
            yield xb, self.y[idx]


class DatasetLoader(_ResumableLoader):
    """A seeded, resumable front for ``torch.utils.data.DataLoader`` over a map-style dataset.

    If the dataset has ``set_epoch(epoch)`` it is called before each epoch so per-sample augmentation can be
    seeded by (seed, epoch, index); workers are started per epoch and therefore see the current epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        **dataloader_kwargs: Any,
    ) -> None:
        super().__init__(len(dataset), batch_size, shuffle, seed, drop_last)  # type: ignore[arg-type]
        self.dataset, self.num_workers = dataset, num_workers
        self.dataloader_kwargs = dataloader_kwargs

    def _produce(self, epoch: int, start: int, index_batches: list[torch.Tensor]) -> Iterator[Batch]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if not index_batches:
            return iter(())
        batches = [idx.tolist() for idx in index_batches]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers, **self.dataloader_kwargs)
        return iter(loader)
