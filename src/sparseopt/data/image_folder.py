"""ImageNet-style ``root/<split>/<class>/<image>`` datasets decoded with PIL on demand.

Each sample's augmentation is drawn from a numpy Generator seeded by (seed, epoch, index), so results are
reproducible regardless of DataLoader worker count or resume point. The index may carry its epoch,
``dataset[(epoch, index)]``, which is how ``DatasetLoader``'s persistent workers learn the epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
Transform = Callable[[Image.Image, np.random.Generator], torch.Tensor]


class ImageFolderDataset(Dataset):
    """Class-per-subfolder images; labels follow sorted class names (or the ``classes`` given).

    Pass the training split's ``classes`` when building the validation split so both share one label map.
    """

    takes_epoch_index = True  # DatasetLoader may pass (epoch, index) keys

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform,
        classes: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} not found; expected {self.root}/<class>/<image>.JPEG")
        found = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DataError(f"{self.root} has class folders absent from the training split: {unknown[:5]}")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(path, self.class_to_idx[name]) for name in found for path in _images_in(self.root / name)]
        if not self.samples:
            raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}/<class>/")
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds per-sample augmentation."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        path, label = self.samples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            with Image.open(path) as img:
                x = self.transform(img.convert("RGB"), rng)
        except OSError as exc:
            raise DataError(f"could not decode image {path}: {exc}") from exc
        return x, label


def _images_in(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"class folder {folder} contains no {'/'.join(IMAGE_EXTENSIONS)} images")
    return images
