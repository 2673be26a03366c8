"""SparseTraining: masks, topology updates and preconditioning around the user's own optimizer.

The per-step order of SPEC 10 lives here and only here. The user's loop (``loss.backward(); optimizer.step();
scheduler.step()``, a closure-style ``optimizer.step(closure)``, or a framework's) does not change:

    during backward   grad <- where(mask, grad, 0) * c_row as autograd accumulates it (c_row: per-neuron factors,
                      see :mod:`sparseopt.grad_hooks`), so clipping and logging between backward() and step() see
                      the gradient that will be applied; on a mask-update step a dense copy is summed as well
    once the step's gradient exists (in step(), after the closure if one is given)
                      1. on a mask-update step: drop/grow from the dense gradients, zero new weights and reset
                         their optimizer state, update ITOP, recompute factors; by default skip this step
                      2. [optional renormalize: rescale all grads to the norm τ of the masked, uncorrected ones]
    the user's optimizer step (SGD, Adam, AdamW, LBFGS, ... unchanged)
    after the step    3. weight <- weight * mask (skipped for optimizers that keep zeros, see ZERO_PRESERVING);
                         step counter + 1
"""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from collections.abc import Mapping, Sequence
from glob import escape as glob_escape

import torch
import torch.distributed as dist
from torch import nn

from sparseopt.bits import PackedMasks
from sparseopt.bn_scales import BatchNormScales
from sparseopt.distributions import check_density, layer_nnz
from sparseopt.execution.training import ExecutionPolicy, SparseExecution
from sparseopt.grad_hooks import GradientMasking, scale_grad_
from sparseopt.graph import batchnorm_after
from sparseopt.health import correction_ratio, layer_health
from sparseopt.init import sparse_init_
from sparseopt.masks import (SparseParam, SparsePlan, constant_fan_in_mask, constant_fan_in_nnz, fan_in,
                             plan_sparse_params, random_mask, sparsifiable_weights)
from sparseopt.native.selection import fill_at_
from sparseopt.optim.decay import decoupled_groups, fold_coupled_weight_decay_, restore_weight_decay
from sparseopt.optim.renorm import RENORM_MODES, global_grad_norm, renormalize_
from sparseopt.optim.sparseopt import SparseOpt
from sparseopt.report import LayerReport, SparsityReport
from sparseopt.resume import ConstructionBackup, shaped_state
from sparseopt.selection import MaskChange, drop_and_grow_, drop_and_grow_per_neuron_
from sparseopt.topology.base import Static, Topology
from sparseopt.wrappers import canonical_name, match_names, unwrap_optimizer

STATE_VERSION = 1

#: Optimizers (exact classes: a subclass may change the update) whose step leaves an entry at 0 when its weight,
#: gradient and per-entry state are 0: weight decay is proportional to the weight and every state a running function
#: of the gradient. Inactive entries hold exactly that (masked gradients, state zeroed at every mask change), so
#: for them the weights need no re-masking after each step, a full pass over every sparse weight that costs
#: 1-2 % of a small model's step (benchmarks/README). Weights written outside the step (their version counter
#: moved), or optimizer state loaded, are re-masked at the next step; every ZERO_CHECK_EVERY steps the inactive
#: weights are checked, and if any moved a warning names them and re-masking after every step resumes.
ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                   torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad)
ZERO_CHECK_EVERY = 10

#: id(weight) -> the SparseTraining that masks it; two at once would mask and precondition its gradient twice
_OWNERS: dict[int, weakref.ref] = {}
_log = logging.getLogger("sparseopt")


