"""The one-pass scans of a mask update (``selection_kernels.cpp``) as torch-tensor functions.

Why: the grow selection's candidate scan (compare, AND-NOT with the mask, compaction) and the drop selection's
bracket are several full-size torch passes each, and ``index_fill_``/``index_select`` on one CPU thread measured
~15-20 ns per entry; each kernel here is one pass. They apply to contiguous float32 CPU tensors with int64
indices (:func:`kernels_for`); everything else, and everything where the build failed (warned once) or
``SPARSEOPT_NATIVE_KERNELS=0``, stays on the torch path in :mod:`sparseopt.selection`, which computes the same
results in the same order (tests run both).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch.autograd.graph import increment_version

from sparseopt.native import load

SOURCE = Path(__file__).with_name("selection_kernels.cpp")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "sparseopt_above_f32": ([_P, _P, _I, _F, ctypes.c_int, _I, _P, _P], ctypes.c_int64),
    "sparseopt_bracket_f32": ([_P, _I, _F, _F, ctypes.c_int, _I, _P, _I, _P, _P, _P], None),
    "sparseopt_kth_f32": ([_P, _I, _I, _P], ctypes.c_int),
    "sparseopt_pick_f32": ([_P, _I, _I, ctypes.c_int, _P], ctypes.c_int),
    "sparseopt_gather_f32": ([_P, _P, _I, ctypes.c_int, _P], None),
    "sparseopt_fill_f32": ([_P, _P, _I, _F], None),
    "sparseopt_fill_u8": ([_P, _P, _I, ctypes.c_uint8], None),
    "sparseopt_or_bits": ([_P, _P, _I], None),
    "sparseopt_sample_f32": ([_P, _P, _I, _I, _I, ctypes.c_int, _P, _I, _P], ctypes.c_int64),
    "sparseopt_without_flagged": ([_P, _I, _P, ctypes.c_int], ctypes.c_int64),
}


_DTYPES = (torch.float32, torch.int64, torch.bool, torch.uint8)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the torch paths then) when disabled or when the build failed (warned)."""
    return load(SOURCE, _SIGNATURES, "mask updates run on torch ops instead (slower, same results)")


def kernels_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels when they apply to all of ``tensors``: contiguous CPU tensors, floats float32, indices int64
    (bool and uint8 masks)."""
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _DTYPES:
            return None
    return library()


def above(lib: ctypes.CDLL, x: torch.Tensor, t: float, excluded: torch.Tensor | None, absolute: bool,
          capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) and scores of the entries with score > ``t`` outside the bool ``excluded``,
    score = |x| if ``absolute`` else x: ``((s > t) & ~excluded).nonzero()`` and ``s[...]`` in one pass.
    ``capacity``: the expected count with a margin (a second pass runs only when more qualify)."""
    n = x.numel()
    capacity = max(1, min(capacity, n))
    for _ in range(2):
        idx = torch.empty(capacity, dtype=torch.long)
        val = torch.empty(capacity, dtype=torch.float32)
        count = lib.sparseopt_above_f32(x.data_ptr(), None if excluded is None else excluded.data_ptr(), n,
                                        float(t), int(absolute), capacity, idx.data_ptr(), val.data_ptr())
        if count <= capacity:
            return idx[:count], val[:count]
        capacity = count
    raise AssertionError("unreachable: the second pass has room for every hit")


