"""Which parameters carry masks, and exact-count random masks.

Kept apart from the training pipeline so that pruning-at-initialisation, diagnostics and users can pick the same
sparse set and draw the same masks without building a trainer.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseopt.graph import layers_reading_input
from sparseopt.layouts import Layout, layout_of


@dataclass(frozen=True)
class SparseParam:
    """A weight that carries a mask: its qualified name, owning module, the tensor itself and its axes."""

    name: str
    module: nn.Module
    param: nn.Parameter
    layout: Layout = Layout()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def out_axis(self) -> int:
        return self.layout.out_axis


@dataclass(frozen=True)
class SparsePlan:
    """The sparse set, and every other weight layer with the reason it stays dense (for the report and logs)."""

    sparse: list[SparseParam]
    dense: dict[str, str] = field(default_factory=dict)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _type_names(types) -> list[str]:
    return [t.__name__ for t in types]


def _eligible(module: nn.Module, module_types: tuple[type[nn.Module], ...] | None) -> bool:
    layout = layout_of(module)
    if module_types is None:
        return layout is not None and layout.sparse_by_default
    return isinstance(module, module_types)


def _check_layouts(module_types: tuple[type[nn.Module], ...]) -> None:
    unknown = [t for t in module_types if layout_of(t) is None]
    if unknown:
        raise ValueError(f"module_types {_type_names(unknown)} have no registered weight layout; call "
                         "sparseopt.register_layout(<type>, out_axis=..., in_axis=...) to say which weight axis "
                         "holds the output units")


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every (module name, module) holding each parameter, tied ones under several names."""
    out: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            out.setdefault(id(param), []).append((mod_name, module))
    return out


def _tied_reason(param: nn.Parameter, owners, module_types) -> str | None:
    """Why a weight shared with a module outside the sparse types (a tied embedding) must not be sparse silently."""
    others = [(n, m) for n, m in owners.get(id(param), []) if not _eligible(m, module_types)]
    if not others:
        return None
    where = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in others)
    return f"tied to {where}: a mask would also zero those entries (name it in include= to sparsify it anyway)"


def _warn_mixed_layouts(c: SparseParam, owners) -> None:
    """A weight shared by layers that disagree on its output axis (an embedding tied to a head): say whose wins."""
    users = [(n, m) for n, m in owners.get(id(c.param), []) if layout_of(m) not in (None, c.layout)]
    if users:
        where = ", ".join(f"{n} ({type(m).__name__})" for n, m in users)
        warnings.warn(f"sparse weight {c.name} is shared with {where}, which read(s) it along other axes; fan-in, "
                      f"factors and init follow {type(c.module).__name__}'s layout (output axis {c.out_axis})",
                      stacklevel=4)


def _first_layers(model: nn.Module, candidates: list[SparseParam], example_input) -> tuple[set[str], str]:
    """Weights of the layers that read the model input, and how they were found (for the dense-layer reason)."""
    module_names = {c.name.rsplit(".", 1)[0] if "." in c.name else "": c.name for c in candidates}
    try:
        readers, how = layers_reading_input(model, example_input)
    except ValueError as err:
        first = next(((n, m) for n, m in model.named_modules() if layout_of(m) is not None), None)
        kept = module_names.get(first[0]) if first else None
        what = (f"the first layer in registration order, {kept}, stays dense" if kept else
                f"the first weight layer in registration order, {first[0]} ({type(first[1]).__name__}), is not "
                "sparse, so no layer is kept dense by this rule")
        warnings.warn(f"first-layer rule: {err}, so {what}; pass example_input=<one batch> to find the layers that "
                      "read the input, or prune_first_layer=True / exclude=[...] to decide", stacklevel=4)
        return ({kept} if kept else set()), "the first layer in registration order"
    return {module_names[m] for m in readers if m in module_names}, f"reads the model input (found by {how})"


