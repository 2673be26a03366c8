"""A sparse-run Linear layer trains only its active values: an (nnz,) parameter the optimizer holds instead of the
dense weight, so the optimizer step, the gradient and the masking cost O(nnz), not O(weights).

The dense ``weight`` stays the module's parameter of record: it is what ``state_dict()``, the report, the mask
updates and export read, and it is kept equal to the values (written back after every optimizer step, O(nnz)). The
optimizer's state dict stays dense-shaped too, so checkpoints are the same as on the masked-dense path and can be
loaded into either. Between steps, which side was written last is told by the tensors' version counters: a write
to the weight (``load_state_dict``, an edit) is gathered into the values before the next forward, a write to the
values is scattered into the weight. The optimizer step's write is mirrored unconditionally (:meth:`mirror`): fused
optimizers (``fused=True``, the HF Trainer's default ``adamw_torch_fused``) do not bump the version counter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparseopt.execution.layout import SparseLinearLayout

#: the name of the (nnz,) parameter registered on the module (so ``model.parameters()``, clipping included, sees it)
VALUES = "weight_values"


class CompactLinear:
    """The values parameter of one sparse ``nn.Linear``, its CSR layout, and the bookkeeping that keeps the dense
    weight, the values, the optimizer's state and the per-value gradient scale consistent."""

    def __init__(self, name: str, module: nn.Linear, mask: torch.Tensor,
                 row_scales: Mapping[str, torch.Tensor]) -> None:
        self.name, self.module, self.weight = name, module, module.weight
        self.layout = SparseLinearLayout(module, mask)
        self.values = nn.Parameter(self._gather(), requires_grad=self.weight.requires_grad)
        self._row_scales = row_scales
        self._scale_key: tuple | None = None
        self._scale: torch.Tensor | None = None
        self._mark_synced()
        self.weight.requires_grad_(False)  # the values are what trains; the dense weight is their mirror
        module.register_parameter(VALUES, self.values)
        self._hooks = [module.register_state_dict_post_hook(_drop_values_key),
                       module.register_load_state_dict_post_hook(_values_not_missing)]
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- dense weight <-> values -----------------------------------------------------------------------------
    def _gather(self) -> torch.Tensor:
        return self.weight.detach().reshape(-1).index_select(0, self.layout.flat)

    def _mark_synced(self) -> None:
        self._versions = (self.weight._version, self.values._version)

    @torch.no_grad()
    def sync(self) -> None:
        """Make weight and values agree, copying from whichever was written since the last sync."""
        weight_v, values_v = self._versions
        if self.weight._version != weight_v:
            if self.values._version != values_v:
                raise RuntimeError(f"sparse_execution: both {self.name} and its active values "
                                   f"({self.name.rsplit('.', 1)[0]}.{VALUES}) were written since the last step; "
                                   "write one of them only (the values are what the optimizer trains)")
            self.values.copy_(self._gather())
        elif self.values._version != values_v:
            self.weight.view(-1).scatter_(0, self.layout.flat, self.values.detach())  # 2.6x index_copy_ here
        self._mark_synced()

    @torch.no_grad()
    def mirror(self) -> None:
        """The optimizer step wrote the values: scatter them into the weight (their version counter may not say so)."""
        self.weight.view(-1).scatter_(0, self.layout.flat, self.values.detach())
        self._mark_synced()

    def value_scale(self) -> torch.Tensor | None:
        """SparseOpt's per-neuron factor of each value (None without one): its gradient scale."""
        row = self._row_scales.get(self.name)
        if row is None:
            return None
        key = (id(row), row._version, id(self.layout.flat))
        if key != self._scale_key:
            self._scale = row.reshape(-1).index_select(0, self.layout.flat // self.layout.in_features)
            self._scale_key = key
        return self._scale

    def per_value(self, row: torch.Tensor) -> torch.Tensor:
        """A per-neuron vector (shaped to broadcast along the weight's output axis) at each value."""
        return row.reshape(-1).index_select(0, self.layout.flat // self.layout.in_features)

    # ---- the optimizer holds the values --------------------------------------------------------------------
    def engage(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the values in the optimizer where it holds the dense weight (same group, same options), with the
        weight's state (converted to values by :meth:`compact_state` before the next step)."""
        if self.optimizer is optimizer:
            return
        state = _replace_param(optimizer, self.weight, self.values)
        if state is not None:
            optimizer.state[self.values] = state
        self.optimizer = optimizer

    def disengage(self) -> None:
        """Give the optimizer its dense weight back, with dense-shaped state."""
        optimizer, self.optimizer = self.optimizer, None
        if optimizer is None:
            return
        self.sync()
        state = _replace_param(optimizer, self.values, self.weight)
        if state is not None:
            optimizer.state[self.weight] = {k: self.densify(v) for k, v in state.items()}

    def compact_state(self) -> None:
        """Dense-shaped state of the values (just engaged, or loaded from a checkpoint) becomes values-shaped."""
        state = self.optimizer.state.get(self.values) if self.optimizer is not None else None
        for key, value in (state or {}).items():
            if isinstance(value, torch.Tensor) and value.shape == self.weight.shape:
                state[key] = value.reshape(-1).index_select(0, self.layout.flat)

    def densify(self, value):
        """A values-shaped state tensor as the dense weight's (zero at inactive entries); other values as they are."""
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape == self.values.shape:
            return value.new_zeros(self.weight.numel()).index_copy_(0, self.layout.flat, value).view(
                self.weight.shape)
        return value

    # ---- mask changes ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rebuild(self, mask: torch.Tensor) -> None:
        """The mask changed (an update, or a loaded state): re-derive the layout; the values come from the dense
        weight (which the mask update already edited), the optimizer state and any gradient follow their entries
        (entries new to the mask start at 0, as on the masked-dense path)."""
        self.sync()
        old = self.layout.flat
        self.layout.rebuild(mask)
        new = self.layout.flat
        if torch.equal(old, new):
            return
        self.values.data = self._gather()
        if self.values.grad is not None:
            self.values.grad = _follow(self.values.grad, old, new)
        state = self.optimizer.state.get(self.values, {}) if self.optimizer is not None else {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() == 1:
                state[key] = _follow(value, old, new)
        self._scale_key = None
        self._mark_synced()

    def remove(self) -> None:
        self.disengage()
        self.sync()
        for h in self._hooks:
            h.remove()
        del self.module._parameters[VALUES]
        self.weight.requires_grad_(self.values.requires_grad)


def _replace_param(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor) -> dict | None:
    """Put ``new`` wherever the optimizer's groups hold ``old``; returns ``old``'s state, taken out."""
    for group in optimizer.param_groups:
        group["params"][:] = [new if p is old else p for p in group["params"]]  # in place: wrappers share it
    return optimizer.state.pop(old, None)


def _follow(values: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per-entry ``values`` at the sorted flat indices ``old`` moved to the sorted indices ``new`` (0 where new)."""
    at = torch.searchsorted(old, new).clamp_(max=max(old.numel() - 1, 0))
    if old.numel() == 0:
        return values.new_zeros(new.numel())
    kept = old.index_select(0, at) == new
    return torch.where(kept, values.index_select(0, at), values.new_zeros(()))


def _drop_values_key(module, state_dict, prefix, local_metadata) -> None:
    """The values are a view of ``weight`` for training: checkpoints carry the dense weight only."""
    state_dict.pop(prefix + VALUES, None)


def _values_not_missing(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.endswith("." + VALUES) or k == VALUES]:
        missing.remove(key)
