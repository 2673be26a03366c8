"""The CSR structure of one sparse Linear layer's mask, and of its transpose, rebuilt only when the mask changes."""

from __future__ import annotations

import torch
from torch import nn

from sparseopt.execution.kernels import csr_tensor


class SparseLinearLayout:
    """The CSR structure of one layer's mask (rebuilt only when the mask changes) and its per-step values."""

    def __init__(self, module: nn.Linear, mask: torch.Tensor) -> None:
        self.module = module
        self.out_features, self.in_features = module.out_features, module.in_features
        self.rebuild(mask)

    def rebuild(self, mask: torch.Tensor) -> None:
        flat = mask.reshape(-1).nonzero().squeeze(1)           # row-major: the CSR value order
        rows, cols = flat // self.in_features, flat % self.in_features
        self.flat = flat
        self.crow = _crow(rows, self.out_features)
        self.col = cols
        order = torch.sort(cols * self.out_features + rows).indices   # the same entries in W^T's row-major order
        self.t_order = order
        self.t_crow = _crow(cols[order], self.in_features)
        self.t_col = rows[order]

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return csr_tensor(self.crow, self.col, values, (self.out_features, self.in_features))

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        return csr_tensor(self.t_crow, self.t_col, values.index_select(0, self.t_order),
                                       (self.in_features, self.out_features))


def _crow(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])
