"""``build_datasets(name, root, **opts)``: one entry point from a config's dataset section to loaders.

Every builder returns a ``DataBundle`` whose loaders share the resumable ``set_epoch`` / ``state_dict``
interface, so training code does not care where the data came from. ``data_seed`` fixes the data itself
(split or generation) independently of ``seed``, which drives shuffling and augmentation, so runs with
different training seeds are evaluated on the same test set.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    random_crop_flip,
)
from .cifar import CIFAR_SPECS, load_cifar
from .errors import DataError
from .image_folder import ImageFolderDataset
from .image_transforms import EvalTransform, TrainTransform
from .loader import DatasetLoader, InMemoryLoader
from .mnist import load_mnist_subset
from .synthetic import make_synthetic

Loader = InMemoryLoader | DatasetLoader


@dataclass
class DataBundle:
    """Train/test loaders plus what a model builder needs to know about the data."""

    name: str
    train: Loader
    test: Loader
    num_classes: int
    input_shape: tuple[int, ...]


def _mnist(
    root: str | None,
    *,
    batch_size: int = 128,
    test_batch_size: int | None = None,
    test_size: int = 1000,
    seed: int = 0,
    data_seed: int = 0,
    drop_last: bool = False,
) -> DataBundle:
    x_train, y_train, x_test, y_test = load_mnist_subset(test_size=test_size, seed=data_seed)
    train = InMemoryLoader(x_train, y_train, batch_size, shuffle=True, seed=seed, drop_last=drop_last)
    test = InMemoryLoader(x_test, y_test, test_batch_size or batch_size, shuffle=False)
    return DataBundle("mnist", train, test, 10, (1, 28, 28))


def _cifar(
    name: str,
    root: str | None,
    *,
    batch_size: int = 128,
    test_batch_size: int | None = None,
    augment: bool = True,
    download: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataBundle:
    if root is None:
        raise DataError(f"{name} needs a data root (the folder holding {CIFAR_SPECS[name].folder})")
    x_train, y_train, x_test, y_test = load_cifar(name, root, download=download)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    normalize = Normalize(mean, std)
    train = InMemoryLoader(
        x_train,
        y_train,
        batch_size,
        shuffle=True,
        seed=seed,
        drop_last=drop_last,
        augment=functools.partial(random_crop_flip, padding=4) if augment else None,
        normalize=normalize,
    )
    test = InMemoryLoader(x_test, y_test, test_batch_size or batch_size, shuffle=False, normalize=normalize)
    return DataBundle(name, train, test, CIFAR_SPECS[name].num_classes, (3, 32, 32))


def _imagenet(
    root: str | None,
    *,
    batch_size: int = 256,
    test_batch_size: int | None = None,
    crop_size: int = 224,
    resize_size: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    num_workers: int = 4,
    prefetch_factor: int = 4,
    seed: int = 0,
    drop_last: bool = False,
) -> DataBundle:
    if root is None:
        raise DataError("imagenet needs a data root containing train/<class>/ and val/<class>/ folders")
    train_transform = TrainTransform(crop_size, scale=(float(scale[0]), float(scale[1])))
    train_set = ImageFolderDataset(os.path.join(root, "train"), train_transform, seed=seed)
    val_set = ImageFolderDataset(
        os.path.join(root, "val"), EvalTransform(crop_size, resize_size), classes=train_set.classes, seed=seed
    )
    # workers decode to uint8; the loaders normalise on the training device; each worker keeps prefetch_factor
    # batches in flight
    prefetch = prefetch_factor if num_workers > 0 else None
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = DatasetLoader(train_set, batch_size, shuffle=True, seed=seed, drop_last=drop_last, num_workers=num_workers,
                          normalize=normalize, prefetch_factor=prefetch)
    test = DatasetLoader(val_set, test_batch_size or batch_size, shuffle=False, num_workers=num_workers,
                         normalize=normalize, prefetch_factor=prefetch)
    return DataBundle("imagenet", train, test, len(train_set.classes), (3, crop_size, crop_size))


def _synthetic(
    root: str | None,
    *,
    batch_size: int = 128,
    test_batch_size: int | None = None,
    n_train: int = 1024,
    n_test: int = 256,
    num_classes: int = 10,
    shape: tuple[int, ...] = (1, 28, 28),
    noise: float = 1.0,
    seed: int = 0,
    data_seed: int = 0,
    drop_last: bool = False,
) -> DataBundle:
    x_train, y_train, x_test, y_test = make_synthetic(n_train, n_test, num_classes, shape, noise, seed=data_seed)
    train = InMemoryLoader(x_train, y_train, batch_size, shuffle=True, seed=seed, drop_last=drop_last)
    test = InMemoryLoader(x_test, y_test, test_batch_size or batch_size, shuffle=False)
    return DataBundle("synthetic", train, test, num_classes, tuple(shape))


_BUILDERS: dict[str, Callable[..., DataBundle]] = {
    "mnist": _mnist,
    "cifar10": functools.partial(_cifar, "cifar10"),
    "cifar100": functools.partial(_cifar, "cifar100"),
    "imagenet": _imagenet,
    "synthetic": _synthetic,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def dataset_options(name: str) -> dict[str, Any]:
    """The options ``build_datasets`` accepts for ``name``, with their defaults."""
    builder = _builder(name)
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_datasets(name: str, root: str | os.PathLike[str] | None = None, **opts: Any) -> DataBundle:
    """Loaders for ``name`` (one of ``DATASET_NAMES``); ``root`` is ignored by "mnist" and "synthetic"."""
    allowed = dataset_options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise DataError(f"unknown option(s) {unknown} for dataset {name!r}; accepted: {sorted(allowed)}")
    return _builder(name)(None if root is None else os.fspath(root), **opts)


def _builder(name: str) -> Callable[..., DataBundle]:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; allowed names: {', '.join(DATASET_NAMES)}") from None
