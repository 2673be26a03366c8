"""Seeing through wrappers: the optimizer a framework hands over, and the names DDP / torch.compile add.

Sparse state must not depend on how a run was wrapped: a state saved under DDP (``module.``), ``torch.compile``
(``_orig_mod.``) or as an attribute of a LightningModule has to load into the bare model and back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_PARALLEL_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that really steps. accelerate's ``AcceleratedOptimizer`` and Lightning's
    ``LightningOptimizer`` hold it as ``.optimizer``; the first lacks the step-hook machinery, the second copies the
    inner one's attributes once, so its ``state`` goes stale when the inner optimizer loads a state dict."""
    outer = optimizer
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not _has_step_hooks(optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or a wrapper holding one as .optimizer, like "
            f"accelerate's AcceleratedOptimizer), got {type(outer).__name__}; pass the optimizer itself, e.g. "
            "torch.optim.SGD(model.parameters(), lr=0.1)")
    return optimizer


def _has_step_hooks(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_pre_hooks")


def _wrapped_attribute(module: nn.Module) -> str | None:
    """The attribute under which a wrapper module keeps the real model, or None for an ordinary module."""
    if isinstance(module, _PARALLEL_WRAPPERS):
        return "module"
    inner = getattr(module, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule":  # torch.compile
        return "_orig_mod"
    return None


def unwrap_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside outer DDP/DataParallel/torch.compile wrappers, and the name prefix they add
    (``"module."``, ``"_orig_mod."``), so graph analysis can trace the bare model."""
    prefix = ""
    while (attr := _wrapped_attribute(model)) is not None:
        model, prefix = getattr(model, attr), f"{prefix}{attr}."
    return model, prefix


def canonical_name(model: nn.Module, name: str) -> str:
    """``name`` with the path segments of DDP/DataParallel (``module``) and torch.compile (``_orig_mod``)
    removed wherever such a wrapper sits in ``model``, so wrapped and bare models name a weight the same."""
    parts, kept, module = name.split("."), [], model
    for part in parts[:-1]:
        if _wrapped_attribute(module) != part:
            kept.append(part)
        module = getattr(module, part)
    return ".".join([*kept, parts[-1]])


def match_names(saved: Iterable[str], own: Iterable[str]) -> dict[str, str]:
    """Map each of ``own`` names to the saved one it is: equal, or equal after removing one common leading path
    (a LightningModule attribute such as ``model.``) from either side. Raises ValueError naming both sets."""
    saved, own = sorted(saved), sorted(own)
    if set(saved) == set(own):
        return {n: n for n in own}
    for longer, shorter, own_is_longer in ((saved, own, False), (own, saved, True)):
        if len(longer) != len(shorter) or not shorter:
            continue
        prefix = longer[0][: len(longer[0]) - len(shorter[0])] if longer[0].endswith(shorter[0]) else None
        if prefix and prefix.endswith(".") and {prefix + n for n in shorter} == set(longer):
            return {prefix + n: n for n in shorter} if own_is_longer else {n: prefix + n for n in shorter}
    raise ValueError(
        f"the saved sparse weights {_preview(saved)} do not match this model's {_preview(own)} (also not after "
        "removing a common leading module path); build SparseTraining on the same model with the same "
        "sparse-set options (include/exclude/density) as when the state was saved")


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"
