"""Read the model's data flow: which weight layers feed a BatchNorm, and which read the model input.

SparseOpt's ``scope="bn_followed"`` needs the first (SPEC 1.1: the theory covers a layer whose pre-activations are
batch-normalised); the "first layer stays dense" rule needs the second. Both are read off the model by symbolic
tracing with torch.fx (no data needed), with every registered weight layer and every ``_BatchNorm`` subclass kept
as a leaf, so normalisation written outside ``torch.nn`` (timm's ``BatchNormAct2d``) is seen as one node, and bare
``F.batch_norm`` calls are recognised too. Models fx cannot trace (data-dependent control flow, Hugging Face models)
are probed instead with one example batch: forward hooks and a ``TorchFunctionMode`` see the tensors actually
passed between layers, including ``F.batch_norm`` calls made by any module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sparseopt.layouts import layout_of
from sparseopt.wrappers import unwrap_model

# Ops that keep a per-channel correspondence between a layer's output and a later BatchNorm's input.
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)


class _LayerTracer(torch.fx.Tracer):
    """Keeps registered weight layers and BatchNorms (wherever they are defined) as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return layout_of(m) is not None or isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``model`` with weight layers and BatchNorms as leaves; raises if fx cannot trace it."""
    return _LayerTracer().trace(model)


def call_model(model: nn.Module, example_input):
    """``model(*x)`` for a tuple, ``model(**x)`` for a mapping (Hugging Face batches), else ``model(x)``."""
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, Mapping):
        return model(**example_input)
    return model(example_input)


class _Probe:
    """Runs one example batch through the model in eval mode without gradients and with the random state restored
    (no BatchNorm statistics or RNG change: training is the same with or without the probe)."""

    def __init__(self, model: nn.Module, example_input) -> None:
        self.model, self.example_input = model, example_input

    def run(self, mode: TorchFunctionMode, handles: list) -> None:
        was_training = self.model.training
        try:
            self.model.eval()
            devices = sorted({t.device.index or 0 for t in tree_leaves(self.example_input)
                              if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices), torch.no_grad(), mode:
                call_model(self.model, self.example_input)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()


# ---- which layers feed a BatchNorm ---------------------------------------------------------------------------
def _caller(node: torch.fx.Node) -> str:
    """The module whose forward made a traced function call (an ``F.batch_norm`` inside a custom norm module)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else node.name


def _fx_feeders(model: nn.Module, layers: set[str]) -> dict[str, str]:
    graph = trace(model)
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), _BatchNorm):
            bn = node.target
        elif node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
            bn = _caller(node)
        else:
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        while (isinstance(src, torch.fx.Node) and src.op == "call_module"
               and isinstance(modules.get(src.target), _TRANSPARENT_MODULES)):
            src = src.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and src.target in layers:
            found.setdefault(src.target, bn)
    return found


class _BatchNormWatch(TorchFunctionMode):
    """Records which layer produced the input of every ``F.batch_norm`` call, and which module made the call."""

    def __init__(self, produced: dict[int, str], found: dict[str, str], stack: list[str]) -> None:
        super().__init__()
        self.produced, self.found, self.stack = produced, found, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _BATCH_NORM_FUNCTIONS:
            source = args[0] if args else (kwargs or {}).get("input")
            name = self.produced.get(id(source))
            if name is not None:
                self.found.setdefault(name, self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


def _hook_feeders(model: nn.Module, layers: set[str], example_input) -> dict[str, str]:
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    outputs: list[torch.Tensor] = []  # kept alive so that no id is reused during the probe
    found: dict[str, str] = {}
    stack: list[str] = []  # names of the modules whose forward is running, innermost last

    def on_layer(name):
        def hook(_mod, _inp, out):
            produced[id(out)] = name
            outputs.append(out)
        return hook

    def enter(name):
        def hook(_mod, _inp):
            stack.append(name)
        return hook

    def leave(bn_name):
        def hook(mod, inp, _out):
            stack.pop()
            if isinstance(mod, _BatchNorm):  # one that normalises without F.batch_norm
                name = produced.get(id(inp[0])) if inp else None
                if name is not None:
                    found.setdefault(name, bn_name)
        return hook

    handles = [modules[n].register_forward_hook(on_layer(n)) for n in layers]
    for n, m in modules.items():
        handles += [m.register_forward_pre_hook(enter(n)), m.register_forward_hook(leave(n))]
    _Probe(model, example_input).run(_BatchNormWatch(produced, found, stack), handles)
    return found


def layers_feeding_batchnorm(model: nn.Module, layer_names: Iterable[str], example_input=None) -> set[str]:
    """Names of the modules among ``layer_names`` whose output goes (directly) into a BatchNorm: any ``_BatchNorm``
    subclass, or any ``F.batch_norm`` call.

    Raises ``ValueError`` naming the fix when the model cannot be traced and no ``example_input`` is given.
    """
    return set(batchnorm_after(model, layer_names, example_input))


def batchnorm_after(model: nn.Module, layer_names: Iterable[str], example_input=None) -> dict[str, str]:
    """``{layer: name of the BatchNorm module it feeds}`` for the layers among ``layer_names`` that feed one (the
    first, if several): the neuron-health report and ``SparseOpt(factor_source="batchnorm")`` read its per-channel
    statistics. Same tracing and errors as :func:`layers_feeding_batchnorm`. DDP and torch.compile wrappers are
    seen through (names keep their prefix)."""
    bare, prefix = unwrap_model(model)
    layers = {n[len(prefix):] for n in layer_names if n.startswith(prefix)}
    return {prefix + layer: prefix + bn for layer, bn in _batchnorm_after(bare, layers, example_input).items()}


def _batchnorm_after(model: nn.Module, layers: set[str], example_input) -> dict[str, str]:
    try:
        return _fx_feeders(model, layers)
    except Exception as err:  # fx raises many types for untraceable code
        if example_input is None:
            raise ValueError(
                f"cannot trace {type(model).__name__} with torch.fx to find the layers that feed a BatchNorm "
                f"({type(err).__name__}: {err}); pass example_input=<one batch> to SparseOpt(scope='bn_followed') "
                "so the layers are found with forward hooks, or use scope='all' or a list of layer names"
            ) from err
        return _hook_feeders(model, layers, example_input)


# ---- which layers read the model input -----------------------------------------------------------------------
def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if layout_of(m) is not None}


