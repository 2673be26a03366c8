"""SparseOpt: the per-neuron diagonal preconditioner that undoes BatchNorm's 1/sqrt(1 - s_i) gradient skew (SPEC 1).

Given a layer's mask, neuron i (an output row/channel) with active fan-in k_i gets the factor

    c_i = sqrt(k_i / mean_i k_i)          (normalize=True, the ICML form; c ≡ 1 for homogeneous masks)
    c_i = sqrt(k_i / F) = sqrt(1 - s_i)   (normalize=False, the workshop form)

and its gradient rows are multiplied by c_i before the optimizer step. Factors depend on masks only, so they are
computed when masks change, never per step.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sparseopt.graph import layers_feeding_batchnorm
from sparseopt.masks import SparseParam, fan_in, per_unit

SCOPES = ("all", "bn_followed")
_OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
REGROW_GRADIENTS = ("original", "corrected")
MEAN_SCOPES = ("layer", "global")
FACTOR_SOURCES = ("fan_in", "batchnorm")


class SparseOpt:
    """Configuration and factor computation of the SparseOpt preconditioner.

    Args:
        normalize: divide by sqrt(mean fan-in) so the layer's gradient norm is kept in expectation.
        scope: ``"all"`` masked layers; only those whose output feeds a BatchNorm (``"bn_followed"``: any
            ``_BatchNorm`` subclass or ``F.batch_norm`` call, found by tracing the model, see
            :func:`sparseopt.graph.layers_feeding_batchnorm`); or a list of parameter/module names or globs
            (``["layer*.conv*"]``). LayerNorm, GroupNorm and RMSNorm do not count for ``"bn_followed"``: the
            theory corrects BatchNorm's per-neuron gradient skew, which comes from normalising each unit over the
            batch; they normalise over a sample's units instead. A scope that preconditions nothing warns.
        regrow_gradient: RigL grows from the ``"original"`` dense gradient (paper default) or the ``"corrected"`` one.
        max_factor: optional clamp of c_i (an almost-dense neuron in a very sparse layer can reach 1/sqrt(1 - s̄)).
        mean_scope: the mean fan-in per ``"layer"`` (default) or over all neurons in scope (``"global"``, an
            ablation that no longer gives c ≡ 1 for homogeneous layers).
        example_input: one batch, needed only for ``scope="bn_followed"`` on models torch.fx cannot trace (else
            ``SparseTraining``'s ``example_input`` is used).
        precondition_weight_decay: make the factor multiply coupled weight decay too, ``−η·D(∇L + λW)`` instead
            of ``−η(D∇L + λW)`` (SPEC 1.3), for any optimizer whose decay is coupled (see
            :mod:`sparseopt.optim.decay`). Decoupled decay (AdamW) is a shrink outside the gradient and is left
            as it is (SparseTraining warns). Default False, the papers' PyTorch reading.
        factor_source: ``"fan_in"`` (the papers: c_i = sqrt(k_i / mean k), BatchNorm's gain predicted at
            initialisation) or ``"batchnorm"``: c_i = sigma_i / mean_j sigma_j over the layer's live neurons, sigma_i
            the per-channel standard deviation of the batches the following BatchNorm normalises (an EMA with
            ``bn_momentum``, read by SparseTraining through forward hooks), so the factor follows the gain BatchNorm
            actually applies as training changes the weight norms.
    """

    def __init__(
        self,
        normalize: bool = True,
        scope: str | Sequence[str] = "all",
        regrow_gradient: str = "original",
        max_factor: float | None = None,
        mean_scope: str = "layer",
        example_input=None,
        precondition_weight_decay: bool = False,
        factor_source: str = "fan_in",
        bn_momentum: float = 0.1,
    ) -> None:
        scope = _check_scope(scope)
        for value, allowed, what in ((regrow_gradient, REGROW_GRADIENTS, "regrow_gradient"),
                                     (mean_scope, MEAN_SCOPES, "mean_scope"),
                                     (factor_source, FACTOR_SOURCES, "factor_source")):
            if value not in allowed:
                raise ValueError(f"unknown SparseOpt {what} {value!r}; choose one of {allowed}")
        if max_factor is not None and max_factor <= 0:
            raise ValueError(f"max_factor must be positive or None, got {max_factor}")
        if factor_source == "batchnorm" and (not normalize or mean_scope != "layer"):
            raise ValueError("SparseOpt(factor_source='batchnorm') divides sigma_i by its layer mean; it has no "
                             "normalize=False or mean_scope='global' form: keep normalize=True, mean_scope='layer'")
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        if factor_source == "fan_in" and bn_momentum != 0.1:
            warnings.warn(f"SparseOpt(bn_momentum={bn_momentum}) has no effect with factor_source='fan_in'; it "
                          "smooths the measured sigma of factor_source='batchnorm'", stacklevel=2)
        self.normalize = normalize
        self.scope = scope
        self.regrow_gradient = regrow_gradient
        self.max_factor = max_factor
        self.mean_scope = mean_scope
        self.example_input = example_input
        self.precondition_weight_decay = bool(precondition_weight_decay)
        self.factor_source = factor_source
        self.bn_momentum = bn_momentum

    def __repr__(self) -> str:
        return (f"SparseOpt(normalize={self.normalize}, scope={self.scope!r}, regrow_gradient={self.regrow_gradient!r}, "
                f"max_factor={self.max_factor}, mean_scope={self.mean_scope!r}, "
                f"precondition_weight_decay={self.precondition_weight_decay}, factor_source={self.factor_source!r})")

    def layers_in_scope(self, model: nn.Module, params: Sequence[SparseParam], example_input=None) -> set[str]:
        """Names of the sparse weights this preconditioner acts on; warns when there are none.
        ``example_input`` is used when this SparseOpt was built without one."""
        names = {p.name for p in params}
        if self.scope == "all":
            return names
        module_of = {p.name: p.name.rsplit(".", 1)[0] if "." in p.name else "" for p in params}
        if isinstance(self.scope, tuple):
            for pattern in self.scope:
                if not any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(module_of[n], pattern)
                           for n in names):
                    raise ValueError(f"SparseOpt scope pattern {pattern!r} matches no sparse weight; sparse "
                                     f"weights: {sorted(names)}")
            return {n for n in names
                    if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(module_of[n], p) for p in self.scope)}
        example = self.example_input if self.example_input is not None else example_input
        feeders = layers_feeding_batchnorm(model, set(module_of.values()), example)
        chosen = {n for n in names if module_of[n] in feeders}
        if not chosen:
            warnings.warn(f"SparseOpt(scope='bn_followed') preconditions no layer of {type(model).__name__}: "
                          f"{_why_no_batchnorm(model)}, so SparseOpt has no effect; use scope='all' or name the "
                          "layers, e.g. scope=['blocks.*.conv*']", stacklevel=3)
        return chosen

    def factors(self, masks: Mapping[str, torch.Tensor], sigmas: Mapping[str, torch.Tensor] | None = None,
                out_axes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Per-neuron factors c, one per output unit along each mask's ``out_axes[name]`` (default 0), shaped to
        broadcast over the mask (``(out, 1, ..., 1)`` for Linear/Conv, ``(1, out)`` for Hugging Face Conv1D).

        ``sigmas`` (``factor_source="batchnorm"``): per-channel sigma of the BatchNorm each layer feeds; a layer
        without one (none follows it, or no batch has been seen yet) gets c = 1 on its live neurons."""
        axes = {name: (out_axes or {}).get(name, 0) for name in masks}
        if self.factor_source == "batchnorm":
            return {n: self._sigma_factor(m, (sigmas or {}).get(n), axes[n]) for n, m in masks.items()}
        fans = {name: fan_in(m, axes[name]).to(torch.float64) for name, m in masks.items()}
        capacity = {name: m.numel() // m.shape[axes[name]] for name, m in masks.items()}
        if self.mean_scope == "global":
            density = torch.cat([fans[n] / capacity[n] for n in masks]).mean()
            denominators = {n: density * capacity[n] for n in masks}
        elif self.normalize:
            denominators = {n: fans[n].mean() for n in masks}
        else:
            denominators = {n: torch.tensor(float(capacity[n]), dtype=torch.float64) for n in masks}
        out = {}
        for name, mask in masks.items():
            denom = denominators[name]
            # denom is 0 only when every fan-in is 0 (0/0 = nan -> 0); no `if denom > 0`: no host sync
            c = torch.sqrt(fans[name] / denom).nan_to_num_(0.0)
            if self.max_factor is not None:
                c = c.clamp(max=self.max_factor)
            out[name] = per_unit(c, mask.dim(), axes[name])
        return out

    def _sigma_factor(self, mask: torch.Tensor, sigma: torch.Tensor | None, out_axis: int = 0) -> torch.Tensor:
        live = fan_in(mask, out_axis) > 0
        if sigma is None:
            c = live.to(torch.float64)
        else:
            s = sigma.to(device=live.device, dtype=torch.float64) * live
            mean = s[live].mean() if live.any() else s.new_tensor(0.0)
            c = s / mean if mean > 0 else torch.zeros_like(s)
        if self.max_factor is not None:
            c = c.clamp(max=self.max_factor)
        return per_unit(c, mask.dim(), out_axis)


def _check_scope(scope) -> str | tuple[str, ...]:
    if isinstance(scope, str):
        if scope not in SCOPES:
            raise ValueError(f"unknown SparseOpt scope {scope!r}; choose one of {SCOPES} or a list of parameter "
                             "names/globs, e.g. scope=['layer1.*']")
        return scope
    patterns = tuple(scope) if isinstance(scope, Sequence) else ()
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"SparseOpt scope must be one of {SCOPES} or a non-empty list of parameter names/globs, "
                         f"got {scope!r}")
    return patterns


def _why_no_batchnorm(model: nn.Module) -> str:
    bns = sum(isinstance(m, _BatchNorm) for m in model.modules())
    if bns:
        return f"none of its {bns} BatchNorm layers reads a sparse layer's output directly"
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _OTHER_NORMS)})
    if others:
        return (f"it has no BatchNorm, and its {'/'.join(others)} layers do not count (the theory corrects "
                "BatchNorm's per-neuron gradient skew; these normalise over a sample's units instead)")
    return "it has no BatchNorm and no F.batch_norm call that reads a sparse layer's output"
