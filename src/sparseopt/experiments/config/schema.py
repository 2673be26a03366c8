"""The typed experiment configuration: every key a YAML config may hold, with its type, range and default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sparseopt.execution.training import SPARSE_MAX_DENSITY, SPARSE_MIN_BATCH, SPARSE_MIN_NUMEL
from sparseopt.experiments.config.load import option


@dataclass
class DataConfig:
    name: Literal["mnist", "cifar10", "cifar100", "imagenet", "synthetic"] = "mnist"
    root: str | None = option(None, help="folder holding the dataset (CIFAR/ImageNet); unused for mnist/synthetic")
    download: bool = option(False, help="download CIFAR if it is not under root")
    batch_size: int = option(128, gt=0)
    test_batch_size: int = option(1000, gt=0)
    augment: bool = option(True, help="CIFAR: random crop (padding 4) + horizontal flip")
    num_workers: int = option(4, ge=0, help="ImageNet decoding workers")
    data_seed: int = option(0, help="fixes the train/test split, independently of train.seed")
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific, e.g. synthetic n_train/shape


@dataclass
class ModelConfig:
    name: str = option("cnn", help="mlp, mlp_bn_mnist, cnn, resnet20/32/56, resnet50, or package.module:callable")
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SparsityConfig:
    method: Literal["dense", "static", "set", "rigl"] = "rigl"
    density: float = option(0.1, gt=0, le=1, help="fraction of weights kept (1 - sparsity)")
    distribution: Literal["erk", "uniform"] = "erk"
    erk_power_scale: float = option(1.0, ge=0)
    update_every: int = option(100, gt=0, help="steps between mask updates")
    drop_fraction: float = option(0.3, ge=0, le=1)
    start_step: int = option(0, ge=0)
    end_fraction: float = option(0.75, gt=0, le=1, help="mask updates stop at this fraction of training")
    annealing: Literal["cosine", "constant"] = "cosine"
    skip_step_on_update: bool = True
    prune_first_layer: bool = False
    prune_last_layer: bool = True
    exclude: list[str] = field(default_factory=list)
    init: Literal["none", "fanin", "fanout", "fanavg", "layer"] = "none"
    grow_init: Literal["zeros", "random_normal", "random_uniform", "grad_sign", "grad_scale"] = "zeros"
    drop_criterion: Literal["magnitude", "neuron_normalized"] = option(
        "magnitude", help="SET/RigL drop score: |w| (reference) or |w_ij|/||w_i|| (scale-invariant per neuron)")
    constant_fan_in: bool = option(
        False, help="every neuron of a layer gets the same fan-in, kept by SET/RigL (no BatchNorm fan-in skew)")
    initial_mask: Literal["random", "magnitude", "snip", "grasp"] = option(
        "random", help="where the first mask comes from: random (per distribution) or pruning at initialisation")
    pai_scope: Literal["global", "layer"] = "global"
    pai_batches: int = option(1, gt=0, help="training batches scored by SNIP/GraSP")
    grasp_samples_per_class: int = option(10, gt=0)
    execution: Literal["masked", "sparse"] = option(
        "masked", help="sparse: nn.Linear layers at or below the break-even run CSR kernels and train only their "
        "active values (CPU, fp32, one process; same results up to float rounding); masked: dense kernels")
    execution_max_density: float | None = option(
        None, gt=0, le=1, help=f"sparse execution: denser layers stay masked (default {SPARSE_MAX_DENSITY}, the "
        "measured break-even)")
    execution_min_numel: int | None = option(
        None, ge=0, help=f"sparse execution: layers with fewer weights stay masked (default {SPARSE_MIN_NUMEL})")
    execution_min_batch: int | None = option(
        None, ge=0, help=f"sparse execution: forwards of fewer rows use the dense product (default {SPARSE_MIN_BATCH})")


@dataclass
class SparseOptConfig:
    enabled: bool = False
    normalize: bool = True
    scope: Literal["all", "bn_followed"] | list[str] = option(
        "all", help="layers SparseOpt acts on: all, bn_followed (those feeding a BatchNorm) or a list of names/globs")
    regrow_gradient: Literal["original", "corrected"] = "original"
    max_factor: float | None = option(None, gt=0)
    precondition_weight_decay: bool = option(
        False, help="the factor multiplies coupled weight decay too: -lr*D(grad + wd*W) (SGD; not AdamW's decay)")
    factor_source: Literal["fan_in", "batchnorm"] = option(
        "fan_in", help="c_i from fan-in sqrt(k_i/mean k) (papers) or from the following BatchNorm's sigma_i/mean sigma")
    bn_momentum: float = option(0.1, gt=0, le=1, help="EMA momentum of the measured BatchNorm sigma_i")
    renormalize: Literal["none", "clip", "exact"] = option(
        "none", help="rescale corrected gradients to the uncorrected global norm (paper 001 App. F ablation)")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = option(0.1, gt=0, help="peak learning rate")
    scale_lr_by_batch: bool = option(False, help="peak lr = lr * batch_size / 256 (ImageNet practice)")
    momentum: float = option(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: list[float] = option(default_factory=lambda: [0.9, 0.999], ge=0, lt=1, help="AdamW (beta1, beta2)")
    weight_decay: float = option(5e-4, ge=0)
    warmup_epochs: float = option(0.0, ge=0)
    min_lr: float = option(0.0, ge=0)
    label_smoothing: float = option(0.0, ge=0, lt=1)
    ham: bool = option(False, help="wrap the optimizer in HAM (hyperbolic aware minimization)")
    ham_alpha: float = option(200.0, ge=0)
    ham_beta: float = option(1e-3, ge=0)
    ham_max_weight_norm: float | None = option(1000.0, gt=0)


@dataclass
class TrainConfig:
    epochs: float = option(10.0, gt=0)
    eval_every: int = option(0, ge=0, help="steps between evaluations; 0 = once per epoch")
    log_every: int = option(20, gt=0)
    keep_last: int = option(2, ge=1, help="checkpoints kept besides best.pt")
    seed: int = 0
    deterministic: bool = option(False, help="deterministic kernels (slower on GPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", help="autocast dtype of the forward pass; fp16 adds a GradScaler, bf16 needs none")
    channels_last: bool = option(False, help="NHWC image batches (faster convolutions on GPUs with AMP)")
    compile: bool = option(False, help="torch.compile the model's forward (first steps slower: compilation)")


@dataclass
class LoggingConfig:
    formats: list[Literal["jsonl", "csv"]] = field(default_factory=lambda: ["jsonl", "csv"])
    tensorboard: bool = True


@dataclass
class DiagnosticsConfig:
    hessian_every: int = option(0, ge=0, help="steps between top-k Hessian eigenvalue measurements; 0 = off")
    hessian_k: int = option(4, gt=0, help="eigenvalues per measurement (lambda_1..lambda_k)")
    hessian_samples: int = option(1000, gt=0, help="first training examples forming the fixed Hessian subset")
    hessian_physical_batch: int = option(1000, gt=0, help="examples per forward pass in Hessian-vector products")
    scales_every: int = option(0, ge=0, help="steps between gradient/weight/activation scale logs; 0 = off")
    itop_every: int = option(0, ge=0, help="steps between per-layer ITOP logs; 0 = off")


@dataclass
class RunConfig:
    name: str = option("run", help="label shared by runs that differ only in seed (used by report)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    sparseopt: SparseOptConfig = field(default_factory=SparseOptConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