def sparsifiable_weights(model: nn.Module,
                         module_types: Iterable[type[nn.Module]] | None = None) -> list[SparseParam]:
    """Every weight (>= 2 dims) of a module of ``module_types`` (default: the types registered as sparse by
    default), in registration order, before any first/last/tied/include/exclude rule."""
    if module_types is not None:
        module_types = tuple(module_types)
        _check_layouts(module_types)
    candidates, seen = [], set()
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if _eligible(module, module_types) and isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            if id(weight) not in seen:  # a weight shared by several modules (tied) gets one mask
                seen.add(id(weight))
                candidates.append(SparseParam(f"{mod_name}.weight" if mod_name else "weight", module, weight,
                                              layout_of(module)))
    if not candidates:
        wanted = (_type_names(module_types) if module_types is not None else
                  "the registered sparse-by-default types (Linear, ConvNd, transformers Conv1D)")
        raise ValueError(
            f"{type(model).__name__} has no weights of types {wanted} to sparsify; pass module_types=... naming "
            "the layer types that should carry masks (register new types with sparseopt.register_layout)"
        )
    return candidates


def plan_sparse_params(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Iterable[type[nn.Module]] | None = None,
    prune_first_layer: bool = False,
    prune_last_layer: bool = True,
    example_input=None,
) -> SparsePlan:
    """Pick the weights to sparsify, and say why each other weight layer stays dense.

    Default: the ``weight`` of every module whose type is registered as sparse by default (``nn.Linear``,
    ``nn.ConvNd``, Hugging Face ``Conv1D``; see :func:`sparseopt.register_layout`), except

    * the layers that read the model input (the stem: a dense stem is the reference practice of RigL and
      JaxPruner). They are found by torch.fx, or with ``example_input`` by one probing forward pass; when neither
      works, the first weight layer in registration order stands in, with a warning. A transformer's input is
      read by its embedding, so no projection is kept dense by this rule;
    * weights tied to a module outside the sparse types (a language-model head tied to the token embedding).

    Embeddings (and other types registered with ``sparse_by_default=False``) are sparse only when ``module_types``
    names them. ``include``/``exclude`` are glob patterns on parameter names (``"layer1.*"``, ``"*.fc.weight"``);
    an ``include`` list replaces the default rules, but still only weights of the chosen module types with at
    least 2 dims are eligible. Biases and normalisation parameters are never sparse.
    """
    if module_types is not None:
        module_types = tuple(module_types)
    candidates = sparsifiable_weights(model, module_types)
    seen = {id(c.param) for c in candidates}
    owners = _owners(model)
    all_names = {c.name for c in candidates}
    for pattern in [*(include or ()), *exclude]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
            raise ValueError(
                f"pattern {pattern!r} matches no sparsifiable weight; known weights: {sorted(all_names)}"
            )
    dense: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, nn.Parameter) and id(weight) not in seen and layout_of(module) is not None
                and not _eligible(module, module_types)):
            seen.add(id(weight))
            dense[f"{mod_name}.weight"] = (f"{type(module).__name__} is dense unless module_types names it"
                                           if module_types is None else f"{type(module).__name__} is not in "
                                           "module_types")
    tied = {c.name: r for c in candidates if (r := _tied_reason(c.param, owners, module_types))}
    if include is not None:
        chosen = [c for c in candidates if _matches(c.name, include)]
        dense.update({c.name: "not matched by include" for c in candidates if c not in chosen})
    else:
        dense.update(tied)
        chosen = [c for c in candidates if c.name not in tied]
        if not prune_first_layer and chosen:
            first, why = _first_layers(model, chosen, example_input)
            dense.update({n: f"first layer: {why} (prune_first_layer=True sparsifies it)" for n in first})
            chosen = [c for c in chosen if c.name not in first]
        if not prune_last_layer and candidates[-1] in chosen:
            dense[candidates[-1].name] = "last layer (prune_last_layer=False)"
    for c in chosen:
        hit = next((p for p in exclude if fnmatch.fnmatchcase(c.name, p)), None)
        if hit is not None:
            dense[c.name] = f"matched exclude={hit!r}"
    chosen = [c for c in chosen if c.name not in dense]
    for c in chosen:
        if c.name in tied:
            warnings.warn(f"{c.name} is made sparse although it is {tied[c.name].split(':')[0]}: its mask also "
                          "zeroes entries of the tied module (e.g. whole token embeddings)", stacklevel=3)
        else:
            _warn_mixed_layouts(c, owners)
    if not chosen:
        raise ValueError(
            "no weight is left to sparsify after the include/exclude/first/last-layer/tied-weight rules "
            f"(candidates: {sorted(all_names)}; dense: {dense}); relax exclude or set prune_first_layer=True"
        )
    return SparsePlan(chosen, dense)


