"""Ship a trained sparse model: a compact safetensors file, a baked state dict, CSR Linear layers for inference.

The file format (docs/export.md) is plain safetensors, so a deployment reads it with ``safetensors`` and ``torch``
alone. Dense tensors keep their state-dict key. A sparse weight ``k`` becomes two tensors: ``k::values`` (the active
entries, row-major order) and ``k::mask`` (uint8, bit ``j % 8`` of byte ``j // 8``, least significant first, set when
flat entry ``j`` is active). The header metadata holds ``format`` = ``sparseopt.sparse``, ``format_version``,
``sparse`` (JSON ``{key: shape}``) and ``aliases`` (JSON ``{key: key it shares storage with}``, tied weights).
The mask is stored, not inferred from zeros: right after a mask update the newly grown weights are active zeros.

``safetensors`` is an optional dependency (``pip install sparseopt[export]``), imported only when a file is read or
written, so ``import sparseopt`` still needs torch alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseopt.bits import pack_mask, unpack_mask

FORMAT = "sparseopt.sparse"
FORMAT_VERSION = "1"
VALUES, MASK = "::values", "::mask"


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_sparse` wrote, with the size a dense safetensors file of the same state would take."""

    path: Path
    file_bytes: int
    dense_bytes: int
    sparse_tensors: int
    nnz: int
    sparse_numel: int

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.dense_bytes


def _masks_of(source, masks: Mapping[str, torch.Tensor] | None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model, masks) from a SparseTraining or from a model plus its masks."""
    if hasattr(source, "model") and hasattr(source, "masks") and not isinstance(source, nn.Module):
        if masks is not None:
            raise ValueError("give masks only with a plain model; a SparseTraining already holds its masks")
        return source.model, dict(source.masks)
    if not isinstance(source, nn.Module):
        raise TypeError(f"expected a SparseTraining or an nn.Module, got {type(source).__name__}")
    if masks is None:
        raise ValueError("a plain model needs masks={name: bool tensor} (e.g. SparseTraining(...).masks)")
    return source, dict(masks)


def _checked(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    for name, m in masks.items():
        if name not in state:
            raise ValueError(f"mask {name!r} names no entry of the model's state dict; known: {sorted(state)[:8]}...")
        if m.shape != state[name].shape:
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, the weight {tuple(state[name].shape)}")


def _aliases(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{key: stored key} for state-dict keys that are the same tensor as another (tied weights): stored once, under
    the masked key when one of them is masked, else under the first."""
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        if t.numel():
            groups.setdefault((t.data_ptr(), t.shape, t.stride(), t.dtype), []).append(key)
    out = {}
    for keys in groups.values():
        stored = next((k for k in keys if k in masks), keys[0])
        out.update({k: stored for k in keys if k != stored})
    return out


def bake(source, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict with every mask applied: loads into the unmodified architecture, no sparseopt needed.

    ``source`` is a :class:`~sparseopt.SparseTraining` or a model with ``masks``; the model is not changed."""
    model, masks = _masks_of(source, masks)
    state = model.state_dict()
    _checked(state, masks)
    aliases = _aliases(state, masks)
    out = {}
    for key, t in state.items():
        target = masks.get(aliases.get(key, key))
        out[key] = t.detach() * target.to(device=t.device, dtype=t.dtype) if target is not None else t.detach().clone()
    return out


def export_sparse(path: str | os.PathLike, source, masks: Mapping[str, torch.Tensor] | None = None, *,
                  metadata: Mapping[str, str] | None = None) -> ExportSummary:
    """Write ``source`` (a SparseTraining, or a model with ``masks``) to ``path`` as compact safetensors.

    The file replaces ``path`` atomically (nothing is left behind on error). ``metadata`` adds string entries to the
    header (``format``, ``format_version``, ``sparse`` and ``aliases`` are reserved). Read it back with
    :func:`load_sparse` or the ten-line loader of docs/export.md."""
    from safetensors.torch import save_file

    model, masks = _masks_of(source, masks)
    state = model.state_dict()
    _checked(state, masks)
    extra = dict(metadata or {})
    reserved = sorted({"format", "format_version", "sparse", "aliases"} & set(extra))
    if reserved or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError(f"metadata must map str to str and not use the reserved keys {reserved or ''} "
                         "(format, format_version, sparse, aliases)")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export path {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    aliases = _aliases(state, masks)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    nnz = sparse_numel = dense_bytes = 0
    for key, t in state.items():
        t = t.detach().cpu()
        dense_bytes += t.numel() * t.element_size()
        if key in aliases:
            continue
        if key in masks:
            m = masks[key].detach().cpu().bool()
            tensors[key + VALUES] = t[m].contiguous()
            tensors[key + MASK] = pack_mask(m)
            shapes[key] = list(t.shape)
            nnz += int(m.sum())
            sparse_numel += m.numel()
        else:
            tensors[key] = t.contiguous().clone()
    header = {**extra, "format": FORMAT, "format_version": FORMAT_VERSION, "sparse": json.dumps(shapes),
              "aliases": json.dumps(aliases)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportSummary(path, path.stat().st_size, dense_bytes, len(shapes), nnz, sparse_numel)


def load_sparse(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict with dense, masked weights; masks) from a file written by :func:`export_sparse`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a sparseopt export (header format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}); write it with sparseopt.export.export_sparse")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} has format_version {meta.get('format_version')!r}; this sparseopt "
                             f"reads {FORMAT_VERSION!r}")
        shapes = json.loads(meta["sparse"])
        state = {k: f.get_tensor(k) for k in f.keys() if VALUES not in k and MASK not in k}
        masks = {}
        for key, shape in shapes.items():
            mask = unpack_mask(f.get_tensor(key + MASK), shape)
            values = f.get_tensor(key + VALUES)
            state[key] = values.new_zeros(tuple(shape)).masked_scatter_(mask, values)
            masks[key] = mask
    for alias, target in json.loads(meta["aliases"]).items():
        state[alias] = state[target]
        if target in masks:
            masks[alias] = masks[target]
    return state, masks
