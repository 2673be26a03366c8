"""SparseTraining: masks, topology updates and preconditioning around the user's own optimizer.

The per-step order of SPEC 10 lives here and only here. It runs inside ``optimizer.step()`` through the optimizer's
official step hooks, so the user's loop (``loss.backward(); optimizer.step(); scheduler.step()``) does not change:

    before the step   1. on a mask-update step: drop/grow from the raw dense gradients, zero new weights and
                         reset their optimizer state, update ITOP, recompute factors; by default skip this step
                      2. otherwise: grad <- (mask * c) * grad       (masking and SparseOpt in one multiply)
                         [optional renormalize: rescale all grads to the norm τ of the masked, uncorrected ones]
    the user's optimizer step (SGD, Adam, AdamW, ... unchanged)
    after the step    3. weight <- weight * mask; step counter + 1
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from glob import escape as glob_escape

import torch
import torch.distributed as dist
from torch import nn

from sparseopt.bn_scales import BatchNormScales
from sparseopt.distributions import check_density, layer_nnz
from sparseopt.execution.training import ExecutionPolicy, SparseExecution
from sparseopt.graph import batchnorm_after
from sparseopt.health import correction_ratio, layer_health
from sparseopt.init import sparse_init_
from sparseopt.masks import (SparseParam, SparsePlan, constant_fan_in_mask, constant_fan_in_nnz, fan_in,
                             plan_sparse_params, random_mask, sparsifiable_weights)
from sparseopt.optim.decay import decoupled_groups, fold_coupled_weight_decay_, restore_weight_decay
from sparseopt.optim.renorm import RENORM_MODES, global_grad_norm, renormalize_
from sparseopt.optim.sparseopt import SparseOpt
from sparseopt.report import LayerReport, SparsityReport
from sparseopt.selection import MaskChange, drop_and_grow_, drop_and_grow_per_neuron_
from sparseopt.topology.base import Static, Topology

STATE_VERSION = 1
_log = logging.getLogger("sparseopt")


class SparseTraining:
    """Sparsify ``model`` and keep it sparse while ``optimizer`` trains it.

    Args:
        model: any ``nn.Module`` (DDP-wrapped too).
        optimizer: any ``torch.optim.Optimizer`` holding the model's sparse weights.
        density: fraction of weights kept, for the whole sparse set (distributed by ``distribution``), or an explicit
            ``{parameter_name: density}`` map that also defines the sparse set.
        distribution: ``"erk"`` or ``"uniform"``; ``erk_power_scale`` p (0 gives uniform).
        custom_densities: per-layer densities outside the global budget (the rest is re-solved).
        include, exclude, module_types, prune_first_layer, prune_last_layer: choose the sparse set
            (see :func:`sparseopt.masks.plan_sparse_params`); the weight layers left dense, and why, are in
            ``dense_layers``, the report and one log line.
        example_input: one batch (tensor, tuple or mapping of model arguments), used only for models torch.fx
            cannot trace (Hugging Face models): to find the layers that read the input (first-layer rule) and,
            for ``SparseOpt(scope="bn_followed")``, the layers feeding a BatchNorm.
        topology: ``Static()`` (default), ``SET(...)`` or ``RigL(...)``.
        preconditioner: ``SparseOpt(...)`` or ``None`` for the baseline.
        masks: initial masks ``{name: bool tensor}`` (e.g. from pruning at initialisation) instead of random ones.
        init: re-initialise active weights for their sparse fan-in: ``"fanin"``, ``"fanout"``, ``"fanavg"``,
            ``"layer"`` or ``None`` (keep the model's init); ``init_gain`` is the variance gain (2 = He).
        seed: seeds the library's own ``torch.Generator`` (masks, SET growth); the global RNG is never touched.
        renormalize: ``None`` (default), ``"clip"`` or ``"exact"``: after the SparseOpt multiply, rescale all the
            optimizer's gradients by ``min(1, τ/‖g̃‖)`` or ``τ/‖g̃‖``, τ being the global norm of the masked but
            uncorrected gradients (SPEC 1.6, an ablation isolating SparseOpt's change of direction).
        sparse_execution: ``True`` (or an :class:`~sparseopt.execution.training.ExecutionPolicy`) runs sparse
            ``nn.Linear`` layers with CSR kernels: forward, input gradient and an active-entries-only weight gradient;
            the dense weight gradient only on steps where the topology reads it. Layers below the measured
            break-even stay masked-dense (a warning names them; ``report()`` says which run sparse). The weights
            stay dense parameters, so results equal the masked-dense path up to float rounding, but ``.grad`` is
            zero at inactive entries except on mask-update steps.
        constant_fan_in: every output unit of a layer gets the same fan-in k = round(nnz / rows) (so the layer's
            count becomes rows · k, the nearest multiple), and SET/RigL drop and regrow within each unit, so k_i
            never changes: BatchNorm sees no fan-in skew and SparseOpt's fan-in factor is exactly 1, the
            structural counterpart of SparseOpt. Given ``masks`` must then have constant fan-in per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float | Mapping[str, float] = 0.1,
        *,
        distribution: str = "erk",
        erk_power_scale: float = 1.0,
        custom_densities: Mapping[str, float] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        module_types: Sequence[type[nn.Module]] | None = None,
        prune_first_layer: bool = False,
        prune_last_layer: bool = True,
        topology: Topology | None = None,
        preconditioner: SparseOpt | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        init: str | None = None,
        init_gain: float = 2.0,
        seed: int = 0,
        renormalize: str | None = None,
        sparse_execution: bool | ExecutionPolicy = False,
        example_input=None,
        constant_fan_in: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if renormalize is not None and renormalize not in RENORM_MODES:
            raise ValueError(f"unknown renormalize {renormalize!r}; choose None or one of {RENORM_MODES}")
        self.renormalize = renormalize
        self.model = model
        self.optimizer = optimizer
        self.topology = topology if topology is not None else Static()
        self.preconditioner = preconditioner
        self.example_input = example_input
        plan = self._select(model, density, include, exclude, module_types, prune_first_layer, prune_last_layer,
                            example_input)
        self.params, self.dense_layers = plan.sparse, plan.dense
        self.out_axes = {p.name: p.out_axis for p in self.params}
        if self.dense_layers:
            _log.info("layers left dense: %s",
                      "; ".join(f"{n} ({why})" for n, why in self.dense_layers.items()))
        self._check_optimizer_holds_params()
        device = self.params[0].param.device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

        shapes = {p.name: tuple(p.shape) for p in self.params}
        if isinstance(density, Mapping):
            self.target_nnz = {n: layer_nnz({n: s}, density[n], "uniform")[n] for n, s in shapes.items()}
        else:
            self.target_nnz = layer_nnz(shapes, density, distribution, erk_power_scale=erk_power_scale,
                                        custom=custom_densities)
        self.constant_fan_in = constant_fan_in
        if constant_fan_in:
            self.target_nnz = {p.name: constant_fan_in_nnz(p.shape, self.target_nnz[p.name], p.out_axis)
                               for p in self.params}
        self.masks = self._initial_masks(masks, device)
        self._broadcast_masks()
        self.fired = {n: m.clone() for n, m in self.masks.items()}
        self.changed = dict.fromkeys(self.masks, 0)
        self._reset_active()
        self.step_count = 0
        self._precondition_names = self._resolve_preconditioner_scope()
        self._bn_names: dict[str, str] | None = None
        self._param_of = {p.name: p.param for p in self.params}
        self._bn_scales = self._measure_batchnorm_scales()
        self._scales_stale = False
        self._fold_decay = preconditioner is not None and preconditioner.precondition_weight_decay
        self._folded_decay: list[tuple[dict, float]] = []
        if self._fold_decay:
            self._check_decay_to_precondition()
        self._grad_scale: dict[str, torch.Tensor] = {}
        self._scratch_buf: torch.Tensor | None = None
        self._refresh_grad_scales()
        with torch.no_grad():
            for p in self.params:
                if init is not None:
                    sparse_init_(p.param, self.masks[p.name], init, out_axis=p.layout.out_axis,
                                 in_axis=p.layout.in_axis, gain=init_gain, generator=self.generator)
                p.param.mul_(self.masks[p.name])
                # Inactive entries hold 0 in weights and optimizer state from here on, which lets mask updates
                # touch only the entries that change.
                for value in optimizer.state.get(p.param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        value.mul_(self.masks[p.name])
        self.execution = None
        if sparse_execution:
            policy = sparse_execution if isinstance(sparse_execution, ExecutionPolicy) else ExecutionPolicy()
            self.execution = SparseExecution(self.params, self.masks, policy, self._dense_grad_needed)
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    # ---- construction helpers -------------------------------------------------------------------------------
    @staticmethod
    def _select(model, density, include, exclude, module_types, prune_first_layer, prune_last_layer,
                example_input) -> SparsePlan:
        if isinstance(density, Mapping):
            candidates = {p.name: p for p in sparsifiable_weights(model, module_types)}
            unknown = sorted(set(density) - set(candidates))
            if unknown:
                raise ValueError(f"the density map names unknown or non-sparsifiable parameters {unknown}; "
                                 f"sparsifiable weights are {sorted(candidates)}")
            if not density:
                raise ValueError("the density map is empty; give at least one {parameter_name: density}")
            for name, d in density.items():
                check_density(d, f"density of {name}")
            return plan_sparse_params(model, include=[glob_escape(n) for n in density], module_types=module_types)
        check_density(density)
        return plan_sparse_params(model, include=include, exclude=exclude, module_types=module_types,
                                  prune_first_layer=prune_first_layer, prune_last_layer=prune_last_layer,
                                  example_input=example_input)

    def _check_optimizer_holds_params(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p.name for p in self.params if id(p.param) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the sparse weights {missing}; build the optimizer from "
                             "this model's parameters (e.g. torch.optim.SGD(model.parameters(), ...)) before "
                             "creating SparseTraining")

    def _initial_masks(self, masks, device) -> dict[str, torch.Tensor]:
        if masks is None and self.constant_fan_in:
            return {p.name: constant_fan_in_mask(p.shape, self.target_nnz[p.name] // p.shape[p.out_axis],
                                                 self.generator, device, p.out_axis) for p in self.params}
        if masks is None:
            return {p.name: random_mask(p.shape, self.target_nnz[p.name], self.generator, device)
                    for p in self.params}
        unknown = sorted(set(masks) - {p.name for p in self.params})
        if unknown:
            raise ValueError(f"masks given for parameters that are not sparse: {unknown}")
        out = {}
        for p in self.params:
            if p.name not in masks:
                raise ValueError(f"no mask given for sparse weight {p.name!r}")
            m = masks[p.name].to(device=device, dtype=torch.bool)
            if m.shape != p.shape:
                raise ValueError(f"mask for {p.name!r} has shape {tuple(m.shape)}, the weight {tuple(p.shape)}")
            fans = fan_in(m, p.out_axis)
            if self.constant_fan_in and fans.unique().numel() > 1:
                raise ValueError(f"constant_fan_in=True, but the given mask for {p.name!r} has fan-ins from "
                                 f"{int(fans.min())} to {int(fans.max())}; pass masks with one fan-in per "
                                 "layer or constant_fan_in=False")
            out[p.name] = m.clone()
            self.target_nnz[p.name] = int(m.sum())
        return out

    def _resolve_preconditioner_scope(self) -> set[str]:
        if self.preconditioner is None:
            return set()
        return self.preconditioner.layers_in_scope(self.model, self.params, self.example_input)

    def _measure_batchnorm_scales(self) -> BatchNormScales | None:
        """For SparseOpt(factor_source="batchnorm"): hooks on the BatchNorm after each preconditioned layer."""
        if self.preconditioner is None or self.preconditioner.factor_source != "batchnorm":
            return None
        following = self.following_batchnorms()
        alone = sorted(n for n in self._precondition_names if n not in following)
        if alone:
            warnings.warn(f"SparseOpt(factor_source='batchnorm'): no BatchNorm follows {alone}; these layers keep "
                          "c = 1 (use scope='bn_followed' to leave them out of SparseOpt)", stacklevel=3)
        modules = dict(self.model.named_modules())
        return BatchNormScales({n: modules[following[n]] for n in sorted(self._precondition_names) if n in following},
                               self.preconditioner.bn_momentum)

    def _sigmas(self) -> dict[str, torch.Tensor] | None:
        return self._bn_scales.sigmas() if self._bn_scales is not None else None

    def _check_decay_to_precondition(self) -> None:
        """precondition_weight_decay acts on coupled decay only: say so where it cannot act."""
        decoupled = decoupled_groups(self.optimizer)
        if decoupled:
            warnings.warn(f"SparseOpt(precondition_weight_decay=True): parameter groups {decoupled} of "
                          f"{type(self.optimizer).__name__} use decoupled weight decay (W <- (1 - lr*wd) W, as "
                          "AdamW), which never enters the gradient; it is left unpreconditioned", stacklevel=3)
        if not any(g.get("weight_decay", 0) for g in self.optimizer.param_groups):
            warnings.warn("SparseOpt(precondition_weight_decay=True) has no effect: no parameter group of "
                          f"{type(self.optimizer).__name__} has weight_decay > 0", stacklevel=3)

    # ---- mask-dependent caches --------------------------------------------------------------------------------
    def factors(self) -> dict[str, torch.Tensor]:
        """SparseOpt factors per preconditioned layer (empty without a preconditioner)."""
        if self.preconditioner is None or not self._precondition_names:
            return {}
        return self.preconditioner.factors({n: self.masks[n] for n in self._precondition_names}, self._sigmas(),
                                          out_axes=self.out_axes)

    def _refresh_grad_scales(self, changed: set[str] | None = None) -> None:
        """mask * c in the weight's dtype: masking and preconditioning become a single multiply per step.
        Only the layers in ``changed`` (all when None) are recomputed, in place; a global SparseOpt mean couples
        all layers, so it recomputes all."""
        if changed is None or (self.preconditioner is not None and self.preconditioner.mean_scope == "global"):
            changed = {p.name for p in self.params}
        scoped = {n: self.masks[n] for n in self._precondition_names if n in changed or
                  self.preconditioner.mean_scope == "global"}
        factors = self.preconditioner.factors(scoped, self._sigmas(), out_axes=self.out_axes) if scoped else {}
        for p in self.params:
            if p.name not in changed:
                continue
            scale = self._grad_scale.get(p.name)
            if scale is None:
                scale = self._grad_scale[p.name] = torch.empty(p.shape, dtype=p.param.dtype, device=p.param.device)
            scale.copy_(self.masks[p.name])
            if p.name in factors:
                scale.mul_(factors[p.name].to(p.param.dtype))

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _broadcast_masks(self) -> None:
        """Under torch.distributed, rank 0's masks win, so every rank trains the same sparse network."""
        if self._distributed():
            for m in self.masks.values():
                buf = m.to(torch.uint8)
                dist.broadcast(buf, src=0)
                m.copy_(buf.bool())

    def _dense_grad_needed(self) -> bool:
        """Whether the coming optimizer step reads dense weight gradients (a mask update that scores them)."""
        return self.topology.needs_gradient and self.topology.is_update_step(self.step_count)

    # ---- the per-step pipeline ----------------------------------------------------------------------------
    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs):
        restore_weight_decay(self._folded_decay)  # a step that raised last time left it switched off
        self._folded_decay = []
        if self._bn_scales is not None and self._bn_scales.update(self._distributed()):
            self._scales_stale = True
        if self.topology.is_update_step(self.step_count):
            self._update_masks()
            if self.topology.skip_step_on_update:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                return None
        if self._scales_stale:
            self._refresh_grad_scales(changed=set(self._bn_scales.batchnorms))
            self._scales_stale = False
        if self._fold_decay:
            self._folded_decay = fold_coupled_weight_decay_(optimizer)
        reference = self._masked_grad_norm(optimizer) if self.renormalize is not None else None
        for p in self.params:
            if p.param.grad is not None:
                p.param.grad.mul_(self._grad_scale[p.name])
        if reference is not None:
            renormalize_([p.grad for p in self._with_grad(optimizer)], reference, self.renormalize)
        return None

    @staticmethod
    def _with_grad(optimizer) -> list[nn.Parameter]:
        return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _masked_grad_norm(self, optimizer) -> torch.Tensor:
        """τ: global norm over all the optimizer's gradients, sparse ones masked, before SparseOpt scaling."""
        masks = {id(p.param): self.masks[p.name] for p in self.params}
        return global_grad_norm([p.grad * masks[id(p)] if id(p) in masks else p.grad
                                 for p in self._with_grad(optimizer)])

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        restore_weight_decay(self._folded_decay)
        self._folded_decay = []
        for p in self.params:
            p.param.mul_(self.masks[p.name])
        self.step_count += 1

    def _grow_gradients(self) -> dict[str, torch.Tensor | None]:
        grads = {p.name: p.param.grad for p in self.params}
        if self.preconditioner is not None and self.preconditioner.regrow_gradient == "corrected":
            factors = self.factors()
            grads = {n: g * factors[n].to(g.dtype) if (g is not None and n in factors) else g
                     for n, g in grads.items()}
        return grads

    def _update_masks(self) -> None:
        t = self.step_count
        grads = self._grow_gradients() if self.topology.needs_gradient else {}
        distributed = self._distributed()
        old = {n: m.clone() for n, m in self.masks.items()} if distributed else {}
        changes: dict[str, MaskChange] = {}
        for p in self.params:
            # constant fan-in: n per neuron, from its fan-in; otherwise n for the whole layer
            units = p.shape[p.out_axis]
            nnz = self.target_nnz[p.name] // units if self.constant_fan_in else self.target_nnz[p.name]
            n = self.topology.drop_count(t, nnz)
            if n == 0:
                continue
            mask, w, active = self.masks[p.name], p.param.detach(), self._active[p.name]
            drop = self.topology.drop_score(w, active, p.out_axis)
            grow = self.topology.grow_score(w, grads.get(p.name), self.generator, out=self._scratch(w))
            if self.constant_fan_in:
                changes[p.name] = drop_and_grow_per_neuron_(mask, drop, grow, n, active, p.out_axis)
            else:
                changes[p.name] = drop_and_grow_(mask, drop, grow, n, active=active)
        if distributed:
            changes = self._agree_on_changes(old)
        for p in self.params:
            change = changes.get(p.name)
            if change is None:
                self.changed[p.name] = 0
            else:
                self._apply_change(p, change, grads.get(p.name))
        if self.preconditioner is None:
            for name, change in changes.items():  # a mask alone: the cached scale changes where the mask did
                self._grad_scale[name].view(-1).index_fill_(0, change.removed, 0).index_fill_(0, change.added, 1)
        else:
            self._refresh_grad_scales(changed=set(changes))
        if self.execution is not None:
            self.execution.rebuild(self.masks, set(changes))

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """One reusable buffer for grow scores (a fresh 100 MB tensor per layer would page-fault every update)."""
        buf = self._scratch_buf
        if buf is None or buf.numel() < like.numel() or buf.dtype != like.dtype or buf.device != like.device:
            size = max(p.param.numel() for p in self.params)
            buf = self._scratch_buf = torch.empty(size, dtype=like.dtype, device=like.device)
        return buf[:like.numel()].view(like.shape)

    def _agree_on_changes(self, old: dict[str, torch.Tensor]) -> dict[str, MaskChange]:
        """Rank 0's new masks win; the changes are re-derived from them so every rank applies the same ones."""
        self._broadcast_masks()
        agreed = {}
        for p in self.params:
            before, after = old[p.name].view(-1), self.masks[p.name].view(-1)
            removed = (before & ~after).nonzero().squeeze(1)
            added = (after & ~before).nonzero().squeeze(1)
            if removed.numel() or added.numel():
                agreed[p.name] = MaskChange(removed, added, removed[:0])
        self._reset_active()
        return agreed

    def _reset_active(self) -> None:
        """Active flat indices per layer, in index order; later updates keep them current in O(changes)."""
        self._active = {n: m.view(-1).nonzero().squeeze(1) for n, m in self.masks.items()}

    def _apply_change(self, p: SparseParam, change: MaskChange, grad: torch.Tensor | None) -> None:
        """Zero the weights and optimizer state of removed and newly grown entries (grown weights may then get
        the topology's ``grow_init`` values); survivors, including regrown ones, keep both. O(changed entries)."""
        touched = torch.cat([change.removed, change.added])
        flat_w = p.param.view(-1)
        flat_w.index_fill_(0, touched, 0.0)
        values = self.topology.grow_values(p.param, grad, self.masks[p.name], change.added, self.generator)
        if values is not None:
            flat_w.index_copy_(0, change.added, values.to(p.param.dtype))
        for value in self.optimizer.state.get(p.param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.view(-1).index_fill_(0, touched, 0)
        self.fired[p.name].view(-1).index_fill_(0, change.added, True)
        self.changed[p.name] = change.added.numel()
        if change.removed_at.numel() == change.added.numel() > 0:
            self._active[p.name].index_copy_(0, change.removed_at, change.added)

    # ---- inspection and checkpoints --------------------------------------------------------------------------
    def itop(self) -> float:
        """In-time over-parameterisation rate: fraction of all sparse-layer entries ever active (SPEC 4)."""
        return sum(int(f.sum()) for f in self.fired.values()) / sum(f.numel() for f in self.fired.values())

    def density(self) -> float:
        """Fraction of sparse-layer weights that are active (constant: every update keeps each layer's nnz)."""
        return sum(self.target_nnz.values()) / sum(p.param.numel() for p in self.params)

    def following_batchnorms(self) -> dict[str, str]:
        """``{sparse weight name: the BatchNorm module its layer feeds}``, traced once and cached; {} with a
        warning when the model can be neither traced nor probed (no example input)."""
        if self._bn_names is None:
            module_of = {p.name: p.name.rsplit(".", 1)[0] for p in self.params}
            example = self.preconditioner.example_input if self.preconditioner is not None else None
            example = example if example is not None else self.example_input
            try:
                feeds = batchnorm_after(self.model, set(module_of.values()), example)
            except ValueError as err:
                warnings.warn(f"the neuron-health report has no BatchNorm statistics: {err}", stacklevel=3)
                feeds = {}
            self._bn_names = {n: feeds[m] for n, m in module_of.items() if m in feeds}
        return self._bn_names

    def correction_ratio(self) -> float | None:
        """||corrected g|| / ||g|| over all the optimizer's current gradients (the last step's, as SparseOpt left
        them); None without a preconditioner or gradients."""
        if self.preconditioner is None:
            return None
        factors = {id(self._param_of[n]): c for n, c in self.factors().items()}
        return correction_ratio((p.grad, factors.get(id(p))) for p in self._with_grad(self.optimizer))

    def report(self) -> SparsityReport:
        """Per layer: density, ITOP, last changes and neuron health (:func:`sparseopt.health.layer_health`)."""
        modules = dict(self.model.named_modules())
        bns = self.following_batchnorms()
        rows = []
        for p in self.params:
            mask, numel = self.masks[p.name], p.param.numel()
            bn = bns.get(p.name)
            health = layer_health(p.param, mask, modules.get(bn) if bn is not None else None, p.out_axis)
            rows.append(LayerReport(
                name=p.name, shape=tuple(p.shape), numel=numel, target_density=self.target_nnz[p.name] / numel,
                density=int(mask.sum()) / numel, itop=int(self.fired[p.name].sum()) / numel,
                changed=self.changed[p.name], zero_fanin=health["dead"], norm_max=health["norm_max"],
                norm_max_over_median=health["norm_max_over_median"], batchnorm=bn,
                sigma_slope=health["sigma_slope"], gamma_slope=health["gamma_slope"],
                execution="sparse" if self.execution is not None and self.execution.runs_sparse(p.name)
                else "masked", out_axis=p.out_axis))
        return SparsityReport(step=self.step_count, layers=rows, correction_ratio=self.correction_ratio(),
                              dense=dict(self.dense_layers))

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "fired": {n: f.clone() for n, f in self.fired.items()},
            "changed": dict(self.changed),
            "target_nnz": dict(self.target_nnz),
            "active": {n: a.clone() for n, a in self._active.items()},  # their order breaks ties: resume exactly
            "bn_var": self._bn_scales.state_dict() if self._bn_scales is not None else {},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError("not a SparseTraining state dict of version "
                             f"{STATE_VERSION}; it was not saved by this sparseopt version's state_dict()")
        expected = {p.name: p.shape for p in self.params}
        if set(state["masks"]) != set(expected):
            raise ValueError(f"state dict masks {sorted(state['masks'])} do not match this model's sparse "
                             f"weights {sorted(expected)}; build SparseTraining with the same sparse-set options")
        for name, shape in expected.items():
            if state["masks"][name].shape != shape:
                raise ValueError(f"saved mask for {name!r} has shape {tuple(state['masks'][name].shape)}, "
                                 f"the weight has {tuple(shape)}")
        with torch.no_grad():
            for name in expected:
                self.masks[name].copy_(state["masks"][name])
                self.fired[name].copy_(state["fired"][name])
            for p in self.params:
                p.param.mul_(self.masks[p.name])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.changed = dict(state["changed"])
        self.target_nnz = dict(state["target_nnz"])
        self._reset_active()
        if self._bn_scales is not None:
            self._bn_scales.load_state_dict(state.get("bn_var", {}))
        for name, active in state.get("active", {}).items():
            if name in self._active and active.shape == self._active[name].shape:
                self._active[name] = active.to(self._active[name].device).clone()
        self._refresh_grad_scales()
        if self.execution is not None:
            self.execution.rebuild(self.masks)

    def remove(self) -> None:
        """Detach from the optimizer (and restore the layers' own forward): later steps are plain dense steps."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._bn_scales is not None:
            self._bn_scales.remove()
        if self.execution is not None:
            self.execution.remove()

    def __repr__(self) -> str:
        return (f"SparseTraining({len(self.params)} sparse weights, density={self.density():.4f}, "
                f"topology={self.topology!r}, preconditioner={self.preconditioner!r})")
