"""Everything about a run that can be checked before training, checked before training.

Each check takes seconds at most and runs before the run folder is created, so a mistake costs one clear line
instead of a half-written folder, an hour of compute, or -- worse -- a run that trains something other than what
the config says (a RigL schedule that never updates, an output layer without weights).
"""

from __future__ import annotations

import difflib
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from sparseopt.data.registry import DataBundle
from sparseopt.experiments.config.load import ConfigError
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.config.schema import RunConfig
from sparseopt.masks import fan_in, select_sparse_params
from sparseopt.models.registry import DATA_ARGUMENTS, model_options


class ConfigWarning(UserWarning):
    """A setting that is allowed but probably not what was meant (the CLI prints it as one ``warning:`` line)."""


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that cannot be created and written, before any data or model is built."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is a file, not a folder; choose another --out")
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output folder {out} cannot be created: {existing} is a file; choose another --out")
    try:  # the only reliable test (root, read-only mounts, /proc): create a folder there and remove it again
        os.rmdir(tempfile.mkdtemp(prefix=".sparseopt-write-test-", dir=existing))
    except OSError as err:
        raise UserError(f"output folder {out} cannot be created or written ({err.strerror} in {existing}); "
                        "choose another --out") from None


def check_model_options(cfg: RunConfig) -> None:
    """``model.options`` against the model's signature: unknown names get a suggestion, like top-level keys."""
    name, options = cfg.model.name, cfg.model.options
    try:
        accepted = model_options(name)
    except ValueError as err:
        raise UserError(f"model.name: {err}") from None
    errors = []
    for key in options:
        if key in DATA_ARGUMENTS:
            synthetic = "data.options.num_classes" if key == "num_classes" else "data.options.shape"
            source = synthetic if cfg.data.name == "synthetic" else f"data.name {cfg.data.name!r}"
            errors.append(f"model.options.{key}: set from the data ({source}), not from model.options; remove it")
        elif accepted is not None and key not in accepted:
            close = difflib.get_close_matches(str(key), list(accepted), n=1)
            hint = (f"did you mean 'model.options.{close[0]}'?" if close else
                    f"model {name!r} takes: {', '.join(accepted) or 'no options'}")
            errors.append(f"unknown key 'model.options.{key}' ({hint})")
    if accepted is not None:
        errors += [f"missing required key 'model.options.{n}' (model {name!r} has no default for it)"
                   for n, p in accepted.items() if p.default is p.empty and n not in options]
    if errors:
        raise ConfigError(errors)


def check_data_options(cfg: RunConfig, from_keys: dict) -> None:
    """``data.options`` against what the dataset takes, with suggestions; a setting with its own key (batch size,
    seeds) may not be given again here, where it would silently win over that key."""
    from sparseopt.data import dataset_options

    accepted = [k for k in dataset_options(cfg.data.name) if k not in from_keys]
    errors = []
    for key in cfg.data.options:
        if key in from_keys:
            own = "train.seed" if key == "seed" else f"data.{key}"
            errors.append(f"data.options.{key}: set it with {own}, not in data.options")
        elif key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = (f"did you mean 'data.options.{close[0]}'?" if close else
                    f"data.name {cfg.data.name!r} takes: {', '.join(accepted) or 'no options'}")
            errors.append(f"unknown key 'data.options.{key}' ({hint})")
    if errors:
        raise ConfigError(errors)


