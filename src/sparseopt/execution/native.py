"""The hand-written CSR kernels of ``sparse_kernels.cpp``, built and loaded by :mod:`sparseopt.native` (the
shared build: system C++ compiler on first use, cached per source, compiler and CPU, ctypes).

Why native code: on the AMD EPYC Zen4 development machine these loops ran the CSR x dense product 2.5-3x faster
than MKL as torch calls it, and the SDDMM 1.3-1.5x faster than ``torch.sparse.sampled_addmm``; on an AVX2-only
EPYC the three products of a 4096² layer at density 0.05 ran 1.8x faster than torch's at batch 256
(benchmarks/README).
Where the build fails the products run on torch's kernels, with one warning naming the cause;
``SPARSEOPT_NATIVE_KERNELS=0`` chooses torch's kernels without building.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from sparseopt.native import build, load

SOURCE = Path(__file__).with_name("sparse_kernels.cpp")
_ARGS = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (torch's kernels then) when disabled or when the build failed (warned)."""
    return load(SOURCE, {name: (_ARGS, None) for name in ("sparseopt_spmm_f32", "sparseopt_sddmm_f32")},
                "sparse Linear layers run torch's CSR kernels instead (2-3x slower per product on the development "
                "machine)")


def _build() -> Path:
    return build(SOURCE)
