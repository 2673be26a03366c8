"""Turn a validated RunConfig into data, model, optimizer, scheduler and the sparse-training pipeline."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

import sparseopt as so
from sparseopt.data import build_datasets, dataset_options
from sparseopt.data.registry import DataBundle
from sparseopt.experiments.run import preflight
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.lr_schedule import warmup_cosine_scheduler
from sparseopt.execution.training import ExecutionPolicy
from sparseopt.experiments.config.schema import RunConfig, SparsityConfig
from sparseopt.models import build_model


@dataclass
class Experiment:
    config: RunConfig
    data: DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparse: so.SparseTraining | None
    total_steps: int
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
    return torch.device(name)


def data_settings(cfg: RunConfig) -> dict:
    """The dataset arguments that come from the config's own keys (``data.options`` may not repeat them)."""
    d = cfg.data
    return {"batch_size": d.batch_size, "test_batch_size": d.test_batch_size, "augment": d.augment,
            "download": d.download, "num_workers": d.num_workers, "data_seed": d.data_seed, "seed": cfg.train.seed}


def build_data(cfg: RunConfig) -> DataBundle:
    d = cfg.data
    preflight.check_data_options(cfg, data_settings(cfg))
    accepted = dataset_options(d.name)
    options = {k: v for k, v in data_settings(cfg).items() if k in accepted}
    try:
        return build_datasets(d.name, d.root, **options, **d.options)
    except TypeError as err:  # a value of the wrong kind in data.options (e.g. shape: abc)
        raise UserError(f"data.options {d.options} do not fit data.name {d.name!r}: "
                        f"{(str(err).splitlines() or ['TypeError'])[0]}") from err


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.lr * cfg.data.batch_size / 256 if o.scale_lr_by_batch else o.lr
    if o.name == "sgd":
        if o.nesterov and o.momentum == 0:
            raise UserError("optim.nesterov: true needs optim.momentum above 0 (it is 0); set a momentum such as "
                            "0.9, or nesterov: false")
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    else:
        if len(o.betas) != 2:
            raise UserError(f"optim.betas: got {o.betas}, expected two numbers (beta1, beta2), e.g. [0.9, 0.999]")
        base = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if not o.ham:
        return base
    return so.HAM(base, o.ham_alpha, o.ham_beta, max_weight_norm=o.ham_max_weight_norm)


def _example_inputs(data: DataBundle, device: torch.device) -> torch.Tensor:
    """Two test inputs (as the pre-flight forward pass uses), leaving the test order where it was."""
    x, _ = next(iter(data.test))
    data.test.set_epoch(0)
    return x[:2].to(device)


