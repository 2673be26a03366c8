"""Sparse execution of masked ``nn.Linear`` layers during training: CSR forward, CSR input gradient, SDDMM weight
gradient on the active entries only, and the dense weight gradient only on the steps where a topology needs it.

Each sparse-run layer trains its active values only (:mod:`sparseopt.execution.compact`): the optimizer holds an
(nnz,) parameter in place of the dense weight, so its step, the gradient and the re-masking cost O(nnz). The
trajectory equals the masked-dense one up to float rounding for element-wise optimizers (SGD, Adam, AdamW, ...),
whose update of an entry reads only that entry; checkpoints keep the dense format of the masked-dense path.
"""

from __future__ import annotations

import math

import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sparseopt.execution.kernels import csr_matmul_t, sddmm
from sparseopt.execution.compact import CompactLinear

# Break-even measured with benchmarks/bench_sparse_linear.py (benchmarks/README): forward + backward of one layer,
# 1 thread, the native kernels, on an AVX-512 (Zen4) and an AVX2-only AMD EPYC. From batch 64 on, sparse won at
# density 0.1 on every measured shape (1.3-4.2x) and at 0.05 and 0.02; at 0.2 it lost on 16384x4096 at batch 256
# (0.64x on AVX2).
#: Above this density the dense kernels may win (0.1 won on 1024², 4096², 16384x4096 on both CPUs; 0.2 did not).
SPARSE_MAX_DENSITY = 0.1
#: Below this many weights per layer (the smallest measured, 1024²) the gain is not measured, so not claimed.
SPARSE_MIN_NUMEL = 1 << 20
#: A forward with fewer rows than this runs the masked-dense product (batch 1 lost on every measured shape).
SPARSE_MIN_BATCH = 32


@dataclass(frozen=True)
class ExecutionPolicy:
    """Which sparse Linear layers run sparse kernels: density at most ``max_density`` and at least ``min_numel``
    weights (the measured break-even); the others stay on the masked-dense path, named in a warning. A forward of
    fewer than ``min_batch`` rows (batch x leading dims) runs the masked-dense product, which computes the same."""

    max_density: float = SPARSE_MAX_DENSITY
    min_numel: int = SPARSE_MIN_NUMEL
    min_batch: int = SPARSE_MIN_BATCH

    def __post_init__(self) -> None:
        if not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"sparse_execution max_density must be in (0, 1], got {self.max_density!r}")
        if self.min_numel < 0 or self.min_batch < 0:
            raise ValueError(f"sparse_execution min_numel and min_batch must be >= 0, got {self.min_numel!r} and "
                             f"{self.min_batch!r}")