def check_model_fits(model: nn.Module, data: DataBundle, cfg: RunConfig, device: torch.device) -> None:
    """One forward pass on two test examples: the model must take the data's input and give one logit per class.

    Runs in eval mode without gradients and with the random state saved and restored, so training is unchanged.
    """
    x, _ = next(iter(data.test))
    data.test.set_epoch(0)
    x = x[:2].to(device)
    what = f"model.name {cfg.model.name!r} (model.options {cfg.model.options})"
    where = f"data.name {cfg.data.name!r} (inputs of shape {tuple(data.input_shape)}, {data.num_classes} classes)"
    if x[0].numel() == 0:
        raise UserError(f"{where} has inputs with no values; give every input dimension a size of at least 1")
    empty = [f"'{n}' ({'x'.join(map(str, p.shape))})" for n, p in model.named_parameters()
             if p.dim() >= 2 and p.numel() == 0]
    if empty:
        raise UserError(f"{what} has layers without weights: {', '.join(empty)}; give every layer a width of at "
                        "least 1")
    was_training = model.training
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    per_example: dict[str, int] = {}  # BatchNorm name -> values per channel contributed by one example
    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left as it is
            per_example.setdefault(name, math.prod(args[0].shape[2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what} cannot take the inputs of {where}: {first}; choose a model for this data "
                        "(mlp for any shape, cnn/resnet for images)") from err
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    _check_batchnorm_batches(per_example, data, cfg)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{what} outputs {shape} for a batch of {len(x)}, but {where} needs ({len(x)}, "
                        f"{data.num_classes}): one logit per class; the class count comes from the data")


def _check_batchnorm_batches(per_example: dict[str, int], data: DataBundle, cfg: RunConfig) -> None:
    """BatchNorm cannot train on a batch holding one value per channel (torch raises mid-epoch, after the run
    folder exists); a last batch of one example is the usual way to get there."""
    loader = data.train
    n, size = getattr(loader, "n", None), getattr(loader, "batch_size", None)
    if not per_example or n is None or size is None:
        return
    sizes = {size} | ({n % size} if n % size and not getattr(loader, "drop_last", False) else set())
    for name, values in per_example.items():
        for b in sorted(sizes):
            if b * values == 1:
                bn = f"BatchNorm '{name}' of model.name {cfg.model.name!r} cannot train on a single value per channel"
                if b == size:
                    raise UserError(f"data.batch_size {size}: {bn}; use a batch size of at least 2")
                raise UserError(f"the last batch of each epoch ({n} training examples, data.batch_size {size}) holds "
                                f"1 example, and {bn}; use another data.batch_size, or data.options.drop_last: true "
                                "to skip the short batch")


def check_execution(cfg: RunConfig, world: int) -> None:
    """What ``sparsity.execution: sparse`` cannot run with, one line per conflict naming both keys; first of all
    checks, so a torchrun rank refuses before it joins the process group and no run leaves output behind."""
    if cfg.sparsity.execution != "sparse":
        return
    ours, fix = "sparsity.execution 'sparse'", "or set sparsity.execution: masked"
    errors = []
    if cfg.sparsity.method == "dense":
        errors.append(f"{ours} needs sparse layers and sparsity.method 'dense' has none: set sparsity.execution: "
                      "masked, or sparsity.method: static, set or rigl")
    if world > 1:
        errors.append(f"{ours} does not combine with torchrun (WORLD_SIZE {world}): each sparse-run layer trains its "
                      "active values as a parameter DistributedDataParallel does not synchronise; run one process, "
                      f"{fix}")
    if cfg.train.precision != "fp32":
        errors.append(f"{ours} does not combine with train.precision {cfg.train.precision!r}: the CSR kernels have no "
                      "bfloat16/float16 version (torch's MKL CSR product refuses them), so a sparse-run layer would "
                      f"fail on a reduced-precision input or ignore autocast; set train.precision: fp32, {fix}")
    if cfg.diagnostics.hessian_every > 0:
        errors.append(f"{ours} does not combine with diagnostics.hessian_every {cfg.diagnostics.hessian_every}: "
                      "Hessian-vector products differentiate twice through the weights and a sparse-run layer's "
                      "CSR kernels have no second derivative; set diagnostics.hessian_every: 0 (`sparseopt diagnose "
                      f"hessian RUN_DIR` measures the run's checkpoints afterwards), {fix}")
    if errors:
        raise ConfigError(errors)


def check_schedule(cfg: RunConfig, steps_per_epoch: int, total_steps: int) -> None:
    """Refuse schedule values that would quietly turn the method into another one (or switch a setting off)."""
    s, o, t = cfg.sparsity, cfg.optim, cfg.train
    run = f"{total_steps} steps (train.epochs {t.epochs:g} x {steps_per_epoch} batches)"
    if s.method in ("set", "rigl"):
        end_step = int(s.end_fraction * total_steps)
        if s.start_step >= end_step:
            raise UserError(
                f"sparsity.start_step {s.start_step} is not before the last mask update at step {end_step} "
                f"(sparsity.end_fraction {s.end_fraction:g} of {run}): method {s.method!r} would never update a "
                "mask, i.e. train as 'static'; lower sparsity.start_step, raise sparsity.end_fraction or "
                "train.epochs, or say sparsity.method: static")
        if s.drop_fraction == 0:
            raise UserError(f"sparsity.drop_fraction 0 never changes a mask: method {s.method!r} would train as "
                            "'static'; use a drop_fraction in (0, 1] (RigL: 0.3) or sparsity.method: static")
    if s.method != "dense" and s.density == 1:
        raise UserError(f"sparsity.density 1 keeps every weight: method {s.method!r} would train a dense model; "
                        "use a density below 1 or sparsity.method: dense")
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if warmup >= total_steps and o.warmup_epochs > 0:
        raise UserError(f"optim.warmup_epochs {o.warmup_epochs:g} is not shorter than the run ({run}): the learning "
                        "rate would only ever ramp up; use a warmup shorter than train.epochs")
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr {o.min_lr:g} is above the peak optim.lr {o.lr:g}: the cosine would raise the "
                        "learning rate; use min_lr <= lr")
    d = cfg.diagnostics
    for key, every in (("hessian_every", d.hessian_every), ("scales_every", d.scales_every),
                       ("itop_every", d.itop_every)):
        if every > total_steps:
            raise UserError(f"diagnostics.{key} {every} is longer than the run ({run}): it would never measure; "
                            f"use at most {total_steps}, or 0 to switch it off")
    if t.log_every > total_steps:
        warnings.warn(f"train.log_every {t.log_every} is longer than the run ({run}): no training metrics will be "
                      "logged", ConfigWarning, stacklevel=2)


