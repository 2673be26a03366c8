"""Bool masks stored 8 to a byte: ITOP's ever-active record costs 1/8 of a byte per weight, not a byte."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import torch

from sparseopt.native.selection import or_bits_

if sys.byteorder != "little":  # the multiply-packing below reads a word's top byte at its last address
    raise ImportError("sparseopt.bits packs masks assuming a little-endian machine; this one is big-endian")

_BITS = 8
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


#: Multiplying an int64 word of eight 0/1 bytes by this gathers byte j's bit into bit 56 + j, i.e. into the
#: word's top byte; the other partial products land below bit 56 (at distinct bits, so without carries) or past
#: bit 63. The top byte is byte 7 of the word in memory (little-endian, as on every platform torch supports).
_GATHER = 0x0102040810204080


def _packed_view(mask: torch.Tensor) -> torch.Tensor:
    """The packed bytes of a bool mask as a strided uint8 view: one multiply per 8 entries, no per-bit sum."""
    flat = mask.detach().reshape(-1).to(torch.bool)
    pad = (-flat.numel()) % _BITS
    if pad or flat.storage_offset() % _BITS:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(torch.int64) * _GATHER).view(torch.uint8)[_BITS - 1::_BITS]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 bytes, 8 entries a byte, least significant bit first (flat row-major order)."""
    return _packed_view(mask).contiguous()


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

    def merge_(self, name: str, mask: torch.Tensor) -> None:
        """Set every entry that is set in the bool ``mask`` (a bitwise OR): one native pass over the mask where the
        kernel applies (a bool CPU mask), else a multiply per 8 entries and an OR over an eighth of the bytes."""
        if tuple(mask.shape) != self._shapes[name]:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected {self._shapes[name]}")
        if not or_bits_(self._packed[name], mask.detach().reshape(-1)):
            self._packed[name].bitwise_or_(_packed_view(mask))

    def count(self, name: str) -> int:
        """Number of set entries."""
        packed = self._packed[name]
        return int(_POPCOUNT.to(packed.device)[packed.long()].sum())