class SparseTraining:
    """Sparsify ``model`` and keep it sparse while ``optimizer`` trains it.

    Args:
        model: any ``nn.Module`` (DDP-wrapped or ``torch.compile``-d too).
        optimizer: any ``torch.optim.Optimizer`` holding the model's sparse weights (a wrapper holding one as
            ``.optimizer``, like accelerate's ``AcceleratedOptimizer``, is unwrapped). Several optimizers on one
            model get one SparseTraining each, their sparse sets split with ``include``/``exclude``.
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
        sparse_execution: ``True`` (or an :class:`~sparseopt.execution.training.ExecutionPolicy`) trains sparse
            ``nn.Linear`` layers as truly sparse: the optimizer holds each one's active values (``weight_values``,
            shape ``(nnz,)``) in place of its weight, and the forward, the input gradient and the active entries'
            weight gradient are CSR products; the dense weight gradient only on steps where the topology reads it.
            The dense weight is mirrored after every step and checkpoints keep the masked-dense format. Layers
            below the measured break-even, not exactly ``nn.Linear``, on a GPU or tied stay masked-dense (a
            warning names them; ``report()`` says which run sparse); DDP and autocast are refused. Results equal
            the masked-dense path up to float rounding for element-wise optimizers.
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
        optimizer = unwrap_optimizer(optimizer)
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
        self.fired = PackedMasks(self.masks)
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
        self._row_factors: dict[str, torch.Tensor] = {}
        self._row_scale: dict[str, torch.Tensor] = {}  # _row_factors in the weight's dtype: what gradients are scaled by
        self._scratch_buf: torch.Tensor | None = None
        self._gradients: GradientMasking | None = None  # built once construction's masks and factors are final
        self._refresh_grad_scales()
        self._canonical = {p.name: canonical_name(model, p.name) for p in self.params}
        # Until the first step, keep what construction overwrites: state loaded before construction survives a
        # later load_state_dict (resume in any order, see sparseopt.resume).
        self._claim_params()
        self._backup: ConstructionBackup | None = ConstructionBackup(self.params, optimizer)
        with torch.no_grad():
            for p in self.params:
                if init is not None:
                    sparse_init_(p.param, self.masks[p.name], init, out_axis=p.layout.out_axis,
                                 in_axis=p.layout.in_axis, gain=init_gain, generator=self.generator)
                p.param.mul_(self.masks[p.name])
                # Inactive entries hold 0 in weights and optimizer state from here on, which lets mask updates
                # touch only the entries that change.
                for value in shaped_state(optimizer, p).values():
                    value.mul_(self.masks[p.name])
        self._backup.seal(self.params, optimizer)
        self._own_versions = self._weight_versions()
        self._unverified_load: dict[str, int] = {}
        self._remask_each_step = type(optimizer) not in ZERO_PRESERVING
        self._state_loaded = False  # optimizer state was loaded: mask it (and the weights) at the next step
        self._closure_calls: list[int] | None = None
        self._gradients = GradientMasking(self.params, self.masks, self._row_scale)
        self._gradients.collect_dense = self._dense_grad_needed()
        self.execution = None
        if sparse_execution:
            self._check_execution_is_local(model)
            policy = sparse_execution if isinstance(sparse_execution, ExecutionPolicy) else ExecutionPolicy()
            self.execution = SparseExecution(model, self.params, self.masks, policy, optimizer, self._dense_grad_needed,
                                             self._row_scale, self._collect_dense)
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step),
                       optimizer.register_load_state_dict_post_hook(self._after_optimizer_load)]

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
            plan = plan_sparse_params(model, include=[glob_escape(n) for n in density], module_types=module_types)
            return SparsePlan(plan.sparse, {n: "not in the density map" if why == "not matched by include" else why
                                            for n, why in plan.dense.items()})
        check_density(density)
        return plan_sparse_params(model, include=include, exclude=exclude, module_types=module_types,
                                  prune_first_layer=prune_first_layer, prune_last_layer=prune_last_layer,
                                  example_input=example_input)

    def _claim_params(self) -> None:
        taken = self._owned_elsewhere()
        if taken:
            gc.collect()  # a discarded SparseTraining (its optimizer gone too) may only wait for the collector
            taken = self._owned_elsewhere()
        if taken:
            raise ValueError(f"the weights {taken} are already sparsified by another SparseTraining; call its "
                             "remove() first, or split the sparse set between them with include=/exclude=")
        for p in self.params:
            _OWNERS[id(p.param)] = weakref.ref(self)

    def _owned_elsewhere(self) -> list[str]:
        taken = []
        for p in self.params:
            owner = _OWNERS.get(id(p.param))
            other = owner() if owner is not None else None
            if other is not None and other is not self and getattr(other, "_hooks", None) and any(q.param is p.param
                                                                                   for q in other.params):
                taken.append(p.name)
        return taken

    def _check_execution_is_local(self, model: nn.Module) -> None:
        """Sparse-run layers train (nnz,) values that DDP does not know: refuse rather than train unsynchronised."""
        if self._distributed() or isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise ValueError("sparse_execution=True trains each sparse Linear's active values as a separate "
                             "parameter, which DistributedDataParallel/DataParallel would not synchronise; use "
                             "sparse_execution=False (masked-dense) for multi-process training")

    def _collect_dense(self, name: str, values: torch.Tensor, grad: torch.Tensor) -> None:
        """A sparse-run layer's dense weight gradient on a mask-update step, summed as the gradient hooks do."""
        self._gradients._add_dense(name, values, grad)
        self._gradients.arrived.add(name)

    def _check_optimizer_holds_params(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p.name for p in self.params if id(p.param) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the sparse weights {missing}; if they are frozen or "
                             f"trained by another optimizer, leave them out with exclude={missing}; otherwise build "
                             "the optimizer from this model's parameters (e.g. torch.optim.SGD(model.parameters(), "
                             "...)) before creating SparseTraining")

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
        """Per-neuron factors c in the weight's dtype, shaped to broadcast along the output axis: the gradient
        scale is ``where(mask, grad, 0) * c``, with no per-weight float tensor. Only the layers in ``changed`` (all
        when None) are recomputed; a global SparseOpt mean couples all layers, so it recomputes all."""
        if changed is None or (self.preconditioner is not None and self.preconditioner.mean_scope == "global"):
            changed = {p.name for p in self.params}
        scoped = {n: self.masks[n] for n in self._precondition_names if n in changed or
                  self.preconditioner.mean_scope == "global"}
        factors = self.preconditioner.factors(scoped, self._sigmas(), out_axes=self.out_axes) if scoped else {}
        self._row_factors.update(factors)
        for p in self.params:
            if p.name in factors:
                self._row_scale[p.name] = factors[p.name].to(device=p.param.device, dtype=p.param.dtype)
        if factors and self._gradients is not None:
            self._gradients.rows_changed()

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
    def _weight_versions(self) -> dict[str, int]:
        return {p.name: p.param._version for p in self.params}

    def _before_step(self, optimizer, args, kwargs):
        """Runs first in ``optimizer.step()``. A closure computes the gradient later, inside the step: wrap it so
        the gradient work runs right after it (every call: LBFGS evaluates it several times per step)."""
        if self._folded_decay:  # a step that raised last time left it switched off
            restore_weight_decay(self._folded_decay)
            self._folded_decay = []
        if self._unverified_load:
            self._check_loaded_weights()
        self._backup = None  # training starts: from now on construction's changes are final
        if self.execution is not None:
            self.execution.engage()
            self.execution.before_step()
        if not self._remask_each_step:
            self._remask_written()
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer itself
        if closure is None:
            self._prepare_gradients(optimizer, first=True)
            return None
        calls = self._closure_calls = [0]

        def closure_then_prepare():
            loss = closure()
            self._prepare_gradients(optimizer, first=calls[0] == 0)
            calls[0] += 1
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_prepare}
        return (args[0], closure_then_prepare, *args[2:]), kwargs

    def _prepare_gradients(self, optimizer, first: bool) -> None:
        """The gradient of this step exists: a ``.grad`` set by hand (not by backward) is masked here as the
        hooks would have; then the mask update (once per step) and renormalisation. An ordinary step of a plain
        setup has none of it to do and returns before entering no_grad (this runs every step)."""
        collect = self._gradients.collect_dense
        dense, by_hand = self._gradients.consume()
        if not (by_hand or (first and (self._bn_scales is not None or self.topology.is_update_step(self.step_count)))
                or self._scales_stale or self._fold_decay or self.renormalize is not None):
            return
        with torch.no_grad():
            self._transform_gradients(optimizer, first, collect, dense, by_hand)

    def _transform_gradients(self, optimizer, first: bool, collect: bool, dense: dict[str, torch.Tensor],
                             by_hand: list[SparseParam]) -> None:
        for p in by_hand:
            if collect:
                dense[p.name] = p.param.grad.clone()
            scale_grad_(p.param.grad, self.masks[p.name], self._row_scale.get(p.name))
        # BatchNorm-measured factors follow the forward of this step (inside the closure, if there is one)
        if first and self._bn_scales is not None and self._bn_scales.update(self._distributed()):
            self._scales_stale = True
        if first and self.topology.is_update_step(self.step_count):
            self._gradients.collect_dense = False
            old_factors = dict(self._row_factors)
            self._update_masks(dense)
            if self.topology.skip_step_on_update:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                return
            self._follow_new_scales(old_factors, masks_changed=True)
        if self._scales_stale:
            old_factors = dict(self._row_factors)
            self._refresh_grad_scales(changed=set(self._bn_scales.batchnorms))
            self._follow_new_scales(old_factors, masks_changed=False)
            self._scales_stale = False
        if self._fold_decay:
            restore_weight_decay(self._folded_decay)  # a closure evaluated again: fold its gradient's decay too
            self._folded_decay = fold_coupled_weight_decay_(optimizer, scales={
                id(self._trained(p)): (None if self._trained(p) is not p.param else self.masks[p.name],
                                       None if (row := self._row_scale.get(p.name)) is None
                                       else self._per_entry(p, row)) for p in self.params})
        if self.renormalize is not None:
            reference = self._masked_grad_norm(optimizer)
            renormalize_([p.grad for p in self._with_grad(optimizer)], reference, self.renormalize)

    def _follow_new_scales(self, old_factors: Mapping[str, torch.Tensor], masks_changed: bool) -> None:
        """The gradient was scaled as backward accumulated it; when masks or factors change inside step() (a
        mask update that is not skipped, BatchNorm-measured factors), apply the gradient the loop saw (clipped,
        maybe) restricted to the new masks and rescaled row by row to the new factors. Newly grown weights get
        their first gradient at the next step."""
        for p in self.params:
            values = self.execution.values_of(p.name) if self.execution is not None else None
            g = p.param.grad if values is None else values.grad  # a sparse-run layer's follows its mask already
            if g is None:
                continue
            if masks_changed and values is None:
                g.mul_(self.masks[p.name])
            old, new = old_factors.get(p.name), self._row_factors.get(p.name)
            if old is not None and new is not None and new is not old:
                ratio = torch.where(old > 0, new / old, torch.zeros_like(new)).to(g.dtype)
                g.mul_(ratio if values is None else self.execution.per_value(p.name, ratio))

    def _trained(self, p: SparseParam) -> torch.Tensor:
        """What the optimizer trains for ``p``: the weight, or a sparse-run layer's active values."""
        values = self.execution.values_of(p.name) if self.execution is not None else None
        return p.param if values is None else values

    def _per_entry(self, p: SparseParam, row: torch.Tensor) -> torch.Tensor:
        """A per-neuron vector as it broadcasts over what the optimizer trains for ``p``."""
        values = self.execution.values_of(p.name) if self.execution is not None else None
        return row if values is None else self.execution.per_value(p.name, row)

    @staticmethod
    def _with_grad(optimizer) -> list[nn.Parameter]:
        return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _masked_grad_norm(self, optimizer) -> torch.Tensor:
        """τ: global norm over all the optimizer's gradients, sparse ones masked, before SparseOpt scaling (the
        gradients hold where(mask, g, 0) * c by now: divide the factor out again)."""
        inverse = {id(t): self._per_entry(p, torch.where(c > 0, 1 / c, torch.zeros_like(c)).to(p.param.dtype))
                   for p in self.params if (c := self._row_factors.get(p.name)) is not None
                   for t in [self._trained(p)]}
        return global_grad_norm([p.grad * inverse[id(p)] if id(p) in inverse else p.grad
                                 for p in self._with_grad(optimizer)])

    def _after_step(self, optimizer, args, kwargs) -> None:
        """Runs last in ``optimizer.step()``; an ordinary step enters no ``no_grad`` (this runs every step)."""
        if self._closure_calls is not None and self._closure_calls[0] == 0:
            warnings.warn(f"{type(optimizer).__name__}.step(closure) never called the closure at step "
                          f"{self.step_count}: the gradient was neither masked nor preconditioned by SparseTraining",
                          stacklevel=2)
        self._closure_calls = None
        if self._folded_decay:
            restore_weight_decay(self._folded_decay)
            self._folded_decay = []
        if self.execution is not None:
            with torch.no_grad():
                self.execution.after_step()
        if self._remask_each_step:
            with torch.no_grad():
                self._remask_weights()
        elif self.step_count % ZERO_CHECK_EVERY == 0:
            with torch.no_grad():
                self._check_zeros_kept(optimizer)
        self.step_count += 1
        self._own_versions = self._weight_versions()
        self._gradients.collect_dense = self._dense_grad_needed()
        self._gradients.attach()

    def _masked_dense(self) -> list[SparseParam]:
        """The weights kept sparse by masking (a sparse-run layer's weight is zero off its mask by construction)."""
        if self.execution is None:
            return self.params
        return [p for p in self.params if not self.execution.runs_sparse(p.name)]

    def _remask_weights(self) -> None:
        """Zero the inactive weights again after the optimizer step (an optimizer may move them: decay, noise)."""
        for p in self._masked_dense():
            scale_grad_(p.param, self.masks[p.name])  # where(), computed on the bits: no float copy of the mask

    def _remask_written(self) -> None:
        """Where the weights are not re-masked after each step: re-mask those written since the last step (a
        load, a user's edit) and, after an optimizer state load, that state too."""
        versions = self._own_versions
        written = [p for p in self._masked_dense() if self._state_loaded or p.param._version != versions[p.name]]
        if not written:
            return
        with torch.no_grad():
            for p in written:
                if self._state_loaded:
                    for value in shaped_state(self.optimizer, p).values():
                        scale_grad_(value, self.masks[p.name])
                scale_grad_(p.param, self.masks[p.name])
        self._state_loaded = False

    def _after_optimizer_load(self, optimizer) -> None:
        self._state_loaded = True  # masked at the next step, once SparseTraining's own state may be loaded too

    def _check_zeros_kept(self, optimizer) -> None:
        """The safety net of ZERO_PRESERVING: did this optimizer's step move an inactive weight after all?"""
        moved = [p.name for p in self._masked_dense() if bool(p.param.masked_select(~self.masks[p.name]).any())]
        if moved:
            warnings.warn(f"{type(optimizer).__name__}.step() moved inactive (masked) weights of {moved} at step "
                          f"{self.step_count}, which its update rule should leave at 0; SparseTraining re-masks the "
                          "weights after every step from now on", RuntimeWarning, stacklevel=3)
            self._remask_each_step = True
            self._remask_weights()

    def _grow_gradients(self, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The original dense gradients (averaged over ranks), or the SparseOpt-corrected ones if configured."""
        grads = self._average_over_ranks(dense) if self._distributed() else dense
        missing = [p.name for p in self.params if p.name not in grads]
        if len(missing) == len(self.params):
            raise RuntimeError(
                f"{type(self.topology).__name__} needs the dense gradient at a mask-update step, but no sparse "
                "weight has a gradient; call loss.backward() (or pass a closure that does) before optimizer.step()")
        if missing:
            warnings.warn(f"mask update at step {self.step_count}: the sparse weights {missing} have no gradient "
                          "(not used in this step's forward?); their masks stay as they are at this update",
                          stacklevel=4)
        if self.preconditioner is not None and self.preconditioner.regrow_gradient == "corrected":
            factors = self.factors()
            grads = {n: g * factors[n].to(g.dtype) if n in factors else g for n, g in grads.items()}
        return grads

    def _average_over_ranks(self, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The hooks saw each rank's local gradient; RigL grows from the global one (what DDP's .grad holds)."""
        device = self.params[0].param.device
        present = torch.tensor([p.name in dense for p in self.params], dtype=torch.int32, device=device)
        dist.all_reduce(present)
        out, world = {}, dist.get_world_size()
        for p, count in zip(self.params, present.tolist()):
            if count:
                g = dense.get(p.name)
                g = torch.zeros_like(p.param) if g is None else g
                dist.all_reduce(g)
                out[p.name] = g.div_(world)
        return out

    def _update_masks(self, dense: dict[str, torch.Tensor]) -> None:
        t = self.step_count
        grads = self._grow_gradients(dense) if self.topology.needs_gradient else {}
        distributed = self._distributed()
        old = {n: m.clone() for n, m in self.masks.items()} if distributed else {}
        changes: dict[str, MaskChange] = {}
        for p in self.params:
            # constant fan-in: n per neuron, from its fan-in; otherwise n for the whole layer
            units = p.shape[p.out_axis]
            nnz = self.target_nnz[p.name] // units if self.constant_fan_in else self.target_nnz[p.name]
            n = self.topology.drop_count(t, nnz)
            if n == 0 or (self.topology.needs_gradient and p.name not in grads):
                continue
            mask, w, active = self.masks[p.name], p.param.detach(), self._active[p.name]
            drop = self.topology.drop_score(w, active, p.out_axis)
            score_buf, work = self._scratch(w)
            if self.constant_fan_in:   # this selection overwrites its grow scores: a full-size score tensor
                grow = self.topology.grow_score(w, grads.get(p.name), self.generator, out=score_buf)
                changes[p.name] = drop_and_grow_per_neuron_(mask, drop, grow, n, active, p.out_axis)
            else:
                grow, absolute = self.topology.grow_scores(w, grads.get(p.name), self.generator, out=score_buf)
                changes[p.name] = drop_and_grow_(mask, drop, grow, n, active=active, work=work,
                                                 grow_absolute=absolute)
        if distributed:
            changes = self._agree_on_changes(old)
        for p in self.params:
            change = changes.get(p.name)
            if change is None:
                self.changed[p.name] = 0
            else:
                self._apply_change(p, change, grads.get(p.name))
        if self.preconditioner is not None:  # without one the scales are the masks themselves
            self._refresh_grad_scales(changed=set(changes))
        self._scratch_buf = None  # held only during an update: it would be 8 bytes per weight of the largest layer
        if self.execution is not None:
            self.execution.rebuild(self.masks, set(changes))

    def _scratch(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two buffers shaped like ``like`` for all layers of an update (fresh ones per layer would page-fault every
        layer): the grow scores, and the selection's flat work space; freed after the update."""
        buf = self._scratch_buf
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            size = max(p.param.numel() for p in self.params)
            buf = self._scratch_buf = torch.empty(2 * size, dtype=like.dtype, device=like.device)
        half = buf.numel() // 2
        return buf[:like.numel()].view(like.shape), buf[half:half + like.numel()]

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
        fill_at_(flat_w, touched, 0.0)
        values = self.topology.grow_values(p.param, grad, self.masks[p.name], change.added, self.generator)
        if values is not None:
            flat_w.index_copy_(0, change.added, values.to(p.param.dtype))
        for value in self.optimizer.state.get(p.param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                fill_at_(value.view(-1), touched, 0)
        self.fired.merge_(p.name, self.masks[p.name])
        self.changed[p.name] = change.added.numel()
        if change.removed_at.numel() == change.added.numel() > 0:
            self._active[p.name].index_copy_(0, change.removed_at, change.added)

    # ---- inspection and checkpoints --------------------------------------------------------------------------
    def itop(self) -> float:
        """In-time over-parameterisation rate: fraction of all sparse-layer entries ever active (SPEC 4)."""
        return sum(self.fired.count(n) for n in self.fired) / sum(p.param.numel() for p in self.params)

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
        by_name = self.factors()
        factors = {id(self._trained(p)): self._per_entry(p, by_name[p.name]) for p in self.params
                   if p.name in by_name}
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
                density=int(mask.sum()) / numel, itop=self.fired.count(p.name) / numel,
                changed=self.changed[p.name], zero_fanin=health["dead"], norm_max=health["norm_max"],
                norm_max_over_median=health["norm_max_over_median"], batchnorm=bn,
                sigma_slope=health["sigma_slope"], gamma_slope=health["gamma_slope"],
                execution="sparse" if self.execution is not None and self.execution.runs_sparse(p.name)
                else "masked", out_axis=p.out_axis))
        return SparsityReport(step=self.step_count, layers=rows, correction_ratio=self.correction_ratio(),
                              dense=dict(self.dense_layers))

    def state_dict(self) -> dict:
        """The sparse state, keyed by wrapper-independent names (no DDP ``module.``, no ``_orig_mod.``)."""
        c = self._canonical
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "masks": {c[n]: m.clone() for n, m in self.masks.items()},
            "fired": {c[n]: f for n, f in self.fired.items()},  # unpacked copies: the format stays bool
            "changed": {c[n]: v for n, v in self.changed.items()},
            "target_nnz": {c[n]: v for n, v in self.target_nnz.items()},
            # their order breaks ties: resume exactly
            "active": {c[n]: a.clone() for n, a in self._active.items()},
            "bn_var": {c[n]: v for n, v in self._bn_scales.state_dict().items()} if self._bn_scales is not None
            else {},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue a saved run. Before the first step it does not matter whether the model's and optimizer's
        state were loaded before or after building SparseTraining (construction's changes are undone first);
        after training started, load them too, before or after this call."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError("not a SparseTraining state dict of version "
                             f"{STATE_VERSION}; it was not saved by this sparseopt version's state_dict()")
        saved_name = match_names(state["masks"], self._canonical.values())
        key = {p.name: saved_name[self._canonical[p.name]] for p in self.params}
        for p in self.params:
            saved_shape = tuple(state["masks"][key[p.name]].shape)
            if saved_shape != tuple(p.shape):
                raise ValueError(f"saved mask for {p.name!r} has shape {saved_shape}, the weight has "
                                 f"{tuple(p.shape)}")
        with torch.no_grad():
            if self._backup is not None:
                if self.execution is not None:  # give the optimizer its weights back, as construction left it
                    self.execution.disengage()
                self._backup.restore(self.params, self.optimizer)
                self._backup = None
            else:
                self._expect_reloaded_weights({p.name: state["masks"][key[p.name]] for p in self.params})
            for p in self.params:
                self.masks[p.name].copy_(state["masks"][key[p.name]])
                self.fired.load(p.name, state["fired"][key[p.name]].bool())
                p.param.mul_(self.masks[p.name])
                for value in shaped_state(self.optimizer, p).values():
                    value.mul_(self.masks[p.name])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.changed = {p.name: state["changed"][key[p.name]] for p in self.params}
        self.target_nnz = {p.name: state["target_nnz"][key[p.name]] for p in self.params}
        self._reset_active()
        if self._bn_scales is not None:
            saved_var = state.get("bn_var", {})
            self._bn_scales.load_state_dict({p.name: saved_var[key[p.name]] for p in self.params
                                             if key[p.name] in saved_var})
        for p in self.params:
            active = state.get("active", {}).get(key[p.name])
            if active is not None and active.shape == self._active[p.name].shape:
                self._active[p.name] = active.to(self._active[p.name].device).clone()
        self._refresh_grad_scales()
        if self.execution is not None:
            self.execution.rebuild(self.masks)
        self._gradients.consume()
        self._gradients.collect_dense = self._dense_grad_needed()
        self._own_versions = self._weight_versions()
        self._unverified_load = {n: v for n, v in self._own_versions.items() if n in self._unverified_load}

    def _expect_reloaded_weights(self, saved_masks: Mapping[str, torch.Tensor]) -> None:
        """After training started, weights that the saved masks keep active but this run's masks had zeroed are
        gone unless the model's state is loaded too. Whether it is can only be known at the next step."""
        self._unverified_load = {}
        for p in self.params:
            revived = saved_masks[p.name].to(self.masks[p.name].device) & ~self.masks[p.name]
            if p.param._version == self._own_versions[p.name] and bool(revived.any()):
                self._unverified_load[p.name] = -1

    def _check_loaded_weights(self) -> None:
        stale = [n for p in self.params if (n := p.name) in self._unverified_load
                 and p.param._version == self._unverified_load[n]]
        self._unverified_load = {}
        if stale:
            raise RuntimeError(
                f"SparseTraining.load_state_dict() was called after training had started, and the weights {stale} "
                "were not reloaded: entries the loaded masks keep active were zeroed by this run's masks and are "
                "lost. Load the model's (and optimizer's) state_dict too, before or after "
                "SparseTraining.load_state_dict(), or load all state before the first optimizer.step()")

    def remove(self) -> None:
        """Detach from the optimizer and from autograd (and restore the layers' own forward): later steps are
        plain dense steps."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._gradients.remove()
        for p in self.params:
            if (owner := _OWNERS.get(id(p.param))) is not None and owner() is self:
                del _OWNERS[id(p.param)]
        if self._bn_scales is not None:
            self._bn_scales.remove()
        if self.execution is not None:
            self.execution.remove()

    def __repr__(self) -> str:
        return (f"SparseTraining({len(self.params)} sparse weights, density={self.density():.4f}, "
                f"topology={self.topology!r}, preconditioner={self.preconditioner!r})")
