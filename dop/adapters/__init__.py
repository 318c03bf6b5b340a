"""Model-family adapters: decoder-layer paths and token groups per family."""

from dop.adapters.base import Adapter, AdapterError
from dop.adapters.registry import get_adapter, known_model_types, register

__all__ = ["Adapter", "AdapterError", "get_adapter", "known_model_types", "register"]
