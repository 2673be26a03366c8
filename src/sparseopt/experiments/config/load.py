"""Typed YAML configs: check a plain dict against a dataclass schema and report every problem at once.

The schema lives elsewhere as nested dataclasses. Configs arrive as dicts (YAML files, presets, `--set` overrides);
`from_dict` validates them recursively and lists *all* problems, one per line, each naming the dotted key, the bad
value and what would be accepted, so a user fixes a config in one pass instead of one error per run.

Supported field types: int, float, str, bool, `Literal[...]`, `X | None`, `list[T]`, `dict[str, T]` and nested
dataclasses. Ranges and help text go in field metadata, most easily through `option`::

    lr: float = option(0.1, gt=0, le=1, help="peak learning rate")
    # the same as field(default=0.1, metadata={"gt": 0, "le": 1, "help": "peak learning rate"})

`gt`, `ge`, `lt`, `le` bound a number (every element of a list, every value of a dict); None is never
range-checked. A schema can enforce cross-field rules by raising ValueError in `__post_init__`; the message is
reported with the section's key like any other error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import operator
import os
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

import yaml

from sparseopt.experiments.run.checkpoint import atomic_write
from sparseopt.experiments.errors import UserError

T = TypeVar("T")

_BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}
_INVALID = object()  # conversion failed; the reason is already in the error list


class ConfigError(UserError):
    """One or more problems in a config. `errors` has one message per problem; str() joins them by lines."""

    def __init__(self, errors: str | list[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, help: str = "",
           gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None) -> Any:
    """A dataclass field carrying range bounds and help text in its metadata."""
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    metadata: dict[str, Any] = {name: value for name, value in bounds.items() if value is not None}
    if help:
        metadata["help"] = help
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build `cls` from `data`, or raise ConfigError listing every problem. `path` prefixes the reported keys."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    errors: list[str] = []
    result = _build(cls, data, path, errors)
    if errors:
        raise ConfigError(errors)
    return result


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a config object (what `from_dict` takes back)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any, path: str | os.PathLike[str]) -> None:
    """Atomically write a config object (or plain dict) as YAML, keeping the schema's key order."""
    data = obj if isinstance(obj, dict) else to_dict(obj)
    with atomic_write(path) as f:
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None, allow_unicode=True)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable, malformed or empty file becomes a ConfigError.

    An empty (or comment-only) file is refused rather than read as "all defaults": a run nobody configured is
    never what was meant. A key written twice in one mapping is refused too (PyYAML would keep the last one).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    try:
        data = parse_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_yaml_location(exc, str(path))}: malformed YAML: {_yaml_problem(exc)}") from None
    if data is None:
        raise ConfigError(f"{path} is empty (no keys, only comments or blank lines); nothing would be configured. "
                          f"`sparseopt config > {path}` writes a template with every key")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses a key repeated in one mapping, naming the key and both lines.

    PyYAML silently keeps the last of two equal keys, so a repeated section (two ``optim:`` blocks) would drop the
    first block's keys. ``<<`` merge keys keep YAML's meaning (explicit keys override merged ones). Malformed
    YAML raises ``yaml.YAMLError``; a repeated key raises ConfigError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: str, source: str, seen_nodes: set[int] | None = None) -> None:
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", source, seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, str(key_node.value))
            line = key_node.start_mark.line + 1
            dotted = _join(path, key_node.value if isinstance(key_node, yaml.ScalarNode) else "?")
            if key in lines:
                what = ("a repeated section replaces the first one's keys: merge them into one section"
                        if isinstance(value_node, yaml.MappingNode) else "only the last value would be used")
                raise ConfigError(f"{source}: key '{dotted}' is given twice (lines {lines[key]} and {line}); "
                                  f"{what}, keep one")
            lines[key] = line
            _refuse_duplicate_keys(value_node, dotted, source, seen_nodes)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with `key.sub=value` overrides applied; values are parsed as YAML.

    Missing sections are created; unknown keys are left for `from_dict` to report (with a suggestion).
    """
    result = copy.deepcopy(data)
    errors: list[str] = []
    given: dict[str, str] = {}  # a key set twice would silently keep the last, like a repeated YAML key
    for item in overrides:
        key, equals, raw = item.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            errors.append(f"--set {item!r}: expected key.sub=value, e.g. --set optim.lr=0.05")
            continue
        dotted = ".".join(p.strip() for p in parts)
        if dotted in given:
            errors.append(f"--set {dotted} is given twice ({given[dotted]!r}, then {item!r}); keep one")
            continue
        given[dotted] = item
        try:
            value = parse_yaml(raw, f"--set {item!r}")
        except yaml.YAMLError as exc:
            errors.append(f"--set {item!r}: cannot parse the value as YAML: {_yaml_problem(exc)}")
            continue
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                errors.append(f"--set {item!r}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return result


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `override` replaces. Inputs are not modified."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    if data is None:  # a section written as `optim:` with nothing under it means "all defaults"
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'}: expected a mapping of keys to values, got {_show(data)}")
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    errors_before = len(errors)
    kwargs = {}
    for key, value in data.items():
        dotted = _join(path, key)
        if key not in fields:
            errors.append(_unknown_key(dotted, str(key), list(fields), path))
            continue
        converted = _convert(hints[key], value, dotted, fields[key].metadata, errors)
        if converted is not _INVALID:
            kwargs[key] = converted
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"missing required key '{_join(path, name)}' ({_type_name(hints[name])})")
    if len(errors) > errors_before:
        return _INVALID
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field rules from __post_init__
        errors.append(f"{path or 'config'}: {exc}")
        return _INVALID


def _convert(tp: Any, value: Any, key: str, meta: typing.Mapping[str, Any], errors: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is Any:  # free-form values (e.g. model options) are checked by whatever consumes them, but an
        return _refuse_non_finite(value, key, errors)  # inf/nan is never a meaningful setting
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        message = f"got {_show(value)}, expected one of {', '.join(map(repr, args))}"
        words = [choice for choice in args if isinstance(choice, str)]
        close = difflib.get_close_matches(value, words, n=1) if isinstance(value, str) else []
        return _fail(errors, key, message + (f" (did you mean {close[0]!r}?)" if close else ""), meta)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:
            return _convert(choices[0], value, key, meta, errors)
        for choice in choices:
            attempt: list[str] = []
            converted = _convert(choice, value, key, meta, attempt)
            if not attempt:
                return converted
        return _fail(errors, key, f"got {_show(value)}, expected {_type_name(tp)}", meta)
    if origin is list:
        if not isinstance(value, list):
            return _fail(errors, key, f"got {_show(value)}, expected a list ({_type_name(tp)})", meta)
        items = [_convert(args[0], item, f"{key}[{i}]", meta, errors) for i, item in enumerate(value)]
        return _INVALID if any(item is _INVALID for item in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _fail(errors, key, f"got {_show(value)}, expected a mapping ({_type_name(tp)})", meta)
        pairs = [(_convert(args[0], k, f"{key} (key {k!r})", {}, errors),
                  _convert(args[1], v, _join(key, k), meta, errors)) for k, v in value.items()]
        return _INVALID if any(k is _INVALID or v is _INVALID for k, v in pairs) else dict(pairs)
    if tp is bool:
        converted = value if isinstance(value, bool) else None
    elif tp is int:
        converted = _as_int(value)
    elif tp is float:
        converted = _as_float(value)
    elif tp is str:
        converted = value if isinstance(value, str) else None
    else:
        raise TypeError(f"configio does not support the field type {tp!r} (at '{key}')")
    if converted is None:
        return _fail(errors, key, f"got {_show(value)}, expected {_type_name(tp)}", meta)
    if tp is float and not math.isfinite(converted):
        return _fail(errors, key, f"got {value!r}, expected a finite number"
                     + (f" with {_describe_range(meta)}" if _describe_range(meta) else ""), meta)
    if tp in (int, float) and not _in_range(converted, meta):
        return _fail(errors, key, f"got {value!r}, expected {_type_name(tp)} with {_describe_range(meta)}"
                     + _percent_hint(converted, meta), meta)
    return converted


def _refuse_non_finite(value: Any, key: str, errors: list[str]) -> Any:
    """``value`` unchanged, or _INVALID after naming every inf/nan inside it (nested lists and mappings too)."""
    before = len(errors)
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{key}: got {value!r}, expected a finite number")
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_non_finite(v, _join(key, k), errors)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_non_finite(v, f"{key}[{i}]", errors)
    return _INVALID if len(errors) > before else value


def _percent_hint(x: float, meta: typing.Mapping[str, Any]) -> str:
    """A fraction written as a percentage (density: 90) is the likely mistake when x/100 would be valid."""
    upper = meta.get("le", meta.get("lt"))
    if upper is not None and upper <= 1 and 2 <= x <= 100 and _in_range(x / 100, meta):
        return f" (did you mean {x / 100:g}? this is a fraction, not a percentage)"
    return ""


def _as_int(value: Any) -> int | None:
    """int, or an integral float/string such as 1.0e+4 or "1e4" (YAML reads `1e4` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def _as_float(value: Any) -> float | None:
    """float from an int, float or numeric string (YAML reads `1e-3` as a string); never from a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _in_range(x: float, meta: typing.Mapping[str, Any]) -> bool:
    return all(compare(x, meta[name]) for name, (_, compare) in _BOUNDS.items() if name in meta)


def _describe_range(meta: typing.Mapping[str, Any]) -> str:
    return " and ".join(f"x {symbol} {meta[name]}" for name, (symbol, _) in _BOUNDS.items() if name in meta)


def _fail(errors: list[str], key: str, message: str, meta: typing.Mapping[str, Any]) -> Any:
    errors.append(f"{key}: {message}" + (f" [{meta['help']}]" if meta.get("help") else ""))
    return _INVALID


def _unknown_key(dotted: str, key: str, valid: list[str], path: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key '{dotted}' (did you mean '{_join(path, close[0])}'?)"
    where = f"under '{path}'" if path else "at the top level"
    return f"unknown key '{dotted}' (valid keys {where}: {', '.join(valid)})"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", repr(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _yaml_location(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if not problem:
        return str(exc).splitlines()[0]
    return f"{problem} ({context})" if context else problem