def check_masks(cfg: RunConfig, model: nn.Module, masks: dict[str, torch.Tensor], num_classes: int) -> None:
    """No layer may be left without weights, and the output layer must reach every class (else accuracy is capped,
    whatever the method: RigL at such densities does not regrow them either). A hidden unit with no active input is
    only warned about: at high sparsity it is expected (its BatchNorm makes it a constant) and dynamic methods can
    regrow it."""
    s = cfg.sparsity
    empty = [f"'{n}' ({'x'.join(map(str, m.shape))})" for n, m in masks.items() if not m.any()]
    if empty:
        raise UserError(f"sparsity.density {s.density:g} ({s.distribution}) leaves layer(s) {', '.join(empty)} "
                        "with 0 weights: they would pass on nothing but their bias; raise sparsity.density"
                        f"{_minimum_density_hint(cfg, masks)}, or keep them dense (sparsity.exclude)")
    last = select_sparse_params(model, include=["*"])[-1].name
    if last in masks and masks[last].shape[0] == num_classes:
        dead = (fan_in(masks[last]) == 0).nonzero().flatten().tolist()
        if dead:
            raise UserError(f"sparsity.density {s.density:g} leaves {len(dead)} of {num_classes} classes "
                            f"({_few(dead)}) without a weight in the output layer '{last}' (it keeps {int(masks[last].sum())} "
                            f"of its {masks[last].numel()} weights): they could only be predicted from the bias; raise sparsity.density or "
                            "set sparsity.prune_last_layer: false")
    dead_hidden = {n: int((fan_in(m) == 0).sum()) for n, m in masks.items() if n != last}
    dead_hidden = {n: k for n, k in dead_hidden.items() if k}
    if dead_hidden:
        warnings.warn("units with no active input weight (constant outputs): "
                      + ", ".join(f"'{n}': {k} of {masks[n].shape[0]}" for n, k in dead_hidden.items())
                      + f" at sparsity.density {s.density:g}", ConfigWarning, stacklevel=2)