def select_sparse_params(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Iterable[type[nn.Module]] | None = None,
    prune_first_layer: bool = False,
    prune_last_layer: bool = True,
    example_input=None,
) -> list[SparseParam]:
    """The weights to sparsify, by the rules of :func:`plan_sparse_params`."""
    return plan_sparse_params(model, include=include, exclude=exclude, module_types=module_types,
                              prune_first_layer=prune_first_layer, prune_last_layer=prune_last_layer,
                              example_input=example_input).sparse


def nnz_for_density(numel: int, density: float) -> int:
    """Active count for a density: ``numel - floor(sparsity * numel)`` (exactly RigL's count of zeros)."""
    return numel - int((1.0 - density) * numel + 1e-9)


def random_mask(
    shape: Sequence[int] | torch.Size, nnz: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A bool mask with exactly ``nnz`` ones at uniformly random positions (top-k of uniform scores)."""
    numel = int(torch.Size(shape).numel())
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} is outside [0, {numel}] for a tensor of shape {tuple(shape)}")
    scores = torch.rand(numel, generator=generator, device=device)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[torch.topk(scores, nnz, sorted=False).indices] = True
    return mask.view(tuple(shape))


def fan_in(mask: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """Active fan-in k_i of every output unit: entries along every axis but ``out_axis`` (0 for Linear/Conv
    weights, 1 for Hugging Face ``Conv1D``; see :mod:`sparseopt.layouts`)."""
    return mask.movedim(out_axis, 0).reshape(mask.shape[out_axis], -1).count_nonzero(dim=1)


def per_unit(values: torch.Tensor, ndim: int, out_axis: int = 0) -> torch.Tensor:
    """One value per output unit, viewed to broadcast over a weight of ``ndim`` dims along ``out_axis``."""
    shape = [1] * ndim
    shape[out_axis] = -1
    return values.reshape(shape)


def unit_grid(shape: Sequence[int] | torch.Size, out_axis: int = 0, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """Flat indices of a weight arranged as ``(output units, fan-in capacity)``: row i lists unit i's entries.
    Per-neuron selections work on this grid whatever the layout (Hugging Face ``Conv1D`` is (in, out))."""
    shape = torch.Size(shape)
    return torch.arange(shape.numel(), device=device).view(shape).movedim(out_axis, 0).reshape(shape[out_axis], -1)


def unit_of(flat: torch.Tensor, shape: Sequence[int] | torch.Size, out_axis: int = 0) -> torch.Tensor:
    """The output unit of each flat index of a weight of ``shape``."""
    shape = torch.Size(shape)
    stride = shape[out_axis + 1:].numel()
    return torch.div(flat, stride, rounding_mode="floor") % shape[out_axis]


def constant_fan_in_mask(shape: Sequence[int] | torch.Size, fan: int, generator: torch.Generator,
                         device: torch.device | str = "cpu", out_axis: int = 0) -> torch.Tensor:
    """A bool mask in which every output unit has exactly ``fan`` active inputs, at uniformly random positions."""
    grid = unit_grid(shape, out_axis, device)
    if not 0 <= fan <= grid.shape[1]:
        raise ValueError(f"fan-in {fan} is outside [0, {grid.shape[1]}] for a weight of shape {tuple(shape)}")
    scores = torch.rand(grid.shape, generator=generator, device=device)
    mask = torch.zeros(grid.numel(), dtype=torch.bool, device=device)
    mask[grid.gather(1, torch.topk(scores, fan, dim=1, sorted=False).indices).reshape(-1)] = True
    return mask.view(tuple(shape))


def constant_fan_in_nnz(shape: Sequence[int] | torch.Size, nnz: int, out_axis: int = 0) -> int:
    """The layer count nearest ``nnz`` that every output unit can share: ``units · k``, k = round(nnz / units)
    in [1, fan-in capacity]."""
    shape = torch.Size(shape)
    units = shape[out_axis]
    fan = min(max(1, round(nnz / units)), shape.numel() // units)
    return fan * units
