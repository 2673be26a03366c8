"""Inference with CSR Linear layers: a trained sparse model runs O(nnz) products instead of dense ones."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from sparseopt.execution.kernels import csr_matmul_t, to_csr

#: Above this fraction of non-zeros a CSR Linear is not converted (dense is faster; benchmarks/README, export).
INFERENCE_MAX_DENSITY = 0.3


class CSRLinear(nn.Module):
    """``nn.Linear`` whose weight is a CSR buffer (the non-zeros of the trained weight): for inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", to_csr(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = csr_matmul_t(self.weight, x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={nnz / (self.in_features * self.out_features):.4f}, bias={self.bias is not None}")


def csr_for_inference(model: nn.Module, *, max_density: float = INFERENCE_MAX_DENSITY,
                      inplace: bool = False) -> tuple[nn.Module, dict[str, float]]:
    """Replace every ``nn.Linear`` whose weight has at most ``max_density`` non-zeros by a :class:`CSRLinear`.

    Exact: only zero weights are left out (bake the masks first, e.g. ``model.load_state_dict(bake(sparse))``).
    Returns the model (a copy unless ``inplace``) and ``{module name: density}`` of the converted layers; the layers
    left dense are named in a warning. The result is for inference: CSR weights are buffers, not parameters."""
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density!r}")
    model = model if inplace else copy.deepcopy(model)
    converted, dense = {}, {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            density = float(child.weight.count_nonzero()) / child.weight.numel()
            if density <= max_density:
                setattr(module, child_name, CSRLinear(child))
                converted[full] = density
            else:
                dense[full] = density
    if not converted:
        raise ValueError(f"{type(model).__name__} has no nn.Linear with density <= {max_density}; nothing to convert "
                         "(bake the masks into the weights first, or raise max_density)")
    if dense:
        warnings.warn(f"csr_for_inference keeps these Linear layers dense (density above {max_density}): "
                      + ", ".join(f"{n} ({d:.3f})" for n, d in dense.items()), stacklevel=2)
    return model, converted
