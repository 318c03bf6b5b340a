"""Model-family adapters: decoder-layer paths and token groups per family, chosen by ``config.model_type``.

Owns the facts about each transformers MLLM family the engine needs (``base.Adapter``). May import
the concepts (``dop.ops``); nothing above it.
"""

from __future__ import annotations

from torch import nn

from dop.adapters.base import Adapter, AdapterError
from dop.registry import Registry

ADAPTERS = Registry("model_type", {
    "llava": "dop.adapters.llava:LlavaAdapter",
    "llava_next": "dop.adapters.llava:LlavaNextAdapter",
    "llava_onevision": "dop.adapters.llava:LlavaOnevisionAdapter",
    "qwen2_vl": "dop.adapters.qwen_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "dop.adapters.qwen_vl:Qwen25VLAdapter",
    "qwen3_vl": "dop.adapters.qwen_vl:Qwen3VLAdapter",
    "internvl": "dop.adapters.internvl:InternVLAdapter",
}, base=Adapter, error=AdapterError)


def known_model_types() -> list[str]:
    return ADAPTERS.names()


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a transformers MLLM instance, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise AdapterError(f"no dop adapter for model_type {model_type!r}; supported: {', '.join(ADAPTERS.names())}")
    return ADAPTERS.get(model_type)(model)


__all__ = ["ADAPTERS", "Adapter", "AdapterError", "get_adapter", "known_model_types"]
