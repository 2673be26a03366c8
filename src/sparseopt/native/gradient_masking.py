"""The gradient masking as a C++ autograd hook (``gradient_masking.cpp``), loaded into ``torch.classes``.

Why: on a small model the masking's cost is not its arithmetic but Python in autograd's path. On the BN MLP
784-300-100-10 (two sparse weights, 31k entries, a 2.5 ms step) the Python hooks cost ~50 us per step inside real
steps, where a tight loop times their work at ~10 us: every Python line and torch call runs several times slower
after a forward and backward pass (benchmarks/README, ``bench_core_overhead.py``). The C++ hook sits on the same
AccumulateGrad node and computes the same ``where(mask, grad, 0) * row``, bit for bit (tests run both), in place
where the engine holds the only reference to the arriving gradient (AccumulateGrad then keeps it as ``.grad``),
on a copy otherwise; it records arrivals and, on mask-update steps, sums the dense gradients, as the Python hooks
do. Where the build fails (one warning) or ``SPARSEOPT_NATIVE_KERNELS=0``, :mod:`sparseopt.grad_hooks` keeps the
Python hooks.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sparseopt.native import load_torch_library

SOURCE = Path(__file__).with_name("gradient_masking.cpp")


@functools.cache
def hooks_class() -> type | None:
    """``torch.classes.sparseopt_gradient_masking.GradientHooks``, or None (Python hooks then) when disabled or
    when the build failed (warned)."""
    if not load_torch_library(SOURCE, "gradient masking runs as Python autograd hooks instead (same results, "
                                      "slower steps where the sparse layers are small)"):
        return None
    return torch.classes.sparseopt_gradient_masking.GradientHooks