def _minimum_density_hint(cfg: RunConfig, masks: dict[str, torch.Tensor]) -> str:
    """' to at least D': the smallest density (by bisection) giving every layer at least one weight."""
    from sparseopt.distributions import layer_nnz

    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    s = cfg.sparsity

    def enough(density: float) -> bool:
        counts = layer_nnz(shapes, density, s.distribution, erk_power_scale=s.erk_power_scale)
        return min(counts.values()) >= 1

    low, high = 0.0, 1.0
    if not enough(high):
        return ""
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return f" to at least {_round_up(high)}"


def _round_up(x: float) -> str:
    digits = max(0, 1 - math.floor(math.log10(x)))
    return f"{math.ceil(x * 10 ** digits) / 10 ** digits:g}"


def _few(items: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return f"{shown}, ..." if len(items) > limit else shown


def ignored_settings(cfg: RunConfig) -> list[str]:
    """Keys set away from their default that the rest of the config switches off, one line per switch.

    ``sparseopt train`` warns with these: a density under ``method: dense`` or a Nesterov flag under AdamW is
    something the user wrote and the run will not do. (Grids such as presets share bases across variants and
    would warn for every run, so only single runs are checked.)"""
    from sparseopt.data import dataset_options
    from sparseopt.experiments.run.build import data_settings
    from sparseopt.experiments.config.schema import RunConfig as Defaults

    default, lines = Defaults(), []

    def changed(section: str, keys: list[str]) -> list[str]:
        ours, base = getattr(cfg, section), getattr(default, section)
        return [f"{section}.{k} {getattr(ours, k)!r}" for k in keys if getattr(ours, k) != getattr(base, k)]

    def note(keys: list[str], because: str) -> None:
        if keys:
            lines.append(f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect with {because}")

    s, dynamic = cfg.sparsity, ["update_every", "drop_fraction", "start_step", "end_fraction", "annealing",
                                "skip_step_on_update", "grow_init"]
    if s.method == "dense":  # initial_mask and execution under dense are errors (build_sparse, check_execution)
        note(changed("sparsity", [f for f in vars(s) if f not in ("method", "initial_mask", "execution")]),
             "sparsity.method 'dense'")
    elif s.method == "static":
        note(changed("sparsity", dynamic), "sparsity.method 'static' (masks never change)")
    if s.method != "dense" and s.execution == "masked":
        note(changed("sparsity", ["execution_max_density", "execution_min_numel", "execution_min_batch"]),
             "sparsity.execution 'masked'")
    if s.method != "dense" and s.distribution == "uniform":
        note(changed("sparsity", ["erk_power_scale"]), "sparsity.distribution 'uniform'")
    if s.initial_mask == "random":
        note(changed("sparsity", ["pai_scope", "pai_batches", "grasp_samples_per_class"]),
             "sparsity.initial_mask 'random'")
    if not cfg.sparseopt.enabled:
        note(changed("sparseopt", [f for f in vars(cfg.sparseopt) if f != "enabled"]), "sparseopt.enabled false")
    elif cfg.sparseopt.factor_source == "fan_in":
        note(changed("sparseopt", ["bn_momentum"]), "sparseopt.factor_source 'fan_in'")
    o = cfg.optim
    note(changed("optim", ["betas"] if o.name == "sgd" else ["momentum", "nesterov"]), f"optim.name {o.name!r}")
    if not o.ham:
        note(changed("optim", ["ham_alpha", "ham_beta", "ham_max_weight_norm"]), "optim.ham false")
    if cfg.diagnostics.hessian_every == 0:
        note(changed("diagnostics", ["hessian_k", "hessian_samples", "hessian_physical_batch"]),
             "diagnostics.hessian_every 0 (off)")
    unused = [k for k in data_settings(cfg) if k not in dataset_options(cfg.data.name) and k != "seed"]
    unused += [] if cfg.data.name in ("cifar10", "cifar100", "imagenet") else ["root"]
    note(changed("data", [k for k in unused if hasattr(cfg.data, k)]), f"data.name {cfg.data.name!r}")
    return lines
