"""Budget matching: the knob of a baseline whose exact prefill FLOPs meet a budget.

Every method exposes one knob (kept visual tokens, a layer, a schedule index) and its candidate
values (``Method.knob_values``). Matching evaluates each candidate's prefill FLOPs in the dop
convention (``dop.flops.count_flops`` over the method's per-layer schedule, the same counter DOP's
search uses) and takes the largest not above the budget, so every method is compared with DOP at
equal TFLOPs::

    from dop.engine.baselines import get_method
    from dop.engine.baselines.budget import match_budget
    from dop.budget import Budget

    m = match_budget(get_method("fastv"), text_config, {"system": 35, "vision": 576, "instruction": 100},
                     Budget("tokens", 128))
    m.knob, m.tflops, m.paper_flops, m.paper_convention    # paper_flops: FastV/PDrop's own convention

A budget no knob reaches raises ``MethodError`` naming the nearest reachable budget in the unit the
user gave (TFLOPs, ratio of dense, or equivalent visual tokens).

Per evaluated sample (``SampleMatcher``, used by the evaluation plugin): a budget is resolved on each
sample's own group sizes (``sample_budget_flops``): a ratio is a share of that sample's dense prefill,
a TFLOPs value a share too (of the dense prefill of ``reference_groups``, the prompt the value was
stated for), and ``k`` tokens are ``k`` times the sample's budget units (one per image; on LLaVA-NeXT
its crops over the most crops an image can have, ``dop.adapters``) in equal-FLOPs terms. The knob is
matched there (``match=flops``) or set to the method's published knob for that token count
(``match=nominal``, ``Method.nominal_knob``), cached per input shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from dop.budget import Budget
from dop.engine.baselines import get_method
from dop.engine.baselines.base import Method, MethodError
from dop.flops import (
    TextShape,
    count_flops,
    equivalent_tokens,
    flops_breakdown,
    flops_for_tokens,
    num_layers,
    text_shape,
)

__all__ = ["MATCH_MODES", "Match", "SampleMatcher", "budget_to_flops", "knob_flops", "match_budget", "method_flops",
           "nominal_match", "resolve_method", "sample_budget_flops"]

MatchMode = Literal["flops", "nominal"]
MATCH_MODES: tuple[str, ...] = ("flops", "nominal")


@dataclass(frozen=True)
class Match:
    """A method's knob at a budget. FLOPs are of one prefill (decoder, batch 1), not tera-scaled."""

    knob: Any
    flops: float  # dop convention
    paper_flops: float | None  # the method's own paper convention (None when it has none)
    paper_convention: str | None
    budget_flops: float
    method: str = ""
    knob_name: str = "keep"
    budget: Budget | None = None
    next_flops: float | None = None  # the cheapest knob above the budget (None: every knob fits)
    equivalent_tokens: float | None = None  # visual tokens kept in all layers at the same FLOPs
    reachable: bool = True  # False: no knob fits; the cheapest one runs (per-sample matching only)
    mode: str = "flops"  # flops: matched to the budget; nominal: the published knob for the token count

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    @property
    def paper_tflops(self) -> float | None:
        return None if self.paper_flops is None else self.paper_flops / 1e12

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields for a results record's ``extra``."""
        return {
            "method": self.method, "knob_name": self.knob_name, "knob": _jsonable(self.knob),
            "tflops": self.tflops, "budget_tflops": self.budget_flops / 1e12,
            "paper_tflops": self.paper_tflops, "paper_convention": self.paper_convention,
            "next_tflops": None if self.next_flops is None else self.next_flops / 1e12,
            "equivalent_tokens": self.equivalent_tokens,
            "budget_kind": None if self.budget is None else self.budget.kind,
            "budget_value": None if self.budget is None else self.budget.value,
            "reachable": self.reachable, "match": self.mode,
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


def resolve_method(method: Method | str | Mapping[str, Any], **hparams: Any) -> Method:
    """A ``Method`` from an instance, a registry name, or a config node ``{name: ..., <hparams>}``."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        return get_method(method, **hparams)
    if isinstance(method, Mapping) or hasattr(method, "keys"):
        node = {str(k): method[k] for k in method.keys()}
        if "name" not in node:
            raise MethodError(f"a method config needs 'name' (the registry key); got keys {sorted(node)}")
        name = str(node.pop("name"))
        return get_method(name, **_plain(node), **hparams)
    raise MethodError(f"cannot build a method from {method!r}")


def _plain(node: Any) -> Any:
    """Plain dicts and lists from any mapping / sequence (a config node stays outside the engine)."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        return [_plain(v) for v in node]
    return node


def method_flops(method: Method, text_config: Any, groups: Mapping[str, int], knob: Any,
                 convention: str = "dop", images: int = 1) -> float:
    """The method's prefill cost at ``knob``: its own ``flops`` when it overrides it, else the schedule
    through ``count_flops`` (with the prompt's groups, so the convention sees every group).

    ``images``: the sample's images. A pre-LLM method's knob is per image, so its schedule is taken at
    ``knob * images`` visual rows (capped at the sample's): exact for images of one size (LLaVA-1.5),
    an upper bound otherwise (each image keeps ``min(knob, its rows)``)."""
    knob_rows = knob
    if images > 1 and method.kind == "pre_llm" and isinstance(knob, (int, float)) and not isinstance(knob, bool):
        knob_rows = int(knob) * images
    if type(method).flops is not Method.flops:
        return float(method.flops(text_config, groups, knob_rows, convention=convention))
    schedule = method.schedule(groups, _num_layers(text_config), knob_rows)
    if convention == "dop":  # every op sees every group's rows: a sum of per-layer costs of the row count
        shape = text_shape(text_config)
        return float(sum(_dense_layer_flops(shape, sum(layer.values())) for layer in schedule))
    return float(count_flops(text_config, groups, schedule=schedule, convention=convention))


@functools.lru_cache(maxsize=1 << 16)
def _dense_layer_flops(shape: TextShape, rows: int) -> float:
    """One decoder layer's dop-convention cost with ``rows`` rows in every op (``count_flops``'s own
    per-layer number; matching evaluates hundreds of schedules per input shape)."""
    return flops_breakdown(shape, rows=[(rows, rows, rows)] * shape.num_layers).layers[0].total


def _num_layers(text_config: Any) -> int:
    if isinstance(text_config, Mapping) and "num_hidden_layers" in text_config:
        return int(text_config["num_hidden_layers"])
    return num_layers(text_config)


def knob_flops(method: Method, text_config: Any, groups: Mapping[str, int], images: int = 1
               ) -> list[tuple[Any, float]]:
    """(knob, dop FLOPs) for every candidate knob, in the method's order."""
    values = list(method.knob_values(groups, _num_layers(text_config)))
    if not values:
        raise MethodError(f"method {method.name!r} has no knob values for groups {dict(groups)}")
    return [(k, method_flops(method, text_config, groups, k, images=images)) for k in values]


def budget_to_flops(budget: Budget, text_config: Any, groups: Mapping[str, int]) -> float:
    """The FLOPs a budget allows for this prompt (dop convention, the counter DOP's search uses)."""
    dense = float(count_flops(text_config, groups, convention="dop"))
    return float(budget.to_flops(dense, lambda k: flops_for_tokens(text_config, groups, k, convention="dop")))


def _in_unit(flops: float, budget: Budget | None, text_config: Any, groups: Mapping[str, int]) -> str:
    """``flops`` as the smallest budget in the user's unit that still allows them (rounded up)."""
    kind = budget.kind if budget is not None else "tflops"
    if kind == "ratio":
        dense = float(count_flops(text_config, groups, convention="dop"))
        value = math.ceil(flops / dense * 1e4) / 1e4
        return f"budget=ratio budget.values=[{value:g}] ({flops / 1e12:.4g} TFLOPs)"
    if kind == "tokens":
        k = equivalent_tokens(text_config, groups, flops) if groups.get("vision") is not None else None
        if k is not None:
            value = math.ceil(k - 1e-9)
            return f"budget=tokens budget.values=[{value}] ({flops / 1e12:.4g} TFLOPs)"
    value = math.ceil(flops / 1e12 * 1e4) / 1e4
    return f"budget=tflops budget.values=[{value:g}]"


def match_budget(method: Method | str, text_config: Any, groups: Mapping[str, int],
                 budget_flops: float | Budget, *, budget: Budget | None = None, images: int = 1,
                 strict: bool = True) -> Match:
    """The knob whose dop-convention prefill FLOPs are the largest not above ``budget_flops``.

    ``budget_flops`` is FLOPs (not TFLOPs) or a ``Budget`` (converted for these ``groups``);
    ``budget`` names the user's unit for messages when FLOPs are given. Ties keep the first knob in
    the method's ``knob_values`` order. Raises ``MethodError`` when no knob fits, naming the nearest
    reachable budget (``strict=False``: the cheapest knob instead, with ``reachable=False``).
    ``images``: the sample's images (a pre-LLM knob is per image, ``method_flops``).
    """
    method = resolve_method(method)
    groups = {str(g): int(n) for g, n in groups.items()}
    if isinstance(budget_flops, Budget):
        budget = budget_flops
        budget_flops = budget_to_flops(budget, text_config, groups)
    budget_flops = float(budget_flops)
    table = knob_flops(method, text_config, groups, images)
    fits = [(k, f) for k, f in table if f <= budget_flops * (1 + 1e-12)]
    reachable = bool(fits)
    if not fits and not strict:
        cheapest = min(f for _, f in table)
        fits = [(k, f) for k, f in table if f == cheapest]
    if not fits:
        cheapest = min(f for _, f in table)
        asked = (f"{budget.kind}={budget.value:g}" if budget is not None else f"{budget_flops / 1e12:.4g} TFLOPs")
        raise MethodError(
            f"method {method.name!r} cannot reach the budget {asked} ({budget_flops / 1e12:.4g} TFLOPs) on this "
            f"prompt (groups {groups}): its cheapest {method.knob} costs {cheapest / 1e12:.4g} TFLOPs; the "
            f"nearest reachable budget is {_in_unit(cheapest, budget, text_config, groups)}")
    best_flops = max(f for _, f in fits)
    knob = next(k for k, f in fits if f == best_flops)
    above = [f for _, f in table if f > max(budget_flops, best_flops) * (1 + 1e-12)]
    return _match(method, text_config, groups, knob, best_flops, budget_flops, budget, images,
                  next_flops=min(above) if above else None, reachable=reachable)


def _match(method: Method, text_config: Any, groups: Mapping[str, int], knob: Any, flops: float,
           budget_flops: float, budget: Budget | None, images: int, **fields: Any) -> Match:
    paper_conv = method.paper_convention
    paper = (method_flops(method, text_config, groups, knob, convention=paper_conv, images=images)
             if paper_conv else None)
    try:
        eq = equivalent_tokens(text_config, groups, flops) if groups.get("vision") is not None else None
    except ValueError:  # a method that also cuts non-visual rows below their dense cost
        eq = None
    return Match(knob=knob, flops=flops, paper_flops=paper, paper_convention=paper_conv,
                 budget_flops=budget_flops, method=method.name, knob_name=method.knob, budget=budget,
                 equivalent_tokens=eq, **fields)


# --- per evaluated sample ---------------------------------------------------------------------
def sample_budget_flops(budget: Budget, text_config: Any, groups: Mapping[str, int], units: float = 1.0,
                        reference_groups: Mapping[str, float] | None = None) -> float:
    """The FLOPs ``budget`` allows one sample with these group sizes (dop convention).

    ``ratio``: that share of the sample's dense prefill. ``tflops``: the same share of it as the value
    is of the dense prefill of ``reference_groups`` (the prompt the value was stated for; without one the
    value is absolute). ``tokens``: ``k * units`` visual tokens kept in every layer (``units``: the
    sample's budget units, ``dop.adapters.Adapter.budget_units``)."""
    dense = float(count_flops(text_config, groups, convention="dop"))
    if budget.kind == "ratio":
        return budget.value * dense
    if budget.kind == "tflops":
        if not reference_groups:
            return budget.value * 1e12
        reference = float(count_flops(text_config, reference_groups, convention="dop"))
        return budget.value * 1e12 / reference * dense
    return float(flops_for_tokens(text_config, groups, budget.value * units, convention="dop"))


def nominal_match(method: Method | str, text_config: Any, groups: Mapping[str, int], budget: Budget, *,
                  units: float = 1.0, images: int = 1, reference_rows: float | None = None) -> Match:
    """The method at its published knob for a ``tokens`` budget (``Method.nominal_knob`` of ``k * units``
    tokens), with its true FLOPs beside the sample's equal-FLOPs budget (``reachable``: whether they fit).
    ``reference_rows``: the visual rows ``k`` is stated of (``dop.adapters.Adapter.reference_rows``)."""
    method = resolve_method(method)
    if budget.kind != "tokens":
        raise MethodError(f"budget.match=nominal runs each baseline at its published knob for a token count: it "
                          f"needs budget=tokens, got budget={budget.kind}")
    groups = {str(g): int(n) for g, n in groups.items()}
    tokens = budget.value * units
    rows = reference_rows * units if reference_rows else None
    knob = method.nominal_knob(tokens, groups, _num_layers(text_config), images=images, reference_rows=rows)
    flops = method_flops(method, text_config, groups, knob, images=images)
    budget_flops = sample_budget_flops(budget, text_config, groups, units)
    return _match(method, text_config, groups, knob, flops, budget_flops, budget, images,
                  reachable=flops <= budget_flops * (1 + 1e-12), mode="nominal")


class SampleMatcher:
    """A method's knob per sample at one budget, cached per input shape (group sizes, units, images).

    ``match(groups, units, images)`` -> ``Match`` whose ``budget_flops`` is the sample's own budget
    (``sample_budget_flops``). ``mode="flops"``: the knob with the most FLOPs not above it; a sample no
    knob reaches runs at the cheapest knob with ``reachable=False`` (the caller names it).
    ``mode="nominal"``: the published knob for the token count (``nominal_match``)."""

    def __init__(self, method: Method, text_config: Any, budget: Budget, mode: MatchMode = "flops", *,
                 reference_groups: Mapping[str, float] | None = None, reference_rows: float | None = None) -> None:
        if mode not in MATCH_MODES:
            raise MethodError(f"budget.match={mode!r} is not valid; valid: {', '.join(MATCH_MODES)}")
        if mode == "nominal" and budget.kind != "tokens":
            raise MethodError(f"budget.match=nominal needs budget=tokens (a published knob is for a token count), "
                              f"got budget={budget.kind}")
        self.method, self.text_config, self.budget, self.mode = method, text_config, budget, mode
        self.reference_groups, self.reference_rows = reference_groups, reference_rows
        self._cache: dict[tuple, Match] = {}

    def match(self, groups: Mapping[str, int], units: float = 1.0, images: int = 1) -> Match:
        groups = {str(g): int(n) for g, n in groups.items()}
        key = (tuple(sorted(groups.items())), round(float(units), 9), int(images))
        if key not in self._cache:
            if self.mode == "nominal":
                m = nominal_match(self.method, self.text_config, groups, self.budget, units=units, images=images,
                                  reference_rows=self.reference_rows)
            else:
                target = sample_budget_flops(self.budget, self.text_config, groups, units, self.reference_groups)
                m = replace(match_budget(self.method, self.text_config, groups, target, budget=self.budget,
                                         images=images, strict=False), mode="flops")
            self._cache[key] = m
        return self._cache[key]
