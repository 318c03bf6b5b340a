"""Compute budgets for the search: absolute TFLOPs, a ratio of the dense model, or an "equivalent
visual token count" (the cost of keeping ``k`` visual tokens in every layer, other groups dense).

One sweep serves every budget: a budget is only turned into a FLOPs number when the solver runs,
against the same FLOPs counter (``dop.flops.count_flops``) the policy is scored with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dop.errors import DopError

KINDS: tuple[str, ...] = ("tflops", "ratio", "tokens")
_ALIASES = {"tflop": "tflops", "flops": "tflops", "dense_ratio": "ratio", "fraction": "ratio",
            "token": "tokens", "visual_tokens": "tokens", "equivalent_tokens": "tokens"}


class BudgetError(DopError, ValueError):
    """A budget cannot be parsed, or cannot be reached."""


@dataclass(frozen=True)
class Budget:
    """``Budget("ratio", 0.35)``: at most 35% of the dense prefill FLOPs."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        kind = _ALIASES.get(str(self.kind).lower(), str(self.kind).lower())
        if kind not in KINDS:
            raise BudgetError(f"unknown budget kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        object.__setattr__(self, "kind", kind)
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise BudgetError(f"budget value for kind {kind!r} must be a number, got {self.value!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise BudgetError(f"budget value must be finite, got {self.value!r}")
        if kind == "ratio" and not 0 < value <= 1:
            raise BudgetError(f"a ratio budget must be in (0, 1] (fraction of dense FLOPs), got {value}")
        if kind == "tflops" and value <= 0:
            raise BudgetError(f"a TFLOPs budget must be > 0, got {value}")
        if kind == "tokens" and value < 0:
            raise BudgetError(f"an equivalent-token budget must be >= 0 visual tokens, got {value}")
        object.__setattr__(self, "value", value)

    @property
    def name(self) -> str:
        """File-name id: ``ratio_0.35``, ``tokens_128``, ``tflops_4.29``."""
        v = int(self.value) if self.value == int(self.value) and self.kind != "ratio" else self.value
        return f"{self.kind}_{v}"

    def to_flops(
        self,
        dense_flops: float,
        flops_for_tokens: Callable[[float], float] | None = None,
    ) -> float:
        """The FLOPs this budget allows. ``flops_for_tokens(k)`` is needed for ``tokens`` budgets."""
        if self.kind == "tflops":
            return self.value * 1e12
        if self.kind == "ratio":
            return self.value * dense_flops
        if flops_for_tokens is None:
            raise BudgetError("a 'tokens' budget needs dop.flops.flops_for_tokens (equivalent-token FLOPs)")
        return float(flops_for_tokens(self.value))


def parse_budgets(spec: Any) -> list[Budget]:
    """Budgets from a config node / mapping ``{kind: ratio, values: [0.5, 0.35]}``, a string
    ``"ratio=0.5"`` / ``"tokens:128"``, a ``Budget``, or a list of any of these."""
    if spec is None:
        raise BudgetError("no budget given: use budget=ratio|tflops|tokens with budget.values=[...]")
    if isinstance(spec, Budget):
        return [spec]
    if isinstance(spec, str):
        for sep in ("=", ":", "_"):
            if sep in spec:
                kind, value = spec.split(sep, 1)
                return [Budget(kind.strip(), value.strip())]
        raise BudgetError(f"budget {spec!r} must look like 'ratio=0.5', 'tokens=128' or 'tflops=4.3'")
    if isinstance(spec, Mapping) or hasattr(spec, "keys"):
        kind = spec.get("kind")
        if kind is None:
            raise BudgetError(f"budget config needs 'kind' (one of {', '.join(KINDS)}); got keys {sorted(spec.keys())}")
        values = spec.get("values", spec.get("value"))
        if values is None:
            raise BudgetError(f"budget config of kind {kind!r} needs 'values: [...]'")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            values = [values]
        values = list(values)
        if not values:
            raise BudgetError(f"budget config of kind {kind!r} has an empty 'values' list")
        return [Budget(kind, v) for v in values]
    if isinstance(spec, Iterable):
        out: list[Budget] = []
        for item in spec:
            out.extend(parse_budgets(item))
        return out
    raise BudgetError(f"cannot read a budget from {spec!r}")
