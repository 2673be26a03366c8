"""SparseOpt: the per-neuron diagonal preconditioner that undoes BatchNorm's 1/sqrt(1 - s_i) gradient skew (SPEC 1).

Given a layer's mask, neuron i (an output row/channel) with active fan-in k_i gets the factor

    c_i = sqrt(k_i / mean_i k_i)          (normalize=True, the ICML form; c ≡ 1 for homogeneous masks)
    c_i = sqrt(k_i / F) = sqrt(1 - s_i)   (normalize=False, the workshop form)

and its gradient rows are multiplied by c_i before the optimizer step. Factors depend on masks only, so they are
computed when masks change, never per step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparseopt.masks import fan_in

SCOPES = ("all", "bn_followed")
REGROW_GRADIENTS = ("original", "corrected")
MEAN_SCOPES = ("layer", "global")
FACTOR_SOURCES = ("fan_in", "batchnorm")


class SparseOpt:
    """Configuration and factor computation of the SparseOpt preconditioner.

    Args:
        normalize: divide by sqrt(mean fan-in) so the layer's gradient norm is kept in expectation.
        scope: ``"all"`` masked layers, or only those whose output feeds a BatchNorm (``"bn_followed"``), found
            by tracing the model (see :func:`sparseopt.graph.layers_feeding_batchnorm`).
        regrow_gradient: RigL grows from the ``"original"`` dense gradient (paper default) or the ``"corrected"`` one.
        max_factor: optional clamp of c_i (an almost-dense neuron in a very sparse layer can reach 1/sqrt(1 - s̄)).
        mean_scope: the mean fan-in per ``"layer"`` (default) or over all neurons in scope (``"global"``, an
            ablation that no longer gives c ≡ 1 for homogeneous layers).
        example_input: one batch, needed only for ``scope="bn_followed"`` on models torch.fx cannot trace.
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
        scope: str = "all",
        regrow_gradient: str = "original",
        max_factor: float | None = None,
        mean_scope: str = "layer",
        example_input=None,
        precondition_weight_decay: bool = False,
        factor_source: str = "fan_in",
        bn_momentum: float = 0.1,
    ) -> None:
        for value, allowed, what in ((scope, SCOPES, "scope"), (regrow_gradient, REGROW_GRADIENTS, "regrow_gradient"),
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

    def factors(self, masks: Mapping[str, torch.Tensor],
                sigmas: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-neuron factors c, shaped ``(out, 1, ..., 1)`` to broadcast over each mask in ``masks``.

        ``sigmas`` (``factor_source="batchnorm"``): per-channel sigma of the BatchNorm each layer feeds; a layer
        without one (none follows it, or no batch has been seen yet) gets c = 1 on its live neurons."""
        if self.factor_source == "batchnorm":
            return {n: self._sigma_factor(m, (sigmas or {}).get(n)) for n, m in masks.items()}
        fans = {name: fan_in(m).to(torch.float64) for name, m in masks.items()}
        capacity = {name: m[0].numel() for name, m in masks.items()}
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
            out[name] = c.view(-1, *([1] * (mask.dim() - 1)))
        return out

    def _sigma_factor(self, mask: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
        live = fan_in(mask) > 0
        if sigma is None:
            c = live.to(torch.float64)
        else:
            s = sigma.to(device=live.device, dtype=torch.float64) * live
            mean = s[live].mean() if live.any() else s.new_tensor(0.0)
            c = s / mean if mean > 0 else torch.zeros_like(s)
        if self.max_factor is not None:
            c = c.clamp(max=self.max_factor)
        return c.view(-1, *([1] * (mask.dim() - 1)))
