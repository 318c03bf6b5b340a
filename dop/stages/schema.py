"""Typed, strict configuration objects: a mapping (a composed Hydra node) turned into a dataclass.

``typed(Schema, node, "model")`` checks every key against the dataclass fields and every value
against the field's type; an unknown key, a missing key, a wrong type or a value outside a
``Literal`` is a ``ConfigError`` whose one-line message names the full key and what is valid::

    typed(SweepConfig, {"reuse": "halfway", ...}, "sweep")
    # ConfigError: sweep.reuse='halfway' is not valid; valid: none, prefix, half_layer

Defaults live in the YAML files of ``conf/``; a schema field has a default only when its key is
optional in every YAML of its group. Stages (``dop.stages``) are the only callers that pass Hydra
nodes; library code receives the typed objects or plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from dop.errors import DopError

T = TypeVar("T")


class ConfigError(DopError, ValueError):
    """A configuration key or value that is not valid (the message names the full key)."""


def plain(node: Any) -> Any:
    """A resolved plain container from an OmegaConf node (other values unchanged)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def typed(schema: type[T], node: Any, path: str = "") -> T:
    """``node`` as an instance of the dataclass ``schema``, checked strictly (module docstring)."""
    if dataclasses.is_dataclass(node) and isinstance(node, schema):
        return node
    data = plain(node)
    where = path or schema.__name__
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of {_field_names(schema)}, got {_show(data)}")
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{_key(where, unknown[0])} is not a known key{hint}; valid keys: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        key = _key(where, name)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key} is missing")
            continue
        values[name] = convert(hints[name], data[name], key)
    try:
        return schema(**values)
    except (TypeError, ValueError) as err:  # a __post_init__ check: keep its message, add the place
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from None


def _key(where: str, name: Any) -> str:
    return f"{where}.{name}" if where else str(name)


def _field_names(schema: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(schema))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked (and converted) against the type ``tp``; ``key`` names it in errors."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}={_show(value)} is not valid; expected {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise ConfigError(f"{key}={_show(value)} is not valid; valid: {', '.join(str(c) for c in choices)}")
    if dataclasses.is_dataclass(tp):
        return typed(tp, value, key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={_show(value)} is not valid; expected a list")
        args = get_args(tp)
        item = args[0] if args else Any
        out = [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={_show(value)} is not valid; expected a mapping")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={_show(value)} is not valid; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={_show(value)} is not valid; expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={_show(value)} is not valid; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML reads `name: 7b` fine, `1` not
            return str(value)
        raise ConfigError(f"{key}={_show(value)} is not valid; expected a string")
    raise ConfigError(f"{key}: unsupported schema type {tp!r}")  # a schema bug, not a user error


def _describe(tp: Any) -> str:
    names = []
    for option in get_args(tp):
        if option is type(None):
            names.append("null")
        elif get_origin(option) is Literal:
            names.append(" | ".join(str(c) for c in get_args(option)))
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)