def initial_masks(cfg: RunConfig, model: nn.Module, data: DataBundle) -> dict[str, torch.Tensor] | None:
    """Pruning-at-initialisation masks (SPEC 5) from the first training batches, or None for random masks."""
    s = cfg.sparsity
    if s.initial_mask == "random":
        return None
    if s.constant_fan_in:
        raise UserError(f"sparsity.constant_fan_in draws its own masks; it cannot start from "
                        f"sparsity.initial_mask={s.initial_mask!r}: set initial_mask to random or constant_fan_in "
                        "to false")
    batches = list(itertools.islice(iter(data.train), s.pai_batches))
    data.train.set_epoch(0)  # scoring must not move the training order
    device = next(model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    return so.prune_at_init(model, s.density, s.initial_mask, data=batches, distribution=s.distribution,
                            scope=s.pai_scope, samples_per_class=s.grasp_samples_per_class, exclude=s.exclude,
                            prune_first_layer=s.prune_first_layer, prune_last_layer=s.prune_last_layer,
                            example_input=batches[0][0][:2] if batches else None)


def execution_policy(s: SparsityConfig) -> ExecutionPolicy | bool:
    """``sparse_execution=`` from ``sparsity.execution`` and its thresholds (None: the library's measured default)."""
    if s.execution == "masked":
        return False
    given = {"max_density": s.execution_max_density, "min_numel": s.execution_min_numel,
             "min_batch": s.execution_min_batch}
    return ExecutionPolicy(**{k: v for k, v in given.items() if v is not None})


def build_sparse(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 total_steps: int, masks: dict[str, torch.Tensor] | None = None,
                 example_input: torch.Tensor | None = None) -> so.SparseTraining | None:
    """``example_input``: a few inputs, for the layer rules of models torch.fx cannot trace (user factories)."""
    s = cfg.sparsity
    if s.method == "dense":
        if cfg.sparseopt.enabled or s.initial_mask != "random":
            raise UserError("sparseopt.enabled and sparsity.initial_mask need a sparse model; set "
                            "sparsity.method to static, set or rigl")
        return None
    if s.method == "static":
        if s.drop_criterion != "magnitude":
            raise UserError(f"sparsity.drop_criterion={s.drop_criterion!r} needs masks that change; set "
                            "sparsity.method to set or rigl, or leave drop_criterion at 'magnitude'")
        topology = so.Static()
    else:
        end_step = int(s.end_fraction * total_steps)  # preflight.check_schedule: start_step < end_step
        cls = so.RigL if s.method == "rigl" else so.SET
        topology = cls(s.update_every, s.drop_fraction, start_step=s.start_step, end_step=end_step,
                       annealing=s.annealing, skip_step_on_update=s.skip_step_on_update, grow_init=s.grow_init,
                       drop_criterion=s.drop_criterion)
    p = cfg.sparseopt
    preconditioner = so.SparseOpt(normalize=p.normalize, scope=p.scope, regrow_gradient=p.regrow_gradient,
                                  max_factor=p.max_factor, precondition_weight_decay=p.precondition_weight_decay,
                                  factor_source=p.factor_source, bn_momentum=p.bn_momentum) if p.enabled else None
    return so.SparseTraining(model, optimizer, s.density, distribution=s.distribution,
                             erk_power_scale=s.erk_power_scale, exclude=s.exclude,
                             prune_first_layer=s.prune_first_layer, prune_last_layer=s.prune_last_layer,
                             topology=topology, preconditioner=preconditioner,
                             init=None if s.init == "none" else s.init, seed=cfg.train.seed, masks=masks,
                             renormalize=None if p.renormalize == "none" else p.renormalize,
                             constant_fan_in=s.constant_fan_in, sparse_execution=execution_policy(s),
                             example_input=example_input)


def build_experiment(cfg: RunConfig) -> Experiment:
    """Everything a run needs, built before anything is written to disk (bad input fails here, cleanly).

    The checks of :mod:`sparseopt.experiments.run.preflight` run as soon as what they need exists: model options
    before the data, the schedule once the epoch length is known, one forward pass once the model is built, and
    the masks once they are drawn."""
    device = resolve_device(cfg.train.device)
    preflight.check_model_options(cfg)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    data.train.to(device)  # batches are made, augmented and normalised on the device
    data.test.to(device)
    total_steps = max(1, math.ceil(cfg.train.epochs * len(data.train)))
    preflight.check_schedule(cfg, len(data.train), total_steps)
    try:
        model = build_model(cfg.model.name, data.num_classes, data.input_shape, **cfg.model.options).to(device)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.name {cfg.model.name!r} cannot be built with model.options {cfg.model.options}: "
                        f"{err}") from err
    preflight.check_model_fits(model, data, cfg, device)
    optimizer = build_optimizer(cfg, model)
    warmup = int(cfg.optim.warmup_epochs * len(data.train))
    peak = optimizer.param_groups[0]["lr"]
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=warmup, total_steps=total_steps, peak_lr=peak,
                                        min_lr=cfg.optim.min_lr)
    try:
        masks = initial_masks(cfg, model, data) if cfg.sparsity.method != "dense" else None
        sparse = build_sparse(cfg, model, optimizer, total_steps, masks, _example_inputs(data, device))
    except ValueError as err:  # the core's checks of the sparse set (exclude patterns, first/last layer rules)
        s = cfg.sparsity
        raise UserError(f"sparsity (method {s.method!r}, density {s.density:g}, initial_mask {s.initial_mask!r}, "
                        f"exclude {s.exclude}) does not fit model.name {cfg.model.name!r}: {err}") from err
    if sparse is not None:
        preflight.check_masks(cfg, model, sparse.masks, data.num_classes)
    return Experiment(cfg, data, model, optimizer, scheduler, sparse, total_steps, device)


def build_callbacks(cfg: RunConfig) -> list:
    """The periodic diagnostics asked for in ``cfg.diagnostics`` (runner callbacks; empty when all are off)."""
    from sparseopt.diagnostics.tracking import HessianTracker, ItopTracker, ScaleTracker

    d = cfg.diagnostics
    callbacks: list = []
    if d.hessian_every > 0:
        callbacks.append(HessianTracker(d.hessian_every, k=d.hessian_k, samples=d.hessian_samples,
                                        physical_batch=d.hessian_physical_batch,
                                        label_smoothing=cfg.optim.label_smoothing, seed=cfg.train.seed))
    if d.scales_every > 0:
        callbacks.append(ScaleTracker(d.scales_every))
    if d.itop_every > 0:
        callbacks.append(ItopTracker(d.itop_every))
    return callbacks
