"""Seeded Gaussian-cluster classification data shaped like images, for smoke tests that need no files."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import DataError


def make_synthetic(
    n_train: int = 1024,
    n_test: int = 256,
    num_classes: int = 10,
    shape: Sequence[int] = (1, 28, 28),
    noise: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): one standard-normal centre per class plus ``noise``-scaled noise.

    Train and test share the class centres, so a model that learns the training set generalizes; balanced
    labels (round-robin, then shuffled) keep accuracy baselines at 1/num_classes.
    """
    if n_train < 1 or n_test < 1 or num_classes < 2:
        raise DataError(
            f"synthetic data needs n_train, n_test >= 1 and num_classes >= 2 (got {n_train}, {n_test}, {num_classes})"
        )
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, *shape, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        return centres[labels] + noise * torch.randn(n, *shape, generator=g), labels

    return (*draw(n_train), *draw(n_test))
