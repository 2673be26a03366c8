"""The CSR structure of one sparse Linear layer's mask, and of its transpose, rebuilt only when the mask changes.

The layer's active values are one (nnz,) vector in the mask's row-major order (:attr:`SparseLinearLayout.flat`).
The three products of a training step are :meth:`~SparseLinearLayout.forward`,
:meth:`~SparseLinearLayout.input_grad` and :meth:`~SparseLinearLayout.weight_grad`; the input gradient needs the
values in W^T's row-major order, one O(nnz) gather per call (MKL's own transposed product is not reachable from
torch without a CSR->CSC conversion, which measured slower than the gather). Give them ``x`` and ``dy`` through
:func:`~sparseopt.execution.kernels.feature_major` once (save that ``x`` for the backward): then no product copies.
The indices are int32 (MKL's), int64 only for a layer too large for them.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseopt.execution.kernels import csr_matmul_t, csr_tensor, sddmm


class SparseLinearLayout:
    """The CSR structure of one layer's mask (rebuilt only when the mask changes) and the products on its values."""

    def __init__(self, module: nn.Linear, mask: torch.Tensor) -> None:
        self.module = module
        self.out_features, self.in_features = module.out_features, module.in_features
        self.rebuild(mask)

    def rebuild(self, mask: torch.Tensor) -> None:
        """Recompute both CSR structures from ``mask`` (out x in, bool or 0/1)."""
        flat = mask.reshape(-1).nonzero().squeeze(1)           # row-major: the CSR value order
        rows, cols = flat // self.in_features, flat % self.in_features
        index = torch.int32 if max(flat.numel(), self.out_features, self.in_features) < 2**31 else torch.int64
        self.flat = flat
        self.crow = _crow(rows, self.out_features).to(index)
        self.col = cols.to(index)
        order = torch.sort(cols * self.out_features + rows).indices   # the same entries in W^T's row-major order
        self.t_order = order.to(index)
        self.t_crow = _crow(cols[order], self.in_features).to(index)
        self.t_col = rows[order].to(index)

    @property
    def nnz(self) -> int:
        return self.flat.numel()

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """W (out x in) as CSR over ``values`` (nnz,), row-major order; no copy."""
        return csr_tensor(self.crow, self.col, values, (self.out_features, self.in_features))

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """W^T (in x out) as CSR: ``values`` (row-major order of W) gathered into W^T's row-major order."""
        return csr_tensor(self.t_crow, self.t_col, values.index_select(0, self.t_order),
                          (self.in_features, self.out_features))

    def forward(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` (batch x out, feature-major) for ``x`` (batch x in)."""
        return csr_matmul_t(self.csr(values), x)

    def input_grad(self, values: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """``dy @ W`` (batch x in, feature-major) for ``dy`` (batch x out): the gradient of :meth:`forward` w.r.t.
        ``x``."""
        return csr_matmul_t(self.csr_t(values), dy)

    def weight_grad(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(dy.T @ x)`` at the active entries, (nnz,) in ``values`` order: the gradient w.r.t. ``values``."""
        return sddmm(self.csr(dy.new_empty(self.nnz)), dy, x)


def _crow(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])
