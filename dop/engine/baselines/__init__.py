"""Token-reduction baselines on dop's engine, registered by name (``conf/method/<name>.yaml``)."""

from __future__ import annotations

import importlib
from typing import Any

from dop.engine.baselines.base import Method, MethodError

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
    "fastv": "dop.engine.baselines.fastv:FastV",
    "pdrop": "dop.engine.baselines.pyramiddrop:PyramidDrop",
    "sparsevlm": "dop.engine.baselines.sparsevlm:SparseVLM",
    "dart": "dop.engine.baselines.dart:DART",
    "vtw": "dop.engine.baselines.vtw:VTW",
    # pre-LLM reducers (choose visual tokens before the decoder)
    "fastervlm": "dop.engine.baselines.fastervlm:FasterVLM",
    "visionzip": "dop.engine.baselines.visionzip:VisionZip",
    "prumerge_plus": "dop.engine.baselines.prumerge:PruMergePlus",
    "trim": "dop.engine.baselines.trim:TRIM",
    "divprune": "dop.engine.baselines.divprune:DivPrune",
    "vispruner": "dop.engine.baselines.vispruner:VisPruner",
    "cdpruner": "dop.engine.baselines.cdpruner:CDPruner",
    "resize": "dop.engine.baselines.resize:InputResize",  # Qwen-VL input resizing (DOP's n_v front end there)
}.items():
    register(_name, _target)

__all__ = ["Method", "MethodError", "get_method", "known_methods", "register"]
