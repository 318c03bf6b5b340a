"""Adapters registered by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from dop.adapters.base import Adapter, AdapterError

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def known_model_types() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a transformers MLLM instance, chosen by ``model.config.model_type``."""
    _load_all()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise AdapterError(
            f"no dop adapter for model_type {model_type!r}; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[model_type](model)


def _load_all() -> None:
    # Importing the family modules registers them; kept lazy to avoid import cycles.
    from dop.adapters import internvl, llava, qwen_vl  # noqa: F401
