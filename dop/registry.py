"""The one registry mechanism of dop: a name -> ``"module:attr"`` table, loaded lazily.

    ADAPTERS = Registry("model_type", {"llava": "dop.adapters.llava:LlavaAdapter"}, error=AdapterError)
    ADAPTERS.get("llava")        # imports dop.adapters.llava on first use, returns the class

Lazy loading keeps ``dop --help`` fast and one broken entry from blocking the others, and the table
is the place a reader looks for what exists. An unknown name is an ``error`` naming the valid ones
(and the closest match). Used for model-family adapters, baseline methods and stages; config groups
are Hydra's own registry (``conf/<group>/<name>.yaml``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any


class Registry:
    """``kind``: what the names are (for messages); ``entries``: name -> ``"module:attr"``;
    ``base``: a class every loaded entry must subclass (None: any object)."""

    def __init__(self, kind: str, entries: Mapping[str, str], *, base: type | None = None,
                 error: type[Exception] = KeyError) -> None:
        self.kind, self.base, self.error = kind, base, error
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def target(self, name: str) -> str:
        """The ``"module:attr"`` of ``name`` (an error listing the valid names when unknown)."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown {self.kind} {name!r}{hint}; valid {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def register(self, name: str, target: str) -> None:
        """Add (or replace) ``name`` -> ``"module:attr"`` (plugins, test stand-ins)."""
        self._entries[name] = target
        self._loaded.pop(name, None)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._loaded.pop(name, None)

    def get(self, name: str) -> Any:
        """The object registered as ``name``, imported on first use."""
        if name not in self._loaded:
            module, attr = self.target(name).split(":")
            obj = getattr(importlib.import_module(module), attr)
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise self.error(f"{self._entries[name]} is not a {self.base.__name__}")
            self._loaded[name] = obj
        return self._loaded[name]
