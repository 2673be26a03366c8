"""Pruning at initialisation (SPEC 5): score every sparse weight once, keep the highest scores as a fixed mask.

All methods share one interface: a scorer maps the sparse weights to scores (higher = keep) and a selection turns
scores into exact-count masks, either with one global threshold or per layer with counts from uniform/ERK.
Scoring runs on a snapshot-and-restore of the model: parameters, buffers (BatchNorm running statistics), train/eval
modes, ``.grad`` and the global RNG are as they were afterwards, so the masks can be handed straight to
:class:`sparseopt.SparseTraining` (``masks=...``) with the model's original initialisation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from sparseopt.distributions import DISTRIBUTIONS, check_density, layer_nnz
from sparseopt.masks import SparseParam, select_sparse_params

METHODS = ("random", "magnitude", "snip", "grasp")
SCOPES = ("global", "layer")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prune_at_init(
    model: nn.Module,
    density: float,
    method: str,
    *,
    data: Batches | None = None,
    loss_fn: LossFn = F.cross_entropy,
    distribution: str = "erk",
    scope: str = "global",
    samples_per_class: int = 10,
    temperature: float = 200.0,
    generator: torch.Generator | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Sequence[type[nn.Module]] | None = None,
    prune_first_layer: bool = False,
    prune_last_layer: bool = True,
    example_input=None,
) -> dict[str, torch.Tensor]:
    """Masks ``{name: bool tensor}`` keeping a ``density`` fraction of the sparse set, chosen by ``method``.

    * ``"random"``: uniform scores, always layer-wise.
    * ``"magnitude"``: ``|w|``.
    * ``"snip"``: ``|g ⊙ w|`` with ``g`` the loss gradient summed over all batches of ``data``.
    * ``"grasp"``: ``w ⊙ Hg`` (keep the largest, i.e. remove the largest ``-w ⊙ Hg``) on a class-balanced sample of
      ``samples_per_class`` examples per class taken from ``data``, logits divided by ``temperature``.

    ``scope="global"`` (default, the reference practice for all but random) keeps exactly ``floor(density · Σ N_l)``
    weights under one threshold; ``scope="layer"`` keeps per-layer counts from ``distribution`` (``"erk"`` or
    ``"uniform"``, as SparseTraining). Ties go to the lower flat index (layers in sparse-set order). ``generator`` drives ``"random"`` (default: a fresh generator seeded with 0; the global RNG
    is never used). The sparse set is chosen as in :func:`sparseopt.masks.select_sparse_params` (``example_input``:
    one batch, to find the layers reading the input in models torch.fx cannot trace).
    """
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    params = select_sparse_params(model, include=include, exclude=exclude, module_types=module_types,
                                  prune_first_layer=prune_first_layer, prune_last_layer=prune_last_layer,
                                  example_input=example_input)
    scores = pai_scores(model, params, method, data=data, loss_fn=loss_fn, samples_per_class=samples_per_class,
                        temperature=temperature, generator=generator)
    if method == "random" or scope == "layer":
        counts = layer_nnz({n: tuple(s.shape) for n, s in scores.items()}, density, distribution)
        return {n: _top(s.reshape(-1), counts[n]).view(s.shape) for n, s in scores.items()}
    return _global_masks(scores, density)


def pai_scores(
    model: nn.Module,
    params: Sequence[SparseParam],
    method: str,
    *,
    data: Batches | None = None,
    loss_fn: LossFn = F.cross_entropy,
    samples_per_class: int = 10,
    temperature: float = 200.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Scores (higher = keep) of ``method`` for each of ``params``, computed without changing ``model``."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning-at-initialisation method {method!r}; choose one of {METHODS}")
    if method == "random":
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return {p.name: torch.rand(p.shape, generator=gen, device=gen.device).to(p.param.device) for p in params}
    if method == "magnitude":
        return {p.name: p.param.detach().abs() for p in params}
    if data is None:
        raise ValueError(f"{method!r} scores need data: pass data=<iterable of (inputs, targets) batches>, "
                         "e.g. a DataLoader over a few batches of the training set")
    with _untouched(model):
        if method == "snip":
            return _snip(model, params, data, loss_fn)
        return _grasp(model, params, data, loss_fn, samples_per_class, temperature)


# ---- scorers -----------------------------------------------------------------------------------------------------
def _snip(model, params, data, loss_fn) -> dict[str, torch.Tensor]:
    """|g ⊙ w| with g summed over the batches (= |∂L/∂c| at the all-ones mask c)."""
    weights = [p.param for p in params]
    total = [torch.zeros_like(w) for w in weights]
    seen = 0
    for x, y in _on_device(data, weights[0].device):
        for t, g in zip(total, torch.autograd.grad(loss_fn(model(x), y), weights)):
            t.add_(g)
        seen += 1
    if seen == 0:
        raise ValueError("'snip' got an empty data iterable; pass at least one (inputs, targets) batch")
    return {p.name: (g * p.param.detach()).abs() for p, g in zip(params, total)}


def _grasp(model, params, data, loss_fn, samples_per_class, temperature) -> dict[str, torch.Tensor]:
    """w ⊙ Hg on the class-balanced sample split in two halves, as the reference GraSP code.

    ``g_stop = Σ_halves ∇L_half`` (detached); ``Hg = Σ_halves ∇(g_stop · ∇L_half)`` by double backprop.
    """
    weights = [p.param for p in params]
    x, y = _class_balanced(model, data, samples_per_class, weights[0].device)
    half = x.shape[0] // 2
    halves = [(x[:half], y[:half]), (x[half:], y[half:])]

    def grads(xb, yb, create_graph=False):
        return torch.autograd.grad(loss_fn(model(xb) / temperature, yb), weights, create_graph=create_graph)

    g_stop = [torch.zeros_like(w) for w in weights]
    for xb, yb in halves:
        for s, g in zip(g_stop, grads(xb, yb)):
            s.add_(g)
    hg = [torch.zeros_like(w) for w in weights]
    for xb, yb in halves:
        z = sum((s * g).sum() for s, g in zip(g_stop, grads(xb, yb, create_graph=True)))
        for h, d in zip(hg, torch.autograd.grad(z, weights)):
            h.add_(d)
    return {p.name: p.param.detach() * h for p, h in zip(params, hg)}


def _class_balanced(model, data, samples_per_class, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples_per_class`` examples of every class in ``data``, concatenated in class order.

    The number of classes is the width of the model's output on the first batch.
    """
    if not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class must be a positive int, got {samples_per_class!r}")
    picked: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    for x, y in _on_device(data, device):
        if picked is None:
            with torch.no_grad():
                picked = [[] for _ in range(model(x).shape[-1])]
        for i, label in enumerate(y.tolist()):
            if not 0 <= label < len(picked):
                raise ValueError(f"'grasp' needs class labels in [0, {len(picked)}) (the model's output width), "
                                 f"got {label}")
            if len(picked[label]) < samples_per_class:
                picked[label].append((x[i:i + 1], y[i:i + 1]))
        if all(len(c) == samples_per_class for c in picked):
            break
    if picked is None:
        raise ValueError("'grasp' got an empty data iterable; pass (inputs, targets) batches")
    short = {c: len(s) for c, s in enumerate(picked) if len(s) < samples_per_class}
    if short:
        raise ValueError(f"'grasp' needs samples_per_class={samples_per_class} examples of every class, but the data "
                         f"has only {short} (class: count); pass more data or lower samples_per_class")
    rows = [r for c in picked for r in c]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


# ---- selection ---------------------------------------------------------------------------------------------------
def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of a flat tensor; ties go to the lower index (stable sort)."""
    if torch.isnan(scores).any():
        raise ValueError("pruning scores contain NaN; check the model's initialisation and the data")
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return keep


def _global_masks(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores.values()])
    k = math.floor(density * flat.numel() + 1e-9)
    if k == 0:
        raise ValueError(f"density {density} keeps no weight of the {flat.numel()} in the sparse set; "
                         "raise the density")
    keep = _top(flat, k)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


# ---- leaving the model untouched ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Score in train mode (batch statistics, as the reference SNIP/GraSP code) and restore everything after:
    buffers (BatchNorm running stats), each module's mode and the global RNG (dropout, shuffling loaders).
    Gradients are taken with ``torch.autograd.grad``, so ``.grad`` is never written."""
    modes = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = sorted({b.device.index or 0 for b in [*model.parameters(), *model.buffers()] if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        for m, training in modes.items():
            m.training = training


def _on_device(data: Batches, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in data:
        x, y = batch
        yield x.to(device), y.to(device)
