"""Token-reduction baselines on dop's engine, registered by name (``conf/method/<name>.yaml``).

Owns the 12 baselines (and input resizing) as selectors or input reducers on ``dop.engine.core``,
their per-family vision-tower access, and budget matching (``budget``). May import the engine core,
model access and the concepts; never ``dop.engine.front_end`` or the public ``dop.engine.prune``.
"""

from __future__ import annotations

from typing import Any

from dop.engine.baselines.base import Method, MethodError
from dop.registry import Registry

# name -> "module:Class"; imported lazily so one broken method never blocks the others.
METHODS = Registry("method", {
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
}, base=Method, error=MethodError)


def known_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str, **hparams: Any) -> Method:
    """An instance of the named method with its paper defaults, overridden by ``hparams``."""
    return METHODS.get(name)(**hparams)


__all__ = ["METHODS", "Method", "MethodError", "get_method", "known_methods"]
