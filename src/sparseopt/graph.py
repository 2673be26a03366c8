"""Find which weight layers feed a BatchNorm, for SparseOpt's ``scope="bn_followed"``.

The theory (SPEC 1.1) covers a layer whose pre-activations are batch-normalised. We read that off the model:
first by symbolic tracing with torch.fx (no data needed); models fx cannot trace (data-dependent control flow) fall
back to forward hooks on one example batch, which see the tensors actually passed from a layer to a BatchNorm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Ops that keep a per-channel correspondence between a layer's output and a later BatchNorm's input.
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)


def _fx_feeders(model: nn.Module, layers: set[str]) -> dict[str, str]:
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        src = node.args[0]
        while (isinstance(src, torch.fx.Node) and src.op == "call_module"
               and isinstance(modules.get(src.target), _TRANSPARENT_MODULES)):
            src = src.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and src.target in layers:
            found.setdefault(src.target, node.target)
    return found


def _hook_feeders(model: nn.Module, layers: set[str], example_input) -> dict[str, str]:
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    found: dict[str, str] = {}

    def on_layer(name):
        def hook(_mod, _inp, out):
            produced[id(out)] = name
        return hook

    def on_bn(bn_name):
        def hook(_mod, inp, _out):
            name = produced.get(id(inp[0]))
            if name is not None:
                found.setdefault(name, bn_name)
        return hook

    handles = [modules[n].register_forward_hook(on_layer(n)) for n in layers]
    handles += [m.register_forward_hook(on_bn(n)) for n, m in modules.items() if isinstance(m, _BatchNorm)]
    was_training = model.training
    try:
        model.eval()  # eval: no BatchNorm running-statistics update from this probe
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def layers_feeding_batchnorm(model: nn.Module, layer_names: Iterable[str], example_input=None) -> set[str]:
    """Names of the modules among ``layer_names`` whose output goes (directly) into a BatchNorm.

    Raises ``ValueError`` naming the fix when the model cannot be traced and no ``example_input`` is given.
    """
    return set(batchnorm_after(model, layer_names, example_input))


def batchnorm_after(model: nn.Module, layer_names: Iterable[str], example_input=None) -> dict[str, str]:
    """``{layer: name of the BatchNorm module it feeds}`` for the layers among ``layer_names`` that feed one (the
    first, if several): the neuron-health report and ``SparseOpt(factor_source="batchnorm")`` read its per-channel
    statistics. Same tracing and errors as :func:`layers_feeding_batchnorm`."""
    layers = set(layer_names)
    try:
        return _fx_feeders(model, layers)
    except Exception as err:  # fx raises many types for untraceable code
        if example_input is None:
            raise ValueError(
                f"cannot trace {type(model).__name__} with torch.fx to find the layers that feed a BatchNorm "
                f"({type(err).__name__}: {err}); pass example_input=<one batch> to SparseOpt(scope='bn_followed') "
                "so the layers are found with forward hooks, or use scope='all'"
            ) from err
        return _hook_feeders(model, layers, example_input)