class _SparseLinearFunction(torch.autograd.Function):
    """``y = x @ W.T + b`` with ``W`` given by its active values: sparse kernels, or (``sparse=False``, for small
    batches) the dense product on the in-step dense weight; the gradient of the values is the weight gradient at the
    active entries times SparseOpt's factors, and on mask-update steps the dense weight gradient is handed over."""

    @staticmethod
    def forward(ctx, x, values, bias, layer: CompactLinear, dense_grad: bool, sparse: bool):
        layout = layer.layout
        x2 = x.reshape(-1, layout.in_features)
        # contiguous: the next layer (BatchNorm) runs 8x slower on the transposed product (measured, 4096 x 256)
        y = csr_matmul_t(layout.csr(values), x2).contiguous() if sparse else x2 @ layer.weight.t()
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, values)
        ctx.layer, ctx.dense_grad, ctx.sparse, ctx.x_shape = layer, dense_grad, sparse, x.shape
        return y.view(*x.shape[:-1], layout.out_features)

    @staticmethod
    def backward(ctx, dy):
        x2, values = ctx.saved_tensors
        layer = ctx.layer
        layout = layer.layout
        dy2 = dy.reshape(-1, layout.out_features)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            dx = (csr_matmul_t(layout.csr_t(values), dy2).contiguous() if ctx.sparse
                  else dy2 @ layer.weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.dense_grad or not ctx.sparse:
                dense = dy2.t() @ x2
                if ctx.dense_grad:
                    layer.hand_over_dense(dense)
                dv = dense.view(-1).index_select(0, layout.flat)
            else:
                dv = sddmm(layout.csr(values), dy2, x2)
            scale = layer.value_scale()
            if scale is not None:
                dv.mul_(scale)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dv, db, None, None, None


class SparseExecution:
    """Runs the chosen layers of a :class:`~sparseopt.SparseTraining` with sparse kernels (``sparse_execution=``).

    ``dense_grad_needed()`` is asked at every forward: True on the steps where the topology reads the dense
    gradient (RigL's mask updates), when the layer computes the full ``dy.T @ x`` and hands it to
    ``collect_dense(name, values, grad)``, as the gradient hooks do on the masked-dense path."""

    def __init__(self, model: nn.Module, params, masks: dict[str, torch.Tensor], policy: ExecutionPolicy,
                 optimizer: torch.optim.Optimizer, dense_grad_needed: Callable[[], bool],
                 row_scales: Mapping[str, torch.Tensor],
                 collect_dense: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
        self.policy = policy
        self._optimizer = optimizer
        self.dense_grad_needed = dense_grad_needed
        self.layers: dict[str, CompactLinear] = {}
        self.fallback: dict[str, str] = {}
        holders: dict[int, list[str]] = {}
        for name, q in model.named_parameters(remove_duplicate=False):
            holders.setdefault(id(q), []).append(name)
        for p in params:
            reason = self._ineligible(p, masks[p.name]) or _tied(p, holders)
            if reason:
                self.fallback[p.name] = reason
                continue
            layer = self.layers[p.name] = CompactLinear(p.name, p.module, masks[p.name], row_scales)
            layer.hand_over_dense = (lambda grad, name=p.name, values=layer.values:
                                     collect_dense(name, values, grad))
            p.module.forward = types.MethodType(_sparse_forward(self, layer), p.module)
        if self.fallback:
            warnings.warn("sparse_execution: these sparse layers stay on the masked-dense path: "
                          + "; ".join(f"{n} ({why})" for n, why in self.fallback.items()), stacklevel=3)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def layouts(self):
        return {name: layer.layout for name, layer in self.layers.items()}

    def _ineligible(self, p, mask: torch.Tensor) -> str:
        if type(p.module) is not nn.Linear or p.param is not p.module.weight:
            return f"a {type(p.module).__name__}, only nn.Linear weights have sparse kernels"
        if p.param.device.type != "cpu":
            return f"on {p.param.device}, the sparse kernels are measured on CPU only"
        nnz = int(mask.sum())
        if nnz > math.ceil(self.policy.max_density * mask.numel()):  # a density of exactly 0.1 rounds up to whole weights
            return f"density {nnz / mask.numel():.3f} > break-even {self.policy.max_density}"
        if mask.numel() < self.policy.min_numel:
            return f"{mask.numel()} weights < {self.policy.min_numel}, too small to gain"
        return ""

    def engage(self) -> None:
        """The optimizer trains the values of the sparse-run layers from here on. Called by the first forward
        with gradients (so clipping the optimizer's parameters sees them from the first step) and before every
        step; until then the optimizer holds the dense weights as built, which resume-before-construction needs."""
        if self.optimizer is None:
            self.optimizer = self._optimizer
            self._state_hook = self.optimizer.register_state_dict_post_hook(self._dense_state)
        for layer in self.layers.values():
            layer.engage(self.optimizer)

    def before_step(self) -> None:
        """State loaded or handed over in the dense shape becomes values-shaped; weights written since are read."""
        for layer in self.layers.values():
            layer.sync()
            layer.compact_state()

    def after_step(self) -> None:
        """The optimizer wrote the values: mirror them into the dense weights (O(nnz))."""
        for layer in self.layers.values():
            layer.mirror()

    def disengage(self) -> None:
        for layer in self.layers.values():
            layer.disengage()
        if self.optimizer is not None:
            self._state_hook.remove()
            self.optimizer = None

    def _dense_state(self, optimizer, state_dict: dict) -> dict:
        """Checkpoints keep the masked-dense format: each values-shaped state tensor saved at the weight's shape."""
        layer_of = {id(layer.values): layer for layer in self.layers.values()}
        index = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                layer = layer_of.get(id(p))
                if layer is not None and index in state_dict["state"]:
                    state_dict["state"][index] = {k: layer.densify(v) for k, v in state_dict["state"][index].items()}
                index += 1
        return state_dict

    def per_value(self, name: str, row: torch.Tensor) -> torch.Tensor:
        return self.layers[name].per_value(row)

    def values_of(self, name: str) -> nn.Parameter | None:
        layer = self.layers.get(name)
        return layer.values if layer is not None else None

    def rebuild(self, masks: dict[str, torch.Tensor], names=None) -> None:
        """Re-derive the CSR structure of the layers whose masks changed (``names``; all when None)."""
        for name, layer in self.layers.items():
            if names is None or name in names:
                layer.rebuild(masks[name])

    def runs_sparse(self, name: str) -> bool:
        return name in self.layers

    def remove(self) -> None:
        self.disengage()
        for layer in self.layers.values():
            layer.remove()
            if "forward" in vars(layer.module):
                del layer.module.forward
        self.layers = {}


def _tied(p, holders: dict[int, list[str]]) -> str:
    """A weight shared with another module (tied embeddings) must keep training as one tensor."""
    names = holders.get(id(p.param), [])
    return f"its weight is tied to {[n for n in names if n != p.name]}" if len(names) > 1 else ""


def _sparse_forward(execution: SparseExecution, layer: CompactLinear):
    # torch.compile runs it eagerly (a graph break): traced, it recompiled for each layer's value count and mode
    # until torch's recompile limit (8) in a 3-layer MLP, for no gain (the CSR kernels are opaque to it)
    @torch.compiler.disable
    def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        layer.sync()
        if not torch.is_grad_enabled():
            if x.numel() < execution.policy.min_batch * module.in_features:
                return F.linear(x, module.weight, module.bias)
        else:
            execution.engage()
        if torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"sparse_execution: {layer.name} ran under torch.autocast (e.g. the HF Trainer's "
                               "bf16=True, Lightning's precision='bf16-mixed'), but its kernels compute in the "
                               "weight's float32, not in the autocast dtype as the masked-dense path would; train it "
                               "without autocast, or with sparse_execution=False")
        sparse = x.numel() >= execution.policy.min_batch * module.in_features
        return _SparseLinearFunction.apply(x, layer.values, module.bias, layer,
                                           torch.is_grad_enabled() and execution.dense_grad_needed(), sparse)
    return forward
