"""The three products of a sparse Linear layer on ``torch.sparse_csr`` tensors (MKL's CSR x dense product and
torch's SDDMM), each one call over the whole batch.

No batch blocking: on the AMD EPYC Zen4 development machine (2 MiB L2 per core) one whole-batch CSR product beat
64- and 128-column blocks at 4096², density 0.05, batch 256 (1 thread, benchmarks/README), so the blocks that paid
on the former Intel machine are gone. The dense operand is made contiguous in the transposed (in x batch) layout
first: MKL on a column-major operand (``x.t()`` as a view, or a column-major ``out=``) measured 5x slower.
"""

from __future__ import annotations

import warnings

import torch


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


def csr_matmul_t(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a CSR ``w`` (out x in) and a dense ``x`` (batch x in): ``(w @ x.T).T``, returned as that
    transposed (batch x out) view of the out x batch product, so no copy back."""
    return (w @ x.t().contiguous()).t()


def sddmm(w: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of ``dy.T @ x`` (out x in) at the non-zeros of the CSR ``w``, in ``w``'s value order: the weight
    gradient of ``y = x @ w.T`` restricted to the active entries, O(nnz · batch) work.

    Only ``w``'s structure is used: its values are replaced by zeros (``sampled_addmm`` reads them even at
    ``beta=0``, so a non-finite weight would otherwise turn its gradient into NaN)."""
    pattern = csr_tensor(w.crow_indices(), w.col_indices(), dy.new_zeros(w.values().shape), tuple(w.shape))
    return torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
