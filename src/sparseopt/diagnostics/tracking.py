"""Periodic diagnostics for the experiment runner (SPEC 4, 6): sharpness, gradient/weight/activation scales, ITOP.

Each tracker follows the :class:`sparseopt.experiments.run.callbacks.Callback` protocol: it is called after the optimizer
(and LR scheduler) step every ``every`` steps and returns a flat ``{key: float}`` logged under its ``name``.

None of them changes anything observable by training: parameters, ``.grad``, BatchNorm buffers, module modes and the
global RNG are left exactly as they were, so a run is bit-identical with or without trackers. State kept across
measurements (the Hessian tracker's warm-start vectors) is returned by ``state_dict()`` as plain tensors, so resumed
runs (``torch.load(weights_only=True)``) reproduce the same measurements.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt.execution.compact import VALUES
from sparseopt.diagnostics.hessian import EigenResult, HessianOperator, _preserved, lanczos, stability_threshold
from sparseopt.diagnostics.itop import factor_summary, itop_summary
from sparseopt.layouts import layout_of
from sparseopt.masks import fan_in


def _is_weight_layer(module: nn.Module) -> bool:
    """The layer types sparse by default (Linear, ConvNd, Hugging Face Conv1D; see sparseopt.layouts)."""
    layout = layout_of(module)
    return layout is not None and layout.sparse_by_default


def _layer(param_name: str) -> str:
    """'features.0.weight' -> 'features.0' (the module name, as used for the activation keys)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _subset(ctx, samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``samples`` training examples, normalised like the training batches (no augmentation)."""
    if ctx.train_x is None or ctx.train_y is None:
        return None
    x, y = ctx.train_x[:samples], ctx.train_y[:samples]
    if ctx.normalize is not None:
        x = ctx.normalize(x)
    if not torch.is_floating_point(x):
        return None
    return x.to(ctx.device), y.to(ctx.device)


class HessianTracker:
    """Top-k Hessian eigenvalues of the training loss on a fixed subset, every ``every`` steps (SPEC 6).

    Loss: mean cross-entropy over the first ``samples`` training examples (no augmentation), evaluated in train mode
    (BatchNorm statistics per physical batch of ``physical_batch``, Dropout disabled), as in Cohen et al. With a
    sparse model and ``restricted`` the operator is P H P on the active weights. The data-loss Hessian is reported
    (coupled weight decay would add ``weight_decay`` to every eigenvalue; it is logged alongside).

    Logs ``lambda_1..lambda_k``, ``lr`` (the rate of the next step: the callback runs after the scheduler step),
    ``threshold`` (SPEC 6.2, momentum/Nesterov aware, SGD only), ``threshold_gd`` (2/lr), ``matvecs``,
    ``iterations``, ``converged``, ``seconds``, and ``lambda_1_preconditioned`` (λ_max of D^1/2 P H P D^1/2) when
    SparseOpt factors exist. Lanczos is warm-started from the previous top eigenvector (plus a small seeded random
    component so λ_2..λ_k stay reachable); the vectors are kept in ``state_dict()``.
    """

    def __init__(self, every: int, k: int = 4, samples: int = 1000, physical_batch: int = 1000,
                 restricted: bool = True, name: str = "hessian", *, label_smoothing: float = 0.0,
                 tol: float = 1e-6, max_iter: int = 300, seed: int = 0, warm_noise: float = 0.1) -> None:
        if every < 0 or k < 1 or samples < 1 or physical_batch < 1:
            raise ValueError(f"need every >= 0, k >= 1, samples >= 1, physical_batch >= 1; got {every}, {k}, "
                             f"{samples}, {physical_batch}")
        self.name, self.every, self.k, self.samples = name, every, k, samples
        self.physical_batch, self.restricted = physical_batch, restricted
        self.loss_fn = (functools.partial(F.cross_entropy, label_smoothing=label_smoothing) if label_smoothing
                        else F.cross_entropy)
        self.tol, self.max_iter, self.seed, self.warm_noise = tol, max_iter, seed, warm_noise
        self._v: torch.Tensor | None = None         # previous top eigenvector (restricted operator)
        self._v_pre: torch.Tensor | None = None     # previous top eigenvector (preconditioned operator)
        self._warned = False

    def _start(self, prev: torch.Tensor | None, dim: int, step: int, salt: int) -> torch.Tensor | None:
        if prev is None or prev.numel() != dim or not torch.isfinite(prev).all():
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * step + salt)
        noise = torch.randn(dim, generator=gen, dtype=torch.float64)
        v = prev.to(torch.float64).cpu()
        return v / torch.linalg.vector_norm(v) + self.warm_noise * noise / torch.linalg.vector_norm(noise)

    def _measure(self, op: HessianOperator, k: int, prev, step: int, salt: int) -> EigenResult:
        return lanczos(op, k, tol=self.tol, max_iter=self.max_iter, seed=self.seed * 1_000_003 + 2 * step + salt,
                       return_vectors=True, v0=self._start(prev, op.dim, step, salt))

    def __call__(self, ctx) -> dict[str, float] | None:
        data = _subset(ctx, self.samples)
        if data is None:
            if not self._warned:
                warnings.warn(f"{self.name}: no in-memory (float) training set available; Hessian tracking is "
                              "skipped for this run", RuntimeWarning, stacklevel=2)
                self._warned = True
            return None
        x, y = data
        t0 = time.perf_counter()
        sparse = ctx.sparse
        masks = dict(sparse.masks) if sparse is not None else None
        common = dict(loss_fn=self.loss_fn, physical_batch=self.physical_batch, train_mode=True, dropout="disable")
        op = HessianOperator(ctx.model, x, y, masks=masks, restrict=self.restricted, **common)
        k = min(self.k, op.active_dim)
        res = self._measure(op, k, self._v, ctx.step, 0)
        self._v = res.eigenvectors[0].clone() if res.eigenvectors is not None else None
        metrics: dict[str, float] = {f"lambda_{j + 1}": lam for j, lam in enumerate(res.eigenvalues)}
        metrics["residual_1"] = res.residuals[0]
        matvecs, iterations, converged = res.matvecs, res.iterations, res.converged
        factors = sparse.factors() if sparse is not None else {}
        if factors:
            pre = HessianOperator(ctx.model, x, y, masks=masks, restrict=self.restricted, precondition=factors,
                                  **common)
            res_pre = self._measure(pre, 1, self._v_pre, ctx.step, 1)
            self._v_pre = res_pre.eigenvectors[0].clone() if res_pre.eigenvectors is not None else None
            metrics["lambda_1_preconditioned"] = res_pre.eigenvalues[0]
            matvecs += res_pre.matvecs
            converged = converged and res_pre.converged
        group = ctx.optimizer.param_groups[0]
        lr = float(group.get("lr", 0.0))
        if lr > 0:
            metrics["lr"] = lr
            metrics["threshold_gd"] = 2.0 / lr
            momentum = group.get("momentum")
            if momentum is not None and 0.0 <= float(momentum) < 1.0:     # SGD family; Adam has no such line
                metrics["threshold"] = stability_threshold(lr, float(momentum), bool(group.get("nesterov", False)))
        metrics["weight_decay"] = float(group.get("weight_decay", 0.0))
        metrics.update(matvecs=float(matvecs), iterations=float(iterations), converged=float(converged),
                       seconds=time.perf_counter() - t0)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"v": self._v, "v_pre": self._v_pre}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._v = state.get("v")
        self._v_pre = state.get("v_pre")


def _trained(module: nn.Module) -> torch.Tensor:
    """What the optimizer trains for the module's weight: its active values on a sparse-run Linear
    (``SparseTraining(sparse_execution=...)``, whose dense weight gets no gradient), else the weight. The norms
    agree: the masked dense gradient is zero off the active entries."""
    values = getattr(module, VALUES, None)
    return values if isinstance(values, torch.Tensor) else module.weight


def _rms_stats(out: torch.Tensor) -> dict[str, float]:
    a = out.detach().to(torch.float64)
    return {"act_mean_abs": float(a.abs().mean()), "act_std": float(a.std()) if a.numel() > 1 else 0.0,
            "act_rms": float(a.pow(2).mean().sqrt())}


class ScaleTracker:
    """Per-layer gradient, weight and activation scales every ``every`` steps (Conv/Linear layers).

    * ``grad_norm/<layer>``: norm of the weight's ``.grad`` as the optimizer used it (masked, and SparseOpt-scaled
      when enabled; the callback runs after the step and before the next ``zero_grad``); of the active values for
      a sparse-run Linear (``sparse_execution``), the same norm. Absent when the step
      dropped the gradients (a RigL/SET mask-update step with ``skip_step_on_update``).
    * ``weight_norm/<layer>``.
    * ``act_mean_abs/<layer>``, ``act_std/<layer>``, ``act_rms/<layer>``: the layer's output on the first
      ``batch`` training examples, one forward pass in the model's current mode without gradients; the forward
      hooks exist only during that pass and BatchNorm buffers / the RNG are restored afterwards.
    * sparse runs: ``zero_fanin/<layer>`` (output units with no active input) and, with SparseOpt,
      ``factor_min/<layer>``, ``factor_max/<layer>``, ``factor_mean/<layer>`` over units with inputs.
    * sparse runs, neuron health (:mod:`sparseopt.health`): ``norm_max/<layer>`` (largest ||w_i||),
      ``norm_max_over_median/<layer>``, ``sigma_slope/<layer>`` and ``gamma_slope/<layer>`` (log-log slopes of the
      following BatchNorm's sigma_i and |gamma_i| against fan-in k_i, from its running statistics), and the totals
      ``dead`` (zero-fan-in units), ``norm_max_over_median`` (the largest over layers), ``sigma_slope`` (mean over
      layers with a BatchNorm and a slope) and, with SparseOpt, ``correction_ratio`` (||corrected g|| / ||g||).
    """

    def __init__(self, every: int, name: str = "scales", *, batch: int = 256) -> None:
        if every < 0 or batch < 1:
            raise ValueError(f"need every >= 0 and batch >= 1, got {every}, {batch}")
        self.name, self.every, self.batch = name, every, batch

    def __call__(self, ctx) -> dict[str, float] | None:
        model = ctx.model
        layers = [(n, m) for n, m in model.named_modules() if _is_weight_layer(m)]
        metrics: dict[str, float] = {}
        for n, m in layers:
            w = m.weight
            grad = _trained(m).grad
            if grad is not None:
                metrics[f"grad_norm/{n}"] = float(torch.linalg.vector_norm(grad.detach()))
            metrics[f"weight_norm/{n}"] = float(torch.linalg.vector_norm(w.detach()))
        data = _subset(ctx, self.batch)
        if data is not None:
            metrics.update(self._activations(model, layers, data[0]))
        if ctx.sparse is not None:
            masks, factors = ctx.sparse.masks, ctx.sparse.factors()
            for pname, mask in masks.items():
                layer = _layer(pname)
                axis = ctx.sparse.out_axes[pname]
                metrics[f"zero_fanin/{layer}"] = float((fan_in(mask, axis) == 0).sum())
                if pname in factors:
                    summary = factor_summary(factors[pname], mask, axis)
                    if summary.get("neurons"):
                        for key in ("min", "max", "mean"):
                            metrics[f"factor_{key}/{layer}"] = summary[key]
            metrics.update(_health_metrics(ctx.sparse.report()))
        return metrics or None

    @staticmethod
    def _activations(model: nn.Module, layers, x: torch.Tensor) -> dict[str, float]:
        stats: dict[str, float] = {}

        def hook(name):
            def record(module, inputs, output):
                if isinstance(output, torch.Tensor):
                    for key, value in _rms_stats(output).items():
                        stats[f"{key}/{name}"] = value
            return record

        handles = []
        try:
            with _preserved(model, None, "allow"), torch.no_grad():
                handles = [m.register_forward_hook(hook(n)) for n, m in layers]
                model(x)
        finally:
            for h in handles:
                h.remove()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _health_metrics(report) -> dict[str, float]:
    """The neuron-health columns of a sparsity report as flat metrics (absent values are not logged)."""
    metrics: dict[str, float] = {"dead": float(sum(r.zero_fanin for r in report.layers))}
    for r in report.layers:
        layer = _layer(r.name)
        metrics[f"norm_max/{layer}"] = r.norm_max
        for key in ("norm_max_over_median", "sigma_slope", "gamma_slope"):
            if getattr(r, key) is not None:
                metrics[f"{key}/{layer}"] = getattr(r, key)
    ratios = [r.norm_max_over_median for r in report.layers if r.norm_max_over_median is not None]
    slopes = [r.sigma_slope for r in report.layers if r.sigma_slope is not None]
    if ratios:
        metrics["norm_max_over_median"] = max(ratios)
    if slopes:
        metrics["sigma_slope"] = sum(slopes) / len(slopes)
    if report.correction_ratio is not None:
        metrics["correction_ratio"] = report.correction_ratio
    return metrics


class ItopTracker:
    """ITOP (SPEC 4), connections changed at the last mask update and zero-fan-in units, total and per layer.

    Keys: ``itop``, ``changed_fraction``, ``zero_fanin``, ``density`` and ``itop/<layer>``,
    ``changed_fraction/<layer>``, ``zero_fanin/<layer>``. Dense runs log nothing.
    """

    def __init__(self, every: int, name: str = "itop") -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.name, self.every = name, every

    def __call__(self, ctx) -> dict[str, float] | None:
        if ctx.sparse is None:
            return None
        s = itop_summary(ctx.sparse)
        metrics = {"itop": s["itop"], "changed_fraction": s["changed_fraction"], "zero_fanin": float(s["zero_fanin"]),
                   "density": s["density"]}
        for row in s["layers"]:
            layer = _layer(row["name"])
            metrics[f"itop/{layer}"] = row["itop"]
            metrics[f"changed_fraction/{layer}"] = row["changed_fraction"]
            metrics[f"zero_fanin/{layer}"] = float(row["zero_fanin"])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
