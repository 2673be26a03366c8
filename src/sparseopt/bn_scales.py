"""Per-channel scale sigma_i of the BatchNorms that sparse layers feed, for SparseOpt(factor_source="batchnorm").

BatchNorm divides neuron i's pre-activation by its batch standard deviation sigma_i, which scales the gradient by
1/sigma_i (SPEC 1.1). The papers predict sigma_i from fan-in (sqrt(k_i)); this measures it instead, from the batches
the model is trained on: a forward pre-hook on each BatchNorm keeps the per-channel variance of its input in train
mode. No extra forward pass. Only the last training forward before each optimizer step counts (it is folded into an
EMA at the step), so diagnostic forward passes made between steps never change the factors; with gradient
accumulation the last micro-batch stands for the step. Under torch.distributed the variances are averaged over ranks
so every rank applies the same factors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn


class BatchNormScales:
    """EMA of the per-channel input variance of ``batchnorms`` (``{sparse weight name: BatchNorm module}``)."""

    def __init__(self, batchnorms: Mapping[str, nn.Module], momentum: float) -> None:
        self.batchnorms = dict(batchnorms)
        self.momentum = momentum
        self.var: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._handles = [bn.register_forward_pre_hook(self._recorder(name)) for name, bn in self.batchnorms.items()]

    def _recorder(self, name: str):
        def record(module, args):
            if module.training and args and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                dims = [d for d in range(x.dim()) if d != 1]
                self._pending[name] = x.to(torch.float64).var(dim=dims, unbiased=False)
        return record

    @torch.no_grad()
    def update(self, distributed: bool = False) -> bool:
        """Fold the last recorded batch into the EMA; True when something changed."""
        if not self._pending:
            return False
        for name in sorted(self._pending):
            batch = self._pending[name]
            if distributed:
                dist.all_reduce(batch)
                batch /= dist.get_world_size()
            old = self.var.get(name)
            self.var[name] = batch if old is None else old.mul_(1 - self.momentum).add_(batch, alpha=self.momentum)
        self._pending.clear()
        return True

    def sigmas(self) -> dict[str, torch.Tensor]:
        return {n: torch.sqrt(v + self.batchnorms[n].eps) for n, v in self.var.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: v.clone() for n, v in self.var.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.var = {n: v.clone() for n, v in state.items() if n in self.batchnorms}
        self._pending.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