def _fx_input_layers(model: nn.Module) -> set[str]:
    """A value is *raw* when it is computed from the inputs through no weight layer; a layer reading a raw value
    reads the input. A value mixing a raw and a processed input (an attention mask added to scores) is processed."""
    weight_layers = _weight_layers(model)
    raw: set[torch.fx.Node] = set()
    processed: set[torch.fx.Node] = set()
    found: set[str] = set()
    for node in trace(model).nodes:
        if node.op == "placeholder":
            raw.add(node)
            continue
        inputs = node.all_input_nodes
        if node.op == "call_module" and node.target in weight_layers:
            if any(i in raw for i in inputs):
                found.add(node.target)
            processed.add(node)
        elif any(i in processed for i in inputs):
            processed.add(node)
        elif any(i in raw for i in inputs):
            raw.add(node)
    return found


class _Provenance(TorchFunctionMode):
    """Marks tensors computed from the model input outside weight layers (raw) or from a weight layer's output."""

    def __init__(self, raw: dict[int, torch.Tensor], processed: dict[int, torch.Tensor], depth: list[int]) -> None:
        super().__init__()
        self.raw, self.processed, self.depth = raw, processed, depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth[0] == 0:
            ids = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            target = (self.processed if ids & self.processed.keys() else self.raw if ids & self.raw.keys()
                      else None)
            if target is not None:
                target.update((id(o), o) for o in tree_leaves(out) if isinstance(o, torch.Tensor))
        return out


def _probe_input_layers(model: nn.Module, example_input) -> set[str]:
    raw = {id(t): t for t in tree_leaves(example_input) if isinstance(t, torch.Tensor)}
    processed: dict[int, torch.Tensor] = {}
    depth = [0]
    found: set[str] = set()

    def before(name):
        def hook(_mod, args, kwargs):
            if depth[0] == 0:
                ids = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
                if ids & raw.keys() and not ids & processed.keys():
                    found.add(name)
            depth[0] += 1
        return hook

    def after(_mod, _args, out):
        depth[0] -= 1
        if depth[0] == 0:
            processed.update((id(o), o) for o in tree_leaves(out) if isinstance(o, torch.Tensor))

    handles = []
    for name, module in _weight_layers(model).items():
        handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    _Probe(model, example_input).run(_Provenance(raw, processed, depth), handles)
    return found


def layers_reading_input(model: nn.Module, example_input=None) -> tuple[set[str], str]:
    """Module names of the weight layers that read the model input (through no other weight layer), and how that
    was found: ``"fx"`` or ``"probe"`` (one ``example_input`` batch). Raises ``ValueError`` when fx cannot trace
    the model and no example is given. DDP and torch.compile wrappers are seen through (names keep their prefix)."""
    bare, prefix = unwrap_model(model)
    if layout_of(bare) is not None:
        return {prefix[:-1]}, "the model is one layer"
    try:
        found, how = _fx_input_layers(bare), "fx"
    except Exception as err:  # fx raises many types for untraceable code
        if example_input is None:
            raise ValueError(f"torch.fx cannot trace {type(bare).__name__} ({type(err).__name__}: {err})") from err
        found, how = _probe_input_layers(bare, example_input), "probe"
    return {prefix + n for n in found}, how
