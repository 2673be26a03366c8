"""What SparseTraining keeps in memory besides the model and the optimizer: its per-weight state, counted in bytes."""

from __future__ import annotations

import torch


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def state_bytes(sparse) -> dict[str, int]:
    """Bytes of every tensor a :class:`~sparseopt.SparseTraining` holds, by component, and ``"total"``; compare
    with ``parameter_bytes(model)``. Shared storages are counted once per component."""
    parts = {
        "masks": _bytes(sparse.masks.values()),
        "fired": _bytes(sparse.fired.packed().values() if hasattr(sparse.fired, "packed")
                        else sparse.fired.values()),
        # SparseOpt's per-neuron factors (the per-weight part of the gradient scale is the bool mask)
        "grad_scale": _bytes(getattr(sparse, "_row_scale", {}).values()),
        "active": _bytes(getattr(sparse, "_active", {}).values()),
        "scratch": _bytes([getattr(sparse, "_scratch_buf", None)]),
    }
    execution = getattr(sparse, "execution", None)
    if execution is not None:
        parts["sparse_execution"] = _bytes(t for lay in execution.layouts.values()
                                           for t in (lay.flat, lay.crow, lay.col, lay.t_order, lay.t_crow, lay.t_col))
    parts["total"] = sum(parts.values())
    return parts


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
