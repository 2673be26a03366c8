"""The three products of a sparse Linear layer on ``torch.sparse_csr`` tensors, blocked over the batch.

``torch``'s CSR-times-dense product walks, for every non-zero ``W[i, j]``, one row ``j`` of the dense operand.
When that operand is a whole batch (4096 × 256 floats = 4 MiB) the rows fall out of the per-core L2 cache; cut into
column blocks of 64 (1 MiB) they stay in it, which measured 2x faster on 4096² at density 0.05 (benchmarks/README).
"""

from __future__ import annotations

import warnings

import torch

#: Batch columns per block: 64 x 4096 floats = 1 MiB, the size that fits the L2 cache of the development CPU.
BLOCK = 64



def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without the beta warning (see :func:`to_csr`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def to_csr(dense: torch.Tensor) -> torch.Tensor:
    """``dense.to_sparse_csr()`` without torch's "CSR support is in beta" warning (it is the API we build on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return dense.to_sparse_csr()


def csr_matmul_t(w: torch.Tensor, x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``x @ w.T`` for a CSR ``w`` (out × in) and a dense ``x`` (batch × in), as ``(w @ x.T).T`` in batch blocks."""
    if x.shape[0] <= block:
        return (w @ x.t().contiguous()).t()
    out = x.new_empty(x.shape[0], w.shape[0])
    for start in range(0, x.shape[0], block):
        chunk = x[start:start + block]
        out[start:start + block] = (w @ chunk.t().contiguous()).t()
    return out


def sddmm(w: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Values of ``dy.T @ x`` (out × in) at the non-zeros of the CSR ``w``, in ``w``'s value order.

    This is the weight gradient of ``y = x @ w.T`` restricted to the active entries: O(nnz · batch) work."""
    values = torch.zeros_like(w.values())
    dyt = dy.t()
    for start in range(0, x.shape[0], block):
        part = torch.sparse.sampled_addmm(w, dyt[:, start:start + block].contiguous(),
                                          x[start:start + block].contiguous(), beta=0.0)
        values += part.values()
    return values
