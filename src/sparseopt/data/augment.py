"""Batched, vectorized image transforms for in-memory datasets (CIFAR): crop+flip and per-channel normalization.

Working on whole uint8 batches keeps augmentation off the per-sample Python path, which dominates CPU training
time for small images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .transfer import to_device_async

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_crop_flip(
    batch: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad each image by ``padding``, take a random crop of the original size and flip half horizontally.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` per image, but done
    for the whole ``(N, C, H, W)`` batch with one gather. Works on uint8 or float batches; dtype is preserved.
    The random offsets are drawn on the CPU (``generator`` is a CPU generator) and the gather runs on the
    batch's device, so a GPU batch gets exactly the crops a CPU batch would.
    """
    if batch.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(batch.shape)}")
    n, _, h, w = batch.shape
    device = batch.device
    padded = torch.nn.functional.pad(batch, (padding, padding, padding, padding)) if padding else batch
    draws = torch.cat([torch.randint(0, 2 * padding + 1, (2, n), generator=generator),
                       (torch.rand(n, generator=generator) < 0.5).long()[None]])
    top, left, flip = to_device_async(draws, device)[:, :, None]  # one small copy, the host does not wait
    rows = top + torch.arange(h, device=device)
    col_offsets = torch.where(flip.bool(), torch.arange(w - 1, -1, -1, device=device), torch.arange(w, device=device))
    cols = left + col_offsets
    samples = torch.arange(n, device=device)[:, None, None]
    # Advanced indices separated by a slice put the indexed dims first: (N, H, W, C).
    out = padded[samples, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class Normalize:
    """Per-channel ``(x - mean) / std`` on a batch; uint8 input is first scaled to [0, 1].

    Applied per batch, on the batch's device, so datasets can stay uint8 in memory and in transfers (4x smaller
    than float32). The constants are copied to each device once.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        mean, std = self._constants(batch.device)
        x = batch.float()
        if batch.dtype == torch.uint8:
            x = x / 255.0
        return (x - mean) / std

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self.mean, self.std
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
