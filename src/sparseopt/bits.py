"""Bool masks stored 8 to a byte: ITOP's ever-active record costs 1/8 of a byte per weight, not a byte."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

_BITS = 8
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 bytes, 8 entries a byte, least significant bit first (flat row-major order)."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % _BITS
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = 1 << torch.arange(_BITS, dtype=torch.int32, device=flat.device)
    return (flat.view(-1, _BITS).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = torch.Size(shape).numel()
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // _BITS):
        raise ValueError(f"a packed mask for shape {tuple(shape)} is {-(-numel // _BITS)} uint8 bytes, got "
                         f"{packed.numel()} of {packed.dtype}")
    bits = (packed.unsqueeze(1) >> torch.arange(_BITS, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:numel].bool().view(tuple(shape))


class PackedMasks(Mapping):
    """``{name: bool mask}`` kept bit-packed; reading an entry unpacks a copy (use :meth:`load` to replace one)."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self._shapes = {n: tuple(m.shape) for n, m in masks.items()}
        self._packed = {n: pack_mask(m) for n, m in masks.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self) -> dict[str, torch.Tensor]:
        return dict(self._packed)

    def load(self, name: str, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != self._shapes[name]:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected {self._shapes[name]}")
        self._packed[name] = pack_mask(mask.to(self._packed[name].device))

    def set_(self, name: str, flat_indices: torch.Tensor) -> None:
        """Set the entries at ``flat_indices`` (O(len) plus one pass over the packed bytes)."""
        if flat_indices.numel() == 0:
            return
        idx = flat_indices.unique()
        packed = self._packed[name]
        bits = torch.zeros_like(packed).index_put_((idx >> 3,), (1 << (idx & 7)).to(torch.uint8), accumulate=True)
        packed.bitwise_or_(bits)

    def count(self, name: str) -> int:
        """Number of set entries."""
        packed = self._packed[name]
        return int(_POPCOUNT.to(packed.device)[packed.long()].sum())
