"""Which parameters carry masks, and exact-count random masks.

Kept apart from the training pipeline so that pruning-at-initialisation, diagnostics and users can pick the same
sparse set and draw the same masks without building a trainer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SparseParam:
    """A weight that carries a mask: its qualified name, owning module and the tensor itself."""

    name: str
    module: nn.Module
    param: nn.Parameter

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_sparse_params(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Iterable[type[nn.Module]] = DEFAULT_MODULE_TYPES,
    prune_first_layer: bool = False,
    prune_last_layer: bool = True,
) -> list[SparseParam]:
    """Pick the weights to sparsify.

    Default: the ``weight`` of every Conv/Linear module, except the first such layer (the stem: a dense stem is
    the reference practice of RigL and JaxPruner). "First" and "last" follow module registration order, which is
    the forward order for ordinary models. ``include``/``exclude`` are glob patterns on parameter names
    (``"layer1.*"``, ``"*.fc.weight"``); an ``include`` list replaces the type-based default set, but still only
    weights of the chosen module types with at least 2 dims are eligible. Biases and normalisation parameters are
    never sparse.
    """
    module_types = tuple(module_types)
    candidates, seen = [], set()
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, module_types) and isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            if id(weight) not in seen:  # a weight shared by several modules (tied) gets one mask
                seen.add(id(weight))
                candidates.append(SparseParam(f"{mod_name}.weight" if mod_name else "weight", module, weight))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no weights of types {[t.__name__ for t in module_types]} to sparsify; "
            "pass module_types=... naming the layer types that should carry masks"
        )
    all_names = {c.name for c in candidates}
    for pattern in [*(include or ()), *exclude]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
            raise ValueError(
                f"pattern {pattern!r} matches no sparsifiable weight; known weights: {sorted(all_names)}"
            )
    chosen = list(candidates)
    if include is not None:
        chosen = [c for c in chosen if _matches(c.name, include)]
    else:
        if not prune_first_layer:
            chosen = [c for c in chosen if c.name != candidates[0].name]
        if not prune_last_layer:
            chosen = [c for c in chosen if c.name != candidates[-1].name]
    chosen = [c for c in chosen if not _matches(c.name, exclude)]
    if not chosen:
        raise ValueError(
            "no weight is left to sparsify after the include/exclude/first/last-layer rules "
            f"(candidates: {sorted(all_names)}); relax exclude or set prune_first_layer=True"
        )
    return chosen


def nnz_for_density(numel: int, density: float) -> int:
    """Active count for a density: ``numel - floor(sparsity * numel)`` (exactly RigL's count of zeros)."""
    return numel - int((1.0 - density) * numel + 1e-9)


def random_mask(
    shape: Sequence[int] | torch.Size, nnz: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A bool mask with exactly ``nnz`` ones at uniformly random positions (top-k of uniform scores)."""
    numel = int(torch.Size(shape).numel())
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} is outside [0, {numel}] for a tensor of shape {tuple(shape)}")
    scores = torch.rand(numel, generator=generator, device=device)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[torch.topk(scores, nnz, sorted=False).indices] = True
    return mask.view(tuple(shape))


def fan_in(mask: torch.Tensor) -> torch.Tensor:
    """Active fan-in k_i of every output unit (row of a Linear weight, output channel of a Conv weight)."""
    return mask.reshape(mask.shape[0], -1).count_nonzero(dim=1)
