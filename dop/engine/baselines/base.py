"""The method protocol: a token-reduction baseline is a selector or an input reducer on dop's engine.

Every method has one *knob* (kept visual tokens, a layer K, a schedule index) that budget matching
solves so its exact prefill FLOPs (dop convention) are the largest not above a budget. Its FLOPs
come from its per-layer group sizes (``schedule``) through ``dop.flops``, the same counter as DOP.

- ``kind = "in_llm"``: ``selectors(...)`` returns engine selectors (``before_layer(ctx)``) that drop
  rows per sample from a layer on (FastV, PyramidDrop, SparseVLM, DART, VTW).
- ``kind = "pre_llm"``: the method picks (and may merge) visual tokens before the decoder and the
  model runs on the shorter sequence (``reduce_inputs`` + hooks installed by ``apply``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from dop.engine.core import prune
from dop.errors import DopError
from dop.flops import count_flops, text_shape
from dop.ops import VISION


class MethodError(DopError, ValueError):
    """A method cannot run on this model or at this budget; the message says why."""


class Method:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "in_llm"  # in_llm | pre_llm
    knob: ClassVar[str] = "keep"  # what budget matching solves
    paper_convention: ClassVar[str | None] = "fastv"  # the method's own paper's FLOPs convention
    defaults: ClassVar[dict[str, Any]] = {}  # paper hyper-parameters (mirrored in conf/method/<name>.yaml)

    def __init__(self, **hparams: Any) -> None:
        unknown = sorted(set(hparams) - set(self.defaults) - {"name", "knob_value"})
        if unknown:
            raise MethodError(f"method {self.name!r}: unknown hyper-parameter(s) {unknown}; "
                              f"valid: {sorted(self.defaults)}")
        self.hparams = {**self.defaults, **{k: v for k, v in hparams.items() if k in self.defaults}}

    # --- budget ------------------------------------------------------------------------------
    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        """Candidate knob values (any order); budget matching evaluates each one's FLOPs."""
        return list(range(0, int(groups.get(VISION, 0)) + 1))

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        """Per-layer group sizes at this knob (all of q, kv and mlp see the same rows)."""
        raise NotImplementedError

    def nominal_knob(self, tokens: float, groups: Mapping[str, int], num_layers: int, images: int = 1,
                     reference_rows: float | None = None) -> Any:
        """The knob the literature runs this method at for ``tokens`` visual tokens in a sample of
        ``images`` images (``budget.match=nominal``): for a kept-token knob, ``tokens`` kept (per image
        for a pre-LLM method, whose knob is per image). ``reference_rows``: the visual rows ``tokens``
        is stated of (e.g. 2880 on LLaVA-NeXT), for methods whose published knobs are shares."""
        if self.knob != "keep":
            raise MethodError(f"method {self.name!r} has no published {self.knob} for a token count")
        per = tokens / max(images, 1) if self.kind == "pre_llm" else tokens
        return int(round(per))

    def flops(self, text_config: Any, groups: Mapping[str, int], knob: Any, convention: str = "dop") -> float:
        num_layers = text_shape(text_config).num_layers  # configs or plain dicts
        return count_flops(text_config, groups=groups, schedule=self.schedule(groups, num_layers, knob),
                           convention=convention)

    # --- running ----------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ``MethodError`` before running when the model lacks what the method needs."""

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        return []

    def reduce_inputs(self, model: nn.Module, inputs: Mapping[str, Any], knob: Any) -> Mapping[str, Any]:
        """Pre-LLM methods shorten the prompt here; in-LLM methods return the inputs unchanged."""
        return inputs

    @contextmanager
    def apply(self, model: nn.Module, knob: Any) -> Iterator[Any]:
        """Install the method on one model instance for the block (undone on exit)."""
        self.check_model(model)
        with prune(model, selectors=self.selectors(model, knob)) as pruner:
            yield pruner


def uniform_schedule(groups: Mapping[str, int], num_layers: int, changes: Mapping[int, Mapping[str, int]]
                     ) -> list[dict[str, int]]:
    """Group sizes per layer with ``changes[l]`` applied from layer ``l`` on."""
    current = dict(groups)
    out = []
    for layer in range(num_layers):
        current.update(changes.get(layer, {}))
        out.append(dict(current))
    return out


def topk_rows(score: torch.Tensor, allowed: torch.Tensor, k: Sequence[int] | int | torch.Tensor) -> torch.Tensor:
    """(B, T) bool: per sample, the ``k`` highest-scoring ``allowed`` rows (ties by position); ``k`` an
    int, or one count per sample (a list or a (B,) tensor). Tensor ops only (no host sync)."""
    B, T = allowed.shape
    masked = score.float().masked_fill(~allowed, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    k = torch.as_tensor(k, device=allowed.device).expand(B)
    n = torch.minimum(k, allowed.sum(dim=1))
    first = torch.arange(T, device=allowed.device).expand(B, T) < n[:, None]  # the first n of each order
    return torch.zeros_like(allowed).scatter(1, order, first)


# --- helpers shared by the in-LLM selectors -----------------------------------------------
def last_rows(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of each sample's last non-padding row (left or right padding)."""
    T = valid.shape[1]
    pos = torch.arange(T, device=valid.device).expand_as(valid)
    return torch.where(valid, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values.clamp(min=0)


def check_int(name: str, value: Any, low: int, high: int | None = None, method: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise MethodError(f"method {method!r}: {name} must be an int in {span}, got {value!r}")
    return value


def scale_layers(layers: Sequence[int], reference: int, num_layers: int, low: int = 1,
                 method: str = "") -> list[int]:
    """Layer indices of a ``reference``-deep model mapped to ``num_layers`` (strictly increasing)."""
    out: list[int] = []
    for layer in layers:
        x = max(low, round(layer * num_layers / reference)) if num_layers != reference else int(layer)
        out.append(max(x, out[-1] + 1) if out else x)
    if out and out[-1] >= num_layers:
        raise MethodError(f"method {method!r}: layers {list(layers)} (of {reference}) do not fit a "
                          f"{num_layers}-layer model")
    return out
