"""Which axis of a layer's weight indexes its output units (neurons), and which its inputs.

Why: fan-in, SparseOpt's per-neuron factors, sparse init, ERK and the dead-unit count are all per *output unit*.
``nn.Linear`` and ``nn.ConvNd`` store the output axis first; Hugging Face's ``Conv1D`` (GPT-2) stores ``(in, out)``;
an embedding's rows are its inputs (tokens). One registry answers the question for every module type, so no code
has to assume axis 0. Types are keyed by class path, so transformers' ``Conv1D`` is known (and sparse by default)
without the core ever importing transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    """Axes of a module's ``weight``: ``out_axis`` indexes output units, ``in_axis`` input units (every other axis,
    e.g. a kernel position, counts towards fan-in). ``sparse_by_default``: part of the default sparse set."""

    out_axis: int = 0
    in_axis: int = 1
    sparse_by_default: bool = True


_LAYOUTS: dict[str, Layout] = {}


def class_path(cls: type) -> str:
    """``module.QualName`` of a class: the registry key."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layout(module_type: type[nn.Module] | str, *, out_axis: int = 0, in_axis: int = 1,
                    sparse_by_default: bool = True) -> None:
    """Declare the weight layout of ``module_type`` (a class, or its path ``"package.module.Class"`` to avoid
    importing it). Subclasses inherit it; a later registration replaces an earlier one.

    ``sparse_by_default=False`` keeps such layers dense unless ``module_types=`` names the type (embeddings).
    """
    if isinstance(module_type, str):
        key = module_type
    elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
        key = class_path(module_type)
    else:
        raise TypeError(f"register_layout needs an nn.Module subclass or its class path, got {module_type!r}")
    for value, what in ((out_axis, "out_axis"), (in_axis, "in_axis")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} must be a non-negative int (an axis of the weight), got {value!r}")
    if out_axis == in_axis:
        raise ValueError(f"out_axis and in_axis must differ, both are {out_axis}")
    _LAYOUTS[key] = Layout(out_axis, in_axis, bool(sparse_by_default))


def layout_of(module: nn.Module | type) -> Layout | None:
    """The layout registered for the module's class or its nearest registered base class; None if unknown."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        layout = _LAYOUTS.get(class_path(base))
        if layout is not None:
            return layout
    return None


def registered_layouts() -> dict[str, Layout]:
    """A copy of the registry, ``{class path: Layout}``."""
    return dict(_LAYOUTS)


for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layout(_cls)  # weight (out, in[/groups], *kernel)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layout(_cls, out_axis=1, in_axis=0, sparse_by_default=False)  # weight (in, out/groups, *kernel)
for _cls in (nn.Embedding, nn.EmbeddingBag):
    register_layout(_cls, out_axis=1, in_axis=0, sparse_by_default=False)  # weight (tokens, dim): rows are inputs
register_layout("transformers.pytorch_utils.Conv1D", out_axis=1, in_axis=0)  # GPT-2: weight (in, out)
