"""ImageNet-style per-image transforms with PIL + torch (torchvision is not a dependency).

They follow torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` (train) and ``Resize`` +
``CenterCrop`` (eval) algorithms, but take an explicit numpy ``Generator`` so each sample's randomness can
be seeded by (seed, epoch, index) instead of hidden global state.

They return uint8 ``(3, H, W)`` tensors: a quarter of float32's bytes through the worker queues, the pinned
buffers and the host-to-device copy; per-channel normalisation runs on the batch, on the device
(``DatasetLoader(normalize=...)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) tensor (contiguous, as DataLoader collation wants)."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) of a random crop with area fraction in ``scale`` and aspect in ``ratio``.

    Ten rejection-sampling attempts, then a centred crop with the aspect ratio clamped, as in torchvision.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RandomResizedCrop(crop_size, scale, ratio) + horizontal flip (p=0.5), as uint8."""

    def __init__(
        self,
        crop_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.crop_size, self.scale, self.ratio = crop_size, scale, ratio

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        left, top, w, h = random_resized_crop_box(img.width, img.height, rng, self.scale, self.ratio)
        box = (left, top, left + w, top + h)
        out = img.resize((self.crop_size, self.crop_size), Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(out)


class EvalTransform:
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``, as uint8. Deterministic."""

    def __init__(self, crop_size: int = 224, resize_size: int | None = None) -> None:
        self.resize_size = resize_size if resize_size is not None else round(crop_size * 256 / 224)
        if self.resize_size < crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {crop_size}")
        self.crop_size = crop_size

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        w, h = img.size
        short = self.resize_size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.Resampling.BILINEAR)
        left = int(round((img.width - self.crop_size) / 2.0))
        top = int(round((img.height - self.crop_size) / 2.0))
        img = img.crop((left, top, left + self.crop_size, top + self.crop_size))
        return to_uint8_tensor(img)
