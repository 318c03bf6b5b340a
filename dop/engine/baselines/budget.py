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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dop.budget import Budget
from dop.engine.baselines import get_method
from dop.engine.baselines.base import Method, MethodError
from dop.flops import count_flops, equivalent_tokens, flops_for_tokens, num_layers

__all__ = ["Match", "budget_to_flops", "knob_flops", "match_budget", "method_flops", "resolve_method"]


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
                 convention: str = "dop") -> float:
    """The method's prefill cost at ``knob``: its own ``flops`` when it overrides it, else the schedule
    through ``count_flops`` (with the prompt's groups, so the convention sees every group)."""
    if type(method).flops is not Method.flops:
        return float(method.flops(text_config, groups, knob, convention=convention))
    schedule = method.schedule(groups, _num_layers(text_config), knob)
    return float(count_flops(text_config, groups, schedule=schedule, convention=convention))


def _num_layers(text_config: Any) -> int:
    if isinstance(text_config, Mapping) and "num_hidden_layers" in text_config:
        return int(text_config["num_hidden_layers"])
    return num_layers(text_config)


def knob_flops(method: Method, text_config: Any, groups: Mapping[str, int]) -> list[tuple[Any, float]]:
    """(knob, dop FLOPs) for every candidate knob, in the method's order."""
    values = list(method.knob_values(groups, _num_layers(text_config)))
    if not values:
        raise MethodError(f"method {method.name!r} has no knob values for groups {dict(groups)}")
    return [(k, method_flops(method, text_config, groups, k)) for k in values]


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
                 budget_flops: float | Budget, *, budget: Budget | None = None) -> Match:
    """The knob whose dop-convention prefill FLOPs are the largest not above ``budget_flops``.

    ``budget_flops`` is FLOPs (not TFLOPs) or a ``Budget`` (converted for these ``groups``);
    ``budget`` names the user's unit for messages when FLOPs are given. Ties keep the first knob in
    the method's ``knob_values`` order. Raises ``MethodError`` when no knob fits, naming the nearest
    reachable budget.
    """
    method = resolve_method(method)
    groups = {str(g): int(n) for g, n in groups.items()}
    if isinstance(budget_flops, Budget):
        budget = budget_flops
        budget_flops = budget_to_flops(budget, text_config, groups)
    budget_flops = float(budget_flops)
    table = knob_flops(method, text_config, groups)
    fits = [(k, f) for k, f in table if f <= budget_flops * (1 + 1e-12)]
    if not fits:
        cheapest = min(f for _, f in table)
        asked = (f"{budget.kind}={budget.value:g}" if budget is not None else f"{budget_flops / 1e12:.4g} TFLOPs")
        raise MethodError(
            f"method {method.name!r} cannot reach the budget {asked} ({budget_flops / 1e12:.4g} TFLOPs) on this "
            f"prompt (groups {groups}): its cheapest {method.knob} costs {cheapest / 1e12:.4g} TFLOPs; the "
            f"nearest reachable budget is {_in_unit(cheapest, budget, text_config, groups)}")
    best_flops = max(f for _, f in fits)
    knob = next(k for k, f in fits if f == best_flops)
    above = [f for _, f in table if f > budget_flops * (1 + 1e-12)]
    paper_conv = method.paper_convention
    paper = method_flops(method, text_config, groups, knob, convention=paper_conv) if paper_conv else None
    try:
        eq = equivalent_tokens(text_config, groups, best_flops) if groups.get("vision") is not None else None
    except ValueError:  # a method that also cuts non-visual rows below their dense cost
        eq = None
    return Match(knob=knob, flops=best_flops, paper_flops=paper, paper_convention=paper_conv,
                 budget_flops=budget_flops, method=method.name, knob_name=method.knob, budget=budget,
                 next_flops=min(above) if above else None, equivalent_tokens=eq)
