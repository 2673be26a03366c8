"""``build_model(name, num_classes, in_shape, **kwargs)``: config names to modules.

Built-in names take what they need from ``in_shape`` (flattened size, input channels); any other name of the
form ``"package.module:callable"`` imports a user factory, so experiments can plug in a model without editing
this package.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .cnn import SmallCNN
from .mlp import MLP, mlp_bn_mnist
from .norm import Norm
from .resnet_cifar import resnet20, resnet32, resnet56
from .resnet_imagenet import resnet50


def _mlp(
    num_classes: int,
    in_shape: Sequence[int],
    hidden: Sequence[int] = (300, 100),
    norm: Norm = "none",
    bias: bool = True,
) -> nn.Module:
    """LeNet-300-100 by default, the classic sparse-training MLP baseline."""
    return MLP(math.prod(in_shape), hidden, num_classes, norm=norm, bias=bias)


def _mlp_bn_mnist(num_classes: int, in_shape: Sequence[int], norm: Norm = "batch", bias: bool = True) -> nn.Module:
    return mlp_bn_mnist(num_classes, in_features=math.prod(in_shape), norm=norm, bias=bias)


def _cnn(num_classes: int, in_shape: Sequence[int], norm: str = "batch") -> nn.Module:
    return SmallCNN(num_classes, in_channels=in_shape[0], norm=norm)


def _channels_first(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Adapt a ``factory(num_classes, in_channels, **kw)`` to the registry's ``(num_classes, in_shape, **kw)``."""

    def build(num_classes: int, in_shape: Sequence[int], **kwargs: Any) -> nn.Module:
        return factory(num_classes=num_classes, in_channels=in_shape[0], **kwargs)

    build.__doc__ = factory.__doc__
    build.options_from = factory  # type: ignore[attr-defined]  # what model_options inspects
    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "mlp_bn_mnist": _mlp_bn_mnist,
    "cnn": _cnn,
    "resnet20": _channels_first(resnet20),
    "resnet32": _channels_first(resnet32),
    "resnet56": _channels_first(resnet56),
    "resnet50": _channels_first(resnet50),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, num_classes: int, in_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Instantiate a registered model, or call ``"package.module:callable"`` with the kwargs.

    A user factory also receives ``num_classes`` and ``in_shape`` when its signature accepts them.
    """
    in_shape = tuple(in_shape)
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes, in_shape, **kwargs)
    if ":" in name:
        return _call_factory(name, num_classes, in_shape, kwargs)
    raise _unknown_model(name)


def _unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(name, MODEL_NAMES, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(
        f"unknown model {name!r}.{hint} Allowed names: {', '.join(MODEL_NAMES)}, or 'package.module:callable'."
    )


#: Arguments a model receives from the data, never from ``model.options``.
DATA_ARGUMENTS = ("num_classes", "in_shape", "in_channels", "in_features")


def model_options(name: str) -> dict[str, inspect.Parameter] | None:
    """The options (keyword arguments besides those from the data) model ``name`` takes; None if it takes any
    (a ``**kwargs`` factory). Lets a config's ``model.options`` be checked, with suggestions, before building."""
    if name in _REGISTRY:
        factory = _REGISTRY[name]
    elif ":" in name:
        factory = _resolve_factory(name)
    else:
        raise _unknown_model(name)
    try:
        params = inspect.signature(getattr(factory, "options_from", factory)).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in params.items() if p.kind in keyword and n not in DATA_ARGUMENTS}


def _call_factory(spec: str, num_classes: int, in_shape: tuple[int, ...], kwargs: dict[str, Any]) -> nn.Module:
    target = _resolve_factory(spec)
    extra = {"num_classes": num_classes, "in_shape": in_shape}
    model = target(**{k: v for k, v in extra.items() if _accepts(target, k)}, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _resolve_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for model {spec!r}: {exc}") from exc
    try:
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} (model {spec!r})") from None
    if not callable(target):
        raise ValueError(f"model factory {spec!r} is not callable")
    return target


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