def sample(lib: ctypes.CDLL, x: torch.Tensor, excluded: torch.Tensor, start: int, stride: int, absolute: bool,
           also_scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The grow selection's sample: ``cat([s[start::stride] with -inf where excluded, also_scores[start::stride]])``
    (s = |x| if ``absolute`` else x) and how many of the first part are not excluded; one pass."""
    m1, m2 = len(range(start, x.numel(), stride)), len(range(start, also_scores.numel(), stride))
    out = torch.empty(m1 + m2, dtype=torch.float32)
    valid = lib.sparseopt_sample_f32(x.data_ptr(), excluded.data_ptr(), m1, start, stride, int(absolute),
                                     also_scores.data_ptr(), m2, out.data_ptr())
    return out, valid


def without_flagged(lib: ctypes.CDLL, flags: torch.Tensor, arrays: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """:func:`sparseopt.selection._without_flagged` in one pass: the same entries in the same order."""
    pointers = (ctypes.c_void_p * len(arrays))(*(a.data_ptr() for a in arrays))
    keep = lib.sparseopt_without_flagged(flags.data_ptr(), flags.numel(), pointers, len(arrays))
    for a in arrays:
        increment_version(a)
    return [a[:keep] for a in arrays]


def bracket(lib: ctypes.CDLL, x: torch.Tensor, inner: float, outer: float, largest: bool, sure_capacity: int,
            band_capacity: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled top-k's bracket in one pass: (number of sure entries, their flat indices, the band's flat
    indices, the band's scores); sure = strictly beyond ``inner``, band = between ``outer`` and ``inner``
    inclusive. The sure list holds at most ``sure_capacity`` (the count says when more were beyond: the caller
    then falls back); the band list is complete (a second pass when it outgrows ``band_capacity``)."""
    n = x.numel()
    sure_capacity, band_capacity = max(1, min(sure_capacity, n)), max(1, min(band_capacity, n))
    sure = torch.empty(sure_capacity + 1, dtype=torch.long)     # + 1: the kernel's scratch slot
    counts = torch.zeros(2, dtype=torch.long)
    for _ in range(2):
        band = torch.empty(band_capacity + 1, dtype=torch.long)
        band_val = torch.empty(band_capacity + 1, dtype=torch.float32)
        lib.sparseopt_bracket_f32(x.data_ptr(), n, float(inner), float(outer), int(largest), sure_capacity,
                                  sure.data_ptr(), band_capacity, band.data_ptr(), band_val.data_ptr(),
                                  counts.data_ptr())
        n_sure, n_band = counts.tolist()
        if n_band <= band_capacity:
            return n_sure, sure[:min(n_sure, sure_capacity)], band[:n_band], band_val[:n_band]
        band_capacity = n_band
    raise AssertionError("unreachable: the second pass has room for the whole band")


def kth(lib: ctypes.CDLL, x: torch.Tensor, rank: int) -> float | None:
    """The value at 0-based ``rank`` of ``x`` in ascending order (``torch.kthvalue(x, rank + 1)``; a zero comes
    back as +0, which compares the same); None when ``x`` holds a NaN."""
    value = ctypes.c_float()
    if lib.sparseopt_kth_f32(x.data_ptr(), x.numel(), rank, ctypes.byref(value)) != 0:
        return None
    return value.value


def pick(lib: ctypes.CDLL, x: torch.Tensor, k: int, largest: bool) -> torch.Tensor | None:
    """Positions of the ``k`` best entries of ``x`` (0 < k <= numel): those strictly better than the k-th best
    value, then those equal to it, lowest positions first; None when ``x`` holds a NaN."""
    n = x.numel()
    out = torch.empty(k, dtype=torch.long)
    if lib.sparseopt_pick_f32(x.data_ptr(), n, k, int(largest), out.data_ptr()) != 0:
        return None
    return out


def gather(lib: ctypes.CDLL, x: torch.Tensor, idx: torch.Tensor, absolute: bool) -> torch.Tensor:
    """``x.view(-1).index_select(0, idx)``, then ``abs_()`` if ``absolute``."""
    out = torch.empty(idx.numel(), dtype=torch.float32)
    lib.sparseopt_gather_f32(x.data_ptr(), idx.data_ptr(), idx.numel(), int(absolute), out.data_ptr())
    return out


def fill_(lib: ctypes.CDLL, p: torch.Tensor, idx: torch.Tensor, value: float | bool) -> None:
    """``p.view(-1).index_fill_(0, idx, value)`` for a float32 or bool ``p``; the indices must be in range."""
    if p.dtype == torch.bool:
        lib.sparseopt_fill_u8(p.data_ptr(), idx.data_ptr(), idx.numel(), int(bool(value)))
    else:
        lib.sparseopt_fill_f32(p.data_ptr(), idx.data_ptr(), idx.numel(), float(value))


def fill_at_(p: torch.Tensor, idx: torch.Tensor, value: float | bool) -> None:
    """``p.view(-1).index_fill_(0, idx, value)``, on the native kernel where it applies (in-range indices)."""
    native = p.dtype in (torch.float32, torch.bool) and idx.dtype == torch.long and not (
        p.requires_grad and torch.is_grad_enabled())          # autograd would not see a native write
    lib = kernels_for(p, idx) if native else None
    if lib is None:
        p.view(-1).index_fill_(0, idx, value)
    else:
        fill_(lib, p, idx, value)
        increment_version(p)   # as index_fill_ does: resume and autograd read the in-place version counter


def gather_at(x: torch.Tensor, idx: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """``x.reshape(-1).index_select(0, idx)`` (then ``abs_()`` if ``absolute``), natively where it applies."""
    lib = kernels_for(x, idx) if x.dtype == torch.float32 and idx.dtype == torch.long else None
    if lib is None:
        out = x.reshape(-1).index_select(0, idx)
        return out.abs_() if absolute else out
    return gather(lib, x, idx, absolute)


def or_bits_(packed: torch.Tensor, mask: torch.Tensor) -> bool:
    """Set the bits of the set entries of the bool ``mask`` in ``packed`` (sparseopt.bits' packing, one pass);
    False, with nothing done, where the kernel does not apply (the caller then packs on torch)."""
    lib = kernels_for(packed, mask) if packed.dtype == torch.uint8 and mask.dtype == torch.bool else None
    if lib is None or packed.numel() != -(-mask.numel() // 8):
        return False
    lib.sparseopt_or_bits(packed.data_ptr(), mask.data_ptr(), mask.numel())
    increment_version(packed)
    return True
