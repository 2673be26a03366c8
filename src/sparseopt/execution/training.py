"""Sparse execution of masked ``nn.Linear`` layers during training: CSR forward, CSR input gradient, SDDMM weight
gradient on the active entries only, and the dense weight gradient only on the steps where a topology needs it.

The weight stays a dense ``nn.Parameter`` held by the user's optimizer (zero at inactive entries, as on the
masked-dense path), so every optimizer, the pipeline's masking and SparseOpt scaling, checkpoints and resume work
unchanged; only the three products change, and the trajectory equals the masked-dense one up to float rounding.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sparseopt.execution.kernels import csr_matmul_t, sddmm
from sparseopt.execution.layout import SparseLinearLayout

# Break-even measured with benchmarks/bench_sparse_linear.py (benchmarks/README): forward + backward of one layer,
# 1 thread. Sparse won at density 0.05 and 0.02 from batch 64 on, lost at density 0.1 and above, and lost at batch 1.
#: Above this density the dense kernels win (0.05 won, 0.1 lost on 1024², 4096², 16384x4096).
SPARSE_MAX_DENSITY = 0.075
#: Below this many weights per layer (the smallest measured, 1024²) the gain is not measured, so not claimed.
SPARSE_MIN_NUMEL = 1 << 20
#: A forward with fewer rows than this runs the masked-dense product (batch 1 lost on every measured shape).
SPARSE_MIN_BATCH = 32


@dataclass(frozen=True)
class ExecutionPolicy:
    """Which sparse Linear layers run sparse kernels: density at most ``max_density`` and at least ``min_numel``
    weights (the measured break-even); the others stay on the masked-dense path, named in a warning. A forward of
    fewer than ``min_batch`` rows (batch x leading dims) runs the masked-dense product, which computes the same."""

    max_density: float = SPARSE_MAX_DENSITY
    min_numel: int = SPARSE_MIN_NUMEL
    min_batch: int = SPARSE_MIN_BATCH

    def __post_init__(self) -> None:
        if not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"sparse_execution max_density must be in (0, 1], got {self.max_density!r}")
        if self.min_numel < 0 or self.min_batch < 0:
            raise ValueError(f"sparse_execution min_numel and min_batch must be >= 0, got {self.min_numel!r} and "
                             f"{self.min_batch!r}")


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layout: SparseLinearLayout, dense_grad: bool):
        x2 = x.reshape(-1, layout.in_features)
        values = weight.detach().reshape(-1).index_select(0, layout.flat)
        y = csr_matmul_t(layout.csr(values), x2)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, values)
        ctx.layout, ctx.dense_grad, ctx.x_shape = layout, dense_grad, x.shape
        return y.view(*x.shape[:-1], layout.out_features)

    @staticmethod
    def backward(ctx, dy):
        x2, values = ctx.saved_tensors
        layout = ctx.layout
        dy2 = dy.reshape(-1, layout.out_features)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = csr_matmul_t(layout.csr_t(values), dy2).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.dense_grad:
                dw = dy2.t() @ x2
            else:
                dw = x2.new_zeros(layout.out_features * layout.in_features)
                dw.index_copy_(0, layout.flat, sddmm(layout.csr(values), dy2, x2))
                dw = dw.view(layout.out_features, layout.in_features)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None


class SparseExecution:
    """Runs the chosen layers of a :class:`~sparseopt.SparseTraining` with sparse kernels (``sparse_execution=``).

    ``dense_grad_needed()`` is asked at every forward: True on the steps where the topology reads the dense
    gradient (RigL's mask updates), when the layer computes the full ``dy.T @ x`` instead of the SDDMM."""

    def __init__(self, params, masks: dict[str, torch.Tensor], policy: ExecutionPolicy,
                 dense_grad_needed: Callable[[], bool]) -> None:
        self.policy = policy
        self.dense_grad_needed = dense_grad_needed
        self.layouts: dict[str, SparseLinearLayout] = {}
        self.fallback: dict[str, str] = {}
        for p in params:
            reason = self._ineligible(p, masks[p.name])
            if reason:
                self.fallback[p.name] = reason
                continue
            self.layouts[p.name] = SparseLinearLayout(p.module, masks[p.name])
            p.module.forward = types.MethodType(_sparse_forward(self, self.layouts[p.name]), p.module)
        if self.fallback:
            warnings.warn("sparse_execution: these sparse layers stay on the masked-dense path: "
                          + "; ".join(f"{n} ({why})" for n, why in self.fallback.items()), stacklevel=3)

    def _ineligible(self, p, mask: torch.Tensor) -> str:
        if type(p.module) is not nn.Linear or p.param is not p.module.weight:
            return f"a {type(p.module).__name__}, only nn.Linear weights have sparse kernels"
        if p.param.device.type != "cpu":
            return f"on {p.param.device}, the sparse kernels are measured on CPU only"
        density = float(mask.sum()) / mask.numel()
        if density > self.policy.max_density:
            return f"density {density:.3f} > break-even {self.policy.max_density}"
        if mask.numel() < self.policy.min_numel:
            return f"{mask.numel()} weights < {self.policy.min_numel}, too small to gain"
        return ""

    def rebuild(self, masks: dict[str, torch.Tensor], names=None) -> None:
        """Re-derive the CSR structure of the layers whose masks changed (``names``; all when None)."""
        for name, layout in self.layouts.items():
            if names is None or name in names:
                layout.rebuild(masks[name])

    def runs_sparse(self, name: str) -> bool:
        return name in self.layouts

    def remove(self) -> None:
        for layout in self.layouts.values():
            if "forward" in vars(layout.module):
                del layout.module.forward
        self.layouts = {}


def _sparse_forward(execution: SparseExecution, layout: SparseLinearLayout):
    def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < execution.policy.min_batch * layout.in_features:
            return F.linear(x, module.weight, module.bias)   # weights are zero off the mask: the same product
        return _SparseLinearFunction.apply(x, module.weight, module.bias, layout,
                                           torch.is_grad_enabled() and execution.dense_grad_needed())
    return forward
