"""Token-reduction baselines on dop's engine, registered by name (``conf/method/<name>.yaml``)."""

from __future__ import annotations

import importlib
from typing import Any

from dop.baselines.base import Method, MethodError

# name -> "module:Class"; imported lazily so one broken method never blocks the others.
_METHODS: dict[str, str] = {}


def register(name: str, target: str) -> None:
    _METHODS[name] = target


def known_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str, **hparams: Any) -> Method:
    """An instance of the named method with its paper defaults, overridden by ``hparams``."""
    if name not in _METHODS:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    module, cls = _METHODS[name].split(":")
    method_cls = getattr(importlib.import_module(module), cls)
    if not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
        raise MethodError(f"{_METHODS[name]} is not a dop Method")
    return method_cls(**hparams)


for _name, _target in {
    # in-LLM selectors (decide at a layer from that layer's state)
    "fastv": "dop.baselines.fastv:FastV",
    "pdrop": "dop.baselines.pyramiddrop:PyramidDrop",
    "sparsevlm": "dop.baselines.sparsevlm:SparseVLM",
    "dart": "dop.baselines.dart:DART",
    "vtw": "dop.baselines.vtw:VTW",
    # pre-LLM reducers (choose visual tokens before the decoder)
    "fastervlm": "dop.baselines.fastervlm:FasterVLM",
    "visionzip": "dop.baselines.visionzip:VisionZip",
    "prumerge_plus": "dop.baselines.prumerge:PruMergePlus",
    "trim": "dop.baselines.trim:TRIM",
    "divprune": "dop.baselines.divprune:DivPrune",
    "vispruner": "dop.baselines.vispruner:VisPruner",
    "cdpruner": "dop.baselines.cdpruner:CDPruner",
    "resize": "dop.baselines.resize:InputResize",  # Qwen-VL input resizing (DOP's n_v front end there)
}.items():
    register(_name, _target)

__all__ = ["Method", "MethodError", "get_method", "known_methods", "register"]
