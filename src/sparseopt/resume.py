"""Resume in any order: what SparseTraining's construction overwrote, kept until training starts.

Frameworks (HF Trainer, Lightning) load the model's and the optimizer's state *before* the code that builds
SparseTraining runs. Construction then applies freshly drawn masks (zeroing loaded weights and their optimizer
state) and may re-initialise weights; a later ``SparseTraining.load_state_dict`` could not bring those values back.
So construction first copies them (to host memory, so accelerator memory is not doubled); ``load_state_dict``
before the first step puts back every tensor nobody changed since construction, then applies the saved masks.
A tensor that was changed since (the user loaded the model after building) is left as it is: it is newer.

Unchanged is decided by the tensor's in-place version counter (``Tensor._version``, which every in-place write,
``load_state_dict``'s ``copy_`` included, increments) and, for optimizer state, by identity, since
``Optimizer.load_state_dict`` installs new tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseopt.masks import SparseParam


def shaped_state(optimizer: torch.optim.Optimizer, p: SparseParam) -> dict[str, torch.Tensor]:
    """The optimizer's per-entry state tensors of a sparse weight (momentum, Adam moments, ...)."""
    return {k: v for k, v in optimizer.state.get(p.param, {}).items()
            if isinstance(v, torch.Tensor) and v.shape == p.shape}


class ConstructionBackup:
    """Host copies of the sparse weights and their optimizer state as they were before construction."""

    def __init__(self, params: Sequence[SparseParam], optimizer: torch.optim.Optimizer) -> None:
        self._weights = {p.name: p.param.detach().to("cpu", copy=True) for p in params}
        self._state = {p.name: {k: v.detach().to("cpu", copy=True) for k, v in shaped_state(optimizer, p).items()}
                       for p in params}
        self._after: dict[str, tuple[int, dict[str, tuple[torch.Tensor, int]]]] = {}

    def seal(self, params: Sequence[SparseParam], optimizer: torch.optim.Optimizer) -> None:
        """Remember the tensors as construction left them, to tell later whether anyone else wrote them."""
        self._after = {p.name: (p.param._version, {k: (v, v._version) for k, v in shaped_state(optimizer, p).items()})
                       for p in params}

    @torch.no_grad()
    def restore(self, params: Sequence[SparseParam], optimizer: torch.optim.Optimizer) -> None:
        """Put back what construction overwrote, wherever nothing else has written since."""
        for p in params:
            version, state = self._after[p.name]
            if p.param._version == version:
                p.param.copy_(self._weights[p.name])
            live = optimizer.state.get(p.param, {})
            for key, (tensor, tensor_version) in state.items():
                if live.get(key) is tensor and tensor._version == tensor_version:
                    tensor.copy_(self._state[p.name][key])
