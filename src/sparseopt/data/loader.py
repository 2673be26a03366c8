"""Resumable, seeded batch loaders.

Epoch ``e``'s batch order depends only on ``(seed, e)`` and augmentation randomness only on
``(seed, e, batch)``, so a run restored from ``state_dict()`` mid-epoch sees exactly the batches the
uninterrupted run would have seen. ``InMemoryLoader`` indexes whole tensors (no per-sample Python);
``DatasetLoader`` wraps a map-style ``Dataset`` in a regular ``torch.utils.data.DataLoader`` for
decoded-from-disk data such as ImageNet folders.

``to(device)`` makes a loader yield batches on that device, normalised there: an in-memory dataset moves to the
device whole (CIFAR: 180 MB as uint8) and is indexed, cropped, flipped and normalised there; a disk dataset's
workers return uint8 images, pinned, copied without blocking and normalised on the device. Random draws stay on
the CPU generators, so the batches do not depend on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .seeding import torch_generator
from .transfer import to_device_async

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
        self.device = torch.device("cpu")

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

    def to(self, device: torch.device | str) -> _ResumableLoader:
        """Yield batches on ``device`` from now on (see the module docstring); returns self."""
        self.device = torch.device(device)
        return self

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
    ``(seed, epoch, batch index)``; ``normalize(batch)`` runs after it and usually yields float32. Both run on
    the loader's device (the CPU generator only draws the random numbers).
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

    def to(self, device: torch.device | str) -> InMemoryLoader:
        super().to(device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        return self

    def _produce(self, epoch: int, start: int, index_batches: list[torch.Tensor]) -> Iterator[Batch]:
        for b, idx in enumerate(index_batches, start):
            idx = to_device_async(idx, self.device)
            xb = self.x[idx]
            if self.augment is not None:
                xb = self.augment(xb, generator=torch_generator(self.seed, _AUGMENT_STREAM, epoch, b))
            if self.normalize is not None:
                xb = self.normalize(xb)
            yield xb, self.y[idx]


class DatasetLoader(_ResumableLoader):
    """A seeded, resumable front for ``torch.utils.data.DataLoader`` over a map-style dataset.

    One DataLoader serves every epoch, so with workers they persist (processes and the dataset's open state)
    across epochs, prefetching ``prefetch_factor`` batches each. Every index the workers receive is an
    ``(epoch, index)`` pair, so a dataset seeding per-sample augmentation by (seed, epoch, index) needs no
    ``set_epoch`` in its worker copies (datasets taking plain indices get ``set_epoch`` and plain indices). On a
    CUDA device the batches are pinned by the DataLoader, copied with ``non_blocking`` and ``normalize``d there.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prefetch_factor: int | None = None,
        **dataloader_kwargs: Any,
    ) -> None:
        super().__init__(len(dataset), batch_size, shuffle, seed, drop_last)  # type: ignore[arg-type]
        if prefetch_factor is not None and num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers > 0 (with no workers nothing is prefetched)")
        self.dataset, self.num_workers, self.normalize = dataset, num_workers, normalize
        self.prefetch_factor = prefetch_factor
        self.dataloader_kwargs = dataloader_kwargs
        self._batches = _EpochBatches(getattr(dataset, "takes_epoch_index", False))
        self._loader: DataLoader | None = None

    def to(self, device: torch.device | str) -> DatasetLoader:
        super().to(device)
        self._loader = None  # pinning depends on the device: a new DataLoader on the next iteration
        return self

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers > 0
            self._loader = DataLoader(self.dataset, batch_sampler=self._batches, num_workers=self.num_workers,
                                      pin_memory=self.device.type == "cuda", persistent_workers=workers,
                                      prefetch_factor=self.prefetch_factor if workers else None,
                                      **self.dataloader_kwargs)
        return self._loader

    def _produce(self, epoch: int, start: int, index_batches: list[torch.Tensor]) -> Iterator[Batch]:
        if not index_batches:
            return
        if not self._batches.with_epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            self._loader = None  # worker copies of the dataset must see the new epoch
        self._batches.epoch, self._batches.batches = epoch, [idx.tolist() for idx in index_batches]
        for x, y in self._dataloader():
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield (self.normalize(x) if self.normalize is not None else x), y


class _EpochBatches:
    """The batch sampler of a DatasetLoader: the current epoch's index batches, as ``(epoch, index)`` pairs for
    datasets that take them (``takes_epoch_index = True``)."""

    def __init__(self, with_epoch: bool) -> None:
        self.with_epoch, self.epoch, self.batches = with_epoch, 0, []

    def __iter__(self) -> Iterator[list]:
        if not self.with_epoch:
            return iter(list(self.batches))
        epoch = self.epoch
        return iter([[(epoch, i) for i in batch] for batch in self.batches])

    def __len__(self) -> int:
        return len(self.batches)
